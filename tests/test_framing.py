"""Any photo in, the same aspect out: framing into the model's 3:2 frame, the face region's margin, EXIF rotation, and
a face region that does not depend on the photo's pixel size (architecture 7.1 step 4, 7.5)."""

import json

import numpy as np
import pytest
import soundfile
from PIL import Image

from hallo3.inference import main as inference_main
from hallo3.preprocess import main as preprocess_main
from hallo3.preprocessing.face import FaceAnalyzer, apply_mask, face_mask
from hallo3.preprocessing.image import fit_in_frame, frame_portrait, load_image
from hallo3.video_io import probe_video

from .conftest import ASSETS
from .test_face_analysis import official_face_mask


MARGIN = 0.1  # the documented margin (README): a tenth of the face region's width and height
PHONE_SIZES = [(4032, 3024), (3024, 4032), (2268, 4032)]  # 4:3 wide, 3:4 tall, 9:16 tall


@pytest.fixture(scope="module")
def analyzer():
    return FaceAnalyzer()


def phone_photo(example: str, size: tuple[int, int]) -> Image.Image:
    """An official example scaled to fill the photo's shorter side, centred on a plain background of its mean
    colour: a large, clear face in a phone-sized photo."""
    portrait = Image.open(ASSETS / f"{example}.jpg").convert("RGB")
    side = min(size)
    background = tuple(int(v) for v in np.asarray(portrait).reshape(-1, 3).mean(axis=0))
    photo = Image.new("RGB", size, background)
    photo.paste(portrait.resize((side, side), Image.BICUBIC), ((size[0] - side) // 2, (size[1] - side) // 2))
    return photo


def assert_same_aspect(output_size: tuple[int, int], photo_size: tuple[int, int]) -> None:
    """The output is the photo at one scale s, each side rounded to an even pixel count: some s has both sides within
    2 px of the photo's sides times s."""
    (out_w, out_h), (w, h) = output_size, photo_size
    assert out_w % 2 == 0 and out_h % 2 == 0  # H.264 yuv420p
    assert max((out_w - 2) / w, (out_h - 2) / h) <= min((out_w + 2) / w, (out_h + 2) / h), (output_size, photo_size)
    if abs(w - h) > 0.02 * max(w, h):
        assert (out_w > out_h) == (w > h)  # the orientation


def assert_inside_with_margin(box, width: int, height: int) -> None:
    """`box` (x0, y0, x1, y1, frame pixels) has MARGIN of its size free to every edge (1 px for rounding)."""
    x0, y0, x1, y1 = box
    margin_x, margin_y = MARGIN * (x1 - x0) - 1, MARGIN * (y1 - y0) - 1
    assert x0 >= margin_x and width - x1 >= margin_x and y0 >= margin_y and height - y1 >= margin_y, box


# --------------------------------------------------------------------------------------------------------------------
# Where the photo goes


@pytest.mark.parametrize("frame", [(720, 480), (96, 64)])
def test_every_shape_fits_whole_with_its_aspect_and_the_face_region_keeps_its_margin(frame):
    width, height = frame
    rng = np.random.default_rng(0)
    for _ in range(300):
        w, h = int(rng.integers(64, 5000)), int(rng.integers(64, 5000))
        if rng.random() < 0.2:
            h = w  # squares
        # official mask boxes: inside the photo, or touching an edge, or larger than the photo
        box_w, box_h = rng.uniform(0.1, 1.1) * w, rng.uniform(0.1, 1.1) * h
        x0 = rng.choice([0.0, w - box_w, rng.uniform(min(0, w - box_w), max(0, w - box_w))])
        y0 = rng.choice([0.0, h - box_h, rng.uniform(min(0, h - box_h), max(0, h - box_h))])
        region = (x0, y0, x0 + box_w, y0 + box_h)
        left, top, right, bottom = fit_in_frame((w, h), region, width, height)
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert_same_aspect((right - left, bottom - top), (w, h))
        scale_x, scale_y = (right - left) / w, (bottom - top) / h
        in_frame = (
            left + x0 * scale_x,
            top + y0 * scale_y,
            left + (x0 + box_w) * scale_x,
            top + (y0 + box_h) * scale_y,
        )
        assert_inside_with_margin(in_frame, width, height)
        # as large as the photo and the margin allow: one axis of the photo-plus-margin extent fills the frame
        extent_w = max(w, x0 + box_w * (1 + MARGIN)) - min(0, x0 - MARGIN * box_w)
        extent_h = max(h, y0 + box_h * (1 + MARGIN)) - min(0, y0 - MARGIN * box_h)
        assert extent_w * scale_x >= width - 3 or extent_h * scale_y >= height - 3


def test_a_square_with_its_face_inside_gets_the_official_square_framing():
    """The official padding mode: resized to 480x480 (bilinear), 120-px black bars; the output cropped back."""
    photo = Image.open(ASSETS / "0008.jpg").convert("RGB").resize((512, 512), Image.BICUBIC)
    (framed,), framing = frame_portrait(photo, (100, 120, 360, 420), 720, 480)
    expected = np.zeros((480, 720, 3), dtype=np.uint8)
    expected[:, 120:600] = np.asarray(photo.resize((480, 480), Image.BILINEAR, reducing_gap=None))
    np.testing.assert_array_equal(np.asarray(framed), expected)
    assert framing.content_box == (120, 0, 600, 480) and framing.output_size == (480, 480)


@pytest.mark.parametrize("example", ["0001", "0008"])
@pytest.mark.parametrize("size", PHONE_SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
def test_phone_photos_go_in_whole_and_come_back_in_their_own_aspect(analyzer, example, size):
    photo = phone_photo(example, size)
    face = analyzer.analyze(photo)
    # the real face: the example's own face region, scaled to where the example sits in the photo
    reference = analyzer.analyze(Image.open(ASSETS / f"{example}.jpg").convert("RGB"))
    side, offset_x, offset_y = min(size), (size[0] - min(size)) // 2, (size[1] - min(size)) // 2
    expected = np.array(reference.mask_box) * side / 480 + (offset_x, offset_y, offset_x, offset_y)
    assert np.abs(np.array(face.mask_box) - expected).max() < 0.04 * (expected[3] - expected[1])

    masked = apply_mask(photo, face_mask(photo.size, face.box))
    (framed, framed_reference), framing = frame_portrait(photo, face.mask_box, 720, 480, extra_images=(masked,))
    assert framed.size == framed_reference.size == (720, 480)
    assert_same_aspect(framing.output_size, size)
    assert_inside_with_margin(framing.to_frame(face.mask_box), 720, 480)
    # the frames cropped back are the whole photo, not a band of it: compare with the photo resized to that size
    frame = np.asarray(framed)[None]
    back = framing.crop_output(frame)[0].astype(np.int16)
    whole = np.asarray(photo.resize(framing.output_size, Image.BILINEAR)).astype(np.int16)
    assert back.shape == whole.shape and np.abs(back - whole).mean() < 2
    left, top, right, bottom = framing.content_box
    bars = np.ones((480, 720), dtype=bool)
    bars[top:bottom, left:right] = False
    assert frame[0][bars].max(initial=0) == 0  # the rest of the frame is black


# --------------------------------------------------------------------------------------------------------------------
# The face region at any pixel size


def photo_at(scale: float, size: tuple[int, int], face_side: int) -> Image.Image:
    """A `size` photo of example 0001 (a tilted child's face, a third of the example's side) scaled to `face_side`
    and centred, at `scale` x `size`; each size made from one 3x master as a camera or an editor would (Lanczos)."""
    width, height = size
    portrait = Image.open(ASSETS / "0001.jpg").convert("RGB").resize((3 * face_side, 3 * face_side), Image.LANCZOS)
    background = tuple(int(v) for v in np.asarray(portrait)[:8, :8].reshape(-1, 3).mean(axis=0))
    master = Image.new("RGB", (3 * width, 3 * height), background)
    master.paste(portrait, (3 * (width - face_side) // 2, 3 * (height - face_side) // 2))
    return master.resize((round(width * scale), round(height * scale)), Image.LANCZOS)


@pytest.mark.parametrize("size, face_side", [((1200, 800), 400), ((1600, 900), 500)], ids=["3:2", "16:9"])
def test_the_face_region_does_not_depend_on_the_photos_pixel_size(analyzer, size, face_side):
    """The face is found on the whole photo at some sizes and in a search window at others; the landmarks of a face
    this small used to depend on that view (the 3:2 photo's mask box moved by a sixth of its height from 1x to 2x)."""
    boxes = {
        scale: np.array(analyzer.analyze(photo_at(scale, size, face_side)).mask_box) / scale
        for scale in (0.5, 1, 2, 3)
    }
    x0, y0, x1, y1 = boxes[1]
    for scale, box in boxes.items():
        difference = np.abs(box - boxes[1]) / (x1 - x0, y1 - y0, x1 - x0, y1 - y0)
        print(f"{scale}x: mask box / scale {np.round(box, 1).tolist()}, off by {100 * difference.max():.1f}%")
        assert difference.max() < 0.04, scale


def test_a_photo_larger_than_the_detection_copy_gets_the_official_box_in_its_own_pixels(analyzer):
    """Faces are found on a copy of at most DETECTION_MAX_SIDE px; the box is computed from the landmarks in the
    photo's own pixels, as the official code computes it on the file, not on the copy and scaled."""
    photo = photo_at(3, (1200, 800), 400)
    face = analyzer.analyze(photo)
    assert face.mask_box == official_face_mask(face.landmarks, *photo.size)[0]


# --------------------------------------------------------------------------------------------------------------------
# python -m hallo3.preprocess and python -m hallo3.inference on phone photos


def save_phone_photo(path, example: str, size: tuple[int, int], exif_rotated: bool) -> None:
    """A JPEG of `phone_photo`; `exif_rotated`: stored on its side with the EXIF Orientation tag 6 (rotate 90 degrees
    clockwise to display), as phones store portraits."""
    photo = phone_photo(example, size)
    if exif_rotated:
        exif = Image.Exif()
        exif[0x0112] = 6
        photo.transpose(Image.Transpose.ROTATE_90).save(path, quality=90, exif=exif)
    else:
        photo.save(path, quality=90)


@pytest.mark.parametrize(
    "size, exif_rotated", [((3024, 4032), True), ((4032, 3024), False)], ids=["tall-exif-rotated", "wide"]
)
def test_preprocess_writes_the_portrait_and_its_mask_in_one_frame_and_reports_the_framing(
    tmp_path, analyzer, size, exif_rotated
):
    save_phone_photo(tmp_path / "phone.jpg", "0008", size, exif_rotated)
    if exif_rotated:
        with Image.open(tmp_path / "phone.jpg") as stored:
            assert stored.size == size[::-1]  # stored sideways
    assert preprocess_main(["--image", str(tmp_path / "phone.jpg"), "--output-dir", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "face.json").read_text())
    assert report["image_size"] == list(size)  # upright: the EXIF rotation came first
    assert report["frame_size"] == [720, 480]
    assert_same_aspect(tuple(report["output_size"]), size)
    left, top, right, bottom = report["photo_in_frame"]
    assert report["output_size"] == [right - left, bottom - top]
    assert report["padding"] == {"left": left, "top": top, "right": 720 - right, "bottom": 480 - bottom}

    # the official mask box, in the photo's pixels, and the same box in the frame
    photo = load_image(tmp_path / "phone.jpg")
    assert report["mask_box"] == list(official_face_mask(analyzer.analyze(photo).landmarks, *size)[0])
    x0, y0, x1, y1 = report["mask_box"]
    scale_x, scale_y = (right - left) / size[0], (bottom - top) / size[1]
    expected = [left + x0 * scale_x, top + y0 * scale_y, left + x1 * scale_x, top + y1 * scale_y]
    assert np.abs(np.array(report["frame_mask_box"]) - expected).max() <= 0.5
    assert_inside_with_margin(report["frame_mask_box"], 720, 480)

    portrait = np.asarray(Image.open(tmp_path / "out" / "portrait.png"))
    mask = np.asarray(Image.open(tmp_path / "out" / "face_mask.png"))
    assert portrait.shape[:2] == mask.shape == (480, 720)  # one frame: the mask overlays the portrait
    rows, cols = np.nonzero(mask)
    assert [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1] == report["frame_mask_box"]
    frame_x0, frame_y0, frame_x1, frame_y1 = report["frame_mask_box"]
    assert (mask == 255).sum() == (frame_x1 - frame_x0) * (frame_y1 - frame_y0)  # a filled box, white on black
    assert portrait[:, :left].max(initial=0) == 0 and portrait[:, right:].max(initial=0) == 0  # the bars


def short_speech(path) -> None:
    """The first 1.8 s of example 0008's speech: 45 frames, one clip."""
    audio, rate = soundfile.read(ASSETS / "0008.wav", dtype="float32")
    soundfile.write(path, audio[: int(1.8 * rate)], rate)


@pytest.mark.parametrize("size", [(3024, 4032), (4032, 3024)], ids=["tall", "wide"])
def test_the_cli_makes_a_video_in_the_photos_aspect_and_orientation(tmp_path, size):
    save_phone_photo(tmp_path / "phone.jpg", "0001", size, exif_rotated=False)
    short_speech(tmp_path / "speech.wav")
    output = tmp_path / "talking.mp4"
    argv = ["--model", "tiny-random", "--image", str(tmp_path / "phone.jpg"), "--audio", str(tmp_path / "speech.wav")]
    assert inference_main([*argv, "--steps", "1", "--seed", "0", "--output", str(output)]) == 0
    video = probe_video(output)
    assert video["ok"] and video["num_frames"] == 45
    # the tiny-random frame is 96x64: a 3:4 photo comes back 48x64, a 4:3 one 86x64 (85.3 rounded to even)
    print(f"{size[0]}x{size[1]} photo -> {video['width']}x{video['height']} video")
    assert_same_aspect((video["width"], video["height"]), size)
    assert video["height"] == 64
