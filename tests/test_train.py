"""train/: data preparation with drop reasons, both stages, exact resume, a 2-process run. CPU, tiny models."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hallo3.loading import build_tiny_random_pipeline
from train.config import STAGE1_TRAINABLE, STAGE2_TRAINABLE, load_config
from train.prepare_dataset import main as prepare_main
from train.synthetic_data import talking_video
from train.train import train

from .conftest import ASSETS


REPO = Path(__file__).parent.parent
TINY = REPO / "train" / "configs" / "tiny.yaml"


def prepare(raw, output, *extra) -> int:
    """`train.prepare_dataset` on the synthetic videos with the tiny-random encoders."""
    return prepare_main(
        [
            "--videos",
            str(raw / "videos"),
            "--captions",
            str(raw / "captions"),
            "--output",
            str(output),
            "--wav2vec",
            "tiny-random",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def raw_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    videos, captions = root / "videos", root / "captions"
    videos.mkdir()
    captions.mkdir()
    clips = {
        "girl": (ASSETS / "0001.jpg", 3.2, True),
        "man": (ASSETS / "0008.jpg", 3.2, True),
        "statue": (ASSETS / "0001.jpg", 3.2, False),
        "wall": (None, 3.2, True),
        "blink": (ASSETS / "0008.jpg", 1.0, True),
        "uncaptioned": (ASSETS / "0001.jpg", 3.2, True),
    }
    for seed, (name, (photo, seconds, moving)) in enumerate(clips.items()):
        talking_video(videos / f"{name}.mp4", photo, seconds, moving=moving, seed=seed)
        if name != "uncaptioned":
            (captions / f"{name}.txt").write_text(f"a person called {name} talking")
    return root


@pytest.fixture(scope="module")
def prepared(raw_dataset, tmp_path_factory):
    output = tmp_path_factory.mktemp("prepared")
    code = prepare(raw_dataset, output, "--t5", "tiny-random")
    assert code == 0
    return output


def test_preparation_keeps_talking_heads_and_reports_every_drop(prepared):
    report = {
        json.loads(line)["video"]: json.loads(line) for line in (prepared / "report.jsonl").read_text().splitlines()
    }
    assert {name for name, r in report.items() if r["kept"]} == {"girl.mp4", "man.mp4"}
    assert "static clip" in report["statue.mp4"]["reason"]
    assert "0 faces" in report["wall.mp4"]["reason"]
    assert "duration" in report["blink.mp4"]["reason"]
    assert "no caption" in report["uncaptioned.mp4"]["reason"]
    metadata = [json.loads(line) for line in (prepared / "metadata.jsonl").read_text().splitlines()]
    assert sorted(m["name"] for m in metadata) == ["girl", "man"]
    features = load_file(prepared / "clips" / "girl" / "features.safetensors")
    assert features["audio_emb"].shape == (80, 2, 32)  # one wav2vec frame per video frame, all layers
    assert features["face_emb"].shape == (512,) and features["text_emb"].shape == (16, 32)
    assert len(list((prepared / "clips" / "girl" / "frames").glob("*.png"))) == 80


def test_a_rerun_skips_finished_videos_and_shards_split_the_work(raw_dataset, prepared, tmp_path):
    before = (prepared / "report.jsonl").read_text()
    assert prepare(raw_dataset, prepared) == 0
    assert (prepared / "report.jsonl").read_text() == before  # nothing decided twice
    assert prepare(raw_dataset, tmp_path, "--rank", "1", "--world-size", "3") == 0
    shard = [json.loads(line)["video"] for line in (tmp_path / "report-rank1-of-3.jsonl").read_text().splitlines()]
    assert shard == ["girl.mp4", "uncaptioned.mp4"]  # every third video, from the second


def tiny_config(prepared, output, stage=1, **overrides):
    values = [f"data={prepared}", f"output_dir={output}", f"stage={stage}", "validate_every=0", "report_to=[]"]
    return load_config(TINY, values + [f"{k}={v}" for k, v in overrides.items()])


def changed_parameters(folder: Path, initial: torch.nn.Module) -> set[str]:
    weights = {}
    for shard in folder.glob("*.safetensors"):
        weights.update(load_file(shard))
    state = initial.state_dict()
    return {name for name, tensor in weights.items() if name in state and not torch.equal(tensor, state[name])}


@pytest.mark.parametrize("stage", [1, 2])
def test_a_few_steps_change_only_the_configured_parameters(prepared, tmp_path, stage):
    result = train(tiny_config(prepared, tmp_path, stage=stage, max_steps=2))
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result["losses"].values())
    initial = build_tiny_random_pipeline(seed=42)
    patterns = STAGE1_TRAINABLE if stage == 1 else STAGE2_TRAINABLE
    export = Path(result["export"])
    transformer_changed = changed_parameters(export / "transformer", initial.transformer)
    expected = {n for n in initial.transformer.state_dict() if any(re.search(p, n) for p in patterns["transformer"])}
    assert transformer_changed and transformer_changed <= expected
    assert {n.split(".")[0] for n in transformer_changed} >= ({"face_proj"} if stage == 1 else {"audio_proj"})
    reference_changed = changed_parameters(export / "reference_net", initial.reference_net)
    if stage == 1:
        allowed = {
            n for n in initial.reference_net.state_dict() if any(re.search(p, n) for p in patterns["reference_net"])
        }
        assert reference_changed and reference_changed <= allowed
    else:
        assert not reference_changed


def test_resume_gives_the_same_next_losses(prepared, tmp_path):
    straight = train(tiny_config(prepared, tmp_path / "straight", max_steps=4, checkpoint_every=2))["losses"]
    first = train(tiny_config(prepared, tmp_path / "resumed", max_steps=4, checkpoint_every=2, stop_at_step=2))
    assert list(first["losses"]) == [1, 2]
    resumed = train(tiny_config(prepared, tmp_path / "resumed", max_steps=4, checkpoint_every=2))["losses"]
    assert list(resumed) == [3, 4]
    assert resumed[3] == straight[3] and resumed[4] == straight[4]


def test_two_process_run_completes_and_ranks_agree(prepared, tmp_path):
    # `accelerate launch --cpu` starts a single process (it leaves multi-CPU to mpirun); --multi_gpu starts torchrun
    # workers, and ACCELERATE_USE_CPU=1 makes them join a gloo process group on the CPU
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "29577",
            "-m",
            "train.train",
            "--config",
            str(TINY),
            f"data={prepared}",
            f"output_dir={tmp_path}",
            "max_steps=2",
            "validate_every=0",
            "report_to=[]",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env={**os.environ, "ACCELERATE_USE_CPU": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fingerprints = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"rank"')]
    assert sorted(f["rank"] for f in fingerprints) == [0, 1]
    assert fingerprints[0]["transformer_sha256"] == fingerprints[1]["transformer_sha256"]
    assert (tmp_path / "checkpoints" / "checkpoint-2" / "random_states_1.pkl").is_file()  # rank 1 really ran


def test_readme_smoke_training_runs(tmp_path, monkeypatch):
    """The README's three smoke commands: synthetic videos -> prepared data -> tiny stage-1 run with a validation
    video and the diffusers export."""
    from train.synthetic_data import main as synthetic_main
    from train.train import main as train_main

    monkeypatch.chdir(REPO)
    assert synthetic_main(["--output", str(tmp_path / "raw")]) == 0
    assert (
        prepare_main(
            [
                "--videos",
                str(tmp_path / "raw" / "videos"),
                "--captions",
                str(tmp_path / "raw" / "captions"),
                "--output",
                str(tmp_path / "data"),
                "--wav2vec",
                "tiny-random",
                "--t5",
                "tiny-random",
            ]
        )
        == 0
    )
    assert train_main(["--config", str(TINY), f"data={tmp_path / 'data'}", f"output_dir={tmp_path / 'run'}"]) == 0
    assert (tmp_path / "run" / "validation" / "step-000004.mp4").is_file()
    from hallo3 import Hallo3ReferenceNet, Hallo3Transformer3DModel

    Hallo3Transformer3DModel.from_pretrained(tmp_path / "run" / "final" / "transformer")
    Hallo3ReferenceNet.from_pretrained(tmp_path / "run" / "final" / "reference_net")
    assert list((tmp_path / "run" / "logs").rglob("events.out.tfevents*"))  # tensorboard metrics


def test_precomputed_latents_match_the_vae_and_train(raw_dataset, tmp_path):
    from train.dataset import Hallo3ClipDataset, frame_to_tensor

    data = tmp_path / "data"
    assert (
        prepare(raw_dataset, data, "--t5", "tiny-random", "--vae", "tiny-random", "--width", "96", "--height", "64")
        == 0
    )
    latents = load_file(data / "clips" / "girl" / "latents.safetensors")
    assert latents["starts"].tolist() == [2]  # 80 frames hold one 49-frame window after the 2-frame margin
    vae = build_tiny_random_pipeline().vae
    frames = torch.stack(
        [frame_to_tensor(data / "clips" / "girl" / "frames" / f"{3 + i:05d}.png", 96, 64) for i in range(49)]
    )
    with torch.no_grad():
        mean = vae.encode(frames.permute(1, 0, 2, 3)[None]).latent_dist.mean[0].permute(1, 0, 2, 3)
    stored_mean = latents["parameters"][0].float().chunk(2, dim=1)[0]
    torch.testing.assert_close(stored_mean, mean, atol=2e-3, rtol=2e-3)

    item = Hallo3ClipDataset(data, 96, 64)[0]
    assert item["latent_parameters"].shape == (13, 32, 8, 12) and item["video"].shape == (2, 3, 64, 96)
    result = train(tiny_config(data, tmp_path / "run", max_steps=2))
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result["losses"].values())


def test_hub_subfolder_sources_are_split(tmp_path):
    from train.train import pretrained_source

    assert pretrained_source("THUDM/CogVideoX-5b-I2V/transformer") == ("THUDM/CogVideoX-5b-I2V", "transformer")
    assert pretrained_source(str(tmp_path)) == (str(tmp_path), None)
    assert pretrained_source("runs/stage1") == ("runs/stage1", None)
