"""Hostile model files: every read is bounded before memory is allocated (hallo3.model_files, hallo3.lora).

Each case is a small file that asks for far more than it holds, or that disagrees with the weights beside it. The
refusal is one line naming the file and the rule. The cases that would allocate gigabytes without the checks also run
in a subprocess under an address-space limit, where the peak memory is measured against a bare import.
"""

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from hallo3.convert_sat_checkpoint import load_state_dict
from hallo3.convert_sat_checkpoint import main as convert_main
from hallo3.convert_sat_vae import main as convert_vae_main
from hallo3.loading import ModelSourceError, build_tiny_random_pipeline, load_pipeline
from hallo3.model_files import ModelFileError, has_non_finite
from hallo3.pipeline_hallo3 import Hallo3Pipeline

from .conftest import ASSETS, FIXTURE_A
from .official_layout import tiny_sat_vae


REPO = Path(__file__).parent.parent
GB = 2**30
ADDRESS_SPACE_LIMIT = 4 * GB  # the subprocesses' RLIMIT_AS: a refusal that tried to allocate GBs fails instead
CPU_SECONDS_LIMIT = 600  # and their RLIMIT_CPU: one that loops over a billion layers is stopped, not waited for
WEIGHTS = "diffusion_pytorch_model.safetensors"


# --------------------------------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory) -> Path:
    """The tiny-random pipeline saved as a folder (model_index.json + every component)."""
    folder = tmp_path_factory.mktemp("saved") / "model"
    build_tiny_random_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture
def model(saved_pipeline, tmp_path) -> Path:
    """A copy of the saved pipeline for one test to damage."""
    return Path(shutil.copytree(saved_pipeline, tmp_path / "model"))


def edit_json(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def refusal(folder: Path) -> str:
    """The one-line `ModelSourceError` of loading `folder`."""
    with pytest.raises(ModelSourceError) as error:
        load_pipeline(str(folder), torch_dtype=torch.float32)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"--model {folder}: cannot be loaded")
    return message


def write_safetensors(path: Path, header: dict, data: bytes = b"", header_length: int | None = None) -> Path:
    """A safetensors file written byte by byte: an 8-byte little-endian header length, the JSON header, the data."""
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded) if header_length is None else header_length) + encoded + data)
    return path


def speech(path: Path, seconds: float = 1.0) -> Path:
    t = np.arange(int(16000 * seconds)) / 16000
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)
    return path


def run_bounded(argv: list[str], cwd: Path) -> tuple[int, str, float, float]:
    """Run `argv` under `ADDRESS_SPACE_LIMIT` and `CPU_SECONDS_LIMIT`; (exit code, stderr, peak RSS in GB, seconds)."""

    def limit_address_space() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
        resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS_LIMIT, CPU_SECONDS_LIMIT))

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
        preexec_fn=limit_address_space,
    )  # fmt: skip
    assert process.stderr is not None
    err = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)  # this child's own peak memory (ru_maxrss is in KB on Linux)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, err, usage.ru_maxrss / 2**20, time.perf_counter() - started


@pytest.fixture(scope="module")
def import_rss() -> float:
    """Peak RSS (GB) of a process that only imports the CLI: the baseline the refusals are measured against."""
    code, err, rss, _ = run_bounded([sys.executable, "-c", "import hallo3.inference"], REPO)
    assert code == 0, err
    return rss


def assert_one_line_error(code: int, err: str, message: str) -> None:
    """Exit 2 and one `error:` line with the message (loading progress bars may come before it), no traceback."""
    assert code == 2, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and message in errors[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]


# --------------------------------------------------------------------------------------------------------------------
# Sizes in a config


@pytest.mark.parametrize(
    "component, file, changes, message",
    [
        ("transformer", "config.json", {"num_layers": 10**9}, "num_layers = 1000000000 is outside 1..256"),
        ("transformer", "config.json", {"attention_head_dim": 0}, "attention_head_dim = 0 is outside 1..512"),
        ("reference_net", "config.json", {"sample_width": 10**6}, "sample_width = 1000000 is outside 1..512"),
        ("transformer", "config.json", {"norm_eps": float("nan")}, "norm_eps is nan; numbers in a config must be"),
        ("vae", "config.json", {"block_out_channels": [8, 8, 8, 10**7]}, "block_out_channels = 10000000 is outside"),
        (
            "vae",
            "config.json",
            {"up_block_types": ["CogVideoXUpBlock3D"] * 1000},
            "up_block_types has 1,000 entries; at most 64",
        ),
        ("text_encoder", "config.json", {"d_model": 10**7}, "d_model = 10000000 is outside 1..16,384"),
        ("text_encoder", "config.json", {"vocab_size": 2**40}, "vocab_size = 1099511627776 is beyond 16,777,216"),
        ("audio_encoder", "config.json", {"num_hidden_layers": 10**9}, "num_hidden_layers = 1000000000 is outside"),
        ("audio_encoder", "config.json", {"conv_kernel": [10**8] * 7}, "conv_kernel = 100000000 is outside 1..1,024"),
        (
            "scheduler",
            "scheduler_config.json",
            {"num_train_timesteps": 10**12},
            "num_train_timesteps = 1000000000000 is outside 1..100,000",
        ),
        (
            "audio_feature_extractor",
            "preprocessor_config.json",
            {"sampling_rate": 10**12},
            "sampling_rate = 1000000000000 is outside 1..192,000",
        ),
    ],
)
def test_config_sizes_out_of_bounds_are_refused(model, component, file, changes, message):
    edit_json(model / component / file, **changes)
    assert f"{model / component / file}: {message}" in refusal(model)


def test_a_config_file_is_read_only_up_to_its_limit(model):
    path = model / "transformer" / "config.json"
    path.write_text(path.read_text()[:-1] + " " * (2 << 20) + "}")  # valid JSON, 2 MB of spaces
    found = refusal(model)
    assert f"{path}: 2,09" in found and "bytes, more than the 1,048,576 a file of its kind may have" in found


def test_deeply_nested_json_is_refused(model):
    path = model / "vae" / "config.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert f"{path}: not valid JSON" in refusal(model)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"transformer": ["diffusers", "UNet2DConditionModel"]}, "a Hallo3 pipeline's transformer is a Hallo3Trans"),
        ({"unet": ["diffusers", "UNet2DConditionModel"]}, "'unet' is not a component of a Hallo3 pipeline"),
    ],
)
def test_model_index_names_only_hallo3_components(model, changes, message):
    edit_json(model / "model_index.json", **changes)
    assert message in refusal(model)


# --------------------------------------------------------------------------------------------------------------------
# A config against its weights: an error, not a warning about missing or unused tensors


@pytest.mark.parametrize(
    "component, changes, message",
    [
        (
            "transformer",
            {"num_layers": 3},
            "the config builds 3 transformer_blocks (num_layers = 3), the weights hold 2",
        ),
        (
            "transformer",
            {"num_layers": 1},
            "the config builds 1 transformer_blocks (num_layers = 1), the weights hold 2",
        ),
        (
            "reference_net",
            {"num_layers": 3},
            "the config builds 3 transformer_blocks (num_layers = 3), the weights hold 2",
        ),
        ("transformer", {"attention_head_dim": 16}, "is [64] in the weights, the config makes it [32]"),
        ("transformer", {"num_audio_tokens": 8}, "tensor audio_proj.conv1.bias is [96] in the weights, the config"),
        ("vae", {"layers_per_block": 2}, "tensor decoder.up_blocks.0.resnets.2.conv1.conv.bias [8] is not in the"),
        ("vae", {"latent_channels": 8}, "in the weights, the config makes it"),
        ("text_encoder", {"num_layers": 2}, "the config builds 2 encoder.block (num_layers = 2), the weights hold 1"),
        ("text_encoder", {"d_ff": 128}, "is [64, 32] in the weights, the config makes it [128, 32]"),
        ("audio_encoder", {"num_hidden_layers": 3}, "the config builds 3 encoder.layers, the weights hold 2"),
        ("audio_encoder", {"hidden_size": 64}, "in the weights, the config makes it"),
    ],
)
def test_a_config_that_disagrees_with_its_weights_is_refused(model, component, changes, message):
    edit_json(model / component / "config.json", **changes)
    found = refusal(model)
    assert f"{model / component / 'config.json'} disagrees with the weights beside it (" in found
    assert message in found


def test_tensors_the_config_does_not_build_are_refused(model):
    path = model / "transformer" / WEIGHTS
    weights = load_file(path)
    weights["transformer_blocks.0.extra.weight"] = torch.zeros(3)
    save_file(weights, path)
    assert f"1 tensors the config does not build, e.g. transformer_blocks.0.extra.weight in {WEIGHTS}" in refusal(
        model
    )


def test_an_untouched_folder_loads_with_the_same_weights(saved_pipeline):
    """The checks pass a folder that is right: every tensor as saved."""
    pipeline = load_pipeline(str(saved_pipeline), torch_dtype=torch.float32).pipeline
    reference = build_tiny_random_pipeline()
    for name in ("transformer", "reference_net", "vae", "text_encoder", "audio_encoder"):
        loaded, built = getattr(pipeline, name).state_dict(), getattr(reference, name).state_dict()
        assert loaded.keys() == built.keys()
        assert all(torch.equal(loaded[key], built[key].to(loaded[key].dtype)) for key in built), name  # fp64 buffers


# --------------------------------------------------------------------------------------------------------------------
# Weight files that claim more than they hold; pickles


@pytest.mark.parametrize(
    "header, header_length, message",
    [
        (
            {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
            2**60,
            "its header claims 1,152,921,504,606,846,976 bytes, more than the file's",
        ),
        (
            {"x": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 2**42]}},
            None,
            "not a readable safetensors file (Error while deserializing header: incomplete metadata",
        ),
        (
            {"x": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}},
            None,
            "not a readable safetensors file (Error while deserializing header: overflow",
        ),
    ],
)
def test_a_safetensors_header_that_claims_too_much_is_refused(model, header, header_length, message):
    path = write_safetensors(model / "transformer" / WEIGHTS, header, b"\0" * 4, header_length)
    assert f"{path}: {message}" in refusal(model)


def test_a_shard_index_names_only_files_beside_it(model):
    (model / "transformer" / WEIGHTS).unlink()
    index = model / "transformer" / f"{WEIGHTS}.index.json"
    index.write_text(json.dumps({"weight_map": {"proj_out.weight": "../../../etc/passwd"}}))
    assert f"{index}: names the shard '../../../etc/passwd', which is not a file beside it" in refusal(model)


def test_pickled_code_in_a_bin_file_never_runs(model, tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    (model / "transformer" / WEIGHTS).unlink()
    torch.save(
        {"proj_out.weight": torch.zeros(1), "x": Payload()}, model / "transformer" / "diffusion_pytorch_model.bin"
    )
    assert "refused or unreadable as a weights-only torch file" in refusal(model)
    assert not (tmp_path / "ran").exists()


def test_a_bin_file_of_plain_tensors_loads_like_its_safetensors(model, saved_pipeline):
    """`.bin` weights are read with weights_only=True (shapes on the meta device), and load as diffusers loads them."""
    weights = load_file(model / "transformer" / WEIGHTS)
    (model / "transformer" / WEIGHTS).unlink()
    torch.save(weights, model / "transformer" / "diffusion_pytorch_model.bin")
    loaded = load_pipeline(str(model), torch_dtype=torch.float32).pipeline.transformer.state_dict()
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k].to(loaded[k].dtype)) for k in weights)


# --------------------------------------------------------------------------------------------------------------------
# Finite weights


@pytest.mark.parametrize(
    "component, file, tensor, value",
    [
        ("transformer", WEIGHTS, "transformer_blocks.1.attn1.to_v.weight", float("nan")),
        ("text_encoder", "model.safetensors", "encoder.block.0.layer.1.DenseReluDense.wi.weight", float("inf")),
    ],
)
def test_non_finite_weights_are_refused_naming_file_and_tensor(model, component, file, tensor, value):
    weights = load_file(model / component / file)
    weights[tensor][0, 0] = value
    save_file(weights, model / component / file)
    assert f"{model / component / file}: tensor {tensor} holds NaN or infinite values." in refusal(model)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_has_non_finite_agrees_with_an_element_wise_check(dtype):
    """The fast sum screen never misses a NaN or inf, and a sum that overflows (large finite values) is not
    mistaken for one: the answer is always that of torch.isfinite on every element."""
    big = torch.finfo(dtype).max / 2
    cases = [
        torch.randn(1000),
        torch.full((1000,), big),  # its sum overflows; every element is finite
        torch.tensor([1.0, float("nan"), 2.0]),
        torch.tensor([big, -big, float("inf")]),
        torch.tensor([float("inf"), float("-inf")]),  # the sum is NaN
        torch.tensor([]),
    ]
    for tensor in cases:
        tensor = tensor.to(dtype)
        assert has_non_finite(tensor) == (not bool(torch.isfinite(tensor).all())), tensor


# --------------------------------------------------------------------------------------------------------------------
# LoRA

LORA_RANK, LORA_ALPHA = 4, 8
LORA_TARGETS = ["to_q", "to_v"]
LORA_FILE = "pytorch_lora_weights.safetensors"
TO_Q = "transformer.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    """A LoRA of the tiny transformer made with PEFT and saved by the pipeline (random A and B, so it changes the
    weights); the folder holds pytorch_lora_weights.safetensors."""
    pipe = build_tiny_random_pipeline()
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, init_lora_weights=False)
    pipe.transformer.add_adapter(config)
    folder = tmp_path_factory.mktemp("lora")
    Hallo3Pipeline.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
        transformer_lora_adapter_metadata=pipe.transformer.peft_config["default"].to_dict(),
    )
    return folder


@pytest.fixture
def lora_pipeline():
    """A fresh tiny pipeline to offer a LoRA to; the tests check that a refusal added nothing to it."""
    pipe = build_tiny_random_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_lora(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(folder / LORA_FILE), framework="pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    return load_file(folder / LORA_FILE), metadata


def write_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"lora_adapter_metadata": json.dumps(metadata)} if metadata is not None else {}
    save_file(tensors, path, metadata={"format": "pt", **extra})
    return path


def test_a_lora_that_fits_loads_and_fuses_to_w_plus_scaled_ba(lora):
    """The plain LoRA formula: W' = W + lora_scale * alpha / r * B @ A, for every adapted module."""
    tensors, _ = read_lora(lora)
    pipe = build_tiny_random_pipeline()  # the same seed: the same base weights
    adapted = [name for name, _ in pipe.transformer.named_modules() if name.endswith((".to_q", ".to_v"))]
    assert {f"transformer.{name}.lora_A.weight" for name in adapted} <= tensors.keys()
    before = {name: pipe.transformer.get_submodule(name).weight.detach().clone() for name in adapted}
    pipe.load_lora_weights(lora, adapter_name="fits")
    pipe.fuse_lora(lora_scale=0.5)
    pipe.unload_lora_weights()
    for name, weight in before.items():
        a, b = tensors[f"transformer.{name}.lora_A.weight"], tensors[f"transformer.{name}.lora_B.weight"]
        expected = weight + 0.5 * LORA_ALPHA / LORA_RANK * (b @ a)
        torch.testing.assert_close(pipe.transformer.get_submodule(name).weight, expected)


def lora_case(case: str, tensors: dict[str, torch.Tensor], metadata: dict) -> tuple[dict, dict | None, str]:
    """One hostile variant of the good LoRA: (tensors, metadata, the expected message)."""
    a, b = f"{TO_Q}.lora_A.weight", f"{TO_Q}.lora_B.weight"
    if case == "config rank 10**7":  # PEFT would allocate A and B from this: 2 x 10**7 x 64 floats per module
        return tensors, {**metadata, "transformer.r": 10**7}, "the adapter config asks for rank 10000000 at"
    if case == "rank_pattern 10**7":
        pattern = {**metadata, "transformer.rank_pattern": {"transformer_blocks.0.attn1.to_q": 10**7}}
        return tensors, pattern, "asks for rank 10000000 at transformer.transformer_blocks.0.attn1.to_q"
    if case == "rank above the layer's":
        tensors = {**tensors, a: torch.zeros(65, 64), b: torch.zeros(64, 65)}
        pattern = {**metadata, "transformer.rank_pattern": {"transformer_blocks.0.attn1.to_q": 65}}
        return tensors, pattern, f"the LoRA of {TO_Q} has rank 65; {TO_Q} allows 1..64"
    if case == "A of another width":
        return {**tensors, a: torch.zeros(4, 32)}, metadata, f"the LoRA of {TO_Q} has A [4, 32] and B [64, 4]"
    if case == "B without A":
        return {k: v for k, v in tensors.items() if k != a}, metadata, f"the LoRA of {TO_Q} lacks its lora_A.weight"
    if case == "a layer the model lacks":
        moved = {k.replace("transformer_blocks.0.", "transformer_blocks.7."): v for k, v in tensors.items()}
        return moved, metadata, "the LoRA targets transformer.transformer_blocks.7.attn1.to_"
    if case == "a component the pipeline lacks":
        return {**tensors, "unet.down.lora_A.weight": torch.zeros(4, 4)}, metadata, "keys must start with `transf"
    if case == "not a LoRA tensor":
        return {**tensors, f"{TO_Q}.weight": torch.zeros(64, 64)}, metadata, f"tensor {TO_Q}.weight is not a LoRA"
    if case == "a LayerNorm":
        norm = {
            "transformer.norm_final.lora_A.weight": torch.zeros(4, 64),
            "transformer.norm_final.lora_B.weight": torch.zeros(64, 4),
        }
        return {**tensors, **norm}, metadata, "the LoRA adapts transformer.norm_final, a LayerNorm, not a Linear"
    if case == "alpha inf":
        return tensors, {**metadata, "transformer.lora_alpha": float("inf")}, "has lora_alpha inf, not finite"
    if case == "modules_to_save":
        return tensors, {**metadata, "transformer.modules_to_save": ["transformer_blocks"]}, "copies whole modules"
    if case == "NaN in B":
        return {**tensors, b: torch.full_like(tensors[b], float("nan"))}, metadata, f"tensor {b} holds NaN or infinite"
    raise AssertionError(case)


LORA_CASES = [
    "config rank 10**7",
    "rank_pattern 10**7",
    "rank above the layer's",
    "A of another width",
    "B without A",
    "a layer the model lacks",
    "a component the pipeline lacks",
    "not a LoRA tensor",
    "a LayerNorm",
    "alpha inf",
    "modules_to_save",
    "NaN in B",
]


@pytest.mark.parametrize("case", LORA_CASES)
def test_a_lora_that_does_not_fit_is_refused_before_any_adapter(lora, lora_pipeline, tmp_path, case):
    tensors, metadata, message = lora_case(case, *read_lora(lora))
    path = write_lora(tmp_path / "bad" / LORA_FILE, tensors, metadata)
    with pytest.raises(ModelFileError) as error:
        lora_pipeline.load_lora_weights(path.parent, adapter_name="bad")
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value) and "\n" not in str(error.value)
    assert not getattr(lora_pipeline.transformer, "peft_config", None)  # nothing was added


@pytest.mark.parametrize("case", ["A of another width", "a layer the model lacks", "NaN in B"])
def test_a_lora_state_dict_in_memory_is_checked_too(lora, lora_pipeline, case):
    tensors, _, message = lora_case(case, *read_lora(lora))
    with pytest.raises(ModelFileError, match="the LoRA state dict: ") as error:
        lora_pipeline.load_lora_weights(tensors, adapter_name="bad")
    assert message in str(error.value)
    assert not getattr(lora_pipeline.transformer, "peft_config", None)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda path: write_safetensors(
                path, {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, 2**60
            ),
            "its header claims 1,152,921,504,606,846,976 bytes",
        ),
        (
            lambda path: write_safetensors(
                path,
                {f"{TO_Q}.lora_A.weight": {"dtype": "F32", "shape": [10**7, 64], "data_offsets": [0, 4 * 64 * 10**7]}},
                b"\0" * 4,
            ),
            "incomplete metadata, file not fully covered",
        ),
    ],
)
def test_a_lora_file_that_claims_more_than_it_holds_is_refused(lora_pipeline, tmp_path, make, message):
    path = make(tmp_path / LORA_FILE)
    with pytest.raises(ModelFileError, match=message):
        lora_pipeline.load_lora_weights(path, adapter_name="bad")


def test_a_pickled_lora_is_not_read(lora, lora_pipeline, tmp_path):
    tensors, _ = read_lora(lora)
    torch.save(tensors, tmp_path / "pytorch_lora_weights.bin")
    with pytest.raises(ModelFileError, match=r"no LoRA \.safetensors file in it \(pickled \.bin LoRAs are not read\)"):
        lora_pipeline.load_lora_weights(tmp_path, adapter_name="bad")


# --------------------------------------------------------------------------------------------------------------------
# The converters


def test_the_converter_refuses_a_nan_tensor_naming_it(tmp_path, capsys):
    state = load_state_dict(FIXTURE_A / "checkpoint" / "1" / "mp_rank_00_model_states.pt")
    name = "model.diffusion_model.transformer.layers.1.attention.dense.weight"
    state = {k: v.clone() for k, v in state.items()}
    state[name][3, 5] = float("nan")
    torch.save({"module": state}, tmp_path / "nan.pt")
    code = convert_main(["--checkpoint", str(tmp_path / "nan.pt"), "--output", str(tmp_path / "out")])
    assert_one_line_error(code, capsys.readouterr().err, f"{tmp_path / 'nan.pt'}: tensor {name} holds NaN")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.pt"]


def test_the_converter_bounds_the_layers_a_key_implies(tmp_path, capsys):
    """One key numbered 10**9 would make the converter build a billion-layer model to compare shapes with."""
    state = load_state_dict(FIXTURE_A / "checkpoint" / "1" / "mp_rank_00_model_states.pt")
    old = "model.diffusion_model.transformer.layers.1.attention.dense.weight"
    state = {(k.replace(".layers.1.", f".layers.{10**9}.") if k == old else k): v for k, v in state.items()}
    torch.save({"module": state}, tmp_path / "deep.pt")
    code = convert_main(["--checkpoint", str(tmp_path / "deep.pt"), "--output", str(tmp_path / "out")])
    assert_one_line_error(code, capsys.readouterr().err, "num_layers = 1000000001 is outside 1..256")


def test_the_vae_converter_refuses_a_nan_tensor_naming_it(tmp_path, capsys):
    tiny_sat_vae(tmp_path / "3d-vae.pt")
    checkpoint = torch.load(tmp_path / "3d-vae.pt", weights_only=True)
    checkpoint["state_dict"]["decoder.conv_out.conv.weight"][0, 0, 0, 0, 0] = float("inf")
    torch.save(checkpoint, tmp_path / "3d-vae.pt")
    code = convert_vae_main(["--checkpoint", str(tmp_path / "3d-vae.pt"), "--output", str(tmp_path / "vae")])
    message = f"{tmp_path / '3d-vae.pt'}: tensor decoder.conv_out.conv.weight holds NaN or infinite values"
    assert_one_line_error(code, capsys.readouterr().err, message)


def test_the_vae_converter_bounds_its_config(tmp_path, capsys):
    tiny_sat_vae(tmp_path / "3d-vae.pt")
    code = convert_vae_main(
        [
            "--checkpoint",
            str(tmp_path / "3d-vae.pt"),
            "--output",
            str(tmp_path / "vae"),
            "--config",
            '{"sample_height": 1000000000}',
        ]
    )
    assert_one_line_error(code, capsys.readouterr().err, "sample_height = 1000000000 is outside 1..8,192")


# --------------------------------------------------------------------------------------------------------------------
# Through the CLI, with memory bounded and measured


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("cli")
    return {"image": str(ASSETS / "0001.jpg"), "audio": str(speech(folder / "speech.wav")), "folder": folder}


def cli(model: Path, inputs: dict, *extra: str) -> list[str]:
    output = inputs["folder"] / f"{model.parent.name}.mp4"
    return [sys.executable, "-m", "hallo3.inference", "--model", str(model), "--image", inputs["image"]] + [
        "--audio", inputs["audio"], "--output", str(output), "--steps", "1", *extra,
    ]  # fmt: skip


def test_the_cli_refuses_a_billion_layer_config_in_bounded_memory(model, cli_inputs, import_rss):
    edit_json(model / "transformer" / "config.json", num_layers=10**9)
    code, err, rss, seconds = run_bounded(cli(model, cli_inputs), cli_inputs["folder"])
    print(f"billion-layer config refused in {seconds:.1f} s, peak RSS {rss:.2f} GB (import alone {import_rss:.2f})")
    assert_one_line_error(code, err, "transformer/config.json: num_layers = 1000000000 is outside 1..256")
    assert rss < import_rss + 1.0


def test_the_cli_refuses_a_lora_asking_for_rank_10_7_in_bounded_memory(
    saved_pipeline, lora, cli_inputs, import_rss, tmp_path
):
    tensors, metadata, _ = lora_case("config rank 10**7", *read_lora(lora))
    path = write_lora(tmp_path / "huge-rank" / LORA_FILE, tensors, metadata)
    code, err, rss, seconds = run_bounded(cli(saved_pipeline, cli_inputs, "--lora", str(path.parent)), tmp_path)
    print(f"rank-10**7 LoRA refused in {seconds:.1f} s, peak RSS {rss:.2f} GB (import alone {import_rss:.2f})")
    assert_one_line_error(code, err, f"--lora {path.parent}: not a LoRA this model can load ({path}: the adapter")
    assert rss < import_rss + 1.0


# Load a folder (and a LoRA into it), saying how long that took after the imports
TIMED_LOAD = """
import sys, time, torch
from hallo3.loading import load_pipeline
started = time.perf_counter()
try:
    pipeline = load_pipeline(sys.argv[1], torch_dtype=torch.float32).pipeline
    if len(sys.argv) > 2:
        pipeline.load_lora_weights(sys.argv[2])
finally:
    print(f"seconds after the imports: {time.perf_counter() - started:.2f}", file=sys.stderr)
"""


def test_refusals_take_less_memory_than_a_normal_load(saved_pipeline, model, lora, tmp_path, import_rss):
    """The figures for the notes (no timing assertion): a normal load of the tiny folder and its LoRA, against the
    refusals of a billion-layer config and of a LoRA whose adapter config asks for rank 10**7."""
    tensors, metadata, _ = lora_case("config rank 10**7", *read_lora(lora))
    bad_lora = write_lora(tmp_path / "bad-lora" / LORA_FILE, tensors, metadata)
    edit_json(model / "transformer" / "config.json", num_layers=10**9)
    runs = {
        "normal load + LoRA": [str(saved_pipeline), str(lora)],
        "billion-layer config": [str(model)],
        "rank-10**7 LoRA": [str(saved_pipeline), str(bad_lora)],
    }
    figures = {name: run_bounded([sys.executable, "-c", TIMED_LOAD, *args], tmp_path) for name, args in runs.items()}
    for name, (code, err, rss, seconds) in figures.items():
        after_imports = [line for line in err.splitlines() if line.startswith("seconds after the imports")]
        print(f"{name}: exit {code}, {seconds:.1f} s in all, {after_imports}, peak RSS {rss:.2f} GB (import alone "
              f"{import_rss:.2f} GB)")  # fmt: skip
    assert figures["normal load + LoRA"][0] == 0, figures["normal load + LoRA"][1][-2000:]
    for name in ("billion-layer config", "rank-10**7 LoRA"):
        code, err, rss, _ = figures[name]
        assert code == 1 and ("ModelSourceError" in err or "ModelFileError" in err), err[-2000:]
        assert rss < import_rss + 1.0
