"""Step caches against the uncached video, per setting, on the same seed: time ratio and pixel difference.

    python benchmarks/step_cache_quality.py [--steps 20] [--seconds 1.8]

Runs the tiny-random pipeline (all of Hallo3's path at toy size) once uncached and once per cache setting. With random
weights the differences show how much each setting changes the computation, not how the video looks: repeat with
real weights (`--model`) before relying on a cache.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hallo3.loading import load_pipeline  # noqa: E402


SETTINGS = [("first-block", 0.05), ("first-block", 0.2), ("first-block", 0.5), ("taylorseer", None), ("faster", None)]


def render(model: str, cache, steps: int, seconds: float) -> tuple[np.ndarray, float]:
    pipe = load_pipeline(model, torch_dtype=torch.float32).pipeline
    pipe.set_progress_bar_config(disable=True)
    if cache is not None:
        pipe.enable_step_cache(cache[0], threshold=cache[1] or 0.1)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (pipe.height, pipe.width, 3), dtype=np.uint8)
    t = np.arange(int(16000 * seconds)) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 200 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    started = time.perf_counter()
    frames = pipe(
        image, audio, prompt="a person talking", num_inference_steps=steps, generator=torch.Generator().manual_seed(0)
    ).frames
    return frames, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=1.8)
    args = parser.parse_args()
    reference, base_time = render(args.model, None, args.steps, args.seconds)
    print(f"model {args.model}, {args.steps} steps, {args.seconds} s of audio; uncached {base_time:.2f} s\n")
    print("| cache | threshold | time ratio | mean abs diff (0-1 pixels) | max abs diff |\n|---|---|---|---|---|")
    for kind, threshold in SETTINGS:
        frames, seconds = render(args.model, (kind, threshold), args.steps, args.seconds)
        diff = np.abs(frames - reference)
        print(
            f"| {kind} | {threshold if threshold is not None else '-'} | {seconds / base_time:.2f} | "
            f"{diff.mean():.4f} | {diff.max():.3f} |"
        )


if __name__ == "__main__":
    main()
