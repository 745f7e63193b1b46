"""Training configuration: dataclasses with the official recipe as defaults, one YAML per stage (architecture 9)."""

from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml


# Trainable parameters by explicit module names (architecture 9). The official substring rule ("attention" also caught
# post_attention_layernorm, "model" also caught the reference net) is written out here as what it selected.
STAGE1_TRAINABLE = {
    "transformer": [
        r"^transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)\.",
        r"^transformer_blocks\.\d+\.norm2\.norm\.",  # SAT post_attention_layernorm
        r"^transformer_blocks\.\d+\.(norm_face|attn_face)\.",
        r"^face_proj\.",
    ],
    "reference_net": [
        r"^transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)\.",
        r"^transformer_blocks\.\d+\.norm2\.norm\.",
    ],
}
STAGE2_TRAINABLE = {
    "transformer": [r"^transformer_blocks\.\d+\.(norm_audio|attn_audio)\.", r"^audio_proj\."],
    "reference_net": [],
}


@dataclass
class ModelConfig:
    # "tiny-random" (CPU smoke runs) or a diffusers CogVideoX-5B-I2V repo/folder for the VAE (and T5 when captions
    # are not precomputed)
    components: str = "THUDM/CogVideoX-5b-I2V"
    # stage 1: a CogVideoX-5B-I2V transformer (diffusers; a folder, or owner/repo/subfolder on the Hub);
    # stage 2: the stage-1 export's transformer/ and reference_net/
    transformer: str | None = None
    reference_net: str | None = None
    wav2vec: str = "facebook/wav2vec2-base-960h"  # validation videos only; training reads precomputed features


@dataclass
class OptimConfig:
    learning_rate: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4  # not on biases and norms
    eps: float = 1e-8
    max_grad_norm: float = 0.1
    warmup_steps: int = 300
    warmup_hold_steps: int = 100  # SAT: the first 100 iterations at min(0.05 x lr, ramp)
    warmup_hold_factor: float = 0.05
    ema_decay: float = 0.9999
    ema_on_cpu: bool = False  # this rank's EMA share in host memory instead of accelerator memory


@dataclass
class DropoutConfig:
    """How often each input is dropped (zeroed) in training (architecture 6.5)."""

    text: float = 0.1  # per sample, zeros (also the reference net's text)
    audio: float = 0.05  # per sample, zero features
    image_latent: float = 0.05  # per batch, zero image latent
    reference: float = 0.05  # per batch, zero reference latent


@dataclass
class MotionFramesConfig:
    """The clip's first frames as the image latent's motion frames, noised and masked (architecture 6.1)."""

    count: int = 2
    mask_rate: float = 0.1  # the share of pixels masked
    noise_log_mean: float = -3.0  # sigma = exp(N(mean, std^2)) per sample
    noise_log_std: float = 0.5


# the keys of the former `conditioning:` section -> where they are now
CONDITIONING_KEYS = {
    "text_dropout": "dropout.text",
    "audio_dropout": "dropout.audio",
    "concat_dropout": "dropout.image_latent",
    "reference_dropout": "dropout.reference",
    "motion_frames": "motion_frames.count",
    "motion_mask_rate": "motion_frames.mask_rate",
    "motion_noise_log_mean": "motion_frames.noise_log_mean",
    "motion_noise_log_std": "motion_frames.noise_log_std",
}


@dataclass
class LoraConfig:
    """LoRA instead of full fine-tuning: adapters on `target_modules` of the listed networks train, every base weight
    stays frozen, and the export is one file that `Hallo3Pipeline.load_lora_weights` reads. The use case: a person's
    identity from a few minutes of their video on one 24 GB GPU."""

    rank: int = 0  # 0: no LoRA, the stage's trainable set trains as it is
    alpha: int | None = None  # the adapters' scale is alpha / rank; None: alpha = rank
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    networks: list[str] = field(default_factory=lambda: ["transformer", "reference_net"])


@dataclass
class TrainConfig:
    stage: int = 1
    data: str = "data/prepared"
    output_dir: str = "runs/hallo3"
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    motion_frames: MotionFramesConfig = field(default_factory=MotionFramesConfig)
    trainable: dict[str, list[str]] | None = None  # default: the stage's explicit list above
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_steps: int = 30000  # the learning-rate schedule runs over these
    stop_at_step: int | None = None  # end this run early (a job's time limit); a rerun resumes from the checkpoint
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    seed: int = 42
    num_workers: int = 2
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    max_bad_samples: int = 100  # unreadable samples are skipped with their reason; more than this stops the run
    validate_every: int = 0  # 0: never
    validation_image: str = "assets/examples/0001.jpg"
    validation_audio: str = "assets/examples/0001.mp3"
    validation_prompt: str = "A little girl talking around a campfire"
    validation_steps: int = 25
    report_to: list[str] = field(default_factory=lambda: ["tensorboard", "wandb"])  # wandb only when installed

    def trainable_patterns(self) -> dict[str, list[str]]:
        if self.trainable is not None:
            return self.trainable
        return STAGE1_TRAINABLE if self.stage == 1 else STAGE2_TRAINABLE


def _build(cls, values: dict):
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in values.items():
        factory = known[name].default_factory
        default = factory() if factory is not MISSING else known[name].default
        if is_dataclass(default) and isinstance(value, dict):
            value = _build(type(default), value)
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """YAML file plus `key.sub=value` overrides (values parsed as YAML)."""
    values = yaml.safe_load(Path(path).read_text()) or {}
    for override in overrides:
        key, _, raw = override.partition("=")
        target = values
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = yaml.safe_load(raw)
    if "conditioning" in values:
        raise ValueError(conditioning_moved(values["conditioning"]))
    config = _build(TrainConfig, values)
    if config.stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {config.stage}")
    return config


def conditioning_moved(section) -> str:
    """The one-line error for a config that still has the `conditioning:` section: where its keys are now."""
    used = [key for key in section if key in CONDITIONING_KEYS] if isinstance(section, dict) else []
    moves = ", ".join(f"conditioning.{key} -> {CONDITIONING_KEYS[key]}" for key in used or CONDITIONING_KEYS)
    return (
        "the conditioning: section was split into dropout: and motion_frames: (see train/configs/stage1.yaml); "
        f"rename {moves}"
    )


def config_to_dict(config: TrainConfig) -> dict:
    return asdict(config)
