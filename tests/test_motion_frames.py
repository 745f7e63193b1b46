"""Motion frames: clip k is conditioned on the last decoded frames of clip k - 1 (architecture 6.1, 12.14).

Each run records, per clip, the generator state just before the conditioning latent is made, the image latent the
transformer actually receives (input channels 16: of the clip's first step) and the clip's decoded frames. The image
latent must equal a plainly written reference: the VAE posterior sample x scaling factor of [portrait; previous clip's
last K frames in [-1, 1] x one motion-frame mask], zero-padded to the clip's latent frames, all drawn from the recorded
generator state in the pipeline's order (mask first, then the posterior sample). Clip 0 uses the portrait as its
motion frames. The reference does not call `prepare_image_latents`, which is what is under test.
"""

import numpy as np
import pytest
import torch

from hallo3.clip_loop import motion_frame_mask


SECONDS = 4.0  # 100 frames: 3 clips for every motion frame count 0..3 (47-49 new frames per clip)


def portrait_array(pipe) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (pipe.height, pipe.width, 3), dtype=np.uint8)


def speech(seconds: float) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def record_clip_loop(pipe, monkeypatch, motion_frames: int, output_type: str = "np") -> dict:
    """Run 3 clips of one step each; return what each clip was conditioned on and what it decoded."""
    record = {"generator_states": [], "image_latents": [], "decoded": []}
    pipeline_class = type(pipe)
    prepare_image_latents, decode_latents = pipeline_class.prepare_image_latents, pipeline_class.decode_latents

    def recording_prepare(self, image, motion, num_latent_frames, generator):
        record["generator_states"].append(generator.get_state())
        return prepare_image_latents(self, image, motion, num_latent_frames, generator)

    def recording_decode(self, latents):
        frames = decode_latents(self, latents)
        record["decoded"].append(frames.clone())
        return frames

    def image_channels(module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        record["image_latents"].append(hidden_states[:, :, module.config.out_channels :].clone())

    monkeypatch.setattr(pipeline_class, "prepare_image_latents", recording_prepare)
    monkeypatch.setattr(pipeline_class, "decode_latents", recording_decode)
    handle = pipe.transformer.register_forward_pre_hook(image_channels, with_kwargs=True)
    try:
        out = pipe(
            portrait_array(pipe),
            speech(SECONDS),
            prompt="a person speaks",
            num_inference_steps=1,  # one transformer call per clip: its first (and only) step
            motion_frames=motion_frames,
            generator=torch.Generator().manual_seed(0),
            output_type=output_type,
        )
    finally:
        handle.remove()
    record["output"] = out
    return record


def portrait_tensor(pipe) -> torch.Tensor:
    """The portrait as the model sees it: [3, H, W] in [-1, 1]."""
    return torch.from_numpy(portrait_array(pipe).astype(np.float32) / 255.0).permute(2, 0, 1) * 2 - 1


@torch.no_grad()
def expected_image_latents(pipe, motion: torch.Tensor | None, generator_state: torch.Tensor) -> torch.Tensor:
    """[1, 13, 16, h, w]: VAE sample of [portrait; masked motion frames], then zero latent frames."""
    generator = torch.Generator().set_state(generator_state)
    frames = [portrait_tensor(pipe)]
    if motion is not None:
        mask = motion_frame_mask(pipe.height, pipe.width, generator=generator)  # one mask for all motion frames
        frames += [frame * mask for frame in motion]
    video = torch.stack(frames, dim=1)[None]  # [1, 3, 1 + K, H, W], channels first for the VAE
    posterior = pipe.vae.encode(video).latent_dist
    latent = (posterior.sample(generator=generator) * pipe.vae.config.scaling_factor).permute(0, 2, 1, 3, 4)
    num_latent_frames = (pipe.clip_length - 1) // pipe.vae_scale_factor_temporal + 1
    assert latent.shape[1] == 1  # the causal VAE folds portrait + up to 3 motion frames into one latent frame
    padding = torch.zeros(1, num_latent_frames - 1, *latent.shape[2:])
    return torch.cat([latent, padding], dim=1)


@pytest.mark.parametrize(
    "motion_frames, output_type", [(1, "np"), (2, "np"), (3, "np"), (2, "latent")], ids=["K1", "K2", "K3", "K2-latent"]
)
def test_each_clip_is_conditioned_on_the_previous_clips_last_frames(
    tiny_pipeline, monkeypatch, motion_frames, output_type
):
    record = record_clip_loop(tiny_pipeline, monkeypatch, motion_frames, output_type)
    states, image_latents, decoded = record["generator_states"], record["image_latents"], record["decoded"]
    assert len(states) == len(image_latents) == 3
    # the last clip conditions nothing, so the "latent" output decodes only the first two
    assert len(decoded) == (3 if output_type == "np" else 2)

    portrait = portrait_tensor(tiny_pipeline)
    for clip, (state, received) in enumerate(zip(states, image_latents)):
        if clip == 0:
            motion = portrait[None].expand(motion_frames, -1, -1, -1)  # no previous clip: the portrait itself
        else:
            motion = decoded[clip - 1][-motion_frames:] * 2 - 1  # [K, 3, H, W], [0, 1] -> [-1, 1]
            # the previous clip's frames are not the portrait: conditioning on the portrait again would differ
            stale = expected_image_latents(tiny_pipeline, portrait[None].expand(motion_frames, -1, -1, -1), state)
            change = (received[:1] - stale).abs().max().item()
            assert change > 1e-2, f"clip {clip} is conditioned on the portrait again, not on clip {clip - 1}'s frames"
        expected = expected_image_latents(tiny_pipeline, motion, state)
        for row in received:  # every guidance row gets the same image latent
            torch.testing.assert_close(row[None], expected, msg=lambda m, clip=clip: f"clip {clip}: {m}")

    if output_type == "np":  # the recorded decodes are the frames of the video: each clip after its motion frames
        video = torch.cat([frames[motion_frames:] for frames in decoded])[: record["output"].num_frames]
        assert np.array_equal(record["output"].frames[0], video.permute(0, 2, 3, 1).numpy())


def test_without_motion_frames_the_image_latent_is_the_portraits_alone(tiny_pipeline, monkeypatch):
    """motion_frames=0: every clip's image latent is the VAE sample of the portrait alone (no mask drawn)."""
    record = record_clip_loop(tiny_pipeline, monkeypatch, motion_frames=0)
    assert len(record["image_latents"]) == 3
    for clip, (state, received) in enumerate(zip(record["generator_states"], record["image_latents"])):
        expected = expected_image_latents(tiny_pipeline, None, state)  # no mask drawn, no previous frames
        for row in received:
            torch.testing.assert_close(row[None], expected, msg=lambda m, clip=clip: f"clip {clip}: {m}")
    # and the video is the clips' frames end to end, none dropped as motion frames
    video = torch.cat(record["decoded"])[: record["output"].num_frames]
    assert np.array_equal(record["output"].frames[0], video.permute(0, 2, 3, 1).numpy())
