"""LoRA for Hallo3Pipeline, following diffusers' LoRA loader conventions (`CogVideoXLoraLoaderMixin`).

A LoRA file is diffusers' format: one safetensors state dict whose keys start with the component they belong to,
`transformer.` or `reference_net.` (PEFT names after that, e.g.
`transformer.transformer_blocks.0.attn1.to_q.lora_A.weight`), plus the adapter configs in the file's metadata.
`Hallo3Pipeline.save_lora_weights` writes it and `load_lora_weights` reads it, as for any diffusers pipeline:

    pipe.load_lora_weights("path/to/folder_or_file", adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.8])
    pipe.fuse_lora(lora_scale=1.0)  # fold into the weights: no LoRA cost per step

Before anything is allocated for it, a LoRA is checked against the modules it adapts (`check_lora`, from the
safetensors header of a file): every tensor targets a Linear or Conv module of the transformer or the reference net,
A and B fit that module's input and output sizes, the rank is at most what the module can carry, and the adapter
config in the file's metadata asks for the rank the tensors have (PEFT allocates the adapter from that config). Its
values must be finite. Only safetensors files are read: a pickled `.bin` LoRA is refused.
"""

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, _best_guess_weight_name
from diffusers.loaders.lora_pipeline import CogVideoXLoraLoaderMixin
from diffusers.utils import logging
from torch import nn

from .model_files import ModelFileError, Shapes, has_non_finite, safetensors_header


logger = logging.get_logger(__name__)

TRANSFORMER_NAME = "transformer"
REFERENCE_NET_NAME = "reference_net"
# The tensors of one adapted module, as PEFT names them (diffusers' format); their shapes are checked in `check_lora`
LORA_A, LORA_B, LORA_B_BIAS, LORA_MAGNITUDE = "lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector"
LORA_KINDS = (LORA_A, LORA_B, LORA_B_BIAS, LORA_MAGNITUDE)


def adapted_sizes(module: nn.Module) -> tuple[int, int, tuple[int, ...]] | None:
    """(input size, output size, kernel) of a module a LoRA can adapt (a Linear or a Conv), else None."""
    base = getattr(module, "base_layer", module)  # a module that already carries an adapter
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, ()
    if isinstance(base, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return base.in_channels, base.out_channels, tuple(base.kernel_size)
    return None


def check_module_lora(name: str, module: nn.Module, tensors: Mapping[str, tuple[int, ...]], source: str) -> int:
    """The shapes of one module's LoRA tensors (kind -> shape) against the module; returns the rank."""
    sizes = adapted_sizes(module)
    if sizes is None:
        raise ModelFileError(f"{source}: the LoRA adapts {name}, a {type(module).__name__}, not a Linear or Conv.")
    in_size, out_size, kernel = sizes
    if LORA_A not in tensors or LORA_B not in tensors:
        raise ModelFileError(f"{source}: the LoRA of {name} lacks its {LORA_A if LORA_A not in tensors else LORA_B}.")
    a, b = tensors[LORA_A], tensors[LORA_B]
    rank = a[0] if a else 0
    ones = (1,) * len(kernel)
    if tuple(a) != (rank, in_size, *kernel) or tuple(b) != (out_size, rank, *ones):
        raise ModelFileError(
            f"{source}: the LoRA of {name} has A {list(a)} and B {list(b)}; {name} takes {in_size} and gives "
            f"{out_size} (A must be [rank, {', '.join(map(str, (in_size, *kernel)))}], B "
            f"[{', '.join(map(str, (out_size, 'rank', *ones)))}])."
        )
    max_rank = min(in_size * math.prod(kernel), out_size)
    if not 1 <= rank <= max_rank:
        raise ModelFileError(f"{source}: the LoRA of {name} has rank {rank}; {name} allows 1..{max_rank}.")
    for kind in (LORA_B_BIAS, LORA_MAGNITUDE):
        if kind in tensors and tuple(tensors[kind]) != (out_size,):
            raise ModelFileError(f"{source}: {name}.{kind} is {list(tensors[kind])}, expected [{out_size}].")
    return rank


def check_adapter_config(metadata: Mapping[str, Any], ranks: Mapping[str, int], component: str, source: str) -> None:
    """The adapter config that PEFT allocates the adapter from (the file's metadata) asks for the ranks the tensors
    have, with finite scales, and copies no whole modules."""
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key  # how PEFT itself picks a module's rank from rank_pattern

    try:
        config = LoraConfig(**metadata)
    except (TypeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFileError(f"{source}: the {component} adapter config is not a LoraConfig ({reason}).") from None
    rank_pattern, alpha_pattern = config.rank_pattern or {}, config.alpha_pattern or {}
    for module, rank in sorted(ranks.items()):
        wanted = rank_pattern.get(get_pattern_key(list(rank_pattern), module), config.r)
        if wanted != rank:
            raise ModelFileError(
                f"{source}: the adapter config asks for rank {wanted} at {component}.{module}, whose tensors have "
                f"rank {rank}."
            )
    for alpha in (config.lora_alpha, *alpha_pattern.values()):
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
            raise ModelFileError(f"{source}: the {component} adapter config has lora_alpha {alpha!r}, not finite.")
    if config.modules_to_save or getattr(config, "trainable_token_indices", None):
        raise ModelFileError(f"{source}: the {component} adapter config copies whole modules (modules_to_save).")


def adapter_metadata(file_metadata: Mapping[str, str], source: str) -> dict | None:
    """The adapter configs diffusers stores in a LoRA file's metadata (None when there are none)."""
    raw = file_metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return None
    try:
        metadata = json.loads(raw)
    except (ValueError, RecursionError):
        raise ModelFileError(f"{source}: its {LORA_ADAPTER_METADATA_KEY} is not JSON.") from None
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{source}: its {LORA_ADAPTER_METADATA_KEY} is not a JSON object.")
    return metadata


def local_lora_file(source: str | os.PathLike, weight_name: str | None) -> Path | None:
    """The safetensors file diffusers would read for a local file or folder; None for a Hub repo id."""
    path = Path(source)
    if path.is_file():
        return path
    if not path.is_dir():
        return None
    name = weight_name or _best_guess_weight_name(str(path), file_extension=".safetensors")
    if name is None or not (path / name).is_file():
        raise ModelFileError(f"{path}: no LoRA .safetensors file in it (pickled .bin LoRAs are not read).")
    return path / name


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
        source, checked = "the LoRA state dict", False
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            pretrained_model_name_or_path_or_dict = pretrained_model_name_or_path_or_dict.copy()
        else:
            lora_file = local_lora_file(pretrained_model_name_or_path_or_dict, kwargs.pop("weight_name", None))
            if lora_file is not None:  # checked from its header, before its tensors are read
                source, checked = str(lora_file), True
                shapes, file_metadata = safetensors_header(lora_file)
                self.check_lora(shapes, adapter_metadata(file_metadata, source), source)
                pretrained_model_name_or_path_or_dict = source
            else:
                source = str(pretrained_model_name_or_path_or_dict)
            kwargs["use_safetensors"] = True  # never a pickle
        kwargs["return_lora_metadata"] = True
        state_dict, metadata = self.lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
        if not checked:  # a state dict, or a file from the Hub: checked before any adapter is allocated
            self.check_lora({key: tuple(value.shape) for key, value in state_dict.items()}, metadata, source)
        for key, value in state_dict.items():
            if has_non_finite(value):
                raise ModelFileError(f"{source}: tensor {key} holds NaN or infinite values.")

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

    def check_lora(self, shapes: Shapes, metadata: Mapping[str, Any] | None, source: str) -> None:
        """Every LoRA tensor (name -> shape) targets a module of a component that this LoRA fits (see the module
        docstring); raises `ModelFileError` naming `source` and the tensor."""
        modules: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {}
        for key, shape in shapes.items():
            component, _, rest = key.partition(".")
            if component not in self._lora_loadable_modules or getattr(self, component, None) is None:
                raise ModelFileError(
                    f"{source}: tensor {key} targets no component of this pipeline; keys must start with "
                    f"`transformer.` or `reference_net.`."
                )
            kind = next((kind for kind in LORA_KINDS if rest.endswith(f".{kind}")), None)
            if kind is None:
                raise ModelFileError(f"{source}: tensor {key} is not a LoRA tensor ({', '.join(LORA_KINDS)}).")
            modules.setdefault((component, rest[: -len(kind) - 1]), {})[kind] = shape
        if not modules:
            raise ModelFileError(f"{source}: holds no LoRA tensors.")
        ranks: dict[str, dict[str, int]] = {}
        for (component, name), tensors in sorted(modules.items()):
            try:
                module = getattr(self, component).get_submodule(name)
            except AttributeError:
                raise ModelFileError(
                    f"{source}: the LoRA targets {component}.{name}, which the {component} does not have."
                ) from None
            ranks.setdefault(component, {})[name] = check_module_lora(f"{component}.{name}", module, tensors, source)
        if metadata is not None:  # diffusers then builds each component's adapter from its part of the metadata
            for component, component_ranks in ranks.items():
                part = {
                    k.removeprefix(f"{component}."): v for k, v in metadata.items() if k.startswith(f"{component}.")
                }
                check_adapter_config(part, component_ranks, component, source)

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
