"""Memory modes give the same video as the plain path (CPU-capable modes here; GPU-only ones skip without CUDA)."""

import numpy as np
import pytest
import torch

from hallo3.loading import build_tiny_random_pipeline, load_pipeline
from hallo3.memory import apply_memory_mode, available_memory_modes

from .test_pipeline import run


def needs_cuda(test):
    """GPU-only: part of `pytest -m slow`, and skipped there without CUDA."""
    return pytest.mark.slow(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


@pytest.fixture(scope="module")
def plain_frames():
    pipe = build_tiny_random_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return run(pipe, seconds=1.0, num_inference_steps=3).frames


def test_cpu_machines_offer_only_what_they_can_run():
    modes = available_memory_modes()
    assert modes[0] == "none"
    if not torch.cuda.is_available():
        assert not {"model-offload", "sequential-offload", "group-offload", "8bit", "4bit"} & set(modes)
        with pytest.raises(ValueError, match="needs"):
            apply_memory_mode(build_tiny_random_pipeline(), "model-offload", "cpu")


def test_int8_torchao_is_close_to_the_plain_video(plain_frames):
    pytest.importorskip("torchao")
    loaded = load_pipeline("tiny-random", torch_dtype=torch.float32, memory_mode="int8-torchao")
    pipe = loaded.pipeline
    pipe.set_progress_bar_config(disable=True)
    weight = pipe.transformer.transformer_blocks[0].attn1.to_q.weight
    assert "int8" in type(weight).__name__.lower() or "Affine" in type(weight).__name__
    frames = run(pipe, seconds=1.0, num_inference_steps=3).frames
    assert np.abs(frames - plain_frames).mean() < 0.02


@needs_cuda
@pytest.mark.parametrize("mode", ["model-offload", "group-offload", "sequential-offload"])
def test_offload_modes_match_the_plain_path(plain_frames, mode):
    pipe = build_tiny_random_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_memory_mode(mode, "cuda")
    frames = run(pipe, seconds=1.0, num_inference_steps=3).frames
    assert np.abs(frames - plain_frames).max() < 1e-2


@needs_cuda
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_bitsandbytes_modes_are_close(plain_frames, mode):
    pytest.importorskip("bitsandbytes")
    pipe = load_pipeline("tiny-random", torch_dtype=torch.float32, memory_mode=mode).pipeline
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_memory_mode(mode, "cuda")
    frames = run(pipe, seconds=1.0, num_inference_steps=3).frames
    assert np.abs(frames - plain_frames).mean() < 0.05


def test_peak_memory_is_flat_across_clip_counts(monkeypatch):
    """Frames stream to `on_frames`: 1, 2 and 4 clips peak at the same numpy memory (tracemalloc traces numpy
    buffers). The waveforms are made before tracing and wav2vec2 is replaced by a torch-only stub, so what is traced
    is the frames and nothing that rightly grows with the audio."""
    import tracemalloc

    import hallo3.pipeline_hallo3 as pipeline_module

    from .test_pipeline import portrait, speech

    class Features:
        def __init__(self, *args):
            pass

        def __call__(self, waveform, clip_length):
            frames = int(np.ceil(len(waveform) / 16000 * 25))
            return torch.zeros(-(-frames // clip_length) * clip_length, 2, 32), frames

    monkeypatch.setattr(pipeline_module, "AudioEncoder", Features)
    pipe = build_tiny_random_pipeline()
    pipe.set_progress_bar_config(disable=True)
    image = portrait(pipe)
    waveforms = {clips: speech(seconds) for clips, seconds in ((1, 1.8), (2, 3.7), (4, 7.4))}
    pipe(image, waveforms[1], num_inference_steps=1, on_frames=lambda f: None)  # warm-up
    peaks = {}
    for clips, waveform in waveforms.items():
        tracemalloc.start()
        out = pipe(image, waveform, num_inference_steps=1, on_frames=lambda f: None)
        peaks[clips] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert -(-out.num_frames // 47) == clips
    one_clip_of_frames = 47 * 64 * 96 * 3
    assert peaks[4] - peaks[1] < one_clip_of_frames / 2, peaks


def test_step_cache_shortcuts_stay_near_the_uncached_video(plain_frames):
    """`enable_step_cache` names; each diffusers cache is bounded against the uncached video in
    test_diffusers_api.py, with enough steps for every cache to skip work."""
    pipe = build_tiny_random_pipeline()
    pipe.set_progress_bar_config(disable=True)
    for kind in ("first-block", "taylorseer", "faster"):
        pipe.enable_step_cache(kind, threshold=0.05)
        try:
            frames = run(pipe, seconds=1.0, num_inference_steps=3).frames
        finally:
            pipe.transformer.disable_cache()
        assert frames.shape == plain_frames.shape and np.abs(frames - plain_frames).mean() < 0.05, kind
    with pytest.raises(ValueError, match="step cache must be one of"):
        pipe.enable_step_cache("unknown")
