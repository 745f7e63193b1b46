"""Denoising-step time and memory at the released model's width, side by side, plus the full-size memory table.

    python benchmarks/step_speed.py [--layers 2] [--latent 8x12] [--steps 3] [--device cpu]

The transformer and reference net are built at the real width (3072 hidden, 48 heads of 64, T5 4096, audio
5x12x768 -> 32x768 with the 1.2 B-parameter conv, face 512 -> 4x1024) with `--layers` layers and random weights. Each
variant runs the same CFG batch (2 rows) through the sampler; the table gives seconds per step, the ratio to the
plain path, and peak memory (CUDA max allocated on a GPU, peak RSS growth on a CPU). On a CPU the token count is
reduced with `--latent`; on a GPU use `--latent 60x90` for the real 480x720x49 geometry.

The second table is analytic: parameter counts of the full 42-layer networks (built on the meta device) times the
bytes per weight of each memory mode, plus an activation estimate at 480x720x49, for the peak on the GPU.
"""

import argparse
import gc
import statistics
import sys
import threading
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hallo3.memory import available_memory_modes  # noqa: E402
from hallo3.scheduling_hallo3 import Hallo3DPMScheduler  # noqa: E402
from hallo3.settings import DEFAULTS  # noqa: E402
from hallo3.transformer_hallo3 import Hallo3ReferenceNet, Hallo3Transformer3DModel  # noqa: E402


class PeakMemory:
    """Peak memory over a block: CUDA max allocated, or sampled RSS growth on a CPU (MiB)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base = self.rss()
            self.peak = self.base
            self.running = True
            self.thread = threading.Thread(target=self.sample, daemon=True)
            self.thread.start()
        return self

    @staticmethod
    def rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def sample(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.running = False
            self.thread.join()
            self.mib = (self.peak - self.base) / 2**20


def build(layers: int, latent_hw: tuple[int, int], device, dtype):
    config = dict(num_layers=layers, sample_height=latent_hw[0], sample_width=latent_hw[1])
    torch.manual_seed(0)
    transformer = Hallo3Transformer3DModel(**config).to(device, dtype).eval()
    reference_net = Hallo3ReferenceNet(**config).to(device, dtype).eval()
    return transformer, reference_net


def make_inputs(transformer, device, dtype):
    c = transformer.config
    g = torch.Generator().manual_seed(0)
    latent = (1, 13, 16, c.sample_height, c.sample_width)
    return dict(
        noise=torch.randn(latent, generator=g).to(device),
        image_latents=torch.randn(latent, generator=g).to(device, dtype).expand(2, -1, -1, -1, -1),
        text=torch.cat([torch.zeros(1, 226, 4096), torch.randn(1, 226, 4096, generator=g)]).to(device, dtype),
        face=torch.randn(1, 512, generator=g).to(device, dtype).expand(2, -1),
        audio=torch.cat([torch.zeros(1, 49, 5, 12, 768), torch.randn(1, 49, 5, 12, 768, generator=g) * 0.3]).to(
            device, dtype
        ),
        reference=torch.randn(1, 1, 16, c.sample_height, c.sample_width, generator=g).to(device, dtype),
    )


def sample(transformer, bank, inputs, steps: int, reuse: bool) -> tuple[torch.Tensor, list[float]]:
    """The pipeline's inner loop (CFG at the default scale, on v); returns the final latents and per-step seconds."""
    scheduler = Hallo3DPMScheduler()
    scheduler.set_timesteps(steps)
    latents, times, tokens = inputs["noise"], [], None
    generator = torch.Generator(latents.device).manual_seed(1)
    raw = dict(reference_hidden_states=bank, face_embeds=inputs["face"], audio_embeds=inputs["audio"])
    for t in scheduler.timesteps:
        started = time.perf_counter()
        model_input = torch.cat(
            [latents.expand(2, -1, -1, -1, -1).to(inputs["text"].dtype), inputs["image_latents"]], 2
        )
        with transformer.cache_context("cfg_batch"):
            output = transformer(
                model_input,
                inputs["text"],
                t.expand(2).float(),
                **raw,
                conditioning_tokens=tokens,
            )
        if reuse:
            tokens = output.conditioning_tokens
        uncond, cond = output.sample.float().chunk(2)
        guided = uncond + DEFAULTS.guidance_scale * (cond - uncond)
        latents = scheduler.step(guided, t, latents, generator=generator).prev_sample
        if latents.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return latents, times


def analytic_table() -> list[str]:
    """Weights of the full networks per mode + an activation estimate at 480x720x49 (batch 2, bf16)."""
    with torch.device("meta"):
        dit = sum(p.numel() for p in Hallo3Transformer3DModel().parameters())
        ref = sum(p.numel() for p in Hallo3ReferenceNet().parameters())
    t5, vae, wav2vec = 4.76e9, 0.216e9, 0.095e9
    tokens, hidden, ff = 226 + 17550, 3072, 12288
    # live activations of one block at batch 2: residual streams, q/k/v, attention out, MLP hidden (SDPA keeps no
    # S x S matrix), plus the reference K/V of 42 layers; the VAE decode of 49 frames at 480x720 in 2-frame chunks
    block_activations = 2 * tokens * (6 * hidden + ff) * 2
    reference_kv = 42 * 2 * 1350 * hidden * 2
    vae_decode = 4.5e9
    gib = 2**30
    bytes_per = {"none": 2, "model-offload": 2, "8bit": 1, "4bit": 0.5, "int8-torchao": 1}
    rows = ["| mode | DiT weights | ref-net weights | T5 weights | GPU peak (est.) |", "|---|---|---|---|---|"]
    for mode in ("none", "model-offload", "group-offload", "sequential-offload", "8bit", "4bit", "int8-torchao"):
        b = bytes_per.get(mode, 2)
        dit_w, ref_w, t5_w = dit * b, ref * b, t5 * (b if mode in ("8bit", "4bit") else 2)
        dit_resident = dit_w
        if mode == "group-offload":  # non-block weights (audio conv 2.4 GB, embeddings) + 2 block groups in flight
            dit_resident = (dit - 42 * 181e6) * 2 + 2 * 181e6 * 2
        elif mode == "sequential-offload":  # the largest leaf: audio_proj.conv1
            dit_resident = 1.21e9 * 2
        t5_resident = t5_w if mode not in ("group-offload", "sequential-offload") else 4096 * 10240 * 2 * 3
        if mode == "none":
            peak = dit_w + ref_w + t5_w + (vae + wav2vec * 2) + block_activations + reference_kv
        else:  # one model at a time: T5 once, the reference net once, then the DiT for every step
            peak = max(dit_resident + block_activations + reference_kv + vae * 2, t5_resident, vae * 2 + vae_decode)
        rows.append(
            f"| {mode} | {dit_w / gib:.1f} GiB | {ref_w / gib:.1f} GiB | {t5_w / gib:.1f} GiB | {peak / gib:.1f} GiB |"
        )
    rows.append(
        f"\nParameters: DiT {dit / 1e9:.3f} B, reference net {ref / 1e9:.3f} B (meta-device count; the learned "
        f"positional table, 54.6 M, is a buffer here and not counted); T5-XXL "
        f"{t5 / 1e9:.2f} B, VAE {vae / 1e9:.2f} B. One DiT block's live activations at batch 2: "
        f"{block_activations / gib:.2f} GiB; reference K/V of 42 layers: {reference_kv / gib:.2f} GiB."
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--latent", default="8x12", help="latent HxW (60x90 is 480x720)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    latent_hw = tuple(int(v) for v in args.latent.split("x"))
    torch.set_grad_enabled(False)

    transformer, reference_net = build(args.layers, latent_hw, device, dtype)
    inputs = make_inputs(transformer, device, dtype)
    bank = reference_net(inputs["reference"], torch.zeros(1, 226, 4096, device=device, dtype=dtype))
    tokens = 13 * (latent_hw[0] // 2) * (latent_hw[1] // 2)
    print(
        f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), {dtype}, "
        f"{args.layers} layers at width 3072, {tokens} video + 226 text + {tokens // 13} reference tokens, "
        f"CFG batch 2, {args.steps} steps"
    )

    variants = [
        ("plain: recompute conditioning every step", dict(reuse=False), None),
        ("reuse reference K/V + face/audio tokens", dict(reuse=True), None),
        ("+ first-block cache (0.1)", dict(reuse=True), "first-block"),
        ("+ TaylorSeer cache", dict(reuse=True), "taylorseer"),
    ]
    if "int8-torchao" in available_memory_modes() and device.type == "cuda":
        variants.append(("+ int8 weights (torchao)", dict(reuse=True), "int8"))

    results, reference_latents = [], None
    sample(transformer, bank, inputs, 2, reuse=True)  # warm-up
    for label, kwargs, extra in variants:
        if extra in ("first-block", "taylorseer"):
            from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

            transformer.enable_cache(
                FirstBlockCacheConfig(threshold=0.1) if extra == "first-block" else TaylorSeerCacheConfig()
            )
        gc.collect()
        with PeakMemory(device) as memory:
            latents, times = sample(transformer, bank, inputs, args.steps, **kwargs)
        if extra in ("first-block", "taylorseer"):
            transformer.disable_cache()
        reference_latents = latents if reference_latents is None else reference_latents
        difference = (latents - reference_latents).abs().mean().item()
        results.append((label, statistics.median(times), memory.mib, difference))

    plain = results[0][1]
    print(
        "\n| variant | s / step | ratio to plain | peak memory MiB | mean abs diff vs plain |\n|---|---|---|---|---|"
    )
    for label, seconds, mib, difference in results:
        print(f"| {label} | {seconds:.3f} | {seconds / plain:.2f} | {mib:,.0f} | {difference:.2e} |")
    print("\nFull 42-layer model at 480x720x49, bf16 unless quantized (analytic):\n")
    print("\n".join(analytic_table()))


if __name__ == "__main__":
    main()
