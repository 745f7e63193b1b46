"""Model files are checked before anything is allocated for them: a few-kB file never makes the process ask for GBs.

Every rule here reads metadata only (JSON configs, safetensors headers, the pickle of a torch zip on the meta device):

- a JSON file is read only up to its size limit (`JSON_MAX_BYTES`, `WEIGHTS_INDEX_MAX_BYTES`);
- every number in a config is finite and every integer within `CONFIG_LIMITS` (per component class, generous for
  the official 5B model and its T5-XXL, VAE and wav2vec2-base) or `ANY_INT_LIMIT`;
- a safetensors header is at most `SAFETENSORS_HEADER_MAX_BYTES` and safetensors itself checks that every tensor it
  declares lies inside the file; a `.bin`/`.pt` file is read with `weights_only=True` (no pickled code runs) onto the
  meta device (no tensor data);
- a config must build exactly the tensors its weights hold, same names and shapes (the model is built on the meta
  device, which allocates nothing), so the weights loaded later are as large as the files and no larger. diffusers
  and transformers only warn about missing or unexpected tensors; here it is an error naming both files and the tensor.

Loaded weights are also checked to be finite (`check_finite_weights`): a NaN or inf tensor is refused, naming its
file. Errors are `ModelFileError`s (a `ValueError`); `hallo3.loading` reports them as `ModelSourceError`, the
converters as `CheckpointError`, `--lora` as a bad LoRA.
"""

import json
import math
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open


class ModelFileError(ValueError):
    """A model file breaks a rule: too large, a size out of bounds, a config that disagrees with its weights, a
    non-finite tensor. The message names the file and the rule."""


# --------------------------------------------------------------------------------------------------------------------
# The limits, in one place

JSON_MAX_BYTES = 1 << 20  # a config.json, model_index.json, scheduler or preprocessor config (the official: < 4 kB)
WEIGHTS_INDEX_MAX_BYTES = 16 << 20  # a sharded model's index.json (the official 5B transformer's: ~150 kB)
TOKENIZER_FILE_MAX_BYTES = 64 << 20  # each tokenizer file (T5's tokenizer.json: 2.4 MB, spiece.model: 0.8 MB)
SAFETENSORS_HEADER_MAX_BYTES = 16 << 20  # a safetensors header: ~100k tensors (the official shards: < 200 kB each)
ANY_INT_LIMIT = 1 << 24  # any integer in any config without a tighter limit below (vocabularies, token ids, ...)
LIST_LIMIT = 64  # entries of a list in a config (block_out_channels, conv_dim, ...)

# Sizes a config may ask for, per component class: at least 1 and at most this. The official value is in the comment.
HALLO3_LIMITS = {
    "num_layers": 256,  # 42
    "num_attention_heads": 256,  # 48
    "attention_head_dim": 512,  # 64
    "in_channels": 1024,  # 32
    "out_channels": 1024,  # 16
    "time_embed_dim": 16384,  # 512
    "text_embed_dim": 16384,  # 4096 (T5-XXL)
    "ff_inner_dim": 65536,  # null: 4 x 3072
    "sample_width": 512,  # 90 latent pixels (720 px)
    "sample_height": 512,  # 60 (480 px)
    "sample_frames": 1024,  # 49
    "patch_size": 16,  # 2
    "temporal_compression_ratio": 16,  # 4
    "max_text_seq_length": 4096,  # 226
    "face_embed_dim": 16384,  # 512
    "face_hidden_size": 16384,  # 1024
    "num_face_tokens": 1024,  # 4
    "audio_window": 64,  # 5
    "audio_num_layers": 256,  # 12
    "audio_channels": 16384,  # 768
    "audio_intermediate_dim": 16384,  # 512
    "audio_hidden_size": 16384,  # 768
    "num_audio_tokens": 1024,  # 32
}
CONFIG_LIMITS: dict[str, dict[str, int]] = {
    "Hallo3Transformer3DModel": HALLO3_LIMITS,
    "Hallo3ReferenceNet": HALLO3_LIMITS,
    "AutoencoderKLCogVideoX": {
        "in_channels": 64,  # 3
        "out_channels": 64,  # 3
        "block_out_channels": 4096,  # each of [128, 256, 256, 512]
        "latent_channels": 1024,  # 16
        "layers_per_block": 16,  # 3
        "norm_num_groups": 1024,  # 32
        "sample_height": 8192,  # 480
        "sample_width": 8192,  # 720
        "temporal_compression_ratio": 16,  # 4
    },
    "T5EncoderModel": {
        "d_model": 16384,  # 4096
        "d_kv": 1024,  # 64
        "d_ff": 65536,  # 10240
        "num_layers": 256,  # 24
        "num_decoder_layers": 256,  # 24 (not built by the encoder)
        "num_heads": 256,  # 64
        "relative_attention_num_buckets": 1024,  # 32
        "relative_attention_max_distance": 65536,  # 128
    },
    "Wav2Vec2Model": {
        "hidden_size": 16384,  # 768
        "num_hidden_layers": 256,  # 12
        "num_attention_heads": 256,  # 12
        "intermediate_size": 65536,  # 3072
        "conv_dim": 4096,  # each of 7 x 512
        "conv_kernel": 1024,  # each of [10, 3, 3, 3, 3, 2, 2]
        "conv_stride": 64,  # each of [5, 2, 2, 2, 2, 2, 2]
        "num_conv_pos_embeddings": 1024,  # 128
        "num_conv_pos_embedding_groups": 256,  # 16
    },
    "Hallo3DPMScheduler": {"num_train_timesteps": 100_000},  # 1000
    "Wav2Vec2FeatureExtractor": {"feature_size": 64, "sampling_rate": 192_000},  # 1, 16000
}


# --------------------------------------------------------------------------------------------------------------------
# JSON


def read_json(path: Path, max_bytes: int = JSON_MAX_BYTES) -> dict:
    """A JSON object from `path`, read only if the file is at most `max_bytes`."""
    size = path.stat().st_size
    if size > max_bytes:
        raise ModelFileError(f"{path}: {size:,} bytes, more than the {max_bytes:,} a file of its kind may have.")
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:  # bad JSON, a too-long integer literal, nesting too deep
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelFileError(f"{path}: not valid JSON ({reason}).") from None
    if not isinstance(value, dict):
        raise ModelFileError(f"{path}: expected a JSON object, got {type(value).__name__}.")
    return value


def check_config_values(config: Mapping[str, Any], class_name: str, path: Path | str) -> None:
    """Every number in `config` finite and every integer within the limits of `class_name` (or `ANY_INT_LIMIT`)."""
    limits = CONFIG_LIMITS.get(class_name, {})

    def check(key: str, value: Any) -> None:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, int | float):
            if isinstance(value, float) and not math.isfinite(value):
                raise ModelFileError(f"{path}: {key} is {value}; numbers in a config must be finite.")
            if key in limits and not 1 <= value <= limits[key]:
                raise ModelFileError(
                    f"{path}: {key} = {value} is outside 1..{limits[key]:,}, the limit for a {class_name} "
                    f"(hallo3.model_files.CONFIG_LIMITS)."
                )
            if isinstance(value, int) and abs(value) > ANY_INT_LIMIT:
                raise ModelFileError(
                    f"{path}: {key} = {value} is beyond {ANY_INT_LIMIT:,}, the limit for any integer."
                )
        elif isinstance(value, list):
            if len(value) > LIST_LIMIT:
                raise ModelFileError(f"{path}: {key} has {len(value):,} entries; at most {LIST_LIMIT} are allowed.")
            for item in value:
                check(key, item)
        elif isinstance(value, dict):
            for inner_key, item in value.items():
                check(str(inner_key), item)

    for key, value in config.items():
        check(key, value)


def read_config(path: Path, class_name: str) -> dict:
    """A component's config file, bounded (see `check_config_values`)."""
    config = read_json(path)
    check_config_values(config, class_name, path)
    return config


# --------------------------------------------------------------------------------------------------------------------
# Weight files: shapes without data

Shapes = dict[str, tuple[int, ...]]


def safetensors_header(path: Path) -> tuple[Shapes, dict[str, str]]:
    """Tensor shapes and the `__metadata__` strings of a safetensors file, from its header only. safetensors refuses
    a header whose tensors do not lie inside the file; the length field is checked here before anything is read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length_field = f.read(8)
    if len(length_field) < 8:
        raise ModelFileError(f"{path}: {size} bytes, too short for a safetensors file.")
    header_bytes = int.from_bytes(length_field, "little")
    if header_bytes > min(size - 8, SAFETENSORS_HEADER_MAX_BYTES):
        raise ModelFileError(
            f"{path}: its header claims {header_bytes:,} bytes, more than the file's {size:,} or the limit of "
            f"{SAFETENSORS_HEADER_MAX_BYTES:,}; the file is damaged or not safetensors."
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFileError(f"{path}: not a readable safetensors file ({reason}).") from None
    return shapes, metadata


def torch_file_shapes(path: Path) -> Shapes:
    """Tensor shapes of a torch zip file (`pytorch_model.bin`), loaded with `weights_only=True` onto the meta device:
    no pickled code runs and no tensor data is read."""
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path}: not a torch zip file (older pickle formats are not read).")
    try:
        state = torch.load(path, map_location="meta", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, ValueError, ... for bad or unsafe files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFileError(f"{path}: refused or unreadable as a weights-only torch file ({reason}).") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{path}: not a state dict of tensors.")
    return {str(key): tuple(tensor.shape) for key, tensor in state.items()}


# Weight file names as the libraries write them: (single file, shards' index), safetensors first, as they prefer it
DIFFUSERS_WEIGHTS = (
    ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
    ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json"),
)
TRANSFORMERS_WEIGHTS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)


def weight_files(folder: Path, names: Iterable[tuple[str, str]]) -> list[Path]:
    """The weight files a library would load from `folder`: the first single file or shards' index found."""
    for single, index in names:
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            weight_map = read_json(folder / index, WEIGHTS_INDEX_MAX_BYTES).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ModelFileError(f"{folder / index}: no weight_map.")
            shards = sorted({str(name) for name in weight_map.values()})
            for shard in shards:
                if Path(shard).name != shard or not (folder / shard).is_file():
                    raise ModelFileError(
                        f"{folder / index}: names the shard {shard!r}, which is not a file beside it."
                    )
            return [folder / shard for shard in shards]
    raise ModelFileError(f"{folder}: no weights ({', '.join(single for single, _ in names)} or their shards).")


def read_weight_shapes(files: list[Path]) -> tuple[Shapes, dict[str, Path]]:
    """Shapes of every tensor in `files`, and the file each tensor is in."""
    shapes: Shapes = {}
    where: dict[str, Path] = {}
    for path in files:
        file_shapes = safetensors_header(path)[0] if path.suffix == ".safetensors" else torch_file_shapes(path)
        for key, shape in file_shapes.items():
            if key in where:
                raise ModelFileError(f"{path}: tensor {key} is also in {where[key].name}.")
            shapes[key], where[key] = shape, path
    return shapes, where


# --------------------------------------------------------------------------------------------------------------------
# A config against its weights

LAYER_INDEX = re.compile(r"^(.*?)\.(\d+)\.")


def layer_counts(keys: Iterable[str]) -> dict[str, int]:
    """Repeated blocks per module list: `transformer_blocks.41.x` -> {"transformer_blocks": 42}."""
    counts: dict[str, int] = {}
    for key in keys:
        if match := LAYER_INDEX.match(key):
            counts[match.group(1)] = max(counts.get(match.group(1), 0), int(match.group(2)) + 1)
    return counts


def compare_with_weights(
    expected: Shapes,
    found: Shapes,
    where: dict[str, Path],
    config: Mapping[str, Any],
    config_path: Path,
    aliases: Mapping[str, str] | None = None,
) -> None:
    """`expected` (what the config builds) and `found` (what the weights hold) must be the same tensors with the same
    shapes. `aliases` maps tied tensors to the one that stands for them (a file holds one of them)."""
    aliases = aliases or {}
    files = ", ".join(sorted({path.name for path in where.values()}))
    prefix = f"{config_path} disagrees with the weights beside it ({files})"

    built, held = layer_counts(expected), layer_counts(found)
    for name in sorted(built.keys() & held.keys()):
        if built[name] != held[name]:
            keys = [key for key, value in config.items() if value == built[name] and not isinstance(value, bool)]
            by = f" ({keys[0]} = {built[name]})" if len(keys) == 1 else ""
            raise ModelFileError(
                f"{prefix}: the config builds {built[name]} {name}{by}, the weights hold {held[name]}."
            )
    for key in sorted(expected):
        shape = found.get(key, found.get(aliases.get(key, key)))
        if shape is None:
            if any(found.get(other) is not None for other, target in aliases.items() if target == key):
                continue  # a tied tensor saved under its other name
            raise ModelFileError(f"{prefix}: tensor {key} {list(expected[key])} is not in the weights.")
        if tuple(shape) != tuple(expected[key]):
            raise ModelFileError(
                f"{prefix}: tensor {key} is {list(shape)} in the weights, the config makes it {list(expected[key])}."
            )
    unexpected = sorted(set(found) - set(expected) - set(aliases))
    if unexpected:
        raise ModelFileError(
            f"{prefix}: {len(unexpected)} tensors the config does not build, e.g. {unexpected[0]} in "
            f"{where[unexpected[0]].name}."
        )


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Tensor names that share one parameter, each mapped to the first name of that parameter."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def check_diffusers_component(folder: Path, model_cls: Any) -> dict[str, Path]:
    """A diffusers model folder (config.json + weights): bounded, and the config builds exactly the weights.
    Returns the file of each tensor (for `check_finite_weights`)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelFileError(f"{folder}: no config.json.")
    config = read_config(config_path, model_cls.__name__)
    found, where = read_weight_shapes(weight_files(folder, DIFFUSERS_WEIGHTS))
    try:
        with torch.device("meta"):
            model = model_cls.from_config(config)
    except (TypeError, ValueError, RuntimeError, AssertionError, ZeroDivisionError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFileError(f"{config_path}: does not describe a {model_cls.__name__} ({reason}).") from None
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    compare_with_weights(expected, found, where, config, config_path, tied_aliases(model))
    return where


def check_transformers_component(folder: Path, model_cls: Any) -> dict[str, Path]:
    """A transformers model folder, as `check_diffusers_component`. Checkpoint names are mapped the way transformers
    maps them when loading (its legacy renames, a task model's `wav2vec2.` prefix); tensors of a task head that the
    base model does not have (the `lm_head` of a wav2vec2 CTC checkpoint) are ignored, as transformers ignores them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelFileError(f"{folder}: no config.json.")
    config_dict = read_config(config_path, model_cls.__name__)
    found_raw, where_raw = read_weight_shapes(weight_files(folder, TRANSFORMERS_WEIGHTS))
    try:
        config = model_cls.config_class.from_dict(config_dict)
        with torch.device("meta"):
            model = model_cls(config)
    except (TypeError, ValueError, RuntimeError, AssertionError, ZeroDivisionError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelFileError(f"{config_path}: does not describe a {model_cls.__name__} ({reason}).") from None
    meta_state = model.state_dict(keep_vars=True)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    own_parts = {key.split(".")[0] for key in meta_state}
    found: Shapes = {}
    where: dict[str, Path] = {}
    for key, shape in found_raw.items():
        name, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if name not in meta_state and (name.split(".")[0] not in own_parts or any(p.search(name) for p in ignored)):
            continue  # another task's head, or a key transformers is told to ignore
        found[name], where[name] = shape, where_raw[key]
    expected = {key: tuple(value.shape) for key, value in meta_state.items()}
    compare_with_weights(expected, found, where, config_dict, config_path, tied_aliases(model))
    return where


def check_small_files(folder: Path, max_bytes: int = TOKENIZER_FILE_MAX_BYTES) -> None:
    """No file in `folder` (a tokenizer's) larger than `max_bytes`; the JSON ones at most their own limit."""
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.is_file() and path.stat().st_size > max_bytes:
            raise ModelFileError(f"{path}: {path.stat().st_size:,} bytes, more than the {max_bytes:,} allowed.")


# --------------------------------------------------------------------------------------------------------------------
# Finite weights

FINITE_CHUNK = 1 << 24  # elements per step of the exact check


def has_non_finite(tensor: torch.Tensor) -> bool:
    """Whether `tensor` holds a NaN or an infinity. A sum is NaN or infinite whenever any term is (IEEE arithmetic
    propagates both), so one fast reduction answers for nearly all tensors; only a non-finite sum, which a
    huge-but-finite tensor can also give, is confirmed element by element (in chunks, no full-size mask)."""
    if not tensor.is_floating_point() or tensor.numel() == 0 or tensor.device.type == "meta":
        return False
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
        # a quantized weight (torchao's Int8Tensor, ...) is a tensor subclass without the reductions; its values are
        # integers and scales made from the file's, not the file's own
        return False
    tensor = tensor.detach()
    # the tensor's own dtype: ~10x faster than asking for a wider sum, which converts element by element on CPU
    if torch.isfinite(tensor.sum()):
        return False
    flat = tensor.reshape(-1)
    return any(not bool(torch.isfinite(chunk).all()) for chunk in flat.split(FINITE_CHUNK))


def check_finite_weights(module: torch.nn.Module, where: Mapping[str, Path], folder: Path) -> None:
    """Every floating-point parameter and buffer of a loaded `module` is finite; a bad one is named with its file."""
    for name, tensor in module.state_dict().items():
        if has_non_finite(tensor):
            source = where.get(name, folder)
            raise ModelFileError(f"{source}: tensor {name} holds NaN or infinite values.")


# --------------------------------------------------------------------------------------------------------------------
# The folders of a Hallo3 pipeline

MODEL_INDEX = "model_index.json"
# component -> the classes model_index.json may name for it
PIPELINE_COMPONENTS = {
    "tokenizer": ("T5Tokenizer", "T5TokenizerFast"),
    "text_encoder": ("T5EncoderModel",),
    "vae": ("AutoencoderKLCogVideoX",),
    "transformer": ("Hallo3Transformer3DModel",),
    "reference_net": ("Hallo3ReferenceNet",),
    "scheduler": ("Hallo3DPMScheduler",),
    "audio_feature_extractor": ("Wav2Vec2FeatureExtractor",),
    "audio_encoder": ("Wav2Vec2Model",),
}
# what a tokenizer reads (transformers' names for T5's files)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "spiece.model",
)
# config files of the components without weights
CONFIG_FILES = {"Hallo3DPMScheduler": "scheduler_config.json", "Wav2Vec2FeatureExtractor": "preprocessor_config.json"}


def model_classes() -> dict[str, type]:
    """The weight-bearing component classes by name."""
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5EncoderModel, Wav2Vec2Model

    from .transformer_hallo3 import Hallo3ReferenceNet, Hallo3Transformer3DModel

    classes = (Hallo3Transformer3DModel, Hallo3ReferenceNet, AutoencoderKLCogVideoX, T5EncoderModel, Wav2Vec2Model)
    return {cls.__name__: cls for cls in classes}


def check_component(folder: Path, class_name: str) -> dict[str, Path]:
    """One component folder of class `class_name` (see the module docstring); returns the file of each tensor."""
    if not folder.is_dir():
        raise ModelFileError(f"{folder}: no such folder, but the model needs its {class_name}.")
    if class_name in PIPELINE_COMPONENTS["tokenizer"]:
        for name in TOKENIZER_FILES:
            path = folder / name
            if path.is_file() and path.stat().st_size > TOKENIZER_FILE_MAX_BYTES:
                raise ModelFileError(
                    f"{path}: {path.stat().st_size:,} bytes, more than the {TOKENIZER_FILE_MAX_BYTES:,} allowed."
                )
        return {}
    if class_name in CONFIG_FILES:
        read_config(folder / CONFIG_FILES[class_name], class_name)
        return {}
    from transformers import PreTrainedModel

    model_cls = model_classes()[class_name]
    if issubclass(model_cls, PreTrainedModel):
        return check_transformers_component(folder, model_cls)
    return check_diffusers_component(folder, model_cls)


def check_pipeline_folder(folder: Path) -> dict[str, dict[str, Path]]:
    """A saved pipeline (model_index.json): every component a Hallo3 one and every folder within bounds and equal to
    its weights. Returns, per weight-bearing component, the file of each tensor."""
    index_path = folder / MODEL_INDEX
    index = read_json(index_path)
    files = {}
    for name, entry in sorted(index.items()):
        if name.startswith("_"):
            continue
        if name not in PIPELINE_COMPONENTS:
            raise ModelFileError(f"{index_path}: {name!r} is not a component of a Hallo3 pipeline.")
        if entry in ([None, None], None):  # an optional component saved as absent
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] in PIPELINE_COMPONENTS[name]):
            raise ModelFileError(
                f"{index_path}: {name} is {entry!r}; a Hallo3 pipeline's {name} is a "
                f"{' or '.join(PIPELINE_COMPONENTS[name])}."
            )
        files[name] = check_component(folder / name, entry[1])
    return files
