"""File inputs -> what the pipeline takes: framed images, face mask and embedding, 16 kHz waveform.

Whatever needs the user's files or the face models happens here; every network the pipeline holds runs inside it.
So the portrait is framed here and VAE-encoded in the pipeline; the identity embedding (ArcFace, not a pipeline
component) is computed here and projected in the pipeline; the audio is decoded and its vocals separated here, and
encoded by wav2vec2 in the pipeline. `prepare_inputs` does this part for the CLI and the app.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .audio import load_audio, vocals_for_wav2vec
from .face import EMBEDDING_DIM, FaceAnalyzer, FaceInfo, apply_mask, face_mask
from .image import Framing, frame_portrait, load_image


@dataclass
class PreparedInputs:
    """What the pipeline takes, made from the user's files, and what maps its frames back to them."""

    image: Image.Image  # the framed portrait: the model's frame, the photo whole between black bars
    reference_image: Image.Image  # the framed, face-masked portrait
    face_embeds: np.ndarray  # raw ArcFace [512]; zeros when no identity model is present
    waveform: np.ndarray  # mono float32 at 16 kHz, vocals separated when the separator is present
    framing: Framing  # crops the output frames back to the photo: its aspect and orientation
    audio_path: Path  # the original file, muxed into the mp4
    # what the preprocessing used, for the log, the app's summary and the mp4's metadata
    report: dict[str, str] = field(default_factory=dict)

    def pipeline_inputs(self) -> dict:
        """The `Hallo3Pipeline.__call__` arguments made from the files."""
        return dict(
            image=self.image, audio=self.waveform, reference_image=self.reference_image, face_embeds=self.face_embeds
        )


def face_report(face: FaceInfo) -> str:
    """The face detector and where the identity embedding came from, in words."""
    return f"{face.detector}, {face.num_faces} face(s); identity embedding: {face.embedding_source}"


def read_inputs(
    image_path: str | Path,
    audio_path: str | Path,
    face_analyzer: FaceAnalyzer,
    max_audio_seconds: float | None,
    names: tuple[str, str] | None = None,
) -> tuple[Image.Image, FaceInfo, np.ndarray]:
    """The image, its face and the waveform, each checked against its rules; needs no model, so the CLI checks every
    input before it loads one. `names` are how errors name the two files (default: their paths)."""
    image_name, audio_name = names or (str(image_path), str(audio_path))
    image = load_image(image_path, name=image_name)
    face = face_analyzer.analyze(image, name=f"image {image_name}")
    waveform = load_audio(audio_path, max_audio_seconds, name=audio_name)
    return image, face, waveform


def prepare_inputs(
    image_path: str | Path,
    audio_path: str | Path,
    face_analyzer: FaceAnalyzer,
    size: tuple[int, int],
    max_audio_seconds: float | None,
    vocal_separator_dir: Path | None,
    separate_vocals: bool = True,
    names: tuple[str, str] | None = None,
) -> PreparedInputs:
    """Read, check and preprocess the two files for a model of `size` (width, height); raises `ImageError`,
    `FaceError` or `AudioError` naming the file and the rule."""
    image, face, waveform = read_inputs(image_path, audio_path, face_analyzer, max_audio_seconds, names)
    masked = apply_mask(image, face_mask(image.size, face.box))
    (framed, framed_reference), framing = frame_portrait(image, face.mask_box, *size, extra_images=(masked,))
    audio_path = Path(audio_path)
    waveform, vocals_note = vocals_for_wav2vec(audio_path, waveform, vocal_separator_dir, separate_vocals)
    embedding = face.embedding if face.embedding.shape == (EMBEDDING_DIM,) else np.zeros(EMBEDDING_DIM)
    report = {"face": face_report(face), "vocals": vocals_note, "framing": framing.describe()}
    return PreparedInputs(
        framed, framed_reference, embedding.astype(np.float32), waveform, framing, audio_path, report
    )
