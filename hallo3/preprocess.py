"""Show how a portrait is framed and masked, without loading the model.

    python -m hallo3.preprocess --image IMG [--audio AUDIO] --output-dir DIR [--face-analysis DIR]
        [--vocal-separator DIR] [--width 720 --height 480]

Writes into DIR, all in the model's frame (the photo whole between black bars, as the video is made):
- `portrait.png`: the frame the VAE sees (the model's width x height);
- `face_mask.png`: the official face mask in that frame (white = face region), so it overlays `portrait.png`;
- `face.json`: the framing: `image_size` (the photo after its EXIF rotation), `frame_size` (the model's),
  `photo_in_frame` ([x0, y0, x1, y1], where the resized photo sits), `padding` (the black bars), `output_size` (the
  video's, the photo's place cropped back out of each frame); `mask_box` (the face mask region as the official code
  computes it, in the photo's pixels) and `frame_mask_box` (the same region in the frame: the white of
  `face_mask.png`); the silhouette `face_box` (photo's pixels); the detector; where the identity embedding came from;
  with `--audio`, the duration and whether vocals were separated.

A bad input gets a one-line message naming the input and the rule, and exit code 2.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .preprocessing.audio import SAMPLE_RATE, AudioError, load_audio, vocals_for_wav2vec
from .preprocessing.face import FaceAnalyzer, FaceError, apply_mask, face_mask
from .preprocessing.image import ImageError, frame_portrait, load_image


logger = logging.getLogger(__name__)


def preprocess(
    image_path: Path,
    output_dir: Path,
    audio_path: Path | None = None,
    face_analysis: Path | None = None,
    vocal_separator: Path | None = None,
    width: int = 720,
    height: int = 480,
) -> dict:
    """Frame and mask `image_path` as inference does; write the three files into `output_dir`; return face.json."""
    image = load_image(image_path)
    face = FaceAnalyzer(face_analysis).analyze(image, name=f"image {image_path}")
    masked = apply_mask(image, face_mask(image.size, face.box))
    (framed, _), framing = frame_portrait(image, face.mask_box, width, height, extra_images=(masked,))
    frame_mask_box = [round(v) for v in framing.to_frame(face.mask_box)]
    report: dict = {
        "image": str(image_path),
        **framing.report(),
        "mask_box": list(face.mask_box),
        "frame_mask_box": frame_mask_box,
        "face_box": list(face.box),
        "num_faces": face.num_faces,
        "detector": face.detector,
        "embedding_source": face.embedding_source,
    }
    if audio_path is not None:
        waveform = load_audio(audio_path)
        _, separation = vocals_for_wav2vec(audio_path, waveform, vocal_separator)
        report["audio"] = {
            "path": str(audio_path),
            "duration_s": round(len(waveform) / SAMPLE_RATE, 3),
            "vocal_separation": separation.startswith("separated"),
            "vocal_separation_note": separation,
        }
    output_dir.mkdir(parents=True, exist_ok=True)
    framed.save(output_dir / "portrait.png")
    box_mask(framed.size, frame_mask_box).save(output_dir / "face_mask.png")
    (output_dir / "face.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def box_mask(size: tuple[int, int], box: list[int]) -> Image.Image:
    """A `size` mask (mode "L") white inside `box` [x0, y0, x1, y1], black elsewhere."""
    width, height = size
    x0, y0, x1, y1 = box
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[max(0, y0) : max(0, y1), max(0, x0) : max(0, x1)] = 255
    return Image.fromarray(mask)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hallo3.preprocess", description=__doc__.split("\n")[0])
    parser.add_argument("--image", type=Path, required=True, help="portrait image")
    parser.add_argument("--audio", type=Path, default=None, help="speech file: report its duration and separation")
    parser.add_argument(
        "--output-dir", type=Path, required=True, help="where portrait.png, face_mask.png and face.json go"
    )
    parser.add_argument("--face-analysis", type=Path, default=None, help="official face_analysis folder")
    parser.add_argument("--vocal-separator", type=Path, default=None, help="official audio_separator folder")
    parser.add_argument("--width", type=int, default=720, help="the model's frame width")
    parser.add_argument("--height", type=int, default=480, help="the model's frame height")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.width <= 0 or args.height <= 0:
        print(f"error: --width and --height must be positive, got {args.width}x{args.height}.", file=sys.stderr)
        return 2
    try:
        report = preprocess(
            args.image, args.output_dir, args.audio, args.face_analysis, args.vocal_separator, args.width, args.height
        )
    except (ImageError, FaceError, AudioError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = ("mask_box", "frame_mask_box", "output_size", "detector", "embedding_source")
    print(json.dumps({key: report[key] for key in summary}))
    logger.info("Wrote portrait.png, face_mask.png and face.json to %s", args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
