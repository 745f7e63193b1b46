"""The official download alone, offline: the SAT VAE converter, and `--model pretrained_models` with HF_HUB_OFFLINE=1."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from diffusers import AutoencoderKLCogVideoX

from hallo3.convert_sat_vae import convert_vae, main

from .conftest import ASSETS
from .official_layout import build_official_layout, tiny_sat_vae


def test_the_sat_vae_converts_to_the_same_network(tmp_path):
    """Unequal block widths exercise the shortcut convolutions; the outputs must equal the VAE the file came from."""
    original = tiny_sat_vae(tmp_path / "3d-vae.pt", block_out_channels=(8, 16, 16, 16), norm_num_groups=4)
    converted = convert_vae(tmp_path / "3d-vae.pt", tmp_path / "vae", {"norm_num_groups": 4})
    vae = AutoencoderKLCogVideoX.from_pretrained(converted).eval()  # strict: every tensor present and used
    assert vae.config.scaling_factor == 0.7 and list(vae.config.block_out_channels) == [8, 16, 16, 16]
    frames = torch.rand(1, 3, 9, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(vae.encode(frames).latent_dist.mean, original.encode(frames).latent_dist.mean)
        latents = torch.randn(1, 16, 3, 8, 12, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(vae.decode(latents).sample, original.decode(latents).sample)


@pytest.mark.parametrize(
    "make_input, message",
    [
        (lambda path: path.write_text("not a checkpoint"), "not a PyTorch checkpoint"),
        (
            lambda path: torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, path),
            "not the SAT VAE",
        ),
        (lambda path: torch.save({"state_dict": {"encoder.conv_in.conv.weight": torch.zeros(1)}}, path), "SAT VAE"),
    ],
)
def test_bad_vae_files_get_one_line_errors_and_leave_nothing(tmp_path, capsys, make_input, message):
    make_input(tmp_path / "3d-vae.pt")
    code = main(["--checkpoint", str(tmp_path / "3d-vae.pt"), "--output", str(tmp_path / "vae")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3d-vae.pt"]


def test_pickled_code_in_a_vae_file_is_refused(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    torch.save({"state_dict": {"encoder.x": torch.zeros(1)}, "extra": Payload()}, tmp_path / "3d-vae.pt")
    assert main(["--checkpoint", str(tmp_path / "3d-vae.pt"), "--output", str(tmp_path / "vae")]) == 2
    assert "refused to load" in capsys.readouterr().err and not (tmp_path / "ran").exists()


@pytest.fixture(scope="module")
def pretrained_models(tmp_path_factory) -> Path:
    return build_official_layout(tmp_path_factory.mktemp("download"))


def test_the_official_layout_runs_offline(pretrained_models, tmp_path):
    """`--model pretrained_models` with no network: T5, VAE and wav2vec2 come from the download itself."""
    from hallo3.video_io import probe_video

    t = np.arange(16000) / 16000
    soundfile.write(tmp_path / "speech.wav", (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)
    command = [sys.executable, "-m", "hallo3.inference", "--model", str(pretrained_models)]
    command += ["--image", str(ASSETS / "0001.jpg"), "--audio", str(tmp_path / "speech.wav")]
    command += ["--output", str(tmp_path / "talk.mp4"), "--steps", "1", "--seed", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert probe_video(tmp_path / "talk.mp4")["num_frames"] == 25
    converted = pretrained_models / "hallo3-diffusers"
    assert sorted(p.name for p in converted.iterdir()) == ["reference_net", "transformer", "vae"]
    assert not (tmp_path / "empty-hf-home" / "hub").exists()  # nothing was looked up in a Hub cache

    from hallo3.loading import load_pipeline

    pipe = load_pipeline(str(pretrained_models), torch_dtype=torch.float32).pipeline  # reuses the conversion
    sat = torch.load(pretrained_models / "cogvideox-5b-i2v-sat" / "vae" / "3d-vae.pt", weights_only=True)
    assert pipe.vae.state_dict()["encoder.conv_in.conv.weight"].equal(sat["state_dict"]["encoder.conv_in.conv.weight"])
