"""Memory modes: how the pipeline's weights are placed, through diffusers' own offload and quantization hooks.

| mode | what happens | needs |
|---|---|---|
| none | everything on the GPU | ~48 GB in bf16 (29 GB Hallo3 + 9.5 GB T5 + activations) |
| model-offload | each model moves to the GPU when used; T5 and the reference net run once per video, so after that they never occupy the GPU again | a GPU |
| group-offload | transformer blocks stream to the GPU one group at a time, prefetched on a CUDA stream | a GPU |
| sequential-offload | every leaf module moves when used: the least memory, the slowest | a GPU |
| 8bit, 4bit | transformer, reference net and T5 weights in bitsandbytes int8 / nf4, chosen when loading, plus model offload | a GPU, bitsandbytes |

VAE tiling and slicing are turned on in every mode but `none` (they are exact at the released 480x720 geometry).
"""

import importlib.util

import torch


OFFLOAD_MODES = ("model-offload", "group-offload", "sequential-offload")
QUANTIZED_MODES = ("8bit", "4bit")
MEMORY_MODES = ("none", *OFFLOAD_MODES, *QUANTIZED_MODES)


def available_memory_modes() -> list[str]:
    """The modes this machine supports: offload and quantization need a CUDA GPU (bitsandbytes for 8/4-bit)."""
    if not torch.cuda.is_available():
        return ["none"]
    modes = ["none", *OFFLOAD_MODES]
    if importlib.util.find_spec("bitsandbytes") is not None:
        modes += list(QUANTIZED_MODES)
    return modes


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
    pipeline.vae.enable_tiling()
    pipeline.vae.enable_slicing()
    if mode in ("model-offload", *QUANTIZED_MODES):
        pipeline.enable_model_cpu_offload(device=device)
    elif mode == "sequential-offload":
        pipeline.enable_sequential_cpu_offload(device=device)
    elif mode == "group-offload":
        for component in (pipeline.transformer, pipeline.reference_net):
            component.enable_group_offload(
                onload_device=device, offload_type="block_level", num_blocks_per_group=1, use_stream=True
            )
        # the small models follow model offload semantics by hand: they stay where they are used
        for component in (pipeline.text_encoder, pipeline.vae, pipeline.audio_encoder):
            component.to(device)
