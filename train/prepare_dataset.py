"""Talking-head videos -> a training set for both Hallo3 stages, with a report of why each dropped video was dropped.

    python -m train.prepare_dataset --videos DIR --captions DIR --output DIR [--rank R --world-size W]
        [--face-analysis DIR] [--wav2vec MODEL] [--t5 MODEL] [--vocal-separator DIR]

Per video (architecture 8.2): frames at 25 fps and audio at 16 kHz (ffmpeg), then the filters below, then the face
embedding, the union face mask and the wav2vec2 features (the same `hallo3.preprocessing` code as inference), and
optionally the T5 embedding of the caption (`--t5`) and the VAE posterior of fixed 49-frame windows at the training
resolution (`--vae`, stored as mean and log-variance so that training still samples it). Kept clips land in
`OUTPUT/clips/<name>/`; `metadata*.jsonl` lists them and `report*.jsonl` says, for every video, kept or dropped and
why (the official pipeline dropped videos silently).
A rerun skips videos already decided. `--rank/--world-size` split the videos between parallel workers; each writes
its own metadata and report shard.

Filters, all measured on `--sample-frames` frames spread over the video:
- duration between `--min-seconds` and `--max-seconds`;
- exactly one face in every sampled frame;
- face at least `--min-face` px, and sharp: variance of the Laplacian of the face crop >= `--min-sharpness`;
- motion: mean absolute change of the face region between consecutive frames >= `--min-motion` (static clips go).
"""

import argparse
import json
import logging
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from hallo3.encoding import encode_text, posterior_parameters, vae_posterior
from hallo3.preprocessing.audio import AudioEncoder, AudioError, ffmpeg_exe, load_audio, separate_vocals
from hallo3.preprocessing.face import FaceAnalyzer


logger = logging.getLogger("train.prepare_dataset")

FPS = 25
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")


@dataclass
class Filters:
    min_seconds: float = 2.5  # a 49-frame training clip plus the stage-2 margins needs 52 frames
    max_seconds: float = 120.0
    sample_frames: int = 8
    min_face: int = 64
    min_sharpness: float = 20.0
    min_motion: float = 1.0  # mean absolute change of face pixels per frame, 0..255


@dataclass
class Decision:
    video: str
    kept: bool
    reason: str = ""
    metrics: dict = field(default_factory=dict)


class Dropped(Exception):
    """A filter rejected the video; the message is the reason written to the report."""


FaceBox = tuple[float, float, float, float]


class FaceDetector(Protocol):
    """Where the face filters get their answer: `FaceAnalyzer` (insightface or OpenCV), or in tests a scripted
    stand-in such as `train.synthetic_data.RecordedFaces`."""

    def detect(self, image: Image.Image) -> list[tuple[FaceBox, np.ndarray]]:
        """Every face of `image` as (box (x0, y0, x1, y1) in pixels, embedding [512])."""
        ...


def extract(video: Path, workdir: Path) -> tuple[Path, Path]:
    """25-fps frames (PNG) and 16 kHz mono audio of `video` into `workdir`."""
    frames = workdir / "frames"
    frames.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-y", "-i", str(video), "-vf", f"fps={FPS}", str(frames / "%05d.png")],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise Dropped(
            f"unreadable video ({result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'ffmpeg failed'})"
        )
    audio = workdir / "audio.wav"
    result = subprocess.run(
        [
            ffmpeg_exe(),
            "-v",
            "error",
            "-y",
            "-i",
            str(video),
            "-vn",
            "-ac",
            "1",
            "-ar",
            "16000",
            "-c:a",
            "pcm_s16le",
            str(audio),
        ],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 or not audio.is_file() or audio.stat().st_size < 1000:
        raise Dropped("no audio track")
    return frames, audio


def face_box_union(boxes: list[FaceBox], size: tuple[int, int]) -> tuple[int, int, int, int]:
    x0 = max(0, int(min(b[0] for b in boxes)))
    y0 = max(0, int(min(b[1] for b in boxes)))
    x1 = min(size[0], int(np.ceil(max(b[2] for b in boxes))))
    y1 = min(size[1], int(np.ceil(max(b[3] for b in boxes))))
    return x0, y0, x1, y1


def laplacian_variance(gray: np.ndarray) -> float:
    import cv2

    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def check_frames(
    frame_paths: list[Path], analyzer: FaceDetector, filters: Filters
) -> tuple[dict, tuple[np.ndarray, list[FaceBox]]]:
    """Apply the face and motion filters; returns (metrics, (the first sampled face's embedding, every face box))."""
    indices = np.linspace(0, len(frame_paths) - 2, filters.sample_frames).round().astype(int)
    boxes: list[FaceBox] = []
    sharpness: list[float] = []
    motion: list[float] = []
    embedding: np.ndarray | None = None
    for index in indices:
        frame = Image.open(frame_paths[index]).convert("RGB")
        faces = analyzer.detect(frame)
        if len(faces) != 1:
            raise Dropped(f"{len(faces)} faces in frame {index} (exactly one is needed)")
        box, face_embedding = faces[0]
        if embedding is None:
            embedding = face_embedding
        side = min(box[2] - box[0], box[3] - box[1])
        if side < filters.min_face:
            raise Dropped(f"face {side:.0f} px in frame {index} (at least {filters.min_face} px)")
        crop = np.asarray(frame.convert("L").crop(tuple(int(v) for v in box)), dtype=np.uint8)
        sharpness.append(laplacian_variance(crop))
        following = Image.open(frame_paths[index + 1]).convert("L").crop(tuple(int(v) for v in box))
        motion.append(float(np.abs(np.asarray(following, dtype=np.float32) - crop.astype(np.float32)).mean()))
        boxes.append(box)
    assert embedding is not None  # sample_frames >= 1 and every sampled frame has one face
    metrics = {"sharpness": round(float(np.median(sharpness)), 2), "motion": round(float(np.mean(motion)), 3)}
    if metrics["sharpness"] < filters.min_sharpness:
        raise Dropped(f"blurry face (Laplacian variance {metrics['sharpness']} < {filters.min_sharpness})")
    if metrics["motion"] < filters.min_motion:
        raise Dropped(f"static clip (motion {metrics['motion']} < {filters.min_motion})")
    return metrics, (embedding, boxes)


def window_posteriors(
    clip_dir: Path, num_frames: int, vae, size: tuple[int, int], clip_length: int = 49, margin: int = 2
) -> dict:
    """VAE posterior parameters [n, T, 2C, h, w] (fp16) of the windows starting at margin, margin + 49, ...; the
    frames are framed exactly as the training dataset frames them."""
    from .dataset import frame_path, frame_to_tensor

    starts = list(range(margin, num_frames - clip_length - margin + 1, clip_length))
    parameters = []
    for start in starts:
        frames = torch.stack([frame_to_tensor(frame_path(clip_dir, start + i), *size) for i in range(clip_length)])
        with torch.no_grad():
            posterior = vae_posterior(vae, frames[None])
        parameters.append(posterior_parameters(posterior)[0].half().cpu())
    return {"starts": torch.tensor(starts, dtype=torch.int64), "parameters": torch.stack(parameters)}


def process_video(
    video: Path,
    caption_dir: Path,
    output: Path,
    analyzer: FaceDetector,
    audio_encoder,
    t5,
    filters: Filters,
    separator_dir: Path | None,
    vae=None,
    size: tuple[int, int] = (720, 480),
) -> Decision:
    name = video.stem
    caption_file = caption_dir / f"{name}.txt"
    if not caption_file.is_file():
        return Decision(video.name, False, f"no caption {caption_file.name}")
    clip_dir = output / "clips" / name
    workdir = output / "work" / name
    try:
        frames_dir, audio_path = extract(video, workdir)
        frame_paths = sorted(frames_dir.glob("*.png"))
        seconds = len(frame_paths) / FPS
        if not filters.min_seconds <= seconds <= filters.max_seconds:
            raise Dropped(f"duration {seconds:.2f} s outside [{filters.min_seconds}, {filters.max_seconds}] s")
        metrics, (embedding, boxes) = check_frames(frame_paths, analyzer, filters)
        metrics["seconds"] = round(seconds, 2)

        first = Image.open(frame_paths[0])
        x0, y0, x1, y1 = face_box_union(boxes, first.size)
        mask = np.zeros((first.height, first.width), dtype=np.uint8)
        mask[y0:y1, x0:x1] = 255  # the official union mask: the bounding box of every frame's face box

        vocals = separate_vocals(audio_path, separator_dir)
        waveform = load_audio(vocals or audio_path)
        features, num_frames = audio_encoder(waveform, clip_length=1)
        if abs(num_frames - len(frame_paths)) > 2:
            raise Dropped(f"audio covers {num_frames} frames, the video {len(frame_paths)}")

        clip_dir.mkdir(parents=True, exist_ok=True)
        frames_target = clip_dir / "frames"
        if frames_target.exists():
            shutil.rmtree(frames_target)
        shutil.move(str(frames_dir), frames_target)
        shutil.copy(audio_path, clip_dir / "audio.wav")
        Image.fromarray(mask).save(clip_dir / "face_mask.png")
        tensors = {"audio_emb": features.half(), "face_emb": torch.from_numpy(np.asarray(embedding, dtype=np.float32))}
        caption = caption_file.read_text().strip()
        if t5 is not None:
            tensors["text_emb"] = t5(caption).half()
        save_file({k: v.contiguous() for k, v in tensors.items()}, clip_dir / "features.safetensors")
        if vae is not None:
            save_file(window_posteriors(clip_dir, len(frame_paths), vae, size), clip_dir / "latents.safetensors")
        meta = {
            "name": name,
            "caption": caption,
            "num_frames": min(len(frame_paths), num_frames),
            "width": first.width,
            "height": first.height,
            **metrics,
        }
        (clip_dir / "meta.json").write_text(json.dumps(meta))
        return Decision(video.name, True, "", metrics)
    except Dropped as reason:
        return Decision(video.name, False, str(reason))
    except AudioError as error:
        return Decision(video.name, False, f"audio: {error}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def load_encoders(args):
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

    if args.wav2vec == "tiny-random":
        from hallo3.loading import build_tiny_random_pipeline

        pipe = build_tiny_random_pipeline()
        audio_encoder = AudioEncoder(pipe.audio_encoder, pipe.audio_feature_extractor)
        tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
        max_length = pipe.transformer.config.max_text_seq_length
    else:
        audio_encoder = AudioEncoder(
            Wav2Vec2Model.from_pretrained(args.wav2vec), Wav2Vec2FeatureExtractor.from_pretrained(args.wav2vec)
        )
        tokenizer = text_encoder = None
        max_length = 226
        if args.t5:
            from transformers import AutoTokenizer, T5EncoderModel

            tokenizer = AutoTokenizer.from_pretrained(args.t5, subfolder="tokenizer")
            text_encoder = T5EncoderModel.from_pretrained(
                args.t5, subfolder="text_encoder", torch_dtype=torch.bfloat16
            )
    t5 = None
    if args.t5 and text_encoder is not None:

        @torch.no_grad()
        def t5(caption: str) -> torch.Tensor:
            return encode_text(tokenizer, text_encoder, [caption], max_length, text_encoder.device)[0].float().cpu()

    return audio_encoder, t5


def load_vae(source: str | None):
    """The VAE that precomputes the latents (`--vae`): None, tiny-random, or a CogVideoX repo/folder."""
    if source == "tiny-random":
        from hallo3.loading import build_tiny_random_pipeline

        return build_tiny_random_pipeline().vae
    if source:
        from diffusers import AutoencoderKLCogVideoX

        return AutoencoderKLCogVideoX.from_pretrained(source, subfolder="vae")
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=Path, required=True)
    parser.add_argument("--captions", type=Path, required=True, help="<video stem>.txt per video")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--face-analysis", type=Path, default=None, help="official face_analysis folder (ArcFace)")
    parser.add_argument("--vocal-separator", type=Path, default=None, help="official audio_separator folder")
    parser.add_argument("--wav2vec", default="facebook/wav2vec2-base-960h", help="model id/folder, or tiny-random")
    parser.add_argument(
        "--t5",
        default=None,
        help="CogVideoX repo/folder to precompute caption T5 embeddings (with --wav2vec tiny-random: 'tiny-random')",
    )
    parser.add_argument("--vae", default=None, help="CogVideoX repo/folder (or tiny-random) to precompute latents")
    parser.add_argument("--width", type=int, default=720, help="training width, for --vae")
    parser.add_argument("--height", type=int, default=480, help="training height, for --vae")
    for name, value in asdict(Filters()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    return parser


def main(argv: list[str] | None = None, analyzer: FaceDetector | None = None) -> int:
    """The command line; `analyzer` replaces the face analysis built from `--face-analysis` (tests)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.videos.is_dir():
        print(f"error: --videos {args.videos}: no such folder.", file=sys.stderr)
        return 2
    if not 0 <= args.rank < args.world_size:
        print(f"error: --rank must be in 0..{args.world_size - 1}, got {args.rank}.", file=sys.stderr)
        return 2
    filters = Filters(**{name: getattr(args, name) for name in asdict(Filters())})
    videos = sorted(p for p in args.videos.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    mine = videos[args.rank :: args.world_size]
    shard = "" if args.world_size == 1 else f"-rank{args.rank}-of-{args.world_size}"
    args.output.mkdir(parents=True, exist_ok=True)
    report_path = args.output / f"report{shard}.jsonl"
    decided = {}
    if report_path.is_file():
        decided = {
            json.loads(line)["video"]: json.loads(line) for line in report_path.read_text().splitlines() if line
        }

    if analyzer is None:
        analyzer = FaceAnalyzer(args.face_analysis, min_face_size=1)
    audio_encoder, t5 = load_encoders(args)
    vae = load_vae(args.vae)
    with open(report_path, "a") as report:
        for video in mine:
            if video.name in decided:
                continue  # a rerun skips finished videos
            decision = process_video(
                video,
                args.captions,
                args.output,
                analyzer,
                audio_encoder,
                t5,
                filters,
                args.vocal_separator,
                vae,
                (args.width, args.height),
            )
            decided[video.name] = asdict(decision)
            report.write(json.dumps(asdict(decision)) + "\n")
            report.flush()
            logger.info("%s: %s%s", video.name, "kept" if decision.kept else "dropped: ", decision.reason)

    kept = [d["video"] for d in decided.values() if d["kept"]]
    with open(args.output / f"metadata{shard}.jsonl", "w") as metadata:
        for name in kept:
            meta = args.output / "clips" / Path(name).stem / "meta.json"
            metadata.write(meta.read_text().strip() + "\n")
    shutil.rmtree(args.output / "work", ignore_errors=True)
    logger.info("%d of %d videos kept; reasons in %s", len(kept), len(decided), report_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
