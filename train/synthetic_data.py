"""Synthetic talking-head videos made from a real face photo: the smoke-training data set and the tests' data.

    python -m train.synthetic_data --output runs/tiny-raw [--photos assets/examples/0001.jpg ...] [--seconds 3.2]

The face moves by a small random affine jitter and its mouth region darkens with the audio envelope, so the clips
have head and lip motion tied to the sound. Speech comes from espeak-ng when installed, else a modulated tone.
Writes `videos/*.mp4` (with audio) and `captions/*.txt`.
"""

import argparse
import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageEnhance

from hallo3.preprocessing.audio import load_audio
from hallo3.preprocessing.face import FaceAnalyzer
from hallo3.video_io import VideoWriter


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
    path: Path, photo: Path | None, seconds: float, size: int = 240, moving: bool = True, seed: int = 0
) -> Path:
    """An mp4 with audio: `photo` jittered with a mouth that follows the audio envelope (no face if photo is None)."""
    rng = np.random.default_rng(seed)
    audio = speech(path.with_suffix(".wav"), seconds)
    waveform = load_audio(audio)
    num_frames = int(round(seconds * 25))
    envelope = np.array([np.abs(waveform[i * 640 : (i + 1) * 640]).mean() for i in range(num_frames)])
    envelope = envelope / max(envelope.max(), 1e-6)
    if photo is None:
        base = Image.fromarray(np.full((size, size, 3), 120, dtype=np.uint8))
        mouth = None
    else:
        base = Image.open(photo).convert("RGB").resize((size, size))
        x0, y0, x1, y1 = FaceAnalyzer().analyze(base).box
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
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument(
        "--photos", type=Path, nargs="+", default=[Path("assets/examples/0001.jpg"), Path("assets/examples/0008.jpg")]
    )
    parser.add_argument("--seconds", type=float, default=3.2)
    args = parser.parse_args(argv)
    (args.output / "videos").mkdir(parents=True, exist_ok=True)
    (args.output / "captions").mkdir(parents=True, exist_ok=True)
    for seed, photo in enumerate(args.photos):
        talking_video(args.output / "videos" / f"{photo.stem}.mp4", photo, args.seconds, seed=seed)
        (args.output / "captions" / f"{photo.stem}.txt").write_text("a person talking to the camera")
    print(f"wrote {len(args.photos)} videos to {args.output / 'videos'}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
