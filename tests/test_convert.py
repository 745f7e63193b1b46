"""SAT -> diffusers conversion: numerics of the key mapping, safe loading, errors that leave nothing behind."""

import collections
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hallo3 import Hallo3ReferenceNet, Hallo3Transformer3DModel
from hallo3.convert_sat_checkpoint import CheckpointError, convert, infer_config, main, read_official_config

from .conftest import FIXTURE_A


CHECKPOINT = FIXTURE_A / "checkpoint"
STATES = CHECKPOINT / "1" / "mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def official():
    return torch.load(STATES, weights_only=True, map_location="cpu")["module"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert(CHECKPOINT, tmp_path_factory.mktemp("conv") / "out", FIXTURE_A / "config.json")


def save_engine(tmp_path: Path, module: dict, **bookkeeping) -> Path:
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": module, **bookkeeping}, path)
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_converted_folders_load_strictly(converted):
    # from_pretrained's default path raises on any missing or unexpected key
    transformer = Hallo3Transformer3DModel.from_pretrained(converted / "transformer")
    reference_net = Hallo3ReferenceNet.from_pretrained(converted / "reference_net")
    assert transformer.config.num_layers == 2 and transformer.config.attention_head_dim == 32
    assert transformer.config.sample_height == 8 and transformer.config.sample_width == 12
    assert transformer.config.max_text_seq_length == 8 and transformer.config.num_audio_tokens == 4
    assert len(reference_net.transformer_blocks) == 2


def test_fused_projections_are_split_in_row_blocks(converted, official):
    weights = load_file(converted / "transformer" / "diffusion_pytorch_model.safetensors")
    qkv = official["model.diffusion_model.transformer.layers.1.attention.query_key_value.weight"]
    assert torch.equal(weights["transformer_blocks.1.attn1.to_q.weight"], qkv[:64])
    assert torch.equal(weights["transformer_blocks.1.attn1.to_k.weight"], qkv[64:128])
    assert torch.equal(weights["transformer_blocks.1.attn1.to_v.weight"], qkv[128:])
    kv = official["model.diffusion_model.transformer.layers.0.audio_attn.key_value.bias"]
    assert torch.equal(weights["transformer_blocks.0.attn_audio.to_k.bias"], kv[:64])
    assert torch.equal(weights["transformer_blocks.0.attn_audio.to_v.bias"], kv[64:])


def test_adaln_chunks_are_regrouped_video_then_text(converted, official):
    weights = load_file(converted / "reference_net" / "diffusion_pytorch_model.safetensors")
    chunks = official["ref_model.diffusion_model.mixins.adaln_layer.adaLN_modulations.0.1.weight"].chunk(12)
    norm1 = weights["transformer_blocks.0.norm1.linear.weight"].chunk(6)
    norm2 = weights["transformer_blocks.0.norm2.linear.weight"].chunk(6)
    for ours, theirs in zip(norm1, [chunks[i] for i in (0, 1, 2, 6, 7, 8)]):
        assert torch.equal(ours, theirs)
    for ours, theirs in zip(norm2, [chunks[i] for i in (3, 4, 5, 9, 10, 11)]):
        assert torch.equal(ours, theirs)


def test_shapes_alone_give_the_same_architecture(official):
    """Without a config the latent grid comes from the RoPE tables and the official 2:3 aspect."""
    shapes = {k[len("model.diffusion_model.") :]: v.shape for k, v in official.items() if k.startswith("model.")}
    from_shapes = infer_config(shapes, {}, with_hallo3_modules=True)
    with_config = infer_config(shapes, read_official_config(FIXTURE_A / "config.json"), with_hallo3_modules=True)
    assert from_shapes == with_config


def test_deepspeed_bookkeeping_loads_and_frozen_models_are_ignored(tmp_path, official):
    module = dict(official)
    module["first_stage_model.encoder.conv_in.weight"] = torch.zeros(2)
    module["conditioner.embedders.0.transformer.shared.weight"] = torch.zeros(2)
    path = save_engine(
        tmp_path,
        module,
        buffer_names=["model.diffusion_model.mixins.pos_embed.freqs_sin"],
        param_shapes=[collections.OrderedDict(a=torch.Size([2, 3]))],
        sparse_tensor_module_names=set(),
        frozen_param_fragments=frozenset(),
        ds_config={"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}},
        ds_version="0.14.4",
        global_steps=np.int64(30000),
        random_rng_state=random.getstate(),
        np_rng_state=np.random.get_state(),
        torch_rng_state=torch.get_rng_state(),
        iteration=1,
    )
    out = convert(path, tmp_path / "out")
    assert leftovers(out) == ["reference_net", "transformer"]


def test_pickled_code_is_refused_and_never_runs(tmp_path, official):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = save_engine(tmp_path, dict(official), client_state=Payload())
    with pytest.raises(CheckpointError, match="refused to load.*posix.system|refused to load"):
        convert(path, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda d: d.joinpath("notes.txt").write_text("hello") and d / "notes.txt", "not a PyTorch checkpoint"),
        (lambda d: d.joinpath("cut.pt").write_bytes(STATES.read_bytes()[:100_000]) and d / "cut.pt", "truncated"),
        (lambda d: d, "expected mp_rank_00_model_states.pt"),
        (lambda d: d / "missing.pt", "no such file"),
    ],
    ids=["text-file", "truncated", "folder-without-checkpoint", "missing"],
)
def test_bad_inputs_get_one_line_errors_and_leave_nothing(tmp_path, make_input, message, capsys):
    source = tmp_path / "input"
    source.mkdir()
    checkpoint = make_input(source)
    code = main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert leftovers(tmp_path) == ["input"]


def test_a_stock_cogvideox_checkpoint_is_named_as_such(tmp_path, official):
    stock = {k: v for k, v in official.items() if k.startswith("model.") and "face" not in k and "audio" not in k}
    with pytest.raises(CheckpointError, match="stock CogVideoX"):
        convert(save_engine(tmp_path, stock), tmp_path / "out")
    assert leftovers(tmp_path) == ["mp_rank_00_model_states.pt"]


def test_a_contradicting_config_is_rejected(tmp_path):
    config = json.loads((FIXTURE_A / "config.json").read_text())
    config["model"]["network_config"]["params"]["num_layers"] = 42
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="num_layers=42"):
        convert(CHECKPOINT, tmp_path / "out", tmp_path / "config.json")


def test_a_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    from hallo3 import convert_sat_checkpoint

    real_flush = convert_sat_checkpoint.ShardWriter.flush
    calls = []

    def failing_flush(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C between shards
        real_flush(self)

    monkeypatch.setattr(convert_sat_checkpoint.ShardWriter, "flush", failing_flush)
    with pytest.raises(KeyboardInterrupt):
        convert(CHECKPOINT, tmp_path / "out", max_shard_bytes=100_000)
    assert leftovers(tmp_path) == []


def test_small_shards_write_an_index_that_loads(tmp_path):
    out = convert(CHECKPOINT, tmp_path / "out", max_shard_bytes=200_000)
    index = json.loads((out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((out / "transformer" / s).is_file() for s in shards)
    Hallo3Transformer3DModel.from_pretrained(out / "transformer")


def test_existing_output_is_not_overwritten_by_accident(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["--checkpoint", str(CHECKPOINT), "--output", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_cli_lists_the_unused_official_keys(tmp_path, caplog):
    caplog.set_level("INFO", logger="hallo3.convert")
    assert main(["--checkpoint", str(CHECKPOINT), "--output", str(tmp_path / "out")]) == 0
    lines = [r.getMessage() for r in caplog.records if "unused official keys" in r.getMessage()]
    assert len(lines) == 2
    for key in ("freqs_sin", "freqs_cos", "transformer.position_embeddings.weight"):
        assert all(key in line for line in lines)


def to_official_layout(model: Hallo3Transformer3DModel, reference: Hallo3ReferenceNet) -> dict:
    """Our weights in the official SAT key layout, written plainly from architecture 10 (the inverse of the
    converter), with the RoPE buffers and the unused position table the official file carries."""
    from hallo3.transformer_hallo3 import get_3d_rotary_emb

    def network(net, prefix, hallo3: bool) -> dict:
        c, sd, out = net.config, net.state_dict(), {}
        renames = {
            "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2",
            "patch_embed.proj": "mixins.patch_embed.proj",
            "patch_embed.text_proj": "mixins.patch_embed.text_proj",
            "norm_out.norm": "mixins.final_layer.norm_final",
            "proj_out": "mixins.final_layer.linear",
            "norm_out.linear": "mixins.final_layer.adaLN_modulation.1",
            "norm_final": "transformer.final_layernorm",
        }
        for ours, theirs in renames.items():
            for p in ("weight", "bias"):
                out[f"{prefix}{theirs}.{p}"] = sd[f"{ours}.{p}"]
        out[f"{prefix}mixins.pos_embed.pos_embedding"] = sd["patch_embed.pos_embedding"]
        frames = (c.sample_frames - 1) // c.temporal_compression_ratio + 1
        cos, sin = get_3d_rotary_emb(c.attention_head_dim, frames, c.sample_height // 2, c.sample_width // 2)
        out[f"{prefix}mixins.pos_embed.freqs_cos"], out[f"{prefix}mixins.pos_embed.freqs_sin"] = cos, sin
        out[f"{prefix}transformer.position_embeddings.weight"] = torch.zeros(
            64, c.num_attention_heads * c.attention_head_dim
        )
        for i in range(c.num_layers):
            b, layer = f"transformer_blocks.{i}.", f"{prefix}transformer.layers.{i}."
            for p in ("weight", "bias"):
                out[f"{layer}attention.query_key_value.{p}"] = torch.cat([sd[f"{b}attn1.to_{x}.{p}"] for x in "qkv"])
                n1, n2 = sd[f"{b}norm1.linear.{p}"].chunk(6), sd[f"{b}norm2.linear.{p}"].chunk(6)
                out[f"{prefix}mixins.adaln_layer.adaLN_modulations.{i}.1.{p}"] = torch.cat(
                    [*n1[:3], *n2[:3], *n1[3:], *n2[3:]]
                )
                out[f"{prefix}mixins.adaln_layer.query_layernorm_list.{i}.{p}"] = sd[f"{b}attn1.norm_q.{p}"]
                out[f"{prefix}mixins.adaln_layer.key_layernorm_list.{i}.{p}"] = sd[f"{b}attn1.norm_k.{p}"]
                simple = {
                    "input_layernorm": "norm1.norm",
                    "attention.dense": "attn1.to_out.0",
                    "post_attention_layernorm": "norm2.norm",
                    "mlp.dense_h_to_4h": "ff.net.0.proj",
                    "mlp.dense_4h_to_h": "ff.net.2",
                }
                if hallo3:
                    simple.update(
                        {
                            "face_input_layernorm": "norm_face",
                            "face_attn.query": "attn_face.to_q",
                            "face_attn.dense": "attn_face.to_out.0",
                            "audio_input_layernorm": "norm_audio",
                            "audio_attn.query": "attn_audio.to_q",
                            "audio_attn.dense": "attn_audio.to_out.0",
                        }
                    )
                    for kind in ("face", "audio"):
                        out[f"{layer}{kind}_attn.key_value.{p}"] = torch.cat(
                            [sd[f"{b}attn_{kind}.to_k.{p}"], sd[f"{b}attn_{kind}.to_v.{p}"]]
                        )
                for theirs, ours in simple.items():
                    out[f"{layer}{theirs}.{p}"] = sd[f"{b}{ours}.{p}"]
        if hallo3:
            for name, tensor in sd.items():
                if name.startswith(("audio_proj.", "face_proj.")):
                    out[f"{prefix}transformer.{name}"] = tensor
        return out

    return {
        **network(model, "model.diffusion_model.", True),
        **network(reference, "ref_model.diffusion_model.", False),
    }


@torch.no_grad()
def test_other_sizes_and_head_dims_convert_to_the_same_network(tmp_path):
    """Fixtures come in other sizes: head dim 64, 3 layers, another latent grid, other audio/face widths."""
    config = dict(
        num_attention_heads=2,
        attention_head_dim=64,
        time_embed_dim=48,
        text_embed_dim=40,
        num_layers=3,
        sample_height=10,
        sample_width=14,
        max_text_seq_length=6,
    )
    torch.manual_seed(5)
    model = Hallo3Transformer3DModel(
        **config,
        face_hidden_size=56,
        num_face_tokens=2,
        audio_channels=20,
        audio_intermediate_dim=48,
        audio_hidden_size=36,
        num_audio_tokens=3,
    ).eval()
    reference = Hallo3ReferenceNet(**config).eval()
    for parameter in [*model.parameters(), *reference.parameters()]:
        parameter.normal_(0, 0.1)
    official = {
        "model": {
            "network_config": {
                "params": {
                    "latent_height": 10,
                    "latent_width": 14,
                    "num_frames": 49,
                    "time_compressed_rate": 4,
                    "modules": {"pos_embed_config": {"params": {"text_length": 6}}},
                }
            }
        }
    }
    (tmp_path / "config.json").write_text(json.dumps(official))
    torch.save({"module": to_official_layout(model, reference)}, tmp_path / "mp_rank_00_model_states.pt")
    out = convert(tmp_path / "mp_rank_00_model_states.pt", tmp_path / "out", tmp_path / "config.json")
    converted = Hallo3Transformer3DModel.from_pretrained(out / "transformer").eval()
    converted_reference = Hallo3ReferenceNet.from_pretrained(out / "reference_net").eval()
    assert converted.config.num_audio_tokens == 3 and converted.config.face_hidden_size == 56

    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 1, 16, 10, 14, generator=g)
    text = torch.randn(2, 6, 40, generator=g)
    bank = reference(latent, text[:1], 0.0)
    assert all(torch.equal(a, b) for a, b in zip(converted_reference(latent, text[:1], 0.0), bank))
    inputs = dict(
        hidden_states=torch.randn(2, 13, 32, 10, 14, generator=g),
        encoder_hidden_states=text,
        timestep=torch.tensor([300.0, 300.0]),
        reference_hidden_states=bank,
        face_embeds=torch.randn(2, 512, generator=g),
        audio_embeds=torch.randn(2, 49, 5, 12, 20, generator=g),
    )
    assert torch.equal(converted(**inputs).sample, model(**inputs).sample)
