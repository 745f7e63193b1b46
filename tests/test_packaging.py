"""The package as users install it: a wheel on its own, one list of dependencies, diffusers' generic loading."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest


REPO = Path(__file__).parent.parent


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def test_requirements_txt_is_pyproject_plus_the_app_extra():
    project = pyproject()["project"]
    face_mesh = next(
        line.split()[-1] for line in (REPO / ".ci" / "run").read_text().splitlines() if "--no-deps" in line
    )
    assert requirement_lines(REPO / "requirements.txt") == project["dependencies"] + project["optional-dependencies"][
        "app"
    ] + [face_mesh]


def test_the_readme_installs_through_pyproject():
    readme = (REPO / "README.md").read_text()
    assert 'pip install -e ".[app]"' in readme
    assert "requirements-dev.txt" not in readme and not (REPO / "requirements-dev.txt").exists()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # built from a copy of what the sdist holds, so the checkout gets no build/ folder
    source = tmp_path_factory.mktemp("source")
    shutil.copytree(REPO / "hallo3", source / "hallo3", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("hallo3-*.whl")
    return built


def test_the_wheel_holds_every_subpackage_and_no_top_level_train(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.startswith("hallo3-")}
    assert top_level == {"hallo3"}  # no generic `train` module in a user's site-packages
    sources = {path.relative_to(REPO).as_posix() for path in (REPO / "hallo3").rglob("*.py")}
    assert sources <= set(names)  # every module, subpackages included


def test_the_installed_wheel_works_without_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import hallo3, hallo3.inference, hallo3.preprocessing.face; from hallo3 import Hallo3Pipeline; "
        "print(hallo3.__file__)"
    )
    # only the target (for hallo3) and the environment's own site-packages (for torch, diffusers, ...)
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1].startswith(str(target))  # not the checkout's copy


@pytest.fixture(scope="module")
def saved_pipeline(tiny_pipeline, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "hallo3-pipeline"
    tiny_pipeline.save_pretrained(folder)
    return folder


def test_a_saved_folder_follows_diffusers_remote_code_convention(saved_pipeline):
    index = json.loads((saved_pipeline / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_hallo3", "Hallo3Pipeline"]
    for component in ("transformer", "reference_net", "scheduler"):
        stem = index[component][0]
        assert (saved_pipeline / component / f"{stem}.py").is_file()
    assert (saved_pipeline / "pipeline_hallo3.py").is_file()


def test_diffusion_pipeline_loads_the_folder_with_trust_remote_code(saved_pipeline, tiny_pipeline, tmp_path):
    """In a fresh process that never imported hallo3: diffusers' generic entry finds the code through the folder."""
    script = f"""
import sys, numpy as np, torch
from diffusers import DiffusionPipeline
assert "hallo3" not in sys.modules
pipe = DiffusionPipeline.from_pretrained({str(saved_pipeline)!r}, trust_remote_code=True)
print(type(pipe).__module__, type(pipe).__name__, type(pipe.transformer).__name__, type(pipe.scheduler).__name__)
pipe.set_progress_bar_config(disable=True)
image = np.full((pipe.height, pipe.width, 3), 128, dtype=np.uint8)
audio = np.sin(np.arange(8000) / 16000 * 2 * np.pi * 200).astype(np.float32)
out = pipe(image=image, audio=audio, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
torch.save(torch.as_tensor(np.asarray(out.frames)), {str(tmp_path / "remote.pt")!r})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hallo3.pipeline_hallo3 Hallo3Pipeline Hallo3Transformer3DModel Hallo3DPMScheduler" in result.stdout

    import numpy as np
    import torch

    # the same weights: the locally built pipeline makes the same video
    image = np.full((tiny_pipeline.height, tiny_pipeline.width, 3), 128, dtype=np.uint8)
    audio = np.sin(np.arange(8000) / 16000 * 2 * np.pi * 200).astype(np.float32)
    local = tiny_pipeline(image=image, audio=audio, num_inference_steps=1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.load(tmp_path / "remote.pt"), torch.as_tensor(np.asarray(local.frames)))


def test_diffusion_pipeline_refuses_the_folder_without_trust_remote_code(saved_pipeline):
    from diffusers import DiffusionPipeline

    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(saved_pipeline)


def test_hallo3_pipeline_loads_the_folder_without_running_its_files(saved_pipeline, tiny_pipeline, tmp_path):
    from hallo3 import Hallo3Pipeline

    tampered = tmp_path / "tampered"
    shutil.copytree(saved_pipeline, tampered)
    for shim in tampered.rglob("*.py"):
        shim.write_text("raise SystemExit('the folder ran code')\n")
    pipe = Hallo3Pipeline.from_pretrained(tampered)
    assert type(pipe.transformer).__module__ == "hallo3.transformer_hallo3"
    for name, tensor in tiny_pipeline.transformer.state_dict().items():
        assert tensor.equal(pipe.transformer.state_dict()[name]), name
