"""Input files -> talking-portrait mp4: the one module that walks the whole path.

    python -m hallo3.inference --model M --image I --audio A [--prompt P] --output O.mp4
        [--steps N --guidance-scale G --audio-guidance-scale S --motion-frames K --seed X]
    python -m hallo3.inference --model M --input-list FILE --output-dir DIR   # lines: prompt@@image@@audio

Under `accelerate launch` the batch's jobs are split across processes, one GPU each. A bad input gets a one-line
message naming the input and the rule, exit code 2 and no output file; outputs appear only when complete.
"""

import argparse
import logging
import os
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .convert_sat_checkpoint import CheckpointError
from .loading import TINY_RANDOM, LoadedModel, ModelSourceError, load_pipeline
from .memory import MEMORY_MODES
from .preprocessing.audio import AudioError, load_audio, separate_vocals
from .preprocessing.face import EMBEDDING_DIM, FaceAnalyzer, FaceError, apply_mask, face_mask
from .preprocessing.image import Framing, ImageError, frame_portrait, load_image
from .video_io import VideoWriter


logger = logging.getLogger("hallo3")


class OutputError(ValueError):
    """The output path breaks a rule (folder missing or not writable, not .mp4)."""


INPUT_ERRORS = (ImageError, FaceError, AudioError, OutputError, ModelSourceError, CheckpointError)


@dataclass
class GenerationSettings:
    """Everything that decides the video besides the input files; the one place inference defaults live."""

    prompt: str = ""
    num_inference_steps: int = 50
    guidance_scale: float = 3.5
    audio_guidance_scale: float | None = None  # None: the official joint guidance
    use_dynamic_cfg: bool = False
    motion_frames: int = 2
    seed: int | None = None  # None: a fresh random seed, reported in the result
    max_audio_seconds: float | None = 600.0
    disable_reference: bool = False
    disable_face_embedding: bool = False
    disable_audio: bool = False

    def pipeline_kwargs(self) -> dict:
        """The settings `Hallo3Pipeline.__call__` takes under the same names (the rest is for the file side)."""
        return {k: v for k, v in asdict(self).items() if k not in ("seed", "max_audio_seconds")}

    def validate(self) -> None:
        rules = [
            (self.num_inference_steps >= 1, f"steps must be >= 1, got {self.num_inference_steps}"),
            (self.guidance_scale >= 1, f"guidance scale must be >= 1, got {self.guidance_scale}"),
            (
                self.audio_guidance_scale is None or self.audio_guidance_scale >= 0,
                f"audio guidance scale must be >= 0, got {self.audio_guidance_scale}",
            ),
            (0 <= self.motion_frames <= 3, f"motion frames must be 0..3 (2 as trained), got {self.motion_frames}"),
            (self.seed is None or 0 <= self.seed < 2**63, f"seed must be in 0..2^63-1, got {self.seed}"),
        ]
        for ok, message in rules:
            if not ok:
                raise ValueError(message)


@dataclass
class PreparedInputs:
    """What the pipeline takes, made from the user's files."""

    image: Image.Image
    reference_image: Image.Image
    face_embeds: np.ndarray
    waveform: np.ndarray
    framing: Framing
    audio_path: Path


@dataclass
class GenerationResult:
    path: Path
    num_frames: int
    seconds: float
    seed: int
    settings: dict = field(default_factory=dict)
    model: str = ""


def check_output_path(path: Path) -> None:
    if path.suffix.lower() != ".mp4":
        raise OutputError(f"output {path}: must end in .mp4.")
    if not path.parent.is_dir():
        raise OutputError(f"output {path}: the folder {path.parent} does not exist.")
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"output {path}: the folder {path.parent} is not writable.")
    if path.is_dir():
        raise OutputError(f"output {path}: is a folder.")


class Hallo3Generator:
    """A loaded model plus the file-side steps: preprocessing, the pipeline, and the mp4 writer.

    Args:
        model (`LoadedModel`): from `hallo3.loading.load_pipeline`.
        device (`str`): where the pipeline runs; offload modes move weights there when they are used.
        memory_mode (`str`): see `hallo3.memory` (quantized modes must also be given to `load_pipeline`).
    """

    def __init__(self, model: LoadedModel, device: str | torch.device = "cpu", memory_mode: str = "none"):
        self.model = model
        self.pipeline = model.pipeline
        if memory_mode == "none":
            self.pipeline.to(device)
        else:
            self.pipeline.enable_memory_mode(memory_mode, device)
        self.face_analyzer = FaceAnalyzer(model.face_analysis_dir)

    def prepare(
        self, image_path: str | Path, audio_path: str | Path, max_audio_seconds: float | None
    ) -> PreparedInputs:
        """Validate and preprocess the two files; raises an `INPUT_ERRORS` class naming the file and the rule."""
        image = load_image(image_path)
        face = self.face_analyzer.analyze(image, name=f"image {image_path}")
        masked = apply_mask(image, face_mask(image.size, face.box))
        (framed, framed_reference), framing = frame_portrait(
            image, face.box, self.pipeline.width, self.pipeline.height, extra_images=(masked,)
        )
        audio_path = Path(audio_path)
        waveform = load_audio(audio_path, max_audio_seconds)  # validates the user's file before any separation
        vocals = separate_vocals(audio_path, self.model.vocal_separator_dir)
        if vocals is not None:
            waveform = load_audio(vocals)
        embedding = face.embedding if face.embedding.shape == (EMBEDDING_DIM,) else np.zeros(EMBEDDING_DIM)
        return PreparedInputs(framed, framed_reference, embedding.astype(np.float32), waveform, framing, audio_path)

    def generate(
        self,
        image_path: str | Path,
        audio_path: str | Path,
        output_path: str | Path,
        settings: GenerationSettings | None = None,
    ) -> GenerationResult:
        """Make the mp4 at `output_path`; nothing is written unless it completes."""
        settings = settings or GenerationSettings()
        settings.validate()
        output_path = Path(output_path)
        check_output_path(output_path)
        inputs = self.prepare(image_path, audio_path, settings.max_audio_seconds)
        seed = settings.seed if settings.seed is not None else secrets.randbelow(2**31)
        started = time.perf_counter()
        metadata = {
            "comment": f"hallo3 | model: {self.model.label} | seed {seed} | steps "
            f"{settings.num_inference_steps} | guidance {settings.guidance_scale}"
        }
        with VideoWriter(
            output_path, fps=self.pipeline.fps, audio_path=inputs.audio_path, metadata=metadata
        ) as writer:
            output = self.pipeline(
                image=inputs.image,
                audio=inputs.waveform,
                reference_image=inputs.reference_image,
                face_embeds=inputs.face_embeds,
                generator=torch.Generator().manual_seed(seed),
                on_frames=lambda frames: writer.write(inputs.framing.crop_output(frames)),
                **settings.pipeline_kwargs(),
            )
        return GenerationResult(
            path=output_path,
            num_frames=output.num_frames,  # type: ignore[union-attr]  # return_dict is True
            seconds=time.perf_counter() - started,
            seed=seed,
            settings={**asdict(settings), "seed": seed},
            model=self.model.label,
        )


# --------------------------------------------------------------------------------------------------------------------
# CLI


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (and exit code 2) instead of a usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        default=TINY_RANDOM,
        help="converted folder, official pretrained_models/ folder, Hub repo id, or tiny-random",
    )
    parser.add_argument("--base-model", default="THUDM/CogVideoX-5b-I2V", help="T5/VAE source for converted folders")
    parser.add_argument("--image", type=Path, help="portrait photo")
    parser.add_argument("--audio", type=Path, help="speech recording (wav, mp3, flac, m4a, ogg, ...)")
    parser.add_argument("--prompt", default="", help="what the scene looks like")
    parser.add_argument("--output", type=Path, help="output .mp4")
    parser.add_argument("--input-list", type=Path, help="batch: lines prompt@@image@@audio (paths relative to it)")
    parser.add_argument("--output-dir", type=Path, help="batch: folder for the videos")
    parser.add_argument("--steps", type=positive_int, default=50, help="sampler steps per clip")
    parser.add_argument("--guidance-scale", type=float, default=3.5, help="joint text+audio guidance")
    parser.add_argument(
        "--audio-guidance-scale",
        type=float,
        default=None,
        help="separate audio guidance (adds a third branch unless equal to --guidance-scale)",
    )
    parser.add_argument("--dynamic-cfg", action="store_true", help="ramp guidance from 1 over the steps")
    parser.add_argument(
        "--motion-frames",
        type=int,
        default=2,
        choices=range(0, 4),
        metavar="{0..3}",
        help="frames carried between clips (2 as trained)",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, reported)")
    parser.add_argument("--max-audio-seconds", type=float, default=600.0, help="refuse longer audio")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--memory-mode",
        default="none",
        choices=MEMORY_MODES,
        help="weight placement/quantization (see hallo3/memory.py); model-offload fits 24 GB GPUs",
    )
    parser.add_argument("--attention-backend", default=None, help="diffusers attention backend, e.g. flash, sage")
    parser.add_argument("--compile", action="store_true", help="torch.compile the repeated transformer blocks")
    parser.add_argument(
        "--step-cache",
        choices=("first-block", "taylorseer", "faster"),
        default=None,
        help="approximate step caching (faster, not identical; see docs/performance.md)",
    )
    parser.add_argument("--step-cache-threshold", type=float, default=0.1, help="first-block cache threshold")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return parser


def read_input_list(path: Path) -> list[tuple[str, Path, Path]]:
    """`prompt@@image@@audio` lines; relative paths are relative to the list's folder; blank and # lines skipped."""
    if not path.is_file():
        raise OutputError(f"input list {path}: no such file.")
    jobs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("@@")
        if len(parts) != 3:
            raise OutputError(f"input list {path}, line {number}: expected prompt@@image@@audio.")
        prompt, image, audio = (part.strip() for part in parts)
        jobs.append((prompt, path.parent / image, path.parent / audio))
    return jobs


def run_batch(
    generator: Hallo3Generator,
    jobs,
    output_dir: Path,
    settings: GenerationSettings,
    process_index: int = 0,
    num_processes: int = 1,
) -> int:
    """Run this process's share of the jobs; a failed job is reported and the rest go on. Returns failures."""
    failures = 0
    for index in range(process_index, len(jobs), num_processes):
        prompt, image, audio = jobs[index]
        job_settings = GenerationSettings(**{**asdict(settings), "prompt": prompt})
        output = output_dir / f"{index:03d}-{image.stem}-{audio.stem}.mp4"
        try:
            result = generator.generate(image, audio, output, job_settings)
        except (*INPUT_ERRORS, ValueError) as error:
            failures += 1
            print(f"error: job {index + 1} ({image.name}, {audio.name}): {error}", file=sys.stderr)
            continue
        logger.info(
            "job %d: %s (%d frames, %.1f s, seed %d)",
            index + 1,
            result.path,
            result.num_frames,
            result.seconds,
            result.seed,
        )
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        batch = args.input_list is not None
        if batch == (args.image is not None or args.audio is not None or args.output is not None):
            parser.error("give either --image, --audio and --output, or --input-list and --output-dir")
        if not batch and None in (args.image, args.audio, args.output):
            parser.error("--image, --audio and --output are all needed")
        if batch and args.output_dir is None:
            parser.error("--input-list needs --output-dir")
    except SystemExit as exit_:  # a bad flag (already reported in one line) or --help
        return exit_.code if isinstance(exit_.code, int) else 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    settings = GenerationSettings(
        prompt=args.prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        audio_guidance_scale=args.audio_guidance_scale,
        use_dynamic_cfg=args.dynamic_cfg,
        motion_frames=args.motion_frames,
        seed=args.seed,
        max_audio_seconds=args.max_audio_seconds,
    )
    try:
        settings.validate()
        if batch:
            jobs = read_input_list(args.input_list)
            args.output_dir.mkdir(parents=True, exist_ok=True)
        else:
            check_output_path(args.output)
            load_image(args.image)  # fail on a bad image before loading a large model
            load_audio(args.audio, args.max_audio_seconds)
        from accelerate import PartialState

        state = PartialState()
        device = state.device if batch and state.num_processes > 1 else args.device
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        loaded = load_pipeline(args.model, base_model=args.base_model, torch_dtype=dtype, memory_mode=args.memory_mode)
        generator = Hallo3Generator(loaded, device, args.memory_mode)
        if args.attention_backend:
            loaded.pipeline.set_attention_backend(args.attention_backend)
        if args.step_cache:
            loaded.pipeline.enable_step_cache(args.step_cache, args.step_cache_threshold)
        if args.compile:
            loaded.pipeline.compile_transformer()
        if batch:
            failures = run_batch(generator, jobs, args.output_dir, settings, state.process_index, state.num_processes)
            return 2 if failures else 0
        result = generator.generate(args.image, args.audio, args.output, settings)
    except (*INPUT_ERRORS, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; no output was written.", file=sys.stderr)
        return 130
    except Exception as error:  # an internal failure: one line, the traceback on request
        if args.debug:
            raise
        print(
            f"error: internal failure ({type(error).__name__}: {error}); rerun with --debug for details.",
            file=sys.stderr,
        )
        return 1
    logger.info(
        "Wrote %s (%d frames, %.1f s, seed %d) with %s",
        result.path,
        result.num_frames,
        result.seconds,
        result.seed,
        loaded.label,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
