"""Hallo3Pipeline: portrait + speech waveform (+ prompt) -> talking video frames of any length (architecture 6, 7).

The pipeline sees images and arrays, never paths: `hallo3.inference` turns files into its inputs and its frames into
an mp4. One call runs the clip loop: 49-frame clips that overlap by `motion_frames` frames, each denoised with the
official sampler and decoded before the next clip is conditioned on its last frames.
"""

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKLCogVideoX, DiffusionPipeline
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedTokenizerBase, T5EncoderModel, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from .clip_loop import (
    ClipLoopState,
    audio_windows,
    clip_audio_indices,
    gather_clip_audio,
    motion_frame_mask,
    num_clips,
)
from .encoding import decode_latents, encode_frames, encode_image_latents, encode_text
from .lora import Hallo3LoraLoaderMixin
from .parallel import CFGParallel
from .preprocessing.audio import AudioEncoder
from .remote_code import push_folder, resolve_for_installed_package, write_remote_code
from .scheduling_hallo3 import Hallo3DPMScheduler
from .settings import DEFAULTS, check_settings
from .transformer_hallo3 import ConditioningTokens, Hallo3ReferenceNet, Hallo3Transformer3DModel


logger = logging.get_logger(__name__)

ImageInput: TypeAlias = PIL.Image.Image | np.ndarray | torch.Tensor
OUTPUT_TYPES = ("np", "pt", "pil", "latent")
# T5 length of CogVideoX, used when no transformer is loaded to say otherwise (a prompt-encoding pipeline)
DEFAULT_TEXT_LENGTH = 226


@dataclass
class Hallo3PipelineOutput(BaseOutput):
    """
    Args:
        frames: the video batched like diffusers' video pipelines, so `frames[0]` is the video: [1, num_frames, H, W,
            3] in [0, 1] for "np", a [1, num_frames, 3, H, W] tensor for "pt", `[[PIL images]]` for "pil". For
            "latent", the denoised latents of the clips concatenated on frames, [1, clips x 13, 16, h, w] (each clip's
            first latent frame holds its motion frames). None when the frames were handed to `on_frames` instead.
        num_frames (`int`): frames generated: ceil(audio seconds x fps), fewer if the call was interrupted.
    """

    frames: np.ndarray | torch.Tensor | list[list[PIL.Image.Image]] | None
    num_frames: int


def dynamic_guidance_scale(scale: float, step: int, num_steps: int, exponent: float = 5.0) -> float:
    """A guidance ramp from 1 to `scale`: 1 + (scale - 1)(1 - cos(pi p^exponent)) / 2 with p = step / (num_steps - 1).

    The official config names a cosine schedule (scale 6, exponent 5) but overwrites it with a constant 3.5 and feeds
    it the timestep instead of the step (architecture 12.1); this is the schedule it describes, on the step index.
    """
    progress = step / max(num_steps - 1, 1)
    return 1 + (scale - 1) * (1 - math.cos(math.pi * progress**exponent)) / 2


@dataclass
class Guidance:
    """Guidance scales of a call; `at` gives the (text, audio) scales of one step."""

    scale: float
    audio_scale: float | None
    dynamic: bool

    def at(self, step: int, num_steps: int) -> tuple[float, float | None]:
        if not self.dynamic:
            return self.scale, self.audio_scale
        audio = None if self.audio_scale is None else dynamic_guidance_scale(self.audio_scale, step, num_steps)
        return dynamic_guidance_scale(self.scale, step, num_steps), audio


class Hallo3Pipeline(DiffusionPipeline, Hallo3LoraLoaderMixin):
    r"""Audio-driven portrait animation with Hallo3 on CogVideoX-5B-I2V.

    Components:
        tokenizer, text_encoder: T5 v1.1 XXL (226 tokens, no attention mask, as CogVideoX).
        vae ([`AutoencoderKLCogVideoX`]): the CogVideoX 3D VAE, `scaling_factor` 0.7.
        transformer ([`Hallo3Transformer3DModel`]): the denoiser.
        reference_net ([`Hallo3ReferenceNet`]): identity features, run once per video.
        scheduler ([`Hallo3DPMScheduler`]): the official sampler.
        audio_feature_extractor, audio_encoder: wav2vec2-base-960h, all hidden layers.

    All but the tokenizer and T5 are optional, so a pipeline of those two encodes prompts on its own (encode once,
    free T5, pass `prompt_embeds`); a video needs them all. The scheduler defaults to the official sampler.
    """

    model_cpu_offload_seq = "text_encoder->reference_net->transformer->vae"
    # a default value makes diffusers treat a component as a config argument unless it is listed here; the scheduler
    # is listed for that reason only (it defaults to the official sampler)
    _optional_components = [
        "vae",
        "transformer",
        "reference_net",
        "scheduler",
        "audio_feature_extractor",
        "audio_encoder",
    ]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: T5EncoderModel,
        vae: AutoencoderKLCogVideoX | None = None,
        transformer: Hallo3Transformer3DModel | None = None,
        reference_net: Hallo3ReferenceNet | None = None,
        scheduler: Hallo3DPMScheduler | None = None,
        audio_feature_extractor: Wav2Vec2FeatureExtractor | None = None,
        audio_encoder: Wav2Vec2Model | None = None,
    ):
        super().__init__()
        scheduler = scheduler if scheduler is not None else Hallo3DPMScheduler()
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            reference_net=reference_net,
            scheduler=scheduler,
            audio_feature_extractor=audio_feature_extractor,
            audio_encoder=audio_encoder,
        )
        self.vae_scale_factor_spatial = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.vae_scale_factor_temporal = vae.config.temporal_compression_ratio if vae is not None else 4
        self._current_timestep: torch.Tensor | None = None
        self._guidance_scale = 1.0
        self._attention_kwargs: dict[str, Any] | None = None
        self._num_timesteps = 0
        self._interrupt = False
        self._cfg_parallel: CFGParallel | None = None

    # ---------------------------------------------------------------------------------------------------------------
    # diffusers' standard call state (also what cache callbacks read: `lambda: pipe.current_timestep`)

    @property
    def guidance_scale(self) -> float:
        """The text guidance of the current step (the ramped value with `use_dynamic_cfg`)."""
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        """Sampler steps per clip of the current or last call."""
        return self._num_timesteps

    @property
    def current_timestep(self) -> torch.Tensor | None:
        """The timestep being denoised; None outside the denoising loop."""
        return self._current_timestep

    @property
    def attention_kwargs(self) -> dict[str, Any] | None:
        return self._attention_kwargs

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (e.g. from `callback_on_step_end`) to stop: the remaining steps of the clip
        are skipped, the clip is decoded, and no further clip starts."""
        return self._interrupt

    # ---------------------------------------------------------------------------------------------------------------
    # Saving and loading (see hallo3.remote_code): the folder also loads through DiffusionPipeline with remote code

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """`DiffusionPipeline.save_pretrained`, plus the remote-code entries that let
        `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` load the folder (or the Hub repo that
        `push_to_hub=True` makes of it). `Hallo3Pipeline.from_pretrained` reads it without running any of them."""
        hub_kwargs = {
            k: kwargs.pop(k) for k in ("repo_id", "token", "private", "commit_message", "create_pr") if k in kwargs
        }
        super().save_pretrained(save_directory, push_to_hub=False, **kwargs)
        write_remote_code(Path(save_directory))
        if push_to_hub:
            push_folder(
                Path(save_directory), hub_kwargs.pop("repo_id", None) or Path(save_directory).name, **hub_kwargs
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """`DiffusionPipeline.from_pretrained` for a local folder or a Hub repo id. A repo is downloaded first, so
        that its model_index.json is read as a folder's is (see `_dict_from_json_file`)."""
        if not os.path.isdir(pretrained_model_name_or_path):
            from huggingface_hub import snapshot_download

            hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
            pretrained_model_name_or_path = snapshot_download(str(pretrained_model_name_or_path), **hub_kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict:
        # This class is the pipeline: the folder's remote-code entries resolve to this package, so none of its files
        # run (diffusers would otherwise require trust_remote_code to load our own class)
        return resolve_for_installed_package(super()._dict_from_json_file(json_file))

    # ---------------------------------------------------------------------------------------------------------------
    # Sizes the checkpoint fixes

    @property
    def height(self) -> int:
        return self.transformer.config.sample_height * self.vae_scale_factor_spatial

    @property
    def width(self) -> int:
        return self.transformer.config.sample_width * self.vae_scale_factor_spatial

    @property
    def clip_length(self) -> int:
        """Pixel frames per clip: 49 for the released model (13 latent frames)."""
        return self.transformer.config.sample_frames

    @property
    def fps(self) -> int:
        return 25

    # ---------------------------------------------------------------------------------------------------------------
    # Memory and speed options (see hallo3.memory and docs/performance.md)

    def enable_memory_mode(self, mode: str, device: str | torch.device = "cuda") -> None:
        """'none', 'model-offload', 'group-offload', 'sequential-offload' (quantized modes are chosen at load)."""
        from .memory import apply_memory_mode

        apply_memory_mode(self, mode, device)

    def enable_step_cache(self, kind: str, threshold: float = 0.1) -> None:
        """Skip work between denoising steps with one of diffusers' caches, set up for this pipeline:
        'first-block' (FirstBlockCache: reuse the remaining blocks' residual while the first block's output changes
        less than `threshold`), 'taylorseer' (TaylorSeer forecasting of every attention and feed-forward),
        'faster' (FasterCache attention reuse) or 'pyramid-attention-broadcast'. Approximate: docs/performance.md
        gives each one's speed-up and difference from the uncached video. Any other diffusers cache config works
        through `pipe.transformer.enable_cache(config)`; `pipe.transformer.disable_cache()` removes it."""
        from diffusers import (
            FasterCacheConfig,
            FirstBlockCacheConfig,
            PyramidAttentionBroadcastConfig,
            TaylorSeerCacheConfig,
        )

        configs = {
            "first-block": lambda: FirstBlockCacheConfig(threshold=threshold),
            # a full step every other step, factors in the model's dtype (diffusers' defaults, every 5th step and bf16
            # factors, were 7x further from the uncached video in docs/performance.md)
            "taylorseer": lambda: TaylorSeerCacheConfig(cache_interval=2, taylor_factors_dtype=self.transformer.dtype),
            "faster": lambda: FasterCacheConfig(
                current_timestep_callback=lambda: self.current_timestep,
                attention_weight_callback=lambda _: 0.5,
                is_guidance_distilled=True,  # our CFG rows share one call; its uncond-skipping does not apply
            ),
            "pyramid-attention-broadcast": lambda: PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=2,
                spatial_attention_timestep_skip_range=(100, 800),
                current_timestep_callback=lambda: self.current_timestep,
            ),
        }
        if kind not in configs:
            raise ValueError(f"step cache must be one of {', '.join(configs)}; got {kind!r}.")
        self.transformer.enable_cache(configs[kind]())

    def enable_cfg_parallel(self, parallel: CFGParallel | None = None) -> None:
        """Split the guidance rows of every step across the processes of `torch.distributed` (one per GPU, started
        with `torchrun`); see `hallo3.parallel`. Each process must hold the whole pipeline on its own device."""
        self._cfg_parallel = parallel if parallel is not None else CFGParallel.from_default_group()

    def compile_transformer(self, **compile_kwargs) -> None:
        """torch.compile each repeated block (`Hallo3Block`): the same speed-up as compiling the model, a fraction
        of the compile time."""
        self.transformer.compile_repeated_blocks(**compile_kwargs)
        self.reference_net.compile_repeated_blocks(**compile_kwargs)

    def set_attention_backend(self, backend: str) -> None:
        """diffusers attention backend for every attention ('native', 'flash', 'sage', '_native_cudnn', ...)."""
        self.transformer.set_attention_backend(backend)
        self.reference_net.set_attention_backend(backend)

    def progress_bar(self, iterable=None, total=None, desc: str | None = None, leave: bool = True, initial: int = 0):
        """diffusers' tqdm bar with a label; the clip bar and the step bar are shown together (gradio tracks both).
        `initial`: the clips a resumed run already has."""
        bar = super().progress_bar(iterable=iterable, total=total)
        if desc:
            bar.set_description(desc)
        if initial:
            bar.update(initial)
        bar.leave = leave
        return bar

    # ---------------------------------------------------------------------------------------------------------------
    # Steps of the recipe

    def check_inputs(
        self,
        image,
        audio,
        num_inference_steps,
        guidance_scale,
        audio_guidance_scale,
        motion_frames,
        callback_on_step_end_tensor_inputs,
        output_type,
        prompt=None,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        on_frames=None,
    ):
        if not isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor)):
            raise ValueError(f"`image` must be a PIL image, an array or a tensor, got {type(image).__name__}.")
        if not isinstance(audio, (np.ndarray, torch.Tensor)) or audio.ndim != 1 or len(audio) == 0:
            raise ValueError("`audio` must be a non-empty mono waveform at 16 kHz (1-D array or tensor).")
        check_settings(
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            audio_guidance_scale=audio_guidance_scale,
            motion_frames=motion_frames,
        )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {', '.join(OUTPUT_TYPES)}; got {output_type!r}.")
        if output_type == "latent" and on_frames is not None:
            raise ValueError("`on_frames` streams decoded frames; it cannot be combined with `output_type='latent'`.")
        if prompt and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None and (embeds.ndim != 3 or embeds.shape[0] != 1):
                raise ValueError(
                    f"`{name}` must be T5 states [1, S, D] (one video per call), got {tuple(embeds.shape)}."
                )
        if (
            prompt_embeds is not None
            and negative_prompt_embeds is not None
            and prompt_embeds.shape != negative_prompt_embeds.shape
        ):
            raise ValueError(
                "`prompt_embeds` and `negative_prompt_embeds` must have the same shape, got "
                f"{tuple(prompt_embeds.shape)} and {tuple(negative_prompt_embeds.shape)}."
            )
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` may name {self._callback_tensor_inputs}; got {unknown}."
            )

    @torch.no_grad()
    def encode_prompt(
        self,
        prompt: str = "",
        negative_prompt: str | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 states of the prompt and of the unconditional branch, each [1, S, D].

        The unconditional branch is zero text states, as in the official code, unless `negative_prompt` (or
        `negative_prompt_embeds`) is given. Given embeddings are passed through (cast to `dtype`), so a caller can
        encode once with a tokenizer + T5 pipeline, free T5, and hand `prompt_embeds` to the video pipeline.

        Args:
            max_sequence_length: tokens to pad to; the transformer's `max_text_seq_length` (226) by default.
            device, dtype: where the states go; the execution device and the transformer's (else T5's) dtype.
        """
        device = device or self._execution_device
        transformer = self.transformer
        if dtype is None:
            dtype = transformer.dtype if transformer is not None else self.text_encoder.dtype
        if max_sequence_length is None:
            max_sequence_length = (
                transformer.config.max_text_seq_length if transformer is not None else DEFAULT_TEXT_LENGTH
            )
        if prompt_embeds is None:
            prompt_embeds = encode_text(self.tokenizer, self.text_encoder, [prompt], max_sequence_length, device)
        if negative_prompt_embeds is None:
            if negative_prompt is None:
                negative_prompt_embeds = torch.zeros_like(prompt_embeds)
            else:
                negative_prompt_embeds = encode_text(
                    self.tokenizer, self.text_encoder, [negative_prompt], max_sequence_length, device
                )
        return prompt_embeds.to(device=device, dtype=dtype), negative_prompt_embeds.to(device=device, dtype=dtype)

    def preprocess_image(self, image: ImageInput, device: torch.device) -> torch.Tensor:
        """[1, 3, H, W] in [-1, 1] at the model's resolution (already framed by `hallo3.preprocessing.image`)."""
        if isinstance(image, PIL.Image.Image):
            image = np.asarray(image.convert("RGB"))
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image)
            image = image.permute(2, 0, 1) if image.shape[-1] == 3 else image  # HWC -> CHW
            image = image * 2 - 1
        image = image.unsqueeze(0) if image.ndim == 3 else image
        if tuple(image.shape[-2:]) != (self.height, self.width):
            raise ValueError(
                f"`image` must be {self.width}x{self.height} (frame it with hallo3.preprocessing.image.frame_portrait);"
                f" got {image.shape[-1]}x{image.shape[-2]}."
            )
        return image.to(device=device, dtype=torch.float32)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """[1, F, C, h, w] -> pixel frames [F', 3, H, W] in [0, 1]; the VAE decodes in chunks of latent frames."""
        return decode_latents(self.vae, latents)

    @torch.no_grad()
    def compute_reference_bank(
        self, reference_image: torch.Tensor, text_shape: torch.Size, generator: torch.Generator | None
    ) -> list[torch.Tensor]:
        """Per-layer identity tokens of the face-masked reference image, at t=0 with zero text (architecture 4.2).

        They depend on neither the clip nor the step, so the video computes them once.
        """
        reference_latent = encode_frames(self.vae, reference_image[:, None], generator)  # [1, 1, C, h, w]
        zero_text = torch.zeros(text_shape, device=reference_latent.device, dtype=self.reference_net.dtype)
        timestep = torch.zeros(1, device=reference_latent.device)
        return self.reference_net(
            reference_latent.to(self.reference_net.dtype), zero_text, timestep, attention_kwargs=self.attention_kwargs
        )

    def prepare_image_latents(
        self,
        image: torch.Tensor,
        motion: torch.Tensor | None,
        num_latent_frames: int,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """The conditioning latent [1, T, C, h, w] of the clip: its first frame and the motion frames [K, 3, H, W]
        under a fresh mask (architecture 6.1, 12.14)."""
        masked_motion = None
        if motion is not None:
            mask = motion_frame_mask(self.height, self.width, generator=generator, device=image.device)
            masked_motion = (motion * mask)[None]
        return encode_image_latents(self.vae, image[None], masked_motion, num_latent_frames, generator)

    def guide(
        self, prediction: torch.Tensor, guidance_scale: float, audio_guidance_scale: float | None
    ) -> torch.Tensor:
        """Classifier-free guidance over the batched branches.

        `prediction` holds the rows' x0 estimates. Two rows [uncond, cond]: x0 = u + g (c - u), the official joint
        guidance. Three rows [uncond, text only, cond]: x0 = u + g (t - u) + g_a (c - t); text guidance g, audio
        guidance g_a. With g_a = g this is the two-row result.
        """
        if audio_guidance_scale is None:
            uncond, cond = prediction.chunk(2)
            return uncond + guidance_scale * (cond - uncond)
        uncond, text_only, cond = prediction.chunk(3)
        return uncond + guidance_scale * (text_only - uncond) + audio_guidance_scale * (cond - text_only)

    # ---------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        audio: np.ndarray | torch.Tensor,
        reference_image: ImageInput | None = None,
        face_embeds: torch.Tensor | np.ndarray | None = None,
        prompt: str = DEFAULTS.prompt,
        num_inference_steps: int = DEFAULTS.num_inference_steps,
        guidance_scale: float = DEFAULTS.guidance_scale,
        audio_guidance_scale: float | None = DEFAULTS.audio_guidance_scale,
        use_dynamic_cfg: bool = DEFAULTS.use_dynamic_cfg,
        motion_frames: int = DEFAULTS.motion_frames,
        generator: torch.Generator | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        on_frames: Callable[[np.ndarray], None] | None = None,
        callback_on_step_end: Callable[["Hallo3Pipeline", int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | tuple[str, ...] = ("latents",),
        disable_reference: bool = DEFAULTS.disable_reference,
        disable_face_embedding: bool = DEFAULTS.disable_face_embedding,
        disable_audio: bool = DEFAULTS.disable_audio,
        negative_prompt: str | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        resume_from: ClipLoopState | None = None,
        on_clip_end: Callable[[ClipLoopState], None] | None = None,
    ) -> Hallo3PipelineOutput | tuple:
        r"""
        Args:
            image: the framed portrait at the model's resolution (PIL, uint8 HWC array, or [-1, 1] tensor).
            audio: mono waveform at 16 kHz; the video is ceil(seconds x 25) frames long.
            reference_image: the face-masked portrait, framed like `image`; `image` itself when omitted.
            face_embeds: identity embedding [512] or [1, 512] (raw ArcFace); zeros when omitted.
            prompt: what the scene looks like; the unconditional branch uses zero text states, as the official code.
            num_inference_steps: sampler steps per clip (50 official).
            guidance_scale: joint text+audio guidance (3.5 official).
            audio_guidance_scale: separate audio guidance through a third branch (text, no audio); see `guide`. When
                None or equal to `guidance_scale`, the official two-branch guidance runs and no extra pass is made.
            use_dynamic_cfg: ramp both scales from 1 to their value over the steps (`dynamic_guidance_scale`).
            motion_frames: frames each clip takes from the previous one (2 as trained; 0..3 supported).
            Defaults and limits of these settings: `hallo3.settings`.
            generator: drives the motion masks, VAE posterior samples, initial noise and sampler noise.
            output_type: "np", "pt", "pil" or "latent" (see `Hallo3PipelineOutput`).
            on_frames: called with each clip's new frames as uint8 [n, H, W, 3] as soon as they are decoded; the
                frames are then not kept, so memory stays flat however long the audio (returned `frames` is None).
            callback_on_step_end: `fn(pipe, step, timestep, {"latents": ...})`, may return replacement latents.
            disable_reference, disable_face_embedding, disable_audio: ablations that drop the identity reference
                tokens, the face cross-attention, or the audio (every row gets the unconditional silence tokens).
            on_clip_end: called after each clip (after `on_frames`) with the `ClipLoopState` that continues from it.
            resume_from: a `ClipLoopState` from an earlier call with the same inputs and seed: the loop starts at its
                clip and the result is exactly that of an unbroken call (the reference bank is computed as on a
                fresh start, so `generator` must be seeded as it was, and is then set to the saved state).
            negative_prompt: text for the unconditional branch instead of the official zero states.
            prompt_embeds, negative_prompt_embeds: T5 states [1, S, D] computed beforehand (`encode_prompt`), so T5
                need not be loaded; `prompt` / `negative_prompt` must then be left out.
            attention_kwargs: passed to the transformer and the reference net; `{"scale": s}` scales loaded LoRAs.

        Examples:
            ```py
            >>> from diffusers.utils import export_to_video
            >>> from hallo3 import Hallo3Pipeline
            >>> pipe = Hallo3Pipeline.from_pretrained("path/to/hallo3-diffusers")
            >>> out = pipe(image=framed_image, audio=waveform_16k, reference_image=masked, prompt="A woman talking")
            >>> export_to_video(out.frames[0], "talking.mp4", fps=pipe.fps)
            ```
        """
        # 1. Check inputs
        self.check_inputs(
            image,
            audio,
            num_inference_steps,
            guidance_scale,
            audio_guidance_scale,
            motion_frames,
            callback_on_step_end_tensor_inputs,
            output_type,
            prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            on_frames,
        )
        if audio_guidance_scale is not None and audio_guidance_scale == guidance_scale:
            audio_guidance_scale = None  # the official two-branch guidance, no extra pass
        guidance = Guidance(guidance_scale, audio_guidance_scale, use_dynamic_cfg)
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        self._current_timestep = None
        device = self._execution_device
        dtype = self.transformer.dtype
        num_branches = 2 if audio_guidance_scale is None else 3

        # 2. Text: T5 states for the prompt, zeros (or the negative prompt) for the unconditional rows
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, device=device, dtype=dtype
        )
        text = torch.cat([negative_prompt_embeds] + [prompt_embeds] * (num_branches - 1))

        # 3. Audio: wav2vec2 features, one per video frame, in windows of 5
        waveform = audio.cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio, dtype=np.float32)
        features, num_frames = AudioEncoder(self.audio_encoder, self.audio_feature_extractor, self.fps)(
            waveform, clip_length=self.clip_length
        )
        windows = audio_windows(features, window=self.transformer.config.audio_window)

        # 4. Images and identity
        image = self.preprocess_image(image, device)[0]
        reference = self.preprocess_image(reference_image, device) if reference_image is not None else image[None]
        if face_embeds is None:
            face_embeds = torch.zeros(1, self.transformer.config.face_embed_dim)
        face_embeds = torch.as_tensor(face_embeds).reshape(1, -1)
        face_rows: torch.Tensor | None = face_embeds.to(device=device, dtype=dtype).expand(num_branches, -1)
        if disable_face_embedding:
            face_rows = None

        # 5. Reference bank, once per video
        bank = None if disable_reference else self.compute_reference_bank(reference, prompt_embeds.shape, generator)

        # 6. Clip loop
        latent_frames = (self.clip_length - 1) // self.vae_scale_factor_temporal + 1
        latent_shape = (
            1,
            latent_frames,
            self.transformer.config.out_channels,
            self.height // self.vae_scale_factor_spatial,
            self.width // self.vae_scale_factor_spatial,
        )
        total_clips = num_clips(num_frames, self.clip_length, motion_frames)
        motion = image[None].expand(motion_frames, -1, -1, -1) if motion_frames else None  # clip 0: the image itself
        kept_frames: list[torch.Tensor] = []
        kept_latents: list[torch.Tensor] = []
        frames_done, first_clip = 0, 0
        if resume_from is not None:  # after the bank, whose draws a fresh start makes too
            first_clip, frames_done = resume_from.next_clip, resume_from.frames_done
            if resume_from.motion is not None:
                motion = resume_from.motion.to(device=image.device, dtype=image.dtype)
            if generator is not None and resume_from.generator_state is not None:
                generator.set_state(resume_from.generator_state)
        # reference keys/values and face tokens: computed by the first step of the first clip, kept for the video
        video_tokens = ConditioningTokens()
        with self.progress_bar(total=total_clips, desc="clips", initial=first_clip) as clip_bar:
            for clip in range(first_clip, total_clips):
                indices = clip_audio_indices(clip, len(windows), self.clip_length, motion_frames)
                clip_audio = gather_clip_audio(windows, indices)[None].to(device=device, dtype=dtype)
                if disable_audio:
                    clip_audio = torch.zeros_like(clip_audio)
                silence = torch.zeros_like(clip_audio)
                audio_rows = torch.cat([silence] * (num_branches - 1) + [clip_audio])

                image_latents = self.prepare_image_latents(image, motion, latent_frames, generator)
                image_latents = image_latents.expand(num_branches, -1, -1, -1, -1).to(dtype)
                latents = randn_tensor(latent_shape, generator=generator, device=device, dtype=torch.float32)
                raw_inputs = dict(reference_hidden_states=bank, face_embeds=face_rows, audio_embeds=audio_rows)
                latents, clip_tokens = self.denoise(
                    latents,
                    image_latents,
                    text,
                    raw_inputs,
                    video_tokens,
                    num_inference_steps,
                    guidance,
                    generator,
                    callback_on_step_end,
                    callback_on_step_end_tensor_inputs,
                )
                video_tokens = clip_tokens.without_audio()
                last_clip = clip == total_clips - 1 or self.interrupt
                if output_type == "latent":
                    kept_latents.append(latents.cpu())
                    frames_done += min(self.clip_length - motion_frames, num_frames - frames_done)
                    if motion_frames and not last_clip:  # the next clip is conditioned on this one's last frames
                        motion = self.decode_latents(latents)[-motion_frames:] * 2 - 1
                else:
                    # 7. Decode; the clip's last frames condition the next clip
                    frames = self.decode_latents(latents)  # [49, 3, H, W] in [0, 1]
                    if motion_frames:
                        motion = frames[-motion_frames:] * 2 - 1
                    new_frames = frames[motion_frames:][: num_frames - frames_done]
                    frames_done += len(new_frames)
                    if on_frames is not None:
                        on_frames(self.to_uint8(new_frames))
                    else:
                        kept_frames.append(new_frames.cpu())
                if on_clip_end is not None:
                    generator_state = generator.get_state() if generator is not None else None
                    on_clip_end(ClipLoopState(clip + 1, frames_done, motion, generator_state))
                clip_bar.update()
                if last_clip:
                    break

        self._current_timestep = None
        self.maybe_free_model_hooks()

        # 8. Output, batched like diffusers' video pipelines: frames[0] is the video
        video: np.ndarray | torch.Tensor | list[list[PIL.Image.Image]] | None = None
        if output_type == "latent":
            video = torch.cat(kept_latents, dim=1)  # [1, clips x F, C, h, w]
        elif on_frames is None:
            frames = torch.cat(kept_frames)  # [F, 3, H, W]
            if output_type == "np":
                video = frames.permute(0, 2, 3, 1).numpy()[None]
            elif output_type == "pt":
                video = frames[None]
            else:
                video = [[PIL.Image.fromarray(frame) for frame in self.to_uint8(frames)]]
        if not return_dict:
            return (video, frames_done)
        return Hallo3PipelineOutput(frames=video, num_frames=frames_done)

    @staticmethod
    def to_uint8(frames: torch.Tensor) -> np.ndarray:
        """[n, 3, H, W] in [0, 1] -> uint8 [n, H, W, 3] by truncation, as the official writer does (architecture 12.28)."""
        return (frames.permute(0, 2, 3, 1) * 255).to(torch.uint8).cpu().numpy()

    def denoise(
        self,
        latents: torch.Tensor,
        image_latents: torch.Tensor,
        text: torch.Tensor,
        raw_inputs: dict[str, Any],
        video_tokens: ConditioningTokens,
        num_inference_steps: int,
        guidance: "Guidance",
        generator: torch.Generator | None,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
    ) -> tuple[torch.Tensor, ConditioningTokens]:
        """One clip's sampling loop; returns the clean latents [1, F, C, h, w] and the conditioning tokens it used.

        `raw_inputs` are the transformer's reference bank, face embedding and audio windows for this clip;
        `video_tokens` what earlier clips made of them that holds for this one too. The first step computes the rest
        (the audio tokens, and on the first clip everything); every later step reuses what the step before returned.
        Each clip is a sampling run of its own for diffusers' cache hooks, so their state is reset first.
        """
        num_branches = text.shape[0]
        tokens = video_tokens
        self.transformer._reset_stateful_cache()
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        inputs = raw_inputs
        if self._cfg_parallel is not None:  # this process's guidance rows, once per clip
            inputs = {
                k: self._cfg_parallel.split(v, num_branches) if torch.is_tensor(v) else v for k, v in inputs.items()
            }
        with self.progress_bar(total=num_inference_steps, desc="steps", leave=False) as step_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                text_scale, audio_scale = guidance.at(i, num_inference_steps)
                self._guidance_scale = text_scale
                model_input = torch.cat(
                    [latents.expand(num_branches, -1, -1, -1, -1).to(image_latents.dtype), image_latents], dim=2
                )
                timestep = t.expand(num_branches).float()
                call_text = text
                if self._cfg_parallel is not None:  # this process's guidance rows only
                    split = self._cfg_parallel.split
                    model_input, call_text, timestep = (split(x, num_branches) for x in (model_input, text, timestep))
                # the VP noise level in [0, 1], for caches that read the scheduler's position (SeaCache)
                alpha = self.scheduler.alphas_cumprod_sqrt[i].item()
                with self.transformer.cache_context(
                    "cfg_batch",
                    step_index=i,
                    num_inference_steps=num_inference_steps,
                    timestep=t,
                    sigma=math.sqrt(max(1 - alpha**2, 0.0)),
                ):
                    output = self.transformer(
                        model_input,
                        call_text,
                        timestep,
                        **inputs,
                        conditioning_tokens=tokens,
                        attention_kwargs=self.attention_kwargs,
                    )
                tokens = output.conditioning_tokens
                prediction = output.sample.float()
                if self._cfg_parallel is not None:
                    prediction = self._cfg_parallel.gather(prediction)
                # each row's x0 in fp32, then guidance on x0: the official order (architecture 7.3, 7.4)
                denoised = self.scheduler.predict_original_sample(prediction, latents)
                guided = self.guide(denoised, text_scale, audio_scale)
                latents = self.scheduler.step_denoised(guided, t, latents, generator=generator).prev_sample

                if callback_on_step_end is not None:
                    callback_kwargs = {"latents": latents} if "latents" in callback_on_step_end_tensor_inputs else {}
                    outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = outputs.get("latents", latents)
                step_bar.update()
        return latents, tokens
