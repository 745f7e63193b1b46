"""VAE tiling at the released geometry: how much memory it saves and how much it changes the frames.

    python benchmarks/vae_tiling.py [--frames 9] [--height 480 --width 720]

The CogVideoX-5B-I2V VAE architecture with random weights (the same seed for both runs), fp32 on the CPU. Each of
the four measurements (encode and decode, untiled and tiled) runs in a fresh process, so its peak resident memory
is its own. Prints the ratios side by side and the largest difference between tiled and untiled outputs.
"""

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(kind: str, tiled: bool, frames: int, height: int, width: int) -> dict:
    import torch
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(scaling_factor=0.7, sample_height=height, sample_width=width).eval()
    if tiled:
        vae.enable_tiling()
    generator = torch.Generator().manual_seed(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with torch.no_grad():
        if kind == "encode":
            video = torch.rand(1, 3, frames, height, width, generator=generator) * 2 - 1
            output = vae.encode(video).latent_dist.mean
        else:
            latent_frames = (frames - 1) // 4 + 1
            latents = torch.randn(1, 16, latent_frames, height // 8, width // 8, generator=generator)
            output = vae.decode(latents).sample
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(output, f"/tmp/vae-tiling-{kind}-{'tiled' if tiled else 'plain'}.pt")
    return {"seconds": seconds, "peak_mib": peak / 1024, "model_mib": before / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--one", nargs=2, metavar=("KIND", "TILED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, tiled = args.one
        print(json.dumps(measure(kind, tiled == "1", args.frames, args.height, args.width)))
        return 0

    import torch

    results = {}
    for kind in ("encode", "decode"):
        for tiled in (False, True):
            command = [sys.executable, __file__, "--one", kind, str(int(tiled)), "--frames", str(args.frames)]
            command += ["--height", str(args.height), "--width", str(args.width)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[(kind, tiled)] = json.loads(out.strip().splitlines()[-1])
    print(f"VAE tiling, {args.frames} frames at {args.height}x{args.width}, random weights, fp32, CPU")
    print(
        "| step | untiled: peak above the loaded model | tiled | tiled/untiled memory | tiled/untiled time | max abs diff |"
    )
    print("|---|---|---|---|---|---|")
    for kind in ("encode", "decode"):
        plain, tiled = results[(kind, False)], results[(kind, True)]
        a = torch.load(f"/tmp/vae-tiling-{kind}-plain.pt")
        b = torch.load(f"/tmp/vae-tiling-{kind}-tiled.pt")
        diff = (a - b).abs().max().item() if a.shape == b.shape else float("nan")
        plain_work, tiled_work = plain["peak_mib"] - plain["model_mib"], tiled["peak_mib"] - tiled["model_mib"]
        print(
            f"| {kind} | {plain_work:.0f} MiB | {tiled_work:.0f} MiB | {tiled_work / plain_work:.2f} | "
            f"{tiled['seconds'] / plain['seconds']:.2f} | {diff:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
