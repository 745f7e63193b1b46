"""The CLI end to end on the tiny-random model: real examples, every bad-input class, batch mode."""

import math

import numpy as np
import pytest
import soundfile
from PIL import Image

from hallo3.inference import GenerationSettings, main, read_input_list, run_batch
from hallo3.preprocessing.audio import load_audio
from hallo3.video_io import probe_video

from .conftest import ASSETS


def short_speech(path, seconds=1.0, rate=44100):
    t = np.arange(int(rate * seconds)) / rate
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), rate)
    return path


@pytest.mark.parametrize("image, audio", [("0001.jpg", "0001.mp3"), ("0008.jpg", "0008.wav")])
def test_real_examples_end_to_end(tmp_path, image, audio):
    output = tmp_path / "talking.mp4"
    code = main(
        [
            "--model",
            "tiny-random",
            "--image",
            str(ASSETS / image),
            "--audio",
            str(ASSETS / audio),
            "--prompt",
            "a person talking",
            "--output",
            str(output),
            "--steps",
            "1",
            "--seed",
            "3",
        ]
    )
    assert code == 0
    seconds = len(load_audio(ASSETS / audio)) / 16000
    video = probe_video(output)
    assert video["video_codec"] == "h264" and video["audio_codec"] == "aac" and video["fps"] == 25
    assert video["num_frames"] == math.ceil(seconds * 25)
    assert abs(video["audio_seconds"] - seconds) < 0.05  # the original audio, whole
    assert video["width"] == video["height"] == 64  # square portrait in, square video out
    assert "RANDOM WEIGHTS" in video["comment"]
    assert [p.name for p in tmp_path.iterdir()] == ["talking.mp4"]  # no temporary files left


def bad_input_cases(tmp_path):
    good_image, good_audio = ASSETS / "0001.jpg", short_speech(tmp_path / "ok.wav")
    (tmp_path / "notes.jpg").write_text("not a picture")
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "noise.mp3").write_bytes(np.random.default_rng(0).bytes(5000))
    Image.fromarray(np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (240, 1))).convert("RGB").save(
        tmp_path / "wall.png"
    )
    small = Image.new("RGB", (1200, 1200), (40, 90, 40))
    small.paste(Image.open(good_image).resize((110, 110)), (500, 500))
    small.save(tmp_path / "far.png")
    out = str(tmp_path / "out.mp4")
    return {
        "missing image": (
            ["--image", str(tmp_path / "nope.jpg"), "--audio", str(good_audio), "--output", out],
            "no such file",
        ),
        "not an image": (
            ["--image", str(tmp_path / "notes.jpg"), "--audio", str(good_audio), "--output", out],
            "not an image file",
        ),
        "no face": (
            ["--image", str(tmp_path / "wall.png"), "--audio", str(good_audio), "--output", out],
            "no face found",
        ),
        "tiny face": (
            ["--image", str(tmp_path / "far.png"), "--audio", str(good_audio), "--output", out],
            "at least 48 px",
        ),
        "empty audio": (
            ["--image", str(good_image), "--audio", str(tmp_path / "empty.wav"), "--output", out],
            "the file is empty",
        ),
        "non-audio": (
            ["--image", str(good_image), "--audio", str(tmp_path / "noise.mp3"), "--output", out],
            "not a readable audio file",
        ),
        "missing audio": (
            ["--image", str(good_image), "--audio", str(tmp_path / "nope.wav"), "--output", out],
            "no such file",
        ),
        "output folder missing": (
            [
                "--image",
                str(good_image),
                "--audio",
                str(good_audio),
                "--output",
                str(tmp_path / "nowhere" / "out.mp4"),
            ],
            "does not exist",
        ),
        "output not mp4": (
            ["--image", str(good_image), "--audio", str(good_audio), "--output", str(tmp_path / "out.avi")],
            "must end in .mp4",
        ),
        "bad steps": (
            ["--image", str(good_image), "--audio", str(good_audio), "--output", out, "--steps", "0"],
            "--steps: must be a whole number of steps in 1..1000, got 0.",
        ),
        "bad motion frames": (
            ["--image", str(good_image), "--audio", str(good_audio), "--output", out, "--motion-frames", "5"],
            "--motion-frames: must be 0..3 (2 as trained",
        ),
        "bad guidance": (
            ["--image", str(good_image), "--audio", str(good_audio), "--output", out, "--guidance-scale", "0.2"],
            "--guidance-scale: must be a finite number >= 1, got 0.2.",
        ),
        "too long audio": (
            ["--image", str(good_image), "--audio", str(good_audio), "--output", out, "--max-audio-seconds", "0.5"],
            "longer than the maximum of 0.5 s",
        ),
    }


CASES = [
    "missing image",
    "not an image",
    "no face",
    "tiny face",
    "empty audio",
    "non-audio",
    "missing audio",
    "output folder missing",
    "output not mp4",
    "bad steps",
    "bad motion frames",
    "bad guidance",
    "too long audio",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_inputs_exit_2_with_one_line_and_no_output(tmp_path, capsys, case):
    argv, message = bad_input_cases(tmp_path)[case]
    before = set(tmp_path.rglob("*"))
    code = main(
        ["--model", "tiny-random", "--steps", "1", *argv]
        if "--steps" not in argv
        else ["--model", "tiny-random", *argv]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert set(tmp_path.rglob("*")) == before  # nothing written, not even a partial file


def test_batch_mode_reports_a_failed_job_and_finishes_the_others(tmp_path, capsys):
    short_speech(tmp_path / "a.wav", 1.2)
    Image.fromarray(np.full((200, 300, 3), 128, dtype=np.uint8)).save(tmp_path / "blank.png")
    (tmp_path / "jobs.txt").write_text(
        f"A little girl talking@@{ASSETS / '0001.jpg'}@@a.wav\n"
        "# a comment\n"
        "No face here@@blank.png@@a.wav\n"
        f"An older man talking@@{ASSETS / '0008.jpg'}@@a.wav\n"
    )
    code = main(
        [
            "--model",
            "tiny-random",
            "--input-list",
            str(tmp_path / "jobs.txt"),
            "--output-dir",
            str(tmp_path / "videos"),
            "--steps",
            "1",
            "--seed",
            "0",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "job 2 (blank.png, a.wav): image" in err and "no face found" in err
    made = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert made == ["000-0001-a.mp4", "002-0008-a.mp4"]
    assert probe_video(tmp_path / "videos" / made[0])["num_frames"] == 30


def test_batch_jobs_are_split_across_processes(tmp_path, tiny_animator):
    short_speech(tmp_path / "a.wav", 0.5)
    jobs = [("p", ASSETS / "0001.jpg", tmp_path / "a.wav") for _ in range(3)]
    settings = GenerationSettings(num_inference_steps=1, seed=0)
    (tmp_path / "rank1").mkdir()
    assert run_batch(tiny_animator, jobs, tmp_path / "rank1", settings, process_index=1, num_processes=2) == 0
    assert [p.name for p in (tmp_path / "rank1").iterdir()] == ["001-0001-a.mp4"]


def test_input_list_format_errors_name_the_line(tmp_path):
    (tmp_path / "jobs.txt").write_text("just a prompt\n")
    with pytest.raises(ValueError, match="line 1: expected prompt@@image@@audio"):
        read_input_list(tmp_path / "jobs.txt")


def test_a_failure_mid_video_leaves_no_video_and_keeps_the_finished_clip(tmp_path, tiny_animator, monkeypatch):
    calls = []

    def failing_decode(latents):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return original(latents)

    original = tiny_animator.pipeline.decode_latents
    monkeypatch.setattr(tiny_animator.pipeline, "decode_latents", failing_decode)
    with pytest.raises(RuntimeError, match="out of memory"):
        tiny_animator.generate(
            ASSETS / "0001.jpg",
            short_speech(tmp_path / "a.wav", 2.5),
            tmp_path / "v.mp4",
            GenerationSettings(num_inference_steps=1),
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == [".v.mp4.run", "a.wav"]  # no video, no partial file
    kept = sorted(p.name for p in (tmp_path / ".v.mp4.run").iterdir())
    assert kept == ["segment-00000.mp4", "state.json", "state.safetensors"]  # clip 1, finished, for --resume
