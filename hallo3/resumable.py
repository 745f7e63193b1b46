"""Long videos that survive a crash: each clip is saved as it finishes, and a stopped run continues where it stopped.

A 10-minute speech is about 320 clips, hours on one GPU. Without this, an OOM, a preemption or a power cut at clip 300
loses everything. Beside the output `talk.mp4` a run keeps `.talk.mp4.run/`:

- `segment-00000.mp4`, ...: each clip's new frames, encoded (H.264, no audio) and renamed into place when complete;
- `state.json` + `state.safetensors`: what the next clip needs (its index, the frames written, the last decoded
  motion frames, the random generator's state), each segment's frame count and sha256, the sha256 of the tensors
  file, and a fingerprint of everything that decides the frames; written atomically after the clip's segment;
- `lock`: held (`flock`) by the one process writing the run; the kernel lets go of it when that process dies.

`--resume` restores that state and produces exactly the video an uninterrupted run makes (bit for bit on the CPU): an
uninterrupted run goes through the same segments. At the end the segments are joined without re-encoding, the
original audio is muxed in, the joined file's frame count is checked against the audio, the mp4 is renamed into place
and the folder is removed.

What a saved run is trusted with, and how it is checked:

- It continues only under the same `fingerprint`: the two input files' bytes, every setting and seed, and
  `model_setup` (the weights' content, a LoRA's content and scale, quantization, dtype and device, attention backend,
  step cache, compilation, the face and vocal-separation models, the library versions). Offload modes place the same
  weights elsewhere and are not part of it.
- The folder is checked before anything in it is read or removed: it must be a real folder of this user, and it may
  hold only regular files with the names a run writes (`lstat`, never following a link); a symbolic link, a named
  pipe, a device or a file a run does not make stops the command, and nothing is deleted. Files are opened relative
  to the folder's descriptor with O_NOFOLLOW | O_NONBLOCK, so a link swapped in is not followed and a pipe never
  blocks.
- Every segment is checked against the frame count and sha256 the state recorded for it when a run resumes and again
  before the join; the tensors against their shapes (the motion frames of these settings, the generator's state
  size) and their sha256. A missing, extra, reordered, truncated or changed file is refused with one line
  (`ResumeError`, exit 2), not recomputed: the state keeps only the last clip's tensors, so there is no earlier good
  state to go back to, and a folder that changed under a run is a reason to stop, not to guess. `--overwrite` starts
  again (with `--resume` too: continue when the saved run passes its checks, else start again).
"""

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import stat
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .clip_loop import ClipLoopState
from .interrupts import remove_stale_staging, staging_prefix
from .loading import DEFAULT_BASE_MODEL, DEFAULT_WAV2VEC, LoadedModel, Source, official_layout_sources
from .memory import QUANTIZED_MODES
from .preprocessing.audio import SEPARATOR_MODEL, ffmpeg_exe, separation_unavailable
from .video_io import PARTIAL_SUFFIX, VideoWriter, count_frames


logger = logging.getLogger(__name__)

STATE_VERSION = 2
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
LISTING = "segments.txt"
LOCK = "lock"
SEGMENT_NAME = re.compile(r"segment-(\d{5})\.mp4")
# what a killed run leaves in the folder: `_write_atomic`'s temporary files and VideoWriter's staging files
LEFTOVER_NAME = re.compile(
    r"\.(state\.json|state\.safetensors|segments\.txt)\.tmp|\.segment-\d{5}\.\d+\..+\.partial\.mp4"
)
MAX_STATE_JSON_BYTES = 16 << 20  # ~200 bytes per clip: far above any real run
GENERATOR_STATE_SIZE = torch.Generator().get_state().numel()  # the CPU generator the CLI and the app seed


class ResumeError(ValueError):
    """A saved run cannot be continued or trusted (missing, made from other inputs or settings, damaged, or in a
    folder that is not what a run makes); the message says why."""


# --------------------------------------------------------------------------------------------------------------------
# What decides the frames


def fingerprint(image: Path, audio: Path, settings: dict, setup: dict) -> str:
    """What decides the video: both input files' bytes, every setting and `setup` (see `model_setup`). A saved run
    continues only under the same fingerprint."""
    digest = hashlib.sha256()
    for path in (image, audio):
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    digest.update(json.dumps({"settings": settings, "setup": setup}, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelOptions:
    """What the CLI does to a loaded model besides placing it, each of which changes its numbers. `None` / False:
    not done."""

    base_model: str = DEFAULT_BASE_MODEL  # T5 and VAE of a converter-output folder (`--base-model`)
    lora: Path | None = None
    lora_scale: float | None = None
    attention_backend: str | None = None
    step_cache: str | None = None
    step_cache_threshold: float | None = None
    compile: bool = False  # inductor fuses and reorders floating-point operations
    cfg_parallel: bool = False  # one guidance row per process: other matmul batch sizes, other kernels


def model_setup(
    model: LoadedModel, device: str | torch.device, memory_mode: str, face_detector: str, options: ModelOptions
) -> dict[str, object]:
    """Everything besides the inputs and the `GenerationSettings` that decides the frames, for `fingerprint`.
    Reads every weight file of the model on first use (see `file_digests`); call it before the model is placed."""
    device = torch.device(device)
    return {
        "model": model.label,
        "weights": weights_digest(model, options),
        "dtype": str(model.pipeline.dtype),
        # kernels differ between CPU and GPU, and between GPU generations
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "quantization": memory_mode if memory_mode in QUANTIZED_MODES else "none",  # offload: the same numbers
        "lora": None if options.lora is None else {"weights": lora_digest(options.lora), "scale": options.lora_scale},
        "attention_backend": options.attention_backend,
        "step_cache": None
        if options.step_cache is None
        else {"name": options.step_cache, "threshold": options.step_cache_threshold},
        "compile": options.compile,
        "cfg_parallel": options.cfg_parallel,
        "face_detector": face_detector,
        "vocal_separator": separation_unavailable(model.vocal_separator_dir) or SEPARATOR_MODEL,
        "software": software_versions(),
    }


def software_versions() -> dict[str, str]:
    """The libraries whose kernels and initialisation make the numbers: a resumed run after an upgrade would mix two
    versions' frames."""
    versions = {}
    for name in ("hallo3", "torch", "diffusers", "transformers", "safetensors"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def memory_weights_digest(pipeline) -> str:
    """sha256 over the weights and configs of a pipeline as it is in memory: for tiny-random (whatever its
    construction seed, configuration or the libraries' initialisation make) and models built in code (a training
    run's validation), which have no files to read. Each tensor is hashed on its own, four at a time. (Not the
    tokenizer: tiny-random's is trained in code and its vocabulary's order differs from one build to the next.)"""
    items: list[tuple[str, object]] = []
    for name, component in sorted(pipeline.components.items()):
        config = getattr(component, "config", None)
        if config is not None:  # diffusers: a dict; transformers: a PretrainedConfig
            config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
            # not the bookkeeping: `_use_default_values` is a set's order (another in every process), `_name_or_path`
            config = {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}
            items.append((f"{name} config", json.dumps(config, sort_keys=True, default=str)))
        if isinstance(component, torch.nn.Module):
            tensors = {**dict(component.named_parameters()), **dict(component.named_buffers())}
            items += [(f"{name}.{key}", tensor) for key, tensor in sorted(tensors.items())]
        elif hasattr(component, "to_dict") and not hasattr(component, "get_vocab"):  # the audio feature extractor
            items.append((f"{name} config", json.dumps(component.to_dict(), sort_keys=True, default=str)))

    def describe(item: tuple[str, object]) -> str:
        key, value = item
        if isinstance(value, str):
            return f"{key} {hashlib.sha256(value.encode()).hexdigest()}"
        data = value.data  # type: ignore[attr-defined]  # bitsandbytes: the packed bytes
        if type(data) is not torch.Tensor and hasattr(data, "dequantize"):  # torchao's quantized tensors
            data = data.dequantize()
        data = data.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy()
        return f"{key} {data.dtype} {tuple(data.shape)} {hashlib.sha256(raw).hexdigest()}"

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
        return hashlib.sha256("\n".join(pool.map(describe, items)).encode()).hexdigest()


# Files that make a model: weights, configs, tokenizers, code, and the official `latest` pointer (no suffix).
# Hidden files and folders (.cache/, .git/, a download's .metadata) are not part of it.
MODEL_FILE_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".task", ".gguf", ".json", ".yaml", ".yml", ".model"}
    | {".txt", ".py", ""}
)


def weights_digest(model: LoadedModel, options: ModelOptions) -> str:
    """sha256 over the content digests of every file the model was loaded from (`file_digests`), with their paths
    relative to their source: the `--model` folder (or its Hub cache snapshot), and for a converter output or an
    official folder that lacks them, the T5, VAE and wav2vec2 that `hallo3.loading` takes from elsewhere. A model
    with no files (tiny-random, one built in code) is hashed as it is in memory (`memory_weights_digest`)."""
    folder = None if model.is_random else local_source(model.name)
    if folder is None:  # built in code
        return memory_weights_digest(model.pipeline)
    sources: list[tuple[str, str, tuple[str, ...] | None]] = [("model", str(folder), None)]
    if not (folder / "model_index.json").is_file():  # not a whole pipeline: the parts hallo3.loading borrows
        if (folder / "hallo3" / "latest").is_file():
            text, vae, wav2vec = official_layout_sources(folder, options.base_model, None)
        else:
            text, vae = Source(options.base_model, "text_encoder"), Source(options.base_model, "vae")
            wav2vec = DEFAULT_WAV2VEC
        sources.append(("text encoder", text.path, ("text_encoder", "tokenizer") if text.subfolder else None))
        sources.append(("vae", vae.path, (vae.subfolder,) if vae.subfolder else None))
        sources.append(("wav2vec2", wav2vec, None))
    lines = []
    for role, name, parts in sources:
        source = local_source(name)
        if source is None:
            raise ResumeError(f"--model {model.name}: its {role} ({name}) has no local folder to fingerprint.")
        if role != "model" and source.resolve().is_relative_to(folder.resolve()):
            continue  # inside the model folder: read with it
        for relative, size, sha in folder_digests(source, parts):
            lines.append(f"{role}\0{relative}\0{size}\0{sha}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def lora_digest(path: Path) -> str:
    """sha256 of a LoRA file, or over the model files of a LoRA folder. A missing path is refused by `apply_lora`."""
    if path.is_dir():
        return hashlib.sha256("".join(f"{r}\0{n}\0{s}\n" for r, n, s in folder_digests(path)).encode()).hexdigest()
    return file_digests([path])[0] if path.is_file() else "missing"


def local_source(name: str) -> Path | None:
    """A model source as a local folder: a folder path, or a Hub repo id already in the local Hub cache."""
    if Path(name).is_dir():
        return Path(name)
    if name.count("/") != 1 or name.startswith((".", "/")):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def folder_digests(folder: Path, parts: tuple[str, ...] | None = None) -> list[tuple[str, int, str]]:
    """(relative path, size, sha256) of the model files under `folder` (or its subfolders `parts`), sorted."""
    files = []
    seen: set[tuple[int, int]] = set()
    roots = [folder / part for part in parts] if parts else [folder]
    for root in roots:
        for current, dirs, names in os.walk(root, followlinks=True):  # Hub snapshots link to their blobs
            info = os.stat(current)
            if (info.st_dev, info.st_ino) in seen:  # a link back up the tree
                dirs.clear()
                continue
            seen.add((info.st_dev, info.st_ino))
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in names:
                path = Path(current) / name
                if not name.startswith(".") and path.suffix in MODEL_FILE_SUFFIXES and path.is_file():
                    files.append(path)
    files.sort()
    return [(str(path.relative_to(folder)), path.stat().st_size, sha) for path, sha in zip(files, file_digests(files))]


def digest_cache_path() -> Path:
    """Where `file_digests` remembers what it has read: the user's cache folder (XDG)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hallo3" / "file-digests.json"


def file_digests(paths: list[Path]) -> list[str]:
    """The sha256 of each file's content, read in full once and remembered per (real path, size, mtime, ctime,
    inode, device).

    Why a full digest: a sampled digest (header + strided bytes) misses a change between its samples, and size and
    mtime alone miss a change that keeps them (`touch -d`, a same-size copy). The ctime in the key cannot be set back
    by a user: any write or rename of the file changes it, so a remembered digest is only reused for bytes that have
    not been touched since they were read. The cost is one read of each weight file on first use (measured: 0.9 s of
    CPU per GB from the page cache; four files at a time, so a 30 GB model takes about 7 s on four free cores, less
    than loading it), then one `stat` per file (0.1 ms).
    """
    cache_path = digest_cache_path()
    try:
        cache = json.loads(cache_path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    keys = []
    for path in paths:
        real = os.path.realpath(path)
        info = os.stat(real)
        keys.append((real, f"{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}:{info.st_ino}:{info.st_dev}"))
    wanted = dict(keys)
    missing = sorted(real for real, key in wanted.items() if not _remembered(cache.get(real), key))
    if missing:

        def sha256_of(real: str) -> str:
            with open(real, "rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest()

        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
            for real, sha in zip(missing, pool.map(sha256_of, missing)):
                cache[real] = {"key": wanted[real], "sha256": sha}
        # the key is read before the content: a file written while it was read gets a new ctime, so a stale digest
        # is never reused; a lost update of the cache (two processes at once) only costs a second read
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=cache_path.parent, prefix=".file-digests.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(cache, f)
            os.replace(temp, cache_path)
        except OSError as error:
            logger.info(
                "Could not remember the weights' digests in %s (%s); they are read again next time.", cache_path, error
            )
    return [cache[real]["sha256"] for real, _ in keys]


def _remembered(entry: object, key: str) -> bool:
    return isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("sha256"), str)


# --------------------------------------------------------------------------------------------------------------------
# The run folder


def run_folder(output: Path) -> Path:
    return output.parent / f".{output.name}.run"


def saved_seed(output: Path) -> int | None:
    """The seed of the unfinished run saved beside `output`, if there is one (None also when the folder is not one a
    run makes: `ResumableVideo.start` then says why)."""
    try:
        folder_fd = _open_folder(run_folder(output))
    except (OSError, ResumeError):
        return None
    try:
        seed = json.loads(_read_regular(folder_fd, STATE_JSON, MAX_STATE_JSON_BYTES)).get("seed")
    except (OSError, ValueError, AttributeError):
        return None
    finally:
        os.close(folder_fd)
    return seed if isinstance(seed, int) else None


def _kind(mode: int) -> str:
    """A file type in words, for the messages."""
    kinds = [
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
        (stat.S_ISDIR, "a folder"),
    ]
    return next((words for test, words in kinds if test(mode)), "a file")


def _open_folder(folder: Path) -> int:
    """A descriptor of `folder`, checked to be a real folder (not a link to one) of this user."""
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise ResumeError(f"{folder} is {_kind(info.st_mode)}, not a folder; a run keeps its clips in a real folder.")
    if info.st_uid != os.geteuid():
        raise ResumeError(f"{folder} belongs to another user; a run only continues its own clips.")
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):  # replaced between the two calls
        os.close(fd)
        raise ResumeError(f"{folder} changed while it was opened.")
    return fd


def _open_regular(folder_fd: int, name: str, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
    """Open `name` in the folder if it is a regular file (or, with O_CREAT, missing); anything else is refused by its
    `lstat`, unopened. O_NOFOLLOW and O_NONBLOCK cover a swap between the two calls: a link is not followed, a pipe
    does not block."""
    try:
        info = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise
    else:
        if not stat.S_ISREG(info.st_mode):
            raise ResumeError(f"{name}, {_kind(info.st_mode)}")
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=folder_fd)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ResumeError(f"{name}, {_kind(info.st_mode)}")
    return fd


def _read_regular(folder_fd: int, name: str, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (checked before reading)."""
    fd = _open_regular(folder_fd, name)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ResumeError(f"{name}, {size} bytes (a run writes at most {limit})")
        return f.read(limit + 1)


def _sha256_regular(folder_fd: int, name: str) -> str:
    with os.fdopen(_open_regular(folder_fd, name), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass(frozen=True)
class Segment:
    """A finished clip's segment as the state records it."""

    frames: int
    sha256: str


class ResumableVideo:
    """The segments and state of one video being made; see the module docstring. Use as a context manager (or call
    `close`): the lock is held from `start` until then.

    Args:
        output (`Path`): the final mp4.
        fingerprint (`str`): from `fingerprint`; a saved run made under another one is refused.
        audio_path (`Path`): the original audio, muxed in at the end.
        fps (`int`): 25.
        metadata (`dict`): container tags of the final mp4.
        seed (`int`): the run's seed, saved so that `--resume` without `--seed` continues with it.
        num_frames (`int`): frames of the whole video, ceil(audio seconds x fps): the segments must add up to it.
        motion_shape (`tuple`, *optional*): [K, 3, H, W] of the motion frames carried between clips (None: K = 0).
        writes (`bool`): False for the processes of a CFG-parallel run other than the first: they compute the same
            video, read the saved state, and write nothing.
    """

    def __init__(
        self,
        output: Path,
        fingerprint: str,
        audio_path: Path,
        fps: int,
        metadata: dict[str, str],
        seed: int,
        num_frames: int,
        motion_shape: tuple[int, int, int, int] | None,
        writes: bool = True,
    ):
        self.output = output
        self.writes = writes
        self.seed = seed
        self.folder = run_folder(output)
        self.fingerprint = fingerprint
        self.audio_path = audio_path
        self.fps = fps
        self.metadata = metadata
        self.num_frames = num_frames
        self.motion_shape = motion_shape
        self.segments: list[Segment] = []
        self._folder_fd: int | None = None
        self._lock_fd: int | None = None

    def __enter__(self) -> "ResumableVideo":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Let go of the folder and its lock (a finished or failed run). The lock file is removed while it is still
        held (`_lock` checks that the file it locked is still the one named `lock`); a killed run leaves it, and the
        kernel has let go of its lock."""
        if self._lock_fd is not None and self._folder_fd is not None:
            try:
                os.unlink(LOCK, dir_fd=self._folder_fd)
            except FileNotFoundError:
                pass
        for fd in (self._lock_fd, self._folder_fd):
            if fd is not None:
                os.close(fd)
        self._lock_fd = self._folder_fd = None

    def _refuse(self, reason: str) -> ResumeError:
        return ResumeError(f"output {self.output}: {reason}")

    # ------------------------------------------------------------------------------------------------------------
    # start: the folder, its lock, its saved state

    def start(self, resume: bool, overwrite: bool) -> ClipLoopState | None:
        """Prepare the folder. With `resume`, return the checked saved state (None: nothing saved yet, start at clip
        0); without it a saved run is an error unless `overwrite` discards it. `resume` and `overwrite` together:
        continue a saved run that passes its checks, else start again."""
        if not self.writes:
            return self._read_only_state() if resume else None
        try:
            try:
                os.mkdir(self.folder)
            except FileExistsError:
                pass
            self._folder_fd = _open_folder(self.folder)
            self._lock()
        except (ResumeError, OSError) as error:
            self.close()
            raise self._refuse(str(error)) from None
        if os.path.lexists(self.output) and not overwrite:  # made by a run that finished since the command started
            raise self._refuse("already exists; choose another name or pass --overwrite.")
        entries = self._inventory()
        state = None
        if STATE_JSON in entries:
            if not resume and not overwrite:
                raise self._refuse(
                    "an unfinished run is saved beside it; pass --resume to continue it, or --overwrite to start again."
                )
            if resume:
                try:
                    state = self._saved_state(entries)
                except ResumeError as error:
                    if not overwrite:
                        raise
                    logger.info("%s; starting again.", error)
        next_clip = state.next_clip if state is not None else 0
        for name, index in entries.items():  # what a run of these clips does not need: ours to remove
            keep = name in (STATE_JSON, STATE_TENSORS) or (index is not None and index < next_clip)
            if name != LOCK and (state is None or not keep):
                os.unlink(name, dir_fd=self._folder_fd)
        return state

    def _lock(self) -> None:
        """Hold the folder's lock, or refuse: another process is writing this output. A dead holder's lock is free
        (the kernel drops a process's locks when it exits, however it exits)."""
        assert self._folder_fd is not None
        try:
            lock_fd = _open_regular(self._folder_fd, LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except ResumeError as error:
            raise ResumeError(f"{self.folder} holds {error}; a run's folder holds only the files it writes.") from None
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(lock_fd, 32, 0).decode(errors="replace").strip() or "another process"
                raise ResumeError(
                    f"another run (process {holder}) is writing it now; wait for it to end or stop it first."
                ) from None
            try:
                named = os.stat(LOCK, dir_fd=self._folder_fd, follow_symlinks=False)
            except FileNotFoundError:
                named = None
            if named is None or named.st_ino != os.fstat(lock_fd).st_ino:  # removed by a run that just finished
                raise ResumeError("another run finished writing it a moment ago; run the command again.")
        except BaseException:
            os.close(lock_fd)  # not ours: `close` must not remove it
            raise
        self._lock_fd = lock_fd
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)

    def _inventory(self) -> dict[str, int | None]:
        """Name -> segment index (None for the other files) of every entry of the folder, each checked to be a
        regular file with a name a run writes, without following links (`lstat`)."""
        assert self._folder_fd is not None
        entries: dict[str, int | None] = {}
        with os.scandir(self._folder_fd) as scan:
            for entry in scan:
                mode = entry.stat(follow_symlinks=False).st_mode
                if not stat.S_ISREG(mode):
                    raise self._refuse(
                        f"{self.folder} holds {entry.name}, {_kind(mode)}; a run's folder holds only the files it "
                        f"writes, so it is left as it is. Move it away, or choose another output."
                    )
                segment = SEGMENT_NAME.fullmatch(entry.name)
                if not (segment or entry.name in (STATE_JSON, STATE_TENSORS, LISTING, LOCK)):
                    if not LEFTOVER_NAME.fullmatch(entry.name):
                        raise self._refuse(
                            f"{self.folder} holds {entry.name}, which a run does not write; it is left as it is. "
                            f"Move it away, or choose another output."
                        )
                entries[entry.name] = int(segment.group(1)) if segment else None
        return entries

    def _read_only_state(self) -> ClipLoopState | None:
        """The saved state for a process that writes nothing: checked like the writer's, segments aside (the writer
        checks those, and may be removing a stale one meanwhile)."""
        try:
            self._folder_fd = _open_folder(self.folder)
        except FileNotFoundError:
            return None
        except (ResumeError, OSError) as error:
            raise self._refuse(str(error)) from None
        try:
            return self._saved_state(None)
        except FileNotFoundError:
            return None
        finally:
            self.close()

    def _saved_state(self, entries: dict[str, int | None] | None) -> ClipLoopState:
        """The saved state, every part of it checked (see the module docstring); `entries` None: segments unchecked."""
        assert self._folder_fd is not None
        try:
            saved = json.loads(_read_regular(self._folder_fd, STATE_JSON, MAX_STATE_JSON_BYTES))
        except ResumeError as error:
            raise self._refuse(f"{self.folder} holds {error}; pass --overwrite to start again.") from None
        except FileNotFoundError:
            raise
        except OSError as error:  # a link (O_NOFOLLOW)
            raise self._refuse(f"{self.folder}/{STATE_JSON}: {error.strerror}.") from None
        except ValueError:  # UnicodeDecodeError too
            raise self._refuse(
                f"{self.folder}/{STATE_JSON} is damaged (not JSON); pass --overwrite to start again."
            ) from None
        if not isinstance(saved, dict) or saved.get("version") != STATE_VERSION:
            raise self._refuse(
                f"{self.folder}/{STATE_JSON} was written by another version of hallo3; pass --overwrite to start again."
            )
        if saved.get("fingerprint") != self.fingerprint:
            raise self._refuse(
                "the saved run was made from other inputs, settings or model; it cannot be continued with these "
                "(pass --overwrite to start again)."
            )
        next_clip, frames_done, records = saved.get("next_clip"), saved.get("frames_done"), saved.get("segments", [])
        try:
            segments = [Segment(int(r["frames"]), str(r["sha256"])) for r in records]
        except (TypeError, KeyError, ValueError):
            segments = []
        if not (
            isinstance(next_clip, int)
            and isinstance(frames_done, int)
            and 1 <= next_clip == len(segments)
            and all(s.frames > 0 for s in segments)
            and frames_done == sum(s.frames for s in segments) <= self.num_frames
        ):
            raise self._refuse(
                f"{self.folder}/{STATE_JSON} does not add up (clips, frames and segments disagree, or more frames than "
                f"the audio's {self.num_frames}); pass --overwrite to start again."
            )
        if entries is not None:
            self._check_segments(entries, segments)
        motion, generator_state = self._saved_tensors(str(saved.get("tensors_sha256")))
        self.segments = segments
        return ClipLoopState(next_clip, frames_done, motion, generator_state)

    def _saved_tensors(self, sha256: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The motion frames and generator state, checked against their recorded sha256, their shapes and values."""
        assert self._folder_fd is not None
        motion_bytes = math.prod(self.motion_shape) * 4 if self.motion_shape else 0
        broken = self._refuse(
            f"{self.folder}/{STATE_TENSORS} is missing, is not the one its state recorded, or holds tensors these "
            f"settings do not make; pass --overwrite to start again."
        )
        try:
            data = _read_regular(self._folder_fd, STATE_TENSORS, motion_bytes + GENERATOR_STATE_SIZE + 4096)
        except (OSError, ResumeError):
            raise broken from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise broken
        try:
            tensors = load_tensors(data)
        except (SafetensorError, ValueError):
            raise broken from None
        generator_state, motion = tensors.pop("generator_state", None), tensors.pop("motion", None)
        if tensors or generator_state is None:
            raise broken
        if generator_state.dtype != torch.uint8 or tuple(generator_state.shape) != (GENERATOR_STATE_SIZE,):
            raise broken
        if (motion is None) != (self.motion_shape is None):
            raise broken
        if motion is not None:
            if motion.dtype != torch.float32 or tuple(motion.shape) != self.motion_shape:
                raise broken
            if not bool(torch.isfinite(motion).all()) or motion.abs().max() > 1:  # decoded frames in [-1, 1]
                raise broken
        return motion, generator_state

    def _check_segments(self, entries: dict[str, int | None], segments: list[Segment]) -> None:
        """Every segment of `segments` is there with the sha256 recorded for it, and nothing but the one segment a run
        killed between a segment and its state can leave (the next clip's) is there besides."""
        assert self._folder_fd is not None
        present = {index for index in entries.values() if index is not None}
        expected = set(range(len(segments)))
        missing, extra = sorted(expected - present), sorted(present - expected - {len(segments)})
        if missing or extra:
            problem = f"misses {segment_name(missing[0])}" if missing else f"has an extra {segment_name(extra[0])}"
            raise self._refuse(
                f"{self.folder} {problem} (its state records {len(segments)} segments); pass --overwrite to "
                f"start again."
            )
        for index, segment in enumerate(segments):
            if _sha256_regular(self._folder_fd, segment_name(index)) != segment.sha256:
                raise self._refuse(
                    f"{self.folder}/{segment_name(index)} is not the segment its state recorded (changed, truncated "
                    f"or swapped); pass --overwrite to start again."
                )

    # ------------------------------------------------------------------------------------------------------------
    # writing

    def _check_same_folder(self) -> None:
        """The folder is still the one `start` checked (not replaced, e.g. by a link, since)."""
        assert self._folder_fd is not None
        opened, now = os.fstat(self._folder_fd), os.lstat(self.folder)
        if (opened.st_dev, opened.st_ino) != (now.st_dev, now.st_ino):
            raise self._refuse(f"{self.folder} was replaced while the run was writing it.")

    def _write_atomic(self, name: str, data: bytes) -> None:
        """`name` in the folder gets `data` all at once: written to a new file, synced, renamed over it."""
        assert self._folder_fd is not None
        temp = f".{name}.tmp"
        try:
            os.unlink(temp, dir_fd=self._folder_fd)  # a killed run's, checked by `_inventory`
        except FileNotFoundError:
            pass
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(temp, flags, 0o666, dir_fd=self._folder_fd), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, name, src_dir_fd=self._folder_fd, dst_dir_fd=self._folder_fd)

    def save_state(self, state: ClipLoopState) -> None:
        """After a clip's segment: the state that continues from it, written so that a kill never leaves half of it."""
        if not self.writes:
            return
        if state.next_clip != len(self.segments):
            raise RuntimeError(f"clip {state.next_clip} ended with {len(self.segments)} segments written")
        tensors = {}
        if state.motion is not None:
            tensors["motion"] = state.motion.detach().to("cpu", torch.float32).contiguous()
        if state.generator_state is not None:
            tensors["generator_state"] = state.generator_state.contiguous()
        data = save_tensors(tensors)
        info = {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "seed": self.seed,
            "next_clip": state.next_clip,
            "frames_done": state.frames_done,
            "segments": [{"frames": s.frames, "sha256": s.sha256} for s in self.segments],
            "tensors_sha256": hashlib.sha256(data).hexdigest(),
        }
        self._check_same_folder()
        # the tensors first, then the json that refers to them: a state.json always has its tensors
        self._write_atomic(STATE_TENSORS, data)
        self._write_atomic(STATE_JSON, json.dumps(info).encode())

    def write_segment(self, frames: np.ndarray) -> None:
        """One clip's new frames (uint8 [n, H, W, 3]) as the next segment."""
        if not self.writes:
            return
        assert self._folder_fd is not None
        self._check_same_folder()
        name = segment_name(len(self.segments))
        with VideoWriter(self.folder / name, fps=self.fps) as writer:
            writer.write(frames)
        self.segments.append(Segment(len(frames), _sha256_regular(self._folder_fd, name)))

    def finish(self) -> Path:
        """Check the segments again, join them (no re-encoding) with the original audio, check the joined file's
        frame count, rename it into place, remove the folder."""
        if not self.writes:
            return self.output
        assert self._folder_fd is not None
        self._check_same_folder()
        self._check_segments(self._inventory(), self.segments)
        recorded = sum(s.frames for s in self.segments)
        if recorded != self.num_frames:
            raise self._refuse(f"the saved segments hold {recorded} frames; the audio needs {self.num_frames}.")
        self._write_atomic(LISTING, "".join(f"file '{segment_name(i)}'\n" for i in range(len(self.segments))).encode())
        remove_stale_staging(self.output.parent, self.output.stem, PARTIAL_SUFFIX)
        temp = None
        try:  # whatever stops the join (an error, a signal) removes the half-written file
            fd, temp = tempfile.mkstemp(
                prefix=staging_prefix(self.output.stem), suffix=PARTIAL_SUFFIX, dir=self.output.parent
            )
            os.close(fd)
            command = [ffmpeg_exe(), "-v", "error", "-nostdin", "-y", "-f", "concat", "-safe", "0"]
            command += ["-i", str(self.folder / LISTING), "-i", str(self.audio_path), "-map", "0:v:0", "-map", "1:a:0"]
            command += ["-c:v", "copy", "-c:a", "aac", "-b:a", "192k", "-movflags", "+faststart"]
            for key, value in self.metadata.items():
                command += ["-metadata", f"{key}={value}"]
            result = subprocess.run([*command, "-f", "mp4", temp], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"ffmpeg failed joining {self.output}: {result.stderr.strip()[-500:]}")
            joined = count_frames(temp)
            if joined != self.num_frames:
                raise self._refuse(
                    f"the joined segments have {joined} frames; the audio needs {self.num_frames} (ceil(seconds x "
                    f"{self.fps})), so the video is not written. Pass --overwrite to start again."
                )
            umask = os.umask(0)
            os.umask(umask)
            Path(temp).chmod(0o666 & ~umask)
            Path(temp).replace(self.output)
        except BaseException:
            if temp is not None:
                Path(temp).unlink(missing_ok=True)
            raise
        self._remove_folder()
        return self.output

    def _remove_folder(self) -> None:
        """Remove the files a run writes, by name inside the checked folder (never following a link), then the
        folder; anything else found there is kept and named in the log."""
        assert self._folder_fd is not None
        try:
            entries = self._inventory()
        except ResumeError as error:
            logger.warning("the run folder is kept: %s", error)
            return
        for name in entries:
            if name != LOCK:  # removed by `close`, held until then
                os.unlink(name, dir_fd=self._folder_fd)
        self.close()
        try:
            os.rmdir(self.folder)  # a link put in its place since is not removed: rmdir refuses it
        except OSError as error:
            logger.warning("Kept %s: %s.", self.folder, error.strerror)


def segment_name(index: int) -> str:
    return f"segment-{index:05d}.mp4"
