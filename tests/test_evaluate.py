"""hallo3.evaluate on videos with known lip motion (train.synthetic_data talking heads), with the speech right, late,
or wrong; continuity with a jump planted at a clip join; the measures against plainly written references; bad input."""

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from hallo3.evaluate import (
    DEFAULT_MAX_LAG,
    best_lag,
    evaluate,
    format_table,
    join_continuity,
    lagged_correlations,
    main,
    speech_envelope,
    ssim,
)
from hallo3.preprocessing.face import FaceAnalyzer, FaceInfo
from hallo3.video_io import VideoWriter

from .conftest import ASSETS


PHOTOS = (ASSETS / "0001.jpg", ASSETS / "0008.jpg")
SECONDS = 5.0
STRIDE = 47  # new frames per clip: 49 - 2 motion frames

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="talking heads speak with espeak-ng")


def write_video(path: Path, frames, waveform: np.ndarray | None) -> Path:
    audio = None
    if waveform is not None:
        audio = path.with_suffix(".wav")
        soundfile.write(audio, waveform, 16000, subtype="FLOAT")
    with VideoWriter(path, audio_path=audio) as writer:
        for frame in frames:
            writer.write(frame[None])
    return path


@pytest.fixture(scope="module")
def analyzer():
    return FaceAnalyzer(min_face_size=1)


@pytest.fixture(scope="module")
def talking(tmp_path_factory):
    """Two synthetic talking heads at 192x288: the mp4 of the first (mouth driven by its own speech), its still
    portrait and its frames; and the second's speech (another utterance, another voice)."""
    from train.synthetic_data import DEFAULT_SIZE, draw_spec, photo_landmarks, talking_head

    folder = tmp_path_factory.mktemp("talking")
    sources = photo_landmarks(PHOTOS)
    clips = []
    for index in (0, 1):
        spec = draw_spec(2, index, PHOTOS, "train", DEFAULT_SIZE, SECONDS)
        clips.append(talking_head(spec, *sources[spec.photo]))
    frames = list(clips[0].frames())
    Image.fromarray(clips[0].rig.still).save(folder / "portrait.png")
    soundfile.write(folder / "other.wav", clips[1].waveform, 16000, subtype="FLOAT")
    video = write_video(folder / "talking.mp4", frames, clips[0].waveform)
    return {"folder": folder, "video": video, "frames": frames, "clip": clips[0], "other": folder / "other.wav"}


@pytest.fixture(scope="module")
def perfect(talking, analyzer):
    return evaluate(talking["video"], talking["folder"] / "portrait.png", analyzer=analyzer)


@needs_espeak
def test_lips_that_follow_the_speech_correlate_at_lag_zero(perfect):
    assert perfect.lip_sync is not None and perfect.lip_sync > 0.85  # measured 0.96-0.99 on such clips
    assert perfect.lip_sync_lag == 0
    assert perfect.face_found > 0.95
    assert perfect.num_frames == perfect.expected_frames == math.ceil(SECONDS * 25) and perfect.frame_count_ok
    assert perfect.ssim is not None and perfect.ssim > 0.6  # measured 0.80-0.89: the mouth and blinks change it
    assert perfect.arcface_cosine is None and perfect.arcface_note.startswith("skipped")
    # the continuity of one continuous render: joins look like any other frame step
    assert perfect.continuity["joins"] == 2 and perfect.continuity["worst_ratio"] < 2


@needs_espeak
def test_speech_that_comes_late_is_found_at_its_lag_and_the_length_is_checked(talking, analyzer):
    """The same video against its speech delayed by 3 frames: the mouth now moves 3 frames before the sound."""
    delayed_path = talking["folder"] / "delayed.wav"
    soundfile.write(delayed_path, np.concatenate([np.zeros(3 * 640), talking["clip"].waveform]), 16000)
    result = evaluate(talking["video"], talking["folder"] / "portrait.png", delayed_path, analyzer=analyzer)
    assert result.lip_sync_lag == -3 and result.lip_sync is not None and result.lip_sync > 0.85
    assert result.lip_sync_at_zero_lag is not None and result.lip_sync_at_zero_lag < result.lip_sync - 0.2
    assert result.expected_frames == result.num_frames + 3 and not result.frame_count_ok


@needs_espeak
def test_lips_judged_against_unrelated_speech_do_not_correlate(talking, perfect, analyzer):
    """The planted bug, speech that does not drive the lips: the video against its own speech shuffled in 200 ms
    pieces (the same sounds, the timing gone), end to end and, through the per-frame apertures the evaluation
    reports, against 20 such shuffles; and against another utterance, which shares only the pauses."""
    waveform = talking["clip"].waveform
    pieces = waveform[: len(waveform) // 3200 * 3200].reshape(-1, 3200)
    rng = np.random.default_rng(0)
    shuffled_path = talking["folder"] / "shuffled.wav"
    soundfile.write(shuffled_path, pieces[rng.permutation(len(pieces))].reshape(-1), 16000)
    shuffled = evaluate(talking["video"], talking["folder"] / "portrait.png", shuffled_path, analyzer=analyzer)
    assert perfect.lip_sync is not None and shuffled.lip_sync is not None
    assert shuffled.lip_sync < 0.5 and perfect.lip_sync - shuffled.lip_sync > 0.4

    aperture = np.array([math.nan if value is None else value for value in perfect.aperture])
    best = []
    for _ in range(20):
        envelope = speech_envelope(pieces[rng.permutation(len(pieces))].reshape(-1), len(aperture), 25)
        lag_and_r = best_lag(lagged_correlations(aperture, envelope, DEFAULT_MAX_LAG))
        assert lag_and_r is not None
        best.append(lag_and_r[1])
    assert np.mean(best) < 0.3  # measured 0.1-0.2 on 4-8 s clips
    assert perfect.lip_sync_chance is not None and perfect.lip_sync - perfect.lip_sync_chance > 0.4

    other = evaluate(talking["video"], talking["folder"] / "portrait.png", talking["other"], analyzer=analyzer)
    assert other.lip_sync is not None and perfect.lip_sync - other.lip_sync > 0.3


@needs_espeak
def test_a_jump_at_a_clip_join_is_found(talking, analyzer):
    frames = talking["frames"]

    def shifted(frame):  # the whole picture 6 px to the right: what a clip that starts off-place looks like
        return np.concatenate([frame[:, :6], frame[:, :-6]], axis=1)

    jumped = [frame if i < STRIDE else shifted(frame) for i, frame in enumerate(frames)]
    path = write_video(talking["folder"] / "jump.mp4", jumped, talking["clip"].waveform)
    continuity = evaluate(path, talking["folder"] / "portrait.png", analyzer=analyzer).continuity
    assert continuity["worst_join"] == STRIDE and continuity["worst_ratio"] > 3


@needs_espeak
def test_arcface_cosine_is_the_mean_over_the_frames_with_a_face(talking, analyzer):
    """With an identity model (here a stand-in that gives the portrait one vector and every frame another), the
    cosine is theirs; without one (every other test) it is skipped."""

    class IdentityStandIn:
        def __init__(self):
            self.calls = 0

        def analyze(self, image: Image.Image, name: str = "image") -> FaceInfo:
            face = analyzer.analyze(image, name)
            self.calls += 1
            vector = np.array([1.0, 0.0, 0.0]) if self.calls == 1 else np.array([3.0, 4.0, 0.0])
            return replace(face, embedding=vector, embedding_source="insightface ArcFace (stand-in)")

    result = evaluate(talking["video"], talking["folder"] / "portrait.png", analyzer=IdentityStandIn())  # type: ignore[arg-type]
    assert result.arcface_cosine == pytest.approx(0.6) and result.arcface_note.startswith("insightface")


# ---------------------------------------------------------------------------------------------------------------------
# The measures against plainly written references


def test_the_envelope_is_the_rms_of_each_frame_smoothed():
    rng = np.random.default_rng(0)
    waveform = (rng.standard_normal(16000) * np.repeat(rng.uniform(0, 1, 50), 320)).astype(np.float32)
    for fps in (25, 30):
        num_frames = 32  # past the end of the audio at 30 fps: those frames are silent
        rms = []
        for i in range(num_frames):
            start, end = round(i * 16000 / fps), round((i + 1) * 16000 / fps)
            chunk = waveform[start:end].astype(np.float64)
            rms.append(math.sqrt(float((chunk**2).sum()) / (end - start)))
        padded = [rms[0], *rms, rms[-1]]
        expected = [(padded[i] + 2 * padded[i + 1] + padded[i + 2]) / 4 for i in range(num_frames)]
        np.testing.assert_allclose(speech_envelope(waveform, num_frames, fps), expected, rtol=1e-9)


def test_the_correlation_finds_a_planted_delay_with_its_sign():
    rng = np.random.default_rng(1)
    sound = np.convolve(rng.standard_normal(200), np.ones(3), mode="same")
    mouth = np.concatenate([np.zeros(2), sound[:-2]])  # the mouth moves 2 frames after the sound
    mouth[[10, 50]] = np.nan  # frames without a face are left out
    by_lag = lagged_correlations(mouth, sound, DEFAULT_MAX_LAG)
    assert max(by_lag, key=lambda lag: by_lag[lag] or -1) == 2 and by_lag[2] == pytest.approx(1.0)
    assert set(by_lag) == set(range(-DEFAULT_MAX_LAG, DEFAULT_MAX_LAG + 1))


def test_ssim_is_the_gaussian_windowed_formula():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (24, 20)).astype(np.float64)
    b = np.clip(a + rng.normal(0, 30, a.shape), 0, 255)
    offsets = np.arange(11) - 5
    window = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5**2))
    window /= window.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for row in range(5, a.shape[0] - 5):
        for column in range(5, a.shape[1] - 5):
            pa, pb = a[row - 5 : row + 6, column - 5 : column + 6], b[row - 5 : row + 6, column - 5 : column + 6]
            mu_a, mu_b = (window * pa).sum(), (window * pb).sum()
            var_a, var_b = (window * pa * pa).sum() - mu_a**2, (window * pb * pb).sum() - mu_b**2
            cov = (window * pa * pb).sum() - mu_a * mu_b
            values.append((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    assert ssim(a, b) == pytest.approx(np.mean(values), abs=1e-9)
    assert ssim(a, a) == pytest.approx(1.0)


def test_joins_are_every_stride_frames():
    differences = np.ones(99)  # 100 frames
    differences[[46, 93]] = 5.0  # into frames 47 and 94, the first frames of clips 1 and 2
    continuity = join_continuity(differences, STRIDE)
    assert continuity["joins"] == 2 and continuity["ratio"] == pytest.approx(5.0)
    assert continuity["worst_join"] == STRIDE
    assert join_continuity(np.ones(30), STRIDE)["joins"] == 0  # one clip: nothing to compare
    inside = np.ones(99)
    inside[29] = 5.0  # a jump inside clip 0 is not a join's
    assert join_continuity(inside, STRIDE)["worst_ratio"] < 1.1


# ---------------------------------------------------------------------------------------------------------------------
# The command


def test_a_video_without_a_face_is_measured_not_refused(tmp_path, capsys):
    rng = np.random.default_rng(3)
    frames = [rng.integers(100, 140, (96, 96, 3), dtype=np.uint8) for _ in range(25)]
    tone = (0.2 * np.sin(2 * np.pi * 200 * np.arange(16000) / 16000)).astype(np.float32)
    video = write_video(tmp_path / "noise.mp4", frames, tone)
    command = ["--video", str(video), "--image", str(ASSETS / "0001.jpg"), "--json", str(tmp_path / "r.json")]
    assert main(command) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["face_found"] == 0 and report["lip_sync"] is None and report["frame_count_ok"] is True
    assert "n/a" in capsys.readouterr().out
    (tmp_path / "r.json").write_text("{}")
    assert main([*command, "--overwrite"]) == 0 and json.loads((tmp_path / "r.json").read_text())["num_frames"] == 25


@needs_espeak
def test_the_command_prints_a_table_and_writes_json(talking, tmp_path, capsys):
    output = tmp_path / "report.json"
    arguments = ["--video", str(talking["video"]), "--image", str(talking["folder"] / "portrait.png")]
    assert main([*arguments, "--json", str(output)]) == 0
    table = capsys.readouterr().out
    report = json.loads(output.read_text())
    assert report["lip_sync"] > 0.85 and report["frame_count_ok"] is True and report["face_found"] > 0.95
    assert "lip sync" in table and f"{report['lip_sync']:.3f}" in table
    assert main([*arguments, "--json", str(output)]) == 2  # never replaces a report unasked
    assert "--overwrite" in capsys.readouterr().err


def test_bad_input_gets_one_line_and_exit_2(tmp_path, capsys):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    silent = write_video(tmp_path / "silent.mp4", [np.full((64, 64, 3), 128, np.uint8)] * 5, None)
    wall = tmp_path / "wall.png"
    Image.new("RGB", (64, 64), (120, 120, 120)).save(wall)
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    image, audio = str(ASSETS / "0001.jpg"), str(ASSETS / "0001.mp3")
    cases = [
        (["--video", str(tmp_path / "missing.mp4"), "--image", image, "--audio", audio], "no such file"),
        (["--video", str(text), "--image", image, "--audio", audio], "not a readable video"),
        (["--video", str(ASSETS / "0001.jpg"), "--image", image, "--audio", audio], "at least 2"),
        (["--video", str(silent), "--image", image], "no audio track"),
        (["--video", str(silent), "--image", image, "--audio", str(text)], "audio"),
        (["--video", str(silent), "--image", str(tmp_path / "none.png"), "--audio", audio], "no such file"),
        (["--video", str(silent), "--image", str(wall), "--audio", audio], "no face"),
        (["--video", str(silent), "--image", image, "--audio", audio, "--json", str(existing)], "exists"),
        (["--video", str(silent), "--image", image, "--audio", audio, "--max-lag", "-1"], "--max-lag"),
    ]
    for arguments, rule in cases:
        assert main(arguments) == 2, arguments
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and rule in error and "Traceback" not in error, (arguments, error)
    assert existing.read_text() == "{}"


@needs_espeak
def test_the_table_names_every_measure(perfect):
    table = format_table(perfect)
    for row in ("frames", "face found", "lip sync", "identity SSIM", "identity ArcFace", "clip joins"):
        assert row in table
