"""Shared tiny configurations and fixture paths. Everything runs on CPU in fp32."""

from pathlib import Path

import pytest
import torch

from hallo3.loading import TINY_TRANSFORMER_CONFIG


FIXTURE_A = Path(__file__).parent / "fixtures" / "hallo3_parity_a"
ASSETS = Path(__file__).parent.parent / "assets" / "examples"

# A tiny denoiser of the released structure: 2 layers, 2 heads of 32, 13 latent frames of 4x6 tokens. It is the
# tiny-random one with 8 text tokens and wav2vec2 windows of 12 layers x 16 channels, plus the channel and frame
# counts spelled out, since stock CogVideoX (built from TINY_STOCK) has other defaults.
TINY_TRANSFORMER = {
    **TINY_TRANSFORMER_CONFIG,
    "in_channels": 32,
    "out_channels": 16,
    "sample_frames": 49,
    "max_text_seq_length": 8,
    "audio_num_layers": 12,
    "audio_channels": 16,
}
HALLO3_ONLY = (
    "face_embed_dim",
    "face_hidden_size",
    "num_face_tokens",
    "audio_window",
    "audio_num_layers",
    "audio_channels",
    "audio_intermediate_dim",
    "audio_hidden_size",
    "num_audio_tokens",
)
TINY_STOCK = {k: v for k, v in TINY_TRANSFORMER.items() if k not in HALLO3_ONLY}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_inputs(batch_size: int = 2, num_frames: int = 13, text_len: int = 8, generator_seed: int = 0) -> dict:
    """Random inputs of the tiny denoiser's shapes: latents [B, F, 32, 8, 12], audio windows for 4(F-1)+1 frames."""
    g = torch.Generator().manual_seed(generator_seed)
    pixel_frames = (num_frames - 1) * 4 + 1
    return dict(
        hidden_states=torch.randn(batch_size, num_frames, 32, 8, 12, generator=g),
        encoder_hidden_states=torch.randn(batch_size, text_len, 32, generator=g),
        timestep=torch.full((batch_size,), 499.0),
        face_embeds=torch.randn(batch_size, 512, generator=g),
        audio_embeds=torch.randn(batch_size, pixel_frames, 5, 12, 16, generator=g) * 0.5,
        reference_hidden_states=[torch.randn(1, 24, 64, generator=g) for _ in range(2)],
    )


@pytest.fixture(scope="session")
def tiny_pipeline():
    """The built-in tiny-random pipeline (random weights), shared by the tests; no progress bars."""
    from hallo3.loading import build_tiny_random_pipeline

    pipe = build_tiny_random_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_animator(tiny_pipeline):
    from hallo3.inference import PortraitAnimator
    from hallo3.loading import LoadedModel

    return PortraitAnimator(LoadedModel(tiny_pipeline, "tiny-random", is_random=True), "cpu")
