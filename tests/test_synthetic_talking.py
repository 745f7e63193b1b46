"""train.synthetic_data talking heads: deterministic frames, a mouth driven by the speech envelope, a warp that never
folds, held-out speech kept out of training, and the folder layout train.prepare_dataset reads. Needs espeak-ng."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hallo3.video_io import probe_video
from train.synthetic_data import (
    DEFAULT_SIZE,
    HELD_OUT_LANGUAGES,
    HELD_OUT_SENTENCES,
    HELD_OUT_VARIANTS,
    TRAIN_LANGUAGES,
    TRAIN_SENTENCES,
    TRAIN_VARIANTS,
    draw_spec,
    espeak,
    main,
    photo_landmarks,
    talking_head,
)

from .conftest import ASSETS


REPO = Path(__file__).parent.parent
PHOTOS = (ASSETS / "0001.jpg", ASSETS / "0008.jpg")

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="talking heads speak with espeak-ng")


@pytest.fixture(scope="module")
def sources():
    """The example photos and their face-mesh landmarks, found once."""
    return photo_landmarks(PHOTOS)


def make_clip(sources, seed: int, index: int, seconds: float = 1.6, split: str = "train"):
    spec = draw_spec(seed, index, PHOTOS, split, DEFAULT_SIZE, seconds)
    return talking_head(spec, *sources[spec.photo])


def test_the_same_seed_gives_byte_identical_frames(sources):
    first, again = make_clip(sources, 3, 1), make_clip(sources, 3, 1)
    frames = np.stack(list(first.frames()))
    assert frames.shape == (40, *DEFAULT_SIZE, 3) and frames.dtype == np.uint8
    assert frames.tobytes() == np.stack(list(again.frames())).tobytes()
    assert first.waveform.tobytes() == again.waveform.tobytes()
    other = make_clip(sources, 4, 1)
    assert other.spec.utterance != first.spec.utterance
    assert not np.array_equal(np.stack(list(other.frames())), frames)


def test_the_mouth_opens_with_the_loudness_of_the_speech(sources):
    clip = make_clip(sources, 0, 0, seconds=3.0)
    samples_per_frame = 16000 // 25
    rms = np.array(
        [
            np.sqrt(
                np.mean(clip.waveform[i * samples_per_frame : (i + 1) * samples_per_frame].astype(np.float64) ** 2)
            )
            for i in range(len(clip.opening))
        ]
    )
    assert np.corrcoef(clip.opening, rms)[0, 1] > 0.9
    assert clip.opening.max() == 1.0
    quiet = np.convolve(rms < 0.02 * rms.max(), np.ones(3), mode="same") == 3  # silent with both neighbours
    assert quiet.any() and np.all(clip.opening[quiet] == 0)
    assert clip.closure.max() == 1.0 or len(clip.closure) < 2.5 * 25  # a blink within the first 2.5 s


def test_the_warp_never_folds_and_leaves_the_upper_face_alone(sources):
    rig = make_clip(sources, 0, 1).rig
    height, width = rig.still.shape[:2]
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    lip_line = np.interp(x, rig.lip_x, rig.lip_y)
    centre = int(round(rig.mouth_centre))
    for opening in (0.0, 0.4, 1.0):
        for closure in (0.0, 1.0):
            rows, interior, _ = rig.source_rows(x, y, opening, closure)
            # down every column, the rows shown outside the mouth's interior never go back up (the interior's edge
            # is found to a hundredth of a pixel)
            for column in range(width):
                shown = rows[interior[:, column] == 0, column]
                assert np.all(np.diff(shown) >= -0.01), (opening, closure, column)
            # the painted interior is exactly the opening at the middle of the mouth
            assert abs(interior[:, centre].sum() - opening * rig.max_opening) < 0.05 * rig.max_opening + 1e-9
            if closure == 0:
                assert np.array_equal(rows[y < lip_line], y[y < lip_line])
    assert np.array_equal(rig.frame(0.0, 0.0, np.eye(2, 3)), rig.still)
    assert not np.array_equal(rig.frame(1.0, 0.0, np.eye(2, 3)), rig.still)


def test_held_out_sentences_and_voices_are_never_used_for_training():
    assert not set(TRAIN_SENTENCES) & set(HELD_OUT_SENTENCES)
    assert not set(TRAIN_LANGUAGES) & set(HELD_OUT_LANGUAGES)
    assert not set(TRAIN_VARIANTS) & set(HELD_OUT_VARIANTS)
    for split, sentences, languages, variants in (
        ("train", TRAIN_SENTENCES, TRAIN_LANGUAGES, TRAIN_VARIANTS),
        ("held-out", HELD_OUT_SENTENCES, HELD_OUT_LANGUAGES, HELD_OUT_VARIANTS),
    ):
        used_languages, used_variants = set(), set()
        for index in range(300):
            utterance = draw_spec(11, index, PHOTOS, split, DEFAULT_SIZE, 6.0).utterance
            language, plus, variant = utterance.voice.partition("+")
            used_languages.add(language)
            used_variants.add(plus + variant)
            assert set(utterance.sentences) <= set(sentences)
        assert used_languages == set(languages) and used_variants == set(variants)


def test_every_voice_is_one_espeak_ng_has():
    """espeak-ng refuses an unknown language but ignores an unknown variant, so a variant must change the sound."""
    plain = espeak("Hello there.", "en", 160, 50)
    for language in TRAIN_LANGUAGES + HELD_OUT_LANGUAGES:
        espeak("Hello there.", language, 160, 50)  # raises for an unknown language
    for variant in TRAIN_VARIANTS + HELD_OUT_VARIANTS:
        if variant:
            sound = espeak("Hello there.", f"en{variant}", 160, 50)
            assert len(sound) != len(plain) or not np.array_equal(sound, plain), variant


def test_the_command_writes_what_prepare_dataset_reads_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # the default photos are the repository's examples
    output = tmp_path / "heads"
    command = ["talking-heads", "--output", str(output), "--count", "2", "--seconds", "1.2"]
    assert main([*command, "--seed", "5"]) == 0
    names = [json.loads(line)["name"] for line in (output / "manifest.jsonl").read_text().splitlines()]
    assert names == ["train-00000", "train-00001"]
    for name in names:
        info = probe_video(output / "videos" / f"{name}.mp4")
        assert (info["width"], info["height"], info["num_frames"]) == (288, 192, 30)
        assert info["audio_codec"] == "aac" and abs(info["audio_seconds"] - 1.2) < 0.05
        assert (output / "captions" / f"{name}.txt").read_text().strip()
        assert (output / "portraits" / f"{name}.png").is_file()
    made = {path: path.stat().st_mtime_ns for path in (output / "videos").iterdir()}
    capsys.readouterr()

    assert main([*command, "--seed", "5"]) == 0  # a rerun keeps the finished clips
    assert "wrote 0 of 2" in capsys.readouterr().out
    assert {path: path.stat().st_mtime_ns for path in (output / "videos").iterdir()} == made

    assert main([*command, "--seed", "6"]) == 2  # another seed into the same folder
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "made with other settings" in error
    assert {path: path.stat().st_mtime_ns for path in (output / "videos").iterdir()} == made

    for bad in (["--height", "100"], ["--count", "0"], ["--seconds", "nan"]):
        assert main([*command, *bad]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and bad[0] in error


def test_prepare_dataset_keeps_talking_heads_with_the_real_face_mesh(tmp_path, monkeypatch):
    """The clips pass every filter of data preparation (one face, size, sharpness, motion, length) as the mesh sees
    them, not through a recorded answer."""
    from train.prepare_dataset import main as prepare_main

    monkeypatch.chdir(REPO)
    raw = tmp_path / "heads"
    assert main(["talking-heads", "--output", str(raw), "--count", "1", "--seconds", "2.6"]) == 0
    output = tmp_path / "prepared"
    code = prepare_main(
        ["--videos", str(raw / "videos"), "--captions", str(raw / "captions"), "--output", str(output)]
        + ["--wav2vec", "tiny-random", "--no-vocal-separation", "--no-face-embedding"]
    )
    assert code == 0
    report = [json.loads(line) for line in (output / "report.jsonl").read_text().splitlines()]
    assert [entry["kept"] for entry in report] == [True], report
