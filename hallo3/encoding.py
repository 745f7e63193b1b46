"""The frozen encoders' maths, once for the pipeline and for `train/`: pixels <-> VAE latents, text -> T5 states.

Latents are frames-first, [B, F, C, h, w], the layout of the transformer; the VAE works channels-first, so every
crossing permutes here and nowhere else. Latents are the VAE's posterior samples times its `scaling_factor` (0.7 for
CogVideoX-5B), as the official code feeds them (architecture 12.13).
"""

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


def vae_posterior(vae, frames: torch.Tensor) -> DiagonalGaussianDistribution:
    """Pixel frames [B, F, 3, H, W] in [-1, 1] -> the VAE's posterior over channels-first latents [B, C, F', h, w]."""
    return vae.encode(frames.permute(0, 2, 1, 3, 4).to(vae.dtype)).latent_dist


def sample_latents(
    posterior: DiagonalGaussianDistribution, scaling_factor: float, generator: torch.Generator | None
) -> torch.Tensor:
    """A posterior sample x `scaling_factor`, frames-first [B, F', C, h, w] in fp32."""
    return (posterior.sample(generator=generator) * scaling_factor).permute(0, 2, 1, 3, 4).float()


def posterior_parameters(posterior: DiagonalGaussianDistribution) -> torch.Tensor:
    """The posterior's mean and log-variance on channels, frames-first [B, F', 2C, h, w]: what `train.prepare_dataset
    --vae` stores, so that training can still sample it (`sample_stored_latents`)."""
    return posterior.parameters.permute(0, 2, 1, 3, 4)


def sample_stored_latents(
    parameters: torch.Tensor, scaling_factor: float, generator: torch.Generator | None
) -> torch.Tensor:
    """A sample x `scaling_factor` of stored posterior parameters [B, F', 2C, h, w] (`posterior_parameters`),
    frames-first [B, F', C, h, w] in fp32.

    Diffusers' distribution gets each latent frame as one [2C, h, w] posterior, so the noise is drawn in the stored
    frames-first order, as training has always drawn it (a run repeats an earlier one). `sample_latents` draws
    channels-first: the same generator puts the same numbers in other places there.
    """
    posterior = DiagonalGaussianDistribution(parameters.flatten(0, 1))
    return (posterior.sample(generator=generator) * scaling_factor).unflatten(0, parameters.shape[:2]).float()


def encode_frames(vae, frames: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Pixel frames [B, F, 3, H, W] in [-1, 1] -> sampled, scaled latents [B, F', C, h, w] (architecture 12.13)."""
    return sample_latents(vae_posterior(vae, frames), vae.config.scaling_factor, generator)


def encode_image_latents(
    vae,
    reference_frames: torch.Tensor,
    motion_frames: torch.Tensor | None,
    num_latent_frames: int,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """The conditioning ("image") latent the denoiser sees beside the noisy latent (architecture 6.1): the VAE latent of
    [reference frame; motion frames], then zero frames up to `num_latent_frames`. The causal VAE folds the reference
    frame and up to 3 motion frames into the first latent frame.

    Args:
        reference_frames (`torch.Tensor`): [B, 3, H, W] in [-1, 1].
        motion_frames (`torch.Tensor`, *optional*): [B, K, 3, H, W], already masked (and noised, in training).
    """
    frames = reference_frames[:, None]
    if motion_frames is not None:
        frames = torch.cat([frames, motion_frames], dim=1)
    latents = encode_frames(vae, frames, generator)
    return F.pad(latents, (0, 0, 0, 0, 0, 0, 0, num_latent_frames - latents.shape[1]))


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
