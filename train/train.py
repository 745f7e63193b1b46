"""Both Hallo3 training stages in one accelerate loop (architecture 6.1, 6.5, 9).

    accelerate launch --config_file train/configs/accelerate/<config>.yaml -m train.train \
        --config train/configs/stage1.yaml [key=value ...]

v-prediction on the zero-terminal-SNR schedule with timesteps stratified across ranks; input dropouts; the
clip's first frames as masked, noised motion frames; the reference net at t=0; EMA; AdamW with the official warm-up;
gradient clipping; checkpoints through `save_state`, marked complete once every rank has written, with exact resume
(every random draw of a step is seeded by the step); periodic validation videos; diffusers folders at the end.

The denoiser and the reference net are one module (`Hallo3TrainingModel`), so every accelerate backend (DDP,
DeepSpeed ZeRO-2/3, FSDP2) prepares one model, in one precision. Scale comes from the accelerate config, see
train/configs/accelerate/.
"""

import argparse
import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Sampler

from hallo3.clip_loop import motion_frame_mask
from hallo3.encoding import encode_frames, encode_image_latents, encode_text, sample_stored_latents
from hallo3.scheduling_hallo3 import Hallo3DPMScheduler
from hallo3.transformer_hallo3 import Hallo3ReferenceNet, Hallo3Transformer3DModel

from .config import ConfigError, OptimConfig, TrainConfig, config_to_dict, load_config, one_line
from .dataset import Hallo3ClipDataset, has_text_embeddings, read_metadata


logger = get_logger("train")

COMPLETE_MARKER = "COMPLETE"  # written into a checkpoint folder once every rank has finished writing it


class TrainingInputError(ValueError):
    """The run cannot start or go on because of its inputs (config, launch, data); `main` prints the message as one
    line and exits with status 2."""


class EpochSampler(Sampler):
    """A fresh permutation per epoch from (seed, epoch): the order does not depend on how often a run resumed."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


class Progress:
    """Where the run is, saved as JSON in every checkpoint: the optimizer steps done, the bad samples skipped, and the
    data order followed. EpochSampler's order comes from (seed, epoch), and a resumed epoch is taken up after
    step % batches_per_epoch batches, so a run resumes only with the seed and the batches per epoch it was written
    with."""

    def __init__(self, seed: int, batches_per_epoch: int):
        self.step = 0
        self.bad_samples = 0
        self.seed, self.batches_per_epoch = seed, batches_per_epoch

    def state_dict(self) -> dict:
        epoch, done_in_epoch = divmod(self.step, self.batches_per_epoch)
        data = {
            "seed": self.seed,
            "batches_per_epoch": self.batches_per_epoch,
            "epoch": epoch,
            "batches_done_in_epoch": done_in_epoch,
        }
        return {"step": self.step, "bad_samples": self.bad_samples, "data": data}

    def load_state_dict(self, state: dict) -> None:
        """`state` as `read_training_state` checked it."""
        self.step = state["step"]
        self.bad_samples = state["bad_samples"]


# --------------------------------------------------------------------------------------------------------------------
# Models


def init_new_modules(model: torch.nn.Module, names: set[str], num_layers: int) -> None:
    """SAT's initialisation of modules a checkpoint did not have: N(0, 0.02) projections, N(0, 0.02 / sqrt(2L)) for
    the output projections, zero biases, LayerNorm 1/0 (architecture 9). The audio/face projections get PyTorch's
    default initialisation: `from_pretrained` leaves missing tensors uninitialised memory."""
    for module_name, module in model.named_modules():
        owned = {f"{module_name}.{n}" for n, _ in module.named_parameters(recurse=False)}
        if (
            module_name.startswith(("audio_proj", "face_proj"))
            and owned & names
            and hasattr(module, "reset_parameters")
        ):
            module.reset_parameters()
    for name, parameter in model.named_parameters():
        if name not in names or name.startswith(("audio_proj.", "face_proj.")):
            continue
        with torch.no_grad():
            if ".norm_" in name or name.split(".")[-2].startswith("norm"):
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                parameter.zero_()
            elif ".to_out." in name:
                parameter.normal_(0.0, 0.02 / math.sqrt(2 * num_layers))
            else:
                parameter.normal_(0.0, 0.02)


def pretrained_source(source: str) -> tuple[str, str | None]:
    """A local folder as is; `owner/repo/sub/folder` on the Hub as (repo id, subfolder)."""
    if Path(source).exists() or source.count("/") < 2:
        return source, None
    owner, repo, subfolder = source.split("/", 2)
    return f"{owner}/{repo}", subfolder


@dataclass
class LoadedModels:
    vae: Any
    tokenizer: Any  # None when the captions' T5 embeddings are precomputed
    text_encoder: Any  # None when the captions' T5 embeddings are precomputed
    transformer: Hallo3Transformer3DModel
    reference_net: Hallo3ReferenceNet


def load_models(config: TrainConfig, weight_dtype: torch.dtype, load_text_encoder: bool) -> LoadedModels:
    """The stage's models in `weight_dtype` (the stock weights are bf16 already); T5 only if `load_text_encoder`."""
    add_audio = config.stage == 2
    transformer_source, reference_source = config.model.transformer, config.model.reference_net
    tokenizer = text_encoder = None
    if config.model.components == "tiny-random":
        from hallo3.loading import build_tiny_random_pipeline

        tiny = build_tiny_random_pipeline(seed=config.seed)
        vae = tiny.vae
        if load_text_encoder:
            tokenizer, text_encoder = tiny.tokenizer, tiny.text_encoder
        if transformer_source is None:  # a fresh tiny model, as if loaded from a stock checkpoint
            # the override goes as a keyword: a config dict lists defaulted keys under `_use_default_values`, and
            # from_config would reset them, add_audio_module among them
            transformer = Hallo3Transformer3DModel.from_config(tiny.transformer.config, add_audio_module=add_audio)
            transformer.load_state_dict(tiny.transformer.state_dict(), strict=False)
            if weight_dtype != torch.float32:  # as from_pretrained(torch_dtype=...) would load them
                for module in (vae, text_encoder, transformer, tiny.reference_net):
                    if module is not None:
                        module.to(weight_dtype)
            return LoadedModels(vae, tokenizer, text_encoder, transformer, tiny.reference_net)
    else:
        from diffusers import AutoencoderKLCogVideoX

        vae = AutoencoderKLCogVideoX.from_pretrained(
            config.model.components, subfolder="vae", torch_dtype=weight_dtype
        )
        if load_text_encoder:
            from transformers import AutoTokenizer, T5EncoderModel

            tokenizer = AutoTokenizer.from_pretrained(config.model.components, subfolder="tokenizer")
            text_encoder = T5EncoderModel.from_pretrained(
                config.model.components, subfolder="text_encoder", torch_dtype=weight_dtype
            )
    if transformer_source is None or reference_source is None:
        raise TrainingInputError("model.transformer and model.reference_net are needed (see train/configs/*.yaml).")

    repo, subfolder = pretrained_source(transformer_source)
    transformer, info = Hallo3Transformer3DModel.from_pretrained(
        repo,
        subfolder=subfolder,
        add_audio_module=add_audio,
        low_cpu_mem_usage=False,
        output_loading_info=True,
        torch_dtype=weight_dtype,
    )
    init_new_modules(transformer, set(info["missing_keys"]), transformer.config.num_layers)
    if info["missing_keys"]:
        logger.info(f"initialised {len(info['missing_keys'])} new tensors (SAT init)")
    repo, subfolder = pretrained_source(reference_source)
    reference_net = Hallo3ReferenceNet.from_pretrained(repo, subfolder=subfolder, torch_dtype=weight_dtype)
    return LoadedModels(vae, tokenizer, text_encoder, transformer, reference_net)


class Hallo3TrainingModel(torch.nn.Module):
    """The denoiser and the reference net as one module: accelerate, DeepSpeed and FSDP2 each take one model, and the
    reference net gets the denoiser's precision and sharding."""

    def __init__(self, transformer: Hallo3Transformer3DModel, reference_net: Hallo3ReferenceNet):
        super().__init__()
        self.transformer = transformer
        self.reference_net = reference_net

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        reference_latents: torch.Tensor,
        face_embeds: torch.Tensor,
        audio_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states (`torch.Tensor`): noisy latents and image latents on channels, [B, F, 2C, h, w].
            encoder_hidden_states (`torch.Tensor`): caption embeddings [B, S, D], also the reference net's text.
            timestep (`torch.Tensor`): [B].
            reference_latents (`torch.Tensor`): the masked reference latent [B, 1, C, h, w], seen by the reference
                net at t = 0.
            face_embeds (`torch.Tensor`): [B, 512]. audio_embeds (`torch.Tensor`, *optional*): stage 2 windows.

        Returns:
            `torch.Tensor`: the v-prediction [B, F, C, h, w].
        """
        batch_size = hidden_states.shape[0]
        bank = self.reference_net(
            reference_latents,
            encoder_hidden_states,
            torch.zeros(batch_size, device=hidden_states.device),
        )
        return self.transformer(
            hidden_states,
            encoder_hidden_states,
            timestep,
            reference_hidden_states=bank,
            face_embeds=face_embeds,
            audio_embeds=audio_embeds,
        ).sample


def set_trainable(model: Hallo3TrainingModel, patterns: dict[str, list[str]]) -> list[str]:
    """requires_grad from the stage's patterns (per network); returns the trained names, in model order."""
    for network in ("transformer", "reference_net"):
        compiled = [re.compile(p) for p in patterns.get(network, [])]
        for name, parameter in getattr(model, network).named_parameters():
            parameter.requires_grad_(any(p.search(name) for p in compiled))
    # the reference net stops at the last block's modulated input: the rest of that block never gets a gradient
    last = f"transformer_blocks.{len(model.reference_net.transformer_blocks) - 1}."
    for name, parameter in model.reference_net.named_parameters():
        if name.startswith(last) and not name.startswith(last + "norm1."):
            parameter.requires_grad_(False)
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def add_lora(model: Hallo3TrainingModel, config: TrainConfig) -> list[str]:
    """PEFT adapters (through diffusers' `add_adapter`) on the configured networks; only they train."""
    from peft import LoraConfig as PeftLoraConfig

    lora = config.lora
    model.requires_grad_(False)
    for network in lora.networks:
        getattr(model, network).add_adapter(
            PeftLoraConfig(
                r=lora.rank,
                lora_alpha=int(lora.alpha or lora.rank),
                target_modules=list(lora.target_modules),
                init_lora_weights=True,
            )
        )
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def export_lora(accelerator: Accelerator, model: torch.nn.Module, config: TrainConfig, export_dir: Path) -> None:
    """The adapters (gathered onto the main process) as the one file `Hallo3Pipeline.load_lora_weights` reads."""
    from hallo3.pipeline_hallo3 import Hallo3Pipeline

    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    bare = accelerator.unwrap_model(model)

    def adapter(network: str) -> tuple[dict | None, dict | None]:
        if network not in config.lora.networks:
            return None, None
        prefix = f"{network}."
        # PEFT's own names carry the adapter name ("lora_A.default.weight"); the saved format does not
        layers = {
            name[len(prefix) :].replace(".default.", "."): tensor
            for name, tensor in state.items()
            if name.startswith(prefix) and ".lora_" in name
        }
        return layers, getattr(bare, network).peft_config["default"].to_dict()

    transformer_layers, transformer_metadata = adapter("transformer")
    reference_layers, reference_metadata = adapter("reference_net")
    Hallo3Pipeline.save_lora_weights(
        export_dir / "lora",
        transformer_lora_layers=transformer_layers,
        reference_net_lora_layers=reference_layers,
        transformer_lora_adapter_metadata=transformer_metadata,
        reference_net_lora_adapter_metadata=reference_metadata,
    )


def set_master_precision(model: torch.nn.Module) -> None:
    """Trained parameters in fp32 (the master weights the optimizer updates), frozen ones stay in the load dtype."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and norm weights (SAT's rule)."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (no_decay if name.endswith("bias") or "norm" in name else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------------------------------
# Schedules


def official_lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """SAT's AnnealingLR as Hallo3 ran it (architecture 9), for optimizer step `step` counted from 1: the first
    `warmup_hold_steps` at min(hold factor, ramp), a linear ramp to step `warmup_steps`, then the linear decay
    (max_steps - (step - warmup_steps)) / max_steps."""
    warmup = optim.warmup_steps
    if step <= warmup:
        ramp = step / warmup
        return min(optim.warmup_hold_factor, ramp) if step <= optim.warmup_hold_steps else ramp
    return max(0.0, (max_steps - (step - warmup)) / max_steps)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step by the loop itself: accelerate's scheduler wrapper would step it once per
    process (it assumes a schedule written for one process), running it N times too fast on N processes."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: official_lr_factor(done + 1, config.optim, config.max_steps)
    )


def sample_timesteps(
    num_train_timesteps: int, batch_size: int, rank: int, world_size: int, generator: torch.Generator, device
) -> torch.Tensor:
    """Timesteps stratified across ranks as the official training draws them: rank r draws uniformly from its 1/N
    slice of the schedule, so every global batch covers all noise levels."""
    low = rank * num_train_timesteps // world_size
    high = (rank + 1) * num_train_timesteps // world_size
    return torch.randint(low, high, (batch_size,), generator=generator, device=device)


# --------------------------------------------------------------------------------------------------------------------
# EMA


def local_tensor(parameter: torch.nn.Parameter) -> torch.Tensor:
    """The part of `parameter` this rank stores: its shard under FSDP2 (DTensor) or ZeRO-3, else all of it."""
    if hasattr(parameter, "to_local"):
        return parameter.to_local()
    if hasattr(parameter, "ds_tensor"):
        return parameter.ds_tensor
    return parameter.data


@contextlib.contextmanager
def full_tensor(parameter: torch.nn.Parameter):
    """The whole of `parameter` on every rank (a collective when it is sharded)."""
    if hasattr(parameter, "full_tensor"):
        yield parameter.full_tensor()
    elif hasattr(parameter, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([parameter]):
            yield parameter.data
    else:
        yield parameter.data


class ShardedEMA:
    """EMA of the trained parameters (architecture 9: FusedEmaAdam, decay 0.9999) where it costs least.

    Under FSDP2 or ZeRO-3 each rank averages its own shard of every parameter; otherwise (DDP, ZeRO-2) the
    parameters are split between the ranks, balanced by size, and each rank averages its share. Either way a rank
    holds 4 bytes x trained parameters / N, on the accelerator, or on the CPU with `ema_on_cpu`. The decay ramps up
    as diffusers' EMAModel does, min(decay, (1 + n) / (10 + n)).
    """

    def __init__(
        self,
        parameters: dict[str, torch.nn.Parameter],
        decay: float,
        rank: int,
        world_size: int,
        on_cpu: bool = False,
    ):
        self.decay, self.rank, self.world_size = decay, rank, world_size
        self.sharded = any(hasattr(p, "to_local") or hasattr(p, "ds_tensor") for p in parameters.values())
        if self.sharded:
            self.owner = {name: rank for name in parameters}
        else:  # largest first onto the least loaded rank; every rank computes the same split
            load = [0] * world_size
            self.owner = {}
            for name in sorted(parameters, key=lambda n: (-parameters[n].numel(), n)):
                self.owner[name] = load.index(min(load))
                load[self.owner[name]] += parameters[name].numel()
        device = torch.device("cpu") if on_cpu else None
        self.shadow = {
            name: local_tensor(parameter).detach().to(device=device, dtype=torch.float32, copy=True)
            for name, parameter in parameters.items()
            if self.owner[name] == rank
        }
        self.optimization_step = 0

    def current_decay(self) -> float:
        step = self.optimization_step - 1
        return 0.0 if step <= 0 else min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def step(self, parameters: dict[str, torch.nn.Parameter]) -> None:
        self.optimization_step += 1
        weight = 1.0 - self.current_decay()
        for name, shadow in self.shadow.items():
            shadow.lerp_(local_tensor(parameters[name]).to(shadow.device, torch.float32), weight)

    @torch.no_grad()
    def copy_to(self, parameters: dict[str, torch.nn.Parameter]) -> None:
        """Writes the averages into the live parameters on every rank (at the end of training)."""
        for name, shadow in self.shadow.items():
            local_tensor(parameters[name]).copy_(shadow)
        if not self.sharded and self.world_size > 1:
            for name, parameter in parameters.items():
                torch.distributed.broadcast(parameter.data, src=self.owner[name])

    def save(self, folder: Path) -> None:
        tensors = {name: shadow.contiguous() for name, shadow in self.shadow.items()}
        metadata = {"optimization_step": str(self.optimization_step), "world_size": str(self.world_size)}
        save_file(tensors, ema_file(folder, self.rank), metadata=metadata)

    def load(self, folder: Path) -> None:
        """This rank's averages from `folder`, checked before any is copied: the process count, every name, shape
        and dtype; a missing, damaged or foreign file stops the run naming it."""
        path = ema_file(folder, self.rank)
        if not path.is_file():
            raise damaged(path, "missing")
        try:
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
                layout = {
                    name: (handle.get_slice(name).get_shape(), handle.get_slice(name).get_dtype())
                    for name in handle.keys()
                }
            world_size, optimization_step = int(metadata["world_size"]), int(metadata["optimization_step"])
        except (SafetensorError, KeyError, ValueError) as error:
            raise damaged(path, f"not an EMA file ({type(error).__name__}: {one_line(error)})") from None
        if world_size != self.world_size:
            raise TrainingInputError(
                f"{folder}: written by {world_size} processes; resume it with as many (now {self.world_size})."
            )
        if layout.keys() != self.shadow.keys():
            differ = sorted(layout.keys() ^ self.shadow.keys())
            raise damaged(path, f"{len(differ)} names differ from this rank's EMA share (e.g. {differ[0]})")
        for name, (shape, dtype) in layout.items():
            if list(shape) != list(self.shadow[name].shape) or dtype != "F32":
                raise damaged(
                    path, f"{name} is {dtype} {list(shape)}, the EMA's is F32 {list(self.shadow[name].shape)}"
                )
        if optimization_step < 0:
            raise damaged(path, f"optimization_step {optimization_step} is negative")
        for name, tensor in load_file(path).items():
            self.shadow[name].copy_(tensor)
        self.optimization_step = optimization_step


# --------------------------------------------------------------------------------------------------------------------
# One training step


@dataclass
class ModelInputs:
    """One step's inputs to `Hallo3TrainingModel`, in its input dtype, and the velocity it should predict."""

    hidden_states: torch.Tensor  # the noisy latents and the image latents on channels [B, F, 2C, h, w]
    text: torch.Tensor  # caption embeddings [B, S, D]; zeros where dropped
    timesteps: torch.Tensor  # [B], fp32
    reference_latent: torch.Tensor  # the masked reference [B, 1, C, h, w]; zeros where dropped
    face_embeds: torch.Tensor  # [B, 512]
    audio_embeds: torch.Tensor | None  # stage 2: [B, F, window, layers, C]; zeros where dropped
    target: torch.Tensor  # v [B, F, C, h, w]


def dropped(rate: float, shape: tuple[int, ...], generator: torch.Generator, device) -> torch.Tensor:
    """Where a dropout of `rate` drops, one uniform draw per element of `shape`."""
    return torch.rand(shape, generator=generator, device=device) < rate


class Hallo3Loss:
    """The v-prediction MSE of a batch (architecture 6.1, 6.5): `model_inputs` builds the step's inputs from the batch,
    `loss` runs the model on them.

    Args:
        input_dtype: the dtype the prepared model's weights compute in (bf16 under DeepSpeed bf16, whose engine does
            not cast inputs); under autocast and FSDP mixed precision the model casts for itself.
        rank, world_size: this process's stratum of the timesteps.
    """

    def __init__(
        self,
        config: TrainConfig,
        models: LoadedModels,
        scheduler: Hallo3DPMScheduler,
        max_text_length: int,
        input_dtype: torch.dtype,
        rank: int,
        world_size: int,
    ):
        self.stage, self.dropout, self.motion_frames = config.stage, config.dropout, config.motion_frames
        self.vae, self.tokenizer, self.text_encoder = models.vae, models.tokenizer, models.text_encoder
        self.scheduler = scheduler
        self.max_text_length, self.dtype = max_text_length, input_dtype
        self.rank, self.world_size = rank, world_size

    def __call__(self, model: torch.nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        return self.loss(model, self.model_inputs(batch, generator))

    def loss(self, model: torch.nn.Module, inputs: ModelInputs) -> torch.Tensor:
        """The MSE between the model's v-prediction and the target (architecture 6.5)."""
        prediction = model(
            inputs.hidden_states,
            inputs.text,
            inputs.timesteps,
            inputs.reference_latent,
            inputs.face_embeds,
            inputs.audio_embeds,
        )
        return F.mse_loss(prediction.float(), inputs.target.float())

    @torch.no_grad()
    def model_inputs(self, batch: dict, generator: torch.Generator) -> ModelInputs:
        """The model's inputs and target for `batch`. Every random draw of the step is made here, from `generator`,
        in this order: the clip's latents; the motion frames' noise level, noise and mask; the image latent and its
        dropout; the reference latent and its dropout; the text dropout; the audio dropout (stage 2); the timesteps;
        the diffusion noise."""
        video = batch["video"]
        device, batch_size = video.device, video.shape[0]
        if video.shape[1] < self.motion_frames.count:
            raise RuntimeError(
                f"the batch has {video.shape[1]} frames, motion_frames.count={self.motion_frames.count}"
            )
        latents = self.clip_latents(batch, generator)  # [B, T, C, h, w]
        image_latents = self.image_latents(batch, latents.shape[1], generator)
        if dropped(self.dropout.image_latent, (), generator, device):
            image_latents = torch.zeros_like(image_latents)

        # reference bank: masked reference at t = 0 with the (possibly dropped) caption; dropped per batch
        reference_latent = encode_frames(self.vae, batch["masked_reference"][:, None], generator)
        if dropped(self.dropout.reference, (), generator, device):
            reference_latent = torch.zeros_like(reference_latent)
        text = self.text(batch, device) * (~dropped(self.dropout.text, (batch_size, 1, 1), generator, device)).float()
        audio = None
        if self.stage == 2:
            kept = ~dropped(self.dropout.audio, (batch_size, 1, 1, 1, 1), generator, device)
            audio = (batch["audio_emb"] * kept.float()).to(self.dtype)

        # v-prediction on the 1000-step zero-SNR table
        timesteps = sample_timesteps(
            self.scheduler.config.num_train_timesteps, batch_size, self.rank, self.world_size, generator, device
        )
        noise = torch.randn(latents.shape, generator=generator, device=device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        return ModelInputs(
            hidden_states=torch.cat([noisy, image_latents], dim=2).to(self.dtype),
            text=text.to(self.dtype),
            timesteps=timesteps.float(),
            reference_latent=reference_latent.to(self.dtype),
            face_embeds=batch["face_emb"].to(self.dtype),
            audio_embeds=audio,
            target=self.scheduler.get_velocity(latents, noise, timesteps),
        )

    def clip_latents(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """The clip's latents [B, T, C, h, w]: a sample of its stored posterior (`prepare_dataset --vae`), or of the
        VAE's posterior of its frames."""
        if "latent_parameters" in batch:
            return sample_stored_latents(batch["latent_parameters"], self.vae.config.scaling_factor, generator)
        return encode_frames(self.vae, batch["video"], generator)

    def image_latents(self, batch: dict, num_latent_frames: int, generator: torch.Generator) -> torch.Tensor:
        """[reference frame, the clip's first frames noised and masked] encoded, zero-padded to `num_latent_frames`
        (architecture 6.1)."""
        video = batch["video"]
        device, batch_size = video.device, video.shape[0]
        settings = self.motion_frames
        motion = video[:, : settings.count]
        sigma = torch.exp(
            settings.noise_log_mean
            + settings.noise_log_std * torch.randn(batch_size, 1, 1, 1, 1, generator=generator, device=device)
        )
        motion = motion + sigma * torch.randn(motion.shape, generator=generator, device=device)
        height, width = video.shape[-2:]
        motion = motion * motion_frame_mask(height, width, settings.mask_rate, generator, device)
        return encode_image_latents(self.vae, batch["reference"], motion, num_latent_frames, generator)

    def text(self, batch: dict, device) -> torch.Tensor:
        """The captions' T5 states [B, S, D] in fp32: precomputed, or encoded here."""
        if "text_emb" in batch:
            return batch["text_emb"].to(device)
        return encode_text(self.tokenizer, self.text_encoder, batch["caption"], self.max_text_length, device).float()


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    """Every random draw of step `step` on `rank`: a resumed run repeats exactly what an unbroken run does."""
    digest = hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def collate(items: list[dict]) -> dict:
    lists = ("caption", "bad_samples")
    batch: dict[str, Any] = {key: torch.stack([item[key] for item in items]) for key in items[0] if key not in lists}
    batch["caption"] = [item["caption"] for item in items]
    batch["bad_samples"] = [reason for item in items for reason in item["bad_samples"]]
    return batch


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints
#
# A checkpoint folder holds accelerate's files (model.safetensors and optimizer.bin; FSDP2's DCP folders; DeepSpeed's
# pytorch_model/), TRAINING_STATE (JSON, main process), and per rank its EMA share and its RNG states (safetensors).
# accelerate pickles what is registered with `register_for_checkpointing` and the RNG states, and reads registered
# objects back with weights_only=False; nothing here is registered and the RNG pickle is replaced. Before a resume
# loads anything, every file of the folder is checked (`check_checkpoint_files`).

TRAINING_STATE = "training_state.json"
PICKLE_SUFFIXES = (".pkl", ".pickle")
TORCH_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes zip archives; a raw pickle starts with PROTO (0x80)
# Plain value classes DeepSpeed pickles into its ZeRO-2/ZeRO-3 optimizer states (the loss scalers, the ZeRO stage,
# fragment addresses). DeepSpeed reads its files with torch.load(weights_only=False), so these, beyond torch's
# weights_only set, are all that a torch file of a checkpoint may name.
DEEPSPEED_STATE_GLOBALS = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)
# What a torch.distributed.checkpoint `.metadata` pickle holds (FSDP2's sharded model and optimizer); DCP reads it
# with plain pickle.load.
DCP_METADATA_GLOBALS = frozenset(
    {
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("torch.distributed.checkpoint.metadata", "StorageMeta"),
        ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
        ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "TensorProperties"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("collections", "OrderedDict"),
    }
)


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    folders = [p for p in (output_dir / "checkpoints").glob("checkpoint-*") if p.is_dir()]
    return sorted(folders, key=lambda p: int(p.name.split("-")[1]))


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints whose every rank finished writing, oldest first; a save interrupted by a kill has no marker."""
    return [folder for folder in checkpoint_dirs(output_dir) if (folder / COMPLETE_MARKER).is_file()]


def ema_file(folder: Path, rank: int) -> Path:
    return folder / f"ema-rank{rank}.safetensors"


def rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng-rank{rank}.safetensors"


def save_checkpoint(
    accelerator: Accelerator,
    ema: ShardedEMA,
    progress: Progress,
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR,
    output_dir: Path,
    keep_checkpoints: int,
) -> None:
    """accelerate's model and optimizer files, this rank's EMA share and RNG states, the training state (JSON), then
    (all ranks done) the completeness marker, then old ones go."""
    step = progress.step
    folder = output_dir / "checkpoints" / f"checkpoint-{step}"
    if accelerator.is_main_process and folder.exists():  # the remains of an interrupted save of this step
        shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(folder), safe_serialization=True)
    # accelerate pickles every process's RNG states unasked; they are saved below without pickle
    (folder / f"random_states_{accelerator.process_index}.pkl").unlink(missing_ok=True)
    ema.save(folder)
    save_rng_state(rng_file(folder, accelerator.process_index))
    if accelerator.is_main_process:
        state = {**progress.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}
        (folder / TRAINING_STATE).write_text(json.dumps(state, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / COMPLETE_MARKER).write_text(json.dumps({"step": step, "world_size": accelerator.num_processes}))
        complete = complete_checkpoints(output_dir)
        interrupted = [f for f in checkpoint_dirs(output_dir) if f not in complete]
        for old in complete[:-keep_checkpoints] + interrupted:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def resume(
    accelerator: Accelerator,
    model,
    optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR,
    ema: ShardedEMA,
    progress: Progress,
    output_dir: Path,
) -> None:
    """Loads the newest complete checkpoint, if any; incomplete ones (a kill during the save) are skipped. Every file
    of it is checked before anything loads: a pickle, or a damaged, foreign or missing file, stops the run with one
    line naming it. Every rank checks every file, so all ranks stop alike."""
    complete = complete_checkpoints(output_dir)
    for folder in checkpoint_dirs(output_dir):
        if folder not in complete and (not complete or int(folder.name.split("-")[1]) > progress.step):
            logger.warning(f"skipping {folder}: no {COMPLETE_MARKER} marker (its save was interrupted)")
    if not complete:
        return
    folder = complete[-1]
    written_by = read_json_object(folder / COMPLETE_MARKER).get("world_size")
    if written_by is not None and written_by != accelerator.num_processes:
        raise TrainingInputError(
            f"{folder}: written by {written_by} processes; resume it with as many (now "
            f"{accelerator.num_processes}), or give this run another output_dir."
        )
    check_checkpoint_files(folder)
    state = read_training_state(folder, progress, lr_scheduler)
    rng_state = read_rng_state(rng_file(folder, accelerator.process_index))
    ema.load(folder)
    check_model_weights(folder, accelerator, model)
    try:
        accelerator.load_state(str(folder))
    except Exception as error:  # the checks above name the file; what they cannot see, accelerate reports here
        raise TrainingInputError(
            f"{folder}: accelerate could not load it ({type(error).__name__}: {one_line(error)}); the checkpoint is "
            "damaged or was written by another configuration"
        ) from error
    check_optimizer_state(folder, accelerator, optimizer)
    progress.load_state_dict(state)
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    set_rng_state(rng_state)
    logger.info(f"resumed from {folder} at step {progress.step}")


def damaged(path: Path, reason: str) -> TrainingInputError:
    return TrainingInputError(
        f"{path}: {reason}; the checkpoint is damaged: move its folder away to resume from the one before, or give "
        "this run another output_dir."
    )


def refused(path: Path, what: str) -> TrainingInputError:
    return TrainingInputError(
        f"{path}: {what} in a checkpoint; resume never unpickles (a pickle can run any code), and this version's "
        "checkpoints hold none: this folder was written by an earlier version or changed since. Give this run "
        "another output_dir."
    )


def read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise damaged(path, "missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise damaged(path, f"not readable JSON ({one_line(error)})") from None
    if not isinstance(value, dict):
        raise damaged(path, f"expected a JSON object, found {type(value).__name__}")
    return value


# --- checks made before anything is loaded


def check_checkpoint_files(folder: Path) -> None:
    """Every file under `folder`: pickles are refused (`*.pkl`, or a raw pickle under any name); a torch file (zip)
    may name nothing beyond torch's weights_only set and DEEPSPEED_STATE_GLOBALS; DCP's `.metadata` nothing beyond
    DCP_METADATA_GLOBALS, and the values it points to nothing beyond torch's set; a safetensors header must cover its
    file."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.suffix in PICKLE_SUFFIXES:
            raise refused(path, "a pickle")
        if path.suffix == ".distcp":  # DCP data: read by the checks of its `.metadata`
            continue
        if path.name.endswith(".metadata"):
            check_dcp_folder(path)
            continue
        with path.open("rb") as file:
            head = file.read(len(TORCH_ZIP_MAGIC))
        if head == TORCH_ZIP_MAGIC:
            check_torch_file(path)
        elif head[:1] == b"\x80":
            raise refused(path, "a pickle")
        elif path.suffix == ".safetensors":
            try:
                with safe_open(str(path), "pt"):
                    pass
            except SafetensorError as error:
                raise damaged(path, f"not a readable safetensors file ({one_line(error)})") from None


def check_torch_file(path: Path, part: io.BytesIO | None = None, what: str = "a torch file") -> None:
    """The globals the torch.save pickle `path` (or `part` of it) names, listed without unpickling it: nothing beyond
    torch's weights_only set and DEEPSPEED_STATE_GLOBALS."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path if part is None else part)
    except Exception as error:  # torch raises RuntimeError, ValueError or UnpicklingError for unreadable files
        raise damaged(path, f"not a readable torch file ({type(error).__name__}: {one_line(error)})") from None
    unsafe = sorted(set(names) - DEEPSPEED_STATE_GLOBALS)
    if unsafe:
        raise refused(path, f"{what} whose pickle calls {', '.join(unsafe)}")


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle names a global outside the allowed ones (`name`)."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class DcpMetadataUnpickler(pickle.Unpickler):
    """Reads a DCP `.metadata` pickle constructing nothing but DCP_METADATA_GLOBALS and torch's dtypes: a file that
    reads this way holds nothing that DCP's own pickle.load could run."""

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in DCP_METADATA_GLOBALS or dtype:
            return super().find_class(module, name)
        raise RefusedGlobal(f"{module}.{name}")


def check_dcp_folder(path: Path) -> None:
    """A DCP `.metadata` (`path`) and the non-tensor values it points to, which DCP's planner reads with
    torch.load(weights_only=False); its tensors it reads with weights_only=True."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    try:
        with path.open("rb") as file:
            metadata = DcpMetadataUnpickler(file).load()
        values = [
            (fqn, metadata.storage_data[MetadataIndex(fqn)])
            for fqn, item in metadata.state_dict_metadata.items()
            if isinstance(item, BytesStorageMetadata)
        ]
    except RefusedGlobal as error:
        raise refused(path, f"a DCP metadata pickle that calls {error.name}") from None
    except Exception as error:  # a truncated or foreign pickle raises anything
        raise damaged(path, f"not a readable DCP metadata file ({type(error).__name__}: {one_line(error)})") from None
    for fqn, info in values:
        data = (path.parent / info.relative_path).resolve()
        if data.parent != path.parent.resolve() or not data.is_file():
            raise damaged(path, f"{fqn} points to {info.relative_path}, which is not a file of this folder")
        if info.transform_descriptors:
            raise damaged(path, f"{fqn} is stored through {info.transform_descriptors}, which resume does not read")
        with data.open("rb") as file:
            file.seek(info.offset)
            blob = file.read(info.length)
        if len(blob) != info.length:
            raise damaged(data, f"shorter than {fqn} needs (truncated)")
        check_torch_file(data, io.BytesIO(blob), f"a value ({fqn})")


def read_training_state(folder: Path, progress: Progress, lr_scheduler: torch.optim.lr_scheduler.LambdaLR) -> dict:
    """TRAINING_STATE checked against this run: the step of the folder, counts, the data order (the same seed and
    batches per epoch, or the data would not continue where it stopped), the schedule's state in its own shape."""
    path = folder / TRAINING_STATE
    state = read_json_object(path)

    def number(mapping: dict, key: str, low: int, where: str = "") -> int:
        value = mapping.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise damaged(path, f"{where}{key} is {value!r}, expected an integer of at least {low}")
        return value

    step = number(state, "step", 1)
    number(state, "bad_samples", 0)
    if step != int(folder.name.split("-")[1]):
        raise damaged(path, f"step {step} in the folder of step {folder.name.split('-')[1]}")
    data = state.get("data")
    if not isinstance(data, dict):
        raise damaged(path, "no data section")
    seed = number(data, "seed", -(2**63), "data.")
    batches_per_epoch = number(data, "batches_per_epoch", 1, "data.")
    position = (number(data, "epoch", 0, "data."), number(data, "batches_done_in_epoch", 0, "data."))
    if position != divmod(step, batches_per_epoch):
        raise damaged(path, f"data position {position} is not step {step} at {batches_per_epoch} batches per epoch")
    if (seed, batches_per_epoch) != (progress.seed, progress.batches_per_epoch):
        raise TrainingInputError(
            f"{path}: written with seed {seed} and {batches_per_epoch} batches per epoch, this run has seed "
            f"{progress.seed} and {progress.batches_per_epoch} (the data, batch_size or seed changed); resume needs "
            "the same ones to continue the data where it stopped, or give this run another output_dir."
        )
    schedule = state.get("lr_scheduler")
    if not isinstance(schedule, dict) or not same_json_shape(schedule, lr_scheduler.state_dict()):
        raise damaged(path, "lr_scheduler is not the state of this run's schedule")
    return state


def same_json_shape(saved: Any, current: Any) -> bool:
    """Whether JSON `saved` has the keys, lengths and kinds of `current` (numbers of either kind match)."""
    if isinstance(current, bool) or current is None or isinstance(current, str):
        return type(saved) is type(current)
    if isinstance(current, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool)
    if isinstance(current, (list, tuple)):
        return (
            isinstance(saved, list)
            and len(saved) == len(current)
            and all(same_json_shape(s, c) for s, c in zip(saved, current))
        )
    if isinstance(current, dict):
        return (
            isinstance(saved, dict)
            and saved.keys() == current.keys()
            and all(same_json_shape(saved[k], current[k]) for k in current)
        )
    return False


def check_model_weights(folder: Path, accelerator: Accelerator, model) -> None:
    """accelerate's model.safetensors against the model: every name, every shape. (FSDP2 and DeepSpeed keep their
    own layouts, which their readers check.)"""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return
    path = folder / "model.safetensors"
    expected = {name: list(tensor.shape) for name, tensor in accelerator.unwrap_model(model).state_dict().items()}
    if not path.is_file():
        raise damaged(path, "missing")
    with safe_open(str(path), "pt") as handle:  # its header was read by check_checkpoint_files
        shapes = {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
    if shapes.keys() != expected.keys():
        differ = sorted(shapes.keys() ^ expected.keys())
        raise damaged(path, f"{len(differ)} tensor names differ from the model's (e.g. {differ[0]})")
    for name, shape in shapes.items():
        if shape != expected[name]:
            raise damaged(path, f"{name} has shape {shape}, the model's is {expected[name]}")


def check_optimizer_state(folder: Path, accelerator: Accelerator, optimizer) -> None:
    """Each loaded optimizer tensor against its parameter's shape (torch's load_state_dict checks only counts).
    DeepSpeed keeps flat partitions of its own."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return
    source = folder / ("optimizer_0" if accelerator.distributed_type == DistributedType.FSDP else "optimizer.bin")
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for key, value in optimizer.state.get(parameter, {}).items():
                if torch.is_tensor(value) and value.dim() and value.shape != parameter.shape:
                    raise damaged(
                        source,
                        f"{key} has shape {list(value.shape)} for a parameter of shape {list(parameter.shape)}",
                    )


# --- RNG states (what accelerate's random_states_<rank>.pkl held), as safetensors


def save_rng_state(path: Path) -> None:
    """This process's python, numpy and torch RNG states (CPU, and the current accelerator device)."""
    numpy_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    _, numpy_keys, numpy_position, has_gauss, cached_gaussian = numpy_state
    python_version, python_words, gauss_next = random.getstate()
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(numpy_keys.astype(np.int64)),
        "python": torch.tensor(python_words, dtype=torch.int64),
    }
    metadata = {
        "numpy": json.dumps([int(numpy_position), int(has_gauss), float(cached_gaussian)]),
        "python": json.dumps([python_version, gauss_next]),
        "device": "",
    }
    device = torch.accelerator.current_accelerator()
    if device is not None:
        tensors["device"] = torch.get_device_module(device.type).get_rng_state()
        metadata["device"] = device.type
    save_file(tensors, path, metadata=metadata)


@dataclass
class RngState:
    cpu: torch.Tensor  # torch's CPU generator
    numpy: tuple
    python: tuple
    device_type: str  # the accelerator whose current device's generator `device` is ("" for none)
    device: torch.Tensor | None


def read_rng_state(path: Path) -> RngState:
    """`save_rng_state`'s file, every part checked."""
    if not path.is_file():
        raise damaged(path, "missing")
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        numpy_position, has_gauss, cached_gaussian = json.loads(metadata["numpy"])
        python_version, gauss_next = json.loads(metadata["python"])
        device_type = metadata["device"]
    except (SafetensorError, KeyError, ValueError, TypeError) as error:
        raise damaged(path, f"not an RNG state file ({type(error).__name__}: {one_line(error)})") from None
    words = {"numpy": 624, "python": 625}  # MT19937's state: 624 words (+ the position, for python's)
    torch_state = tensors.get("torch")
    if torch_state is None or torch_state.dtype != torch.uint8 or torch_state.shape != torch.get_rng_state().shape:
        raise damaged(path, "the torch state is missing or not this torch's generator state")
    for name, count in words.items():
        value = tensors.get(name)
        if value is None or value.dtype != torch.int64 or value.shape != (count,):
            raise damaged(path, f"the {name} state is missing or not {count} words")
        if value.min() < 0 or value.max() >= 2**32:
            raise damaged(path, f"the {name} state holds values beyond 32 bits")
    if not (
        isinstance(numpy_position, int)
        and 0 <= numpy_position <= 624
        and isinstance(has_gauss, int)
        and isinstance(cached_gaussian, float)
        and isinstance(python_version, int)
        and (gauss_next is None or isinstance(gauss_next, float))
    ):
        raise damaged(path, "the numpy or python state's scalars are not valid")
    if tensors["python"][-1] > 624:
        raise damaged(path, "the python state's position is beyond its 624 words")
    numpy_state = ("MT19937", tensors["numpy"].numpy().astype(np.uint32), numpy_position, has_gauss, cached_gaussian)
    python_state = (python_version, tuple(tensors["python"].tolist()), gauss_next)
    return RngState(torch_state, numpy_state, python_state, device_type, tensors.get("device"))


def set_rng_state(state: RngState) -> None:
    torch.set_rng_state(state.cpu)
    np.random.set_state(state.numpy)
    random.setstate(state.python)
    device = torch.accelerator.current_accelerator()
    if state.device is not None and device is not None and device.type == state.device_type:
        torch.get_device_module(device.type).set_rng_state(state.device)


# --------------------------------------------------------------------------------------------------------------------
# Launch checks, setup


def check_launch(config: TrainConfig) -> None:
    """What the accelerate launch asks for must be possible and agree with the training config."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        try:
            import deepspeed  # noqa: F401
        except ImportError as error:
            raise TrainingInputError(
                "the accelerate config uses DeepSpeed, which is not installed: `pip install deepspeed`, or launch "
                "with train/configs/accelerate/fsdp.yaml or single_gpu.yaml."
            ) from error
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched is not None and launched != config.mixed_precision:
        raise TrainingInputError(
            f"mixed_precision: the accelerate launch says {launched!r}, the training config {config.mixed_precision!r}"
            f"; make them agree (e.g. add the override mixed_precision={launched})."
        )


def check_fit(accelerator: Accelerator, config: TrainConfig, dataset: Hallo3ClipDataset) -> None:
    """Checks that need the started accelerator: data for every rank, DeepSpeed's clipping equal to the config's."""
    needed = accelerator.num_processes * config.batch_size
    if len(dataset) < needed:
        raise TrainingInputError(
            f"data={config.data}: {len(dataset)} prepared clips for {accelerator.num_processes} processes x "
            f"batch_size {config.batch_size}; every process needs a whole batch, so at least {needed} clips."
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise TrainingInputError(
            f"{launched} processes were launched but accelerate runs them as {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}); DeepSpeed without GPUs runs one process: --num_processes 1."
        )
    for backend in ("FSDP", "DEEPSPEED"):
        asked = os.environ.get(f"ACCELERATE_USE_{backend}", "false").lower() == "true"
        if asked and accelerator.distributed_type != DistributedType[backend]:
            raise TrainingInputError(
                f"the accelerate config asks for {backend}, but accelerate runs these processes as "
                f"{accelerator.distributed_type.value} (it shards only on GPUs; ACCELERATE_USE_CPU=1 or no GPU makes it "
                f"fall back silently); use train/configs/accelerate/ddp.yaml on CPUs."
            )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        clipping = accelerator.state.deepspeed_plugin.deepspeed_config.get("gradient_clipping")
        if clipping not in (None, "auto") and float(clipping) != config.optim.max_grad_norm:
            raise TrainingInputError(
                f"gradient_clipping {clipping} in the DeepSpeed config differs from optim.max_grad_norm="
                f"{config.optim.max_grad_norm}; DeepSpeed clips by its own value, so make them equal."
            )


def weight_dtype_of(config: TrainConfig) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision, torch.float32)


def build_accelerator(config: TrainConfig, trackers: list[str]) -> Accelerator:
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # the DataLoader's batch is per process; DeepSpeed wants it stated when it cannot read it off the loader
        deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
        deepspeed_config["train_micro_batch_size_per_gpu"] = config.batch_size
        deepspeed_config["train_batch_size"] = (
            config.batch_size * config.gradient_accumulation_steps * accelerator.num_processes
        )
    return accelerator


def build_dataset(config: TrainConfig, transformer_config) -> Hallo3ClipDataset:
    return Hallo3ClipDataset(
        config.data,
        width=transformer_config.sample_width * 8,
        height=transformer_config.sample_height * 8,
        num_frames=transformer_config.sample_frames,
        seed=config.seed,
        motion_frames=config.motion_frames.count,
    )


def build_training_model(config: TrainConfig, models: LoadedModels) -> tuple[Hallo3TrainingModel, list[str]]:
    model = Hallo3TrainingModel(models.transformer, models.reference_net)
    trained = set_trainable(model, config.trainable_patterns()) if not config.lora.rank else add_lora(model, config)
    set_master_precision(model)
    if config.gradient_checkpointing:
        models.transformer.enable_gradient_checkpointing()  # the reference net is not checkpointed (official)
    logger.info(f"stage {config.stage}: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trained")
    return model, trained


def shard_for_fsdp2(model: Hallo3TrainingModel, accelerator: Accelerator) -> None:
    """FSDP2 units: the denoiser, the reference net, and the root. Both networks read their blocks' weights outside the
    blocks' forward (the reference net each block's `norm1`, the denoiser each block's reference keys/values, before
    the block loop), which a per-block unit would not have gathered, so accelerate's class-based policy cannot be
    used. accelerate takes the sharded model as it is."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = accelerator.state.fsdp_plugin
    options = {
        "reshard_after_forward": plugin.reshard_after_forward,
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
        "offload_policy": plugin.cpu_offload,
    }
    fully_shard(model.transformer, **options)
    fully_shard(model.reference_net, **options)
    fully_shard(model, **options)


def trained_parameters(model: torch.nn.Module, accelerator: Accelerator) -> dict[str, torch.nn.Parameter]:
    """The parameters the optimizer updates, read from the prepared model: FSDP2 replaces every parameter by its
    sharded version, so a list taken before `prepare` would hold parameters nothing updates."""
    return {name: p for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}


def weights_fingerprint(parameters: dict[str, torch.nn.Parameter]) -> str:
    """sha256 over the trained weights (sorted names, fp32 bytes), one tensor at a time: every rank of a run must
    report the same one."""
    digest = hashlib.sha256()
    for name in sorted(parameters):
        with full_tensor(parameters[name]) as tensor:
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def export(accelerator: Accelerator, model: torch.nn.Module, export_dir: Path) -> None:
    """The prepared model's weights as the diffusers folders the pipeline loads (gathered onto the main process)."""
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    from accelerate import init_empty_weights

    bare = accelerator.unwrap_model(model)
    for network in ("transformer", "reference_net"):
        prefix = f"{network}."
        part = {name[len(prefix) :]: tensor for name, tensor in state.items() if name.startswith(prefix)}
        with init_empty_weights():
            fresh = type(getattr(bare, network)).from_config(getattr(bare, network).config)
        fresh.load_state_dict(part, strict=True, assign=True)
        fresh.save_pretrained(export_dir / network)


def write_metrics(output_dir: Path, record: dict) -> None:
    """One JSON line per logged step in OUTPUT/logs/metrics.jsonl (main process), readable without tensorboard."""
    path = output_dir / "logs" / "metrics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as metrics:
        metrics.write(json.dumps(record) + "\n")


def validation_transformer(transformer: Hallo3Transformer3DModel) -> Hallo3Transformer3DModel:
    """The pipeline always feeds audio. A stage-1 (identity-only) denoiser gets audio modules with every weight 0,
    so the residual they add is exactly 0; every other tensor is shared with the trained model, not copied."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device

    if transformer.config.add_audio_module:
        return transformer
    with init_empty_weights():
        with_audio = Hallo3Transformer3DModel.from_config(transformer.config, add_audio_module=True)
    with_audio.load_state_dict(transformer.state_dict(), strict=False, assign=True)
    device, dtype = transformer.device, transformer.dtype
    for name, parameter in list(with_audio.named_parameters()):
        if parameter.is_meta:
            set_module_tensor_to_device(with_audio, name, device, value=torch.zeros(parameter.shape, dtype=dtype))
    return with_audio.eval()


def validate(accelerator: Accelerator, config: TrainConfig, models: LoadedModels, model, step: int) -> None:
    """A video from the current weights through Hallo3Pipeline (main process; unsharded weights only)."""
    from hallo3.inference import GenerationSettings, PortraitAnimator
    from hallo3.loading import LoadedModel, build_tiny_random_pipeline
    from hallo3.pipeline_hallo3 import Hallo3Pipeline

    tokenizer, text_encoder = models.tokenizer, models.text_encoder
    if config.model.components == "tiny-random":
        parts = build_tiny_random_pipeline(seed=config.seed)
        feature_extractor, wav2vec = parts.audio_feature_extractor, parts.audio_encoder
        if text_encoder is None:
            tokenizer, text_encoder = parts.tokenizer, parts.text_encoder.to(models.vae.dtype)
    else:
        from transformers import AutoTokenizer, T5EncoderModel, Wav2Vec2FeatureExtractor, Wav2Vec2Model

        feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(config.model.wav2vec)
        wav2vec = Wav2Vec2Model.from_pretrained(config.model.wav2vec)
        if text_encoder is None:  # loaded for the validation only, and let go after it
            tokenizer = AutoTokenizer.from_pretrained(config.model.components, subfolder="tokenizer")
            text_encoder = T5EncoderModel.from_pretrained(
                config.model.components, subfolder="text_encoder", torch_dtype=models.vae.dtype
            )
    bare = accelerator.unwrap_model(model)
    pipeline = Hallo3Pipeline(
        tokenizer,
        text_encoder,
        models.vae,
        validation_transformer(bare.transformer),
        bare.reference_net,
        Hallo3DPMScheduler(),
        feature_extractor,
        wav2vec,
    )
    pipeline.set_progress_bar_config(disable=True)
    animator = PortraitAnimator(LoadedModel(pipeline, f"training step {step}"), accelerator.device)
    output = Path(config.output_dir) / "validation" / f"step-{step:06d}.mp4"
    output.parent.mkdir(parents=True, exist_ok=True)
    settings = GenerationSettings(
        prompt=config.validation_prompt,
        num_inference_steps=config.validation_steps,
        seed=config.seed,
        max_audio_seconds=None,
    )
    was_training = model.training
    model.eval()
    try:
        with accelerator.autocast():  # bf16 runs keep trained weights in fp32 next to bf16 frozen ones
            animator.generate(config.validation_image, config.validation_audio, output, settings)
    finally:
        model.train(was_training)
    logger.info(f"validation video: {output}")


# --------------------------------------------------------------------------------------------------------------------


def train(config: TrainConfig) -> dict:
    """One run to max_steps (or stop_at_step), resuming from the newest complete checkpoint. Returns the loss per
    step, whether T5 was loaded, the trained weights' fingerprint and (main process) the export folder."""
    check_launch(config)
    trackers = [t for t in config.report_to if t != "wandb" or importlib.util.find_spec("wandb")]
    accelerator = build_accelerator(config, trackers)
    set_seed(config.seed)

    # 1. Models (T5 only when the data has no caption embeddings) and the data
    load_text_encoder = not has_text_embeddings(config.data)
    models = load_models(config, weight_dtype_of(config), load_text_encoder)
    logger.info(f"T5 {'loaded' if load_text_encoder else 'not loaded: the captions are precomputed'}")
    for frozen in (models.vae, models.text_encoder):
        if frozen is not None:
            frozen.requires_grad_(False).eval().to(accelerator.device)
    dataset = build_dataset(config, models.transformer.config)
    check_fit(accelerator, config, dataset)

    # 2. One module, its trained parameters in fp32, the optimizer and the schedule
    model, trained_names = build_training_model(config, models)
    if accelerator.is_fsdp2:
        shard_for_fsdp2(model, accelerator)
    optimizer = build_optimizer(model, config.optim)
    lr_scheduler = build_lr_scheduler(optimizer, config)
    model, optimizer, dataloader = accelerator.prepare(model, optimizer, build_dataloader(dataset, config))
    parameters = trained_parameters(model, accelerator)
    assert sorted(parameters) == sorted(trained_names), "prepare changed which parameters train"
    ema = build_ema(accelerator, parameters, config.optim)
    progress = Progress(config.seed, len(dataloader))

    # 3. Resume, then the loop
    resume(accelerator, model, optimizer, lr_scheduler, ema, progress, Path(config.output_dir))
    if trackers:
        accelerator.init_trackers("hallo3", config={k: str(v) for k, v in config_to_dict(config).items()})
    loss_fn = build_loss(accelerator, config, models, model)
    losses = run_steps(accelerator, config, model, optimizer, lr_scheduler, dataloader, loss_fn, ema, progress, models)

    # 4. Fingerprint of the trained weights, then the EMA weights exported as diffusers folders
    result: dict[str, Any] = {"losses": losses, "text_encoder_loaded": load_text_encoder}
    result.update(finish(accelerator, config, model, parameters, ema))
    return result


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        parameter_groups(model, optim.weight_decay),
        lr=optim.learning_rate,
        betas=(optim.betas[0], optim.betas[1]),
        eps=optim.eps,
    )


def build_dataloader(dataset: Hallo3ClipDataset, config: TrainConfig) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=EpochSampler(len(dataset), config.seed),
        collate_fn=collate,
        num_workers=config.num_workers,
        drop_last=True,
    )


def build_ema(accelerator: Accelerator, parameters: dict[str, torch.nn.Parameter], optim: OptimConfig) -> ShardedEMA:
    ema = ShardedEMA(
        parameters,
        optim.ema_decay,
        accelerator.process_index,
        accelerator.num_processes,
        on_cpu=optim.ema_on_cpu,
    )
    logger.info(
        f"{accelerator.distributed_type.value}, {accelerator.num_processes} processes; EMA "
        f"{'sharded with the parameters' if ema.sharded else 'split by parameter'}: "
        f"{sum(t.numel() for t in ema.shadow.values()):,} fp32 values on this rank"
    )
    return ema


def build_loss(accelerator: Accelerator, config: TrainConfig, models: LoadedModels, model) -> Hallo3Loss:
    """The loss for the prepared `model`: its text length, the dtype its weights compute in, this rank's stratum."""
    bare = accelerator.unwrap_model(model)
    return Hallo3Loss(
        config,
        models,
        Hallo3DPMScheduler(),
        bare.transformer.config.max_text_seq_length,
        bare.transformer.patch_embed.proj.weight.dtype,
        accelerator.process_index,
        accelerator.num_processes,
    )


def finish(
    accelerator: Accelerator, config: TrainConfig, model, parameters: dict[str, torch.nn.Parameter], ema: ShardedEMA
) -> dict[str, str]:
    """Prints the trained weights' fingerprint (every rank), writes the EMA weights into the model and exports them
    (the adapters with LoRA); returns the fingerprint and (main process) the export folder."""
    accelerator.wait_for_everyone()
    digest = weights_fingerprint(parameters)
    result = {"weights_sha256": digest}
    print(json.dumps({"rank": accelerator.process_index, "weights_sha256": digest}), flush=True)
    ema.copy_to(parameters)
    export_dir = Path(config.output_dir) / "final"
    if config.lora.rank:
        export_lora(accelerator, model, config, export_dir)
    else:
        export(accelerator, model, export_dir)
    if accelerator.is_main_process:
        result["export"] = str(export_dir)
    accelerator.end_training()
    return result


def run_steps(
    accelerator: Accelerator,
    config: TrainConfig,
    model,
    optimizer,
    lr_scheduler,
    dataloader,
    loss_fn: Hallo3Loss,
    ema: ShardedEMA,
    progress: Progress,
    models: LoadedModels,
) -> dict[int, float]:
    """Optimizer steps until max_steps (or stop_at_step): loss, clip, step, schedule, EMA, log, checkpoint."""
    output_dir = Path(config.output_dir)
    parameters = trained_parameters(model, accelerator)
    sharded = ema.sharded
    if config.validate_every and sharded:
        logger.warning("validation videos are skipped: they need unsharded weights (use the final export)")
    losses: dict[int, float] = {}
    steps_per_epoch = len(dataloader)
    last_step = min(config.max_steps, config.stop_at_step or config.max_steps)
    model.train()
    while progress.step < last_step:
        epoch, done_in_epoch = divmod(progress.step, steps_per_epoch)
        batches = accelerator.skip_first_batches(dataloader, done_in_epoch) if done_in_epoch else dataloader
        # accelerate's loader passes its own epoch counter to the sampler and the dataset when iterated; it starts
        # at 0 in a resumed run, so set the real epoch on the loader itself
        batches.set_epoch(epoch)
        for batch in batches:
            for reason in batch["bad_samples"]:
                logger.warning(f"skipped a bad sample: {reason}", main_process_only=False)
            generator = step_generator(config.seed, progress.step, accelerator.process_index, accelerator.device)
            loss, grad_norm = optimizer_step(accelerator, config, model, optimizer, loss_fn, batch, generator)
            if not accelerator.sync_gradients:
                continue
            lr = lr_scheduler.get_last_lr()[0]  # the rate this step was taken with
            lr_scheduler.step()
            ema.step(parameters)
            progress.step += 1
            bad_samples = len(batch["bad_samples"])
            losses[progress.step] = report_step(accelerator, config, progress, loss, bad_samples, lr, grad_norm)
            if progress.step % config.checkpoint_every == 0 or progress.step == last_step:
                save_checkpoint(accelerator, ema, progress, lr_scheduler, output_dir, config.keep_checkpoints)
            if (
                config.validate_every
                and not sharded
                and progress.step % config.validate_every == 0
                and accelerator.is_main_process
            ):
                validate(accelerator, config, models, model, progress.step)
            if progress.step >= last_step:
                break
    return losses


def optimizer_step(
    accelerator: Accelerator,
    config: TrainConfig,
    model,
    optimizer,
    loss_fn: Hallo3Loss,
    batch: dict,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The batch's loss and gradients, accumulated; once they are complete, the clipping and the optimizer's step.
    Returns the loss and the gradient norm (None while accumulating)."""
    grad_norm = None
    with accelerator.accumulate(model):  # the forward too: DDP skips the gradient sync while accumulating
        loss = loss_fn(model, batch, generator)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            # all of the prepared model's parameters: frozen ones have no gradient, and accelerate's FSDP2 path
            # recognises the model's own list
            grad_norm = accelerator.clip_grad_norm_(list(model.parameters()), config.optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    return loss, grad_norm


def report_step(
    accelerator: Accelerator,
    config: TrainConfig,
    progress: Progress,
    loss: torch.Tensor,
    bad_samples: int,
    lr: float,
    grad_norm: torch.Tensor | None,
) -> float:
    """The step's loss averaged over the ranks, and the bad samples of every rank counted; stops the run on a
    non-finite loss or too many bad samples, and logs the step every `log_every` steps (and the first)."""
    gathered = accelerator.gather(torch.tensor([[loss.item(), bad_samples]], device=loss.device))
    step_loss = gathered[:, 0].mean().item()
    progress.bad_samples += int(gathered[:, 1].sum().item())
    if not math.isfinite(step_loss):
        raise RuntimeError(f"loss is {step_loss} at step {progress.step}; stopping.")
    if progress.bad_samples > config.max_bad_samples:
        raise TrainingInputError(
            f"data={config.data}: {progress.bad_samples} bad samples skipped, more than max_bad_samples="
            f"{config.max_bad_samples}; the warnings above give each one's reason."
        )
    if progress.step % config.log_every == 0 or progress.step == 1:
        record = {
            "step": progress.step,
            "loss": step_loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "bad_samples": progress.bad_samples,
        }
        if torch.cuda.is_available():
            record["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        accelerator.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=progress.step)
        if accelerator.is_main_process:
            write_metrics(Path(config.output_dir), record)
        logger.info(f"step {progress.step}: loss {step_loss:.5f} lr {lr:.3g}")
    return step_loss


def check_data_folder(data: str) -> None:
    """The prepared folder exists and lists clips in readable metadata*.jsonl (before any model loads)."""
    root = Path(data)
    if not root.is_dir():
        raise TrainingInputError(
            f"data={data}: no such folder; make one with python -m train.prepare_dataset (README, Training)."
        )
    if not any(root.glob("metadata*.jsonl")):
        raise TrainingInputError(f"data={data}: no metadata*.jsonl in it; is it train.prepare_dataset's --output?")
    try:
        clips = read_metadata(root)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TrainingInputError(f"data={data}: a metadata*.jsonl line is not JSON ({one_line(error)})") from None
    if not clips:
        raise TrainingInputError(f"data={data}: its metadata*.jsonl list no clips (see its report*.jsonl)")


def main(argv: list[str] | None = None) -> int:
    """The command line: one line on stderr and status 2 for bad input (the config, an override, the data, a
    checkpoint); anything else is a failure inside the run, whose traceback is the report."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="key.sub=value (YAML values), e.g. max_steps=10")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = load_config(args.config, args.overrides)
        check_data_folder(config.data)
        train(config)
    except (ConfigError, TrainingInputError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
