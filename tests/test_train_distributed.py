"""train/ on several processes, started the way users start it: `accelerate launch --config_file
train/configs/accelerate/<shipped yaml> ...` on 2 gloo CPU processes (DDP, FSDP2) or one DeepSpeed CPU process.

What a CPU cannot show (NCCL, ZeRO on 8 GPUs, bf16 kernels, real memory) is in the `slow` test at the end, which runs
benchmarks/train_multigpu_check.py on a machine with GPUs.
"""

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.train_multigpu_check import REPO, launch_command, prepare_clips, read_run, tiny_lr


# accelerate 1.15 selects FSDP only for GPU processes: with ACCELERATE_USE_CPU=1 it silently runs the FSDP config as
# plain DDP (train.train refuses that with a clear error). This shim, put on the workers' PYTHONPATH as
# sitecustomize.py, lets accelerate keep the FSDP plugin it built from the shipped yaml on gloo CPU processes, so the
# FSDP2 code path (sharding, DTensor parameters, sharded checkpoints) really runs here.
FSDP_ON_CPU_SHIM = """
import os
if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and os.environ.get("LOCAL_RANK"):
    import accelerate.state as state
    from accelerate.utils import DistributedType

    original_init = state.AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin") or getattr(self, "fsdp_plugin", None)
        if self.distributed_type == DistributedType.MULTI_CPU and plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    state.AcceleratorState.__init__ = init
"""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Two talking heads: one clip per rank."""
    return prepare_clips(tmp_path_factory.mktemp("prepared"), 2)


def launch(
    config_file: str,
    output: Path,
    data: Path,
    *overrides: str,
    processes: int = 2,
    launcher: tuple[str, ...] = (),
    env: dict | None = None,
):
    """`accelerate launch --config_file train/configs/accelerate/<config_file> ...` of the tiny stage, as a user runs
    it on CPUs; returns (completed process, metrics per step, fingerprint of the trained weights per rank)."""
    precision = ("--mixed_precision", "no") if "mixed_precision=bf16" not in overrides else ()
    command = launch_command(config_file, data, output, overrides, processes, (*precision, *launcher))
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, **(env or {})}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return (result, *read_run(result.stdout, output))


def cpu_env(backend: str, folder: Path) -> dict:
    env = {"ACCELERATE_USE_CPU": "1"}
    if backend == "fsdp":
        (folder / "sitecustomize.py").write_text(FSDP_ON_CPU_SHIM)
        env["PYTHONPATH"] = os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])
    return env


STEPS = ["max_steps=3", "checkpoint_every=1", "keep_checkpoints=3", "optim.ema_decay=0.5"]


@pytest.fixture(scope="module")
def two_stage_runs(prepared, tmp_path_factory):
    """For ddp.yaml and fsdp.yaml on 2 processes: stage 1, then stage 2 from stage 1's export.
    {backend: (folder, {stage: (result, metrics, fingerprints)})}"""
    runs = {}
    for backend in ("ddp", "fsdp"):
        root = tmp_path_factory.mktemp(backend)
        env = cpu_env(backend, root)
        stages = {1: launch(f"{backend}.yaml", root / "stage1", prepared, "stage=1", *STEPS, env=env)}
        export = root / "stage1" / "final"
        stages[2] = launch(
            f"{backend}.yaml",
            root / "stage2",
            prepared,
            "stage=2",
            f"model.transformer={export / 'transformer'}",
            f"model.reference_net={export / 'reference_net'}",
            *STEPS,
            env=env,
        )
        runs[backend] = (root, stages)
    return runs


@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_both_ranks_finish_with_the_same_weights_and_the_single_process_lr(two_stage_runs, backend):
    root, stages = two_stage_runs[backend]
    for stage, (result, metrics, fingerprints) in stages.items():
        assert f"{'FSDP' if backend == 'fsdp' else 'MULTI_CPU'}, 2 processes" in result.stderr
        assert sorted(fingerprints) == [0, 1] and fingerprints[0] == fingerprints[1]
        # tiny.yaml: lr 1e-4, warm-up 2 with the first step held at 0.05x; max_steps overridden to 3
        expected = [tiny_lr(step, 3) for step in (1, 2, 3)]
        assert [metrics[step]["lr"] for step in (1, 2, 3)] == pytest.approx(expected, rel=1e-12)
        assert all(metrics[step]["grad_norm"] > 0 for step in (1, 2, 3))  # clipping saw the real gradients
        folder = root / f"stage{stage}" / "checkpoints" / "checkpoint-3"
        names = {p.name for p in folder.iterdir()}
        assert {"COMPLETE", "training_state.json", "ema-rank0.safetensors", "ema-rank1.safetensors"} <= names
        assert {"rng-rank0.safetensors", "rng-rank1.safetensors"} <= names
        assert not [name for name in names if name.endswith(".pkl")]  # each rank's state without pickle


def exported_weights(folder: Path) -> dict[str, torch.Tensor]:
    """OUTPUT/final as one state dict with the training model's names (transformer.*, reference_net.*)."""
    weights = {}
    for network in ("transformer", "reference_net"):
        part = load_file(folder / network / "diffusion_pytorch_model.safetensors")
        weights.update({f"{network}.{name}": tensor for name, tensor in part.items()})
    return weights


def test_fsdp2_trains_exactly_like_ddp(two_stage_runs):
    """Same data, same draws, same maths: per-step losses, gradient norms and the exported EMA weights of the FSDP2
    run match the DDP run. An EMA or a clipping list holding the parameters from before sharding would not."""
    fsdp_root, fsdp = two_stage_runs["fsdp"]
    ddp_root, ddp = two_stage_runs["ddp"]
    for stage in (1, 2):
        for step in (1, 2, 3):
            assert fsdp[stage][1][step]["loss"] == pytest.approx(ddp[stage][1][step]["loss"], rel=1e-5)
            assert fsdp[stage][1][step]["grad_norm"] == pytest.approx(ddp[stage][1][step]["grad_norm"], rel=1e-5)
        fsdp_weights = exported_weights(fsdp_root / f"stage{stage}" / "final")
        ddp_weights = exported_weights(ddp_root / f"stage{stage}" / "final")
        assert fsdp_weights.keys() == ddp_weights.keys()
        for name in fsdp_weights:
            torch.testing.assert_close(fsdp_weights[name], ddp_weights[name], rtol=1e-5, atol=1e-6, msg=name)


def test_ddp_ema_export_is_the_average_of_the_trained_weights(two_stage_runs):
    """Each rank keeps the EMA of its share of the parameters; the export must equal the EMA computed here from the
    weights of every step's checkpoint (decay min(0.5, (1 + n) / (10 + n)) with n = step - 1, diffusers' ramp)."""
    root, _ = two_stage_runs["ddp"]
    for stage in (1, 2):
        checkpoints = [
            load_file(root / f"stage{stage}" / "checkpoints" / f"checkpoint-{step}" / "model.safetensors")
            for step in (1, 2, 3)
        ]
        exported = exported_weights(root / f"stage{stage}" / "final")
        trained = [name for name in checkpoints[0] if not torch.equal(checkpoints[0][name], checkpoints[2][name])]
        assert trained and any(name.startswith("transformer.") for name in trained)
        for name in trained:
            average = checkpoints[0][name].clone()  # step 1: decay 0, the average is the weights
            for step, weights in ((2, checkpoints[1]), (3, checkpoints[2])):
                decay = min(0.5, step / (9 + step))
                average = decay * average + (1 - decay) * weights[name]
            torch.testing.assert_close(exported[name], average, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_configs_prepare_and_train_in_bf16(prepared, tmp_path, zero):
    """The shipped ZeRO-2/ZeRO-3 configs through accelerate's DeepSpeed path on DeepSpeed's CPU accelerator (one
    process: accelerate runs DeepSpeed on one CPU process only), bf16, stage 2, whose frozen reference net must be
    cast with the denoiser. The EMA export, at decay 0, equals the weights the engine trained."""
    pytest.importorskip("deepspeed")
    offload = ("--offload_optimizer_device", "none") if zero == 3 else ()  # cpu_adam would need a C++ build
    result, metrics, fingerprints = launch(
        f"deepspeed_zero{zero}.yaml",
        tmp_path,
        prepared,
        "stage=2",
        "mixed_precision=bf16",
        "max_steps=2",
        "optim.ema_decay=0",
        processes=1,
        launcher=offload,
    )
    sharing = "sharded with the parameters" if zero == 3 else "split by parameter"
    assert f"DEEPSPEED, 1 processes; EMA {sharing}" in result.stderr
    assert [metrics[s]["lr"] for s in (1, 2)] == pytest.approx([tiny_lr(s, 2) for s in (1, 2)])
    exported = exported_weights(tmp_path / "final")
    assert {tensor.dtype for tensor in exported.values()} == {torch.bfloat16}
    trained = sorted(name for name in exported if re.search(r"audio", name))  # stage 2 trains the audio modules
    digest = hashlib.sha256()
    for name in trained:
        digest.update(name.encode())
        digest.update(exported[name].float().numpy().tobytes())
    assert trained and digest.hexdigest() == fingerprints[0]


def test_an_fsdp_config_on_cpu_processes_is_refused_not_run_as_ddp(prepared, tmp_path):
    """Without the shim, accelerate turns the FSDP config into plain DDP on CPUs; train.train says so and stops."""
    command = launch_command("fsdp.yaml", prepared, tmp_path, processes=2, launcher=("--mixed_precision", "no"))
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, "ACCELERATE_USE_CPU": "1"}
    )
    assert result.returncode != 0
    assert "error: the accelerate config asks for FSDP, but accelerate runs these processes as MULTI_CPU" in (
        result.stderr
    )
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_multi_gpu_check_script():
    """What only GPUs show: every shipped accelerate config on the GPUs of this machine (NCCL, bf16, ZeRO-2/3,
    FSDP2), both stages, ranks agreeing, the lr schedule, the peak memory per config."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA GPUs")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_multigpu_check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
