"""Long videos that survive a crash: each clip is saved as it finishes, and a stopped run continues where it stopped.

A 10-minute speech is about 320 clips, hours on one GPU. Without this, an OOM, a preemption or a power cut at clip 300
loses everything. Beside the output `talk.mp4` a run keeps `.talk.mp4.run/`:

- `segment-00000.mp4`, ...: each clip's new frames, encoded (H.264, no audio) and renamed into place when complete;
- `state.json` + `state.safetensors`: what the next clip needs (its index, the frames written, the last decoded
  motion frames, the random generator's state) and a fingerprint of the inputs and settings, written atomically after
  the clip's segment.

`--resume` restores that state and produces exactly the video an uninterrupted run makes (bit for bit on the CPU): an
uninterrupted run goes through the same segments. At the end the segments are joined without re-encoding, the
original audio is muxed in, the mp4 is renamed into place and the folder is removed.
"""

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .clip_loop import ClipLoopState
from .interrupts import remove_stale_staging, staging_prefix
from .preprocessing.audio import ffmpeg_exe
from .video_io import PARTIAL_SUFFIX, VideoWriter


STATE_VERSION = 1


class ResumeError(ValueError):
    """A saved run cannot be continued (missing, or made from other inputs or settings); the message says why."""


def fingerprint(image: Path, audio: Path, settings: dict, model: str) -> str:
    """What decides the video: both input files' bytes, every setting and the model. A saved run continues only
    under the same fingerprint."""
    digest = hashlib.sha256()
    for path in (image, audio):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    digest.update(json.dumps({"settings": settings, "model": model}, sort_keys=True).encode())
    return digest.hexdigest()


def run_folder(output: Path) -> Path:
    return output.parent / f".{output.name}.run"


def saved_seed(output: Path) -> int | None:
    """The seed of the unfinished run saved beside `output`, if there is one."""
    path = run_folder(output) / "state.json"
    return json.loads(path.read_text()).get("seed") if path.is_file() else None


class ResumableVideo:
    """The segments and state of one video being made; see the module docstring.

    Args:
        output (`Path`): the final mp4.
        fingerprint (`str`): from `fingerprint`; a saved run made under another one is refused.
        audio_path (`Path`): the original audio, muxed in at the end.
        fps (`int`): 25.
        metadata (`dict`): container tags of the final mp4.
        seed (`int`): the run's seed, saved so that `--resume` without `--seed` continues with it.
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
        self.num_segments = 0

    # ------------------------------------------------------------------------------------------------------------
    # state

    def saved_state(self) -> dict | None:
        """The saved run's state.json, or None when there is none."""
        path = self.folder / "state.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def start(self, resume: bool, overwrite: bool) -> ClipLoopState | None:
        """Prepare the folder. With `resume`, return the saved state (None: nothing saved yet, start at clip 0);
        without it a saved run is an error unless `overwrite` discards it."""
        saved = self.saved_state()
        if not self.writes:
            return self._state(saved) if resume and saved is not None else None
        if saved is not None and not resume:
            if not overwrite:
                raise ResumeError(
                    f"output {self.output}: an unfinished run is saved beside it ({saved['next_clip']} clips done); "
                    f"pass --resume to continue it, or --overwrite to start again."
                )
            shutil.rmtree(self.folder)
            saved = None
        if saved is not None and saved.get("fingerprint") != self.fingerprint:
            raise ResumeError(
                f"output {self.output}: the saved run was made from other inputs, settings or model; it cannot be "
                f"continued with these (pass --overwrite to start again)."
            )
        self.folder.mkdir(exist_ok=True)
        if saved is None:
            return None
        self.num_segments = saved["next_clip"]
        for stale in self.folder.glob("segment-*"):  # a segment of a clip whose state was never saved
            if int(stale.name.split("-")[1].split(".")[0]) >= self.num_segments:
                stale.unlink()
        return self._state(saved)

    def _state(self, saved: dict) -> ClipLoopState:
        tensors = load_file(self.folder / "state.safetensors")
        return ClipLoopState(
            next_clip=saved["next_clip"],
            frames_done=saved["frames_done"],
            motion=tensors.get("motion"),
            generator_state=tensors.get("generator_state"),
        )

    def save_state(self, state: ClipLoopState) -> None:
        """After a clip's segment: the state that continues from it, written so that a kill never leaves half of it."""
        if not self.writes:
            return
        tensors = {}
        if state.motion is not None:
            tensors["motion"] = state.motion.detach().to("cpu", torch.float32).contiguous()
        if state.generator_state is not None:
            tensors["generator_state"] = state.generator_state.contiguous()
        info = {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "seed": self.seed,
            "next_clip": state.next_clip,
            "frames_done": state.frames_done,
        }
        # the tensors first, then the json that refers to them: a state.json always has its tensors
        _atomic(self.folder / "state.safetensors", lambda path: save_file(tensors, path))
        _atomic(self.folder / "state.json", lambda path: Path(path).write_text(json.dumps(info)))

    # ------------------------------------------------------------------------------------------------------------
    # frames

    def write_segment(self, frames: np.ndarray) -> None:
        """One clip's new frames (uint8 [n, H, W, 3]) as the next segment."""
        if not self.writes:
            return
        with VideoWriter(self.folder / f"segment-{self.num_segments:05d}.mp4", fps=self.fps) as writer:
            writer.write(frames)
        self.num_segments += 1

    def finish(self) -> Path:
        """Join the segments (no re-encoding), mux the original audio, rename into place, remove the folder."""
        if not self.writes:
            return self.output
        segments = [self.folder / f"segment-{i:05d}.mp4" for i in range(self.num_segments)]
        listing = self.folder / "segments.txt"
        listing.write_text("".join(f"file '{segment.name}'\n" for segment in segments))
        remove_stale_staging(self.output.parent, self.output.stem, PARTIAL_SUFFIX)
        fd, temp = tempfile.mkstemp(
            prefix=staging_prefix(self.output.stem), suffix=PARTIAL_SUFFIX, dir=self.output.parent
        )

        os.close(fd)
        command = [ffmpeg_exe(), "-v", "error", "-y", "-f", "concat", "-safe", "0", "-i", str(listing)]
        command += ["-i", str(self.audio_path), "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy"]
        command += ["-c:a", "aac", "-b:a", "192k", "-movflags", "+faststart"]
        for key, value in self.metadata.items():
            command += ["-metadata", f"{key}={value}"]
        result = subprocess.run([*command, "-f", "mp4", temp], capture_output=True, text=True)
        try:
            if result.returncode != 0:
                raise RuntimeError(f"ffmpeg failed joining {self.output}: {result.stderr.strip()[-500:]}")
            umask = os.umask(0)
            os.umask(umask)
            Path(temp).chmod(0o666 & ~umask)
            Path(temp).replace(self.output)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        shutil.rmtree(self.folder, ignore_errors=True)
        return self.output


def _atomic(path: Path, write) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    write(str(temp))
    with open(temp, "rb") as f:
        os.fsync(f.fileno())
    temp.replace(path)
