"""LoRA through diffusers' API: PEFT adapters on the transformer and reference net, the pipeline's LoRA loader."""

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict  # diffusers' LoRA backend: a dependency, not optional here

from hallo3.loading import build_tiny_random_pipeline
from hallo3.pipeline_hallo3 import Hallo3Pipeline

from .test_pipeline import run


TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def tiny_pipeline():
    pipe = build_tiny_random_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train_lora(model, make_inputs, steps: int = 3) -> None:
    """A few optimiser steps on the adapter only (the base weights stay frozen), towards a random target."""
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=True))
    parameters = [p for name, p in model.named_parameters() if "lora_" in name]
    assert parameters and all(p.requires_grad for p in parameters)
    optimizer = torch.optim.AdamW(parameters, lr=5e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        output = make_inputs(generator)
        loss = sum(((o - torch.randn(o.shape, generator=generator)) ** 2).mean() for o in output)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def transformer_batch(transformer):
    c = transformer.config

    def forward(generator):
        latents = torch.randn(1, 13, c.in_channels, c.sample_height, c.sample_width, generator=generator)
        text = torch.randn(1, c.max_text_seq_length, c.text_embed_dim, generator=generator)
        return [transformer(latents, text, torch.tensor([500.0]), face_embeds=torch.randn(1, 512)).sample]

    return forward


def reference_batch(reference_net):
    c = reference_net.config

    def forward(generator):
        latents = torch.randn(1, 1, c.out_channels, c.sample_height, c.sample_width, generator=generator)
        return reference_net(latents, torch.zeros(1, c.max_text_seq_length, c.text_embed_dim))

    return forward


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA trained for 3 steps on each network and saved in diffusers' format; the videos before and after."""
    pipe = tiny_pipeline()
    base = run(pipe).frames
    train_lora(pipe.transformer, transformer_batch(pipe.transformer))
    train_lora(pipe.reference_net, reference_batch(pipe.reference_net))
    with_lora = run(pipe).frames
    folder = tmp_path_factory.mktemp("lora")
    Hallo3Pipeline.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
        reference_net_lora_layers=get_peft_model_state_dict(pipe.reference_net),
        transformer_lora_adapter_metadata=pipe.transformer.peft_config["default"].to_dict(),
        reference_net_lora_adapter_metadata=pipe.reference_net.peft_config["default"].to_dict(),
    )
    return folder, base, with_lora


def test_trained_lora_changes_the_video(trained):
    _, base, with_lora = trained
    assert np.abs(with_lora - base).mean() > 1e-3


def test_lora_reloads_scales_and_fuses_to_the_same_video(trained):
    folder, base, with_lora = trained
    pipe = tiny_pipeline()  # same seed: the same base weights, no adapter
    pipe.load_lora_weights(folder, adapter_name="talk")
    assert pipe.get_active_adapters() == ["talk"]
    assert pipe.get_list_adapters() == {"transformer": ["talk"], "reference_net": ["talk"]}
    np.testing.assert_allclose(run(pipe).frames, with_lora, atol=1e-5)

    # LoRA scale 0 through the call's attention_kwargs (the transformer and the reference net) is the base model
    np.testing.assert_allclose(run(pipe, attention_kwargs={"scale": 0.0}).frames, base, atol=1e-5)

    weight = pipe.transformer.transformer_blocks[0].attn1.to_q.base_layer.weight.detach().clone()
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the fused weights stay, the adapter layers go
    assert not torch.allclose(pipe.transformer.transformer_blocks[0].attn1.to_q.weight, weight)
    np.testing.assert_allclose(run(pipe).frames, with_lora, atol=1e-4)


def test_set_adapters_weights_the_adapter(trained):
    folder, base, _ = trained
    pipe = tiny_pipeline()
    pipe.load_lora_weights(folder, adapter_name="talk")
    pipe.set_adapters(["talk"], adapter_weights=[0.0])
    np.testing.assert_allclose(run(pipe).frames, base, atol=1e-5)


def test_load_lora_weights_refuses_keys_of_no_component():
    pipe = tiny_pipeline()
    with pytest.raises(ValueError, match="transformer.` or `reference_net."):
        pipe.load_lora_weights({"unet.down.lora_A.weight": torch.zeros(4, 4)})


def test_the_cli_fuses_a_lora_from_a_folder(trained, tmp_path, capsys):
    """`--lora DIR` changes the video; a path that is no LoRA is one line and exit 2."""
    import subprocess

    import soundfile

    from hallo3.inference import main
    from hallo3.preprocessing.audio import ffmpeg_exe

    from .conftest import ASSETS

    folder, _, _ = trained
    t = np.arange(16000) / 16000
    soundfile.write(tmp_path / "speech.wav", (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)
    common = ["--model", "tiny-random", "--image", str(ASSETS / "0001.jpg"), "--audio", str(tmp_path / "speech.wav")]
    common += ["--steps", "2", "--seed", "3"]

    def frames(video):
        command = [ffmpeg_exe(), "-v", "error", "-i", str(video), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
        return np.frombuffer(subprocess.run(command, capture_output=True, check=True).stdout, dtype=np.uint8)

    assert main([*common, "--output", str(tmp_path / "base.mp4")]) == 0
    assert main([*common, "--output", str(tmp_path / "lora.mp4"), "--lora", str(folder)]) == 0
    assert not np.array_equal(frames(tmp_path / "base.mp4"), frames(tmp_path / "lora.mp4"))
    capsys.readouterr()
    assert main([*common, "--output", str(tmp_path / "bad.mp4"), "--lora", str(tmp_path / "speech.wav")]) == 2
    err = capsys.readouterr().err
    assert "--lora" in err and "Traceback" not in err and not (tmp_path / "bad.mp4").exists()
