"""Both Hallo3 training stages in one accelerate loop (reference 6.1, 6.5, 9).

    accelerate launch -m train.train --config train/configs/stage1.yaml [key=value ...]

v-prediction on the zero-terminal-SNR schedule; conditioning dropouts; the clip's first frames as masked, noised
motion frames; the reference net at t=0; EMA; AdamW; gradient clipping; checkpoints through `save_state` with exact
resume (every random draw of a step is seeded by the step); periodic validation videos; diffusers folders at the end.
Scale (DeepSpeed ZeRO-2/3, FSDP, multi-node) comes from the accelerate config, see train/configs/accelerate/.
"""

import argparse
import hashlib
import importlib.util
import json
import logging
import math
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, Sampler

from hallo3.conditioning import motion_frame_mask
from hallo3.scheduling_hallo3 import Hallo3DPMScheduler
from hallo3.transformer_hallo3 import Hallo3ReferenceNet, Hallo3Transformer3DModel

from .config import TrainConfig, config_to_dict, load_config
from .dataset import Hallo3ClipDataset


logger = get_logger("train")


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
    """The step counter, saved and restored with the accelerate state."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


# --------------------------------------------------------------------------------------------------------------------
# Models


def init_new_modules(model: torch.nn.Module, names: set[str], num_layers: int) -> None:
    """SAT's initialisation of modules a checkpoint did not have: N(0, 0.02) projections, N(0, 0.02 / sqrt(2L)) for
    the output projections, zero biases, LayerNorm 1/0 (reference 9). The audio/face projections keep PyTorch's."""
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


def load_models(config: TrainConfig):
    """(vae, tokenizer, text_encoder, transformer, reference_net) for the stage."""
    add_audio = config.stage == 2
    if config.model.components == "tiny-random":
        from hallo3.loading import build_tiny_random_pipeline

        tiny = build_tiny_random_pipeline(seed=config.seed)
        vae, tokenizer, text_encoder = tiny.vae, tiny.tokenizer, tiny.text_encoder
        transformer_source, reference_source = config.model.transformer, config.model.reference_net
        if transformer_source is None:  # a fresh tiny model, as if loaded from a stock checkpoint
            transformer = Hallo3Transformer3DModel.from_config(
                {**tiny.transformer.config, "add_audio_module": add_audio}
            )
            transformer.load_state_dict(tiny.transformer.state_dict(), strict=False)
            reference_net = tiny.reference_net
            return vae, tokenizer, text_encoder, transformer, reference_net
    else:
        from diffusers import AutoencoderKLCogVideoX
        from transformers import AutoTokenizer, T5EncoderModel

        vae = AutoencoderKLCogVideoX.from_pretrained(config.model.components, subfolder="vae")
        tokenizer = AutoTokenizer.from_pretrained(config.model.components, subfolder="tokenizer")
        text_encoder = T5EncoderModel.from_pretrained(config.model.components, subfolder="text_encoder")
        transformer_source, reference_source = config.model.transformer, config.model.reference_net
        if transformer_source is None or reference_source is None:
            raise ValueError("model.transformer and model.reference_net are needed (see train/configs/*.yaml).")

    repo, subfolder = pretrained_source(transformer_source)
    transformer, info = Hallo3Transformer3DModel.from_pretrained(
        repo, subfolder=subfolder, add_audio_module=add_audio, low_cpu_mem_usage=False, output_loading_info=True
    )
    init_new_modules(transformer, set(info["missing_keys"]), transformer.config.num_layers)
    if info["missing_keys"]:
        logger.info(f"initialised {len(info['missing_keys'])} new tensors (SAT init)")
    repo, subfolder = pretrained_source(reference_source)
    reference_net = Hallo3ReferenceNet.from_pretrained(repo, subfolder=subfolder)
    return vae, tokenizer, text_encoder, transformer, reference_net


def set_trainable(model: torch.nn.Module, patterns: list[str]) -> list[torch.nn.Parameter]:
    compiled = [re.compile(p) for p in patterns]
    trainable = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(p.search(name) for p in compiled))
        if parameter.requires_grad:
            trainable.append(parameter)
    return trainable


def parameter_groups(models: list[torch.nn.Module], weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and norm weights (SAT's rule)."""
    decay, no_decay = [], []
    for model in models:
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                (no_decay if name.endswith("bias") or "norm" in name else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------------------------------
# One training step


class Hallo3Loss:
    """Builds the conditioning of a batch and returns the v-prediction MSE (reference 6.1, 6.5)."""

    def __init__(
        self,
        config: TrainConfig,
        vae,
        tokenizer,
        text_encoder,
        scheduler: Hallo3DPMScheduler,
        transformer: Hallo3Transformer3DModel,
    ):
        self.config = config
        self.conditioning = config.conditioning
        self.vae, self.tokenizer, self.text_encoder, self.scheduler = vae, tokenizer, text_encoder, scheduler
        # read from the bare model: a DDP/DeepSpeed wrapper has no config or dtype
        self.max_text_length = transformer.config.max_text_seq_length
        self.dtype = transformer.dtype

    @torch.no_grad()
    def encode(self, frames: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """[B, F, 3, H, W] in [-1, 1] -> sampled latents x 0.7 as [B, F', C, h, w]."""
        posterior = self.vae.encode(frames.permute(0, 2, 1, 3, 4).to(self.vae.dtype)).latent_dist
        return (posterior.sample(generator=generator) * self.vae.config.scaling_factor).permute(0, 2, 1, 3, 4).float()

    @torch.no_grad()
    def text(self, batch: dict, max_length: int, device) -> torch.Tensor:
        if "text_emb" in batch:
            return batch["text_emb"].to(device)
        ids = self.tokenizer(
            batch["caption"], padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.text_encoder(ids.to(device))[0].float()

    def __call__(self, transformer, reference_net, batch: dict, generator: torch.Generator) -> torch.Tensor:
        c = self.conditioning
        video = batch["video"]
        device, batch_size = video.device, video.shape[0]

        def chance(p: float, shape=()) -> torch.Tensor:
            return torch.rand(shape, generator=generator, device=device) < p

        if "latent_parameters" in batch:  # precomputed posterior: sample it here, like the VAE would
            mean, logvar = batch["latent_parameters"].chunk(2, dim=2)
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            latents = mean + std * torch.randn(mean.shape, generator=generator, device=device)
            latents = latents * self.vae.config.scaling_factor
        else:
            latents = self.encode(video, generator)  # [B, T, C, h, w]
        num_latent_frames = latents.shape[1]

        # image latent: [reference frame, first K frames noised and masked], zero-padded; dropped per batch
        motion = video[:, : c.motion_frames]
        sigma = torch.exp(
            c.motion_noise_log_mean
            + c.motion_noise_log_std * torch.randn(batch_size, 1, 1, 1, 1, generator=generator, device=device)
        )
        motion = motion + sigma * torch.randn(motion.shape, generator=generator, device=device)
        motion = motion * motion_frame_mask(*video.shape[-2:], c.motion_mask_rate, generator, device)
        image_latents = self.encode(torch.cat([batch["reference"][:, None], motion], dim=1), generator)
        image_latents = F.pad(image_latents, (0, 0, 0, 0, 0, 0, 0, num_latent_frames - image_latents.shape[1]))
        if chance(c.concat_dropout):
            image_latents = torch.zeros_like(image_latents)

        # reference bank: masked reference at t = 0 with the (possibly dropped) caption; dropped per batch
        reference_latent = self.encode(batch["masked_reference"][:, None], generator)
        if chance(c.reference_dropout):
            reference_latent = torch.zeros_like(reference_latent)
        text = self.text(batch, self.max_text_length, device)
        text = text * (~chance(c.text_dropout, (batch_size, 1, 1))).float()
        dtype = self.dtype
        bank = reference_net(
            torch.cat([reference_latent, reference_latent], dim=2).to(dtype),
            text.to(dtype),
            torch.zeros(batch_size, device=device),
        )

        audio = None
        if self.config.stage == 2:
            audio = batch["audio_emb"] * (~chance(c.audio_dropout, (batch_size, 1, 1, 1, 1))).float()
            audio = audio.to(dtype)

        # v-prediction on the 1000-step zero-SNR table
        timesteps = torch.randint(
            0, self.scheduler.config.num_train_timesteps, (batch_size,), generator=generator, device=device
        )
        noise = torch.randn(latents.shape, generator=generator, device=device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = self.scheduler.get_velocity(latents, noise, timesteps)
        prediction = transformer(
            torch.cat([noisy, image_latents], dim=2).to(dtype),
            text.to(dtype),
            timesteps.float(),
            reference_hidden_states=bank,
            face_embeds=batch["face_emb"].to(dtype),
            audio_embeds=audio,
        ).sample
        return F.mse_loss(prediction.float(), target.float())


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    """Every random draw of step `step` on `rank`: a resumed run repeats exactly what an unbroken run does."""
    digest = hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def collate(items: list[dict]) -> dict:
    batch = {key: torch.stack([item[key] for item in items]) for key in items[0] if key != "caption"}
    batch["caption"] = [item["caption"] for item in items]
    return batch


# --------------------------------------------------------------------------------------------------------------------


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    folders = [p for p in (output_dir / "checkpoints").glob("checkpoint-*") if p.is_dir()]
    return sorted(folders, key=lambda p: int(p.name.split("-")[1]))


def validate(accelerator, config: TrainConfig, models, step: int) -> None:
    """A video from the current weights through Hallo3Pipeline (main process)."""
    from hallo3.inference import GenerationSettings, Hallo3Generator
    from hallo3.loading import LoadedModel, build_tiny_random_pipeline
    from hallo3.pipeline_hallo3 import Hallo3Pipeline

    vae, tokenizer, text_encoder, transformer, reference_net = models
    if config.model.components == "tiny-random":
        parts = build_tiny_random_pipeline(seed=config.seed)
        feature_extractor, wav2vec = parts.audio_feature_extractor, parts.audio_encoder
    else:
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

        feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(config.model.wav2vec)
        wav2vec = Wav2Vec2Model.from_pretrained(config.model.wav2vec)
    pipeline = Hallo3Pipeline(
        tokenizer,
        text_encoder,
        vae,
        accelerator.unwrap_model(transformer),
        accelerator.unwrap_model(reference_net),
        Hallo3DPMScheduler(),
        feature_extractor,
        wav2vec,
    )
    pipeline.set_progress_bar_config(disable=True)
    generator = Hallo3Generator(LoadedModel(pipeline, f"training step {step}"), accelerator.device)
    output = Path(config.output_dir) / "validation" / f"step-{step:06d}.mp4"
    output.parent.mkdir(parents=True, exist_ok=True)
    settings = GenerationSettings(
        prompt=config.validation_prompt,
        num_inference_steps=config.validation_steps,
        seed=config.seed,
        max_audio_seconds=None,
    )
    was_training = transformer.training
    transformer.eval()
    try:
        generator.generate(config.validation_image, config.validation_audio, output, settings)
    finally:
        transformer.train(was_training)
    logger.info(f"validation video: {output}")


def train(config: TrainConfig) -> dict:
    output_dir = Path(config.output_dir)
    trackers = [t for t in config.report_to if t != "wandb" or importlib.util.find_spec("wandb")]
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    set_seed(config.seed)
    vae, tokenizer, text_encoder, transformer, reference_net = load_models(config)
    for frozen in (vae, text_encoder):
        frozen.requires_grad_(False).eval().to(accelerator.device)

    patterns = config.trainable_patterns()
    reference_trainable = set_trainable(reference_net, patterns.get("reference_net", []))
    # the reference net stops at the last block's modulated input: the rest of that block never gets a gradient
    last = f"transformer_blocks.{len(reference_net.transformer_blocks) - 1}."
    for name, parameter in reference_net.named_parameters():
        if name.startswith(last) and not name.startswith(last + "norm1."):
            parameter.requires_grad_(False)
    reference_trainable = [p for p in reference_trainable if p.requires_grad]
    trainable = set_trainable(transformer, patterns["transformer"]) + reference_trainable
    train_reference = any(p.requires_grad for p in reference_net.parameters())
    logger.info(f"stage {config.stage}: {sum(p.numel() for p in trainable):,} trainable parameters")
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()

    ema = EMAModel(trainable, decay=config.optim.ema_decay)
    optimizer = torch.optim.AdamW(
        parameter_groups([transformer, reference_net], config.optim.weight_decay),
        lr=config.optim.learning_rate,
        betas=tuple(config.optim.betas),
        eps=config.optim.eps,
    )
    warmup = max(config.optim.warmup_steps, 1)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - max(0, s - warmup) / max(config.max_steps, 1))
    )
    dataset = Hallo3ClipDataset(
        config.data,
        width=transformer.config.sample_width * 8,
        height=transformer.config.sample_height * 8,
        num_frames=transformer.config.sample_frames,
        seed=config.seed,
    )
    sampler = EpochSampler(len(dataset), config.seed)
    dataloader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=config.num_workers,
        drop_last=True,
    )

    if train_reference:
        transformer, reference_net, optimizer, dataloader, lr_scheduler = accelerator.prepare(
            transformer, reference_net, optimizer, dataloader, lr_scheduler
        )
    else:
        reference_net.requires_grad_(False).eval().to(accelerator.device)
        transformer, optimizer, dataloader, lr_scheduler = accelerator.prepare(
            transformer, optimizer, dataloader, lr_scheduler
        )
    ema.to(accelerator.device)
    progress = Progress()
    accelerator.register_for_checkpointing(ema, progress)

    checkpoints = checkpoint_dirs(output_dir)
    if checkpoints:
        accelerator.load_state(str(checkpoints[-1]))
        logger.info(f"resumed from {checkpoints[-1]} at step {progress.step}")
    if trackers:
        accelerator.init_trackers("hallo3", config={k: str(v) for k, v in config_to_dict(config).items()})

    loss_fn = Hallo3Loss(
        config, vae, tokenizer, text_encoder, Hallo3DPMScheduler(), accelerator.unwrap_model(transformer)
    )
    losses = {}
    steps_per_epoch = len(dataloader)
    transformer.train()
    while progress.step < config.max_steps:
        epoch, done_in_epoch = divmod(progress.step, steps_per_epoch)
        batches = accelerator.skip_first_batches(dataloader, done_in_epoch) if done_in_epoch else dataloader
        # accelerate's loader passes its own epoch counter to the sampler and the dataset when iterated; it starts
        # at 0 in a resumed run, so set the real epoch on the loader itself
        batches.set_epoch(epoch)
        for batch in batches:
            generator = step_generator(config.seed, progress.step, accelerator.process_index, accelerator.device)
            with accelerator.accumulate(transformer):
                loss = loss_fn(transformer, reference_net, batch, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, config.optim.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            ema.step(trainable)
            progress.step += 1
            step_loss = accelerator.gather(loss.detach()[None]).mean().item()
            losses[progress.step] = step_loss
            if not math.isfinite(step_loss):
                raise RuntimeError(f"loss is {step_loss} at step {progress.step}; stopping.")
            if progress.step % config.log_every == 0 or progress.step == 1:
                accelerator.log({"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=progress.step)
                logger.info(f"step {progress.step}: loss {step_loss:.5f}")
            if progress.step % config.checkpoint_every == 0 or progress.step in (
                config.max_steps,
                config.stop_at_step,
            ):
                accelerator.save_state(str(output_dir / "checkpoints" / f"checkpoint-{progress.step}"))
                if accelerator.is_main_process:
                    for old in checkpoint_dirs(output_dir)[: -config.keep_checkpoints]:
                        shutil.rmtree(old)
            if config.validate_every and progress.step % config.validate_every == 0 and accelerator.is_main_process:
                validate(
                    accelerator, config, (vae, tokenizer, text_encoder, transformer, reference_net), progress.step
                )
            if progress.step >= min(config.max_steps, config.stop_at_step or config.max_steps):
                break
        if config.stop_at_step and progress.step >= config.stop_at_step:
            break

    # export the EMA weights as the diffusers folders the pipeline loads
    accelerator.wait_for_everyone()
    result = {"losses": losses}
    ema.store(trainable)
    ema.copy_to(trainable)
    if accelerator.is_main_process:
        export = output_dir / "final"
        accelerator.unwrap_model(transformer).save_pretrained(export / "transformer")
        accelerator.unwrap_model(reference_net).save_pretrained(export / "reference_net")
        result["export"] = str(export)
    ema.restore(trainable)
    # a fingerprint of the trained weights: every rank must print the same one
    state = accelerator.unwrap_model(transformer).state_dict()
    digest = hashlib.sha256(b"".join(state[k].float().cpu().numpy().tobytes() for k in sorted(state))).hexdigest()
    result["transformer_sha256"] = digest
    print(json.dumps({"rank": accelerator.process_index, "transformer_sha256": digest}), flush=True)
    accelerator.end_training()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="key.sub=value (YAML values), e.g. max_steps=10")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = load_config(args.config, args.overrides)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
