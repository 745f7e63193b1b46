"""Generation settings: their defaults, their limits and the one validator, for the pipeline, the CLI and the app.

`GenerationSettings()` holds the defaults (the official recipe); `Hallo3Pipeline.__call__`, the CLI's flags and the
app's widgets read them from here. `check_settings` holds the rules; the pipeline checks its arguments with it, the CLI
and the app check a `GenerationSettings` with it before any file is read or model loaded. A broken rule raises
`SettingError`, which names the setting; each front end names it as its users know it (`--steps`, `num_inference_steps`).
"""

import math
from dataclasses import asdict, dataclass
from numbers import Integral, Real
from typing import Any


# the causal VAE folds the reference frame and up to 3 motion frames into the one conditioning latent frame the model
# was trained with; 4 or more would spill into a second (architecture 6.1)
MAX_MOTION_FRAMES = 3
# the sampler picks its steps among the 1000 training timesteps
MAX_INFERENCE_STEPS = 1000


class SettingError(ValueError):
    """A generation setting breaks its rule. `name` is the `GenerationSettings` field (and pipeline argument)."""

    def __init__(self, name: str, rule: str, value: Any):
        self.name, self.rule, self.value = name, rule, value
        super().__init__(f"`{name}` {rule}, got {value}.")

    def naming(self, label: str) -> str:
        """The message with the setting named as a front end's users know it, e.g. a CLI flag."""
        return f"{label}: {self.rule}, got {self.value}."


def _whole(value: Any, low: int, high: int) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool) and low <= int(value) <= high


def _number(value: Any, low: float, strict: bool = False) -> bool:
    if not isinstance(value, Real) or isinstance(value, bool) or not math.isfinite(float(value)):
        return False
    return float(value) > low if strict else float(value) >= low


# setting -> (rule, what it says); settings without a rule (the prompt, the on/off switches) take any value
RULES: dict[str, tuple[Any, str]] = {
    "num_inference_steps": (
        lambda v: _whole(v, 1, MAX_INFERENCE_STEPS),
        f"must be a whole number of steps in 1..{MAX_INFERENCE_STEPS}",
    ),
    "guidance_scale": (lambda v: _number(v, 1.0), "must be a finite number >= 1"),
    "audio_guidance_scale": (
        lambda v: v is None or _number(v, 0.0),
        "must be a finite number >= 0 (or unset: the official joint guidance)",
    ),
    "motion_frames": (
        lambda v: _whole(v, 0, MAX_MOTION_FRAMES),
        f"must be 0..{MAX_MOTION_FRAMES} (2 as trained; more would not fit the one conditioning latent frame)",
    ),
    "seed": (lambda v: v is None or _whole(v, 0, 2**63 - 1), "must be a whole number in 0..2^63-1 (or unset)"),
    "max_audio_seconds": (
        lambda v: v is None or _number(v, 0.0, strict=True),
        "must be a positive, finite number of seconds (or unset: no limit)",
    ),
}


def check_settings(**settings: Any) -> None:
    """Check each given setting against its rule; raises `SettingError` for the first that breaks one."""
    for name, value in settings.items():
        rule, says = RULES.get(name, (lambda _: True, ""))
        if not rule(value):
            raise SettingError(name, says, value)


@dataclass
class GenerationSettings:
    """Everything that decides the video besides the input files, with the defaults every front end uses."""

    prompt: str = ""
    num_inference_steps: int = 50
    guidance_scale: float = 3.5
    audio_guidance_scale: float | None = None  # None: the official joint guidance
    use_dynamic_cfg: bool = False
    motion_frames: int = 2
    seed: int | None = None  # None: a fresh random seed, reported in the result
    max_audio_seconds: float | None = 600.0
    separate_vocals: bool = True  # the official behaviour, when the separator model is present
    disable_reference: bool = False
    disable_face_embedding: bool = False
    disable_audio: bool = False

    def pipeline_kwargs(self) -> dict:
        """The settings `Hallo3Pipeline.__call__` takes under the same names (the rest is for the file side)."""
        file_side = ("seed", "max_audio_seconds", "separate_vocals")
        return {k: v for k, v in asdict(self).items() if k not in file_side}

    def validate(self) -> None:
        """Every rule on the settings; a `SettingError` names the broken one."""
        check_settings(**asdict(self))


DEFAULTS = GenerationSettings()
