"""Every diffusers cache on the Hallo3 transformer against the uncached video: speed-up, difference, peak memory.

    python benchmarks/step_cache_quality.py [--steps 12] [--layers 8] [--heads 8] [--threads 1] [--json out.json]

One process, one pipeline, the same inputs and seed for every row, so the ratios are side by side. The pipeline is
tiny-random (toy VAE, T5, wav2vec2) with a wider and deeper random transformer and reference net (`--layers`,
`--heads` of 64), so that the denoising loop, which is what the caches shorten, dominates the time. The caches are
enabled through diffusers' own API (`pipe.transformer.enable_cache(config)`); MagCache is first calibrated on this
model (`calibrate=True`) and then run with the ratios it measured. Differences are in [0, 1] pixels of the final
video; with random weights they measure how much each cache changes the computation, not how the video looks.

Two speed-ups per row: the measured one (each cached run is timed right after an uncached run, and the ratio is taken
within that pair, so a machine whose load drifts shifts both) and the work one, which does not depend on the machine:
the share of self-attention and feed-forward computations (`attn1.to_q` and `ff` output calls in every block) that
the cache skipped, uncached calls / cached calls.
"""

import argparse
import ast
import contextlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.step_speed import PeakMemory  # noqa: E402
from hallo3.loading import build_tiny_random_pipeline  # noqa: E402
from hallo3.transformer_hallo3 import Hallo3ReferenceNet, Hallo3Transformer3DModel  # noqa: E402


def build_pipeline(layers: int, heads: int):
    """tiny-random, with a transformer and reference net of `layers` layers and `heads` heads of 64."""
    pipe = build_tiny_random_pipeline()
    c = pipe.transformer.config
    torch.manual_seed(0)
    size = dict(num_layers=layers, num_attention_heads=heads, attention_head_dim=64, time_embed_dim=128)
    stock = dict(
        text_embed_dim=c.text_embed_dim,
        sample_width=c.sample_width,
        sample_height=c.sample_height,
        max_text_seq_length=c.max_text_seq_length,
    )
    hallo3 = {k: c[k] for k in ("face_hidden_size", "num_face_tokens", "audio_num_layers", "audio_channels")}
    hallo3 |= {k: c[k] for k in ("audio_intermediate_dim", "audio_hidden_size", "num_audio_tokens")}
    pipe.register_modules(
        transformer=Hallo3Transformer3DModel(**size, **stock, **hallo3).eval(),
        reference_net=Hallo3ReferenceNet(**size, **stock).eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(pipe, seconds: float):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (pipe.height, pipe.width, 3), dtype=np.uint8)
    t = np.arange(int(16000 * seconds)) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 200 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    return image, audio


class WorkCounter:
    """Counts the self-attention and feed-forward computations the transformer actually runs."""

    def __init__(self, transformer):
        self.calls = 0
        self.handles = [
            module.register_forward_hook(self.count)
            for block in transformer.transformer_blocks
            for module in (block.attn1.to_q, block.ff.net[-1])
        ]

    def count(self, *args):
        self.calls += 1

    def remove(self):
        for handle in self.handles:
            handle.remove()


def render(pipe, steps: int, seconds: float) -> tuple[np.ndarray, float, float, float, int]:
    """The video, total seconds, seconds in the denoising loops, peak memory growth (MiB), computations run."""
    image, audio = inputs(pipe, seconds)
    denoise_seconds = []
    work = WorkCounter(pipe.transformer)
    original = pipe.denoise

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            denoise_seconds.append(time.perf_counter() - started)

    pipe.denoise = timed
    try:
        with PeakMemory(torch.device("cpu")) as memory:
            started = time.perf_counter()
            frames = pipe(
                image,
                audio,
                prompt="a person talking",
                num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0),
            ).frames[0]
            total = time.perf_counter() - started
    finally:
        del pipe.denoise
        work.remove()
    return frames, total, sum(denoise_seconds), memory.mib, work.calls


def calibrate_mag_ratios(pipe, steps: int, seconds: float) -> list[float]:
    """MagCache's calibration run on this model: it prints the per-step residual magnitude ratios."""
    from diffusers import MagCacheConfig

    pipe.transformer.enable_cache(MagCacheConfig(num_inference_steps=steps, calibrate=True))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            render(pipe, steps, seconds)
    finally:
        pipe.transformer.disable_cache()
    lists = [line for line in printed.getvalue().splitlines() if line.startswith("[")]
    return [float(r) for r in ast.literal_eval(lists[-1])]


def settings(pipe, steps: int, mag_ratios: list[float]) -> list[tuple[str, object]]:
    from diffusers import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    return [
        ("first-block, threshold 0.05", FirstBlockCacheConfig(threshold=0.05)),
        ("first-block, threshold 0.2", FirstBlockCacheConfig(threshold=0.2)),
        ("mag, calibrated, threshold 0.06", MagCacheConfig(num_inference_steps=steps, mag_ratios=mag_ratios)),
        (
            "mag, calibrated, threshold 0.24",
            MagCacheConfig(num_inference_steps=steps, mag_ratios=mag_ratios, threshold=0.24),
        ),
        ("taylorseer, defaults (interval 5, warm-up 3)", TaylorSeerCacheConfig()),
        (
            "taylorseer, interval 2, fp32 factors",
            TaylorSeerCacheConfig(cache_interval=2, taylor_factors_dtype=torch.float32),
        ),
        (
            "faster (attention reuse)",
            FasterCacheConfig(
                current_timestep_callback=lambda: pipe.current_timestep,
                attention_weight_callback=lambda _: 0.5,
                is_guidance_distilled=True,
            ),
        ),
        (
            "pyramid attention broadcast, skip 2",
            PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=2,
                spatial_attention_timestep_skip_range=(100, 800),
                current_timestep_callback=lambda: pipe.current_timestep,
            ),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=1.0, help="audio length (1 s = one clip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a shared CPU)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = build_pipeline(args.layers, args.heads)
    render(pipe, 1, args.seconds)  # warm-up
    mag_ratios = calibrate_mag_ratios(pipe, args.steps, args.seconds)

    reference, *_, reference_work = render(pipe, args.steps, args.seconds)
    rows = []
    for label, config in settings(pipe, args.steps, mag_ratios):
        _, base_seconds, base_denoise, base_mib, _ = render(pipe, args.steps, args.seconds)
        pipe.transformer.enable_cache(config)
        try:
            frames, seconds, denoise_seconds, mib, work = render(pipe, args.steps, args.seconds)
        finally:
            pipe.transformer.disable_cache()
        difference = np.abs(frames - reference)
        rows.append(
            dict(
                cache=label,
                denoise_speedup=base_denoise / denoise_seconds,
                total_speedup=base_seconds / seconds,
                work_speedup=reference_work / work,
                peak_mib=mib,
                uncached_peak_mib=base_mib,
                mean_abs_diff=float(difference.mean()),
                max_abs_diff=float(difference.max()),
            )
        )
        print(f"  {label}: {rows[-1]}", flush=True)

    print(
        f"\n{args.layers} layers x {args.heads} heads of 64, {args.steps} steps, {args.seconds} s audio, "
        f"{torch.get_num_threads()} threads; uncached: {reference_work} attention + feed-forward computations\n"
    )
    print(
        "| cache | work speed-up | denoise speed-up (measured) | total speed-up (measured) | peak MiB (uncached) | "
        "mean abs diff | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['cache']} | {row['work_speedup']:.2f}x | {row['denoise_speedup']:.2f}x | "
            f"{row['total_speedup']:.2f}x | {row['peak_mib']:,.0f} ({row['uncached_peak_mib']:,.0f}) | "
            f"{row['mean_abs_diff']:.4f} | {row['max_abs_diff']:.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, rows=rows), indent=1))


if __name__ == "__main__":
    main()
