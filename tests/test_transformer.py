"""The denoiser and reference network: stock-weight compatibility, invariants and training plumbing."""

import re

import pytest
import torch
from accelerate.utils import compute_module_sizes, infer_auto_device_map
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
    """Text length, latent frames and reference length are read from the inputs, not fixed (8 text tokens, 13 frames
    and a 1-frame reference are the tiny model's config): 5 text tokens, 4 latent frames and a 2-frame (48-token)
    reference must take the learned positions, RoPE rows and attention keys written out here."""

    def plain_rope(head_dim: int, num_frames: int, height: int, width: int, theta: float = 10000.0):
        """cos, sin [F*h*w, head_dim] token by token: the head dim split t/h/w = d/4, 3d/8, 3d/8, each part rotating
        interleaved channel pairs by position x theta^(-2j/d_part)."""
        parts = (head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8)
        rows = []
        for t in range(num_frames):
            for h in range(height):
                for w in range(width):
                    angles = []
                    for position, dim in zip((t, h, w), parts):
                        frequencies = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
                        angles.append((position * frequencies).repeat_interleave(2))
                    rows.append(torch.cat(angles))
        angles = torch.stack(rows)
        return angles.cos().float(), angles.sin().float()

    def plain_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """[B, S, H, Dh]: each channel pair (a, b) -> (a cos - b sin, b cos + a sin)."""
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return x * cos[None, :, None] + rotated * sin[None, :, None]

    model = Hallo3Transformer3DModel(**TINY_TRANSFORMER).eval()
    max_text, heads, head_dim = (
        TINY_TRANSFORMER[k] for k in ("max_text_seq_length", "num_attention_heads", "attention_head_dim")
    )
    # random learned positions, so that any other rows than the right ones show
    model.patch_embed.pos_embedding.copy_(torch.randn_like(model.patch_embed.pos_embedding))
    num_frames, text_len, reference_len = 4, 5, 48
    inputs = tiny_inputs(batch_size=1, num_frames=num_frames, text_len=text_len)
    inputs["reference_hidden_states"] = [torch.randn(1, reference_len, 64) for _ in range(2)]
    seen = {}
    hooks = [
        model.patch_embed.register_forward_hook(lambda module, args, output: seen.update(tokens=output)),
        model.transformer_blocks[0].attn1.register_forward_hook(
            lambda module, args, kwargs, output: seen.update(attn_in=args, attn_out=output), with_kwargs=True
        ),
    ]
    try:
        out = model(**inputs).sample
    finally:
        for hook in hooks:
            hook.remove()
    assert out.shape == (1, num_frames, 16, 8, 12) and torch.isfinite(out).all()

    # learned positions: text rows [0, text_len), video rows from max_text_seq_length on; video tokens in (t, h, w)
    embed, positions = model.patch_embed, model.patch_embed.pos_embedding[0].float()  # the table is stored in fp64
    text = embed.text_proj(inputs["encoder_hidden_states"][0]) + positions[:text_len]
    patches = [embed.proj(inputs["hidden_states"][:, t])[0] for t in range(num_frames)]  # [D, 4, 6] per frame
    video = torch.stack([p[:, h, w] for p in patches for h in range(4) for w in range(6)])
    video = video + positions[max_text : max_text + len(video)]
    torch.testing.assert_close(seen["tokens"][0], torch.cat([text, video]))

    # RoPE for the 4 given frames, rows (t, h, w); the model's table is the official one
    cos, sin = plain_rope(head_dim, num_frames, 4, 6)
    for table, plain in zip(get_3d_rotary_emb(head_dim, num_frames, 4, 6), (cos, sin)):
        torch.testing.assert_close(table, plain, atol=1e-6, rtol=0)

    # block 0's joint attention, written out: RoPE on the video tokens after the text, and the 48 reference tokens as
    # 48 extra keys and values (key norm, no RoPE)
    attn = model.transformer_blocks[0].attn1
    video_in, text_in = seen["attn_in"]
    assert text_in.shape[1] == text_len
    tokens = torch.cat([text_in, video_in], dim=1)
    query, key, value = (proj(tokens).unflatten(-1, (heads, head_dim)) for proj in (attn.to_q, attn.to_k, attn.to_v))
    query, key = attn.norm_q(query), attn.norm_k(key)
    query = torch.cat([query[:, :text_len], plain_rotate(query[:, text_len:], cos, sin)], dim=1)
    key = torch.cat([key[:, :text_len], plain_rotate(key[:, text_len:], cos, sin)], dim=1)
    bank = inputs["reference_hidden_states"][0]
    reference_key = attn.norm_k(attn.to_k(bank).unflatten(-1, (heads, head_dim)))
    reference_value = attn.to_v(bank).unflatten(-1, (heads, head_dim))

    def attention(keys, values):
        weights = (torch.einsum("bqhd,bkhd->bhqk", query, keys) / head_dim**0.5).softmax(dim=-1)
        mixed = torch.einsum("bhqk,bkhd->bqhd", weights, values).flatten(2)
        return attn.to_out[0](mixed)

    expected = attention(torch.cat([key, reference_key], dim=1), torch.cat([value, reference_value], dim=1))
    video_out, text_out = seen["attn_out"]
    torch.testing.assert_close(video_out, expected[:, text_len:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text_out, expected[:, :text_len], atol=1e-5, rtol=1e-4)
    half = attention(
        torch.cat([key, reference_key[:, :24]], dim=1), torch.cat([value, reference_value[:, :24]], dim=1)
    )
    assert (half - expected).abs().max() > 1e-3  # the second reference frame counts


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


@pytest.mark.filterwarnings("ignore:Current model requires .* bytes of buffer")  # accelerate, about GPU 0 and 1
def test_declares_what_diffusers_hooks_need():
    """`device_map` loading must keep each block, and the patch embedding with its position table, on one device,
    whatever the memory limits: sweep the limits of two GPUs so that every cut point of the model comes up."""

    def tensor_devices(device_map: dict, model: torch.nn.Module, prefix: str) -> set:
        """Devices a device map puts the weights and buffers of submodule `prefix` on (each goes where its longest key in
        the map says; None for one the map leaves out, as accelerate does with a split module's own buffers)."""
        devices = set()
        for name in model.state_dict():
            if name.startswith(prefix + "."):
                owners = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
                devices.add(device_map[max(owners, key=len)] if owners else None)
        return devices

    assert Hallo3Transformer3DModel._supports_gradient_checkpointing
    model = Hallo3Transformer3DModel(**TINY_TRANSFORMER)
    # what diffusers' from_pretrained(device_map=...) hands to accelerate
    no_split = model._get_no_split_modules("sequential")
    total = compute_module_sizes(model)[""]
    kept_whole = ["patch_embed"] + [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]
    spread = 0
    for step in range(1, 40):
        limit = total * step // 80  # 1/80 .. 1/2 of the model per GPU
        device_map = infer_auto_device_map(
            model, max_memory={0: limit, 1: limit, "cpu": 10 * total}, no_split_module_classes=no_split
        )
        placed = [tensor_devices(device_map, model, prefix) for prefix in kept_whole]
        for prefix, devices in zip(kept_whole, placed):
            assert len(devices) == 1, f"{prefix} split across {devices} by {dict(device_map)}"
        spread += len(set.union(*placed)) > 1
    assert spread >= 20  # the limits did cut the model between these modules

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
