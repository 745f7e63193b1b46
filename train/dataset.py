"""Prepared clips -> training samples (architecture 8.4): 49 consecutive frames, a reference frame, features.

Every random choice of a sample comes from a generator seeded with (seed, epoch, index), so a resumed run draws
exactly what an uninterrupted one would. A sample that cannot be read (a truncated file, a missing frame) is replaced
by the next readable one, and its reason travels with the batch to be logged and counted by the training loop.
"""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch.utils.data import Dataset

from hallo3.clip_loop import audio_windows
from hallo3.preprocessing.image import pad_square


# what reading a damaged sample raises: truncated or missing files (PIL, open), bad safetensors, bad shapes
BAD_SAMPLE_ERRORS = (OSError, ValueError, RuntimeError, KeyError, IndexError, SafetensorError)


def read_metadata(root: Path) -> list[dict]:
    items = []
    for metadata in sorted(root.glob("metadata*.jsonl")):
        items += [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
    return items


def has_text_embeddings(root: str | Path) -> bool:
    """Whether every readable prepared clip carries its caption's T5 embedding (then training needs no T5)."""
    found = False
    for item in read_metadata(Path(root)):
        try:
            with safe_open(str(Path(root) / "clips" / item["name"] / "features.safetensors"), "pt") as features:
                if "text_emb" not in features.keys():
                    return False
            found = True
        except BAD_SAMPLE_ERRORS:
            continue  # a damaged clip is skipped in training, it does not decide this
    return found


def framed_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """An RGB image framed as training frames every talking-head frame, resized to height x height (bicubic) and
    padded with black (-1 after normalisation) to width (architecture 12.19), as [3, H, W] in [-1, 1]."""
    canvas = pad_square(image, width, height, Image.BICUBIC)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


def frame_to_tensor(path: Path, width: int, height: int) -> torch.Tensor:
    """The frame file `path` as `framed_tensor` frames it."""
    return framed_tensor(Image.open(path).convert("RGB"), width, height)


def frame_path(clip: Path, index: int) -> Path:
    """Frame `index` (from 0) of a prepared clip."""
    return clip / "frames" / f"{index + 1:05d}.png"


class Hallo3ClipDataset(Dataset):
    """Samples of `train.prepare_dataset` output.

    Args:
        root (`Path`): the prepared folder (metadata*.jsonl, clips/).
        width, height (`int`): the model's resolution. Frames are resized to height x height and padded to width,
            as the official training does for talking heads (architecture 12.19).
        num_frames (`int`): frames per sample (49).
        audio_margin (`int`): frames kept free at both ends so that every audio window has true neighbours (2).
        window (`int`): audio window (5).

    Each item: `video` [F, 3, H, W] and `reference` / `masked_reference` [3, H, W] in [-1, 1], `face_emb` [512],
    `audio_emb` [F, window, layers, C], `text_emb` [S, D] when precomputed, `caption`. With precomputed latents
    (`prepare_dataset --vae`) the window is one of the stored ones, `latent_parameters` [T, 2C, h, w] holds its VAE
    posterior, and `video` has only the first `motion_frames` frames.
    """

    def __init__(
        self,
        root: str | Path,
        width: int,
        height: int,
        num_frames: int = 49,
        audio_margin: int = 2,
        window: int = 5,
        seed: int = 0,
        motion_frames: int = 2,
    ):
        self.root = Path(root)
        self.items = [item for item in read_metadata(self.root) if item["num_frames"] >= num_frames + 2 * audio_margin]
        if not self.items:
            raise ValueError(f"{self.root}: no prepared clip with at least {num_frames + 2 * audio_margin} frames.")
        self.width, self.height = width, height
        self.num_frames, self.audio_margin, self.window = num_frames, audio_margin, window
        self.seed, self.epoch = seed, 0
        self.motion_frames = motion_frames

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def load_frame(self, clip: Path, index: int) -> torch.Tensor:
        return frame_to_tensor(frame_path(clip, index), self.width, self.height)

    def __getitem__(self, index: int) -> dict:
        """Sample `index`, or the next readable one; `bad_samples` lists the reasons of those passed over."""
        bad_samples = []
        for offset in range(len(self.items)):
            position = (index + offset) % len(self.items)
            try:
                sample = self.load(position)
            except BAD_SAMPLE_ERRORS as error:
                reason = f"{self.items[position]['name']}: {type(error).__name__}: {error}"
                bad_samples.append(reason)
                continue
            sample["bad_samples"] = bad_samples
            return sample
        raise RuntimeError(f"{self.root}: no readable sample; {'; '.join(bad_samples)}")

    def load(self, index: int) -> dict:
        item = self.items[index]
        clip = self.root / "clips" / item["name"]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        latents = load_file(clip / "latents.safetensors") if (clip / "latents.safetensors").is_file() else None
        if latents is not None:  # precomputed windows: pick one; only the motion frames are read as pixels
            window = int(rng.integers(0, len(latents["starts"])))
            start = int(latents["starts"][window])
        else:
            start = int(rng.integers(self.audio_margin, item["num_frames"] - self.num_frames - self.audio_margin + 1))
        reference_index = int(rng.integers(0, item["num_frames"]))

        frames = self.motion_frames if latents is not None else self.num_frames
        video = torch.stack([self.load_frame(clip, start + i) for i in range(frames)])
        frame = Image.open(frame_path(clip, reference_index)).convert("RGB")
        reference = framed_tensor(frame, self.width, self.height)
        mask = Image.open(clip / "face_mask.png").convert("L").resize(frame.size)
        masked = Image.composite(frame, Image.new("RGB", frame.size), mask)
        masked_reference = framed_tensor(masked, self.width, self.height)

        features = load_file(clip / "features.safetensors")
        # training windows have true neighbours: cut with the margin, window, then drop the margin again
        m = self.audio_margin
        around = features["audio_emb"][start - m : start + self.num_frames + m].float()
        windows = audio_windows(around, self.window)[m : m + self.num_frames]
        sample = {
            "video": video,
            "reference": reference,
            "masked_reference": masked_reference,
            "face_emb": features["face_emb"].float(),
            "audio_emb": windows,
            "caption": item["caption"],
        }
        if "text_emb" in features:
            sample["text_emb"] = features["text_emb"].float()
        if latents is not None:
            sample["latent_parameters"] = latents["parameters"][window].float()  # [T, 2C, h, w]: mean, log-variance
        return sample
