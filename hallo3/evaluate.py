"""How good is a talking-head video? Lip sync, identity, continuity and length, measured on the mp4.

    python -m hallo3.evaluate --video V --image I [--audio A] [--json OUT] [--face-analysis DIR] [--max-lag 5]
        [--clip-length 49 --motion-frames 2]

Works on any video of one face: this project's outputs, the synthetic training clips (`train.synthetic_data`), or a
real recording. Every frame goes through the face mesh the pipeline uses (`hallo3.preprocessing.face`):
- face found: the fraction of frames with a face;
- lip sync: the inner-lip aperture (landmarks 13 and 14, over the distance between the outer eye corners 33 and 263)
  against the speech envelope (RMS per video frame, lightly smoothed), as the Pearson correlation at the best lag
  within +-`max_lag` frames, and that lag (positive: the mouth follows the sound); and the same figure for speech
  unrelated to the video (its own envelope shifted by a second or more), which on a few seconds of speech can reach
  0.5: a lip-sync figure means something only well above it;
- identity: SSIM of the face region of each frame, aligned to the framed portrait by a similarity transform of stable
  landmarks (eye corners, nose), against the same region of the portrait; with the official `face_analysis` folder
  and insightface, the ArcFace cosine of each frame's face with the portrait's;
- continuity: the mean absolute difference of consecutive frames where one clip of the clip loop ends and the next
  begins (every `clip_length - motion_frames` frames), against the same inside clips;
- length: the frame count against ceil(audio seconds x fps), what the pipeline writes.

`--audio` defaults to the video's own audio track. A bad input (not a video, no audio, no face on the portrait) gets
one line naming it and the rule, and exit code 2.
"""

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .clip_loop import num_clips
from .preprocessing.audio import SAMPLE_RATE, AudioError, load_audio, num_video_frames
from .preprocessing.face import FaceAnalyzer, FaceError
from .preprocessing.image import MAX_PIXELS, ImageError, frame_portrait, load_image
from .settings import DEFAULTS


logger = logging.getLogger(__name__)

DEFAULT_MAX_LAG = 5  # frames: 200 ms at 25 fps either way
CLIP_LENGTH = 49  # frames per clip of the released model (architecture 7.2)
MIN_FRAMES = 2  # a single decoded frame is a still image, not a video
MAX_CHANCE_SHIFTS = 200

# face-mesh landmarks (mediapipe's 478-point mesh)
INNER_LIP_TOP, INNER_LIP_BOTTOM = 13, 14
OUTER_EYE_CORNERS = (33, 263)
# points that a talking mouth or a blink does not move: eye corners, nose bridge and tip, the sides of the face
STABLE_POINTS = [33, 133, 362, 263, 168, 6, 197, 195, 5, 4, 1, 234, 454, 10]

# SSIM as Wang et al. (2004) define it: an 11x11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, on 8-bit values
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_C1, SSIM_C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


class VideoError(ValueError):
    """The video input breaks a rule; the message names the file and the rule."""


# ---------------------------------------------------------------------------------------------------------------------
# Measures on plain arrays


def speech_envelope(waveform: np.ndarray, num_frames: int, fps: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """[num_frames] RMS of the samples of each video frame (frame i covers [i / fps, (i + 1) / fps)), smoothed with a
    centred [1, 2, 1] / 4 filter; frames past the end of the audio are silent. The mouth follows the loudness of
    speech over tens of milliseconds, not each pitch period, so the envelope is what lip motion is compared with."""
    edges = np.round(np.arange(num_frames + 1) * sample_rate / fps).astype(np.int64)
    squared = np.concatenate([[0.0], np.cumsum(np.asarray(waveform, dtype=np.float64) ** 2)])
    starts, ends = np.minimum(edges[:-1], len(waveform)), np.minimum(edges[1:], len(waveform))
    energy = squared[ends] - squared[starts]
    rms = np.sqrt(np.maximum(energy, 0) / np.maximum(edges[1:] - edges[:-1], 1))
    padded = np.pad(rms, 1, mode="edge")
    return (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4


def lip_aperture(landmarks: np.ndarray) -> float:
    """Inner-lip opening over the outer eye-corner distance: a size-free mouth opening from [478, 2] landmarks."""
    eye_distance = float(np.linalg.norm(landmarks[OUTER_EYE_CORNERS[0]] - landmarks[OUTER_EYE_CORNERS[1]]))
    return float(np.linalg.norm(landmarks[INNER_LIP_TOP] - landmarks[INNER_LIP_BOTTOM])) / max(eye_distance, 1e-6)


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two equal-length series; None when either is constant or shorter than 3."""
    if len(a) < 3:
        return None
    a, b = a - a.mean(), b - b.mean()
    scale = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / scale) if scale > 0 else None


def lagged_correlations(aperture: np.ndarray, envelope: np.ndarray, max_lag: int) -> dict[int, float | None]:
    """lag -> Pearson r of aperture[i] with envelope[i - lag] over the frames where both exist and a face was found
    (aperture NaN where none was). A positive lag means the mouth moves `lag` frames after the sound."""
    result: dict[int, float | None] = {}
    for lag in range(-max_lag, max_lag + 1):
        index = np.arange(len(aperture))
        source = index - lag
        valid = (source >= 0) & (source < len(envelope)) & np.isfinite(aperture)
        result[lag] = pearson(aperture[valid], envelope[source[valid]])
    return result


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


def best_lag(by_lag: dict[int, float | None]) -> tuple[int, float] | None:
    """(lag, r) of the highest correlation (ties: the smallest delay); None when none could be computed."""
    scored = [(lag, r) for lag, r in by_lag.items() if r is not None]
    return max(scored, key=lambda item: (item[1], -abs(item[0]))) if scored else None


def chance_correlation(aperture: np.ndarray, envelope: np.ndarray, max_lag: int, fps: float) -> float | None:
    """The best-lag correlation this video gets from speech that has nothing to do with it: the 95th percentile over
    the envelope rotated by every shift of at least a second either way (up to `MAX_CHANCE_SHIFTS` of them, evenly
    spread). Speech envelopes are smooth, so on a few seconds unrelated speech can reach r = 0.5 at its best lag; a
    lip-sync figure means something only well above this. None for videos shorter than 2 s + 10 frames."""
    margin = math.ceil(fps)
    shifts = np.arange(margin, len(envelope) - margin + 1)
    if len(shifts) < 10:
        return None
    shifts = shifts[np.linspace(0, len(shifts) - 1, min(len(shifts), MAX_CHANCE_SHIFTS)).round().astype(int)]
    values = []
    for shift in shifts:
        best = best_lag(lagged_correlations(aperture, np.roll(envelope, shift), max_lag))
        if best is not None:
            values.append(best[1])
    return float(np.percentile(values, 95)) if values else None


def ssim(image: np.ndarray, reference: np.ndarray) -> float:
    """Mean structural similarity of two equal-size grayscale images (values 0..255), Gaussian-weighted as in Wang et
    al. (2004); the border where the window does not fit is left out (as scikit-image does)."""
    x, y = image.astype(np.float64), reference.astype(np.float64)

    def blur(values: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(values, (SSIM_WINDOW, SSIM_WINDOW), SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y, cov = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2, blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    )
    pad = SSIM_WINDOW // 2
    return float(ssim_map[pad:-pad, pad:-pad].mean())


def join_continuity(differences: np.ndarray, stride: int) -> dict:
    """Frame differences where clips join against those inside clips.

    Args:
        differences: [N - 1], entry i the mean absolute difference between frames i and i + 1.
        stride: new frames per clip (`clip_length - motion_frames`); clip k's first frame is frame k * stride.
    """
    joins = np.arange(stride, len(differences) + 1, stride) - 1  # the difference into each later clip's first frame
    inside = np.setdiff1d(np.arange(len(differences)), joins)
    if len(joins) == 0 or len(inside) == 0:
        return {"stride": stride, "joins": 0, "join_difference": None, "inside_difference": None, "ratio": None}
    inside_mean = float(differences[inside].mean())
    join_values = differences[joins]
    return {
        "stride": stride,
        "joins": int(len(joins)),
        "join_difference": float(join_values.mean()),
        "inside_difference": inside_mean,
        "ratio": float(join_values.mean() / max(inside_mean, 1e-6)),
        "worst_join": int(joins[int(np.argmax(join_values))] + 1),
        "worst_ratio": float(join_values.max() / max(inside_mean, 1e-6)),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Files


class VideoFrames:
    """A video's size, rate and audio presence, and its frames as uint8 [H, W, 3] decoded one at a time (memory does
    not grow with the length). Raises `VideoError` for a missing or undecodable file. Use as a context manager: the
    decoder stops on exit."""

    def __init__(self, path: Path):
        import imageio_ffmpeg

        self.path = path
        if not path.is_file():
            raise VideoError(f"video {path}: no such file.")
        self._reader = imageio_ffmpeg.read_frames(str(path))
        try:
            meta = next(self._reader)
        except (OSError, RuntimeError, StopIteration):
            self.close()
            raise VideoError(f"video {path}: not a readable video file.") from None
        self.width, self.height = (int(v) for v in meta.get("size", (0, 0)))
        self.fps = float(meta.get("fps") or 0)
        self.has_audio = bool(meta.get("audio_codec"))
        if self.width <= 0 or self.height <= 0 or self.width * self.height > MAX_PIXELS:
            self.close()
            raise VideoError(f"video {path}: {self.width}x{self.height} frames; 1..{MAX_PIXELS:,} pixels expected.")
        if not math.isfinite(self.fps) or self.fps <= 0:
            self.close()
            raise VideoError(f"video {path}: no frame rate ({self.fps}).")

    def __iter__(self) -> Iterator[np.ndarray]:
        try:
            for data in self._reader:
                yield np.frombuffer(data, dtype=np.uint8).reshape(self.height, self.width, 3)
        except (OSError, RuntimeError) as error:
            raise VideoError(f"video {self.path}: decoding failed ({str(error).splitlines()[0]}).") from None

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "VideoFrames":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def framed_portrait(image: Image.Image, face_box, width: int, height: int) -> Image.Image:
    """The portrait as the video shows it: resized when the aspects agree (a square portrait gives a square video),
    otherwise framed to the video's size around the face as the pipeline frames it (`frame_portrait`)."""
    if abs(image.width / image.height - width / height) < 0.01:
        return image.resize((width, height), Image.BILINEAR)
    (framed,), _ = frame_portrait(image, face_box, width, height)
    return framed


def _atomic_write(path: Path, text: str) -> None:
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as file:
        file.write(text)
    umask = os.umask(0)
    os.umask(umask)
    Path(temp).chmod(0o666 & ~umask)
    Path(temp).replace(path)


# ---------------------------------------------------------------------------------------------------------------------
# The evaluation


@dataclass
class Evaluation:
    """What `evaluate` measured; `asdict` of it is the JSON report."""

    video: str
    width: int
    height: int
    fps: float
    num_frames: int
    audio_seconds: float
    expected_frames: int  # ceil(audio seconds x fps)
    face_found: float  # fraction of frames with a face
    lip_sync: float | None  # Pearson r at the best lag
    lip_sync_lag: int | None  # frames; > 0: the mouth follows the sound
    lip_sync_at_zero_lag: float | None
    lip_sync_chance: float | None  # what unrelated speech reaches on this video (`chance_correlation`)
    max_lag: int
    ssim: float | None  # mean over the frames with a face
    ssim_min: float | None
    arcface_cosine: float | None  # mean over the frames with a face; None without ArcFace
    arcface_note: str
    continuity: dict = field(default_factory=dict)
    correlation_by_lag: dict[int, float | None] = field(default_factory=dict)
    aperture: list[float | None] = field(default_factory=list)  # per frame; None without a face

    @property
    def frame_count_ok(self) -> bool:
        return self.num_frames == self.expected_frames

    def to_json(self) -> dict:
        return {**asdict(self), "frame_count_ok": self.frame_count_ok}


def evaluate(
    video: Path,
    image: Path,
    audio: Path | None = None,
    face_analysis: Path | None = None,
    max_lag: int = DEFAULT_MAX_LAG,
    clip_length: int = CLIP_LENGTH,
    motion_frames: int = DEFAULTS.motion_frames,
    analyzer: FaceAnalyzer | None = None,
) -> Evaluation:
    """Measure `video` against the portrait `image` and the speech `audio` (default: the video's own audio track).

    Raises `VideoError`, `ImageError`, `FaceError` or `AudioError` naming the input and the rule.
    """
    if max_lag < 0:
        raise ValueError(f"`max_lag` must be >= 0, got {max_lag}.")
    if not 0 <= motion_frames < clip_length:
        raise ValueError(f"`motion_frames` must be in 0..clip_length - 1, got {motion_frames} for {clip_length}.")
    with VideoFrames(Path(video)) as video_frames:
        if audio is None and not video_frames.has_audio:
            raise VideoError(f"video {video}: no audio track; pass the speech with --audio.")
        waveform = load_audio(audio if audio is not None else video, name=str(audio or f"the audio track of {video}"))
        portrait = load_image(image)
        analyzer = analyzer or FaceAnalyzer(face_analysis, min_face_size=1)
        original = analyzer.analyze(portrait, name=f"image {image}")
        width, height, fps = video_frames.width, video_frames.height, video_frames.fps
        framed = framed_portrait(portrait, original.box, width, height)
        reference = analyzer.analyze(framed, name=f"image {image} framed to {width}x{height}")
        has_arcface = original.embedding_source.startswith("insightface")
        reference_gray = np.asarray(framed.convert("L"))
        x0, y0, x1, y1 = (int(round(v)) for v in reference.box)
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
        reference_face = reference_gray[y0:y1, x0:x1]
        reference_points = reference.landmarks[STABLE_POINTS].astype(np.float32)

        apertures: list[float] = []
        similarities: list[float] = []
        cosines: list[float] = []
        differences: list[float] = []
        previous: np.ndarray | None = None
        for frame in video_frames:
            gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float32)
            if previous is not None:
                differences.append(float(np.abs(gray - previous).mean()))
            previous = gray
            try:
                face = analyzer.analyze(Image.fromarray(frame), name="frame")
            except FaceError:
                apertures.append(math.nan)
                continue
            apertures.append(lip_aperture(face.landmarks))
            # the frame's face moved onto the portrait's by the similarity transform of points speech does not move
            transform, _ = cv2.estimateAffinePartial2D(
                face.landmarks[STABLE_POINTS].astype(np.float32), reference_points, method=cv2.LMEDS
            )
            if transform is not None and reference_face.size:
                aligned = cv2.warpAffine(gray, transform, (width, height), flags=cv2.INTER_LINEAR)
                similarities.append(ssim(aligned[y0:y1, x0:x1], reference_face))
            if has_arcface and np.any(face.embedding):
                cosines.append(cosine(face.embedding, original.embedding))
    num_frames = len(apertures)
    if num_frames < MIN_FRAMES:
        raise VideoError(f"video {video}: {num_frames} frame(s); at least {MIN_FRAMES} are needed.")

    aperture = np.array(apertures)
    envelope = speech_envelope(waveform, num_frames, fps)
    by_lag = lagged_correlations(aperture, envelope, max_lag)
    best = best_lag(by_lag)
    return Evaluation(
        video=str(video),
        width=width,
        height=height,
        fps=fps,
        num_frames=num_frames,
        audio_seconds=round(len(waveform) / SAMPLE_RATE, 4),
        expected_frames=num_video_frames(len(waveform), round(fps)),
        face_found=float(np.isfinite(aperture).mean()),
        lip_sync=None if best is None else best[1],
        lip_sync_lag=None if best is None else best[0],
        lip_sync_at_zero_lag=by_lag[0],
        lip_sync_chance=chance_correlation(aperture, envelope, max_lag, fps),
        max_lag=max_lag,
        ssim=float(np.mean(similarities)) if similarities else None,
        ssim_min=float(np.min(similarities)) if similarities else None,
        arcface_cosine=float(np.mean(cosines)) if cosines else None,
        arcface_note=original.embedding_source if has_arcface else f"skipped: {original.embedding_source}",
        continuity={
            **join_continuity(np.array(differences), clip_length - motion_frames),
            "clips": num_clips(num_frames, clip_length, motion_frames),
        },
        correlation_by_lag=by_lag,
        aperture=[float(value) if np.isfinite(value) else None for value in aperture],
    )


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_table(result: Evaluation) -> str:
    """The evaluation as a two-column text table."""
    joins = result.continuity
    if joins.get("joins"):
        continuity = (
            f"{joins['joins']} join(s) every {joins['stride']} frames: mean |diff| {joins['join_difference']:.2f} at "
            f"joins vs {joins['inside_difference']:.2f} inside (x{joins['ratio']:.2f}; worst x{joins['worst_ratio']:.2f}"
            f" into frame {joins['worst_join']})"
        )
    else:
        continuity = f"no join (one clip of {joins['stride']} new frames covers the video)"
    lag_ms = None if result.lip_sync_lag is None else 1000 * result.lip_sync_lag / result.fps
    rows = [
        ("video", f"{result.video} ({result.width}x{result.height}, {result.fps:g} fps)"),
        (
            "frames",
            f"{result.num_frames}, expected {result.expected_frames} = ceil({result.audio_seconds:.2f} s x "
            f"{round(result.fps)}): {'ok' if result.frame_count_ok else 'MISMATCH'}",
        ),
        ("face found", f"{result.face_found:.3f} of the frames"),
        (
            "lip sync",
            f"r = {_number(result.lip_sync)} at lag {result.lip_sync_lag} frames"
            + (f" ({lag_ms:+.0f} ms)" if lag_ms is not None else "")
            + f"; r = {_number(result.lip_sync_at_zero_lag)} at lag 0; searched +-{result.max_lag}",
        ),
        ("lip sync by chance", f"r = {_number(result.lip_sync_chance)} (unrelated speech, 95th percentile)"),
        ("identity SSIM", f"{_number(result.ssim)} mean, {_number(result.ssim_min)} min (aligned face region)"),
        ("identity ArcFace", f"{_number(result.arcface_cosine)} ({result.arcface_note})"),
        ("clip joins", continuity),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hallo3.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--video", type=Path, required=True, help="the mp4 to measure")
    parser.add_argument("--image", type=Path, required=True, help="the portrait the video animates")
    parser.add_argument("--audio", type=Path, default=None, help="the speech (default: the video's audio track)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    parser.add_argument("--face-analysis", type=Path, default=None, help="official face_analysis folder (ArcFace)")
    parser.add_argument("--max-lag", type=int, default=DEFAULT_MAX_LAG, help="lip-sync lags searched, in frames")
    parser.add_argument("--clip-length", type=int, default=CLIP_LENGTH, help="frames per clip of the clip loop")
    parser.add_argument(
        "--motion-frames", type=int, default=DEFAULTS.motion_frames, help="frames each clip takes from the previous"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if not 0 <= args.max_lag <= 250:
        print(f"error: --max-lag must be 0..250 frames, got {args.max_lag}.", file=sys.stderr)
        return 2
    if not 1 <= args.clip_length or not 0 <= args.motion_frames < args.clip_length:
        print(
            f"error: --motion-frames must be 0..--clip-length - 1, got {args.motion_frames} for {args.clip_length}.",
            file=sys.stderr,
        )
        return 2
    if args.json is not None:
        if args.json.exists() and not args.overwrite:
            print(f"error: --json {args.json}: the file exists; pass --overwrite to replace it.", file=sys.stderr)
            return 2
        if not args.json.parent.is_dir():
            print(f"error: --json {args.json}: no such folder {args.json.parent}.", file=sys.stderr)
            return 2
    try:
        result = evaluate(
            args.video,
            args.image,
            args.audio,
            args.face_analysis,
            args.max_lag,
            args.clip_length,
            args.motion_frames,
        )
    except (VideoError, ImageError, FaceError, AudioError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json is not None:
        _atomic_write(args.json, json.dumps(result.to_json(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
