"""train/ trusts no input: resume never unpickles code, and a bad config, override, data folder or checkpoint file
stops `python -m train.train` with one line naming it and exit status 2. CPU, the tiny-random model."""

import contextlib
import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from benchmarks.train_multigpu_check import prepare_clips
from train.config import ConfigError, load_config
from train.train import (
    TRAINING_STATE,
    TrainingInputError,
    check_checkpoint_files,
    read_rng_state,
    save_rng_state,
    set_rng_state,
    train,
)


REPO = Path(__file__).parent.parent
TINY = REPO / "train" / "configs" / "tiny.yaml"
RUN = ("validate_every=0", "report_to=[]", "max_steps=4", "checkpoint_every=2")


class Planted:
    """A pickle that runs code when loaded: it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_clips(tmp_path_factory.mktemp("prepared"), 2)


@pytest.fixture(scope="module")
def stopped_run(prepared, tmp_path_factory):
    """A run stopped at step 2 of 4, with its checkpoint-2."""
    output = tmp_path_factory.mktemp("stopped")
    overrides = [f"data={prepared}", f"output_dir={output}", *RUN, "stop_at_step=2"]
    train(load_config(TINY, overrides))
    return output


def copy_run(run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of `run` to damage, and its checkpoint folder."""
    copy = tmp_path / "run"
    shutil.copytree(run / "checkpoints", copy / "checkpoints")
    return copy, copy / "checkpoints" / "checkpoint-2"


def cli(*argv: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`python -m train.train --config tiny.yaml ARGV` (or through `launcher`, e.g. accelerate's launch)."""
    command = [sys.executable, *launcher, "-m", "train.train", "--config", str(TINY), *argv]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)


def error_line(result: subprocess.CompletedProcess, status: int = 2) -> str:
    """The run's one error line: the last line on stderr, the only one starting with `error:`, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == status, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    return errors[0]


def resume_cli(prepared: Path, run: Path) -> subprocess.CompletedProcess:
    return cli(f"data={prepared}", f"output_dir={run}", *RUN)


# --------------------------------------------------------------------------------------------------------------------
# No pickle on resume


def test_a_checkpoint_holds_no_pickle(stopped_run):
    folder = stopped_run / "checkpoints" / "checkpoint-2"
    names = {path.name for path in folder.iterdir()}
    assert {
        "model.safetensors",
        "optimizer.bin",
        TRAINING_STATE,
        "ema-rank0.safetensors",
        "rng-rank0.safetensors",
    } <= (names)
    assert not [name for name in names if name.endswith(".pkl")]
    for path in folder.iterdir():  # no raw pickle under another name either
        assert path.read_bytes()[:1] != b"\x80", path
    assert torch.serialization.get_unsafe_globals_in_checkpoint(folder / "optimizer.bin") == []
    state = json.loads((folder / TRAINING_STATE).read_text())
    assert state["step"] == 2 and state["data"] == {
        "seed": 42,
        "batches_per_epoch": 2,
        "epoch": 1,
        "batches_done_in_epoch": 0,
    }
    assert state["lr_scheduler"]["last_epoch"] == 2
    check_checkpoint_files(folder)  # what a resume checks first accepts what a run writes


@pytest.mark.parametrize("planted_as", ["custom_checkpoint_0.pkl", "optimizer.bin", "scheduler.bin"])
def test_resume_refuses_a_planted_pickle_before_it_runs(prepared, stopped_run, tmp_path, planted_as):
    """accelerate reads `custom_checkpoint_<i>.pkl` with weights_only=False: before this check, resuming this folder
    ran the planted code. A torch file (optimizer.bin) that names a global, and a raw pickle under a name without
    .pkl, are refused too."""
    run, folder = copy_run(stopped_run, tmp_path)
    marker = tmp_path / "planted-code-ran"
    if planted_as == "optimizer.bin":
        torch.save({"state": Planted(marker)}, folder / planted_as)
    else:
        (folder / planted_as).write_bytes(pickle.dumps(Planted(marker)))
    result = resume_cli(prepared, run)
    assert not marker.exists(), "the planted code ran"
    line = error_line(result)
    assert str(folder / planted_as) in line and ("a pickle" in line or "io.open" in line)


def test_deepspeed_files_may_name_only_deepspeed_value_classes(tmp_path):
    """DeepSpeed reads its checkpoint files with torch.load(weights_only=False); the check lists their globals
    without unpickling. DeepSpeed's own loader runs a planted file; the check refuses it first."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    folder = tmp_path / "checkpoint-1"
    (folder / "pytorch_model").mkdir(parents=True)
    optimizer = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2), "partition": torch.zeros(4)}
    torch.save({"optimizer_state_dict": optimizer}, folder / "pytorch_model" / "zero_pp_rank_0_optim_states.pt")
    check_checkpoint_files(folder)

    marker = tmp_path / "planted-code-ran"
    planted = folder / "pytorch_model" / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "ds_config": Planted(marker)}, planted)
    with pytest.raises(TrainingInputError, match=f"{planted}: a torch file whose pickle calls io.open"):
        check_checkpoint_files(folder)
    assert not marker.exists()
    with contextlib.suppress(Exception):
        TorchCheckpointEngine().load(str(planted))  # what resuming it would have done
    assert marker.exists()


def test_fsdp_dcp_metadata_and_values_are_checked_before_dcp_unpickles_them(tmp_path):
    """FSDP2's sharded checkpoints are DCP folders: DCP reads `.metadata` with pickle.load and non-tensor values with
    torch.load(weights_only=False). A real DCP folder passes; a planted `.metadata` or value is refused, and DCP
    itself would have run it."""
    import torch.distributed.checkpoint as dcp

    state = {"weight": torch.arange(6.0).reshape(2, 3), "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95)}]}
    folder = tmp_path / "checkpoint-1"
    dcp.save(state, checkpoint_id=folder / "optimizer_0")
    check_checkpoint_files(folder)

    marker = tmp_path / "planted-code-ran"
    planted_value = tmp_path / "planted-value" / "checkpoint-1"
    dcp.save({**state, "extra": Planted(marker)}, checkpoint_id=planted_value / "optimizer_0")
    assert not marker.exists()
    with pytest.raises(TrainingInputError, match=r"\.distcp: a value \(extra\) whose pickle calls io\.open"):
        check_checkpoint_files(planted_value)
    assert not marker.exists()
    with contextlib.suppress(Exception):
        dcp.load({"extra": None}, checkpoint_id=planted_value / "optimizer_0")  # what resuming it would have done
    assert marker.exists()

    marker.unlink()
    metadata = folder / "optimizer_0" / ".metadata"
    metadata.write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(TrainingInputError, match=f"{metadata}: a DCP metadata pickle that calls io.open"):
        check_checkpoint_files(folder)
    assert not marker.exists()
    with contextlib.suppress(Exception):
        dcp.FileSystemReader(folder / "optimizer_0").read_metadata()
    assert marker.exists()  # DCP's own reader ran it


# --------------------------------------------------------------------------------------------------------------------
# Damaged checkpoints: one line naming the file, exit 2


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def reshape_first_tensor(path: Path) -> None:
    """The file with its first tensor one row longer: a checkpoint of another model."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    name = sorted(tensors)[0]
    tensors[name] = torch.cat([tensors[name], tensors[name][:1]])
    save_file(tensors, path, metadata=metadata)


DAMAGES = {
    "truncated model": ("model.safetensors", truncate),
    "model of another shape": ("model.safetensors", reshape_first_tensor),
    "EMA of another shape": ("ema-rank0.safetensors", reshape_first_tensor),
    "training state not JSON": (TRAINING_STATE, lambda path: path.write_text('{"step": 2,')),
    "RNG states missing": ("rng-rank0.safetensors", lambda path: path.unlink()),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_file_is_named_in_one_line(prepared, stopped_run, tmp_path, damage):
    run, folder = copy_run(stopped_run, tmp_path)
    name, spoil = DAMAGES[damage]
    spoil(folder / name)
    line = error_line(resume_cli(prepared, run))
    assert line.startswith(f"error: {folder / name}: ") and "damaged" in line


def reshape_optimizer_state(path: Path) -> None:
    """optimizer.bin with one moment a row longer than its parameter (torch's load_state_dict does not notice)."""
    state = torch.load(path, weights_only=True)
    moments = next(iter(state["state"].values()))
    moments["exp_avg"] = torch.cat([moments["exp_avg"], moments["exp_avg"][:1]])
    torch.save(state, path)


def add_parameter_to_optimizer(folder: Path) -> None:
    """optimizer.bin of a model with one more trained tensor: a valid file that torch refuses to load."""
    state = torch.load(folder / "optimizer.bin", weights_only=True)
    state["param_groups"][0]["params"].append(len(state["state"]) + 100)
    torch.save(state, folder / "optimizer.bin")


MORE_DAMAGES = {
    "truncated optimizer": ("optimizer.bin", truncate, "not a readable torch file"),
    "optimizer state of another shape": ("optimizer.bin", reshape_optimizer_state, "has shape"),
    # what only loading shows is reported by accelerate, for the folder
    "optimizer of another model": ("", add_parameter_to_optimizer, "accelerate could not load it"),
    "marker not JSON": ("COMPLETE", lambda path: path.write_text("{"), "not readable JSON"),
    "training state of another step": (
        TRAINING_STATE,
        lambda path: path.write_text(path.read_text().replace('"step": 2', '"step": 3')),
        "step 3 in the folder of step 2",
    ),
    "RNG state of another size": (
        "rng-rank0.safetensors",
        lambda path: save_file({"torch": torch.zeros(3, dtype=torch.uint8)}, path, metadata={"numpy": "[0, 0, 0.0]"}),
        "not an RNG state file",
    ),
    "EMA step not a number": (
        "ema-rank0.safetensors",
        lambda path: save_file(load_file(path), path, metadata={"world_size": "1", "optimization_step": "x"}),
        "not an EMA file",
    ),
}


@pytest.mark.parametrize("damage", list(MORE_DAMAGES))
def test_more_damaged_files_in_process(prepared, stopped_run, tmp_path, capsys, damage):
    """The same rule for the other files, through `main` in this process (quicker than a subprocess each)."""
    from train.train import main

    run, folder = copy_run(stopped_run, tmp_path)
    name, spoil, reason = MORE_DAMAGES[damage]
    spoil(folder / name)
    assert main(["--config", str(TINY), f"data={prepared}", f"output_dir={run}", *RUN]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"error: {folder / name}: ") and reason in lines[-1]


def test_a_resume_with_another_data_order_is_refused(prepared, stopped_run, tmp_path, capsys):
    """The data order is EpochSampler's (seed, epoch) and the batches per epoch: another seed would not continue
    the data, nor the random draws, where the run stopped."""
    from train.train import main

    run, folder = copy_run(stopped_run, tmp_path)
    assert main(["--config", str(TINY), f"data={prepared}", f"output_dir={run}", *RUN, "seed=7"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: {folder / TRAINING_STATE}: written with seed 42 and 2 batches per epoch")


def test_resume_restores_the_rng_states_and_the_schedule(prepared, stopped_run, tmp_path, monkeypatch):
    """What accelerate's random_states pickle restored, the resume restores from rng-rank0.safetensors; the lr
    schedule goes on from training_state.json (the loss of the next steps cannot show it: a step's loss comes
    before its update)."""
    import train.train as training

    run, folder = copy_run(stopped_run, tmp_path)
    saved = load_file(folder / "rng-rank0.safetensors")
    restored = []

    def restore(state):
        training_set_rng_state(state)
        restored.append((torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()[1]))

    training_set_rng_state = training.set_rng_state
    monkeypatch.setattr(training, "set_rng_state", restore)
    train(load_config(TINY, [f"data={prepared}", f"output_dir={run}", *RUN, "stop_at_step=3"]))
    assert len(restored) == 1
    cpu, numpy_keys, python_words = restored[0]
    assert torch.equal(cpu, saved["torch"])
    assert numpy_keys.tolist() == saved["numpy"].tolist() and list(python_words) == saved["python"].tolist()
    (resumed,) = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    # tiny.yaml: lr 1e-4, warm-up 2 steps, then (max_steps - (step - warm-up)) / max_steps
    assert resumed["step"] == 3 and resumed["lr"] == pytest.approx(1e-4 * (4 - (3 - 2)) / 4, rel=1e-12)


def test_rng_states_round_trip_without_pickle(tmp_path):
    """What accelerate's random_states pickle held (python, numpy, torch) comes back from safetensors + JSON: the
    draws after a restore repeat the draws after the save."""
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.normal()  # cached gaussians are part of the states
    path = tmp_path / "rng-rank0.safetensors"
    save_rng_state(path)
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(read_rng_state(path))
    drawn = (random.random(), np.random.normal(), torch.rand(3))
    assert drawn[:2] == expected[:2] and torch.equal(drawn[2], expected[2])


# --------------------------------------------------------------------------------------------------------------------
# Config, overrides, data: one line naming the input, exit 2


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


CONFIG = ["--config", str(TINY)]
# each case: (the command line after `python -m train.train`, what its error line must say), in a fresh folder
BAD_INPUTS = {
    "config missing": lambda tmp: (
        ["--config", str(tmp / "none.yaml")],
        f"--config {tmp / 'none.yaml'}: cannot be read",
    ),
    "config not YAML": lambda tmp: (["--config", str(write(tmp, "stage: [1\n"))], "config.yaml: not valid YAML"),
    "unknown key in the file": lambda tmp: (
        ["--config", str(write(tmp, TINY.read_text() + "max_step: 3\n"))],
        "config.yaml: unknown key max_step; did you mean max_steps?",
    ),
    "override without =": lambda tmp: ([*CONFIG, "max_steps"], "override 'max_steps': expected key=value"),
    "override not YAML": lambda tmp: (
        [*CONFIG, "report_to=[a"],
        "override 'report_to=[a': the value is not valid YAML",
    ),
    "override of the wrong type": lambda tmp: ([*CONFIG, "max_steps=abc"], "max_steps='abc': expected an integer"),
    "unknown override key": lambda tmp: ([*CONFIG, "optim.lr=1"], "override 'optim.lr=1': unknown key optim.lr"),
    "override out of bounds": lambda tmp: ([*CONFIG, "log_every=0"], "'log_every=0': log_every=0: must be at least 1"),
    "override into a value": lambda tmp: ([*CONFIG, "max_steps.x=1"], "max_steps is 4, not a section"),
    "data folder missing": lambda tmp: (
        [*CONFIG, f"data={tmp / 'nothing'}"],
        f"data={tmp / 'nothing'}: no such folder",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_bad_input_is_one_line_and_exit_2(tmp_path, case):
    argv, expected = BAD_INPUTS[case](tmp_path)
    output = tmp_path / "run"
    command = [sys.executable, "-m", "train.train", *argv, f"output_dir={output}"]
    line = error_line(subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600))
    assert expected in line
    assert not output.exists()  # stopped before anything was written


def test_through_accelerate_launch_the_run_prints_the_same_one_line(tmp_path):
    """accelerate's launcher turns any failing run into its own exit status 1 (and, without --quiet, a traceback of
    its own); the run's report is the same one line."""
    env_launch = ("-m", "accelerate.commands.launch", "--quiet", "--num_processes", "1", "--mixed_precision", "no")
    result = subprocess.run(
        [sys.executable, *env_launch, "-m", "train.train", "--config", str(TINY), "max_steps=abc"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "ACCELERATE_USE_CPU": "1"},
    )
    assert "max_steps='abc': expected an integer" in error_line(result, status=1)


def test_override_values_are_read_as_their_fields_want():
    """YAML reads `no` as false and 2e-5 (no dot) as text; the fields say what they are."""
    config = load_config(TINY, ["mixed_precision=no", "optim.learning_rate=2e-5", "output_dir=2024-01-01"])
    assert config.mixed_precision == "no" and config.optim.learning_rate == 2e-5 and config.output_dir == "2024-01-01"
    assert isinstance(config.optim.learning_rate, float)
    with pytest.raises(ConfigError, match=r"mixed_precision='fp8': must be one of 'no', 'fp16', 'bf16'"):
        load_config(TINY, ["mixed_precision=fp8"])
    with pytest.raises(ConfigError, match=r"dropout.text=1.5: must be between 0 and 1"):
        load_config(TINY, ["dropout.text=1.5"])
    with pytest.raises(ConfigError, match=r"'\[' is not a regular expression"):
        load_config(TINY, ["trainable={transformer: ['[']}"])
