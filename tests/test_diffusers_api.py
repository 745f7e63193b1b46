"""The pipeline and transformer through diffusers' own API: cache configs, standard call options and properties."""

import numpy as np
import pytest
import torch
from diffusers import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)
from diffusers.hooks import HookRegistry
from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

from hallo3.loading import build_tiny_random_pipeline
from hallo3.pipeline_hallo3 import Hallo3Pipeline

from .test_pipeline import CallRecorder, portrait, run, speech


STEPS = 6


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_random_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def uncached(pipe):
    return run(pipe, num_inference_steps=STEPS).frames


@pytest.fixture(scope="module")
def other_seed_difference(pipe, uncached):
    """How far apart two uncached videos of different seeds are: the scale a cache's error is measured against."""
    other = run(pipe, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1)).frames
    return np.abs(other - uncached).mean()


CACHES = {
    "first-block": lambda pipe: FirstBlockCacheConfig(threshold=0.2),
    # magnitude ratios of 1 (no calibration run): the accumulated error stays under the threshold for a few steps
    "mag": lambda pipe: MagCacheConfig(num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS, threshold=0.5),
    "taylorseer": lambda pipe: TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=2, taylor_factors_dtype=torch.float32
    ),
    # the recipes of diffusers' docs, with the pipeline's `current_timestep`
    "faster": lambda pipe: FasterCacheConfig(
        current_timestep_callback=lambda: pipe.current_timestep,
        attention_weight_callback=lambda _: 0.5,
        is_guidance_distilled=True,
    ),
    "pyramid-attention-broadcast": lambda pipe: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2,
        spatial_attention_timestep_skip_range=(100, 800),
        current_timestep_callback=lambda: pipe.current_timestep,
    ),
}


@pytest.mark.parametrize("cache", list(CACHES))
def test_cache_configs_work_on_the_transformer_and_stay_near_the_uncached_video(
    pipe, uncached, other_seed_difference, cache
):
    """`transformer.enable_cache(config)` with no setup call: each cache skips work (the video changes) and its
    difference to the uncached video on the same seed is small next to the difference between two seeds."""
    pipe.transformer.enable_cache(CACHES[cache](pipe))
    try:
        frames = run(pipe, num_inference_steps=STEPS).frames
    finally:
        pipe.transformer.disable_cache()
    difference = np.abs(frames - uncached)
    assert difference.mean() > 0, f"{cache} skipped nothing"
    assert difference.mean() < 0.5 * other_seed_difference, (difference.mean(), other_seed_difference)
    assert difference.max() < 0.5


def test_taylorseer_defaults_hook_every_attention_and_feed_forward(pipe):
    """diffusers' default TaylorSeer patterns match no CogVideoX module; the model supplies its own."""
    transformer = pipe.transformer
    transformer.enable_cache(TaylorSeerCacheConfig())
    try:
        hooked = {
            name
            for name, module in transformer.named_modules()
            if isinstance(getattr(module, "_diffusers_hook", None), HookRegistry)
            and module._diffusers_hook.get_hook(_TAYLORSEER_CACHE_HOOK) is not None
        }
    finally:
        transformer.disable_cache()
    expected = {
        f"transformer_blocks.{i}.{name}"
        for i in range(len(transformer.transformer_blocks))
        for name in ("attn1", "attn_face", "attn_audio", "ff")
    }
    assert hooked == expected


def test_cache_state_restarts_with_every_clip(pipe):
    """Each clip is a sampling run of its own for the cache hooks. TaylorSeer (interval 2 after 2 warm-up steps)
    computes self-attention at steps 0, 1, 3 of 4 and forecasts step 2; without a reset the second clip would
    continue at step 4 and compute at 5 and 7 only."""
    transformer = pipe.transformer
    computed = []
    handle = transformer.transformer_blocks[0].attn1.to_q.register_forward_hook(lambda *a: computed.append(1))
    per_step = []
    transformer.enable_cache(
        TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2, taylor_factors_dtype=torch.float32)
    )
    try:
        run(
            pipe,
            seconds=2.3,
            num_inference_steps=4,
            callback_on_step_end=lambda *a: per_step.append(len(computed)) or {},
        )
    finally:
        transformer.disable_cache()
        handle.remove()
    computes = np.diff([0, *per_step]).tolist()
    assert computes == [1, 1, 0, 1] * 2


def test_standard_properties_follow_the_loop(pipe):
    seen = []

    def record(pipe_, step, timestep, tensors):
        seen.append((pipe_.current_timestep, pipe_.guidance_scale, pipe_.num_timesteps))
        return {}

    run(pipe, num_inference_steps=3, guidance_scale=4.0, use_dynamic_cfg=True, callback_on_step_end=record)
    timesteps = pipe.scheduler.timesteps.tolist()
    assert [int(t) for t, _, _ in seen] == timesteps and len(set(timesteps)) == 3
    assert [g for _, g, _ in seen] == pytest.approx([1.0, 1.0 + 3.0 * (1 - np.cos(np.pi * 0.5**5)) / 2, 4.0])
    assert {n for _, _, n in seen} == {3}
    assert pipe.current_timestep is None and pipe.interrupt is False


def test_interrupt_stops_the_video_after_the_current_clip(pipe):
    def stop(pipe_, step, timestep, tensors):
        pipe_._interrupt = True
        return {}

    with CallRecorder(pipe.transformer) as recorder:
        out = run(pipe, seconds=2.3, num_inference_steps=3, callback_on_step_end=stop)  # 2 clips uninterrupted
    assert len(recorder.calls) == 1
    assert out.num_frames == out.frames.shape[1] == 47


@pytest.mark.parametrize("output_type", ["pt", "pil"])
def test_frames_are_batched_like_diffusers_video_pipelines(pipe, uncached, output_type, tmp_path):
    """`frames[0]` is the video for every output type (np is checked in test_pipeline), so diffusers' idiom
    `export_to_video(out.frames[0], ...)` works."""
    out = run(pipe, num_inference_steps=STEPS if output_type == "pt" else 1, output_type=output_type)
    video = out.frames[0]
    assert len(out.frames) == 1 and len(video) == out.num_frames == 25
    if output_type == "pt":
        np.testing.assert_array_equal(video.permute(0, 2, 3, 1).numpy(), uncached[0])
    else:
        from diffusers.utils import export_to_video

        assert video[0].size == (pipe.width, pipe.height)
        export_to_video(video, str(tmp_path / "out.mp4"), fps=pipe.fps)
        assert (tmp_path / "out.mp4").stat().st_size > 0


def test_latent_output_decodes_to_the_video(pipe):
    """Two clips: the latents of both, concatenated on frames; each decodes to the frames the np output has."""
    out = run(pipe, seconds=2.3, num_inference_steps=1, output_type="latent")
    frames = run(pipe, seconds=2.3, num_inference_steps=1).frames[0]
    latent_frames = 13
    assert out.frames.shape == (1, 2 * latent_frames, 16, pipe.height // 8, pipe.width // 8)
    with torch.no_grad():
        decoded = [pipe.decode_latents(clip)[2:] for clip in out.frames.split(latent_frames, dim=1)]
    video = torch.cat(decoded)[: out.num_frames].permute(0, 2, 3, 1).numpy()
    assert out.num_frames == len(frames) == 58
    np.testing.assert_allclose(video, frames, atol=1e-6)


def test_prompt_encoded_by_a_text_only_pipeline_gives_the_same_video(pipe):
    """Tokenizer + T5 alone make a pipeline; its embeddings drive a pipeline that has no T5."""
    text_pipe = Hallo3Pipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    assert text_pipe.vae is None and text_pipe.transformer is None
    max_length = pipe.transformer.config.max_text_seq_length
    prompt_embeds, negative_prompt_embeds = text_pipe.encode_prompt("a person speaks", max_sequence_length=max_length)
    assert prompt_embeds.shape == (1, max_length, 32) and not negative_prompt_embeds.any()  # official: zeros

    components = {**pipe.components, "text_encoder": None}
    no_t5 = Hallo3Pipeline(**components)
    no_t5.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    expected = pipe(portrait(pipe), speech(1.0), prompt="a person speaks", **kwargs).frames
    kwargs["generator"] = torch.Generator().manual_seed(0)
    actual = no_t5(portrait(pipe), speech(1.0), prompt_embeds=prompt_embeds, **kwargs).frames
    np.testing.assert_array_equal(actual, expected)

    # a negative prompt replaces the zero states of the unconditional row
    with CallRecorder(pipe.transformer) as recorder:
        run(pipe, num_inference_steps=1, negative_prompt="blurry")
    negative, _ = text_pipe.encode_prompt("blurry", max_sequence_length=max_length)
    torch.testing.assert_close(recorder.calls[0]["encoder_hidden_states"][0], negative[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt_embeds": torch.zeros(1, 16, 32)}, "either `prompt` or `prompt_embeds`"),
        ({"negative_prompt": "x", "negative_prompt_embeds": torch.zeros(1, 16, 32)}, "either `negative_prompt`"),
        ({"output_type": "latent", "on_frames": print}, "on_frames"),
    ],
)
def test_conflicting_options_are_refused(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(pipe, **kwargs)
