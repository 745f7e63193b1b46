"""Memory modes: how the pipeline's weights are placed, through diffusers' own offload and quantization hooks.

| mode | what happens | needs |
|---|---|---|
| none | everything on the GPU | ~48 GB in bf16 (29 GB Hallo3 + 9.5 GB T5 + activations) |
| model-offload | each model moves to the GPU when used; T5 and the reference net run once per video, so after that they never occupy the GPU again | a GPU |
| group-offload | transformer blocks stream to the GPU one group at a time, prefetched on a CUDA stream | a GPU |
| sequential-offload | every leaf module moves when used: the least memory, the slowest | a GPU |
| 8bit, 4bit | transformer, reference net and T5 weights in bitsandbytes int8 / nf4, chosen when loading, plus model offload | a GPU, bitsandbytes |
| int8-torchao | transformer and reference net weights in torchao int8 (weight-only), plus model offload on a GPU | torchao |

VAE slicing (one batch row at a time: the same result) is turned on in every mode but `none`. VAE tiling is not: diffusers
blends overlapping tiles, which changes the frames at 480x720, and at small sizes it changes the latent's shape
(64x96 frames encode to a 9x12 latent instead of 8x12). Turn it on yourself (`pipe.vae.enable_tiling()`) if the VAE's
memory is what stops a run.
"""

import importlib
import importlib.util
import sys

import torch


OFFLOAD_MODES = ("model-offload", "group-offload", "sequential-offload")
QUANTIZED_MODES = ("8bit", "4bit", "int8-torchao")
MEMORY_MODES = ("none", *OFFLOAD_MODES, *QUANTIZED_MODES)
QUANTIZED_COMPONENTS = ("transformer", "reference_net", "text_encoder")


# the modules of diffusers and transformers whose import pulls torchao in, whenever it is installed
TORCHAO_QUANTIZERS = ("diffusers.quantizers.torchao.torchao_quantizer", "transformers.quantizers.quantizer_torchao")


def defer_torchao() -> None:
    """Keep torchao unimported until the int8-torchao mode asks for it (`import_torchao`).

    diffusers' and transformers' quantizer registries import torchao as soon as it is installed, and the import prints
    (kernel libraries built for another torch or Python, torch deprecations) in every run, quantized or not. This
    imports the two registries while torchao reads as absent: a `None` entry in `sys.modules` is Python's way to make a
    module unfindable, and the answers the libraries keep (diffusers' availability flag, transformers' cached check)
    are set to match. It runs when this module is first imported, which `hallo3/__init__` does before anything that
    imports diffusers' models. A process that has torchao or a registry already, or library versions that keep their
    answers elsewhere, are left as they are."""
    if "torchao" in sys.modules or any(name in sys.modules for name in TORCHAO_QUANTIZERS):
        return
    from diffusers.utils import import_utils as diffusers_imports
    from transformers.utils import import_utils as transformers_imports

    if not hasattr(diffusers_imports, "_torchao_available") or not hasattr(
        transformers_imports.is_torchao_available, "cache_clear"
    ):
        return
    sys.modules["torchao"] = None  # type: ignore[assignment]
    try:
        diffusers_imports._torchao_available = False
        transformers_imports.is_torchao_available.cache_clear()
        for name in TORCHAO_QUANTIZERS:
            importlib.import_module(name)
    finally:
        del sys.modules["torchao"]


defer_torchao()


def import_torchao() -> None:
    """Import torchao and let diffusers and transformers see it again: their availability checks are refreshed and
    the quantizer modules that `defer_torchao` imported without it are run again, now with it."""
    import torchao  # noqa: F401
    from diffusers.utils import import_utils as diffusers_imports
    from transformers.utils import import_utils as transformers_imports

    if diffusers_imports._torchao_available and transformers_imports.is_torchao_available():
        return  # never deferred, or already imported again
    diffusers_imports._torchao_available, diffusers_imports._torchao_version = diffusers_imports._is_package_available(
        "torchao"
    )
    transformers_imports.is_torchao_available.cache_clear()
    for name in TORCHAO_QUANTIZERS:
        importlib.reload(importlib.import_module(name))


def available_memory_modes() -> list[str]:
    """The modes this machine supports: offload and bitsandbytes need a CUDA GPU; torchao int8 runs anywhere."""
    has_torchao = importlib.util.find_spec("torchao") is not None
    if not torch.cuda.is_available():
        return ["none", "int8-torchao"] if has_torchao else ["none"]
    modes = ["none", *OFFLOAD_MODES]
    if importlib.util.find_spec("bitsandbytes") is not None:
        modes += ["8bit", "4bit"]
    return modes + (["int8-torchao"] if has_torchao else [])


def quantization_config(mode: str, library: str):
    """The load-time quantization config of `mode` for a diffusers or a transformers model (None if unquantized)."""
    if mode in ("8bit", "4bit"):
        if library == "diffusers":
            from diffusers import BitsAndBytesConfig
        else:
            from transformers import BitsAndBytesConfig
        if mode == "8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    if mode == "int8-torchao" and library == "diffusers":
        import_torchao()
        from diffusers import TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    return None


def quantize_pipeline(pipeline, mode: str, workdir) -> None:
    """Quantize an already built pipeline (tiny-random) the way loading would: save each component, reload it with
    `quantization_config`. Real checkpoints get the config directly in `hallo3.loading`."""
    for name in QUANTIZED_COMPONENTS:
        component = getattr(pipeline, name)
        library = "transformers" if name == "text_encoder" else "diffusers"
        config = quantization_config(mode, library)
        if config is None:
            continue
        folder = f"{workdir}/{name}"
        component.save_pretrained(folder)
        reloaded = type(component).from_pretrained(folder, quantization_config=config, torch_dtype=component.dtype)
        pipeline.register_modules(**{name: reloaded.eval()})


def apply_memory_mode(pipeline, mode: str, device: str | torch.device = "cuda") -> None:
    """Place `pipeline` for `mode` (quantized modes were chosen at load time and add model offload here)."""
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory mode must be one of {', '.join(MEMORY_MODES)}; got {mode!r}.")
    if mode != "none" and mode not in available_memory_modes():
        raise ValueError(
            f"memory mode {mode!r} needs a CUDA GPU{' and bitsandbytes' if mode in QUANTIZED_MODES else ''}."
        )
    device = torch.device(device)
    if mode == "none":
        pipeline.to(device)
        return
    pipeline.vae.enable_slicing()
    if mode == "int8-torchao" and device.type != "cuda":
        pipeline.to(device)  # weights are already int8; nothing to offload to on a CPU
    elif mode in ("model-offload", *QUANTIZED_MODES):
        pipeline.enable_model_cpu_offload(device=device)
    elif mode == "sequential-offload":
        pipeline.enable_sequential_cpu_offload(device=device)
    elif mode == "group-offload":
        for component in (pipeline.transformer, pipeline.reference_net):
            component.enable_group_offload(
                onload_device=device, offload_type="block_level", num_blocks_per_group=1, use_stream=True
            )
        # T5 (9.5 GB) streams leaf by leaf too; the VAE and wav2vec2 are small enough to stay
        from diffusers.hooks import apply_group_offloading

        apply_group_offloading(pipeline.text_encoder, onload_device=device, offload_type="leaf_level")
        for component in (pipeline.vae, pipeline.audio_encoder):
            component.to(device)
