"""Stopped runs: signals (Ctrl-C, a scheduler's time limit, `docker stop`, a closed terminal) as one exception, and
the leftovers of runs that were killed outright.

Python turns only SIGINT into `KeyboardInterrupt`; SIGTERM and SIGHUP kill the process on the spot, so a writer's
cleanup (`VideoWriter`, the converter's staging folder) never runs and a half-written file stays behind. Inside
`stop_on_signals()` all three raise `Interrupted`, a `KeyboardInterrupt`, so the same cleanup handles every one.
"""

import os
import signal
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; `exit_code` is the shell's convention for it (128 + the signal number)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Raise `Interrupted` in the main thread on SIGINT, SIGTERM or SIGHUP while the block runs."""
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def staging_prefix(name: str) -> str:
    """Prefix of a run's temporary file or folder for the output `name`; it carries the writer's process id, so
    that a later run can tell a dead run's leftover from a live run's work."""
    return f".{name}.{os.getpid()}."


def remove_stale_staging(folder: Path, name: str, suffix: str) -> list[Path]:
    """Delete what killed runs (kill -9, an OOM kill, a power cut) left in `folder` while writing `name`."""
    import shutil

    removed = []
    for leftover in folder.glob(f".{name}.*{suffix}"):
        pid = leftover.name[len(name) + 2 :].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            # by its own type, never a link's target: we make files and folders, never links, pipes or devices
            mode = leftover.lstat().st_mode
            if stat.S_ISDIR(mode):
                shutil.rmtree(leftover, ignore_errors=True)  # removes links inside, never what they point to
            elif stat.S_ISREG(mode):
                leftover.unlink(missing_ok=True)
            else:
                continue
            removed.append(leftover)
    return removed


@contextmanager
def staging_folder(output: Path, suffix: str = ".partial") -> Iterator[Path]:
    """A new folder beside `output` to write into, renamed by the caller when complete; removed on any exception or
    signal, and removed by a later run if this process is killed outright (its id is in the name)."""
    import logging
    import shutil
    import tempfile

    output.parent.mkdir(parents=True, exist_ok=True)
    for leftover in remove_stale_staging(output.parent, output.name, suffix):
        logging.getLogger(__name__).info("Removed %s, left by a run that was killed.", leftover)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(output.name), suffix=suffix, dir=output.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
