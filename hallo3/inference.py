"""Input files -> talking-portrait mp4: the one module that walks the whole path.

    python -m hallo3.inference --model M --image I --audio A [--prompt P] --output O.mp4
        [--steps N --guidance-scale G --audio-guidance-scale S --motion-frames K --seed X]
    python -m hallo3.inference --model M --input-list FILE --output-dir DIR   # lines: prompt@@image@@audio

Under `accelerate launch` the batch's jobs are split across processes, one GPU each. A bad input gets a one-line
message naming the input and the rule, exit code 2 and no output file; outputs appear only when complete.
"""

import argparse
import logging
import math
import os
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .convert_sat_checkpoint import CheckpointError
from .interrupts import Interrupted, stop_on_signals
from .loading import DEFAULT_BASE_MODEL, TINY_RANDOM, LoadedModel, ModelSourceError, load_pipeline, local_model_folders
from .memory import MEMORY_MODES, available_memory_modes
from .preprocessing import PreparedInputs, prepare_inputs, read_inputs
from .preprocessing.audio import AudioError, num_video_frames
from .preprocessing.face import FaceAnalyzer, FaceError
from .preprocessing.image import ImageError
from .resumable import ModelOptions, ResumableVideo, ResumeError, fingerprint, model_setup, run_folder, saved_seed
from .settings import DEFAULTS, GenerationSettings, SettingError


logger = logging.getLogger("hallo3")


class OutputError(ValueError):
    """The output path breaks a rule (folder missing or not writable, not .mp4)."""


INPUT_ERRORS = (ImageError, FaceError, AudioError, OutputError, ModelSourceError, CheckpointError, ResumeError)


@dataclass
class GenerationResult:
    path: Path
    num_frames: int
    seconds: float
    seed: int
    settings: dict = field(default_factory=dict)
    model: str = ""
    fps: int = 25
    inputs: dict[str, str] = field(default_factory=dict)  # what the preprocessing used (face, vocals)

    @property
    def video_seconds(self) -> float:
        return self.num_frames / self.fps


def check_output_path(path: Path, overwrite: bool = False, resume: bool = False) -> None:
    if path.suffix.lower() != ".mp4":
        raise OutputError(f"output {path}: must end in .mp4.")
    if not path.parent.is_dir():
        raise OutputError(f"output {path}: the folder {path.parent} does not exist.")
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"output {path}: the folder {path.parent} is not writable.")
    if path.is_dir():
        raise OutputError(f"output {path}: is a folder.")
    if path.exists() and not overwrite:
        raise OutputError(f"output {path}: already exists; choose another name or pass --overwrite.")
    if (run_folder(path) / "state.json").is_file() and not (resume or overwrite):
        raise OutputError(
            f"output {path}: a stopped run's finished clips are saved beside it; pass --resume to continue it, or "
            f"--overwrite to start again."
        )


def check_device(device: str) -> None:
    """The device exists in this PyTorch build (a CPU-only build has no 'cuda')."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device name (cpu, cuda, cuda:1, mps, ...).") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this PyTorch build or machine has no CUDA GPU; use --device cpu.")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here; use --device cpu.")


def check_memory_mode(mode: str) -> None:
    """The memory mode is one this machine offers (offload and bitsandbytes need CUDA; torchao needs torchao)."""
    offered = available_memory_modes()
    if mode not in offered:
        needs = "a CUDA GPU and bitsandbytes" if mode in ("8bit", "4bit") else "a CUDA GPU"
        if mode == "int8-torchao":
            needs = "torchao (pip install torchao)"
        raise ValueError(f"--memory-mode {mode}: needs {needs}; this machine offers {', '.join(offered)}.")


class PortraitAnimator:
    """A loaded model plus the file-side steps: preprocessing, the pipeline, and the mp4 writer.

    Args:
        model (`LoadedModel`): from `hallo3.loading.load_pipeline`.
        device (`str`): where the pipeline runs; offload modes move weights there when they are used.
        memory_mode (`str`): see `hallo3.memory` (quantized modes must also be given to `load_pipeline`).
        options (`ModelOptions`, *optional*): what the caller does to the model after this (a LoRA, an attention
            backend, ...), for the fingerprint that decides whether a saved run may be continued.
    """

    def __init__(
        self,
        model: LoadedModel,
        device: str | torch.device = "cpu",
        memory_mode: str = "none",
        options: ModelOptions | None = None,
    ):
        self.model = model
        self.pipeline = model.pipeline
        self.face_analyzer = FaceAnalyzer(model.face_analysis_dir)
        # read before the weights are placed (offload hooks move them); weight files are read once, then remembered
        self.setup = model_setup(model, device, memory_mode, self.face_analyzer.detector, options or ModelOptions())
        if memory_mode == "none":
            self.pipeline.to(device)
        else:
            self.pipeline.enable_memory_mode(memory_mode, device)

    def prepare(
        self,
        image_path: str | Path,
        audio_path: str | Path,
        max_audio_seconds: float | None,
        names: tuple[str, str] | None = None,
        separate: bool = True,
    ) -> PreparedInputs:
        """Validate and preprocess the two files for this model; raises an `INPUT_ERRORS` class naming the file and
        the rule."""
        inputs = prepare_inputs(
            image_path,
            audio_path,
            self.face_analyzer,
            (self.pipeline.width, self.pipeline.height),
            max_audio_seconds,
            self.model.vocal_separator_dir,
            separate,
            names,
        )
        for name, note in inputs.report.items():
            logger.info("%s: %s", name, note)
        return inputs

    def generate(
        self,
        image_path: str | Path,
        audio_path: str | Path,
        output_path: str | Path,
        settings: GenerationSettings | None = None,
        overwrite: bool = False,
        names: tuple[str, str] | None = None,
        resume: bool = False,
        writes: bool = True,
    ) -> GenerationResult:
        """Make the mp4 at `output_path`; it appears only when complete. An existing file is kept unless `overwrite`.
        `names` are how errors name the two input files (default: their paths).

        Every finished clip is kept beside the output (see `hallo3.resumable`): after a crash, an OOM or a signal,
        `resume=True` continues from the last finished clip and makes exactly the video an unbroken run makes.
        `writes=False`: compute the video but write nothing (the other processes of a CFG-parallel run).
        """
        settings = settings or GenerationSettings()
        settings.validate()
        output_path = Path(output_path)
        check_output_path(output_path, overwrite, resume)
        inputs = self.prepare(image_path, audio_path, settings.max_audio_seconds, names, settings.separate_vocals)
        seed = settings.seed
        if seed is None:  # a resumed run keeps the seed its first part drew
            seed = saved_seed(output_path) if resume else None
            seed = seed if seed is not None else secrets.randbelow(2**31)
        started = time.perf_counter()
        inputs_used = " | ".join(f"{name}: {note}" for name, note in inputs.report.items())
        metadata = {
            "comment": f"hallo3 | model: {self.model.label} | seed {seed} | steps "
            f"{settings.num_inference_steps} | guidance {settings.guidance_scale} | {inputs_used}"
        }
        used_settings = {**asdict(settings), "seed": seed}
        setup = {**self.setup, "preprocessing": inputs.report}  # the face and vocal models these files went through
        motion = settings.motion_frames
        with ResumableVideo(
            output_path,
            fingerprint(Path(image_path), Path(audio_path), used_settings, setup),
            inputs.audio_path,
            self.pipeline.fps,
            metadata,
            seed,
            num_frames=num_video_frames(len(inputs.waveform), self.pipeline.fps),
            motion_shape=(motion, 3, self.pipeline.height, self.pipeline.width) if motion else None,
            writes=writes,
        ) as run:
            resume_from = run.start(resume, overwrite)
            if resume_from is not None:
                logger.info(
                    "Resuming %s after clip %d (%d frames done).",
                    output_path,
                    resume_from.next_clip,
                    resume_from.frames_done,
                )
            output = self.pipeline(
                **inputs.pipeline_inputs(),
                generator=torch.Generator().manual_seed(seed),
                on_frames=lambda frames: run.write_segment(inputs.framing.crop_output(frames)),
                resume_from=resume_from,
                on_clip_end=run.save_state,
                **settings.pipeline_kwargs(),
            )
            run.finish()
        return GenerationResult(
            path=output_path,
            num_frames=output.num_frames,  # type: ignore[union-attr]  # return_dict is True
            seconds=time.perf_counter() - started,
            seed=seed,
            settings=used_settings,
            model=self.model.label,
            fps=self.pipeline.fps,
            inputs=inputs.report,
        )


# --------------------------------------------------------------------------------------------------------------------
# CLI


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` ends each flag's line with its default, but for switches and flags that are unset by default (their
    help says what unset means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, "") or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (and exit code 2) instead of a usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # flags whose `dest` is a GenerationSettings field take its default and are checked by its rules, not here
    parser = OneLineParser(
        prog="python -m hallo3.inference",
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=TINY_RANDOM,
        help="converted folder, official pretrained_models/ folder, Hub repo id, or tiny-random",
    )
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL, help="T5/VAE source for converted folders")
    parser.add_argument("--image", type=Path, help="portrait photo")
    parser.add_argument("--audio", type=Path, help="speech recording (wav, mp3, flac, m4a, ogg, ...)")
    parser.add_argument("--prompt", default=DEFAULTS.prompt, help="what the scene looks like (default: none)")
    parser.add_argument("--output", type=Path, help="output .mp4")
    parser.add_argument("--input-list", type=Path, help="batch: lines prompt@@image@@audio (paths relative to it)")
    parser.add_argument("--output-dir", type=Path, help="batch: folder for the videos")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output (or a stopped run's clips)"
    )
    parser.add_argument("--resume", action="store_true", help="continue a stopped run from its last finished clip")
    parser.add_argument(
        "--steps", dest="num_inference_steps", type=int, default=DEFAULTS.num_inference_steps, help="steps per clip"
    )
    parser.add_argument(
        "--guidance-scale", type=float, default=DEFAULTS.guidance_scale, help="joint text+audio guidance"
    )
    parser.add_argument(
        "--audio-guidance-scale",
        type=float,
        default=DEFAULTS.audio_guidance_scale,
        help="separate audio guidance (adds a third branch unless equal to --guidance-scale; default: unset, the "
        "official joint guidance)",
    )
    parser.add_argument(
        "--dynamic-cfg", dest="use_dynamic_cfg", action="store_true", help="ramp guidance from 1 over the steps"
    )
    parser.add_argument(
        "--no-vocal-separation",
        dest="separate_vocals",
        action="store_false",
        help="give wav2vec2 the audio as it is (by default vocals are separated when the separator model is present)",
    )
    parser.add_argument(
        "--motion-frames", type=int, default=DEFAULTS.motion_frames, help="frames carried between clips (2 as trained)"
    )
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="random seed (default: a fresh one, reported)")
    parser.add_argument(
        "--max-audio-seconds", type=float, default=DEFAULTS.max_audio_seconds, help="refuse longer audio"
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the model runs"
    )
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
        choices=("first-block", "taylorseer", "faster", "pyramid-attention-broadcast"),
        default=None,
        help="approximate step caching (faster, not identical; see docs/performance.md)",
    )
    parser.add_argument("--lora", type=Path, default=None, help="a LoRA in diffusers' format, fused into the model")
    parser.add_argument("--lora-scale", type=finite_float, default=1.0, help="strength of --lora")
    parser.add_argument(
        "--cfg-parallel",
        action="store_true",
        help="split each step's guidance rows across processes (start with torchrun --nproc_per_node 2)",
    )
    parser.add_argument("--step-cache-threshold", type=float, default=0.1, help="first-block cache threshold")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    parser.add_argument(
        "--verbose", action="store_true", help="show the libraries' log lines, warnings and progress bars too"
    )
    return parser


def is_project_record(record: logging.LogRecord) -> bool:
    """A record of hallo3's own loggers, or any logger's error."""
    return record.name.partition(".")[0] == "hallo3" or record.levelno >= logging.ERROR


def setup_console(verbose: bool = False) -> None:
    """The console of the CLI and the app: hallo3's log lines on stderr, as bare messages.

    By default that is all a run prints besides its progress bars: other loggers' records below ERROR (mediapipe's
    C++ lines among them, see `hallo3.preprocessing.face`) and Python's warnings, which become `py.warnings`
    records, are dropped, and diffusers', transformers' and torch's own handlers are set to errors and their loading
    bars turned off. `verbose` leaves all of them as the libraries print them. A program that set up logging itself
    (a host application, pytest) keeps its setup.
    """
    if logging.getLogger().handlers:
        return
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[console])
    if verbose:
        return
    console.addFilter(is_project_record)
    logging.captureWarnings(True)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    logging.getLogger("torch").setLevel(logging.ERROR)


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
    animator: PortraitAnimator,
    jobs: list[tuple[str, Path, Path]],
    output_dir: Path,
    settings: GenerationSettings,
    process_index: int = 0,
    num_processes: int = 1,
    overwrite: bool = False,
    skip: frozenset[int] = frozenset(),
    resume: bool = False,
    writes: bool = True,
) -> int:
    """Run this process's share of the jobs (but those in `skip`); a failed job is reported and the rest go on.
    Returns the number of failures."""
    failures = 0
    mine = [index for index in range(len(jobs)) if index not in skip][process_index::num_processes]
    for index in mine:
        prompt, image, audio = jobs[index]
        job_settings = GenerationSettings(**{**asdict(settings), "prompt": prompt})
        output = batch_output(output_dir, index, jobs[index])
        try:
            result = animator.generate(image, audio, output, job_settings, overwrite, resume=resume, writes=writes)
        except (*INPUT_ERRORS, ValueError) as error:
            failures += 1
            print(f"error: job {index + 1} ({image.name}, {audio.name}): {error}", file=sys.stderr)
            continue
        logger.info("job %d: %s", index + 1, summary(result))
    return failures


def batch_output(output_dir: Path, index: int, job: tuple[str, Path, Path]) -> Path:
    _, image, audio = job
    return output_dir / f"{index:03d}-{image.stem}-{audio.stem}.mp4"


def summary(result: GenerationResult) -> str:
    return (
        f"{result.path} ({result.video_seconds:.2f} s of video, {result.num_frames} frames) in {result.seconds:.1f} s, "
        f"seed {result.seed}"
    )


def check_jobs_before_loading(
    jobs: list[tuple[str, Path, Path]], settings: GenerationSettings, face_analyzer: FaceAnalyzer
) -> dict[int, str]:
    """Job index -> what is wrong with its files, found before the model loads (the slow part)."""
    problems = {}
    for index, (_, image, audio) in enumerate(jobs):
        try:
            read_inputs(image, audio, face_analyzer, settings.max_audio_seconds)
        except INPUT_ERRORS as error:
            problems[index] = f"job {index + 1} ({image.name}, {audio.name}): {error}"
    return problems


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
    setup_console(args.verbose)

    flags = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    settings = GenerationSettings(**{name: getattr(args, name) for name in asdict(DEFAULTS) if name in flags})
    try:
        with stop_on_signals():
            return run_cli(args, settings, batch)
    except SettingError as error:
        print(f"error: {error.naming(flags.get(error.name, error.name))}", file=sys.stderr)
        return 2
    except (*INPUT_ERRORS, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupted:
        reason = f"stopped by {interrupted.signal_name}" if isinstance(interrupted, Interrupted) else "interrupted"
        print(f"error: {reason}; no video was written{kept_clips_hint(args)}.", file=sys.stderr)
        return interrupted.exit_code if isinstance(interrupted, Interrupted) else 130
    except Exception as error:  # an internal failure: one line, the traceback on request
        if args.debug:
            raise
        print(
            f"error: internal failure ({type(error).__name__}: {error}); rerun with --debug for details.",
            file=sys.stderr,
        )
        return 1


def apply_lora(pipeline, path: Path, scale: float) -> None:
    """Fuse the LoRA at `path` (a folder or file written by `save_lora_weights`, or a training run's export) into the
    model at `scale`: no adapter layers stay behind to slow the steps."""
    if not path.exists():
        raise OutputError(f"--lora {path}: no such file or folder.")
    try:
        pipeline.load_lora_weights(str(path), adapter_name="lora")
    except (OSError, ValueError, KeyError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise OutputError(f"--lora {path}: not a LoRA this model can load ({reason}).") from None
    pipeline.fuse_lora(lora_scale=scale)
    pipeline.unload_lora_weights()


def kept_clips_hint(args: argparse.Namespace) -> str:
    """What a stopped run kept, for its last message."""
    saved = [p for p in ([args.output] if args.output else []) if (run_folder(p) / "state.json").is_file()]
    if args.input_list is not None and args.output_dir is not None:
        saved = [p for p in args.output_dir.glob(".*.mp4.run") if (p / "state.json").is_file()]
    return " (its finished clips are kept: run the same command with --resume to continue)" if saved else ""


def join_cfg_parallel_group() -> tuple[int, int, str]:
    """(rank, world size, device) of this process in the default process group that `torchrun` describes in the
    environment: NCCL and this process's GPU, or gloo on a CPU."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise ValueError(
            "--cfg-parallel: start one process per GPU, e.g. `torchrun --nproc_per_node 2 -m hallo3.inference "
            "--cfg-parallel ...` (2 guidance rows; 3 with a separate --audio-guidance-scale)."
        )
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu"
    return dist.get_rank(), dist.get_world_size(), device


def run_cli(args: argparse.Namespace, settings: GenerationSettings, batch: bool) -> int:
    """Every check that needs no model, then the model, then the video(s)."""
    settings.validate()
    check_memory_mode(args.memory_mode)
    from accelerate import PartialState

    if args.cfg_parallel:  # every process makes every video, each computing its guidance rows; one writes
        process_index, num_processes, device = join_cfg_parallel_group()
        split_jobs, writes, is_main = False, process_index == 0, process_index == 0
    else:  # under `accelerate launch` a batch's jobs are split across the processes
        state = PartialState()
        process_index, num_processes = state.process_index, state.num_processes
        split_jobs, writes, is_main = batch and num_processes > 1, True, state.is_main_process
        device = state.device if split_jobs else args.device
    check_device(str(device))
    face_analyzer = FaceAnalyzer(local_model_folders(args.model)[0])
    problems: dict[int, str] = {}
    if batch:
        jobs = read_input_list(args.input_list)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        for index, job in enumerate(jobs):
            check_output_path(batch_output(args.output_dir, index, job), args.overwrite, args.resume)
        problems = check_jobs_before_loading(jobs, settings, face_analyzer)
        for problem in problems.values() if is_main else ():
            print(f"error: {problem}", file=sys.stderr)
    else:
        check_output_path(args.output, args.overwrite, args.resume)
        read_inputs(args.image, args.audio, face_analyzer, settings.max_audio_seconds)

    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    loaded = load_pipeline(args.model, base_model=args.base_model, torch_dtype=dtype, memory_mode=args.memory_mode)
    options = ModelOptions(  # what is done to the model below, for the fingerprint of a resumable run
        base_model=args.base_model,
        lora=args.lora,
        lora_scale=args.lora_scale,
        attention_backend=args.attention_backend,
        step_cache=args.step_cache,
        step_cache_threshold=args.step_cache_threshold,
        compile=args.compile,
        cfg_parallel=args.cfg_parallel,
    )
    animator = PortraitAnimator(loaded, device, args.memory_mode, options)
    if args.attention_backend:
        loaded.pipeline.set_attention_backend(args.attention_backend)
    if args.lora is not None:
        apply_lora(loaded.pipeline, args.lora, args.lora_scale)
    if args.step_cache:
        loaded.pipeline.enable_step_cache(args.step_cache, args.step_cache_threshold)
    if args.compile:
        loaded.pipeline.compile_transformer()
    if args.cfg_parallel:
        loaded.pipeline.enable_cfg_parallel()
    if batch:
        failures = run_batch(
            animator,
            jobs,
            args.output_dir,
            settings,
            process_index if split_jobs else 0,
            num_processes if split_jobs else 1,
            args.overwrite,
            skip=frozenset(problems),
            resume=args.resume,
            writes=writes,
        )
        return 2 if failures or problems else 0
    result = animator.generate(
        args.image, args.audio, args.output, settings, args.overwrite, resume=args.resume, writes=writes
    )
    if writes:
        logger.info("Wrote %s with %s", summary(result), loaded.label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
