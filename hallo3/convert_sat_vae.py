"""Convert the official SAT VAE (`cogvideox-5b-i2v-sat/vae/3d-vae.pt`) into a diffusers `AutoencoderKLCogVideoX` folder.

    python -m hallo3.convert_sat_vae --checkpoint pretrained_models/cogvideox-5b-i2v-sat/vae/3d-vae.pt \
        --output pretrained_models/hallo3-diffusers/vae

It is the same network as the VAE of the CogVideoX-5B-I2V diffusers release (architecture 6.2), so the official download
alone is enough: no second copy from the Hub. The rules are the transformer converter's: the file is read with
`torch.load(weights_only=True, mmap=True)` (no pickled code runs), the configuration is held to
`hallo3.model_files.CONFIG_LIMITS` before anything is built from it, tensors must be finite and stream into shards,
the result must load strictly, and it is written to a staging folder that is renamed when complete.

Key mapping: diffusers' own `scripts/convert_cogvideox_to_diffusers.py` (`VAE_KEYS_RENAME_DICT` and the reversed
`up.{i}` blocks of an LDM-style decoder); the discriminator (`loss.*`) is left out.
"""

import argparse
import json
import logging
import re
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKLCogVideoX

from .convert_sat_checkpoint import (
    CheckpointError,
    ShardWriter,
    check_converted_config,
    check_finite,
    load_state_dict,
    run_conversion,
)
from .interrupts import staging_folder


logger = logging.getLogger("hallo3.convert_vae")

STAGING_SUFFIX = ".partial"
# What shapes cannot tell, as the CogVideoX-5B-I2V VAE has it (architecture 6.2)
OFFICIAL_VAE_CONFIG = {
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "scaling_factor": 0.7,
    "temporal_compression_ratio": 4,
    "sample_height": 480,
    "sample_width": 720,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# substring renames, applied in this order (diffusers' VAE_KEYS_RENAME_DICT)
RENAMES = (
    ("block.", "resnets."),
    ("down.", "down_blocks."),
    ("downsample", "downsamplers.0"),
    ("upsample", "upsamplers.0"),
    ("nin_shortcut", "conv_shortcut"),
    ("encoder.mid.block_1", "encoder.mid_block.resnets.0"),
    ("encoder.mid.block_2", "encoder.mid_block.resnets.1"),
    ("decoder.mid.block_1", "decoder.mid_block.resnets.0"),
    ("decoder.mid.block_2", "decoder.mid_block.resnets.1"),
)
UP_KEY = re.compile(r"decoder\.up\.(\d+)\.")


def convert_vae_key(name: str, num_up_blocks: int) -> str:
    """One SAT VAE key -> its diffusers name. The SAT decoder lists `up` blocks highest resolution first (LDM
    builds them in reverse); diffusers lists them in the order they run."""
    if match := UP_KEY.match(name):
        name = f"decoder.up_blocks.{num_up_blocks - 1 - int(match.group(1))}." + name[match.end() :]
    for old, new in RENAMES:
        name = name.replace(old, new)
    return name


def infer_vae_config(shapes: dict[str, torch.Size], overrides: dict) -> dict:
    """AutoencoderKLCogVideoX config from the SAT tensor shapes, plus what shapes cannot tell."""
    try:
        down = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down.")})
        block_out_channels = [shapes[f"encoder.down.{i}.block.0.conv1.conv.weight"][0] for i in down]
        layers_per_block = 1 + max(int(k.split(".")[4]) for k in shapes if k.startswith("encoder.down.0.block."))
        latent_channels = shapes["encoder.conv_out.conv.weight"][0] // 2
        in_channels = shapes["encoder.conv_in.conv.weight"][1]
        out_channels = shapes["decoder.conv_out.conv.weight"][0]
    except (KeyError, IndexError, ValueError) as error:
        raise CheckpointError(
            f"not a CogVideoX SAT VAE: no encoder.down.* / encoder.conv_out layout ({type(error).__name__}: {error})."
        ) from None
    config = {
        **OFFICIAL_VAE_CONFIG,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "block_out_channels": block_out_channels,
        "down_block_types": ["CogVideoXDownBlock3D"] * len(block_out_channels),
        "up_block_types": ["CogVideoXUpBlock3D"] * len(block_out_channels),
        "layers_per_block": layers_per_block,
        "latent_channels": latent_channels,
    }
    config.update(overrides)
    return config


def vae_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The VAE tensors of `3d-vae.pt` (a bare state dict, or one under `state_dict` / `module`); the rest (the
    training discriminator, `loss.*`) is left out."""
    state = load_state_dict(path)
    vae = {k: v for k, v in state.items() if k.startswith(("encoder.", "decoder."))}
    if not vae:
        first = ", ".join(list(state)[:3]) or "none"
        raise CheckpointError(f"{path}: no encoder.*/decoder.* tensors; not the SAT VAE (first keys: {first}).")
    return vae


def convert_vae(
    checkpoint: Path, output: Path, config_overrides: dict | None = None, max_shard_bytes: int = 2 * 2**30
) -> Path:
    """`3d-vae.pt` -> `output/` (config.json + safetensors that `AutoencoderKLCogVideoX.from_pretrained` loads
    strictly); atomic."""
    if not checkpoint.is_file():
        raise CheckpointError(f"--checkpoint {checkpoint}: no such file.")
    if output.exists() or output.is_symlink():
        raise CheckpointError(f"--output {output} already exists; choose a new folder.")
    state = vae_state_dict(checkpoint)
    config = infer_vae_config({k: v.shape for k, v in state.items()}, config_overrides or {})
    check_converted_config(config, AutoencoderKLCogVideoX.__name__, checkpoint)
    with torch.device("meta"):
        model = AutoencoderKLCogVideoX.from_config(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}

    with staging_folder(output, STAGING_SUFFIX) as staging:
        model.save_config(staging)
        writer = ShardWriter(staging, max_shard_bytes)
        num_up_blocks = len(config["block_out_channels"])
        for name, tensor in state.items():
            new_name = convert_vae_key(name, num_up_blocks)
            if new_name not in expected:
                raise CheckpointError(f"{name} maps to {new_name}, which AutoencoderKLCogVideoX does not have.")
            if tuple(tensor.shape) != expected[new_name]:
                raise CheckpointError(f"{name}: shape {tuple(tensor.shape)} does not fit {new_name}.")
            check_finite(tensor, name, checkpoint)
            writer.add(new_name, tensor)
        missing = sorted(set(expected) - set(writer.finish()))
        if missing:
            raise CheckpointError(f"AutoencoderKLCogVideoX would miss {len(missing)} tensors, e.g. {missing[:3]}.")
        staging.rename(output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="the official 3d-vae.pt")
    parser.add_argument("--output", type=Path, required=True, help="new folder for the diffusers VAE")
    parser.add_argument("--config", type=json.loads, default={}, help="JSON config values that shapes cannot tell")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_conversion(lambda: convert_vae(args.checkpoint, args.output, args.config))


if __name__ == "__main__":
    sys.exit(main())
