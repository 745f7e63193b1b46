"""Hallo3 in diffusers form: audio-driven portrait animation on CogVideoX-5B-I2V."""

from .scheduling_hallo3 import Hallo3DPMScheduler
from .transformer_hallo3 import Hallo3ReferenceNet, Hallo3Transformer3DModel


__all__ = ["Hallo3DPMScheduler", "Hallo3ReferenceNet", "Hallo3Transformer3DModel"]
