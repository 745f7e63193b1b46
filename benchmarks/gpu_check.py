"""GPU check: the full-size Hallo3 transformer (random weights, bf16, 480x720x49) per memory mode, cache, attention
backend, with torch.compile, bf16 against fp32, and CFG parallel on 2 GPUs. One table, also written as JSON.

    python benchmarks/gpu_check.py                      # on a GPU machine: about 5-10 minutes on one H100
    python benchmarks/gpu_check.py --smoke              # CPU smoke test at toy size (CI): seconds
    python benchmarks/gpu_check.py --layers 8 --json gpu_check.json

Each row runs the pipeline's denoising loop (CFG batch of 2, reference keys/values and audio/face tokens computed on
the first step and reused, as `Hallo3Pipeline.denoise` does) for `--steps` steps and reports the median seconds per
step after the first, the peak memory (CUDA max allocated; not measured on a CPU), the speed-up against the plain bf16
row and the relative difference of the final latents from it (|a - b|.mean() / |b|.mean()). A row that cannot run
here (no CUDA, bitsandbytes or flash-attn missing, one GPU only) is reported with the reason instead of failing the
script; the exit status is non-zero only if a row that should run raised.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hallo3.loading import TINY_TRANSFORMER_CONFIG  # noqa: E402
from hallo3.parallel import CFGParallel  # noqa: E402
from hallo3.scheduling_hallo3 import Hallo3DPMScheduler  # noqa: E402
from hallo3.settings import DEFAULTS  # noqa: E402
from hallo3.transformer_hallo3 import Hallo3Transformer3DModel  # noqa: E402


# The released geometry is the model's default config (42 layers, 48 heads of 64, latent 60x90, 13 latent frames);
# --smoke runs the tiny-random one
SMOKE_CONFIG = TINY_TRANSFORMER_CONFIG


class Skip(Exception):
    """This row cannot run on this machine; the message says why."""


def build(config: dict, device: torch.device, dtype: torch.dtype) -> Hallo3Transformer3DModel:
    """Random weights, built directly on `device` in `dtype` (no fp32 copy of 9 B parameters on the host)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Hallo3Transformer3DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def full_config(config: dict) -> dict:
    """`config` with the model's defaults filled in (read from a meta-device instance: no memory)."""
    with torch.device("meta"):
        return dict(Hallo3Transformer3DModel(**config).config)


def make_inputs(config: dict, device: torch.device, dtype: torch.dtype) -> dict:
    c = full_config(config)
    g = torch.Generator().manual_seed(0)
    latent = (1, 13, 16, c["sample_height"], c["sample_width"])
    tokens = c["sample_height"] * c["sample_width"] // 4
    inner = c["num_attention_heads"] * c["attention_head_dim"]
    audio = (1, 49, c["audio_window"], c["audio_num_layers"], c["audio_channels"])
    text = torch.randn(1, c["max_text_seq_length"], c["text_embed_dim"], generator=g)
    return dict(
        noise=torch.randn(latent, generator=g).to(device),
        image_latents=torch.randn(latent, generator=g).expand(2, -1, -1, -1, -1).to(device, dtype),
        text=torch.cat([torch.zeros_like(text), text]).to(device, dtype),
        face=torch.randn(1, c["face_embed_dim"], generator=g).expand(2, -1).to(device, dtype),
        audio=torch.cat([torch.zeros(audio), torch.randn(audio, generator=g) * 0.3]).to(device, dtype),
        bank=[torch.randn(1, tokens, inner, generator=g).to(device, dtype) for _ in range(c["num_layers"])],
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def denoise(
    transformer, inputs: dict, steps: int, device: torch.device, parallel: CFGParallel | None = None
) -> tuple[torch.Tensor, list[float]]:
    """`Hallo3Pipeline.denoise` without the pipeline: CFG at the default scale, conditioning computed on step 0 and reused; with
    `parallel`, this process computes its guidance row only and the rows are all-gathered (CFG parallel)."""
    scheduler = Hallo3DPMScheduler()
    scheduler.set_timesteps(steps, device=device)
    if getattr(transformer, "is_cache_enabled", False):
        transformer._reset_stateful_cache()
    latents, tokens, times = inputs["noise"], None, []
    generator = torch.Generator(device).manual_seed(1)
    dtype = inputs["text"].dtype
    for i, t in enumerate(scheduler.timesteps):
        synchronize(device)
        started = time.perf_counter()
        raw = dict(reference_hidden_states=inputs["bank"], face_embeds=inputs["face"], audio_embeds=inputs["audio"])
        model_input = torch.cat([latents.expand(2, -1, -1, -1, -1).to(dtype), inputs["image_latents"]], dim=2)
        text, timestep = inputs["text"], t.expand(2).float()
        if parallel is not None:
            model_input, text, timestep = (parallel.split(x, 2) for x in (model_input, text, timestep))
            raw = {k: parallel.split(v, 2) if torch.is_tensor(v) else v for k, v in raw.items()}
        with transformer.cache_context("cfg_batch", step_index=i, num_inference_steps=steps, timestep=t):
            output = transformer(model_input, text, timestep, **raw, conditioning_tokens=tokens)
        tokens = output.conditioning_tokens
        prediction = output.sample.float()
        if parallel is not None:
            prediction = parallel.gather(prediction)
        uncond, cond = prediction.chunk(2)
        guided = uncond + DEFAULTS.guidance_scale * (cond - uncond)
        latents = scheduler.step(guided, t, latents, generator=generator).prev_sample
        synchronize(device)
        times.append(time.perf_counter() - started)
    return latents, times


def measure(transformer, inputs: dict, steps: int, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    latents, times = denoise(transformer, inputs, steps, device)
    steady = times[1:] or times
    result = dict(s_per_step=statistics.median(steady), first_step_s=times[0], latents=latents.float().cpu())
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12)).item()


# --------------------------------------------------------------------------------------------------------------------
# rows


def needs_cuda(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        raise Skip(f"{what} needs a CUDA GPU")


def memory_mode_rows(args, config, device, dtype, inputs) -> list[tuple[str, str, Callable]]:
    """(section, variant, fn) for each memory mode; fn returns a measured dict."""

    def plain():
        return measure(build(config, device, dtype), inputs, args.steps, device)

    def model_offload():
        needs_cuda(device, "model offload")
        from accelerate import cpu_offload_with_hook

        transformer = build(config, torch.device("cpu"), dtype)
        cpu_offload_with_hook(transformer, device)
        return measure(transformer, inputs, args.steps, device)

    def group_offload():
        transformer = build(config, torch.device("cpu"), dtype)
        transformer.enable_group_offload(
            onload_device=device,
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=device.type == "cuda",
        )
        return measure(transformer, inputs, args.steps, device)

    def quantized(kind: str):
        def run():
            from diffusers import BitsAndBytesConfig, TorchAoConfig

            if kind in ("8bit", "4bit"):
                needs_cuda(device, "bitsandbytes through diffusers")
                if not _has("bitsandbytes"):
                    raise Skip("bitsandbytes is not installed")
                quantization = (
                    BitsAndBytesConfig(load_in_8bit=True)
                    if kind == "8bit"
                    else BitsAndBytesConfig(
                        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
                    )
                )
            else:
                if not _has("torchao"):
                    raise Skip("torchao is not installed")
                from hallo3.memory import import_torchao

                import_torchao()  # hallo3 keeps torchao unimported until a torchao mode asks for it
                from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

                if kind == "fp8-torchao":
                    needs_cuda(device, "FP8 (torchao)")
                    if torch.cuda.get_device_capability() < (8, 9):
                        raise Skip("FP8 needs compute capability 8.9 or newer")
                    quantization = TorchAoConfig(Float8WeightOnlyConfig())
                else:
                    quantization = TorchAoConfig(Int8WeightOnlyConfig())
            with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
                build(config, device, dtype).save_pretrained(folder)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                transformer = Hallo3Transformer3DModel.from_pretrained(
                    folder, quantization_config=quantization, torch_dtype=dtype
                )
            if kind not in ("8bit", "4bit"):
                transformer = transformer.to(device)
            return measure(transformer.eval(), inputs, args.steps, device)

        return run

    rows = [
        ("memory mode", "none (bf16 resident)" if dtype == torch.bfloat16 else "none", plain),
        ("memory mode", "model offload", model_offload),
        ("memory mode", "group offload (block level)", group_offload),
        ("memory mode", "8-bit (bitsandbytes)", quantized("8bit")),
        ("memory mode", "4-bit nf4 (bitsandbytes)", quantized("4bit")),
        ("memory mode", "FP8 weight-only (torchao)", quantized("fp8-torchao")),
        ("memory mode", "int8 weight-only (torchao)", quantized("int8-torchao")),
    ]
    return rows


def cache_rows(args, transformer, device, inputs) -> list[tuple[str, str, Callable]]:
    """Each diffusers cache through `transformer.enable_cache`, against the same loop uncached."""
    from diffusers import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    steps = args.cache_steps
    # FasterCache and PAB ask for the current timestep (a pipeline passes `lambda: pipe.current_timestep`)
    current = {"timestep": None}
    transformer.register_forward_pre_hook(lambda module, a: current.__setitem__("timestep", a[2][0]))

    def with_cache(make_config):
        def run():
            transformer.enable_cache(make_config())
            try:
                return measure(transformer, inputs, steps, device)
            finally:
                transformer.disable_cache()

        return run

    return [
        ("cache", f"uncached, {steps} steps", lambda: measure(transformer, inputs, steps, device)),
        ("cache", "first-block 0.1", with_cache(lambda: FirstBlockCacheConfig(threshold=0.1))),
        (
            "cache",
            "mag 0.1 (uniform ratios; calibrate on real weights)",
            with_cache(lambda: MagCacheConfig(num_inference_steps=steps, mag_ratios=[1.0] * steps, threshold=0.1)),
        ),
        ("cache", "taylorseer defaults", with_cache(lambda: TaylorSeerCacheConfig())),
        (
            "cache",
            "faster",
            with_cache(
                lambda: FasterCacheConfig(
                    current_timestep_callback=lambda: current["timestep"],
                    attention_weight_callback=lambda _: 0.5,
                    is_guidance_distilled=True,
                )
            ),
        ),
        (
            "cache",
            "pyramid attention broadcast 2",
            with_cache(
                lambda: PyramidAttentionBroadcastConfig(
                    spatial_attention_block_skip_range=2,
                    spatial_attention_timestep_skip_range=(100, 800),
                    current_timestep_callback=lambda: current["timestep"],
                )
            ),
        ),
    ]


def backend_rows(args, transformer, device, inputs) -> list[tuple[str, str, Callable]]:
    """diffusers attention backends (`set_attention_backend`); the ones not installed or not for this device skip."""
    cuda_only = {"flash", "_native_flash", "_native_efficient", "_native_cudnn", "sage", "flash_hub"}

    def with_backend(name):
        def run():
            if name in cuda_only:
                needs_cuda(device, f"the {name} backend")
            try:
                transformer.set_attention_backend(name)
            except (ImportError, RuntimeError, ValueError) as error:
                raise Skip(f"{name}: {str(error).splitlines()[0][:100]}") from error
            try:
                return measure(transformer, inputs, args.steps, device)
            finally:
                transformer.reset_attention_backend()

        return run

    names = ["native", "_native_math", "_native_cudnn", "_native_flash", "_native_efficient", "flash", "sage"]
    return [("attention", name, with_backend(name)) for name in names]


def compile_row(args, transformer, device, inputs) -> tuple[str, str, Callable]:
    def run():
        if device.type != "cuda" and not args.compile_on_cpu:
            raise Skip("torch.compile is measured on the GPU (add --compile-on-cpu to try it here)")
        transformer.compile_repeated_blocks(fullgraph=True)
        try:
            result = measure(transformer, inputs, args.steps + 1, device)
            result["note"] = f"first step (compiles) {result['first_step_s']:.1f} s"
            return result
        finally:
            # back to eager for the rows after this one
            for block in transformer.transformer_blocks:
                if hasattr(block, "_orig_mod"):
                    block.forward = block._orig_mod.forward
            torch._dynamo.reset()

    return ("compile", "torch.compile repeated blocks", run)


def precision_row(args, config, device, inputs_bf16) -> tuple[str, str, Callable]:
    """bf16 against fp32 on the same weights and inputs, a few steps, at `--precision-layers` layers (fp32 weights of
    the full 42 layers are 35 GB)."""

    def run():
        small = dict(config, num_layers=min(args.precision_layers, full_config(config)["num_layers"]))
        transformer = build(small, device, torch.float32)
        inputs = make_inputs(small, device, torch.float32)
        reference = measure(transformer, inputs, args.precision_steps, device)
        transformer = transformer.to(torch.bfloat16)
        inputs_bf16 = {k: _cast(v, torch.bfloat16) for k, v in inputs.items()}
        inputs_bf16["noise"] = inputs["noise"]
        result = measure(transformer, inputs_bf16, args.precision_steps, device)
        result["relative_difference"] = relative_difference(result["latents"], reference["latents"])
        result["speedup"] = reference["s_per_step"] / result["s_per_step"]
        result["note"] = f"{small['num_layers']} layers, {args.precision_steps} steps; speed-up is bf16 over fp32"
        return result

    return ("precision", "bf16 vs fp32", run)


def parallel_rows(args, config, device) -> list[tuple[str, str, Callable]]:
    def cfg_parallel():
        if device.type != "cuda" or torch.cuda.device_count() < 2:
            raise Skip("CFG parallel is measured on 2 CUDA GPUs")
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__]
        command += ["--cfg-parallel-worker", "--steps", str(args.steps)]
        if args.layers is not None:
            command += ["--layers", str(args.layers)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=400)
        if done.returncode:
            raise RuntimeError(done.stderr[-2000:])
        return json.loads(done.stdout.strip().splitlines()[-1])

    def context_parallel():
        raise Skip("diffusers context parallelism is not wired up for this model (docs/performance.md, Multi-GPU)")

    return [
        ("parallel", "CFG parallel, 2 GPUs", cfg_parallel),
        ("parallel", "context parallel (Ulysses), 2 GPUs", context_parallel),
    ]


def cfg_parallel_worker(args, config) -> None:
    """Under torchrun: rank 0 times one GPU, then both ranks time CFG parallel; rank 0 prints one JSON line."""
    torch.distributed.init_process_group("nccl")
    rank = torch.distributed.get_rank()
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    transformer = build(config, device, torch.bfloat16)
    inputs = make_inputs(config, device, torch.bfloat16)
    single = measure(transformer, inputs, args.steps, device) if rank == 0 else None
    torch.distributed.barrier()
    torch.cuda.reset_peak_memory_stats()
    latents, times = denoise(transformer, inputs, args.steps, device, CFGParallel.from_default_group())
    if rank == 0:
        assert single is not None
        steady = statistics.median(times[1:] or times)
        result = dict(
            s_per_step=steady,
            peak_gib=torch.cuda.max_memory_allocated() / 2**30,
            speedup=single["s_per_step"] / steady,
            relative_difference=relative_difference(latents.float().cpu(), single["latents"]),
            note="speed-up and difference against one GPU in the same run",
        )
        print(json.dumps(result), flush=True)
    torch.distributed.destroy_process_group()


def _cast(value, dtype):
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    return value.to(dtype) if value.is_floating_point() else value


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy size on whatever device is there (CI)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=None, help="transformer layers (42 released)")
    parser.add_argument("--steps", type=int, default=3, help="denoising steps per row")
    parser.add_argument("--cache-steps", type=int, default=10, help="steps for the cache rows")
    parser.add_argument("--precision-layers", type=int, default=4)
    parser.add_argument("--precision-steps", type=int, default=3)
    parser.add_argument("--compile-on-cpu", action="store_true")
    parser.add_argument("--workdir", default=None, help="where quantized rows save the random checkpoint")
    parser.add_argument("--json", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--cfg-parallel-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    device = torch.device(args.device)
    config = dict(SMOKE_CONFIG) if args.smoke else {}
    if args.smoke:
        args.steps, args.cache_steps, args.precision_steps = 2, min(args.cache_steps, 5), 2
    if args.layers is not None:
        config["num_layers"] = args.layers
    if args.cfg_parallel_worker:
        cfg_parallel_worker(args, config)
        return 0
    dtype = torch.bfloat16
    inputs = make_inputs(config, device, dtype)
    c = full_config(config)
    tokens = 13 * c["sample_height"] * c["sample_width"] // 4
    header = (
        f"Hallo3 transformer, random weights, {c['num_layers']} layers x {c['num_attention_heads']} heads of "
        f"{c['attention_head_dim']}, latent {c['sample_height']}x{c['sample_width']}x13 ({tokens} video tokens), "
        f"CFG batch 2, bf16, {device} "
        f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{os.cpu_count()}-core CPU'}), "
        f"torch {torch.__version__}"
    )
    print(header, flush=True)

    rows: list[dict] = []
    failed = False

    def record(section: str, variant: str, fn: Callable, baseline: dict | None = None) -> dict | None:
        nonlocal failed
        started = time.perf_counter()
        row: dict = dict(section=section, variant=variant)
        result = None
        try:
            result = fn()
            row["status"] = "ok"
            row["s_per_step"] = result["s_per_step"]
            row["peak_gib"] = result.get("peak_gib")
            if "speedup" in result:
                row["speedup"] = result["speedup"]
            elif baseline is not None:
                row["speedup"] = baseline["s_per_step"] / result["s_per_step"]
            if "relative_difference" in result:
                row["relative_difference"] = result["relative_difference"]
            elif baseline is not None:
                row["relative_difference"] = relative_difference(result["latents"], baseline["latents"])
            row["note"] = result.get("note", "")
        except Skip as reason:
            row["status"] = "skipped"
            row["note"] = str(reason)
        except Exception as error:  # a GPU check reports every row; the exit status says whether any failed
            failed = True
            row["status"] = "error"
            row["note"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
            traceback.print_exc()
        row["wall_s"] = time.perf_counter() - started
        rows.append(row)
        print(f"  {section:11} {variant:45} {row['status']:8} {row.get('note', '')}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return result

    # 1. Memory modes; the plain bf16 row is the baseline of the sections after it
    mode_rows = memory_mode_rows(args, config, device, dtype, inputs)
    baseline = record(*mode_rows[0])
    for row in mode_rows[1:]:
        record(*row, baseline=baseline)

    # 2.-4. Caches, attention backends, torch.compile on one resident bf16 transformer
    transformer = build(config, device, dtype)
    cache_baseline = None
    for i, row in enumerate(cache_rows(args, transformer, device, inputs)):
        result = record(*row, baseline=cache_baseline)
        cache_baseline = result if i == 0 else cache_baseline
    backend_baseline = None
    for i, row in enumerate(backend_rows(args, transformer, device, inputs)):
        result = record(*row, baseline=backend_baseline)
        backend_baseline = result if i == 0 else backend_baseline
    record(*compile_row(args, transformer, device, inputs), baseline=baseline)
    del transformer

    # 5. Precision, 6. multi-GPU
    record(*precision_row(args, config, device, inputs))
    for row in parallel_rows(args, config, device):
        record(*row)

    print(f"\n{header}\n")
    print("| section | variant | status | s / step | peak GiB | speed-up | rel. diff | note |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [
            f"{row['s_per_step']:.3f}" if "s_per_step" in row else "-",
            f"{row['peak_gib']:.1f}" if row.get("peak_gib") is not None else "-",
            f"{row['speedup']:.2f}x" if "speedup" in row else "-",
            f"{row['relative_difference']:.2e}" if "relative_difference" in row else "-",
        ]
        print(f"| {row['section']} | {row['variant']} | {row['status']} | {' | '.join(cells)} | {row['note']} |")
    args.json.write_text(json.dumps(dict(header=header, rows=rows), indent=1))
    print(f"\nwrote {args.json}")
    if any(not math.isfinite(row.get("s_per_step", 0.0)) for row in rows):
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
