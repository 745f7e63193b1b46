"""Pure tensor functions for audio windows and the clip loop (architecture 5.1 step 5, 7.2, 12.15, 12.16).

Shared by the pipeline and `train/`; no models, no files.
"""

import math
from dataclasses import dataclass

import torch

from .settings import DEFAULTS


def audio_windows(features: torch.Tensor, window: int = 5) -> torch.Tensor:
    """[N, layers, C] -> [N, window, layers, C]: entry [n, k] is frame n + k - window // 2, clamped to [0, N - 1].

    Inference clamps at the ends of the audio; training windows a slice with a margin and drops the margin, so its
    neighbours are real (architecture 5.1 step 5, 8.4).
    """
    num_frames = features.shape[0]
    offsets = torch.arange(window) - window // 2
    indices = (torch.arange(num_frames)[:, None] + offsets[None, :]).clamp(0, num_frames - 1)  # [N, window]
    return features[indices]


def num_clips(num_frames: int, clip_length: int = 49, motion_frames: int = DEFAULTS.motion_frames) -> int:
    """Clips needed to cover `num_frames` output frames; each clip adds `clip_length - motion_frames` new frames.

    The official loop runs ceil(padded / stride) clips over audio padded to a multiple of `clip_length`, which can
    add a final clip whose frames are all cut (architecture 12.16). Clip k depends only on clips before it, so skipping
    that clip leaves every kept frame unchanged.
    """
    return math.ceil(num_frames / (clip_length - motion_frames))


def clip_audio_indices(
    clip_index: int, num_audio_frames: int, clip_length: int = 49, motion_frames: int = DEFAULTS.motion_frames
) -> torch.Tensor:
    """Which audio frame conditions each of the clip's `clip_length` frames; -1 means silence (zeros).

    Clip k starts with the `motion_frames` frames that clip k - 1 ended on (its audio prefix; zeros for the first
    clip), then the next `stride` audio frames; a short last clip repeats its last frame.
    """
    stride = clip_length - motion_frames
    start = clip_index * stride
    prefix = torch.arange(start - motion_frames, start) if clip_index > 0 else torch.full((motion_frames,), -1)
    chunk = torch.arange(start, min(start + stride, num_audio_frames))
    indices = torch.cat([prefix, chunk])
    if len(indices) < clip_length:
        indices = torch.cat([indices, indices[-1:].expand(clip_length - len(indices))])
    return indices


def gather_clip_audio(windows: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Audio windows for the frames in `indices` ([clip_length]); index -1 gives zeros."""
    clip = windows[indices.clamp(min=0)]
    return torch.where((indices >= 0).view(-1, *([1] * (clip.ndim - 1))), clip, torch.zeros_like(clip))


def motion_frame_mask(
    height: int, width: int, rate: float = 0.1, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """The official motion-frame corruption: one random pixel mask [H, W] that drops `rate` of the pixels (to 0, mid
    gray in [-1, 1]), shared by all motion frames and channels (architecture 6.1, 12.14)."""
    noise = torch.rand((height, width), generator=generator, device=generator.device if generator else device)
    return (noise > rate).to(device)


@dataclass
class ClipLoopState:
    """Where the pipeline's clip loop stands after a clip: enough to compute the next clip exactly.

    Attributes:
        next_clip: index of the next clip to compute.
        frames_done: output frames delivered so far.
        motion: the last decoded frames in [-1, 1] that condition the next clip ([K, 3, H, W]), or None.
        generator_state: `torch.Generator.get_state()` after the clip's last random draw, or None.
    """

    next_clip: int
    frames_done: int
    motion: torch.Tensor | None
    generator_state: torch.Tensor | None
