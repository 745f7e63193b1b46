"""Hallo3 in diffusers form: audio-driven portrait animation on CogVideoX-5B-I2V."""

from . import memory  # noqa: F401  # first: importing it keeps torchao unimported (see memory.defer_torchao)
from .pipeline_hallo3 import Hallo3Pipeline, Hallo3PipelineOutput
from .scheduling_hallo3 import Hallo3DPMScheduler
from .settings import GenerationSettings
from .transformer_hallo3 import ConditioningTokens, Hallo3ReferenceNet, Hallo3Transformer3DModel


__all__ = [
    "ConditioningTokens",
    "GenerationSettings",
    "Hallo3DPMScheduler",
    "Hallo3Pipeline",
    "Hallo3PipelineOutput",
    "Hallo3ReferenceNet",
    "Hallo3Transformer3DModel",
]
