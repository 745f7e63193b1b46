"""What only GPUs can show about train/: every shipped accelerate config on this machine's GPUs, one command.

    python -m benchmarks.train_multigpu_check [--configs ddp fsdp deepspeed_zero2 deepspeed_zero3] [--output DIR]

For each config: the tiny model's stage 1, then stage 2 from stage 1's export, 3 steps each, bf16, NCCL, on every
visible GPU, started as users start it (`accelerate launch --config_file train/configs/accelerate/<config>.yaml`).
Checks that every rank reports the same trained weights, that the logged lr follows the official schedule on one
process, that the gradient norm is positive, and prints the peak GPU memory of rank 0 per config and stage. Exits 1
if a check fails. The CPU tests (tests/test_train_distributed.py) cover the same paths on gloo; this covers NCCL,
bf16 kernels, ZeRO on several GPUs and FSDP2 as accelerate really selects it.
"""

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch


REPO = Path(__file__).parent.parent
ACCELERATE_CONFIGS = REPO / "train" / "configs" / "accelerate"
TINY = REPO / "train" / "configs" / "tiny.yaml"
STEPS = 3


def official_lr(step: int, base: float, warmup: int, hold_steps: int, hold_factor: float, max_steps: int) -> float:
    """Reference 9, written out: the first `hold_steps` iterations at min(0.05 lr, ramp), a linear ramp over
    `warmup` iterations, then lr (max_steps - (n - warmup)) / max_steps."""
    if step <= warmup:
        return base * (min(hold_factor, step / warmup) if step <= hold_steps else step / warmup)
    return base * (max_steps - (step - warmup)) / max_steps


def tiny_lr(step: int, max_steps: int) -> float:
    """The lr tiny.yaml's run logs at `step`: lr 1e-4, a warm-up of 2 steps, the first held at 0.05 x."""
    return official_lr(step, 1e-4, 2, 1, 0.05, max_steps)


def prepare_clips(folder: Path, count: int) -> Path:
    """`count` synthetic talking heads (the two example portraits, alternating), prepared into `folder`/data with the
    tiny-random encoders and the captions' T5 embeddings."""
    from train.prepare_dataset import main as prepare_main
    from train.synthetic_data import RecordedFaces, talking_video

    raw, data = folder / "raw", folder / "data"
    (raw / "videos").mkdir(parents=True)
    (raw / "captions").mkdir()
    photos = [REPO / "assets" / "examples" / name for name in ("0001.jpg", "0008.jpg")]
    drawn = []
    for index in range(count):
        name = f"clip{index:02d}"
        drawn.append(talking_video(raw / "videos" / f"{name}.mp4", photos[index % 2], 3.2, seed=index))
        (raw / "captions" / f"{name}.txt").write_text("a person talking")
    argv = ["--videos", str(raw / "videos"), "--captions", str(raw / "captions"), "--output", str(data)]
    tiny = ["--wav2vec", "tiny-random", "--t5", "tiny-random", "--no-vocal-separation"]  # no separator on CPU CI
    if prepare_main([*argv, *tiny], analyzer=RecordedFaces(drawn)):
        raise SystemExit("data preparation failed")
    return data


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(
    config_file: str,
    data: Path,
    output: Path,
    overrides: Sequence[str] = (),
    processes: int = 1,
    launcher: Sequence[str] = (),
) -> list[str]:
    """`accelerate launch --config_file train/configs/accelerate/<config_file> [launcher options] -m train.train` of
    the tiny config, as users start a run (accelerate's launch command, run by this interpreter), without validation
    videos or trackers."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ACCELERATE_CONFIGS / config_file),
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(free_port()),
        *launcher,
        "-m",
        "train.train",
        "--config",
        str(TINY),
        f"data={data}",
        f"output_dir={output}",
        "validate_every=0",
        "report_to=[]",
        *overrides,
    ]


def read_run(stdout: str, output: Path) -> tuple[dict[int, dict], dict[int, str]]:
    """A finished run's logged metrics by step (OUTPUT/logs/metrics.jsonl) and the fingerprint of its trained weights
    by rank (one JSON object per rank on stdout, where two ranks' lines may interleave)."""
    metrics = [json.loads(line) for line in (output / "logs" / "metrics.jsonl").read_text().splitlines()]
    fingerprints = re.findall(r'\{"rank": (\d+), "weights_sha256": "(\w+)"\}', stdout)
    return {m["step"]: m for m in metrics}, {int(rank): digest for rank, digest in fingerprints}


def run_stage(config: str, data: Path, output: Path, stage: int, extra: list[str]) -> tuple[list[str], dict]:
    """One launch; returns (failed checks, summary)."""
    processes = 1 if config == "single_gpu" else torch.cuda.device_count()
    overrides = [f"stage={stage}", "mixed_precision=bf16", f"max_steps={STEPS}", *extra]
    command = launch_command(f"{config}.yaml", data, output, overrides, processes)
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        return [f"{config} stage {stage}: exit {result.returncode}: {result.stderr[-2000:]}"], {}
    failures = []
    metrics, fingerprints = read_run(result.stdout, output)
    if len(fingerprints) != processes or len(set(fingerprints.values())) != 1:
        failures.append(f"{config} stage {stage}: ranks disagree or are missing: {fingerprints}")
    for step, record in metrics.items():
        if abs(record["lr"] - tiny_lr(step, STEPS)) > 1e-12:
            failures.append(f"{config} stage {stage}: lr {record['lr']} at step {step}")
        if not record["grad_norm"] or record["grad_norm"] <= 0:
            failures.append(f"{config} stage {stage}: gradient norm {record['grad_norm']} at step {step}")
    summary = {
        "processes": processes,
        "losses": [round(m["loss"], 5) for m in metrics.values()],
        "peak_memory_gb": max(m.get("peak_memory_gb") or 0.0 for m in metrics.values()),
    }
    return failures, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--configs", nargs="+", default=["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "single_gpu"]
    )
    parser.add_argument("--output", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "error: no CUDA GPU on this machine; the CPU paths are in tests/test_train_distributed.py", file=sys.stderr
        )
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.output or Path(scratch)
        data = prepare_clips(folder / "prepared", max(2, torch.cuda.device_count()))  # one clip per GPU
        failures = []
        for config in args.configs:
            stage1 = folder / config / "stage1"
            problems, summary = run_stage(config, data, stage1, 1, [])
            failures += problems
            print(json.dumps({"config": config, "stage": 1, **summary}), flush=True)
            if problems:
                continue
            export = stage1 / "final"
            extra = [f"model.transformer={export / 'transformer'}", f"model.reference_net={export / 'reference_net'}"]
            problems, summary = run_stage(config, data, folder / config / "stage2", 2, extra)
            failures += problems
            print(json.dumps({"config": config, "stage": 2, **summary}), flush=True)
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
