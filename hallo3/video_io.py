"""Frames + the original audio -> H.264/AAC mp4, streamed to ffmpeg and written atomically (architecture 7.5).

Frames go to the encoder as they are produced, so memory does not grow with the video's length. The file appears
under its final name only when it is complete; a failure leaves nothing.
"""

import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .interrupts import remove_stale_staging, staging_prefix
from .preprocessing.audio import ffmpeg_exe


PARTIAL_SUFFIX = ".partial.mp4"


class VideoWriter:
    """Streams uint8 RGB frames [n, H, W, 3] into an mp4 with `audio_path` muxed in (AAC).

    Use as a context manager: on a clean exit the temporary file is renamed to `path`; on an exception it is removed.

    Args:
        path (`Path`): the output .mp4.
        fps (`int`): 25 for Hallo3.
        audio_path (`Path`, *optional*): the user's original audio file (not the separated vocals).
        metadata (`dict`, *optional*): container tags, e.g. {"comment": "..."}.
    """

    def __init__(
        self,
        path: str | Path,
        fps: int = 25,
        audio_path: str | Path | None = None,
        metadata: dict[str, str] | None = None,
        crf: int = 18,
    ):
        self.path = Path(path)
        self.fps = fps
        self.audio_path = audio_path
        self.metadata = metadata or {}
        self.crf = crf
        self.process: subprocess.Popen[bytes] | None = None
        self.num_frames = 0
        remove_stale_staging(self.path.parent, self.path.stem, PARTIAL_SUFFIX)
        fd, temp = tempfile.mkstemp(prefix=staging_prefix(self.path.stem), suffix=PARTIAL_SUFFIX, dir=self.path.parent)
        os.close(fd)
        self.temp_path = Path(temp)

    def _start(self, height: int, width: int) -> subprocess.Popen[bytes]:
        cmd = [
            ffmpeg_exe(),
            "-v",
            "error",
            "-y",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{width}x{height}",
            "-r",
            str(self.fps),
            "-i",
            "-",
        ]
        if self.audio_path is not None:
            cmd += ["-i", str(self.audio_path), "-map", "0:v:0", "-map", "1:a:0", "-c:a", "aac", "-b:a", "192k"]
        cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(self.crf), "-movflags", "+faststart"]
        for key, value in self.metadata.items():
            cmd += ["-metadata", f"{key}={value}"]
        cmd += ["-f", "mp4", str(self.temp_path)]
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)

    def write(self, frames: np.ndarray) -> None:
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [n, H, W, 3], got {frames.dtype} {frames.shape}.")
        if self.process is None:
            self.process = self._start(frames.shape[1], frames.shape[2])
        try:
            self.process.stdin.write(np.ascontiguousarray(frames).tobytes())  # type: ignore[union-attr]  # a PIPE
        except BrokenPipeError:
            raise RuntimeError(f"ffmpeg stopped while writing {self.path}: {self._stderr()}") from None
        self.num_frames += len(frames)

    def _stderr(self) -> str:
        if self.process is None or self.process.stderr is None:
            return ""
        return self.process.stderr.read().decode(errors="replace").strip()

    def close(self) -> Path:
        if self.process is None:
            raise RuntimeError("no frames were written")
        self.process.stdin.close()  # type: ignore[union-attr]  # a PIPE
        if self.process.wait() != 0:
            raise RuntimeError(f"ffmpeg failed writing {self.path}: {self._stderr()}")
        # mkstemp makes the file private (0600); the finished video gets the permissions any new file would get
        umask = os.umask(0)
        os.umask(umask)
        self.temp_path.chmod(0o666 & ~umask)
        self.temp_path.replace(self.path)
        return self.path

    def abort(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.temp_path.unlink(missing_ok=True)

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def count_frames(path: str | Path) -> int:
    """The number of video frames of an mp4, counted by ffmpeg from its packets without decoding them (seconds for an
    hour of video, no memory); -1 when ffmpeg cannot read it."""
    result = subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-nostdin", "-i", str(path), "-map", "0:v:0", "-c", "copy", "-f", "null"]
        + ["-progress", "pipe:1", "-nostats", "-"],
        capture_output=True,
        text=True,
    )
    counts = re.findall(r"^frame=(\d+)$", result.stdout, flags=re.MULTILINE)
    return int(counts[-1]) if result.returncode == 0 and counts else -1


def probe_video(path: str | Path) -> dict:
    """Frame count, fps, size and stream durations of an mp4, read with ffmpeg (no ffprobe is bundled)."""
    info = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    decoded = subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-i", str(path), "-map", "0:v:0", "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True,
    )
    size = re.search(r"Video: .*?(\d{2,5})x(\d{2,5})", info)
    fps = re.search(r"(\d+(?:\.\d+)?) fps", info)
    width, height = (int(size.group(1)), int(size.group(2))) if size else (0, 0)
    num_frames = len(decoded.stdout) // (width * height * 3) if width else 0
    audio = re.search(r"Audio: (\w+)", info)
    audio_seconds = None
    if audio:
        pcm = subprocess.run(
            [
                ffmpeg_exe(),
                "-v",
                "error",
                "-i",
                str(path),
                "-map",
                "0:a:0",
                "-ac",
                "1",
                "-ar",
                "16000",
                "-f",
                "f32le",
                "-",
            ],
            capture_output=True,
        )
        audio_seconds = len(pcm.stdout) / 4 / 16000
    return {
        "ok": decoded.returncode == 0,
        "width": width,
        "height": height,
        "fps": float(fps.group(1)) if fps else None,
        "num_frames": num_frames,
        "video_codec": (re.search(r"Video: (\w+)", info) or [None, None])[1],
        "audio_codec": audio.group(1) if audio else None,
        "audio_seconds": audio_seconds,
        "comment": (re.search(r"comment\s*:\s*(.+)", info) or [None, None])[1],
    }
