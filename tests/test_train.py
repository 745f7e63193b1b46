"""train/: data preparation with drop reasons, both stages, exact resume, a 2-process run. CPU, tiny models."""

import hashlib
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hallo3.loading import build_tiny_random_pipeline
from train.config import STAGE1_TRAINABLE, STAGE2_TRAINABLE, load_config
from train.prepare_dataset import main as prepare_main
from train.synthetic_data import RecordedFaces, talking_video
from train.train import train

from .conftest import ASSETS


REPO = Path(__file__).parent.parent
TINY = REPO / "train" / "configs" / "tiny.yaml"


def prepare(raw, output, *extra) -> int:
    """`train.prepare_dataset` on the synthetic videos with the tiny-random encoders, without vocal separation (no
    separator here); face detection and embedding answered from what the generator drew (`raw.faces`), so no test
    depends on a detector's answer on synthetic frames."""
    return prepare_main(
        [
            "--videos",
            str(raw.root / "videos"),
            "--captions",
            str(raw.root / "captions"),
            "--output",
            str(output),
            "--wav2vec",
            "tiny-random",
            "--no-vocal-separation",
            *extra,
        ],
        analyzer=raw.faces,
    )


@dataclass
class RawDataset:
    """The synthetic videos' folder, with the record of the faces drawn in them."""

    root: Path
    faces: RecordedFaces


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
    drawn = []
    for seed, (name, (photo, seconds, moving)) in enumerate(clips.items()):
        drawn.append(talking_video(videos / f"{name}.mp4", photo, seconds, moving=moving, seed=seed))
        if name != "uncaptioned":
            (captions / f"{name}.txt").write_text(f"a person called {name} talking")
    return RawDataset(root, RecordedFaces(drawn))


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
    assert prepare(raw_dataset, prepared, "--t5", "tiny-random") == 0  # the settings preparation.json recorded
    assert (prepared / "report.jsonl").read_text() == before  # nothing decided twice
    assert prepare(raw_dataset, tmp_path, "--rank", "1", "--world-size", "3") == 0
    shard = [json.loads(line)["video"] for line in (tmp_path / "report-rank1-of-3.jsonl").read_text().splitlines()]
    # the videos whose name hashes to worker 1 of 3: a hash, so that added videos never move a decided one
    names = sorted(path.name for path in (raw_dataset.root / "videos").glob("*.mp4"))
    assert shard == [name for name in names if int(hashlib.sha256(name.encode()).hexdigest()[:16], 16) % 3 == 1]
    assert shard  # the hash gives worker 1 some of the six


def tiny_config(prepared, output, stage=1, **overrides):
    values = [f"data={prepared}", f"output_dir={output}", f"stage={stage}", "validate_every=0", "report_to=[]"]
    return load_config(TINY, values + [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def straight_losses(prepared, tmp_path_factory):
    """Losses of an unbroken 4-step run, checkpointing every 2 steps."""
    return train(tiny_config(prepared, tmp_path_factory.mktemp("straight"), max_steps=4, checkpoint_every=2))["losses"]


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


def test_resume_gives_the_same_next_losses(prepared, tmp_path, straight_losses):
    straight = straight_losses
    first = train(tiny_config(prepared, tmp_path / "resumed", max_steps=4, checkpoint_every=2, stop_at_step=2))
    assert list(first["losses"]) == [1, 2]
    resumed = train(tiny_config(prepared, tmp_path / "resumed", max_steps=4, checkpoint_every=2))["losses"]
    assert list(resumed) == [3, 4]
    assert resumed[3] == straight[3] and resumed[4] == straight[4]


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
                "--no-vocal-separation",
                "--no-face-embedding",
            ],
            analyzer=RecordedFaces.for_photos([ASSETS / "0001.jpg", ASSETS / "0008.jpg"]),
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
    # motion_frames.count reaches the dataset: with latents only the motion frames are read as pixels
    from train.train import build_dataset

    three = build_dataset(tiny_config(data, tmp_path, **{"motion_frames.count": 3}), TinyTransformerConfig)
    assert three[0]["video"].shape == (3, 3, 64, 96)
    result = train(tiny_config(data, tmp_path / "run", max_steps=2))
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result["losses"].values())


def test_stored_posteriors_are_sampled_frames_first_and_scaled():
    """`prepare_dataset --vae` stores the VAE posterior frames-first; training samples it as it always has: noise
    drawn in the stored [B, T, C, h, w] order, the sample x the VAE's scaling factor."""
    from hallo3.encoding import posterior_parameters, sample_stored_latents, vae_posterior

    vae = build_tiny_random_pipeline().vae
    frames = torch.rand(2, 9, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        posterior = vae_posterior(vae, frames)
    stored = posterior_parameters(posterior)
    mean, logvar = stored.chunk(2, dim=2)
    torch.testing.assert_close(mean, posterior.mean.permute(0, 2, 1, 3, 4), rtol=0, atol=0)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    expected = (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise) * vae.config.scaling_factor
    sampled = sample_stored_latents(stored, vae.config.scaling_factor, torch.Generator().manual_seed(1))
    assert vae.config.scaling_factor != 1 and sampled.shape == (2, 3, 16, 8, 12)
    torch.testing.assert_close(sampled, expected, rtol=1e-6, atol=1e-6)


def test_training_frames_are_squashed_to_a_square_between_black_bars():
    """Every training frame, whatever its aspect, is resized to height x height and padded with black (-1) to the
    width (architecture 12.19)."""
    from PIL import Image

    from train.dataset import framed_tensor

    framed = framed_tensor(Image.new("RGB", (40, 30), (255, 255, 255)), 96, 64)
    assert framed.shape == (3, 64, 96)
    assert (framed[:, :, :16] == -1).all() and (framed[:, :, 80:] == -1).all()
    assert (framed[:, :, 16:80] == 1).all()


@pytest.mark.parametrize("stage", [1, 2])
def test_dropouts_zero_the_inputs_they_name(prepared, stage):
    """`Hallo3Loss.model_inputs` at dropout 1 zeroes the text, the image latent, the reference latent and (stage 2)
    the audio; at dropout 0 none of them."""
    from accelerate import PartialState

    from hallo3.scheduling_hallo3 import Hallo3DPMScheduler
    from train.train import Hallo3Loss, build_dataset, collate, load_models

    PartialState()
    for rate in (1.0, 0.0):
        rates = {f"dropout.{name}": rate for name in ("text", "audio", "image_latent", "reference")}
        config = tiny_config(prepared, "unused", stage=stage, **rates)
        models = load_models(config, torch.float32, load_text_encoder=False)
        dataset = build_dataset(config, models.transformer.config)
        max_text_length = models.transformer.config.max_text_seq_length
        loss = Hallo3Loss(config, models, Hallo3DPMScheduler(), max_text_length, torch.float32, 0, 1)
        inputs = loss.model_inputs(collate([dataset[0], dataset[1]]), torch.Generator().manual_seed(0))
        channels = inputs.target.shape[2]
        image_latents = inputs.hidden_states[:, :, channels:]
        assert inputs.hidden_states.shape == (2, 13, 2 * channels, 8, 12)
        dropped = {
            "text": inputs.text,
            "image_latent": image_latents,
            "reference": inputs.reference_latent,
            **({"audio": inputs.audio_embeds} if stage == 2 else {}),
        }
        assert {name for name, value in dropped.items() if not value.any()} == (set(dropped) if rate else set())
        assert (inputs.audio_embeds is None) == (stage == 1)


class TinyTransformerConfig:
    """The sizes `build_dataset` reads off the denoiser's config: the tiny model's 64x96 px, 49 frames."""

    sample_width, sample_height, sample_frames = 12, 8, 49


def test_hub_subfolder_sources_are_split(tmp_path):
    from train.train import pretrained_source

    assert pretrained_source("THUDM/CogVideoX-5b-I2V/transformer") == ("THUDM/CogVideoX-5b-I2V", "transformer")
    assert pretrained_source(str(tmp_path)) == (str(tmp_path), None)
    assert pretrained_source("runs/stage1") == ("runs/stage1", None)


# --------------------------------------------------------------------------------------------------------------------
# Schedules, precision, data checks (issue 12)


def test_lr_schedule_is_the_official_annealing(prepared, tmp_path):
    """Reference 9 written out at the real settings, and the lr the tiny run logs per step."""
    from train.config import OptimConfig
    from train.train import official_lr_factor

    def reference(
        n: int,
    ) -> float:  # first 100 iterations at min(0.05, n/300), ramp to 300, then (30000-(n-300))/30000
        if n <= 300:
            return min(0.05, n / 300) if n <= 100 else n / 300
        return (30000 - (n - 300)) / 30000

    for n in (1, 14, 15, 16, 99, 100, 101, 299, 300, 301, 15000, 30000):
        assert official_lr_factor(n, OptimConfig(), 30000) == pytest.approx(reference(n), rel=1e-12)
    train(tiny_config(prepared, tmp_path, max_steps=4))
    metrics = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    # tiny.yaml: lr 1e-4, warm-up 2 steps, the first one held at 0.05x
    expected = [1e-4 * f for f in (min(0.05, 1 / 2), 2 / 2, (4 - (3 - 2)) / 4, (4 - (4 - 2)) / 4)]
    assert [m["lr"] for m in metrics] == pytest.approx(expected, rel=1e-12)


def test_timesteps_are_stratified_across_ranks():
    from train.train import sample_timesteps

    world = 4
    draws = [
        sample_timesteps(1000, 64, rank, world, torch.Generator().manual_seed(rank), "cpu") for rank in range(world)
    ]
    for rank, timesteps in enumerate(draws):
        assert timesteps.min() >= 250 * rank and timesteps.max() < 250 * (rank + 1)
    alone = sample_timesteps(1000, 4096, 0, 1, torch.Generator().manual_seed(0), "cpu")
    assert alone.min() < 50 and alone.max() >= 950  # one process: the whole schedule


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; a test that changes mixed_precision starts and leaves it fresh."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_keeps_frozen_weights_in_bf16_and_trained_ones_in_fp32(prepared, tmp_path, fresh_accelerate_state):
    result = train(tiny_config(prepared, tmp_path, max_steps=1, mixed_precision="bf16"))
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result["losses"].values())
    weights = load_file(tmp_path / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    trained = {n for n in weights if any(re.search(p, n) for p in STAGE1_TRAINABLE["transformer"])}
    assert trained and {weights[n].dtype for n in trained} == {torch.float32}
    frozen = {n for n in weights if n not in trained and weights[n].is_floating_point()}
    assert {weights[n].dtype for n in frozen if n != "patch_embed.pos_embedding"} == {torch.bfloat16}


def test_t5_is_not_loaded_when_captions_are_precomputed(raw_dataset, prepared, tmp_path):
    from train.dataset import has_text_embeddings

    assert has_text_embeddings(prepared)
    assert train(tiny_config(prepared, tmp_path / "run", max_steps=1))["text_encoder_loaded"] is False
    without = tmp_path / "without-t5"
    assert prepare(raw_dataset, without) == 0
    assert not has_text_embeddings(without)
    assert train(tiny_config(without, tmp_path / "run-t5", max_steps=1))["text_encoder_loaded"] is True


def test_the_tiny_stage_1_model_has_no_audio_modules():
    from accelerate import PartialState

    from train.train import load_models

    PartialState()
    models = load_models(load_config(TINY, ["stage=1"]), torch.float32, load_text_encoder=False)
    assert not models.transformer.config.add_audio_module
    assert not [name for name, _ in models.transformer.named_parameters() if "audio" in name]


def run_main(*argv: str) -> int:
    from train.train import main as train_main

    return train_main(["--config", str(TINY), *argv])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_every_shipped_config_loads():
    for path in sorted((REPO / "train" / "configs").glob("*.yaml")):
        load_config(path)


def test_a_config_with_the_former_conditioning_section_names_the_new_keys(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text(TINY.read_text() + "conditioning:\n  concat_dropout: 0.1\n  motion_frames: 3\n")
    from train.train import main as train_main

    assert train_main(["--config", str(old)]) == 2
    line = one_line_error(capsys)
    assert "conditioning.concat_dropout -> dropout.image_latent" in line
    assert "conditioning.motion_frames -> motion_frames.count" in line
    assert run_main("conditioning.text_dropout=0") == 2  # as an override too
    assert "conditioning.text_dropout -> dropout.text" in one_line_error(capsys)


def test_fewer_clips_than_a_batch_per_process_is_a_clear_error(prepared, tmp_path, capsys):
    code = run_main(f"data={prepared}", f"output_dir={tmp_path}", "report_to=[]", "batch_size=3")
    assert code == 2
    assert one_line_error(capsys).startswith(
        f"error: data={prepared}: 2 prepared clips for 1 processes x batch_size 3"
    )


def test_a_launch_that_does_not_fit_the_config_is_a_clear_error(prepared, tmp_path, monkeypatch, capsys):
    base = (f"data={prepared}", f"output_dir={tmp_path}", "report_to=[]")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert run_main(*base) == 2
    assert "mixed_precision: the accelerate launch says 'bf16', the training config 'no'" in one_line_error(capsys)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    assert run_main(*base) == 2
    assert "uses DeepSpeed, which is not installed" in one_line_error(capsys)


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way catches it."""


def test_resume_after_a_kill_during_a_checkpoint_save(prepared, tmp_path, monkeypatch, straight_losses):
    from accelerate import Accelerator

    config = dict(max_steps=4, checkpoint_every=2)
    train(tiny_config(prepared, tmp_path, stop_at_step=2, **config))
    original_save = Accelerator.save_state

    def save_then_die(self, output_dir=None, **kwargs):  # the model file is half written when the process dies
        original_save(self, output_dir, **kwargs)
        weights = Path(output_dir) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        raise Killed

    monkeypatch.setattr(Accelerator, "save_state", save_then_die)
    with pytest.raises(Killed):
        train(tiny_config(prepared, tmp_path, **config))
    monkeypatch.setattr(Accelerator, "save_state", original_save)
    assert (tmp_path / "checkpoints" / "checkpoint-4").is_dir()  # the interrupted save left a folder

    resumed = train(tiny_config(prepared, tmp_path, **config))["losses"]
    assert list(resumed) == [3, 4]  # from checkpoint-2, the newest complete one
    assert resumed[3] == straight_losses[3] and resumed[4] == straight_losses[4]
    assert (tmp_path / "checkpoints" / "checkpoint-4" / "COMPLETE").is_file()


def test_a_corrupted_sample_is_skipped_counted_and_too_many_stop_the_run(prepared, tmp_path, capsys, caplog):
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    features = data / "clips" / "man" / "features.safetensors"
    features.write_bytes(features.read_bytes()[:100])  # truncated

    result = train(tiny_config(data, tmp_path / "run", max_steps=2))
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result["losses"].values())
    metrics = [json.loads(line) for line in (tmp_path / "run" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["bad_samples"] >= 1  # the epoch visits both clips
    assert "skipped a bad sample: man: SafetensorError" in caplog.text  # with its reason

    code = run_main(f"data={data}", f"output_dir={tmp_path / 'strict'}", "report_to=[]", "max_bad_samples=0")
    assert code == 2
    assert "1 bad samples skipped, more than max_bad_samples=0" in one_line_error(capsys)


def test_lora_training_exports_an_adapter_the_pipeline_loads(prepared, tmp_path):
    """`lora.rank`: only the adapters train; the export is the file `load_lora_weights` reads, and it changes the
    video, while every base weight is the one training started from."""
    result = train(tiny_config(prepared, tmp_path, max_steps=2, **{"lora.rank": 4, "optim.learning_rate": 1e-2}))
    adapter = Path(result["export"]) / "lora"
    assert [p.name for p in adapter.iterdir()] == ["pytorch_lora_weights.safetensors"]
    saved = load_file(adapter / "pytorch_lora_weights.safetensors")
    assert {name.split(".")[0] for name in saved} == {"transformer", "reference_net"}
    assert all(".lora_A." in name or ".lora_B." in name for name in saved)

    pipe = build_tiny_random_pipeline(seed=42)  # the base the tiny run starts from
    pipe.set_progress_bar_config(disable=True)
    image = np.full((pipe.height, pipe.width, 3), 128, dtype=np.uint8)
    audio = (0.3 * np.sin(np.arange(8000) / 16000 * 2 * np.pi * 200)).astype(np.float32)

    def video():
        return pipe(image=image, audio=audio, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames

    base = video()
    pipe.load_lora_weights(adapter, adapter_name="person")
    assert np.abs(video() - base).max() > 1e-4  # the adapter was trained: it changes the video
    pipe.set_adapters(["person"], adapter_weights=[0.0])
    np.testing.assert_allclose(video(), base, atol=1e-5)  # weight 0: the untouched base
