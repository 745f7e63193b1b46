"""Training configuration: dataclasses with the official recipe as defaults, one YAML per stage (architecture 9)."""

import contextlib
import difflib
import math
import re
import types
import typing
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


class ConfigError(ValueError):
    """The config file or an override breaks a rule; the message names the input and the rule in one line."""


# What a value must be for the run to work, checked when the config loads, so a bad value stops the run before any
# model loads. Keys are dotted as in overrides.
AT_LEAST = {
    "max_steps": 1,
    "stop_at_step": 1,
    "batch_size": 1,
    "gradient_accumulation_steps": 1,
    "num_workers": 0,
    "log_every": 1,
    "checkpoint_every": 1,
    "keep_checkpoints": 1,
    "max_bad_samples": 0,
    "validate_every": 0,
    "validation_steps": 1,
    "optim.warmup_steps": 1,  # the warm-up ramp divides by it
    "optim.warmup_hold_steps": 0,
    "lora.rank": 0,
}
FRACTIONS = ("dropout.text", "dropout.audio", "dropout.image_latent", "dropout.reference", "optim.ema_decay")
CHOICES = {
    "stage": (1, 2),
    "mixed_precision": ("no", "fp16", "bf16"),
    "lora.networks": ("transformer", "reference_net"),  # each listed network
}
KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass
class ConfigInputs:
    """Where each value came from, for the error messages: the config file, or the override that set a dotted key
    (with the value as written)."""

    path: str
    overrides: dict[str, str] = field(default_factory=dict)  # dotted key -> the override that set it
    texts: dict[str, str] = field(default_factory=dict)  # dotted key -> the override's value as written

    def source(self, key: str) -> str:
        while key:
            if key in self.overrides:
                return f"override {self.overrides[key]!r}"
            key = key.rpartition(".")[0]  # a section's override sets the keys inside it
        return f"--config {self.path}"


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as one line: the problem and where."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"{error.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return one_line(error)


def describe(hint) -> str:
    """A type annotation of the config in words, for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in args)
    if origin is list:
        return f"a list of {describe(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} values, each {describe(args[0])}"
    if origin is dict:
        return f"a mapping of {describe(args[0])} to {describe(args[1])}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text", type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_value(key: str, value, hint, source: str, text: str | None = None):
    """`value` as the field's type `hint` wants it, or a ConfigError naming `key`, its `source` and the type. `text`
    is the override's value as written: a text field takes it as is (YAML would read `no` as false)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # the config's unions are `X | None`
        if value is None:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return check_value(key, value, inner, source, text)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float:
        number = value
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as text
            with contextlib.suppress(ValueError):
                number = float(value)
        if isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number):
            return float(number)
    if hint is str and isinstance(value, str):
        return value
    if hint is str and text is not None:
        return text
    if origin is list and isinstance(value, list):
        return [check_value(f"{key}[{i}]", item, args[0], source) for i, item in enumerate(value)]
    if origin is tuple and isinstance(value, list) and len(value) == len(args):
        return tuple(check_value(f"{key}[{i}]", item, args[i], source) for i, item in enumerate(value))
    if origin is dict and isinstance(value, dict):
        return {
            check_value(f"{key} key {name!r}", name, args[0], source): check_value(
                f"{key}.{name}", item, args[1], source
            )
            for name, item in value.items()
        }
    note = "; YAML read it as " + type(value).__name__ + ", put it in quotes" if hint is str else ""
    raise ConfigError(f"{source}: {key}={value!r}: expected {describe(hint)}{note}")


def _build(cls, values, prefix: str, inputs: ConfigInputs):
    """`cls` from `values`: every key known, every value of its field's type."""
    section = prefix.rstrip(".")
    if not isinstance(values, dict):
        raise ConfigError(f"{inputs.source(section)}: {section}={values!r}: expected a section of {cls.__name__} keys")
    known = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            suggestion = (
                f"did you mean {prefix}{close[0]}?"
                if close
                else f"the keys{' of ' + section if section else ''} are {', '.join(known)}"
            )
            raise ConfigError(f"{inputs.source(key)}: unknown key {key}; {suggestion}")
        factory = known[name].default_factory
        default = factory() if factory is not MISSING else known[name].default
        if is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{key}.", inputs)
        else:
            kwargs[name] = check_value(key, value, hints[name], inputs.source(key), inputs.texts.get(key))
    return cls(**kwargs)


def check_bounds(config: TrainConfig, inputs: ConfigInputs) -> None:
    """AT_LEAST, FRACTIONS, CHOICES, and the trainable patterns (networks and regular expressions)."""

    def value_of(key: str):
        target = config
        for part in key.split("."):
            target = getattr(target, part)
        return target

    def broken(key: str, rule: str) -> ConfigError:
        return ConfigError(f"{inputs.source(key)}: {key}={value_of(key)!r}: {rule}")

    for key, low in AT_LEAST.items():
        value = value_of(key)
        if value is not None and value < low:
            raise broken(key, f"must be at least {low}")
    for key in FRACTIONS:
        if not 0.0 <= value_of(key) <= 1.0:
            raise broken(key, "must be between 0 and 1")
    for key, allowed in CHOICES.items():
        value = value_of(key)
        if any(item not in allowed for item in (value if isinstance(value, list) else [value])):
            raise broken(
                key, f"{'each ' if isinstance(value, list) else ''}must be one of {', '.join(map(repr, allowed))}"
            )
    for network, patterns in (config.trainable or {}).items():
        if network not in ("transformer", "reference_net"):
            raise broken("trainable", f"the networks are transformer and reference_net, not {network!r}")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                raise broken("trainable", f"{pattern!r} is not a regular expression ({error})") from None


def apply_override(values: dict, override: str, inputs: ConfigInputs) -> None:
    """`key.sub=value` (the value parsed as YAML) into the file's `values`; `inputs` records it for the messages."""
    key, equals, text = override.partition("=")
    if not equals or not KEY.match(key):
        raise ConfigError(
            f"override {override!r}: expected key=value, key.sub=value for a key in a section (e.g. max_steps=10, "
            "optim.learning_rate=2e-5)"
        )
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: the value is not valid YAML: {yaml_problem(error)}") from None
    target = values
    *parents, leaf = key.split(".")
    for depth, parent in enumerate(parents):
        target = target.setdefault(parent, {})
        if not isinstance(target, dict):
            section = ".".join(parents[: depth + 1])
            raise ConfigError(f"override {override!r}: {section} is {target!r}, not a section with keys")
    target[leaf] = value
    inputs.overrides[key], inputs.texts[key] = override, text


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """YAML file plus `key.sub=value` overrides (values parsed as YAML). A broken rule raises one ConfigError naming
    the file or the override and the rule: unreadable or invalid YAML, an unknown key, a value of the wrong type or
    out of bounds."""
    inputs = ConfigInputs(str(path))
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"--config {path}: cannot be read ({error.strerror or one_line(error)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not a text file (the config is YAML)") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML: {yaml_problem(error)}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(
            f"--config {path}: expected a mapping of settings (key: value), found {type(values).__name__}"
        )
    for override in overrides:
        apply_override(values, override, inputs)
    if "conditioning" in values:
        raise ConfigError(conditioning_moved(values["conditioning"]))
    config = _build(TrainConfig, values, "", inputs)
    check_bounds(config, inputs)
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
