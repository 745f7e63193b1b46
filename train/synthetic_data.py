"""Synthetic talking-head videos made from a real face photo: the smoke-training data set and the tests' data.

    python -m train.synthetic_data --output runs/tiny-raw [--photos assets/examples/0001.jpg ...] [--seconds 3.2]
        [--face-box X0 Y0 X1 Y1]

The face moves by a small random affine jitter and its mouth region darkens with the audio envelope, so the clips
have head and lip motion tied to the sound. Speech comes from espeak-ng when installed, else a modulated tone.
Writes `videos/*.mp4` (with audio) and `captions/*.txt`.

The face box of each photo is known, not detected (`KNOWN_FACE_BOXES`, or `--face-box` for other photos), so the
videos are the same on every machine, and `RecordedFaces` answers face detection on them from that record: tests of
data preparation never depend on a detector's borderline answer on synthetic frames.
"""

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageEnhance

from hallo3.preprocessing.audio import load_audio
from hallo3.preprocessing.face import EMBEDDING_DIM
from hallo3.video_io import VideoWriter


FaceBox = tuple[float, float, float, float]

# The face of each example photo as fractions (x0, y0, x1, y1) of its width and height, measured once (OpenCV's
# frontal cascade on the 240 px version) and written down.
KNOWN_FACE_BOXES: dict[str, FaceBox] = {
    "0001.jpg": (0.3125, 0.129, 0.6375, 0.454),
    "0008.jpg": (0.217, 0.221, 0.779, 0.783),
}


@dataclass
class SyntheticVideo:
    """What `talking_video` drew: the unjittered frame and its face box in pixels (None: no face)."""

    path: Path
    base: Image.Image
    face_box: FaceBox | None


def portrait(photo: Path | None, size: int, face_box: FaceBox | None = None) -> tuple[Image.Image, FaceBox | None]:
    """The `size` x `size` frame drawn for `photo` and its face box in pixels; a plain wall when `photo` is None.

    `face_box` (fractions of the photo) is needed for photos that are not in `KNOWN_FACE_BOXES`.
    """
    if photo is None:
        return Image.fromarray(np.full((size, size, 3), 120, dtype=np.uint8)), None
    fractions = face_box or KNOWN_FACE_BOXES.get(Path(photo).name)
    if fractions is None:
        raise ValueError(f"{photo}: no known face box; pass `face_box` (--face-box X0 Y0 X1 Y1, fractions).")
    x0, y0, x1, y1 = fractions
    return Image.open(photo).convert("RGB").resize((size, size)), (x0 * size, y0 * size, x1 * size, y1 * size)


def speech(path: Path, seconds: float, text: str = "Hello there, this is a short test of the talking head.") -> Path:
    if shutil.which("espeak-ng"):
        raw = path.with_suffix(".espeak.wav")
        subprocess.run(["espeak-ng", "-w", str(raw), "-s", "150", text], check=True, capture_output=True)
        waveform = load_audio(raw)
        raw.unlink()
    else:
        t = np.arange(int(16000 * seconds)) / 16000
        waveform = (0.3 * np.sin(2 * np.pi * 160 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)
    waveform = np.resize(waveform, int(16000 * seconds))  # loop or cut to the length asked for
    soundfile.write(path, waveform, 16000)
    return path


def talking_video(
    path: Path,
    photo: Path | None,
    seconds: float,
    size: int = 240,
    moving: bool = True,
    seed: int = 0,
    face_box: FaceBox | None = None,
) -> SyntheticVideo:
    """An mp4 with audio: `photo` jittered with a mouth that follows the audio envelope (no face if photo is None)."""
    rng = np.random.default_rng(seed)
    audio = speech(path.with_suffix(".wav"), seconds)
    waveform = load_audio(audio)
    num_frames = int(round(seconds * 25))
    envelope = np.array([np.abs(waveform[i * 640 : (i + 1) * 640]).mean() for i in range(num_frames)])
    envelope = envelope / max(envelope.max(), 1e-6)
    base, box = portrait(photo, size, face_box)
    mouth = None
    if box is not None:
        x0, y0, x1, y1 = box
        mouth = (
            int(x0 + 0.3 * (x1 - x0)),
            int(y0 + 0.68 * (y1 - y0)),
            int(x0 + 0.7 * (x1 - x0)),
            int(y0 + 0.9 * (y1 - y0)),
        )
    with VideoWriter(path, audio_path=audio) as writer:
        for i in range(num_frames):
            frame = base.copy()
            if moving and mouth is not None:
                region = frame.crop(mouth)
                frame.paste(ImageEnhance.Brightness(region).enhance(1 - 0.6 * envelope[i]), mouth[:2])
                dx, dy, angle = rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(-2, 2)
                frame = frame.rotate(angle, translate=(dx, dy), resample=Image.BILINEAR, fillcolor=(0, 0, 0))
            writer.write(np.asarray(frame)[None])
    audio.unlink()
    return SyntheticVideo(path, base, box)


class RecordedFaces:
    """Face detection on synthetic frames answered from what `talking_video` drew, not by a detector.

    A frame is matched to the nearest drawn base image (mean absolute difference: the jitter and the mouth change a
    frame far less than a different photo or the wall does) and gets that base's face box, or no face for the wall.
    Each base has its own fixed embedding, so identities differ. Same interface as `FaceAnalyzer.detect`.
    """

    def __init__(self, videos: list[SyntheticVideo]):
        self.records: list[tuple[np.ndarray, FaceBox | None, np.ndarray]] = []
        for index, video in enumerate(videos):
            embedding = np.random.default_rng(index).standard_normal(EMBEDDING_DIM).astype(np.float32)
            self.records.append((np.asarray(video.base, dtype=np.float32), video.face_box, embedding))

    @classmethod
    def for_photos(cls, photos: list[Path | None], size: int = 240) -> "RecordedFaces":
        """The record of videos made by `talking_video(..., photo, size=size)` for each of `photos`."""
        return cls([SyntheticVideo(Path(), *portrait(photo, size)) for photo in photos])

    def detect(self, image: Image.Image) -> list[tuple[FaceBox, np.ndarray]]:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        matching = [record for record in self.records if record[0].shape == pixels.shape]
        if not matching:
            raise ValueError(f"a {image.size} frame matches no recorded synthetic video")
        _, box, embedding = min(matching, key=lambda record: float(np.abs(record[0] - pixels).mean()))
        return [] if box is None else [(box, embedding)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument(
        "--photos", type=Path, nargs="+", default=[Path("assets/examples/0001.jpg"), Path("assets/examples/0008.jpg")]
    )
    parser.add_argument("--seconds", type=float, default=3.2)
    parser.add_argument(
        "--face-box", type=float, nargs=4, default=None, help="face box as fractions, for photos not in the table"
    )
    args = parser.parse_args(argv)
    (args.output / "videos").mkdir(parents=True, exist_ok=True)
    (args.output / "captions").mkdir(parents=True, exist_ok=True)
    for seed, photo in enumerate(args.photos):
        face_box = tuple(args.face_box) if args.face_box else None
        try:
            talking_video(
                args.output / "videos" / f"{photo.stem}.mp4", photo, args.seconds, seed=seed, face_box=face_box
            )
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        (args.output / "captions" / f"{photo.stem}.txt").write_text("a person talking to the camera")
    print(f"wrote {len(args.photos)} videos to {args.output / 'videos'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
