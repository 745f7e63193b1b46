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
