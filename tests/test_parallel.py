"""Multi-process inference on CPU: 2 gloo processes with CFG parallel give the single-process video."""

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hallo3.parallel import CFGParallel


ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world_size: int, port: int, out_dir: str, audio_guidance_scale) -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from hallo3.loading import build_tiny_random_pipeline
        from tests.test_pipeline import run

        pipe = build_tiny_random_pipeline()
        pipe.set_progress_bar_config(disable=True)
        pipe.enable_cfg_parallel()
        frames = run(pipe, num_inference_steps=2, audio_guidance_scale=audio_guidance_scale).frames
        np.save(Path(out_dir) / f"rank{rank}.npy", frames)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size, audio_guidance_scale", [(2, None)])
def test_cfg_parallel_on_2_gloo_processes_equals_one_process(
    tiny_pipeline, tmp_path, world_size, audio_guidance_scale
):
    from .test_pipeline import run

    expected = run(tiny_pipeline, num_inference_steps=2, audio_guidance_scale=audio_guidance_scale).frames
    mp.start_processes(
        worker,
        args=(world_size, free_port(), str(tmp_path), audio_guidance_scale),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )
    for rank in range(world_size):
        frames = np.load(tmp_path / f"rank{rank}.npy")
        # one guidance row per process instead of a batch of 2: the same maths, fp32 rounding apart
        np.testing.assert_allclose(frames, expected, atol=1e-5, rtol=0)


def test_rows_split_evenly_or_refuse():
    parallel = CFGParallel(rank=1, world_size=2)
    assert parallel.rows(2) == slice(1, 2) and parallel.rows(4) == slice(2, 4)
    rows = torch.arange(2.0)[:, None]
    assert parallel.split(rows, 2).tolist() == [[1.0]] and parallel.split(rows[:1], 2) is not None
    with pytest.raises(ValueError, match="3 guidance rows"):
        parallel.rows(3)
    with pytest.raises(RuntimeError, match="torchrun"):
        CFGParallel.from_default_group()


def test_the_cli_runs_cfg_parallel_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node 2 -m hallo3.inference --cfg-parallel ...` on 2 gloo processes: one video, written
    once, like the single-process one; without torchrun the flag is a one-line error."""
    import subprocess
    import sys

    import soundfile

    from hallo3.preprocessing.audio import ffmpeg_exe

    from .conftest import ASSETS

    t = np.arange(16000) / 16000
    soundfile.write(tmp_path / "speech.wav", (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)
    args = ["-m", "hallo3.inference", "--model", "tiny-random", "--image", str(ASSETS / "0001.jpg")]
    args += ["--audio", str(tmp_path / "speech.wav"), "--steps", "2", "--seed", "4"]
    single = subprocess.run([sys.executable, *args, "--output", str(tmp_path / "one.mp4")], capture_output=True)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    parallel = subprocess.run(
        [*torchrun, *args, "--cfg-parallel", "--output", str(tmp_path / "two.mp4")], capture_output=True, text=True
    )
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    assert parallel.stderr.count("Wrote ") == 1  # one process writes

    def frames(name):
        command = [ffmpeg_exe(), "-v", "error", "-i", str(tmp_path / name), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
        return np.frombuffer(subprocess.run(command, capture_output=True, check=True).stdout, dtype=np.uint8)

    one, two = frames("one.mp4"), frames("two.mp4")
    assert one.shape == two.shape and np.abs(one.astype(int) - two.astype(int)).mean() < 0.5  # fp32 rounding apart
    alone = subprocess.run(
        [sys.executable, *args, "--cfg-parallel", "--output", str(tmp_path / "x.mp4")], capture_output=True, text=True
    )
    assert alone.returncode == 2 and "torchrun" in alone.stderr and "Traceback" not in alone.stderr
