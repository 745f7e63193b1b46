"""`python -m train.prepare_dataset` can be trusted with a folder: it deletes nothing it did not write, shards keep
to themselves, reruns repair what was damaged, and the official steps it skips are skipped only when asked.

Tiny synthetic talking heads (2.6 s, 240 px) with the tiny-random encoders; face detection and embedding are
answered from what the generator drew (`RecordedFaces`), so every run is deterministic.
"""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from train.prepare_dataset import Filters, main
from train.synthetic_data import RecordedFaces, talking_video

from .conftest import ASSETS


REPO = Path(__file__).parent.parent
GIRL, MAN = ASSETS / "0001.jpg", ASSETS / "0008.jpg"
# name -> portrait. Their file names hash to worker 0 (anna, dora) and worker 1 (ben, aaron) of 2; aaron sorts
# first, so adding it moves every other video under a split by position.
PORTRAITS = {"anna": GIRL, "ben": MAN, "dora": GIRL, "aaron": MAN}
SECONDS = 2.6  # 65 frames: above the 2.5 s minimum


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> Path:
    """One mp4 per name of PORTRAITS, made once; each test copies the ones it needs."""
    root = tmp_path_factory.mktemp("pool")
    for seed, (name, photo) in enumerate(PORTRAITS.items()):
        talking_video(root / f"{name}.mp4", photo, SECONDS, seed=seed)
    return root


@pytest.fixture(scope="module")
def faces() -> RecordedFaces:
    return RecordedFaces.for_photos([GIRL, MAN])


def add_videos(pool: Path, root: Path, names: dict[str, str]) -> tuple[Path, Path]:
    """Copy pool videos into root/videos under new file names ({file name: pool name}), with a caption each."""
    videos, captions = root / "videos", root / "captions"
    videos.mkdir(parents=True, exist_ok=True)
    captions.mkdir(exist_ok=True)
    for file_name, source in names.items():
        shutil.copy(pool / f"{source}.mp4", videos / file_name)
        (captions / f"{Path(file_name).stem}.txt").write_text(f"{source} talking")
    return videos, captions


def prepare(root: Path, output: Path, analyzer, *extra: str) -> int:
    """The tiny run: tiny-random encoders, no separator on a CPU test machine (so said with the flag)."""
    argv = ["--videos", str(root / "videos"), "--captions", str(root / "captions"), "--output", str(output)]
    return main([*argv, "--wav2vec", "tiny-random", "--no-vocal-separation", *extra], analyzer=analyzer)


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def metadata_names(output: Path) -> list[str]:
    """The clip names of every metadata shard, repeats kept."""
    return sorted(
        json.loads(line)["name"]
        for path in output.glob("metadata*.jsonl")
        for line in path.read_text().splitlines()
        if line.strip()
    )


def report_videos(output: Path) -> list[str]:
    """The videos of every report shard's parsable lines, repeats kept."""
    videos = []
    for path in output.glob("report*.jsonl"):
        for line in path.read_bytes().splitlines():
            try:
                videos.append(json.loads(line)["video"])
            except ValueError:
                continue
    return sorted(videos)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def leftovers(output: Path) -> list[str]:
    """Everything in `output` that is neither a clip nor a file a run is meant to leave."""
    meant = ("clips", "metadata", "report", "preparation")
    return sorted(path.name for path in output.iterdir() if not path.name.startswith(meant))


# --------------------------------------------------------------------------------------------------------------------
# never delete what the run did not write


def test_a_rerun_with_added_videos_changes_nothing_written_before(pool, faces, tmp_path):
    output = tmp_path / "out"
    (output / "work").mkdir(parents=True)  # the user's own files in the output folder
    (output / "work" / "mine.txt").write_text("not the program's")
    (output / "notes.txt").write_text("not the program's either")
    add_videos(pool, tmp_path, {"anna.mp4": "anna", "ben.mp4": "ben"})
    assert prepare(tmp_path, output, faces) == 0
    clips_before = digests(output / "clips")
    report_before = (output / "report.jsonl").read_text()
    assert len(clips_before) > 2 * 65

    add_videos(pool, tmp_path, {"dora.mp4": "dora", "aaron.mp4": "aaron"})
    assert prepare(tmp_path, output, faces) == 0
    clips_after = digests(output / "clips")
    assert {path: clips_after.get(path) for path in clips_before} == clips_before  # every byte still there
    assert (output / "report.jsonl").read_text().startswith(report_before)
    assert (output / "work" / "mine.txt").read_text() == "not the program's"
    assert (output / "notes.txt").read_text() == "not the program's either"
    assert metadata_names(output) == ["aaron", "anna", "ben", "dora"]  # each once
    assert leftovers(output) == ["notes.txt", "work"]


def test_added_videos_stay_with_their_worker_and_no_clip_is_listed_twice(pool, faces, tmp_path):
    output = tmp_path / "out"
    add_videos(pool, tmp_path, {"anna.mp4": "anna", "ben.mp4": "ben", "dora.mp4": "dora"})
    for rank in (0, 1):
        assert prepare(tmp_path, output, faces, "--rank", str(rank), "--world-size", "2") == 0
    clips_before = digests(output / "clips")
    assert metadata_names(output) == ["anna", "ben", "dora"]

    add_videos(pool, tmp_path, {"aaron.mp4": "aaron"})
    for rank in (0, 1):
        assert prepare(tmp_path, output, faces, "--rank", str(rank), "--world-size", "2") == 0
    clips_after = digests(output / "clips")
    assert {path: clips_after.get(path) for path in clips_before} == clips_before
    assert metadata_names(output) == ["aaron", "anna", "ben", "dora"]  # each in exactly one shard
    assert report_videos(output) == ["aaron.mp4", "anna.mp4", "ben.mp4", "dora.mp4"]  # each decided once
    assert leftovers(output) == []


class RunsAnotherShardFirst:
    """Face detection that, on its first call, runs `other` to its end; it records the output folder's temporary
    folders (every folder beside clips/) before, and which of the files there before are gone after."""

    def __init__(self, faces: RecordedFaces, output: Path, other):
        self.faces, self.output, self.other = faces, output, other
        self.code: int | None = None

    def detect(self, image: Image.Image):
        if self.code is None:
            self.folders_before = temporary_folders(self.output)
            files_before = [path for path in self.output.rglob("*") if path.is_file()]
            self.code = self.other()
            self.removed = [path for path in files_before if not path.exists()]
        return self.faces.detect(image)


class RecordsFolders:
    def __init__(self, faces: RecordedFaces, output: Path):
        self.faces, self.output = faces, output
        self.folders: set[str] | None = None

    def detect(self, image: Image.Image):
        if self.folders is None:
            self.folders = temporary_folders(self.output)
        return self.faces.detect(image)


def temporary_folders(output: Path) -> set[str]:
    return {path.name for path in output.iterdir() if path.is_dir() and path.name != "clips"}


def test_parallel_shards_work_in_their_own_folders_and_remove_only_those(pool, faces, tmp_path):
    """Worker 1 runs from start to end while worker 0 is in the middle of its first video."""
    output = tmp_path / "out"
    add_videos(pool, tmp_path, {"anna.mp4": "anna", "ben.mp4": "ben"})
    second = RecordsFolders(faces, output)
    first = RunsAnotherShardFirst(
        faces, output, lambda: prepare(tmp_path, output, second, "--rank", "1", "--world-size", "2")
    )
    assert prepare(tmp_path, output, first, "--rank", "0", "--world-size", "2") == 0
    assert first.code == 0
    assert first.folders_before and second.folders is not None
    assert second.folders - first.folders_before, "worker 1 used worker 0's temporary folder"
    assert first.folders_before <= second.folders
    assert not first.removed, f"worker 1 removed worker 0's files: {first.removed[:3]}"
    assert metadata_names(output) == ["anna", "ben"]
    assert leftovers(output) == []


@pytest.mark.parametrize("names", [("clip.mp4", "clip.mov"), ("Clip.mp4", "clip.mkv")])
def test_two_videos_with_one_stem_are_refused_before_any_work(pool, faces, tmp_path, capsys, names):
    add_videos(pool, tmp_path, dict(zip(names, ("anna", "ben"), strict=True)))
    output = tmp_path / "out"
    assert prepare(tmp_path, output, faces) == 2
    line = one_error_line(capsys)
    assert all(name in line for name in names) and "--videos" in line
    assert not output.exists()


def test_a_video_never_overwrites_another_videos_clip(pool, faces, tmp_path):
    output = tmp_path / "out"
    videos, _ = add_videos(pool, tmp_path, {"clip.mp4": "anna"})
    assert prepare(tmp_path, output, faces) == 0
    before = digests(output / "clips")
    (videos / "clip.mp4").unlink()
    add_videos(pool, tmp_path, {"clip.mov": "ben"})  # another portrait under the same stem
    assert prepare(tmp_path, output, faces) == 0
    assert digests(output / "clips") == before
    report = {
        json.loads(line)["video"]: json.loads(line) for line in (output / "report.jsonl").read_text().splitlines()
    }
    assert not report["clip.mov"]["kept"] and "holds the clip of clip.mp4" in report["clip.mov"]["reason"]
    assert [json.loads(line)["video"] for line in (output / "metadata.jsonl").read_text().splitlines()] == ["clip.mp4"]


# --------------------------------------------------------------------------------------------------------------------
# reruns repair damage


def test_a_damaged_report_line_or_a_lost_clip_file_is_redone_with_one_warning(pool, faces, tmp_path, caplog):
    output = tmp_path / "out"
    add_videos(pool, tmp_path, {f"{name}.mp4": name for name in PORTRAITS})
    assert prepare(tmp_path, output, faces) == 0
    original = digests(output / "clips")
    report = output / "report.jsonl"
    lines = report.read_bytes().splitlines(keepends=True)
    assert [json.loads(line)["video"] for line in lines] == ["aaron.mp4", "anna.mp4", "ben.mp4", "dora.mp4"]
    # ben's line garbled, dora's (the last) cut short by a killed run, anna's features and aaron's whole clip lost
    report.write_bytes(lines[0] + lines[1] + b"\xff\xfe{not json\n" + lines[3][: len(lines[3]) // 2])
    (output / "clips" / "anna" / "features.safetensors").unlink()
    shutil.rmtree(output / "clips" / "aaron")

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="train.prepare_dataset"):
        assert prepare(tmp_path, output, faces) == 0
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 4 and all("\n" not in warning for warning in warnings), warnings
    assert any("report.jsonl line 3" in w for w in warnings) and any("report.jsonl line 4" in w for w in warnings)
    assert any(str(Path("anna") / "features.safetensors") in w for w in warnings)
    assert any(str(Path("clips") / "aaron") in w and "missing" in w for w in warnings)

    assert digests(output / "clips") == original  # redone, byte for byte what the first run wrote
    assert metadata_names(output) == ["aaron", "anna", "ben", "dora"]
    new_lines = report.read_bytes().splitlines()[4:]  # the torn line stays alone on its own line
    assert sorted(json.loads(line)["video"] for line in new_lines) == ["aaron.mp4", "anna.mp4", "ben.mp4", "dora.mp4"]


# --------------------------------------------------------------------------------------------------------------------
# the official steps: vocal separation and ArcFace, or the flags that say to go without


@pytest.fixture
def model_folders(tmp_path) -> dict[str, Path]:
    separator = tmp_path / "audio_separator"
    separator.mkdir()
    (separator / "Kim_Vocal_2.onnx").write_bytes(b"stand-in")
    face_analysis = tmp_path / "face_analysis"
    (face_analysis / "models").mkdir(parents=True)
    (face_analysis / "models" / "glintr100.onnx").write_bytes(b"stand-in")
    empty = tmp_path / "empty"
    empty.mkdir()
    return {"separator": separator, "face_analysis": face_analysis, "empty": empty}


def have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.parametrize(
    "flags, injected, expected",
    [
        ([], True, ["--vocal-separator", "--no-vocal-separation"]),
        (["--vocal-separator", "{separator}"], True, ["audio-separator is not installed"]),
        (["--vocal-separator", "{empty}"], True, ["has no Kim_Vocal_2.onnx"]),
        (["--no-vocal-separation"], False, ["--face-analysis", "--no-face-embedding"]),
        (["--no-vocal-separation", "--face-analysis", "{face_analysis}"], False, ["insightface is not installed"]),
        (["--no-vocal-separation", "--face-analysis", "{empty}"], False, ["holds no insightface .onnx"]),
        (["--no-vocal-separation", "--vocal-separator", "{separator}"], True, ["contradict"]),
    ],
)
def test_without_the_separator_or_arcface_the_run_stops_unless_told(
    pool, faces, tmp_path, capsys, model_folders, flags, injected, expected
):
    if "audio-separator is not installed" in expected and have("audio_separator"):
        pytest.skip("audio-separator is installed here")
    if "insightface is not installed" in expected and have("insightface"):
        pytest.skip("insightface is installed here")
    add_videos(pool, tmp_path, {"anna.mp4": "anna"})
    output = tmp_path / "out"
    argv = ["--videos", str(tmp_path / "videos"), "--captions", str(tmp_path / "captions"), "--output", str(output)]
    flags = [flag.format(**model_folders) for flag in flags]
    assert main([*argv, "--wav2vec", "tiny-random", *flags], analyzer=faces if injected else None) == 2
    line = one_error_line(capsys)
    assert all(text in line for text in expected), line
    assert not output.exists()  # stopped before any video


def test_the_preparation_record_says_what_was_used(pool, faces, tmp_path, capsys):
    add_videos(pool, tmp_path, {"anna.mp4": "anna"})
    with_faces, without_faces = tmp_path / "with", tmp_path / "without"
    assert prepare(tmp_path, with_faces, faces) == 0
    assert prepare(tmp_path, without_faces, faces, "--no-face-embedding") == 0

    used = json.loads((with_faces / "preparation.json").read_text())
    assert used["vocal_separation"].startswith("off") and "--no-vocal-separation" in used["vocal_separation"]
    assert "RecordedFaces" in used["face_embedding"]
    assert used["wav2vec"] == "tiny-random" and used["t5"] is None and used["vae"] is None
    assert used["filters"] == asdict(Filters()) and used["fps"] == 25
    unused = json.loads((without_faces / "preparation.json").read_text())
    assert unused["face_embedding"].startswith("none") and "--no-face-embedding" in unused["face_embedding"]

    # the embedding written is the one the face analysis gave, or zeros when told to go without
    base = Image.open(GIRL).convert("RGB").resize((240, 240))
    ((_, expected),) = faces.detect(base)
    stored = load_file(with_faces / "clips" / "anna" / "features.safetensors")["face_emb"].numpy()
    np.testing.assert_array_equal(stored, expected)
    zeros = load_file(without_faces / "clips" / "anna" / "features.safetensors")["face_emb"].numpy()
    assert zeros.shape == (512,) and not zeros.any()

    # a rerun with other settings would make the record wrong: refused
    capsys.readouterr()
    assert prepare(tmp_path, with_faces, faces, "--no-face-embedding") == 2
    assert "face_embedding" in one_error_line(capsys)


# --------------------------------------------------------------------------------------------------------------------
# temporary folders


class CountsWork:
    """Face detection that records, at each call, how many extracted soundtracks lie outside clips/ (one per video
    being worked on), and can fail on a chosen call."""

    def __init__(self, faces: RecordedFaces, output: Path, fail_on: int | None = None):
        self.faces, self.output, self.fail_on = faces, output, fail_on
        self.counts: list[int] = []

    def detect(self, image: Image.Image):
        self.counts.append(
            sum(1 for path in self.output.rglob("audio.wav") if "clips" not in path.relative_to(self.output).parts)
        )
        if self.fail_on is not None and len(self.counts) > self.fail_on:
            raise RuntimeError("the face detector crashed")
        return self.faces.detect(image)


def test_no_temporary_folder_is_left_after_a_run_or_a_failing_video(pool, faces, tmp_path):
    videos, _ = add_videos(pool, tmp_path, {"anna.mp4": "anna", "ben.mp4": "ben"})
    (videos / "bad.mp4").write_text("not a video")
    (tmp_path / "captions" / "bad.txt").write_text("nothing")
    output = tmp_path / "out"
    counting = CountsWork(faces, output)
    assert prepare(tmp_path, output, counting) == 0
    assert counting.counts and set(counting.counts) == {1}  # the video at hand only: each goes when it is done
    assert leftovers(output) == []
    assert sorted(path.name for path in (output / "clips").iterdir()) == ["anna", "ben"]
    report = {
        json.loads(line)["video"]: json.loads(line) for line in (output / "report.jsonl").read_text().splitlines()
    }
    assert "unreadable video" in report["bad.mp4"]["reason"] and "\n" not in report["bad.mp4"]["reason"]

    failing_output = tmp_path / "failing"
    with pytest.raises(RuntimeError, match="crashed"):
        prepare(tmp_path, failing_output, CountsWork(faces, failing_output, fail_on=3))
    assert [path.name for path in failing_output.iterdir() if path.is_dir()] == []


STOPS_ITSELF = """
import os, signal, sys
from pathlib import Path
from train.prepare_dataset import main
from train.synthetic_data import RecordedFaces

faces = RecordedFaces.for_photos([Path(sys.argv[1]), Path(sys.argv[2])])

class SigtermOnSecondFrame:
    calls = 0
    def detect(self, image):
        self.calls += 1
        if self.calls == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's time limit, in the middle of a video
        return faces.detect(image)

sys.exit(main(sys.argv[3:], analyzer=SigtermOnSecondFrame()))
"""


def test_a_stopped_run_removes_its_temporary_folder(pool, tmp_path):
    add_videos(pool, tmp_path, {"anna.mp4": "anna"})
    output = tmp_path / "out"
    argv = ["--videos", str(tmp_path / "videos"), "--captions", str(tmp_path / "captions"), "--output", str(output)]
    result = subprocess.run(
        [sys.executable, "-c", STOPS_ITSELF, str(GIRL), str(MAN), *argv, "--wav2vec", "tiny-random"]
        + ["--no-vocal-separation"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert result.returncode == 128 + 15, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: stopped by SIGTERM")
    assert [path.name for path in output.iterdir() if path.is_dir()] == []


# --------------------------------------------------------------------------------------------------------------------
# one-line errors


@pytest.mark.parametrize(
    "change, named",
    [
        ({"--videos": "{missing}"}, "--videos"),
        ({"--captions": "{missing}"}, "--captions"),
        ({"--output": "{a_file}"}, "--output"),
        ({"--rank": "2", "--world-size": "2"}, "--rank"),
        ({"--world-size": "0"}, "--world-size"),
        ({"--sample-frames": "0"}, "--sample-frames"),
        ({"--min-seconds": "nan"}, "--min-seconds"),
        ({"--min-seconds": "9", "--max-seconds": "3"}, "--min-seconds"),
        ({"--frobnicate": "1"}, "--frobnicate"),
        ({"--wav2vec": "{empty}"}, "--wav2vec"),
    ],
)
def test_bad_inputs_are_one_line_errors(pool, faces, tmp_path, capsys, change, named):
    add_videos(pool, tmp_path, {"anna.mp4": "anna"})
    (tmp_path / "a_file").write_text("")
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing", "a_file": tmp_path / "a_file", "empty": tmp_path / "empty"}
    flags = {
        "--videos": str(tmp_path / "videos"),
        "--captions": str(tmp_path / "captions"),
        "--output": str(tmp_path / "out"),
        "--wav2vec": "tiny-random",
        **{flag: value.format(**paths) for flag, value in change.items()},
    }
    argv = [word for flag, value in flags.items() for word in (flag, value)]
    assert main([*argv, "--no-vocal-separation"], analyzer=faces) == 2
    assert named in one_error_line(capsys)
    assert not (tmp_path / "out").exists()
