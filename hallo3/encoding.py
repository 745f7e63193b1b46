"""The frozen encoders' maths, once for the pipeline and for `train/`: pixels <-> VAE latents, text -> T5 states.

Latents are frames-first, [B, F, C, h, w], the layout of the transformer; the VAE works channels-first, so every
crossing permutes here and nowhere else. Latents are the VAE's posterior samples times its `scaling_factor` (0.7 for
CogVideoX-5B), as the official code feeds them (architecture 12.13).
"""

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


def vae_posterior(vae, frames: torch.Tensor) -> DiagonalGaussianDistribution:
    """Pixel frames [B, F, 3, H, W] in [-1, 1] -> the VAE's posterior over channels-first latents [B, C, F', h, w]."""
    return vae.encode(frames.permute(0, 2, 1, 3, 4).to(vae.dtype)).latent_dist


def sample_latents(
    posterior: DiagonalGaussianDistribution, scaling_factor: float, generator: torch.Generator | None
) -> torch.Tensor:
    """A posterior sample x `scaling_factor`, frames-first [B, F', C, h, w] in fp32."""
    return (posterior.sample(generator=generator) * scaling_factor).permute(0, 2, 1, 3, 4).float()


def encode_frames(vae, frames: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Pixel frames [B, F, 3, H, W] in [-1, 1] -> sampled, scaled latents [B, F', C, h, w] (architecture 12.13)."""
    return sample_latents(vae_posterior(vae, frames), vae.config.scaling_factor, generator)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents [1, F, C, h, w] -> pixel frames [F', 3, H, W] in [0, 1] (fp32)."""
    latents = latents.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor
    frames = vae.decode(latents.to(vae.dtype)).sample  # [1, 3, F', H, W]
    return ((frames[0].float() + 1) / 2).clamp(0, 1).permute(1, 0, 2, 3)


def encode_text(tokenizer, text_encoder, prompts: list[str], max_length: int, device) -> torch.Tensor:
    """T5 states [B, max_length, D] of `prompts`, padded to `max_length`, without an attention mask (architecture
    6.3): CogVideoX's text encoding, at inference and in training."""
    input_ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(input_ids.to(device))[0]
