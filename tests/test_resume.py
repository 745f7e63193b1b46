"""Long videos survive a crash: kill -9 during clip 3 of 5, `--resume`, and the video equals an unbroken run's."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from hallo3.preprocessing.audio import ffmpeg_exe
from hallo3.resumable import run_folder

from .conftest import ASSETS


def command(output: Path, audio: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "hallo3.inference",
        "--model",
        "tiny-random",
        "--image",
        str(ASSETS / "0008.jpg"),
        "--audio",
        str(audio),
        "--output",
        str(output),
        "--steps",
        "1",
        "--seed",
        "5",
        *extra,
    ]


def frames_of(video: Path) -> np.ndarray:
    raw = subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-i", str(video), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True,
        check=True,
    ).stdout
    return np.frombuffer(raw, dtype=np.uint8)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    """8.5 s: 213 frames, 5 clips of 47 new frames."""
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    t = np.arange(int(16000 * 8.5)) / 16000
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    soundfile.write(path, (0.3 * envelope * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 16000)
    return path


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory, speech) -> Path:
    output = tmp_path_factory.mktemp("unbroken") / "talk.mp4"
    result = subprocess.run(command(output, speech), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not run_folder(output).exists()  # the clips' folder goes once the mp4 is complete
    return output


def clips_saved(folder: Path) -> int:
    """Clips whose state is saved (state.json is replaced atomically: never half written)."""
    state = folder / "state.json"
    return json.loads(state.read_text())["next_clip"] if state.exists() else 0


def test_a_run_killed_mid_clip_resumes_to_the_same_video(tmp_path, speech, unbroken):
    output = tmp_path / "talk.mp4"
    folder = run_folder(output)
    process = subprocess.Popen(command(output, speech), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while clips_saved(folder) < 2:  # clips 1 and 2 are done: clip 3 is under way
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # no cleanup of any kind runs
    process.wait()
    assert not output.exists()
    done = json.loads((folder / "state.json").read_text())["next_clip"]
    assert 2 <= done < 5

    again = subprocess.run(command(output, speech), capture_output=True, text=True, timeout=900)
    assert again.returncode == 2 and "pass --resume" in again.stderr  # a saved run is never silently discarded

    resumed = subprocess.run(command(output, speech, "--resume"), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"after clip {done}" in resumed.stderr
    assert np.array_equal(frames_of(output), frames_of(unbroken))  # bit for bit, frame by frame
    assert output.read_bytes() == unbroken.read_bytes()  # and the file itself
    assert not folder.exists()


def test_a_saved_run_is_not_continued_with_other_settings(tmp_path, speech):
    output = tmp_path / "talk.mp4"
    process = subprocess.Popen(command(output, speech), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (run_folder(output) / "state.json").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    other = command(output, speech, "--resume")
    other[other.index("--seed") + 1] = "6"
    result = subprocess.run(other, capture_output=True, text=True, timeout=900)
    assert result.returncode == 2 and "made from other inputs, settings or model" in result.stderr
    assert (run_folder(output) / "state.json").is_file()  # the saved run is kept for the command that made it
