"""File-side preprocessing: images (EXIF, modes, framing), faces, audio decoding."""

import math

import numpy as np
import pytest
import soundfile
from PIL import Image

from hallo3.preprocessing.audio import AudioError, load_audio, num_video_frames
from hallo3.preprocessing.face import FaceAnalyzer, FaceError, face_mask
from hallo3.preprocessing.image import ImageError, frame_portrait, load_image

from .conftest import ASSETS


@pytest.fixture(scope="module")
def analyzer():
    return FaceAnalyzer()


def test_exif_rotated_grayscale_and_rgba_photos_work(tmp_path, analyzer):
    photo = Image.open(ASSETS / "0001.jpg")
    rotated = photo.rotate(90, expand=True)  # stored sideways, EXIF says "rotate back"
    exif = Image.Exif()
    exif[0x0112] = 8  # orientation: rotate 90 CW to display
    rotated.save(tmp_path / "exif.jpg", exif=exif)
    photo.convert("L").save(tmp_path / "gray.png")
    rgba = photo.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(tmp_path / "rgba.png")
    for name in ("exif.jpg", "gray.png", "rgba.png"):
        image = load_image(tmp_path / name)
        assert image.mode == "RGB" and image.size == photo.size, name
        analyzer.analyze(image, name)  # the face is found upright


def test_not_an_image_and_truncated_images_are_named(tmp_path):
    (tmp_path / "notes.jpg").write_text("not a picture")
    with pytest.raises(ImageError, match="notes.jpg: not an image file"):
        load_image(tmp_path / "notes.jpg")
    data = (ASSETS / "0001.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError, match="cut.jpg: the file is damaged or truncated"):
        load_image(tmp_path / "cut.jpg")


def test_no_face_and_tiny_face_are_rejected(analyzer):
    gradient = Image.fromarray(np.tile(np.linspace(0, 255, 320, dtype=np.uint8), (240, 1))).convert("RGB")
    with pytest.raises(FaceError, match="no face found"):
        analyzer.analyze(gradient, "gradient.png")
    # the face mesh finds this ~41 px face reliably (whole image, then half- and quarter-size windows)
    small = Image.new("RGB", (600, 600), (40, 90, 40))
    small.paste(Image.open(ASSETS / "0001.jpg").resize((150, 150)), (225, 225))
    with pytest.raises(FaceError, match="at least 48 px"):
        analyzer.analyze(small, "small.png")


def test_square_portraits_are_padded_and_cropped_back():
    image = Image.new("RGB", (480, 480), (200, 10, 10))
    (framed,), framing = frame_portrait(image, None, 720, 480)
    pixels = np.asarray(framed)
    assert framed.size == (720, 480) and framing.content_box == (120, 0, 600, 480)
    assert pixels[:, :120].max() == 0 and pixels[:, 600:].max() == 0  # black bars
    frames = np.zeros((3, 480, 720, 3), dtype=np.uint8)
    assert framing.crop_output(frames).shape == (3, 480, 480, 3)


def test_a_tall_portrait_with_its_face_at_the_top_is_padded_whole_with_a_margin_above_the_face():
    """The official centre crop of a tall photo would cut a face near the top; the photo goes in whole."""
    image = Image.new("RGB", (600, 1200), (0, 0, 0))
    face_region = (200, 0, 400, 260)  # the mask box touches the photo's top
    image.paste((255, 255, 255), face_region)
    (framed,), framing = frame_portrait(image, face_region, 720, 480)
    left, top, right, bottom = framing.content_box
    assert framed.size == (720, 480) and bottom <= 480
    assert bottom - top >= 480 * 1200 / (1200 + 0.1 * 260) - 2  # as tall as the frame allows, with the margin
    assert abs((right - left) / (bottom - top) - 600 / 1200) < 0.02  # the photo's aspect, whole
    rows_with_face = np.nonzero(np.asarray(framed)[:, :, 0].max(axis=1) > 128)[0]
    face_rows = 260 * (bottom - top) / 1200
    assert rows_with_face.min() >= 0.1 * face_rows - 1  # the margin: a tenth of the region's height above it
    assert abs(len(rows_with_face) - face_rows) <= 2


def test_face_mask_expands_the_box_around_its_centre():
    mask = np.asarray(face_mask((200, 100), (50, 20, 150, 80), expand=1.2)) > 0
    rows, cols = np.nonzero(mask)
    assert (cols.min(), cols.max() + 1) == (40, 160) and (rows.min(), rows.max() + 1) == (14, 86)


def test_audio_formats_are_downmixed_and_resampled(tmp_path):
    t = np.linspace(0, 1.5, int(1.5 * 44100), endpoint=False)
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.zeros_like(t)], axis=1).astype(np.float32) * 0.5
    for fmt in ("wav", "flac", "ogg", "mp3"):
        soundfile.write(tmp_path / f"tone.{fmt}", stereo, 44100)
        waveform = load_audio(tmp_path / f"tone.{fmt}")
        assert waveform.dtype == np.float32 and waveform.ndim == 1
        assert abs(len(waveform) / 16000 - 1.5) < 0.06, fmt  # mp3 adds encoder padding
        assert 0.2 < np.abs(waveform).max() < 0.3, fmt  # mean of a 0.5 sine and silence


def test_m4a_decodes_through_ffmpeg(tmp_path):
    import subprocess

    from hallo3.preprocessing.audio import ffmpeg_exe

    subprocess.run(
        [
            ffmpeg_exe(),
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=300:duration=1.2",
            "-c:a",
            "aac",
            str(tmp_path / "speech.m4a"),
        ],
        check=True,
    )
    waveform = load_audio(tmp_path / "speech.m4a")
    assert abs(len(waveform) / 16000 - 1.2) < 0.05


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "the file is empty"),
        (b"this is not audio at all" * 20, "not a readable audio file"),
    ],
)
def test_empty_and_non_audio_files_are_named(tmp_path, content, message):
    (tmp_path / "voice.wav").write_bytes(content)
    with pytest.raises(AudioError, match=f"voice.wav: {message}"):
        load_audio(tmp_path / "voice.wav")


def test_too_long_and_too_short_audio(tmp_path):
    soundfile.write(tmp_path / "long.wav", np.zeros(16000 * 30, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="30.0 s is longer than the maximum of 20 s"):
        load_audio(tmp_path / "long.wav", max_seconds=20)
    soundfile.write(tmp_path / "blip.wav", np.zeros(800, dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="at least 0.2 s"):
        load_audio(tmp_path / "blip.wav")


def test_frame_count_is_ceil_of_seconds_times_fps():
    assert num_video_frames(16000 * 10) == 250
    assert num_video_frames(int(16000 * 10.4533)) == math.ceil(10.4533 * 25)
