"""Talking-head videos -> a training set for both Hallo3 stages, with a report of why each dropped video was dropped.

    python -m train.prepare_dataset --videos DIR --captions DIR --output DIR [--rank R --world-size W]
        (--face-analysis DIR | --no-face-embedding) (--vocal-separator DIR | --no-vocal-separation)
        [--wav2vec MODEL] [--t5 MODEL] [--vae MODEL]

Per video (architecture 8.2): frames at 25 fps and audio at 16 kHz (ffmpeg), then the filters below, then the face
embedding, the union face mask and the wav2vec2 features of the separated vocals (the same `hallo3.preprocessing`
code as inference), and optionally the T5 embedding of the caption (`--t5`) and the VAE posterior of fixed 49-frame
windows at the training resolution (`--vae`, stored as mean and log-variance so that training still samples it).
Kept clips land in `OUTPUT/clips/<video stem>/`; `metadata*.jsonl` lists them and `report*.jsonl` says, for every
video, kept or dropped and why (the official pipeline dropped videos silently). `preparation*.json` records what the
run used: vocal separation, the face embedding's source, the wav2vec2 / T5 / VAE models, the filters.

The official pipeline always separates the vocals (Kim_Vocal_2) and always computes the ArcFace embedding. Without
the separator or ArcFace the run stops before the first video, unless `--no-vocal-separation` /
`--no-face-embedding` says to prepare without them (then wav2vec2 hears the whole soundtrack / the face embedding is
zeros, and `preparation*.json` says so).

A rerun skips videos already decided and redoes any whose report line is damaged or whose kept clip lost a file; it
refuses to mix settings with what `preparation*.json` recorded. `--rank/--world-size` split the videos between
parallel workers by a hash of the file name, so adding videos never moves a decided one to another worker; each
worker writes its own metadata, report and preparation shard, and works in its own temporary folder. Nothing that
the run did not write is deleted: a clip folder that holds another video's clip is left alone and the video dropped.

Filters, all measured on `--sample-frames` frames spread over the video:
- duration between `--min-seconds` and `--max-seconds`;
- exactly one face in every sampled frame;
- face at least `--min-face` px, and sharp: variance of the Laplacian of the face crop >= `--min-sharpness`;
- motion: mean absolute change of the face region between consecutive frames >= `--min-motion` (static clips go).
"""

import argparse
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from hallo3.encoding import encode_text, posterior_parameters, vae_posterior
from hallo3.interrupts import Interrupted, remove_stale_staging, staging_prefix, stop_on_signals
from hallo3.preprocessing.audio import (
    SEPARATOR_MODEL,
    AudioEncoder,
    AudioError,
    ffmpeg_exe,
    load_audio,
    separate_vocals,
    separation_unavailable,
)
from hallo3.preprocessing.face import ARCFACE_INSTALL_HINT, EMBEDDING_DIM, FaceAnalyzer

from .dataset import frame_path, frame_to_tensor


logger = logging.getLogger("train.prepare_dataset")

FPS = 25
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
WORK_SUFFIX = ".work"  # a run's temporary folder inside --output: .prepare<shard>.<pid>.<random>.work
CLIP_FILES = ("meta.json", "features.safetensors", "audio.wav", "face_mask.png")
REPORT_NAME = re.compile(r"report(?:-rank(\d+)-of-(\d+))?\.jsonl")


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


class InputError(ValueError):
    """A bad flag, input folder or output folder: one line naming it and the rule, exit code 2."""


FaceBox = tuple[float, float, float, float]


class FaceDetector(Protocol):
    """Where the face filters get their answer: `FaceAnalyzer` (insightface or OpenCV), or in tests a scripted
    stand-in such as `train.synthetic_data.RecordedFaces`."""

    def detect(self, image: Image.Image) -> list[tuple[FaceBox, np.ndarray]]:
        """Every face of `image` as (box (x0, y0, x1, y1) in pixels, embedding [512])."""
        ...


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (and exit code 2) instead of a usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


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
) -> tuple[dict, tuple[np.ndarray | None, list[FaceBox]]]:
    """Apply the face and motion filters; returns (metrics, (the first non-zero face embedding of the sampled frames
    or None, every face box)). ArcFace gives zeros for a face it does not find; the official pipeline takes the
    first frame on which it finds one."""
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
        if embedding is None and np.any(face_embedding):
            embedding = face_embedding
        side = min(box[2] - box[0], box[3] - box[1])
        if side < filters.min_face:
            raise Dropped(f"face {side:.0f} px in frame {index} (at least {filters.min_face} px)")
        crop = np.asarray(frame.convert("L").crop(tuple(int(v) for v in box)), dtype=np.uint8)
        sharpness.append(laplacian_variance(crop))
        following = Image.open(frame_paths[index + 1]).convert("L").crop(tuple(int(v) for v in box))
        motion.append(float(np.abs(np.asarray(following, dtype=np.float32) - crop.astype(np.float32)).mean()))
        boxes.append(box)
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
    starts = list(range(margin, num_frames - clip_length - margin + 1, clip_length))
    parameters = []
    for start in starts:
        frames = torch.stack([frame_to_tensor(frame_path(clip_dir, start + i), *size) for i in range(clip_length)])
        with torch.no_grad():
            posterior = vae_posterior(vae, frames[None])
        parameters.append(posterior_parameters(posterior)[0].half().cpu())
    return {"starts": torch.tensor(starts, dtype=torch.int64), "parameters": torch.stack(parameters)}


def clip_owner(clip_dir: Path) -> str | None:
    """The video whose clip `clip_dir` holds, as its meta.json records it; None when that cannot be read."""
    try:
        meta = json.loads((clip_dir / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    video = meta.get("video") if isinstance(meta, dict) else None
    return video if isinstance(video, str) else None


def check_replaceable(clip_dir: Path, video: str, replaceable: bool) -> None:
    """Raise `Dropped` unless `clip_dir` is free or holds this program's clip of `video`: its meta.json names the
    video, or (`replaceable`) this worker's report kept the video there and the clip lost its meta.json."""
    if not os.path.lexists(clip_dir):
        return
    written_here = clip_dir.is_dir() and not clip_dir.is_symlink()  # this program makes folders, never links
    owner = clip_owner(clip_dir) if written_here else None
    if written_here and (owner == video or (owner is None and replaceable)):
        return
    holds = f"the clip of {owner}" if owner else "files this program did not write"
    raise Dropped(f"{clip_dir} already holds {holds}; it is left as it is (rename the video or move that folder)")


def clip_problem(clip_dir: Path, video: str, needs_latents: bool) -> str | None:
    """Why the kept clip of `video` in `clip_dir` cannot be used as it is (a missing or damaged file), or None."""
    if not clip_dir.is_dir():
        return f"{clip_dir} is missing"
    for name in (*CLIP_FILES, *(("latents.safetensors",) if needs_latents else ())):
        if not (clip_dir / name).is_file():
            return f"{clip_dir / name} is missing"
    try:
        meta = json.loads((clip_dir / "meta.json").read_text())
        num_frames = int(meta["num_frames"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{clip_dir / 'meta.json'} is unreadable ({type(error).__name__}: {error})"
    if meta.get("video", video) != video:  # clips written before meta.json named their video have no "video"
        return f"{clip_dir} holds the clip of {meta['video']}"
    try:
        with safe_open(str(clip_dir / "features.safetensors"), "pt") as features:
            missing = {"audio_emb", "face_emb"} - set(features.keys())
    except (OSError, SafetensorError) as error:
        return f"{clip_dir / 'features.safetensors'} is unreadable ({error})"
    if missing:
        return f"{clip_dir / 'features.safetensors'} has no {', '.join(sorted(missing))}"
    for index in range(num_frames):
        if not frame_path(clip_dir, index).is_file():
            return f"{frame_path(clip_dir, index)} is missing"
    return None


def vocals_waveform(audio: Path, separator_dir: Path | None) -> np.ndarray:
    """What wav2vec2 hears: the vocals stem of `audio` (the official step), or with `separator_dir` None
    (`--no-vocal-separation`) the whole soundtrack."""
    if separator_dir is None:
        return load_audio(audio)
    vocals = separate_vocals(audio, separator_dir)
    if vocals is None:
        raise Dropped(f"the vocal separator ({SEPARATOR_MODEL}) returned no vocals stem")
    try:
        return load_audio(vocals)
    finally:
        shutil.rmtree(vocals.parent, ignore_errors=True)  # separate_vocals made this folder for the stem alone


def process_video(
    video: Path,
    caption_dir: Path,
    output: Path,
    work_root: Path,
    analyzer: FaceDetector,
    audio_encoder,
    t5,
    filters: Filters,
    separator_dir: Path | None,
    face_embedding: bool,
    vae=None,
    size: tuple[int, int] = (720, 480),
    replaceable: bool = False,
) -> Decision:
    """Decide `video` and, when kept, write its clip to `output`/clips/<stem>/.

    The clip is written into a temporary folder under `work_root` and renamed into place when complete, so a failed
    or stopped video leaves no half-written clip; the temporary folder goes in every case. `separator_dir` None:
    wav2vec2 hears the whole soundtrack (`--no-vocal-separation`); `face_embedding` False: the embedding is zeros
    (`--no-face-embedding`). `replaceable`: this worker's report kept the video, so its clip folder may be replaced
    even if it lost its meta.json (see `check_replaceable`).
    """
    name = video.stem
    caption_file = caption_dir / f"{name}.txt"
    if not caption_file.is_file():
        return Decision(video.name, False, f"no caption {caption_file.name}")
    clip_dir = output / "clips" / name
    workdir = Path(tempfile.mkdtemp(prefix="video.", dir=work_root))
    try:
        check_replaceable(clip_dir, video.name, replaceable)  # before the work, not only at the rename
        frames_dir, audio_path = extract(video, workdir)
        frame_paths = sorted(frames_dir.glob("*.png"))
        if len(frame_paths) < 2:
            raise Dropped(f"{len(frame_paths)} video frames (at least 2 are needed)")
        seconds = len(frame_paths) / FPS
        if not filters.min_seconds <= seconds <= filters.max_seconds:
            raise Dropped(f"duration {seconds:.2f} s outside [{filters.min_seconds}, {filters.max_seconds}] s")
        metrics, (embedding, boxes) = check_frames(frame_paths, analyzer, filters)
        metrics["seconds"] = round(seconds, 2)
        if not face_embedding:
            embedding = np.zeros(EMBEDDING_DIM, dtype=np.float32)
        elif embedding is None:
            raise Dropped(f"no face embedding: ArcFace found no face in the {filters.sample_frames} sampled frames")

        first = Image.open(frame_paths[0])
        x0, y0, x1, y1 = face_box_union(boxes, first.size)
        mask = np.zeros((first.height, first.width), dtype=np.uint8)
        mask[y0:y1, x0:x1] = 255  # the official union mask: the bounding box of every frame's face box

        waveform = vocals_waveform(audio_path, separator_dir)
        features, num_frames = audio_encoder(waveform, clip_length=1)
        if abs(num_frames - len(frame_paths)) > 2:
            raise Dropped(f"audio covers {num_frames} frames, the video {len(frame_paths)}")

        staged = workdir / "clip"
        staged.mkdir()
        os.rename(frames_dir, staged / "frames")
        shutil.copy(audio_path, staged / "audio.wav")
        Image.fromarray(mask).save(staged / "face_mask.png")
        tensors = {"audio_emb": features.half(), "face_emb": torch.from_numpy(np.asarray(embedding, dtype=np.float32))}
        caption = caption_file.read_text().strip()
        if t5 is not None:
            tensors["text_emb"] = t5(caption).half()
        save_file({k: v.contiguous() for k, v in tensors.items()}, staged / "features.safetensors")
        if vae is not None:
            save_file(window_posteriors(staged, len(frame_paths), vae, size), staged / "latents.safetensors")
        meta = {
            "name": name,
            "video": video.name,  # which video the clip is: a rerun replaces only its own clips
            "caption": caption,
            "num_frames": min(len(frame_paths), num_frames),
            "width": first.width,
            "height": first.height,
            **metrics,
        }
        (staged / "meta.json").write_text(json.dumps(meta))

        check_replaceable(clip_dir, video.name, replaceable)  # again: the folder may have appeared meanwhile
        clip_dir.parent.mkdir(parents=True, exist_ok=True)
        if clip_dir.exists():
            os.rename(clip_dir, workdir / "replaced")  # this video's earlier clip; removed with `workdir`
        os.rename(staged, clip_dir)
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
    parser = OneLineParser(prog="python -m train.prepare_dataset", description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=Path, required=True)
    parser.add_argument("--captions", type=Path, required=True, help="<video stem>.txt per video")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--face-analysis", type=Path, default=None, help="official face_analysis folder (ArcFace)")
    parser.add_argument(
        "--no-face-embedding",
        action="store_true",
        help="prepare without ArcFace: the face embedding is zeros (the official pipeline always computes it)",
    )
    parser.add_argument("--vocal-separator", type=Path, default=None, help="official audio_separator folder")
    parser.add_argument(
        "--no-vocal-separation",
        action="store_true",
        help="wav2vec2 hears the whole soundtrack (the official pipeline always separates the vocals)",
    )
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


def check_arguments(args: argparse.Namespace) -> Filters:
    """The flags' rules, before anything is read or written; returns the filters."""
    for flag, folder in (("--videos", args.videos), ("--captions", args.captions)):
        if not folder.is_dir():
            raise InputError(f"{flag} {folder}: no such folder.")
    if args.output.exists() and not args.output.is_dir():
        raise InputError(f"--output {args.output}: exists and is not a folder.")
    if args.world_size < 1:
        raise InputError(f"--world-size must be at least 1, got {args.world_size}.")
    if not 0 <= args.rank < args.world_size:
        raise InputError(f"--rank must be in 0..{args.world_size - 1}, got {args.rank}.")
    if args.vocal_separator is not None and args.no_vocal_separation:
        raise InputError("--vocal-separator and --no-vocal-separation contradict each other; give one of them.")
    if args.width < 1 or args.height < 1:
        raise InputError(f"--width and --height must be positive, got {args.width} x {args.height}.")
    filters = Filters(**{name: getattr(args, name) for name in asdict(Filters())})
    for name, value in asdict(filters).items():
        if not math.isfinite(value) or value < 0:
            raise InputError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}.")
    if filters.sample_frames < 1:
        raise InputError(f"--sample-frames must be at least 1, got {filters.sample_frames}.")
    if filters.min_seconds > filters.max_seconds:
        raise InputError(f"--min-seconds {filters.min_seconds} is above --max-seconds {filters.max_seconds}.")
    return filters


def list_videos(folder: Path) -> list[Path]:
    """The videos of `folder`, refusing two that would become the same clip folder (one stem, any suffix or case)."""
    try:
        videos = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    except OSError as error:
        raise InputError(f"--videos {folder}: cannot be listed ({error.strerror}).") from None
    seen: dict[str, Path] = {}
    for video in videos:
        other = seen.setdefault(video.stem.casefold(), video)
        if other is not video:
            raise InputError(
                f"--videos {folder}: {other.name} and {video.name} would both be prepared into clips/{video.stem}; "
                "rename one of them."
            )
    return videos


def shard_of(video: str, world_size: int) -> int:
    """The worker of `video` (a file name): a hash, not the position in the listing, so that adding videos never
    hands a decided video to another worker."""
    return int.from_bytes(hashlib.sha256(video.encode()).digest()[:8], "big") % world_size


def check_sharding(output: Path, world_size: int) -> None:
    """Refuse to add shards of another `--world-size` to `output`: the two splits would list videos twice."""
    for path in sorted(output.glob("report*.jsonl")):
        match = REPORT_NAME.fullmatch(path.name)
        written = int(match.group(2) or 1) if match else world_size
        if written != world_size:
            raise InputError(
                f"--output {output}: {path.name} was written with --world-size {written}, this run has {world_size}; "
                f"rerun with --world-size {written} or prepare into a new --output."
            )


def vocal_separation(args: argparse.Namespace) -> str:
    """What wav2vec2 hears, for `preparation*.json`; no separator without `--no-vocal-separation` is an error."""
    if args.no_vocal_separation:
        return "off: wav2vec2 hears the whole soundtrack (--no-vocal-separation)"
    reason = separation_unavailable(args.vocal_separator)
    if reason is not None:
        raise InputError(
            f"--vocal-separator: {reason}. The official pipeline separates the vocals ({SEPARATOR_MODEL}) before "
            "wav2vec2; give the official audio_separator folder, or pass --no-vocal-separation to prepare without."
        )
    return f"{SEPARATOR_MODEL} (audio-separator)"


def arcface_unavailable(folder: Path | None) -> str | None:
    """Why `folder` (the official face_analysis folder) cannot give ArcFace embeddings, or None if it can."""
    if folder is None:
        return "no face_analysis folder was given"
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not any((folder / "models").glob("*.onnx")):
        return f"{folder / 'models'} holds no insightface .onnx models"
    if importlib.util.find_spec("insightface") is None:
        return f"insightface is not installed ({ARCFACE_INSTALL_HINT})"
    return None


def face_embedding_source(args: argparse.Namespace, analyzer: FaceDetector | None) -> str:
    """Where the face embedding comes from, for `preparation*.json`; no ArcFace without `--no-face-embedding` is an
    error."""
    if args.no_face_embedding:
        return "none: zeros (--no-face-embedding)"
    if analyzer is not None:
        return f"{type(analyzer).__name__} (the analyzer given to main)"
    reason = arcface_unavailable(args.face_analysis)
    if reason is not None:
        raise InputError(
            f"--face-analysis: {reason}. The official pipeline computes every clip's ArcFace face embedding; give the "
            "official face_analysis folder, or pass --no-face-embedding to prepare zeros instead."
        )
    return "insightface ArcFace (raw embedding of the first sampled frame with a face)"


def preparation_record(args: argparse.Namespace, filters: Filters, vocals: str, face_source: str) -> dict:
    """What the run uses; a rerun into the same output must use the same (the `folders` may move)."""
    return {
        "vocal_separation": vocals,
        "face_embedding": face_source,
        "wav2vec": args.wav2vec,
        "t5": args.t5,
        "vae": args.vae,
        "vae_size": [args.width, args.height] if args.vae else None,
        "fps": FPS,
        "filters": asdict(filters),
        "folders": {
            "vocal_separator": None if args.vocal_separator is None else str(args.vocal_separator),
            "face_analysis": None if args.face_analysis is None else str(args.face_analysis),
        },
    }


def check_preparation(path: Path, record: dict) -> None:
    """Refuse a rerun whose settings differ from those `path` recorded: its clips would not be what the file says."""
    try:
        earlier = json.loads(path.read_text())
        if not isinstance(earlier, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        raise InputError(
            f"--output: {path} is unreadable ({error}); restore it, or move it away to record this run's settings."
        ) from None
    current = json.loads(json.dumps(record))  # tuples and floats as the file holds them
    for key, value in current.items():
        if key != "folders" and earlier.get(key) != value:
            raise InputError(
                f"--output: {path} records {key} = {json.dumps(earlier.get(key))}, this run has {json.dumps(value)}; "
                "rerun with the same settings or prepare into a new --output."
            )


def read_report(path: Path) -> dict[str, dict]:
    """The decisions recorded in `path`, by video (the last line wins); a damaged line is named in one warning and
    left out, so its video is prepared again."""
    decided: dict[str, dict] = {}
    if not path.is_file():
        return decided
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not (
                isinstance(record, dict)
                and isinstance(record.get("video"), str)
                and isinstance(record.get("kept"), bool)
            ):
                raise ValueError("not a report record")
        except ValueError as error:  # JSON and UTF-8 errors are ValueErrors
            logger.warning("%s line %d is damaged (%s); its video is prepared again.", path, number, error)
            continue
        decided[record["video"]] = record
    return decided


@contextmanager
def work_folder(output: Path, name: str) -> Iterator[Path]:
    """This run's temporary folder inside `output` (so that clips are renamed into place on one file system),
    removed when the run ends, fails or is stopped. Its name carries the process id: a run that was killed outright
    leaves it, and the next run of the same shard removes it. Other shards' folders are never touched."""
    for leftover in remove_stale_staging(output, name, WORK_SUFFIX):
        logger.info("Removed %s, left by a run that was killed.", leftover)
    folder = Path(tempfile.mkdtemp(prefix=staging_prefix(name), suffix=WORK_SUFFIX, dir=output))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def prepare(args: argparse.Namespace, analyzer: FaceDetector | None) -> int:
    """The run behind `main`: every check first, then the videos of this worker, then its metadata."""
    filters = check_arguments(args)
    videos = list_videos(args.videos)
    mine = [video for video in videos if shard_of(video.name, args.world_size) == args.rank]
    shard = "" if args.world_size == 1 else f"-rank{args.rank}-of-{args.world_size}"
    output = args.output
    if output.is_dir():
        check_sharding(output, args.world_size)
    preparation = preparation_record(args, filters, vocal_separation(args), face_embedding_source(args, analyzer))
    preparation_path = output / f"preparation{shard}.json"
    report_path = output / f"report{shard}.jsonl"
    if preparation_path.is_file():
        check_preparation(preparation_path, preparation)

    if analyzer is None:
        try:
            analyzer = FaceAnalyzer(args.face_analysis, min_face_size=1)
        except ImportError as error:
            raise InputError(f"--face-analysis: {error}") from None
    try:
        audio_encoder, t5 = load_encoders(args)
    except OSError as error:
        raise InputError(f"--wav2vec {args.wav2vec} / --t5 {args.t5}: cannot load ({first_line(error)})") from None
    try:
        vae = load_vae(args.vae)
    except OSError as error:
        raise InputError(f"--vae {args.vae}: cannot load ({first_line(error)})") from None

    output.mkdir(parents=True, exist_ok=True)
    decided = read_report(report_path)
    in_input = {video.name for video in videos}
    redo = set()  # kept earlier, but the clip lost a file: prepared again (or left out if the video is gone)
    for name, record in decided.items():
        problem = (
            clip_problem(output / "clips" / Path(name).stem, name, args.vae is not None) if record["kept"] else None
        )
        if problem is not None:
            then = "it is prepared again" if name in in_input else "the video is gone, so the clip is left out"
            logger.warning("%s: %s; %s.", name, problem, then)
            redo.add(name)

    with work_folder(output, f"prepare{shard}") as work_root, open(report_path, "ab") as report:
        if not preparation_path.is_file():
            if report_path.stat().st_size:
                logger.warning(
                    "%s has no %s: what its earlier videos used is not recorded.", report_path, preparation_path
                )
            write_whole(preparation_path, json.dumps(preparation, indent=2) + "\n", work_root)
        if report.tell() and not report_path.read_bytes().endswith(b"\n"):
            report.write(b"\n")  # a line cut short by a killed run stays alone on its line
        for video in mine:
            if video.name in decided and video.name not in redo:
                continue  # a rerun skips finished videos
            decision = process_video(
                video,
                args.captions,
                output,
                work_root,
                analyzer,
                audio_encoder,
                t5,
                filters,
                None if args.no_vocal_separation else args.vocal_separator,
                not args.no_face_embedding,
                vae,
                (args.width, args.height),
                replaceable=video.name in redo,
            )
            decided[video.name] = asdict(decision)
            redo.discard(video.name)
            report.write((json.dumps(asdict(decision)) + "\n").encode())
            report.flush()
            logger.info("%s: %s%s", video.name, "kept" if decision.kept else "dropped: ", decision.reason)

        kept = [name for name, record in decided.items() if record["kept"] and name not in redo]
        lines = [(output / "clips" / Path(name).stem / "meta.json").read_text().strip() for name in kept]
        write_whole(output / f"metadata{shard}.jsonl", "".join(line + "\n" for line in lines), work_root)
    logger.info("%d of %d videos kept; reasons in %s", len(kept), len(decided), report_path)
    return 0


def write_whole(path: Path, text: str, work_root: Path) -> None:
    """Write `text` to `path` through a file in `work_root`: a reader, or a killed run, never leaves half of it."""
    staged = work_root / path.name
    staged.write_text(text)
    os.replace(staged, path)


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def main(argv: list[str] | None = None, analyzer: FaceDetector | None = None) -> int:
    """The command line; `analyzer` replaces the face analysis built from `--face-analysis` (tests): its embeddings
    are the face embedding unless `--no-face-embedding`, and `preparation*.json` names it."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # a bad flag (already reported in one line) or --help
        return exit_.code if isinstance(exit_.code, int) else 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        with stop_on_signals():
            return prepare(args, analyzer)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupted:
        reason = f"stopped by {interrupted.signal_name}" if isinstance(interrupted, Interrupted) else "interrupted"
        print(
            f"error: {reason}; the report keeps the videos decided so far, a rerun prepares the rest.", file=sys.stderr
        )
        return interrupted.exit_code if isinstance(interrupted, Interrupted) else 130


if __name__ == "__main__":
    sys.exit(main())
