"""docs/architecture.md stays the map of the code: every section the code cites exists, every file it names exists."""

import re
from pathlib import Path


REPO = Path(__file__).parent.parent
ARCHITECTURE = (REPO / "docs" / "architecture.md").read_text()
CODE = [*REPO.glob("hallo3/**/*.py"), *REPO.glob("train/**/*.py"), *REPO.glob("benchmarks/*.py"), REPO / "app.py"]


def headings() -> set[str]:
    return set(re.findall(r"^#{2,4} (\d+(?:\.\d+)?) ", ARCHITECTURE, flags=re.MULTILINE))


def cited_sections() -> dict[str, set[str]]:
    """Section number -> the files citing it, from every "(architecture ...)" / "architecture N" in the code."""
    cited: dict[str, set[str]] = {}
    for path in CODE:
        for citation in re.findall(
            r"architecture ((?:\d+(?:\.\d+)?(?: steps? [\d-]+)?(?:,| and) ?)*\d+(?:\.\d+)?)", path.read_text()
        ):
            for number in re.findall(r"(?<![\w-])(\d+(?:\.\d+)?)(?! ?-)", re.sub(r"steps? [\d-]+", "", citation)):
                cited.setdefault(number, set()).add(str(path.relative_to(REPO)))
    return cited


def test_every_cited_section_is_a_heading():
    cited = cited_sections()
    assert len(cited) > 30  # the code cites the document throughout; a broken pattern would find nothing
    missing = {number: sorted(files) for number, files in cited.items() if number not in headings()}
    assert not missing, f"cited but not in docs/architecture.md: {missing}"


def test_every_file_the_document_names_exists():
    named = set(re.findall(r"`((?:hallo3|train|tests|benchmarks|docs)/[\w/.*{},-]+\.(?:py|md|yaml))`", ARCHITECTURE))
    assert len(named) > 15
    missing = [name for name in sorted(named) if not any(REPO.glob(re.sub(r"\{(\w),(\w)\}", r"[\1\2]", name)))]
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
