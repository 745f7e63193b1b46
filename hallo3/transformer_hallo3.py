"""Hallo3's two networks in diffusers form: the denoising transformer and the reference network.

Both are the CogVideoX-5B-I2V transformer with diffusers parameter names, so a diffusers-format CogVideoX checkpoint
loads into either with only the Hallo3 keys missing. The denoiser adds, per block, reference tokens in the joint
self-attention, a face cross-attention and an audio cross-attention, plus the audio and face projections. The file
reads top to bottom: rotary tables -> patch embedding -> attention -> projections -> block -> models.

Section numbers ("architecture 3.3") refer to docs/architecture.md: 3.x the denoiser, 4.x the reference network,
5.x the audio and face conditioning, 12.x the quirks of the official code that are reproduced here.
"""

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.hooks import TaylorSeerCacheConfig
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionModuleMixin, FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import (
    CogVideoXPatchEmbed,
    TimestepEmbedding,
    Timesteps,
    apply_rotary_emb,
    get_1d_rotary_pos_embed,
)
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNorm, CogVideoXLayerNormZero
from diffusers.utils import BaseOutput, apply_lora_scale, logging
from torch import nn


logger = logging.get_logger(__name__)

RotaryEmbedding = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ConditioningTokens:
    """What the denoiser makes of the identity, face and audio inputs before its blocks (step 3 of its forward).

    None of it depends on the denoising step, and only the audio tokens depend on the clip, so a caller hands the
    value of one call (`Hallo3TransformerOutput.conditioning_tokens`) to the next instead of the raw inputs: the
    pipeline keeps one per video (without audio) and one per clip. Computing it inside `forward` keeps diffusers'
    offload hooks in charge of where the projection weights are. A None field is a modality not given (yet).

    Args:
        reference_key_values: per layer, the reference tokens' keys and values, each [1 or B, N_ref, H, Dh].
        face_tokens (`torch.Tensor`): [B, num_face_tokens, face_hidden_size].
        audio_tokens (`torch.Tensor`): [B, latent frames, num_audio_tokens, audio_hidden_size].
    """

    reference_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    face_tokens: torch.Tensor | None = None
    audio_tokens: torch.Tensor | None = None

    def without_audio(self) -> "ConditioningTokens":
        """The part that holds for every clip of a video."""
        return dataclasses.replace(self, audio_tokens=None)


@dataclass
class Hallo3TransformerOutput(BaseOutput):
    """
    Args:
        sample (`torch.Tensor`): the v-prediction [B, F, C, H, W].
        conditioning_tokens (`ConditioningTokens`): the tokens this call used; pass them to later calls to skip their
            computation.
    """

    sample: torch.Tensor
    conditioning_tokens: ConditioningTokens | None = None


def get_3d_rotary_emb(
    head_dim: int, num_frames: int, height: int, width: int, theta: float = 10000.0, device=None
) -> RotaryEmbedding:
    """3D RoPE tables of the official code (architecture 3.5): cos and sin of shape [num_frames * height * width, head_dim].

    The head dim is split t/h/w = d/4, 3d/8, 3d/8; each part uses frequencies theta^(-2j/d_part) on integer positions,
    each frequency repeated for two adjacent channels (interleaved pairs). Rows are ordered (t, h, w) like the tokens.
    """
    if head_dim % 16:
        raise ValueError(f"3D RoPE splits the head dim into quarters of even size; `head_dim` {head_dim} is not 16k.")
    dim_t, dim_hw = head_dim // 4, head_dim * 3 // 8
    tables = []
    for axis, (dim, length) in enumerate(((dim_t, num_frames), (dim_hw, height), (dim_hw, width))):
        positions = torch.arange(length, dtype=torch.float32, device=device)
        cos, sin = get_1d_rotary_pos_embed(dim, positions, theta, use_real=True, repeat_interleave_real=True)
        shape = [1, 1, 1, dim]
        shape[axis] = length
        tables.append((cos.view(shape), sin.view(shape)))
    grid = (num_frames, height, width)
    cos = torch.cat([c.expand(*grid, -1) for c, _ in tables], dim=-1).reshape(-1, head_dim)
    sin = torch.cat([s.expand(*grid, -1) for _, s in tables], dim=-1).reshape(-1, head_dim)
    return cos, sin


class Hallo3PatchEmbed(CogVideoXPatchEmbed):
    """CogVideoX patch embedding whose learned positions are sliced to the frames actually given.

    diffusers' `CogVideoXPatchEmbed` swaps the learned table for sin-cos positions whenever the frame count differs from
    `sample_frames`, which would break the one-frame reference network (architecture 12.29). Text tokens take the rows
    `[0, text_len)`, video tokens the rows after `max_text_seq_length`: at the official shapes (226 text tokens) this
    is exactly the official `pos_embedding[:, :226 + num_video_tokens]`.
    """

    def forward(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        text_embeds = self.text_proj(text_embeds)

        batch_size, num_frames, channels, height, width = image_embeds.shape
        image_embeds = self.proj(image_embeds.reshape(-1, channels, height, width))
        image_embeds = image_embeds.view(batch_size, num_frames, *image_embeds.shape[1:])
        image_embeds = image_embeds.flatten(3).transpose(2, 3)  # [B, F, h*w, D]
        image_embeds = image_embeds.flatten(1, 2)  # [B, F*h*w, D], tokens ordered (t, h, w)

        if height != self.sample_height or width != self.sample_width:
            raise ValueError(
                f"The learned positional embedding covers a {self.sample_height}x{self.sample_width} latent; "
                f"got {height}x{width}. Resize the video to the resolution the checkpoint was trained at."
            )
        text_len, video_len = text_embeds.shape[1], image_embeds.shape[1]
        max_video_len = self.pos_embedding.shape[1] - self.max_text_seq_length
        if text_len > self.max_text_seq_length or video_len > max_video_len:
            raise ValueError(
                f"At most {self.max_text_seq_length} text tokens and {max_video_len} video tokens have learned "
                f"positions; got {text_len} and {video_len}."
            )
        pos_embedding = self.pos_embedding.to(dtype=image_embeds.dtype)
        text_pos = pos_embedding[:, :text_len]
        video_pos = pos_embedding[:, self.max_text_seq_length : self.max_text_seq_length + video_len]
        return torch.cat([text_embeds + text_pos, image_embeds + video_pos], dim=1).contiguous()


class Hallo3AttnProcessor:
    """Joint self-attention over [text; video] plus optional reference keys/values (architecture 3.5, 12.6).

    Queries exist only for text and video tokens: the official code also computes queries for the reference tokens and
    then drops their outputs, which changes nothing since attention is independent per query. RoPE goes on the video
    tokens only, after the q/k LayerNorms.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: "Hallo3Attention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        image_rotary_emb: RotaryEmbedding | None = None,
        reference_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_seq_length = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))  # [B, S, H, Dh]
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None and attn.norm_k is not None:
            query = attn.norm_q(query)
            key = attn.norm_k(key)

        if image_rotary_emb is not None:
            query = torch.cat(
                [
                    query[:, :text_seq_length],
                    apply_rotary_emb(query[:, text_seq_length:], image_rotary_emb, sequence_dim=1),
                ],
                dim=1,
            )
            key = torch.cat(
                [
                    key[:, :text_seq_length],
                    apply_rotary_emb(key[:, text_seq_length:], image_rotary_emb, sequence_dim=1),
                ],
                dim=1,
            )

        if reference_key_value is not None:
            reference_key, reference_value = reference_key_value
            batch_size = query.shape[0]
            key = torch.cat([key, reference_key.expand(batch_size, -1, -1, -1)], dim=1)
            value = torch.cat([value, reference_value.expand(batch_size, -1, -1, -1)], dim=1)

        hidden_states = dispatch_attention_fn(
            query, key, value, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        hidden_states = hidden_states.flatten(2, 3).type_as(query)  # [B, S, H*Dh], head-major like the official merge
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states[:, text_seq_length:], hidden_states[:, :text_seq_length]


class Hallo3CrossAttnProcessor:
    """Per-frame cross-attention from video tokens to face or audio tokens (architecture 3.6, 12.4, 12.5).

    The official code routes this through the self-attention's hook chain, so the block's own q/k LayerNorms normalise
    the queries and the keys, and the queries get the RoPE of latent frame 0 (spatial angles only). Keys are not
    rotated. There is no gate.
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: "Hallo3Attention",
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        norm_q: nn.Module,
        norm_k: nn.Module,
        query_rotary_emb: RotaryEmbedding,
    ) -> torch.Tensor:
        query = norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)))  # [B*F, N, H, Dh]
        key = norm_k(attn.to_k(encoder_hidden_states).unflatten(-1, (attn.heads, -1)))  # [B*F, M, H, Dh]
        value = attn.to_v(encoder_hidden_states).unflatten(-1, (attn.heads, -1))
        query = apply_rotary_emb(query, query_rotary_emb, sequence_dim=1)

        hidden_states = dispatch_attention_fn(
            query, key, value, backend=self._attention_backend, parallel_config=self._parallel_config
        )
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden_states))


class Hallo3Attention(nn.Module, AttentionModuleMixin):
    """Attention with diffusers' `to_q/to_k/to_v/norm_q/norm_k/to_out` names, so stock CogVideoX weights load as they are.

    Args:
        query_dim (`int`): width of the query stream.
        heads (`int`), dim_head (`int`): number and width of the heads.
        kv_dim (`int`, *optional*): width of the key/value stream for cross-attention; the query width when omitted.
        qk_norm (`bool`): own q/k LayerNorms (self-attention); the cross-attentions borrow the block's.
        eps (`float`): epsilon of the q/k LayerNorms (1e-6 in the official code).
    """

    _default_processor_cls = Hallo3AttnProcessor
    _available_processors = [Hallo3AttnProcessor, Hallo3CrossAttnProcessor]
    # set by `AttentionModuleMixin`; declared for type checkers, which see `nn.Module.__getattr__` otherwise
    processor: Any
    set_processor: Callable[..., None]

    def __init__(
        self,
        query_dim: int,
        heads: int,
        dim_head: int,
        kv_dim: int | None = None,
        bias: bool = True,
        qk_norm: bool = True,
        eps: float = 1e-6,
        elementwise_affine: bool = True,
        processor=None,
    ):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(kv_dim or query_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(kv_dim or query_dim, inner_dim, bias=bias)
        self.norm_q = nn.LayerNorm(dim_head, eps=eps, elementwise_affine=elementwise_affine) if qk_norm else None
        self.norm_k = nn.LayerNorm(dim_head, eps=eps, elementwise_affine=elementwise_affine) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim, bias=True), nn.Dropout(0.0)])
        self.set_processor(processor if processor is not None else self._default_processor_cls())

    def reference_key_value(self, reference_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the reference tokens: this block's projections and key norm, no RoPE (architecture 3.3)."""
        if self.norm_k is None:
            raise ValueError("Reference keys go through the self-attention's key norm; this attention has none.")
        key = self.norm_k(self.to_k(reference_hidden_states).unflatten(-1, (self.heads, -1)))
        value = self.to_v(reference_hidden_states).unflatten(-1, (self.heads, -1))
        return key, value

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, **kwargs):
        return self.processor(self, hidden_states, encoder_hidden_states, **kwargs)


class PairwiseConv1d(nn.Conv1d):
    """Conv1d with kernel 2 and stride 2, computed as one matrix product over frame pairs.

    Same parameters and result as `nn.Conv1d`, but CPU convolution kernels copy the whole weight first, and for the
    audio projection's 1.2 B-parameter `conv1` that copy is 2.4-4.8 GB. `weight.flatten(1)` is a view, so the
    matrix product needs no copy. A module (not a function) so that diffusers' casting and offload hooks still run.
    """

    def __init__(self, channels: int):
        super().__init__(channels, channels, kernel_size=2, stride=2)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, C, F] (F even) -> [B, C, F / 2]."""
        pairs = frames.unflatten(-1, (-1, 2)).permute(0, 2, 1, 3).flatten(2)  # [B, F/2, C*2], index c*2 + k
        return F.linear(pairs, self.weight.flatten(1), self.bias).transpose(1, 2)


class AudioProjection(nn.Module):
    """wav2vec windows -> audio tokens per latent frame (architecture 5.2, official `AudioProjModel`).

    Each pixel frame's window [window, layers, channels] goes through three linear layers to `num_tokens` tokens. The
    frame axis is then compressed like the causal VAE: frame 0 is kept and the rest pass through the same stride-2
    `conv1`, once per halving of the temporal compression ratio (49 -> 25 -> 13 for a ratio of 4).
    """

    def __init__(
        self,
        window: int = 5,
        num_layers: int = 12,
        channels: int = 768,
        intermediate_dim: int = 512,
        hidden_size: int = 768,
        num_tokens: int = 32,
        num_compressions: int = 2,
    ):
        super().__init__()
        self.num_tokens = num_tokens
        self.num_compressions = num_compressions
        self.proj1 = nn.Linear(window * num_layers * channels, intermediate_dim)
        self.proj2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.proj3 = nn.Linear(intermediate_dim, num_tokens * hidden_size)
        self.conv1 = PairwiseConv1d(num_tokens * hidden_size)
        self.norm = nn.LayerNorm(hidden_size)

    def compress_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, C, F] -> [B, C, ceil(F / 2)]: odd lengths keep frame 0 unconvolved, like the causal VAE."""
        if frames.shape[-1] % 2 == 1:
            return torch.cat([frames[..., :1], self.conv1(frames[..., 1:])], dim=-1)
        return self.conv1(frames)

    def forward(self, audio_embeds: torch.Tensor) -> torch.Tensor:
        """[B, pixel frames, window, layers, channels] -> audio tokens [B, latent frames, num_tokens, hidden_size]."""
        hidden_states = audio_embeds.flatten(2)  # (window, layer, channel) order
        hidden_states = F.relu(self.proj1(hidden_states))
        hidden_states = F.relu(self.proj2(hidden_states))
        hidden_states = self.proj3(hidden_states)  # [B, F, num_tokens * hidden], token-major

        hidden_states = hidden_states.transpose(1, 2)  # [B, C, F]
        for _ in range(self.num_compressions):
            hidden_states = self.compress_frames(hidden_states)
        hidden_states = hidden_states.transpose(1, 2).unflatten(-1, (self.num_tokens, -1))  # [B, T, M, D]
        return self.norm(hidden_states)


class FaceProjection(nn.Module):
    """Identity embedding -> face tokens (architecture 5.3, official `FaceProjModel`)."""

    def __init__(self, embed_dim: int = 512, hidden_size: int = 1024, num_tokens: int = 4):
        super().__init__()
        self.num_tokens = num_tokens
        self.proj = nn.Linear(embed_dim, num_tokens * hidden_size)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, face_embeds: torch.Tensor) -> torch.Tensor:
        """[B, embed_dim] -> [B, num_tokens, hidden_size]."""
        return self.norm(self.proj(face_embeds).unflatten(-1, (self.num_tokens, -1)))


class Hallo3Block(nn.Module):
    """CogVideoX block with reference tokens, face and audio cross-attention (architecture 3.3).

    Order: adaLN -> joint self-attention over [text; video; reference] -> gated residual -> face cross-attention ->
    residual -> audio cross-attention -> residual -> adaLN MLP -> gated residual.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        time_embed_dim: int,
        face_hidden_size: int | None = None,
        audio_hidden_size: int | None = None,
        dropout: float = 0.0,
        activation_fn: str = "gelu-approximate",
        attention_bias: bool = True,
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        qk_norm_eps: float = 1e-6,
        ff_inner_dim: int | None = None,
    ):
        super().__init__()
        # 1. Self-attention
        self.norm1 = CogVideoXLayerNormZero(time_embed_dim, dim, norm_elementwise_affine, norm_eps, bias=True)
        self.attn1 = Hallo3Attention(
            dim,
            num_attention_heads,
            attention_head_dim,
            bias=attention_bias,
            eps=qk_norm_eps,
            elementwise_affine=norm_elementwise_affine,
        )

        # 2. Face and audio cross-attention (no q/k norms of their own: they borrow attn1's)
        def cross_attention(context_dim: int | None) -> tuple[nn.LayerNorm | None, Hallo3Attention | None]:
            if context_dim is None:
                return None, None
            norm = nn.LayerNorm(dim, norm_eps, norm_elementwise_affine)
            attention = Hallo3Attention(
                dim,
                num_attention_heads,
                attention_head_dim,
                kv_dim=context_dim,
                bias=attention_bias,
                qk_norm=False,
                processor=Hallo3CrossAttnProcessor(),
            )
            return norm, attention

        self.norm_face, self.attn_face = cross_attention(face_hidden_size)
        self.norm_audio, self.attn_audio = cross_attention(audio_hidden_size)

        # 3. Feed-forward
        self.norm2 = CogVideoXLayerNormZero(time_embed_dim, dim, norm_elementwise_affine, norm_eps, bias=True)
        self.ff = FeedForward(
            dim, dropout=dropout, activation_fn=activation_fn, final_dropout=True, inner_dim=ff_inner_dim, bias=True
        )

    def per_frame_cross_attention(
        self,
        attn: Hallo3Attention,
        norm: nn.LayerNorm,
        hidden_states: torch.Tensor,
        context_tokens: torch.Tensor,
        image_rotary_emb: RotaryEmbedding,
    ) -> torch.Tensor:
        """Video tokens of each latent frame attend to that frame's context tokens; returns the residual update."""
        batch_size = hidden_states.shape[0]
        num_frames = context_tokens.shape[0] // batch_size
        tokens_per_frame = hidden_states.shape[1] // num_frames
        queries = norm(hidden_states).reshape(batch_size * num_frames, tokens_per_frame, -1)  # b-major, frame-minor
        frame0_rotary_emb = (image_rotary_emb[0][:tokens_per_frame], image_rotary_emb[1][:tokens_per_frame])
        out = attn(
            queries,
            context_tokens,
            norm_q=self.attn1.norm_q,
            norm_k=self.attn1.norm_k,
            query_rotary_emb=frame0_rotary_emb,
        )
        return out.reshape(batch_size, num_frames * tokens_per_frame, -1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: RotaryEmbedding,
        reference_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        face_tokens: torch.Tensor | None = None,
        audio_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            hidden_states (`torch.Tensor`): video tokens [B, F*h*w, D].
            encoder_hidden_states (`torch.Tensor`): text tokens [B, S, D].
            temb (`torch.Tensor`): time embedding [B, time_embed_dim].
            image_rotary_emb: RoPE tables for the video tokens, each [F*h*w, head_dim].
            reference_key_value: this block's reference keys and values, each [1 or B, N_ref, H, Dh].
            face_tokens, audio_tokens (`torch.Tensor`): [B*F, M, D_ctx], b-major.
        """
        text_seq_length = encoder_hidden_states.shape[1]

        # 1. Self-attention
        norm_hidden_states, norm_encoder_hidden_states, gate_msa, enc_gate_msa = self.norm1(
            hidden_states, encoder_hidden_states, temb
        )
        attn_hidden_states, attn_encoder_hidden_states = self.attn1(
            norm_hidden_states,
            norm_encoder_hidden_states,
            image_rotary_emb=image_rotary_emb,
            reference_key_value=reference_key_value,
        )
        hidden_states = hidden_states + gate_msa * attn_hidden_states
        encoder_hidden_states = encoder_hidden_states + enc_gate_msa * attn_encoder_hidden_states

        # 2. Face and audio cross-attention, ungated
        if face_tokens is not None:
            assert self.attn_face is not None and self.norm_face is not None, "face tokens need face modules"
            hidden_states = hidden_states + self.per_frame_cross_attention(
                self.attn_face, self.norm_face, hidden_states, face_tokens, image_rotary_emb
            )
        if audio_tokens is not None:
            assert self.attn_audio is not None and self.norm_audio is not None, "audio tokens need audio modules"
            hidden_states = hidden_states + self.per_frame_cross_attention(
                self.attn_audio, self.norm_audio, hidden_states, audio_tokens, image_rotary_emb
            )

        # 3. Feed-forward over [text; video]
        norm_hidden_states, norm_encoder_hidden_states, gate_ff, enc_gate_ff = self.norm2(
            hidden_states, encoder_hidden_states, temb
        )
        ff_output = self.ff(torch.cat([norm_encoder_hidden_states, norm_hidden_states], dim=1))
        hidden_states = hidden_states + gate_ff * ff_output[:, text_seq_length:]
        encoder_hidden_states = encoder_hidden_states + enc_gate_ff * ff_output[:, :text_seq_length]
        return hidden_states, encoder_hidden_states


# diffusers' block-level caches (FirstBlockCache, MagCache, SeaCache) and layer skipping look blocks up in this registry
# to find where the two streams are returned; registering here, with the class, makes them work on any instance
# (`transformer.enable_cache(FirstBlockCacheConfig(...))`) without a setup call. The registry is private API.
TransformerBlockRegistry.register(
    model_class=Hallo3Block,
    metadata=TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=1),
)


class Hallo3Transformer3DModel(ModelMixin, ConfigMixin, PeftAdapterMixin, CacheMixin):
    """The Hallo3 denoiser: CogVideoX-5B-I2V plus reference tokens, face and audio conditioning (architecture 3, 5).

    The defaults are the released 5B model. The stock part keeps diffusers' `CogVideoXTransformer3DModel` names, so its
    weights load with only `norm_face`, `attn_face`, `norm_audio`, `attn_audio`, `audio_proj` and `face_proj` missing.
    `Hallo3ReferenceNet` has this same config; it builds neither the face nor the audio modules.

    Args:
        add_face_module (`bool`): the face projection and each block's face cross-attention.
        face_embed_dim (`int`): identity embedding width (ArcFace 512).
        face_hidden_size (`int`), num_face_tokens (`int`): face tokens per video, repeated for every latent frame.
        add_audio_module (`bool`): the audio projection and each block's audio cross-attention; False for the stage-1
            (identity only) network.
        audio_window (`int`), audio_num_layers (`int`), audio_channels (`int`): shape of one frame's wav2vec window.
        audio_intermediate_dim (`int`), audio_hidden_size (`int`), num_audio_tokens (`int`): audio projection sizes.
        final_norm_eps (`float`): epsilon of `norm_out.norm`; the official code uses 1e-6 where diffusers uses 1e-5.
        qk_norm_eps (`float`): epsilon of the q/k LayerNorms (1e-6 in the official code).
        Other arguments are those of `CogVideoXTransformer3DModel`; the stock-only ones are validated, not used.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["Hallo3Block", "Hallo3PatchEmbed"]
    _skip_layerwise_casting_patterns = ["patch_embed", "norm"]
    _repeated_blocks = ["Hallo3Block"]
    # TaylorSeer forecasts these modules' outputs between full steps. diffusers' default patterns (`^transformer_blocks
    # .*attn`, matched whole) name no CogVideoX module, since ours end in `attn1`, `attn_face`, `ff`.
    _taylorseer_cache_identifiers = [
        r"transformer_blocks\.\d+\.attn1",
        r"transformer_blocks\.\d+\.attn_face",
        r"transformer_blocks\.\d+\.attn_audio",
        r"transformer_blocks\.\d+\.ff",
    ]
    # the reference network shares the config and never reaches the cross-attentions (architecture 4)
    builds_face_and_audio_modules = True
    # declared for type checkers: an nn.ModuleList yields plain Modules, these are Hallo3Blocks
    transformer_blocks: Any

    @register_to_config
    def __init__(
        self,
        # CogVideoX-5B-I2V (diffusers' `CogVideoXTransformer3DModel` arguments)
        num_attention_heads: int = 48,
        attention_head_dim: int = 64,
        in_channels: int = 32,
        out_channels: int = 16,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        time_embed_dim: int = 512,
        text_embed_dim: int = 4096,
        num_layers: int = 42,
        dropout: float = 0.0,
        attention_bias: bool = True,
        # the resolution, clip length and text length the learned positions cover
        sample_width: int = 90,
        sample_height: int = 60,
        sample_frames: int = 49,
        patch_size: int = 2,
        temporal_compression_ratio: int = 4,
        max_text_seq_length: int = 226,
        activation_fn: str = "gelu-approximate",
        timestep_activation_fn: str = "silu",
        norm_elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        final_norm_eps: float = 1e-6,
        qk_norm_eps: float = 1e-6,
        ff_inner_dim: int | None = None,
        rope_theta: float = 10000.0,
        use_rotary_positional_embeddings: bool = True,
        use_learned_positional_embeddings: bool = True,
        patch_size_t: int | None = None,
        ofs_embed_dim: int | None = None,
        # identity: the face projection and cross-attention
        add_face_module: bool = True,
        face_embed_dim: int = 512,
        face_hidden_size: int = 1024,
        num_face_tokens: int = 4,
        # speech: the audio projection and cross-attention
        add_audio_module: bool = True,
        audio_window: int = 5,
        audio_num_layers: int = 12,
        audio_channels: int = 768,
        audio_intermediate_dim: int = 512,
        audio_hidden_size: int = 768,
        num_audio_tokens: int = 32,
    ):
        super().__init__()
        if (
            not (use_rotary_positional_embeddings and use_learned_positional_embeddings)
            or patch_size_t
            or ofs_embed_dim
        ):
            raise ValueError(
                "Hallo3 is built on CogVideoX-5B-I2V 1.0 (RoPE and learned positions, no temporal patches, no ofs "
                "embedding); this config describes another CogVideoX variant."
            )
        inner_dim = num_attention_heads * attention_head_dim
        add_face_module = add_face_module and self.builds_face_and_audio_modules
        add_audio_module = add_audio_module and self.builds_face_and_audio_modules

        # 1. Patch embedding with learned positions over [text; video]
        self.patch_embed = Hallo3PatchEmbed(
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=inner_dim,
            text_embed_dim=text_embed_dim,
            bias=True,
            sample_width=sample_width,
            sample_height=sample_height,
            sample_frames=sample_frames,
            temporal_compression_ratio=temporal_compression_ratio,
            max_text_seq_length=max_text_seq_length,
            use_positional_embeddings=False,
            use_learned_positional_embeddings=True,
        )
        self.embedding_dropout = nn.Dropout(dropout)

        # 2. Time embedding
        self.time_proj = Timesteps(inner_dim, flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(inner_dim, time_embed_dim, timestep_activation_fn)

        # 4. Blocks
        self.transformer_blocks = nn.ModuleList(
            [
                Hallo3Block(
                    dim=inner_dim,
                    num_attention_heads=num_attention_heads,
                    attention_head_dim=attention_head_dim,
                    time_embed_dim=time_embed_dim,
                    face_hidden_size=face_hidden_size if add_face_module else None,
                    audio_hidden_size=audio_hidden_size if add_audio_module else None,
                    dropout=dropout,
                    activation_fn=activation_fn,
                    attention_bias=attention_bias,
                    norm_elementwise_affine=norm_elementwise_affine,
                    norm_eps=norm_eps,
                    qk_norm_eps=qk_norm_eps,
                    ff_inner_dim=ff_inner_dim,
                )
                for _ in range(num_layers)
            ]
        )
        self.norm_final = nn.LayerNorm(inner_dim, norm_eps, norm_elementwise_affine)

        # 5. Output: adaLN (shift first) with the official 1e-6 epsilon, then per-patch projection
        self.norm_out = AdaLayerNorm(
            embedding_dim=time_embed_dim,
            output_dim=2 * inner_dim,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=final_norm_eps,
            chunk_dim=1,
        )
        self.proj_out = nn.Linear(inner_dim, patch_size * patch_size * out_channels)

        # 3. Conditioning projections, computed once per call (or reused, see `ConditioningTokens`) for all blocks.
        # Built last, as they always were: a seeded random init (tiny-random, the tests) draws the same weights
        # and the parameter order (optimizer groups, EMA shards) is unchanged.
        self.face_proj = FaceProjection(face_embed_dim, face_hidden_size, num_face_tokens) if add_face_module else None
        self.audio_proj = None
        if add_audio_module:
            self.audio_proj = AudioProjection(
                audio_window,
                audio_num_layers,
                audio_channels,
                audio_intermediate_dim,
                audio_hidden_size,
                num_audio_tokens,
                num_compressions=int(math.log2(temporal_compression_ratio)),
            )

        self.gradient_checkpointing = False

    def embed(
        self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, RotaryEmbedding]:
        """Steps 1 and 2 of `forward`: patch embedding, RoPE tables and time embedding; returns (video tokens, text
        tokens, temb, rope)."""
        batch_size, num_frames, _, height, width = hidden_states.shape
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        timestep = timestep.expand(batch_size) if timestep.ndim == 0 else timestep

        tokens = self.embedding_dropout(self.patch_embed(encoder_hidden_states, hidden_states))
        text_seq_length = encoder_hidden_states.shape[1]
        p = self.config.patch_size
        image_rotary_emb = get_3d_rotary_emb(
            self.config.attention_head_dim,
            num_frames,
            height // p,
            width // p,
            self.config.rope_theta,
            device=hidden_states.device,
        )

        # timesteps carry no weights and always come out f32; the embedding MLP may run in bf16
        temb = self.time_embedding(self.time_proj(timestep).to(dtype=hidden_states.dtype))
        return tokens[:, text_seq_length:], tokens[:, :text_seq_length], temb, image_rotary_emb

    def enable_cache(self, config) -> None:
        """diffusers' `CacheMixin.enable_cache`; a `TaylorSeerCacheConfig` without module patterns gets this model's
        attention and feed-forward modules (`_taylorseer_cache_identifiers`) instead of patterns that match nothing."""
        if (
            isinstance(config, TaylorSeerCacheConfig)
            and not config.use_lite_mode
            and config.cache_identifiers is None
            and config.skip_predict_identifiers is None
        ):
            config = dataclasses.replace(config, cache_identifiers=list(self._taylorseer_cache_identifiers))
        super().enable_cache(config)

    def run_block(self, block: Hallo3Block, *args) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def conditioning_tokens(
        self,
        reference_hidden_states: list[torch.Tensor] | None,
        face_embeds: torch.Tensor | None,
        audio_embeds: torch.Tensor | None,
        reuse: ConditioningTokens | None,
    ) -> ConditioningTokens:
        """Step 3 of `forward`: each modality's tokens from `reuse` when it holds them, else from the raw input."""
        reuse = reuse or ConditioningTokens()
        reference_key_values, face_tokens, audio_tokens = (
            reuse.reference_key_values,
            reuse.face_tokens,
            reuse.audio_tokens,
        )
        if reference_key_values is None and reference_hidden_states is not None:
            if len(reference_hidden_states) != len(self.transformer_blocks):
                raise ValueError(
                    f"The reference bank has {len(reference_hidden_states)} layers; this transformer has "
                    f"{len(self.transformer_blocks)}. Use the reference network of the same checkpoint."
                )
            reference_key_values = [
                block.attn1.reference_key_value(bank)
                for block, bank in zip(self.transformer_blocks, reference_hidden_states)
            ]
        if face_tokens is None and face_embeds is not None:
            if self.face_proj is None:
                raise ValueError("`face_embeds` given to a transformer built without face modules.")
            face_tokens = self.face_proj(face_embeds)
        if audio_tokens is None and audio_embeds is not None:
            if self.audio_proj is None:
                raise ValueError("`audio_embeds` given to a transformer built without audio modules (stage 1).")
            audio_tokens = self.audio_proj(audio_embeds)
        return ConditioningTokens(reference_key_values, face_tokens, audio_tokens)

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        reference_hidden_states: list[torch.Tensor] | None = None,
        face_embeds: torch.Tensor | None = None,
        audio_embeds: torch.Tensor | None = None,
        conditioning_tokens: ConditioningTokens | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> tuple[torch.Tensor] | Hallo3TransformerOutput:
        """
        Args:
            hidden_states (`torch.Tensor`): [B, F, C_in, H, W], the noisy latent concatenated with the image latent on
                channels (16 + 16 for the released model).
            encoder_hidden_states (`torch.Tensor`): T5 states [B, S, text_embed_dim]; zeros for the unconditional row.
            timestep (`torch.Tensor` or `float`): the DDPM timestep per row, [B] or a scalar.
            reference_hidden_states (`list[torch.Tensor]`): the reference bank, one [1 or B, N_ref, D] per layer.
            face_embeds (`torch.Tensor`): identity embedding [B, face_embed_dim].
            audio_embeds (`torch.Tensor`): wav2vec windows [B, pixel frames, window, layers, channels]; zeros give the
                unconditional audio tokens (`audio_proj(0)`, as the official code does).
            conditioning_tokens (`ConditioningTokens`, *optional*): tokens an earlier call returned; a modality found
                there is not computed again, and its raw input above is not read.
            attention_kwargs (`dict`, *optional*): `{"scale": s}` scales the loaded LoRA adapters for this call.

        Returns:
            `Hallo3TransformerOutput`: the v-prediction [B, F, out_channels, H, W] and the conditioning tokens used.
        """
        batch_size, num_frames, _, height, width = hidden_states.shape

        # 1. Patch embedding (+ learned positions) and RoPE, 2. time embedding
        hidden_states, encoder_hidden_states, temb, image_rotary_emb = self.embed(
            hidden_states, encoder_hidden_states, timestep
        )

        # 3. Conditioning tokens, once for all blocks
        tokens = self.conditioning_tokens(reference_hidden_states, face_embeds, audio_embeds, conditioning_tokens)
        face_tokens = audio_tokens = None
        if tokens.face_tokens is not None:
            face_tokens = tokens.face_tokens.repeat_interleave(num_frames, dim=0)  # [B*F, M, D], b-major
        if tokens.audio_tokens is not None:
            if tokens.audio_tokens.shape[1] != num_frames:
                raise ValueError(
                    f"The audio covers {tokens.audio_tokens.shape[1]} latent frames; the video has {num_frames}. Give "
                    f"{(num_frames - 1) * self.config.temporal_compression_ratio + 1} pixel frames of audio."
                )
            audio_tokens = tokens.audio_tokens.flatten(0, 1)  # [B*F, M, D], b-major

        # 4. Blocks
        for i, block in enumerate(self.transformer_blocks):
            reference_key_value = tokens.reference_key_values[i] if tokens.reference_key_values is not None else None
            hidden_states, encoder_hidden_states = self.run_block(
                block,
                hidden_states,
                encoder_hidden_states,
                temb,
                image_rotary_emb,
                reference_key_value,
                face_tokens,
                audio_tokens,
            )

        # 5. Output layers and unpatchify: feature order (channel, dy, dx)
        hidden_states = self.norm_final(hidden_states)
        hidden_states = self.proj_out(self.norm_out(hidden_states, temb=temb))
        p = self.config.patch_size
        output = hidden_states.reshape(batch_size, num_frames, height // p, width // p, -1, p, p)
        output = output.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4)  # [B, F, C, H, W]

        if not return_dict:
            return (output,)
        return Hallo3TransformerOutput(sample=output, conditioning_tokens=tokens)


class Hallo3ReferenceNet(Hallo3Transformer3DModel):
    """The reference network: the stock CogVideoX-5B-I2V transformer run on one latent frame (architecture 4).

    The denoiser's config and modules, without the face and audio ones (their arguments are accepted and ignored).
    Its forward returns the bank, the per-layer modulated image tokens that enter each block's self-attention
    ([B, N_ref, D] per layer). It stops once it has the last layer's tokens: the rest of the network does not touch
    the bank. The output layers are kept so that stock and converted checkpoints load strictly.
    """

    builds_face_and_audio_modules = False

    @apply_lora_scale("attention_kwargs")
    def forward(  # type: ignore[override]  # same inputs up to step 2, returns the bank
        self,
        reference_latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor | float = 0.0,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> list[torch.Tensor]:
        """
        Args:
            reference_latents (`torch.Tensor`): [B, 1, C, H, W], the masked reference latent. The network sees it
                twice on channels, where the denoiser sees the noisy latent beside the image latent (architecture 4.2).
            encoder_hidden_states (`torch.Tensor`): [B, S, text_embed_dim]; zeros at inference (architecture 12.9).
            timestep: 0 at inference and in training.
            attention_kwargs (`dict`, *optional*): `{"scale": s}` scales the loaded LoRA adapters for this call.

        Returns:
            `list[torch.Tensor]`: the bank, one [B, F*h*w, D] tensor per layer.
        """
        hidden_states = torch.cat([reference_latents, reference_latents], dim=2)
        # 1. Patch embedding (+ learned positions) and RoPE, 2. time embedding
        hidden_states, encoder_hidden_states, temb, image_rotary_emb = self.embed(
            hidden_states, encoder_hidden_states, timestep
        )
        # 4. Blocks, up to the last block's modulated input
        bank = []
        last = len(self.transformer_blocks) - 1
        for i, block in enumerate(self.transformer_blocks):
            bank.append(block.norm1(hidden_states, encoder_hidden_states, temb)[0])
            if i == last:
                break
            hidden_states, encoder_hidden_states = self.run_block(
                block, hidden_states, encoder_hidden_states, temb, image_rotary_emb
            )
        return bank
