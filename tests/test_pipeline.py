"""Hallo3Pipeline on the tiny-random model: guidance, clip-loop alignment, streaming, offload, save/load."""

import numpy as np
import pytest
import torch
from PIL import Image

import hallo3.pipeline_hallo3 as pipeline_module
from hallo3.pipeline_hallo3 import Hallo3Pipeline, dynamic_guidance_scale


def portrait(pipe) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (pipe.height, pipe.width, 3), dtype=np.uint8))


def speech(seconds: float) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def run(pipe, seconds=1.0, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(portrait(pipe), speech(seconds), prompt="a person speaks", **kwargs)


class CallRecorder:
    """Wraps the transformer's forward to record the batch of every call."""

    def __init__(self, transformer):
        self.transformer, self.calls = transformer, []
        self.forward = transformer.forward

    def __enter__(self):
        def record(*args, **kwargs):
            self.calls.append({"hidden_states": args[0], "encoder_hidden_states": args[1], **kwargs})
            return self.forward(*args, **kwargs)

        self.transformer.forward = record
        return self

    def __exit__(self, *exc):
        self.transformer.forward = self.forward


def test_frames_cover_the_audio_exactly(tiny_pipeline):
    out = run(tiny_pipeline, seconds=2.3)
    # batched like diffusers' video pipelines: frames[0] is the video
    assert out.frames.shape[0] == 1 and out.num_frames == 58 == len(out.frames[0])  # ceil(2.3 * 25)
    assert out.frames.shape[2:] == (64, 96, 3) and 0 <= out.frames.min() and out.frames.max() <= 1


def test_equal_audio_guidance_is_the_two_branch_path_with_no_extra_pass(tiny_pipeline):
    with CallRecorder(tiny_pipeline.transformer) as official:
        expected = run(tiny_pipeline).frames
    with CallRecorder(tiny_pipeline.transformer) as equal:
        actual = run(tiny_pipeline, audio_guidance_scale=3.5).frames
    assert np.array_equal(actual, expected)
    assert {c["hidden_states"].shape[0] for c in equal.calls} == {2} and len(equal.calls) == len(official.calls)


def test_separate_audio_guidance_runs_a_text_only_branch(tiny_pipeline):
    with CallRecorder(tiny_pipeline.transformer) as recorder:
        run(tiny_pipeline, audio_guidance_scale=6.0)
    call = recorder.calls[0]
    audio, text = call["audio_embeds"], call["encoder_hidden_states"]
    assert audio.shape[0] == text.shape[0] == 3
    # rows: [no text, no audio], [text, no audio], [text, audio]
    assert audio[0].abs().max() == 0 and audio[1].abs().max() == 0 and audio[2].abs().max() > 0
    assert text[0].abs().max() == 0 and torch.equal(text[1], text[2]) and text[1].abs().max() > 0


def test_guide_matches_the_documented_formulas(tiny_pipeline):
    u, t, c = (torch.randn(1, 3, 4) for _ in range(3))
    two = tiny_pipeline.guide(torch.cat([u, c]), 3.5, None)
    torch.testing.assert_close(two, u + 3.5 * (c - u))
    three = tiny_pipeline.guide(torch.cat([u, t, c]), 3.5, 6.0)
    torch.testing.assert_close(three, u + 3.5 * (t - u) + 6.0 * (c - t))
    torch.testing.assert_close(tiny_pipeline.guide(torch.cat([u, t, c]), 2.0, 2.0), u + 2.0 * (c - u))


def test_dynamic_guidance_ramps_from_one_to_the_scale():
    scales = [dynamic_guidance_scale(6.0, i, 50) for i in range(50)]
    assert scales[0] == 1.0 and abs(scales[-1] - 6.0) < 1e-9
    assert all(a <= b + 1e-12 for a, b in zip(scales, scales[1:]))


def test_each_clip_is_conditioned_on_its_own_audio(tiny_pipeline, monkeypatch):
    """Synthetic features whose value is the frame number + 1: the conditional row of clip k must carry audio frames
    [prefix of clip k-1's last 2; 47k ... 47k + 46], zeros for the first clip's prefix."""

    class FrameNumberEncoder:
        def __init__(self, *args):
            pass

        def __call__(self, waveform, clip_length):
            num_frames = int(np.ceil(len(waveform) / 16000 * 25))
            padded = -(-num_frames // clip_length) * clip_length
            return torch.arange(1.0, padded + 1).view(-1, 1, 1).expand(-1, 2, 32).clone(), num_frames

    monkeypatch.setattr(pipeline_module, "AudioEncoder", FrameNumberEncoder)
    with CallRecorder(tiny_pipeline.transformer) as recorder:
        out = run(tiny_pipeline, seconds=4.0, num_inference_steps=1)  # 100 frames -> 3 clips
    assert out.num_frames == 100 and len(recorder.calls) == 3
    for k, call in enumerate(recorder.calls):
        centre = call["audio_embeds"][1, :, 2, 0, 0]  # conditional row, window centre
        assert call["audio_embeds"][0].abs().max() == 0  # unconditional row: silence
        expected = [0, 0] if k == 0 else [47 * k - 1, 47 * k]  # 1-based frame numbers of the prefix
        assert centre[:2].tolist() == expected
        stop = min(47 * (k + 1), 147)
        assert centre[2 : 2 + stop - 47 * k].tolist() == list(range(47 * k + 1, stop + 1))


def test_streaming_frames_equal_returned_frames(tiny_pipeline):
    expected = run(tiny_pipeline, seconds=2.3).frames
    chunks = []
    out = run(tiny_pipeline, seconds=2.3, on_frames=chunks.append)
    assert out.frames is None and [len(c) for c in chunks] == [47, 11]
    streamed = np.concatenate(chunks)
    assert streamed.dtype == np.uint8
    assert np.array_equal(streamed, (expected[0] * 255).astype(np.uint8))


def test_reference_net_runs_once_per_video(tiny_pipeline):
    calls = []
    handle = tiny_pipeline.reference_net.register_forward_hook(lambda *a: calls.append(1))
    try:
        run(tiny_pipeline, seconds=4.0, num_inference_steps=1)  # 3 clips
    finally:
        handle.remove()
    assert len(calls) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"motion_frames": 4}, "motion_frames` must be 0..3"),
        ({"num_inference_steps": 0}, "num_inference_steps` must be a whole number of steps in 1..1000, got 0"),
        ({"guidance_scale": 0.5}, "guidance_scale` must be a finite number >= 1, got 0.5"),
        ({"guidance_scale": float("nan")}, "guidance_scale` must be a finite number >= 1, got nan"),
        ({"output_type": "mp4"}, "output_type"),
    ],
)
def test_bad_arguments_name_the_rule(tiny_pipeline, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(tiny_pipeline, **kwargs)


@pytest.mark.parametrize("motion_frames", [0, 1, 3])
def test_other_motion_frame_counts_keep_one_conditioning_latent(tiny_pipeline, motion_frames):
    out = run(tiny_pipeline, seconds=2.3, num_inference_steps=1, motion_frames=motion_frames)
    assert out.frames.shape[:2] == (1, 58)


def test_callback_can_replace_latents(tiny_pipeline):
    seen = []

    def zero_latents(pipe, step, timestep, tensors):
        seen.append(step)
        return {"latents": torch.zeros_like(tensors["latents"])}

    run(tiny_pipeline, callback_on_step_end=zero_latents, num_inference_steps=2)
    assert seen == [0, 1]


def test_pipeline_save_and_load_round_trip(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path)
    loaded = Hallo3Pipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(run(loaded, seconds=1.0).frames, run(tiny_pipeline, seconds=1.0).frames)


def test_group_offload_gives_the_same_video(tiny_pipeline):
    """diffusers' group offload runs on CPU too (onload = offload = cpu), so the hooks are exercised here."""
    from hallo3.loading import build_tiny_random_pipeline

    pipe = build_tiny_random_pipeline()
    pipe.set_progress_bar_config(disable=True)
    expected = run(pipe).frames
    pipe.transformer.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    pipe.reference_net.enable_group_offload(torch.device("cpu"), offload_type="leaf_level")
    assert np.array_equal(run(pipe).frames, expected)


def test_reference_keys_values_once_per_video_and_tokens_once_per_clip(tiny_pipeline):
    transformer = tiny_pipeline.transformer
    counts = {"kv": 0, "face": 0, "audio": 0}
    hooks = [
        transformer.transformer_blocks[0].attn1.register_forward_pre_hook(lambda *a: None),
        transformer.face_proj.register_forward_hook(lambda *a: counts.__setitem__("face", counts["face"] + 1)),
        transformer.audio_proj.register_forward_hook(lambda *a: counts.__setitem__("audio", counts["audio"] + 1)),
    ]
    original = type(transformer.transformer_blocks[0].attn1).reference_key_value

    def counting(self, *args):
        counts["kv"] += 1
        return original(self, *args)

    type(transformer.transformer_blocks[0].attn1).reference_key_value = counting
    try:
        run(tiny_pipeline, seconds=4.0, num_inference_steps=3)  # 3 clips x 3 steps
    finally:
        type(transformer.transformer_blocks[0].attn1).reference_key_value = original
        for hook in hooks:
            hook.remove()
    assert counts == {"kv": len(transformer.transformer_blocks), "face": 1, "audio": 3}


def test_reusing_conditioning_changes_nothing(tiny_pipeline):
    """The reuse is exact: the same video as recomputing everything at every step."""
    reference = run(tiny_pipeline, seconds=2.3, num_inference_steps=3).frames
    original = tiny_pipeline.transformer.forward

    def no_reuse(*args, **kwargs):
        kwargs["conditioning_tokens"] = None
        return original(*args, **kwargs)

    tiny_pipeline.transformer.forward = no_reuse
    try:
        recomputed = run(tiny_pipeline, seconds=2.3, num_inference_steps=3).frames
    finally:
        tiny_pipeline.transformer.forward = original
    assert np.array_equal(recomputed, reference)


def test_guidance_acts_on_each_rows_x0_as_the_official_sampler(tiny_pipeline, monkeypatch):
    """The official DynamicCFG combines the rows' x0 estimates (architecture 7.3), not their v-predictions: equal in
    exact arithmetic, not in floating point, so the order is checked directly."""
    expected, guided_inputs = [], []

    def keep_x0(module, args, output):
        latents = args[0][:1, :, : module.config.out_channels].float()  # the rows share the noisy latent
        expected.append(tiny_pipeline.scheduler.predict_original_sample(output.sample.float(), latents))

    guide = tiny_pipeline.guide
    monkeypatch.setattr(
        tiny_pipeline, "guide", lambda rows, *scales: guided_inputs.append(rows) or guide(rows, *scales)
    )
    handle = tiny_pipeline.transformer.register_forward_hook(keep_x0)
    try:
        run(tiny_pipeline, num_inference_steps=3)
    finally:
        handle.remove()
    assert len(guided_inputs) == len(expected) == 3
    for rows, x0 in zip(guided_inputs, expected):
        torch.testing.assert_close(rows, x0, rtol=0, atol=0)
