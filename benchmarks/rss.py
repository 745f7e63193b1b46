"""Peak memory of a child process, sampled from /proc (Linux)."""

import subprocess
import threading
import time
from pathlib import Path


def run_sampled(cmd: list[str]) -> dict:
    """Run `cmd`, sampling /proc/<pid>/status; returns seconds and peak RSS / anonymous RSS in MiB."""
    peaks = {"VmRSS": 0, "RssAnon": 0}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    start = time.perf_counter()

    def sample():
        while proc.poll() is None:
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    key = line.split(":")[0]
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _, stderr = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"{cmd} failed:\n{stderr}")
    return {
        "seconds": time.perf_counter() - start,
        "rss_mib": peaks["VmRSS"] / 1024,
        "anon_mib": peaks["RssAnon"] / 1024,
    }
