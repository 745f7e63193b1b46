"""The denoiser and reference network: stock-weight compatibility, invariants and training plumbing."""

import re

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from safetensors.torch import load_file

from hallo3 import Hallo3ReferenceNet, Hallo3Transformer3DModel
from hallo3.transformer_hallo3 import get_3d_rotary_emb

from .conftest import FIXTURE_A, TINY_STOCK, TINY_TRANSFORMER, tiny_inputs


HALLO3_KEY = re.compile(
    r"^(audio_proj|face_proj)\.|^transformer_blocks\.\d+\.(norm_face|attn_face|norm_audio|attn_audio)\."
)


@pytest.fixture(scope="module")
def stock_folder(tmp_path_factory):
    """A tiny diffusers-format CogVideoX-I2V 1.0 transformer, as stage 1 starts from."""
    torch.manual_seed(1)
    stock = CogVideoXTransformer3DModel(
        **TINY_STOCK, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True
    )
    folder = tmp_path_factory.mktemp("stock")
    stock.save_pretrained(folder)
    return folder


def test_stock_weights_load_with_exactly_the_hallo3_keys_missing(stock_folder):
    model, info = Hallo3Transformer3DModel.from_pretrained(
        stock_folder,
        low_cpu_mem_usage=False,
        output_loading_info=True,
        **{k: v for k, v in TINY_TRANSFORMER.items() if k not in TINY_STOCK},
    )
    ours = set(model.state_dict())
    expected_missing = {key for key in ours if HALLO3_KEY.search(key)}
    assert expected_missing, "the tiny model must have Hallo3 modules"
    assert set(info["missing_keys"]) == expected_missing
    assert not info["unexpected_keys"] and not info["mismatched_keys"]


def test_reference_net_loads_stock_weights_strictly(stock_folder):
    # the default low_cpu_mem_usage path raises on any missing key
    reference_net = Hallo3ReferenceNet.from_pretrained(stock_folder)
    stock_keys = set(load_file(stock_folder / "diffusion_pytorch_model.safetensors"))
    assert set(reference_net.state_dict()) == stock_keys


@torch.no_grad()
def test_without_hallo3_inputs_the_denoiser_is_stock_cogvideox(stock_folder):
    """No reference, face or audio: our blocks must reduce to diffusers' CogVideoX blocks exactly."""
    stock = CogVideoXTransformer3DModel.from_pretrained(stock_folder).eval()
    ours = Hallo3Transformer3DModel.from_pretrained(
        stock_folder,
        low_cpu_mem_usage=False,
        final_norm_eps=1e-5,  # diffusers' norm_out eps, for this comparison
        **{k: v for k, v in TINY_TRANSFORMER.items() if k not in TINY_STOCK},
    ).eval()
    inputs = tiny_inputs()
    rope = get_3d_rotary_emb(32, 13, 4, 6)
    expected = stock(
        inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["timestep"], image_rotary_emb=rope
    ).sample
    actual = ours(inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["timestep"]).sample
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_rope_tables_equal_the_official_buffers():
    checkpoint = torch.load(
        FIXTURE_A / "checkpoint" / "1" / "mp_rank_00_model_states.pt", weights_only=True, map_location="cpu"
    )["module"]
    cos, sin = get_3d_rotary_emb(32, 13, 4, 6)
    assert torch.equal(cos, checkpoint["model.diffusion_model.mixins.pos_embed.freqs_cos"])
    assert torch.equal(sin, checkpoint["model.diffusion_model.mixins.pos_embed.freqs_sin"])


@torch.no_grad()
def test_save_load_round_trip(tmp_path):
    model = Hallo3Transformer3DModel(**TINY_TRANSFORMER).eval()
    inputs = tiny_inputs()
    before = model(**inputs).sample
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = Hallo3Transformer3DModel.from_pretrained(tmp_path).eval()
    assert loaded.config.audio_hidden_size == 24 and loaded.config.num_layers == 2
    assert torch.equal(loaded(**inputs).sample, before)


@torch.no_grad()
def test_precomputed_conditioning_gives_the_same_output():
    """The tokens one call returns, passed to the next, replace the raw inputs exactly; they are the projections of
    those inputs (written out here), and the raw inputs are then not read."""
    model = Hallo3Transformer3DModel(**TINY_TRANSFORMER).eval()
    inputs = tiny_inputs()
    first = model(**inputs)
    tokens = first.conditioning_tokens
    torch.testing.assert_close(tokens.face_tokens, model.face_proj(inputs["face_embeds"]), rtol=0, atol=0)
    torch.testing.assert_close(tokens.audio_tokens, model.audio_proj(inputs["audio_embeds"]), rtol=0, atol=0)
    for block, bank, (key, value) in zip(
        model.transformer_blocks, inputs["reference_hidden_states"], tokens.reference_key_values
    ):
        attn = block.attn1
        assert torch.equal(key, attn.norm_k(attn.to_k(bank).unflatten(-1, (attn.heads, -1))))
        assert torch.equal(value, attn.to_v(bank).unflatten(-1, (attn.heads, -1)))
    raw_gone = {**inputs, "reference_hidden_states": None, "face_embeds": None, "audio_embeds": None}
    assert torch.equal(model(**raw_gone, conditioning_tokens=tokens).sample, first.sample)
    ignored = {**inputs, "face_embeds": torch.randn_like(inputs["face_embeds"])}
    assert torch.equal(model(**ignored, conditioning_tokens=tokens).sample, first.sample)
    # per clip: the video part is kept and new audio is projected
    new_audio = {**raw_gone, "audio_embeds": inputs["audio_embeds"].flip(1)}
    assert torch.equal(
        model(**new_audio, conditioning_tokens=tokens.without_audio()).sample,
        model(**{**inputs, "audio_embeds": new_audio["audio_embeds"]}).sample,
    )


@torch.no_grad()
def test_each_conditioning_input_changes_the_output():
    model = Hallo3Transformer3DModel(**TINY_TRANSFORMER).eval()
    inputs = tiny_inputs()
    full = model(**inputs).sample
    for name in ("reference_hidden_states", "face_embeds", "audio_embeds"):
        reduced = model(**{**inputs, name: None}).sample
        assert (reduced - full).abs().max() > 1e-3, f"{name} has no effect"


@torch.no_grad()
def test_lengths_come_from_the_inputs():
    """Text length, latent frames and reference length are not hard-coded."""
    model = Hallo3Transformer3DModel(**TINY_TRANSFORMER).eval()
    inputs = tiny_inputs(batch_size=1, num_frames=4, text_len=5)
    inputs["reference_hidden_states"] = [torch.randn(1, 48, 64) for _ in range(2)]  # two reference frames
    out = model(**inputs).sample
    assert out.shape == (1, 4, 16, 8, 12) and torch.isfinite(out).all()


def test_mismatched_audio_length_is_a_clear_error():
    model = Hallo3Transformer3DModel(**TINY_TRANSFORMER)
    inputs = tiny_inputs(batch_size=1)
    inputs["audio_embeds"] = inputs["audio_embeds"][:, :45]
    with pytest.raises(ValueError, match="49 pixel frames of audio"):
        model(**inputs)


@torch.no_grad()
def test_reference_net_bank_is_the_modulated_input_of_each_block():
    reference_net = Hallo3ReferenceNet(**TINY_STOCK).eval()
    latent = torch.randn(1, 1, 16, 8, 12)
    text = torch.zeros(1, 8, 32)
    bank = reference_net(latent, text, 0.0)
    assert len(bank) == 2 and bank[0].shape == (1, 24, 64)
    # layer 0's bank: norm1 applied to the patch-embedded tokens of the latent seen twice on channels (architecture 4.2)
    video, text_tokens, temb, _ = reference_net.embed(torch.cat([latent, latent], dim=2), text, 0.0)
    torch.testing.assert_close(bank[0], reference_net.transformer_blocks[0].norm1(video, text_tokens, temb)[0])


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(3)
    model = Hallo3Transformer3DModel(**TINY_TRANSFORMER)
    inputs = tiny_inputs(batch_size=1)

    def loss_and_grads():
        model.zero_grad()
        loss = model(**inputs).sample.square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_plain, grads_plain = loss_and_grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads()
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=0, rtol=0)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_declares_what_diffusers_hooks_need():
    assert Hallo3Transformer3DModel._no_split_modules == ["Hallo3Block", "Hallo3PatchEmbed"]
    assert Hallo3Transformer3DModel._supports_gradient_checkpointing
    model = Hallo3Transformer3DModel(**TINY_TRANSFORMER)
    # layerwise casting: weights stored in fp8, norms and the patch embedding stay fp32
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert model.transformer_blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    assert model.transformer_blocks[0].norm1.linear.weight.dtype == torch.float32
    assert model.patch_embed.proj.weight.dtype == torch.float32
    out = model(**tiny_inputs(batch_size=1)).sample
    assert torch.isfinite(out).all()


def test_other_cogvideox_variants_are_rejected():
    with pytest.raises(ValueError, match="CogVideoX-5B-I2V 1.0"):
        Hallo3Transformer3DModel(**TINY_TRANSFORMER, patch_size_t=2)


def test_pairwise_conv_equals_conv1d():
    from hallo3.transformer_hallo3 import PairwiseConv1d

    conv = PairwiseConv1d(12)
    frames = torch.randn(3, 12, 10)
    expected = torch.nn.functional.conv1d(frames, conv.weight, conv.bias, stride=2)
    torch.testing.assert_close(conv(frames), expected, atol=1e-6, rtol=1e-5)
