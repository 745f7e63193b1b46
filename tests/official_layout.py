"""A tiny `pretrained_models/` tree laid out as `hf download fudan-generative-ai/hallo3` lays out the real one.

hallo3/ holds fixture A's official checkpoint; the VAE is a tiny CogVideoX VAE saved in the SAT key layout
(`to_sat_vae_key`, written from the SAT module structure independently of the converter); T5 and wav2vec2 are tiny
transformers folders, T5 flat with its tokenizer as the official `t5-v1_1-xxl/` is.
"""

import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKLCogVideoX
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from .conftest import FIXTURE_A


def to_sat_vae_key(name: str, num_up_blocks: int) -> str:
    """diffusers AutoencoderKLCogVideoX name -> SAT `cp_enc_dec.py` name: `down[i].block[j]`, `down[i].downsample`,
    `mid.block_1/2`, `nin_shortcut`, and decoder `up[i]` numbered from the highest resolution (LDM builds it in
    reverse, diffusers in running order)."""
    parts = name.split(".")
    out = []
    i = 0
    while i < len(parts):
        part = parts[i]
        if part == "down_blocks":
            out += ["down", parts[i + 1]]
            i += 2
        elif part == "up_blocks":
            out += ["up", str(num_up_blocks - 1 - int(parts[i + 1]))]
            i += 2
        elif part == "mid_block":  # mid_block.resnets.K -> mid.block_{K+1}
            out += ["mid", f"block_{int(parts[i + 2]) + 1}"]
            i += 3
        elif part == "resnets":
            out += ["block", parts[i + 1]]
            i += 2
        elif part in ("downsamplers", "upsamplers"):  # downsamplers.0 -> downsample
            out.append(part[: -len("rs")])
            i += 2
        elif part == "conv_shortcut":
            out.append("nin_shortcut")
            i += 1
        else:
            out.append(part)
            i += 1
    return ".".join(out)


def tiny_sat_vae(path: Path, block_out_channels=(32, 32, 32, 32), seed: int = 0, **config) -> AutoencoderKLCogVideoX:
    """Write a random tiny VAE as `3d-vae.pt` in the SAT layout (plus a discriminator key, as the real file has);
    returns the diffusers VAE it was made from."""
    torch.manual_seed(seed)
    vae = AutoencoderKLCogVideoX(
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=16,
        scaling_factor=0.7,
        sample_height=64,
        sample_width=96,
        **config,
    ).eval()
    num_up = len(block_out_channels)
    state = {to_sat_vae_key(k, num_up): v.clone() for k, v in vae.state_dict().items()}
    state["loss.discriminator.blocks.0.weight"] = torch.zeros(3)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state}, path)
    return vae


def build_official_layout(root: Path) -> Path:
    """`root/pretrained_models` with every folder the loader reads; returns it."""
    from hallo3.loading import build_tiny_random_pipeline

    models = root / "pretrained_models"
    shutil.copytree(FIXTURE_A / "checkpoint", models / "hallo3")
    tiny_sat_vae(models / "cogvideox-5b-i2v-sat" / "vae" / "3d-vae.pt")
    tiny = build_tiny_random_pipeline()  # T5 of width 32, as the fixture's text_embed_dim
    tiny.tokenizer.save_pretrained(models / "t5-v1_1-xxl")
    tiny.text_encoder.save_pretrained(models / "t5-v1_1-xxl")
    save_fixture_wav2vec(models / "wav2vec" / "wav2vec2-base-960h")
    return models


def save_fixture_wav2vec(folder: Path) -> Path:
    """A random wav2vec2 of the shape fixture A's audio projection reads (12 layers of 16 channels), saved."""
    config = Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=12,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    Wav2Vec2Model(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True).save_pretrained(folder)
    return folder
