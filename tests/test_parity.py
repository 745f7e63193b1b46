"""The parity tool against tensors recorded from the official implementation (fixture A)."""

import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from hallo3.parity import run

from .conftest import FIXTURE_A


def test_every_recorded_tensor_matches_fixture_a(capsys):
    # fp32 rounding depends on the CPU's matmul kernels: the worst error was 6.2e-6 on one x86-64 machine and 1.03e-5
    # (samp.call1.guided) on another; a wrong formula is off by 1e-3 or more
    report = run(FIXTURE_A, tolerance=2e-5)
    out = capsys.readouterr().out
    assert not report.failed, out
    for name in (
        "fwd.ref_bank.0",
        "fwd.audio_tokens",
        "fwd.face_tokens",
        "fwd.layer_out.0",
        "fwd.net_out",
        "fwd.denoised",
        "samp.final_latent",
        "samp.call4.guided",
        "samp.step4.x_in",
    ):
        assert name in out
    assert 0 < report.worst <= 2e-5


def test_a_perturbed_recording_fails_with_exit_code_1(tmp_path):
    fixture = tmp_path / "fixture"
    shutil.copytree(FIXTURE_A, fixture)
    forward = load_file(fixture / "forward.safetensors")
    forward["fwd.net_out"] = forward["fwd.net_out"] + 2e-4 * torch.randn_like(forward["fwd.net_out"]).sign()
    (fixture / "forward.safetensors").chmod(0o644)
    save_file(forward, fixture / "forward.safetensors")
    result = subprocess.run([sys.executable, "-m", "hallo3.parity", str(fixture)], capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "fwd.net_out" in result.stdout and "FAIL" in result.stdout


def test_not_a_fixture_is_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hallo3.parity", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2 and "not a parity fixture" in result.stderr
