"""Convert the official Hallo3 SAT/DeepSpeed checkpoint into diffusers folders.

    python -m hallo3.convert_sat_checkpoint --checkpoint pretrained_models/hallo3 --output hallo3-diffusers

PATH is the official folder (with `latest`) or its `mp_rank_00_model_states.pt`. The output holds `transformer/`
(Hallo3Transformer3DModel) and `reference_net/` (Hallo3ReferenceNet), each a config.json plus sharded safetensors.

The file is read with `torch.load(weights_only=True, mmap=True)`: no pickled code runs, tensors stay on disk until
they are written, and shards are flushed as they fill, so a 29 GB checkpoint converts in a few GB of memory. The
configuration read from the shapes is held to `hallo3.model_files.CONFIG_LIMITS` before anything is built from it,
and every tensor must be finite. The result is written to a temporary folder and renamed at the end: a failed or
interrupted run leaves nothing behind.
Key mapping: architecture 10 (stock part as diffusers' `convert_cogvideox_to_diffusers.py`, Hallo3 keys 10.4).
"""

import argparse
import json
import logging
import math
import pickle
import re
import shutil
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from .interrupts import Interrupted, staging_folder, stop_on_signals
from .model_files import JSON_MAX_BYTES, ModelFileError, check_config_values, has_non_finite
from .transformer_hallo3 import Hallo3ReferenceNet, Hallo3Transformer3DModel, get_3d_rotary_emb


logger = logging.getLogger("hallo3.convert")

DENOISER_PREFIX = "model.diffusion_model."
REFERENCE_PREFIX = "ref_model.diffusion_model."
# Parts of the engine that are not ours to convert: T5 and the VAE come from the CogVideoX diffusers release.
IGNORED_PREFIXES = ("first_stage_model.", "conditioner.")
# Official keys that nothing reads (architecture 2, 10.3): RoPE tables we recompute, and a leftover SAT embedding.
UNUSED_KEYS = ("mixins.pos_embed.freqs_sin", "mixins.pos_embed.freqs_cos", "transformer.position_embeddings.weight")
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CHECKPOINT_FILE = "mp_rank_00_model_states.pt"
LATEST_MAX_BYTES = 256  # DeepSpeed's `latest` holds the tag of the last iteration folder
STAGING_SUFFIX = ".partial"


class CheckpointError(ValueError):
    """The input is not a readable official Hallo3 checkpoint; the message says which rule it broke."""


# --------------------------------------------------------------------------------------------------------------------
# Reading the DeepSpeed/SAT file without running pickled code


def _safe_globals() -> list:
    """Plain types a DeepSpeed model-states file holds next to `module` (numpy RNG state, numpy scalars, sets)."""
    from numpy._core.multiarray import _reconstruct, scalar

    allowed = [np.ndarray, np.dtype, frozenset, set, _reconstruct, scalar]
    # files written under numpy 1.x name the same functions under numpy.core
    allowed += [(_reconstruct, "numpy.core.multiarray._reconstruct"), (scalar, "numpy.core.multiarray.scalar")]
    allowed += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return allowed


def resolve_checkpoint_file(path: Path) -> Path:
    """The official folder (with `latest`), an iteration folder, or the model-states file itself."""
    if not path.exists():
        raise CheckpointError(f"--checkpoint {path}: no such file or folder.")
    if path.is_file():
        return path
    if (path / "latest").is_file():
        with open(path / "latest", "rb") as f:  # a tag such as `1`; a longer file is not DeepSpeed's
            tag = f.read(LATEST_MAX_BYTES + 1).decode("utf-8", "replace").strip()
        if len(tag) > LATEST_MAX_BYTES or Path(tag).name != tag:
            raise CheckpointError(f"--checkpoint {path}: `latest` does not name an iteration folder.")
        path = path / tag
    candidate = path / CHECKPOINT_FILE
    if not candidate.is_file():
        raise CheckpointError(
            f"--checkpoint {path}: expected {CHECKPOINT_FILE} in it (the official layout is hallo3/latest and "
            f"hallo3/<iteration>/{CHECKPOINT_FILE})."
        )
    return candidate


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The `module` state dict of a SAT/DeepSpeed file, memory-mapped; refuses any pickle that calls code."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (torch.save files are zip archives).")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: the zip archive is incomplete; the file is truncated (copy it again).")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError or ValueError for bad files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "Weights only load failed" in reason or isinstance(error, pickle.UnpicklingError):
            unsafe = _unsafe_globals(path)
            raise CheckpointError(
                f"{path}: refused to load: the pickle calls {unsafe or 'code'} that a plain checkpoint never holds."
            ) from None
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({reason}).") from None
    for wrapper in ("module", "state_dict"):  # DeepSpeed model states; a Lightning-style file (the SAT VAE)
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            return checkpoint[wrapper]
    if isinstance(checkpoint, dict) and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint  # a bare state dict, as SAT's inference-mode save writes it
    raise CheckpointError(f"{path}: no `module` state dict inside; this is not a SAT/DeepSpeed model-states file.")


def _unsafe_globals(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # the listing is only for the message
        return ""
    allowed = {"numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype", "builtins.frozenset"}
    return ", ".join(name for name in names if name not in allowed)


# --------------------------------------------------------------------------------------------------------------------
# Key mapping (architecture 10.3 and 10.4)

# Whole-tensor renames outside the layers, SAT name -> diffusers name (suffix .weight/.bias kept).
TOP_LEVEL_RENAMES = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "mixins.patch_embed.proj": "patch_embed.proj",
    "mixins.patch_embed.text_proj": "patch_embed.text_proj",
    "mixins.final_layer.norm_final": "norm_out.norm",
    "mixins.final_layer.linear": "proj_out",
    "mixins.final_layer.adaLN_modulation.1": "norm_out.linear",
    "transformer.final_layernorm": "norm_final",
}
# Renames inside `transformer.layers.{i}.`.
LAYER_RENAMES = {
    "input_layernorm": "norm1.norm",
    "attention.dense": "attn1.to_out.0",
    "post_attention_layernorm": "norm2.norm",
    "mlp.dense_h_to_4h": "ff.net.0.proj",
    "mlp.dense_4h_to_h": "ff.net.2",
    "face_input_layernorm": "norm_face",
    "face_attn.query": "attn_face.to_q",
    "face_attn.dense": "attn_face.to_out.0",
    "audio_input_layernorm": "norm_audio",
    "audio_attn.query": "attn_audio.to_q",
    "audio_attn.dense": "attn_audio.to_out.0",
}
# Fused projections: contiguous row blocks (not interleaved per head), in this order.
LAYER_SPLITS = {
    "attention.query_key_value": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "face_attn.key_value": ("attn_face.to_k", "attn_face.to_v"),
    "audio_attn.key_value": ("attn_audio.to_k", "attn_audio.to_v"),
}
# The 12 adaLN chunks: 0-2 video attention, 3-5 video MLP, 6-8 text attention, 9-11 text MLP (architecture 3.3).
NORM1_CHUNKS = (0, 1, 2, 6, 7, 8)
NORM2_CHUNKS = (3, 4, 5, 9, 10, 11)

LAYER_KEY = re.compile(r"transformer\.layers\.(\d+)\.(.+)\.(weight|bias)$")
ADALN_KEY = re.compile(r"mixins\.adaln_layer\.adaLN_modulations\.(\d+)\.1\.(weight|bias)$")
QK_NORM_KEY = re.compile(r"mixins\.adaln_layer\.(query|key)_layernorm_list\.(\d+)\.(weight|bias)$")
PARAM_KEY = re.compile(r"(.+)\.(weight|bias)$")


def convert_key(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One official tensor (network prefix removed) -> its diffusers tensors. Raises KeyError for unknown names."""
    if name == "mixins.pos_embed.pos_embedding":
        return [("patch_embed.pos_embedding", tensor)]
    if match := LAYER_KEY.fullmatch(name):
        index, module, param = match.groups()
        prefix = f"transformer_blocks.{index}."
        if module in LAYER_RENAMES:
            return [(f"{prefix}{LAYER_RENAMES[module]}.{param}", tensor)]
        if module in LAYER_SPLITS:
            targets = LAYER_SPLITS[module]
            return [(f"{prefix}{target}.{param}", chunk) for target, chunk in zip(targets, tensor.chunk(len(targets)))]
    elif match := ADALN_KEY.fullmatch(name):
        index, param = match.groups()
        chunks = tensor.chunk(12)
        return [
            (f"transformer_blocks.{index}.norm1.linear.{param}", torch.cat([chunks[i] for i in NORM1_CHUNKS])),
            (f"transformer_blocks.{index}.norm2.linear.{param}", torch.cat([chunks[i] for i in NORM2_CHUNKS])),
        ]
    elif match := QK_NORM_KEY.fullmatch(name):
        kind, index, param = match.groups()
        return [(f"transformer_blocks.{index}.attn1.norm_{kind[0]}.{param}", tensor)]
    elif match := PARAM_KEY.fullmatch(name):
        module, param = match.groups()
        if module in TOP_LEVEL_RENAMES:
            return [(f"{TOP_LEVEL_RENAMES[module]}.{param}", tensor)]
        for sat, ours in (("transformer.audio_proj.", "audio_proj."), ("transformer.face_proj.", "face_proj.")):
            if module.startswith(sat):
                return [(f"{ours}{module[len(sat) :]}.{param}", tensor)]
    raise KeyError(name)


# --------------------------------------------------------------------------------------------------------------------
# Architecture from tensor shapes (+ an optional official config for what shapes cannot tell)


def read_official_config(path: Path | None) -> dict:
    """`network_config.params` of an official yaml/json config (or the fixtures' config.json), flattened."""
    if path is None:
        return {}
    if path.is_file() and path.stat().st_size > JSON_MAX_BYTES:
        raise CheckpointError(f"--config {path}: larger than {JSON_MAX_BYTES:,} bytes; not a model config.")
    try:
        config = yaml.safe_load(path.read_text())  # JSON is YAML
    except (OSError, yaml.YAMLError) as error:
        raise CheckpointError(f"--config {path}: cannot be read as YAML or JSON ({error}).") from None
    model = config.get("model", config) if isinstance(config, dict) else None
    params = ((model or {}).get("network_config") or {}).get("params")
    if not isinstance(params, dict):
        raise CheckpointError(f"--config {path}: no model.network_config.params (the official config layout).")
    flat = dict(params)
    flat.update(params.get("transformer_args") or {})
    for module in (params.get("modules") or {}).values():
        flat.update((module or {}).get("params") or {})
    overrides = config.get("not_configurable_in_yaml_overridden_by_harness", {}) if isinstance(config, dict) else {}
    flat.update({f"audio_proj.{k}": v for k, v in (overrides.get("AudioProjModel_ctor") or {}).items()})
    return flat


def infer_config(shapes: dict[str, torch.Size], official: dict, with_hallo3_modules: bool) -> dict:
    """diffusers config of one network from its tensor shapes (names without the network prefix)."""
    hidden = shapes["mixins.patch_embed.proj.weight"][0]
    head_dim = shapes["mixins.adaln_layer.query_layernorm_list.0.weight"][0]
    patch = shapes["mixins.patch_embed.proj.weight"][-1]
    num_layers = 1 + max(int(m.group(1)) for k in shapes if (m := LAYER_KEY.fullmatch(k)))
    pos_rows = shapes["mixins.pos_embed.pos_embedding"][1]

    # The latent grid: freqs tables (if saved) give the video token count; frames and aspect default to the
    # official 49 frames (13 latent) at 2:3. The RoPE check in `convert` verifies the guess against the tables.
    frames = official.get("num_frames", 49)
    compression = official.get("time_compressed_rate", 4)
    latent_frames = (frames - 1) // compression + 1
    if "text_length" in official:
        text_len = official["text_length"]
    elif "mixins.pos_embed.freqs_cos" in shapes:
        text_len = pos_rows - shapes["mixins.pos_embed.freqs_cos"][0]
    else:
        text_len = 226
    tokens_per_frame, rest = divmod(pos_rows - text_len, latent_frames)
    if "latent_height" in official and "latent_width" in official:
        height, width = official["latent_height"], official["latent_width"]
    else:
        grid_h = round(math.sqrt(tokens_per_frame * 2 / 3))
        height, width = grid_h * patch, (tokens_per_frame // max(grid_h, 1)) * patch
    if rest or (height // patch) * (width // patch) != tokens_per_frame:
        raise CheckpointError(
            f"pos_embedding has {pos_rows} rows, which is not {text_len} text + {latent_frames} frames of a latent "
            f"grid; pass --config with latent_height, latent_width, num_frames and text_length."
        )

    config = {
        "num_attention_heads": hidden // head_dim,
        "attention_head_dim": head_dim,
        "in_channels": shapes["mixins.patch_embed.proj.weight"][1],
        "out_channels": shapes["mixins.final_layer.linear.weight"][0] // (patch * patch),
        "time_embed_dim": shapes["time_embed.0.weight"][0],
        "text_embed_dim": shapes["mixins.patch_embed.text_proj.weight"][1],
        "num_layers": num_layers,
        "sample_width": width,
        "sample_height": height,
        "sample_frames": frames,
        "patch_size": patch,
        "temporal_compression_ratio": compression,
        "max_text_seq_length": text_len,
        "ff_inner_dim": shapes["transformer.layers.0.mlp.dense_h_to_4h.weight"][0],
    }
    if with_hallo3_modules:
        face_proj, face_norm = shapes["transformer.face_proj.proj.weight"], shapes["transformer.face_proj.norm.weight"]
        config.update(
            face_embed_dim=face_proj[1], face_hidden_size=face_norm[0], num_face_tokens=face_proj[0] // face_norm[0]
        )
        config["add_audio_module"] = "transformer.audio_proj.proj1.weight" in shapes
        if config["add_audio_module"]:
            window = official.get("audio_proj.seq_len", 5)
            num_wav2vec_layers = official.get("audio_proj.blocks", 12)
            proj1, proj3 = shapes["transformer.audio_proj.proj1.weight"], shapes["transformer.audio_proj.proj3.weight"]
            audio_hidden = shapes["transformer.audio_proj.norm.weight"][0]
            config.update(
                audio_window=window,
                audio_num_layers=num_wav2vec_layers,
                audio_channels=proj1[1] // (window * num_wav2vec_layers),
                audio_intermediate_dim=proj1[0],
                audio_hidden_size=audio_hidden,
                num_audio_tokens=proj3[0] // audio_hidden,
            )

    # Shapes win; a config that contradicts them describes another model.
    for ours, theirs in (
        ("num_layers", "num_layers"),
        ("in_channels", "in_channels"),
        ("patch_size", "patch_size"),
        ("time_embed_dim", "time_embed_dim"),
        ("attention_head_dim", "hidden_size_head"),
        ("text_embed_dim", "text_hidden_size"),
        ("out_channels", "out_channels"),
    ):
        if theirs in official and official[theirs] != config[ours]:
            raise CheckpointError(
                f"--config says {theirs}={official[theirs]} but the checkpoint tensors give {config[ours]}; the "
                f"config belongs to another model."
            )
    if "hidden_size" in official and official["hidden_size"] != hidden:
        raise CheckpointError(f"--config says hidden_size={official['hidden_size']}, the checkpoint has {hidden}.")
    return config


# --------------------------------------------------------------------------------------------------------------------
# Writing shards as they fill


class ShardWriter:
    """Collects tensors and writes a safetensors shard whenever `max_shard_bytes` would be exceeded."""

    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, self.folder / f"shard-{len(self.shards):05d}.tmp", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Name the shards diffusers-style and write the index; returns every written key."""
        self.flush()
        count = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = WEIGHTS_NAME if count == 1 else f"diffusion_pytorch_model-{i + 1:05d}-of-{count:05d}.safetensors"
            (self.folder / f"shard-{i:05d}.tmp").rename(self.folder / final)
            weight_map.update({name: final for name in names})
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return list(weight_map)


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?B)", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"a size like 2GB or 500MB, got {text!r}")
    return int(float(match.group(1)) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[match.group(2)])


# --------------------------------------------------------------------------------------------------------------------
# Conversion


def split_networks(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict, list[str]]:
    """Denoiser and reference tensors without their prefixes, plus the ignored engine keys."""
    denoiser, reference, ignored, unknown = {}, {}, [], []
    for key, tensor in state_dict.items():
        if key.startswith(DENOISER_PREFIX):
            denoiser[key[len(DENOISER_PREFIX) :]] = tensor
        elif key.startswith(REFERENCE_PREFIX):
            reference[key[len(REFERENCE_PREFIX) :]] = tensor
        elif key.startswith(IGNORED_PREFIXES):
            ignored.append(key)
        else:
            unknown.append(key)
    if not denoiser:
        raise CheckpointError(
            f"no {DENOISER_PREFIX}* tensors: this is not an official Hallo3/CogVideoX SAT checkpoint "
            f"(first keys: {', '.join(list(state_dict)[:3]) or 'none'})."
        )
    if "transformer.face_proj.proj.weight" not in denoiser:
        raise CheckpointError(
            "the denoiser has no face modules (transformer.face_proj): this is a stock CogVideoX "
            "checkpoint, not Hallo3. Load its diffusers release as the stage-1 starting point."
        )
    if not reference:
        raise CheckpointError(f"no {REFERENCE_PREFIX}* tensors: the Hallo3 reference network is missing.")
    if unknown:
        raise CheckpointError(f"unexpected top-level keys {unknown[:5]}: this is not a Hallo3 engine checkpoint.")
    return denoiser, reference, ignored


def check_rope_tables(network: dict[str, torch.Tensor], config: dict) -> None:
    """The saved RoPE tables must equal ours at the inferred latent grid; this checks the grid guess."""
    if "mixins.pos_embed.freqs_cos" not in network:
        return
    p = config["patch_size"]
    latent_frames = (config["sample_frames"] - 1) // config["temporal_compression_ratio"] + 1
    cos, sin = get_3d_rotary_emb(
        config["attention_head_dim"], latent_frames, config["sample_height"] // p, config["sample_width"] // p
    )
    saved_cos, saved_sin = network["mixins.pos_embed.freqs_cos"], network["mixins.pos_embed.freqs_sin"]
    if saved_cos.shape != cos.shape or not (
        torch.allclose(saved_cos.float(), cos, atol=1e-2) and torch.allclose(saved_sin.float(), sin, atol=1e-2)
    ):
        raise CheckpointError(
            f"the saved RoPE tables do not match a {latent_frames}x{config['sample_height'] // p}x"
            f"{config['sample_width'] // p} token grid; pass --config with latent_height/latent_width/num_frames."
        )


def check_converted_config(config: dict, class_name: str, source: Path) -> None:
    """The configuration read from a checkpoint's shapes within `hallo3.model_files.CONFIG_LIMITS`, before anything
    (the meta model, the RoPE tables) is built from it."""
    try:
        check_config_values(config, class_name, f"the {class_name} configuration read from {source}")
    except ModelFileError as error:
        raise CheckpointError(str(error)) from None


def check_finite(tensor: torch.Tensor, name: str, source: Path) -> None:
    if has_non_finite(tensor):
        raise CheckpointError(f"{source}: tensor {name} holds NaN or infinite values; it is not converted.")


def convert_network(
    network: dict[str, torch.Tensor],
    model_cls: type[Hallo3Transformer3DModel] | type[Hallo3ReferenceNet],
    config: dict,
    folder: Path,
    max_shard_bytes: int,
    source: tuple[Path, str] | None = None,
) -> list[str]:
    """Stream one network into `folder`; returns the official keys that were deliberately left out. `source` (the
    checkpoint file and the network's key prefix) names a non-finite tensor."""
    with torch.device("meta"):
        model = model_cls.from_config(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    folder.mkdir(parents=True)
    model.save_config(folder)

    writer = ShardWriter(folder, max_shard_bytes)
    unused = []
    for name, tensor in network.items():
        if name in UNUSED_KEYS:
            unused.append(name)
            continue
        if source is not None:
            check_finite(tensor, source[1] + name, source[0])
        try:
            converted = convert_key(name, tensor)
        except KeyError:
            raise CheckpointError(f"unknown key {name!r}: the checkpoint is not a Hallo3 model.") from None
        for new_name, new_tensor in converted:
            if new_name not in expected:
                raise CheckpointError(f"{name} maps to {new_name}, which {model_cls.__name__} does not have.")
            if tuple(new_tensor.shape) != expected[new_name]:
                raise CheckpointError(
                    f"{name}: shape {tuple(new_tensor.shape)} does not fit {new_name} {expected[new_name]}."
                )
            writer.add(new_name, new_tensor)
    written = writer.finish()
    missing = sorted(set(expected) - set(written))
    if missing:
        raise CheckpointError(f"{model_cls.__name__} would miss {len(missing)} tensors, e.g. {missing[:3]}.")
    return unused


def convert(
    checkpoint: Path,
    output: Path,
    config_path: Path | None = None,
    max_shard_bytes: int = 2 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Convert an official checkpoint into `output/{transformer,reference_net}`; atomic."""
    checkpoint_file = resolve_checkpoint_file(checkpoint)
    if output.is_symlink():
        raise CheckpointError(f"--output {output} is a symbolic link; give the folder it points to, or a new one.")
    if output.exists() and not overwrite and any(output.iterdir() if output.is_dir() else [output]):
        raise CheckpointError(f"--output {output} already exists; choose a new folder or pass --overwrite.")
    official = read_official_config(config_path)
    state_dict = load_state_dict(checkpoint_file)
    denoiser, reference, ignored = split_networks(state_dict)
    if ignored:
        logger.info("Ignored %d frozen engine tensors (first_stage_model.*, conditioner.*).", len(ignored))

    try:
        denoiser_config = infer_config({k: v.shape for k, v in denoiser.items()}, official, with_hallo3_modules=True)
        reference_config = infer_config(
            {k: v.shape for k, v in reference.items()}, official, with_hallo3_modules=False
        )
    except CheckpointError:
        raise
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as error:
        raise CheckpointError(
            f"the architecture cannot be read from the tensor shapes ({type(error).__name__}: {error}); pass "
            f"--config with the official yaml of this checkpoint."
        ) from None
    check_converted_config(denoiser_config, Hallo3Transformer3DModel.__name__, checkpoint_file)
    check_converted_config(reference_config, Hallo3ReferenceNet.__name__, checkpoint_file)
    check_rope_tables(denoiser, denoiser_config)

    with staging_folder(output, STAGING_SUFFIX) as staging:
        for label, network, model_cls, config, prefix in (
            ("transformer", denoiser, Hallo3Transformer3DModel, denoiser_config, DENOISER_PREFIX),
            ("reference_net", reference, Hallo3ReferenceNet, reference_config, REFERENCE_PREFIX),
        ):
            unused = convert_network(
                network, model_cls, config, staging / label, max_shard_bytes, (checkpoint_file, prefix)
            )
            logger.info(
                "%s: %d tensors written; unused official keys left out: %s",
                label,
                len(network) - len(unused),
                ", ".join(unused) or "none",
            )
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        staging.rename(output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="official hallo3 folder (with `latest`) or its mp_rank_00_model_states.pt",
    )
    parser.add_argument("--output", type=Path, required=True, help="new folder for transformer/ and reference_net/")
    parser.add_argument("--config", type=Path, help="official yaml/json config, for what tensor shapes cannot tell")
    parser.add_argument("--max-shard-size", type=parse_size, default="2GB", help="largest safetensors shard")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    return run_conversion(
        lambda: convert(args.checkpoint, args.output, args.config, args.max_shard_size, args.overwrite)
    )


def run_conversion(write: Callable[[], Path]) -> int:
    """A converter's CLI rules around `write`: a bad checkpoint is one line and exit 2; SIGINT, SIGTERM and SIGHUP
    stop it cleanly (its staging folder is removed) with exit 128 + the signal."""
    try:
        with stop_on_signals():
            output = write()
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupted:
        reason = f"stopped by {interrupted.signal_name}" if isinstance(interrupted, Interrupted) else "interrupted"
        print(f"error: {reason}; nothing was written.", file=sys.stderr)
        return interrupted.exit_code if isinstance(interrupted, Interrupted) else 130
    logger.info("Wrote %s", output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
