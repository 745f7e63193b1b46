"""Face detection, the face mask and the identity embedding (reference 5.3, 7.1 steps 1-3, 12.21, 12.22).

The identity embedding is insightface's raw ArcFace vector (glintr100, 512-d, not normalised) when the official
`face_analysis` model folder is present and insightface is installed. Without it, OpenCV's bundled Haar cascade still
finds the face (offline, no download) for the mask and the crop, and the identity embedding is zeros: that is what
the official code feeds when insightface finds no face. Identity then comes from the reference image alone; expect a
weaker likeness than with ArcFace. Lip-sync and motion do not use the embedding.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


logger = logging.getLogger(__name__)

EMBEDDING_DIM = 512
DETECTION_MAX_SIDE = 1280


class FaceError(ValueError):
    """The portrait breaks a face rule (none found, too small); the message names the image and the rule."""


@dataclass
class FaceInfo:
    """The largest face of a portrait.

    Attributes:
        box: (x0, y0, x1, y1) in the image's pixels.
        embedding: the identity embedding [512], zeros when no ArcFace model is available.
        num_faces: how many faces the detector found.
        detector: "insightface" or "opencv-haar".
    """

    box: tuple[float, float, float, float]
    embedding: np.ndarray
    num_faces: int
    detector: str


def face_mask(size: tuple[int, int], box: tuple[float, float, float, float], expand: float = 1.2) -> Image.Image:
    """Binary mask (mode "L", 0/255) of the face box expanded around its centre, clipped to the image.

    The official code expands the face-silhouette box by 1.2 around floor((min + max) / 2) (reference 7.1 step 2).
    """
    width, height = size
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    half_w, half_h = int((x1 - x0) * expand / 2), int((y1 - y0) * expand / 2)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    left, right = max(0, cx - half_w), min(width, cx + half_w)
    top, bottom = max(0, cy - half_h), min(height, cy + half_h)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask)  # uint8 [H, W] -> mode "L"


def apply_mask(image: Image.Image, mask: Image.Image) -> Image.Image:
    """image x mask at the original resolution, as the official reference image is made (black outside the face)."""
    return Image.composite(image, Image.new("RGB", image.size, (0, 0, 0)), mask)


def _box(values) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in values)
    return x0, y0, x1, y1


class FaceAnalyzer:
    """Finds the largest face; ArcFace embedding through insightface when its model folder is given.

    Args:
        model_dir (`Path`, *optional*): the official `face_analysis` folder (holding `models/` with the detector and
            `glintr100.onnx`). Without it, or without insightface installed, OpenCV's Haar cascade is used.
        min_face_size (`int`): faces smaller than this many pixels (shorter side) are rejected.
    """

    def __init__(self, model_dir: Path | None = None, min_face_size: int = 48):
        self.min_face_size = min_face_size
        self._insightface = None
        self._haar: list | None = None
        if model_dir is not None and Path(model_dir).is_dir():
            try:
                from insightface.app import FaceAnalysis
            except ImportError:
                logger.warning("insightface is not installed; `pip install insightface onnxruntime` for ArcFace.")
            else:
                self._insightface = FaceAnalysis(
                    name="", root=str(model_dir), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
                )
                self._insightface.prepare(ctx_id=0, det_size=(640, 640))
        if self._insightface is None:
            logger.info(
                "Face analysis: OpenCV Haar cascade; identity embedding = zeros (no ArcFace model). The likeness "
                "then comes from the reference image alone."
            )

    @property
    def detector(self) -> str:
        return "insightface" if self._insightface is not None else "opencv-haar"

    def detect(self, image: Image.Image) -> list[tuple[tuple[float, float, float, float], np.ndarray]]:
        """Every face of `image` as (box (x0, y0, x1, y1) in pixels, embedding [512]), unfiltered.

        Faces are found on a copy whose longer side is at most `DETECTION_MAX_SIDE`: detection time grows with the
        pixel count (a 12-megapixel photo took minutes), the face does not need them.
        """
        scale = min(1.0, DETECTION_MAX_SIDE / max(image.size))
        if scale < 1.0:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        return [(_box(v / scale for v in box), embedding) for box, embedding in self._detect(image)]

    def _detect(self, image: Image.Image) -> list[tuple[tuple[float, float, float, float], np.ndarray]]:
        rgb = np.asarray(image)
        if self._insightface is not None:
            faces = self._insightface.get(rgb[:, :, ::-1].copy())  # insightface expects BGR
            return [(_box(face.bbox), np.asarray(face.embedding, dtype=np.float32)) for face in faces]
        import cv2

        if self._haar is None:
            # precise first, then more permissive; the profile cascade looks one way, so it also runs mirrored
            self._haar = [
                cv2.CascadeClassifier(cv2.data.haarcascades + f"haarcascade_{name}.xml")  # type: ignore[attr-defined]
                for name in ("frontalface_alt2", "frontalface_default", "profileface")
            ]
        cascades: list = self._haar
        gray = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
        boxes = []
        for cascade in cascades:
            for mirrored in (False, True) if cascade is cascades[-1] else (False,):
                found = cascade.detectMultiScale(
                    cv2.flip(gray, 1) if mirrored else gray, scaleFactor=1.05, minNeighbors=4, minSize=(24, 24)
                )
                width = gray.shape[1]
                boxes += [(width - x - w if mirrored else x, y, w, h) for x, y, w, h in found]
            if boxes:
                break
        zeros = np.zeros(EMBEDDING_DIM, dtype=np.float32)
        return [((float(x), float(y), float(x + w), float(y + h)), zeros) for x, y, w, h in boxes]

    def analyze(self, image: Image.Image, name: str = "image") -> FaceInfo:
        """The largest face of `image`; raises `FaceError` when there is none or it is too small."""
        faces = self.detect(image)
        if not faces:
            raise FaceError(
                f"{name}: no face found ({self.detector}). Use a photo with one clearly visible, roughly frontal face."
            )
        box, embedding = max(faces, key=lambda f: (f[0][2] - f[0][0]) * (f[0][3] - f[0][1]))
        if len(faces) > 1:
            logger.warning("%s: %d faces found; using the largest.", name, len(faces))
        side = min(box[2] - box[0], box[3] - box[1])
        if side < self.min_face_size:
            raise FaceError(
                f"{name}: the face is {side:.0f} px across; at least {self.min_face_size} px is needed. Use a closer "
                f"or larger photo."
            )
        return FaceInfo(box=box, embedding=embedding, num_faces=len(faces), detector=self.detector)
