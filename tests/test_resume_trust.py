"""What a resumed run trusts, attacked: the fingerprint (weights, LoRA, quantization, ...), the run folder's files and
their types, the lock that keeps one run per output, and the join's frame count and cleanup.

The CLI is run as a real subprocess on a saved tiny-random folder with a LoRA. It is stopped at a known point by an
ffmpeg stand-in (IMAGEIO_FFMPEG_EXE, which `imageio_ffmpeg` and so every ffmpeg call here honours): at the call that
writes segment k, or at the join, it signals the process that called it. No step depends on timing.
"""

import hashlib
import json
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save

from hallo3.clip_loop import ClipLoopState
from hallo3.interrupts import remove_stale_staging
from hallo3.loading import LoadedModel, build_tiny_random_pipeline
from hallo3.pipeline_hallo3 import Hallo3Pipeline
from hallo3.preprocessing.audio import ffmpeg_exe
from hallo3.resumable import (
    ModelOptions,
    ResumableVideo,
    ResumeError,
    file_digests,
    model_setup,
    run_folder,
    saved_seed,
)
from hallo3.video_io import count_frames

from .conftest import ASSETS


SECONDS = 2.5  # 63 frames: clips of 47 and 16 new frames
NUM_FRAMES = math.ceil(SECONDS * 25)
CLIPS = (47, 16)
MOTION_SHAPE = (2, 3, 64, 96)  # the tiny-random model's 2 motion frames at 64x96


def write_speech(path: Path) -> Path:
    t = np.arange(int(16000 * SECONDS)) / 16000
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    soundfile.write(path, (0.3 * envelope * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 16000)
    return path


def flip_byte(path: Path, offset: int = -1) -> None:
    """Change one byte in place: same size; the modification time is put back, as a careless copy might leave it."""
    info = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry of `folder` (not following links): a file's bytes, or what a link points to."""
    return {
        path.name: os.readlink(path) if path.is_symlink() else path.read_bytes()
        for path in sorted(folder.iterdir())
        if path.is_symlink() or path.is_file()
    }


# --------------------------------------------------------------------------------------------------------------------
# The run folder, in process: a run's files written by ResumableVideo itself, then damaged


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    return write_speech(tmp_path_factory.mktemp("speech") / "speech.wav")


def frames(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 96, 3), dtype=np.uint8)


def new_run(output: Path, audio: Path, fingerprint: str = "the same inputs") -> ResumableVideo:
    return ResumableVideo(output, fingerprint, audio, 25, {}, 0, NUM_FRAMES, MOTION_SHAPE)


def saved_run(folder: Path, audio: Path, clips=CLIPS) -> tuple[Path, list[ClipLoopState]]:
    """A run stopped after `clips` (new frames of each), as a run leaves its folder; and the states it saved."""
    output = folder / "talk.mp4"
    generator = torch.Generator().manual_seed(0)
    states, done = [], 0
    with new_run(output, audio) as run:
        assert run.start(resume=False, overwrite=False) is None
        for clip, n in enumerate(clips):
            run.write_segment(frames(n, clip))
            done += n
            motion = torch.rand(MOTION_SHAPE, generator=generator) * 2 - 1
            states.append(ClipLoopState(clip + 1, done, motion, generator.get_state()))
            run.save_state(states[-1])
    return output, states


def test_a_checked_folder_resumes_with_its_state_and_joins(tmp_path, speech):
    output, states = saved_run(tmp_path, speech)
    folder = run_folder(output)
    assert sorted(p.name for p in folder.iterdir()) == [
        "segment-00000.mp4",
        "segment-00001.mp4",
        "state.json",
        "state.safetensors",
    ]  # the lock went with the run
    (folder / ".segment-00002.4194999.abcd.partial.mp4").write_bytes(b"a killed run's staging file")
    (folder / "segment-00002.mp4").write_bytes(b"the next clip's segment, written before its state")
    (folder / ".state.json.tmp").write_bytes(b"half a state")
    with new_run(output, speech) as run:
        resumed = run.start(resume=True, overwrite=False)
        assert resumed is not None and (resumed.next_clip, resumed.frames_done) == (2, NUM_FRAMES)
        assert torch.equal(resumed.motion, states[-1].motion)
        assert torch.equal(resumed.generator_state, states[-1].generator_state)
        assert sorted(p.name for p in folder.iterdir()) == [  # the leftovers of a killed run are gone
            "lock",
            "segment-00000.mp4",
            "segment-00001.mp4",
            "state.json",
            "state.safetensors",
        ]
        assert run.finish() == output
    assert count_frames(output) == NUM_FRAMES
    assert not folder.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["talk.mp4"]


def replace_tensors(folder: Path, **tensors: torch.Tensor) -> None:
    """A state.safetensors with other tensors and a state.json that records its digest: a consistent forgery, which
    only the shapes can tell."""
    from safetensors.torch import load

    saved = {**load((folder / "state.safetensors").read_bytes()), **tensors}
    data = save(saved)
    (folder / "state.safetensors").write_bytes(data)
    info = json.loads((folder / "state.json").read_text())
    info["tensors_sha256"] = hashlib.sha256(data).hexdigest()
    (folder / "state.json").write_text(json.dumps(info))


def edit_state(folder: Path, change) -> None:
    info = json.loads((folder / "state.json").read_text())
    change(info)
    (folder / "state.json").write_text(json.dumps(info))


def swap(folder: Path) -> None:
    (folder / "segment-00000.mp4").rename(folder / "swap")
    (folder / "segment-00001.mp4").rename(folder / "segment-00000.mp4")
    (folder / "swap").rename(folder / "segment-00001.mp4")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


DAMAGES = {
    "missing segment": (lambda f: (f / "segment-00001.mp4").unlink(), "misses segment-00001.mp4"),
    "extra segment": (
        lambda f: shutil.copy(f / "segment-00000.mp4", f / "segment-00003.mp4"),
        "has an extra segment-00003.mp4",
    ),
    "swapped segments": (swap, "segment-00000.mp4 is not the segment its state recorded"),
    "truncated segment": (lambda f: truncate(f / "segment-00001.mp4"), "segment-00001.mp4 is not the segment"),
    "one byte of a segment": (lambda f: flip_byte(f / "segment-00000.mp4", 2000), "segment-00000.mp4 is not the"),
    "one byte of the tensors": (lambda f: flip_byte(f / "state.safetensors"), "state.safetensors is missing, is not"),
    "missing tensors": (lambda f: (f / "state.safetensors").unlink(), "state.safetensors is missing"),
    "motion frames of other settings": (
        lambda f: replace_tensors(f, motion=torch.zeros(1, 3, 64, 96)),
        "holds tensors these settings do not make",
    ),
    "motion frames out of range": (
        lambda f: replace_tensors(f, motion=torch.full(MOTION_SHAPE, float("nan"))),
        "holds tensors these settings do not make",
    ),
    "a CUDA generator's state": (
        lambda f: replace_tensors(f, generator_state=torch.zeros(16, dtype=torch.uint8)),
        "holds tensors these settings do not make",
    ),
    "frames that do not add up": (
        lambda f: edit_state(f, lambda info: info.update(frames_done=info["frames_done"] - 1)),
        "does not add up",
    ),
    "more clips than segments recorded": (
        lambda f: edit_state(f, lambda info: info.update(next_clip=3)),
        "does not add up",
    ),
    "not JSON": (lambda f: (f / "state.json").write_text("{"), "is damaged (not JSON)"),
    "an older state": (lambda f: edit_state(f, lambda info: info.update(version=1)), "another version of hallo3"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_run_folder_is_refused_and_kept(tmp_path, speech, damage):
    output, _ = saved_run(tmp_path, speech)
    folder = run_folder(output)
    change, message = DAMAGES[damage]
    change(folder)
    before = snapshot(folder)
    with new_run(output, speech) as run, pytest.raises(ResumeError, match=re.escape(message)):
        run.start(resume=True, overwrite=False)
    assert snapshot(folder) == before  # refused, nothing removed
    with new_run(output, speech) as run:  # --overwrite (with --resume too: the app) starts again
        assert run.start(resume=True, overwrite=True) is None
        assert sorted(p.name for p in folder.iterdir()) == ["lock"]


def test_a_run_made_from_other_inputs_is_refused(tmp_path, speech):
    output, _ = saved_run(tmp_path, speech)
    with new_run(output, speech, fingerprint="other inputs") as run:
        with pytest.raises(ResumeError, match="made from other inputs, settings or model"):
            run.start(resume=True, overwrite=False)


def test_the_join_checks_every_segment_again(tmp_path, speech):
    """A segment changed after it was written (and checked) is refused before the join: no video, no partial file."""
    output = tmp_path / "talk.mp4"
    generator = torch.Generator().manual_seed(0)
    with new_run(output, speech) as run:
        run.start(resume=False, overwrite=False)
        done = 0
        for clip, n in enumerate(CLIPS):
            run.write_segment(frames(n, clip))
            done += n
            run.save_state(ClipLoopState(clip + 1, done, torch.zeros(MOTION_SHAPE), generator.get_state()))
        flip_byte(run_folder(output) / "segment-00001.mp4", 2000)
        with pytest.raises(ResumeError, match="segment-00001.mp4 is not the segment its state recorded"):
            run.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".talk.mp4.run"]


def test_the_joined_video_must_have_the_audio_frame_count(tmp_path, speech):
    """A state that lies about a segment's frame count (46 frames recorded as 47) adds up, passes every digest, and
    is caught by counting the joined file's frames: ceil(2.5 s x 25) = 63 are needed, 62 were joined."""
    output, _ = saved_run(tmp_path, speech, clips=(46, 16))
    edit_state(run_folder(output), lambda info: (info["segments"][0].update(frames=47), info.update(frames_done=63)))
    with new_run(output, speech) as run:
        assert run.start(resume=True, overwrite=False) is not None
        with pytest.raises(ResumeError, match="the joined segments have 62 frames; the audio needs 63"):
            run.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".talk.mp4.run"]  # no video, no partial file


# --------------------------------------------------------------------------------------------------------------------
# What the folder is and holds: links, pipes, files a run does not make


def test_a_run_folder_that_is_a_link_is_refused_and_its_target_untouched(tmp_path, speech):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    output, _ = saved_run(elsewhere, speech)
    target = run_folder(output)
    before = snapshot(target)
    here = tmp_path / "here"
    here.mkdir()
    run_folder(here / "talk.mp4").symlink_to(target, target_is_directory=True)
    for resume, overwrite in [(True, False), (False, True), (True, True)]:
        with new_run(here / "talk.mp4", speech) as run, pytest.raises(ResumeError, match="is a symbolic link"):
            run.start(resume=resume, overwrite=overwrite)
    assert snapshot(target) == before and run_folder(here / "talk.mp4").is_symlink()
    assert saved_seed(here / "talk.mp4") is None


@pytest.mark.parametrize("name", ["segment-00005.mp4", "state.json", "lock", "anything"])
def test_a_link_inside_is_refused_and_never_followed(tmp_path, speech, name):
    output, _ = saved_run(tmp_path, speech)
    folder = run_folder(output)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("not the run's")
    (folder / name).unlink(missing_ok=True)
    (folder / name).symlink_to(outside / "precious.txt" if name != "anything" else outside)
    before = snapshot(folder)
    for resume, overwrite in [(True, False), (False, True), (True, True)]:
        with new_run(output, speech) as run, pytest.raises(ResumeError, match=f"holds {name}, a symbolic link"):
            run.start(resume=resume, overwrite=overwrite)
    assert snapshot(folder) == before
    assert (outside / "precious.txt").read_text() == "not the run's"


@pytest.mark.parametrize("name", ["state.json", "state.safetensors", "segment-00000.mp4", "lock"])
def test_a_named_pipe_inside_is_refused_without_opening_it(tmp_path, speech, name, monkeypatch):
    """Opening a pipe for reading blocks until someone writes: the pipe is refused by its type, never opened."""
    output, _ = saved_run(tmp_path, speech)
    folder = run_folder(output)
    (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / name)
    real_open = os.open

    def open_anything_but_the_pipe(path, flags, *args, dir_fd=None, **kwargs):
        opened = os.path.join(folder if dir_fd is not None else "", os.fsdecode(path))
        assert not (Path(opened).name == name and os.path.samefile(opened, folder / name)), "the pipe was opened"
        return real_open(path, flags, *args, dir_fd=dir_fd, **kwargs)

    monkeypatch.setattr(os, "open", open_anything_but_the_pipe)
    for resume, overwrite in [(True, False), (True, True)]:
        with new_run(output, speech) as run, pytest.raises(ResumeError, match=f"holds {name}, a named pipe"):
            run.start(resume=resume, overwrite=overwrite)
    assert stat.S_ISFIFO((folder / name).lstat().st_mode)
    if name == "state.json":
        assert saved_seed(output) is None


def test_a_file_a_run_does_not_write_is_refused_and_kept(tmp_path, speech):
    output, _ = saved_run(tmp_path, speech)
    (run_folder(output) / "notes.txt").write_text("mine")
    with new_run(output, speech) as run, pytest.raises(ResumeError, match="holds notes.txt, which a run does not"):
        run.start(resume=False, overwrite=True)
    assert (run_folder(output) / "notes.txt").read_text() == "mine"


def test_stale_staging_removal_never_follows_a_link(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("not the run's")
    out = tmp_path / "videos"
    out.mkdir()
    dead = 4194999  # above Linux's largest process id: no such process
    link = out / f".talk.{dead}.abc.partial.mp4"
    link.symlink_to(outside, target_is_directory=True)
    staging = out / f".talk.{dead}.def.partial.mp4"
    staging.mkdir()
    (staging / "inside").symlink_to(outside / "precious.txt")
    assert remove_stale_staging(out, "talk", ".partial.mp4") == [staging]
    assert link.is_symlink() and (outside / "precious.txt").read_text() == "not the run's"


# --------------------------------------------------------------------------------------------------------------------
# One run per output


def test_a_second_run_on_the_same_output_is_refused_until_the_first_lets_go(tmp_path, speech):
    output, _ = saved_run(tmp_path, speech)
    first = new_run(output, speech)
    assert first.start(resume=True, overwrite=False) is not None
    second = new_run(output, speech)
    with pytest.raises(ResumeError, match=re.escape(f"another run (process {os.getpid()}) is writing it now")):
        second.start(resume=True, overwrite=False)
    first.close()
    with second:
        assert second.start(resume=True, overwrite=False) is not None


# --------------------------------------------------------------------------------------------------------------------
# The fingerprint's parts


def test_a_weight_digest_sees_a_changed_byte_under_the_same_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(np.random.default_rng(0).bytes(1 << 20))
    first = file_digests([weights])
    assert first == [hashlib.sha256(weights.read_bytes()).hexdigest()]
    assert file_digests([weights]) == first  # remembered
    flip_byte(weights, 12345)
    assert file_digests([weights]) == [hashlib.sha256(weights.read_bytes()).hexdigest()] != first


def test_the_setup_covers_lora_quantization_and_options_but_not_offload(tmp_path, tiny_pipeline, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = LoadedModel(tiny_pipeline, "tiny-random", is_random=True)
    lora_a, lora_b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    lora_a.write_bytes(b"a LoRA")
    lora_b.write_bytes(b"a LoRB")

    def setup(memory_mode="none", **options):
        return model_setup(model, "cpu", memory_mode, "mediapipe-face-mesh", ModelOptions(**options))

    plain = setup()
    others = [
        setup(lora=lora_a, lora_scale=1.0),
        setup(lora=lora_b, lora_scale=1.0),
        setup(lora=lora_a, lora_scale=0.0),
        setup("int8-torchao"),
        setup("8bit"),
        setup(attention_backend="flash"),
        setup(step_cache="first-block", step_cache_threshold=0.1),
        setup(step_cache="first-block", step_cache_threshold=0.2),
        setup(compile=True),
        setup(cfg_parallel=True),
        model_setup(model, "cpu", "none", "mediapipe-face-landmarker", ModelOptions()),
    ]
    descriptions = [json.dumps(s, sort_keys=True, default=str) for s in [plain, *others]]
    assert len(set(descriptions)) == len(descriptions)
    assert setup("model-offload") == setup("sequential-offload") == plain  # the same weights, placed elsewhere
    other_weights = build_tiny_random_pipeline(seed=1)
    assert (
        model_setup(LoadedModel(other_weights, "tiny-random", is_random=True), "cpu", "none", "x", ModelOptions())[
            "weights"
        ]
        != plain["weights"]
    )


def test_the_tiny_random_setup_is_the_same_in_another_process():
    """The CLI's tiny-random model is built anew by each process: a resumed run must see the same weights digest
    (diffusers' configs hold a set whose order changes with the process's hash seed). Built here as the CLI builds
    it, not the session's shared pipeline, which other tests may have given hooks or adapters."""
    model = LoadedModel(build_tiny_random_pipeline(), "tiny-random", is_random=True)
    here = model_setup(model, "cpu", "none", "x", ModelOptions())["weights"]
    code = (
        "from hallo3.loading import LoadedModel, build_tiny_random_pipeline\n"
        "from hallo3.resumable import ModelOptions, model_setup\n"
        "model = LoadedModel(build_tiny_random_pipeline(), 'tiny-random', is_random=True)\n"
        "print(model_setup(model, 'cpu', 'none', 'x', ModelOptions())['weights'])"
    )
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        assert there.stdout.split()[-1] == here


# --------------------------------------------------------------------------------------------------------------------
# Through the CLI: a saved tiny-random folder with a LoRA, stopped at known points

STAND_IN = """#!/bin/sh
# ffmpeg, except at the call whose argument matches $STOP_AT: there it signals the process that called it
for arg in "$@"; do
  case "$arg" in
    $STOP_AT) kill -$STOP_SIGNAL $PPID; exit 1 ;;
  esac
done
exec {ffmpeg} "$@"
"""


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory) -> dict[str, Path]:
    """A tiny-random pipeline saved as a folder, two different LoRAs for it, the speech, and an ffmpeg stand-in."""
    root = tmp_path_factory.mktemp("cli")
    pipeline = build_tiny_random_pipeline()
    pipeline.save_pretrained(root / "model")
    for name, seed in (("lora-a", 1), ("lora-b", 2)):
        transformer = build_tiny_random_pipeline().transformer
        torch.manual_seed(seed)  # the adapter's random weights (init_lora_weights=False: B is not zero)
        config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
        transformer.add_adapter(config)
        Hallo3Pipeline.save_lora_weights(
            root / name,
            transformer_lora_layers=get_peft_model_state_dict(transformer),
            transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
        )
    stand_in = root / "ffmpeg-stand-in"
    stand_in.write_text(STAND_IN.format(ffmpeg=ffmpeg_exe()))
    stand_in.chmod(0o755)
    return {
        "root": root,
        "model": root / "model",
        "lora-a": root / "lora-a",
        "lora-b": root / "lora-b",
        "speech": write_speech(root / "speech.wav"),
        "stand-in": stand_in,
        "cache": root / "cache",
    }


def command(files: dict[str, Path], output: Path, *extra: str, lora: str | None = "lora-a") -> list[str]:
    argv = [sys.executable, "-m", "hallo3.inference", "--model", str(files["model"]), "--image"]
    argv += [str(ASSETS / "0008.jpg"), "--audio", str(files["speech"]), "--output", str(output), "--steps", "1"]
    return argv + ["--seed", "5", *(["--lora", str(files[lora])] if lora else []), *extra]


def cli(files, output, *extra, lora="lora-a", stop_at=None, stop_signal="KILL"):
    env = {**os.environ, "XDG_CACHE_HOME": str(files["cache"])}
    if stop_at is not None:
        env.update(IMAGEIO_FFMPEG_EXE=str(files["stand-in"]), STOP_AT=stop_at, STOP_SIGNAL=stop_signal)
    return subprocess.run(command(files, output, *extra, lora=lora), capture_output=True, text=True, env=env)


def at_segment(index: int) -> str:
    """The stand-in's pattern for the ffmpeg that writes segment `index` (its staging file in the run folder)."""
    return f"*/.segment-{index:05d}.*"


def assert_refused(result, message: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def partial_files(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.name.endswith(".partial.mp4")]


@pytest.fixture(scope="module")
def unbroken(cli_files, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("unbroken") / "talk.mp4"
    result = cli(cli_files, output)
    assert result.returncode == 0, result.stderr[-3000:]
    assert count_frames(output) == NUM_FRAMES
    return output


@pytest.mark.parametrize("stop_at, clips_done", [(at_segment(0), 0), ("concat", 2)])
def test_a_run_killed_at_any_point_resumes_to_the_unbroken_video(tmp_path, cli_files, unbroken, stop_at, clips_done):
    """Killed (SIGKILL: no cleanup runs) while clip 1's segment is written, or in the join after the last clip;
    after clip 1 is `test_a_resume_that_would_mix_models_is_refused`'s point."""
    output = tmp_path / "talk.mp4"
    stopped = cli(cli_files, output, stop_at=stop_at)
    assert stopped.returncode == -signal.SIGKILL and not output.exists()
    state = run_folder(output) / "state.json"
    assert (json.loads(state.read_text())["next_clip"] if state.exists() else 0) == clips_done
    resumed = cli(cli_files, output, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert output.read_bytes() == unbroken.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["talk.mp4"]  # no folder, no partial file


def test_a_resume_that_would_mix_models_is_refused(tmp_path, cli_files, unbroken):
    output = tmp_path / "talk.mp4"
    assert cli(cli_files, output, stop_at=at_segment(1)).returncode == -signal.SIGKILL  # after clip 1
    folder = run_folder(output)
    assert json.loads((folder / "state.json").read_text())["next_clip"] == 1
    (folder / "lock").unlink()  # the killed run's; the first refused run takes it over and removes it
    saved = snapshot(folder)
    refused = "the saved run was made from other inputs, settings or model"
    assert_refused(cli(cli_files, output, "--resume", lora="lora-b"), refused)  # another LoRA
    assert_refused(cli(cli_files, output, "--resume", lora=None), refused)  # no LoRA
    assert_refused(cli(cli_files, output, "--resume", "--lora-scale", "0"), refused)
    weights = next((cli_files["model"] / "transformer").glob("*.safetensors"))
    original = weights.read_bytes()
    flip_byte(weights)  # one byte of a weight file; same size, same mtime
    try:
        assert_refused(cli(cli_files, output, "--resume"), refused)
    finally:
        weights.write_bytes(original)
    assert snapshot(folder) == saved  # every refusal left the saved run as it was
    resumed = cli(cli_files, output, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after clip 1" in resumed.stderr
    assert output.read_bytes() == unbroken.read_bytes()


def test_sigterm_during_the_join_leaves_no_partial_file(tmp_path, cli_files, unbroken):
    output = tmp_path / "talk.mp4"
    stopped = cli(cli_files, output, stop_at="concat", stop_signal="TERM")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "stopped by SIGTERM" in stopped.stderr and "Traceback" not in stopped.stderr
    assert not output.exists() and partial_files(tmp_path) == []
    assert sorted(p.name for p in run_folder(output).iterdir()) == [
        "segment-00000.mp4",
        "segment-00001.mp4",
        "segments.txt",
        "state.json",
        "state.safetensors",
    ]  # the clips are kept, the lock is not
    resumed = cli(cli_files, output, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert output.read_bytes() == unbroken.read_bytes()


def test_a_second_process_is_refused_while_the_first_lives_and_takes_over_when_it_dies(tmp_path, cli_files, unbroken):
    """The first run is suspended (SIGSTOP, its lock held) after clip 1; a second run on the same output is refused;
    once the first is killed, its lock is free and the second continues its clips."""
    output = tmp_path / "talk.mp4"
    env = {**os.environ, "XDG_CACHE_HOME": str(cli_files["cache"]), "IMAGEIO_FFMPEG_EXE": str(cli_files["stand-in"])}
    env.update(STOP_AT=at_segment(1), STOP_SIGNAL="STOP")
    first = subprocess.Popen(command(cli_files, output), env=env, stderr=subprocess.DEVNULL)
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        assert_refused(cli(cli_files, output, "--resume"), f"another run (process {first.pid}) is writing it now")
    finally:
        first.kill()
        first.wait()
    resumed = cli(cli_files, output, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "after clip 1" in resumed.stderr
    assert output.read_bytes() == unbroken.read_bytes()
