"""LoRA for Hallo3Pipeline, following diffusers' LoRA loader conventions (`CogVideoXLoraLoaderMixin`).

A LoRA file is diffusers' format: one safetensors state dict whose keys start with the component they belong to,
`transformer.` or `reference_net.` (PEFT names after that, e.g.
`transformer.transformer_blocks.0.attn1.to_q.lora_A.weight`), plus the adapter configs in the file's metadata.
`Hallo3Pipeline.save_lora_weights` writes it and `load_lora_weights` reads it, as for any diffusers pipeline:

    pipe.load_lora_weights("path/to/folder_or_file", adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.8])
    pipe.fuse_lora(lora_scale=1.0)  # fold into the weights: no LoRA cost per step
"""

import os
from collections.abc import Callable

import torch
from diffusers.loaders.lora_pipeline import CogVideoXLoraLoaderMixin
from diffusers.utils import logging


logger = logging.get_logger(__name__)

TRANSFORMER_NAME = "transformer"
REFERENCE_NET_NAME = "reference_net"


class Hallo3LoraLoaderMixin(CogVideoXLoraLoaderMixin):
    r"""Load LoRA layers into the Hallo3 transformer and reference net (both diffusers `PeftAdapterMixin` models).

    `lora_state_dict`, `set_adapters`, `delete_adapters`, `unload_lora_weights`, `enable_lora` / `disable_lora` and
    `get_active_adapters` are diffusers' own; this class adds the reference net as a second LoRA-loadable component.
    """

    _lora_loadable_modules = [TRANSFORMER_NAME, REFERENCE_NET_NAME]
    transformer_name = TRANSFORMER_NAME
    reference_net_name = REFERENCE_NET_NAME

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ) -> None:
        """Load a diffusers-format LoRA (folder, file or state dict) into the transformer and/or the reference net.

        Args:
            pretrained_model_name_or_path_or_dict: a folder with `pytorch_lora_weights.safetensors`, a file
                (`weight_name=`), a Hub repo, or a state dict with `transformer.` / `reference_net.` keys.
            adapter_name: name of the adapter (`default_0`, `default_1`, ... when omitted).
            hotswap: replace the weights of an already loaded adapter of the same name in place.
        """
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = pretrained_model_name_or_path_or_dict.copy()
        kwargs["return_lora_metadata"] = True
        state_dict, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
        if not all("lora" in key for key in state_dict):
            raise ValueError("Invalid LoRA checkpoint: every parameter name must contain 'lora'.")

        loaded = []
        for name in self._lora_loadable_modules:
            prefix = f"{name}."
            if not any(key.startswith(prefix) for key in state_dict):
                continue
            model = getattr(self, name, None)
            if model is None:
                raise ValueError(f"The LoRA has `{name}` weights but this pipeline has no {name}.")
            logger.info(f"Loading {name}.")
            model.load_lora_adapter(
                state_dict,
                prefix=name,
                network_alphas=None,
                adapter_name=adapter_name,
                metadata=metadata,
                _pipeline=self,
                low_cpu_mem_usage=low_cpu_mem_usage,
                hotswap=hotswap,
            )
            loaded.append(name)
        if not loaded:
            raise ValueError(
                f"No LoRA weights for {' or '.join(self._lora_loadable_modules)} found; keys must start with "
                f"`transformer.` or `reference_net.` (got e.g. {next(iter(state_dict), None)!r})."
            )

    @classmethod
    def save_lora_weights(  # type: ignore[override]
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, torch.nn.Module | torch.Tensor] | None = None,
        reference_net_lora_layers: dict[str, torch.nn.Module | torch.Tensor] | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function: Callable | None = None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: dict | None = None,
        reference_net_lora_adapter_metadata: dict | None = None,
    ) -> None:
        """Write LoRA layers in the format `load_lora_weights` reads (`pytorch_lora_weights.safetensors`).

        Args:
            transformer_lora_layers, reference_net_lora_layers: `peft.get_peft_model_state_dict(model)` of each
                component (either may be omitted).
            transformer_lora_adapter_metadata, reference_net_lora_adapter_metadata: `model.peft_config[name]
                .to_dict()`, stored so the adapter's rank, alpha and target modules load as trained.
        """
        lora_layers, lora_metadata = {}, {}
        for name, layers, metadata in (
            (cls.transformer_name, transformer_lora_layers, transformer_lora_adapter_metadata),
            (cls.reference_net_name, reference_net_lora_layers, reference_net_lora_adapter_metadata),
        ):
            if layers:
                lora_layers[name] = layers
                lora_metadata[name] = metadata
        if not lora_layers:
            raise ValueError("Pass `transformer_lora_layers`, `reference_net_lora_layers` or both.")
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers=lora_layers,
            lora_metadata=lora_metadata,
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ) -> None:
        """Fold the active adapters into the weights of `components` (every component that has a LoRA by default)."""
        super().fuse_lora(
            components=components or self._components_with_lora(),
            lora_scale=lora_scale,
            safe_fusing=safe_fusing,
            adapter_names=adapter_names,
            **kwargs,
        )

    def unfuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        """Undo `fuse_lora` on `components` (every component that has a LoRA by default)."""
        super().unfuse_lora(components=components or self._components_with_lora(), **kwargs)

    def _components_with_lora(self) -> list[str]:
        names = [
            name
            for name in self._lora_loadable_modules
            if getattr(getattr(self, name, None), "peft_config", None)  # PeftAdapterMixin sets it on first load
        ]
        return names or [self.transformer_name]
