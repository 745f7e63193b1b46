"""Where a Hallo3Pipeline comes from (`--model`): a diffusers folder, the official layout, a Hub repo, or tiny-random.

- a full pipeline folder (model_index.json, e.g. from `pipe.save_pretrained`);
- a converter output (`transformer/` + `reference_net/`): T5, VAE and wav2vec2 come from `--base-model` and
  `--wav2vec-model` (Hub ids or folders);
- the official `pretrained_models/` layout, as `hf download fudan-generative-ai/hallo3 --local-dir pretrained_models`
  writes it (`hallo3/latest`, `cogvideox-5b-i2v-sat/vae/3d-vae.pt`, `t5-v1_1-xxl/`, `wav2vec/wav2vec2-base-960h/`,
  `face_analysis/`, `audio_separator/`): the SAT transformer and VAE are converted on first use into
  `pretrained_models/hallo3-diffusers` and reused afterwards; nothing else is needed, `HF_HUB_OFFLINE=1` works;
- a Hub repo id, downloaded with huggingface_hub and then treated as one of the above;
- `tiny-random`: a tiny configuration with random weights built in code, for demos and tests on a CPU. Its output
  is noise shaped like a video; it is labelled as random wherever it appears.

Nothing here unpickles: weights load from safetensors (or through the converter's weights-only loader). Before a
component is built, its files are checked by `hallo3.model_files` (sizes within bounds, the config equal to its
weights' shapes, from headers only); after loading, its weights are checked to be finite. Components that come from
the Hub by id (the default `--base-model` and `--wav2vec-model`) are checked by their libraries only.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLCogVideoX
from safetensors import SafetensorError
from transformers import T5Config, T5EncoderModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from .convert_sat_checkpoint import CheckpointError, convert
from .convert_sat_vae import convert_vae
from .memory import QUANTIZED_MODES, quantization_config, quantize_pipeline
from .model_files import ModelFileError, check_component, check_finite_weights, check_pipeline_folder
from .pipeline_hallo3 import Hallo3Pipeline
from .scheduling_hallo3 import Hallo3DPMScheduler
from .transformer_hallo3 import Hallo3ReferenceNet, Hallo3Transformer3DModel


logger = logging.getLogger(__name__)

TINY_RANDOM = "tiny-random"
DEFAULT_BASE_MODEL = "THUDM/CogVideoX-5b-I2V"
DEFAULT_WAV2VEC = "facebook/wav2vec2-base-960h"
OFFICIAL_CONVERTED = "hallo3-diffusers"  # inside pretrained_models/: the converted transformer, reference net, VAE
RANDOM_WEIGHTS_NOTICE = "tiny-random: RANDOM WEIGHTS, not a trained model; the video is noise"


@dataclass
class LoadedModel:
    """A pipeline and what the user should be told about it."""

    pipeline: Hallo3Pipeline
    name: str
    is_random: bool = False
    face_analysis_dir: Path | None = None
    vocal_separator_dir: Path | None = None

    @property
    def label(self) -> str:
        return RANDOM_WEIGHTS_NOTICE if self.is_random else self.name


class ModelSourceError(ValueError):
    """`--model` names nothing we can load; the message says what was expected."""


# --------------------------------------------------------------------------------------------------------------------
# tiny-random


def tiny_tokenizer():
    """A T5-style unigram tokenizer trained in code on a few sentences: no files, no download."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    corpus = [
        "A woman talking on a dimly lit beach with the waves of the sea behind her",
        "A little girl talking around a campfire",
        "An older man with messy hair is on vacation at the beach",
        "A lady wearing light makeup stands in front of a tropical tree and speaks",
        "a person speaks to the camera",
    ]
    trainer = trainers.UnigramTrainer(
        vocab_size=128, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer)
    from tokenizers.processors import TemplateProcessing

    tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )


# The tiny-random networks: the released structure at 2 layers, 2 heads of 32 and a latent of 8x12 (64x96 pixels)
TINY_TRANSFORMER_CONFIG = dict(
    num_attention_heads=2,
    attention_head_dim=32,
    time_embed_dim=32,
    text_embed_dim=32,
    num_layers=2,
    sample_width=12,
    sample_height=8,
    max_text_seq_length=16,
    face_hidden_size=40,
    num_face_tokens=4,
    audio_num_layers=2,
    audio_channels=32,
    audio_intermediate_dim=32,
    audio_hidden_size=24,
    num_audio_tokens=4,
)


def build_tiny_random_pipeline(seed: int = 0) -> Hallo3Pipeline:
    """The whole Hallo3 path at toy size (64x96 px, 2 layers): seconds per clip on a CPU. Random weights."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0
        )
    )
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        scaling_factor=0.7,
        sample_height=64,
        sample_width=96,
    )
    audio_encoder = Wav2Vec2Model(
        Wav2Vec2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(16,) * 7,
            conv_stride=(5, 2, 2, 2, 2, 2, 2),
            conv_kernel=(10, 3, 3, 3, 3, 2, 2),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
            do_stable_layer_norm=False,
        )
    )
    audio_feature_extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, do_normalize=True, return_attention_mask=False
    )
    transformer = Hallo3Transformer3DModel(**TINY_TRANSFORMER_CONFIG)
    reference_net = Hallo3ReferenceNet(**TINY_TRANSFORMER_CONFIG)
    return Hallo3Pipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=vae.eval(),
        transformer=transformer.eval(),
        reference_net=reference_net.eval(),
        scheduler=Hallo3DPMScheduler(),
        audio_feature_extractor=audio_feature_extractor,
        audio_encoder=audio_encoder.eval(),
    )


# --------------------------------------------------------------------------------------------------------------------
# real weights


@dataclass
class Source:
    """Where one component is read from: a local folder or a Hub repo id, and the subfolder inside it."""

    path: str
    subfolder: str | None = None


def local_folder(source: Source) -> Path | None:
    """The folder `source` reads from when it is on this machine; None for a Hub repo id."""
    root = Path(source.path)
    if not root.is_dir():
        return None
    return root / source.subfolder if source.subfolder else root


# Where each component's files are and what was read from them: component -> (folder, file of each tensor)
CheckedFiles = dict[str, tuple[Path, dict[str, Path]]]


def check_parts(folder: Path, text: Source, vae: Source, wav2vec: str) -> CheckedFiles:
    """`hallo3.model_files` rules for every part `_from_parts` reads from this machine, before anything is built."""
    parts: dict[str, tuple[Path | None, str]] = {
        "transformer": (folder / "transformer", "Hallo3Transformer3DModel"),
        "reference_net": (folder / "reference_net", "Hallo3ReferenceNet"),
        "text_encoder": (local_folder(text), "T5EncoderModel"),
        "vae": (local_folder(vae), "AutoencoderKLCogVideoX"),
        "audio_feature_extractor": (local_folder(Source(wav2vec)), "Wav2Vec2FeatureExtractor"),
        "audio_encoder": (local_folder(Source(wav2vec)), "Wav2Vec2Model"),
    }
    text_root = local_folder(Source(text.path))
    if (
        text_root is not None
    ):  # a diffusers repo keeps the tokenizer beside text_encoder/, the official T5 folder in it
        parts["tokenizer"] = (text_root / "tokenizer" if text.subfolder else text_root, "T5TokenizerFast")
    return {
        name: (part_folder, check_component(part_folder, class_name))
        for name, (part_folder, class_name) in parts.items()
        if part_folder is not None
    }


def check_loaded_weights(pipeline: Hallo3Pipeline, checked: CheckedFiles) -> None:
    """Every checked component's loaded weights are finite (see `hallo3.model_files.check_finite_weights`)."""
    for name, (folder, where) in checked.items():
        module = getattr(pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            check_finite_weights(module, where, folder)


def _from_parts(
    folder: Path, text: Source, vae: Source, wav2vec: str, torch_dtype: torch.dtype, memory_mode: str = "none"
) -> Hallo3Pipeline:
    """Converter output (`transformer/`, `reference_net/`) + T5, VAE and wav2vec2 from their sources; quantized at
    load if asked. The local ones are checked first (`check_parts`)."""
    from transformers import AutoTokenizer

    checked = check_parts(folder, text, vae, wav2vec)

    # a diffusers repo has tokenizer/ and text_encoder/; the official T5 folder is flat (transformers wants no
    # subfolder argument at all then, not None)
    tokenizer_in = {"subfolder": "tokenizer"} if text.subfolder else {}
    encoder_in = {"subfolder": text.subfolder} if text.subfolder else {}
    quantized = dict(quantization_config=quantization_config(memory_mode, "diffusers"), torch_dtype=torch_dtype)
    pipeline = Hallo3Pipeline(
        tokenizer=AutoTokenizer.from_pretrained(text.path, **tokenizer_in),
        text_encoder=T5EncoderModel.from_pretrained(
            text.path,
            **encoder_in,
            torch_dtype=torch_dtype,
            quantization_config=quantization_config(memory_mode, "transformers"),
        ),
        vae=AutoencoderKLCogVideoX.from_pretrained(vae.path, subfolder=vae.subfolder, torch_dtype=torch_dtype),
        transformer=Hallo3Transformer3DModel.from_pretrained(folder / "transformer", **quantized),
        reference_net=Hallo3ReferenceNet.from_pretrained(folder / "reference_net", **quantized),
        scheduler=Hallo3DPMScheduler(),
        audio_feature_extractor=Wav2Vec2FeatureExtractor.from_pretrained(wav2vec),
        # wav2vec2 runs in fp32, as in the official code
        audio_encoder=Wav2Vec2Model.from_pretrained(wav2vec, torch_dtype=torch.float32),
    )
    check_loaded_weights(pipeline, checked)
    return pipeline


def official_layout_sources(folder: Path, base_model: str, wav2vec_model: str | None) -> tuple[Source, Source, str]:
    """T5, VAE and wav2vec2 of the official `pretrained_models/` download, converted where needed (once, into
    `hallo3-diffusers/`): the download alone is enough, nothing comes from the Hub. A part that is missing from the
    folder comes from `base_model` / the official wav2vec2 repo instead, and the log says so."""
    converted = folder / OFFICIAL_CONVERTED
    t5 = folder / "t5-v1_1-xxl"
    text = Source(str(t5)) if t5.is_dir() else Source(base_model, "text_encoder")
    sat_vae = folder / "cogvideox-5b-i2v-sat" / "vae" / "3d-vae.pt"
    if (converted / "vae").is_dir():
        vae = Source(str(converted / "vae"))
    elif sat_vae.is_file():
        logger.info("Converting the official VAE %s into %s (once).", sat_vae, converted / "vae")
        vae = Source(str(convert_vae(sat_vae, converted / "vae")))
    else:
        vae = Source(base_model, "vae")
    local_wav2vec = folder / "wav2vec" / "wav2vec2-base-960h"
    wav2vec = wav2vec_model or (str(local_wav2vec) if local_wav2vec.is_dir() else DEFAULT_WAV2VEC)
    for name, source in (("T5", text.path), ("VAE", vae.path), ("wav2vec2", wav2vec)):
        if not Path(source).exists():
            logger.info("%s: not in %s; from %s.", name, folder, source)
    return text, vae, wav2vec


def local_model_folders(model: str) -> tuple[Path | None, Path | None]:
    """The official `face_analysis` and `audio_separator` folders of a local model source, when it has them; read
    without loading anything, so inputs can be checked with the real face detector before the model loads."""
    folder = Path(model)
    if model == TINY_RANDOM or not folder.is_dir():
        return None, None
    face_dir = folder / "face_analysis"
    separator_dir = folder / "audio_separator"
    return (face_dir if face_dir.is_dir() else None), (separator_dir if separator_dir.is_dir() else None)


def load_pipeline(
    model: str = TINY_RANDOM,
    base_model: str = DEFAULT_BASE_MODEL,
    wav2vec_model: str | None = None,
    torch_dtype: torch.dtype = torch.bfloat16,
    memory_mode: str = "none",
) -> LoadedModel:
    """Resolve `model` (see the module docstring) into a pipeline; raises `ModelSourceError` with a hint.

    Quantized memory modes ('8bit', '4bit', 'int8-torchao') are applied here, at load time; placement (offload) is
    `Hallo3Pipeline.enable_memory_mode`. A folder whose files are damaged (a truncated safetensors file, a broken
    config.json, sizes out of bounds, a config that disagrees with its weights, non-finite weights) is a
    `ModelSourceError` naming the folder and the file's complaint.
    """
    try:
        return _load_pipeline(model, base_model, wav2vec_model, torch_dtype, memory_mode)
    except (ModelSourceError, CheckpointError):
        raise
    except ModelFileError as error:
        raise ModelSourceError(f"--model {model}: cannot be loaded: {error}") from None
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelSourceError(f"--model {model}: cannot be loaded ({type(error).__name__}: {reason}).") from None


def _load_pipeline(
    model: str, base_model: str, wav2vec_model: str | None, torch_dtype: torch.dtype, memory_mode: str
) -> LoadedModel:
    if model == TINY_RANDOM:
        logger.warning("Using %s.", RANDOM_WEIGHTS_NOTICE)
        pipeline = build_tiny_random_pipeline()
        if memory_mode in QUANTIZED_MODES:
            import tempfile

            with tempfile.TemporaryDirectory() as workdir:
                quantize_pipeline(pipeline, memory_mode, workdir)
        return LoadedModel(pipeline, TINY_RANDOM, is_random=True)

    folder = Path(model)
    if not folder.exists():
        if model.count("/") != 1 or model.startswith((".", "/")):
            raise ModelSourceError(
                f"--model {model}: no such folder, and not a Hub repo id (owner/name). Use a converted folder, the "
                f"official pretrained_models/ folder, a Hub repo, or {TINY_RANDOM}."
            )
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model))

    if (folder / "model_index.json").is_file():
        quantization = None
        if memory_mode in QUANTIZED_MODES:
            from diffusers.quantizers import PipelineQuantizationConfig

            quantization = PipelineQuantizationConfig(
                quant_mapping={
                    "transformer": quantization_config(memory_mode, "diffusers"),
                    "reference_net": quantization_config(memory_mode, "diffusers"),
                    **(
                        {"text_encoder": quantization_config(memory_mode, "transformers")}
                        if memory_mode != "int8-torchao"
                        else {}
                    ),
                }
            )
        checked = {name: (folder / name, where) for name, where in check_pipeline_folder(folder).items()}
        pipeline = Hallo3Pipeline.from_pretrained(folder, torch_dtype=torch_dtype, quantization_config=quantization)
        check_loaded_weights(pipeline, checked)
        return LoadedModel(pipeline, str(model))

    face_dir, separator_dir = local_model_folders(str(folder))
    if (folder / "hallo3" / "latest").is_file():  # the official pretrained_models/ layout
        converted = folder / OFFICIAL_CONVERTED
        if not (converted / "transformer").is_dir():
            logger.info("Converting the official checkpoint into %s (once).", converted)
            convert(folder / "hallo3", converted, overwrite=converted.is_dir())
        text, vae, wav2vec = official_layout_sources(folder, base_model, wav2vec_model)
        pipeline = _from_parts(converted, text, vae, wav2vec, torch_dtype, memory_mode)
        return LoadedModel(pipeline, str(model), face_analysis_dir=face_dir, vocal_separator_dir=separator_dir)

    if (folder / "transformer").is_dir() and (folder / "reference_net").is_dir():
        text, vae = Source(base_model, "text_encoder"), Source(base_model, "vae")
        pipeline = _from_parts(folder, text, vae, wav2vec_model or DEFAULT_WAV2VEC, torch_dtype, memory_mode)
        return LoadedModel(pipeline, str(model), face_analysis_dir=face_dir, vocal_separator_dir=separator_dir)

    raise ModelSourceError(
        f"--model {model}: expected model_index.json (a saved pipeline), transformer/ + reference_net/ (converter "
        f"output), or hallo3/latest (the official pretrained_models/ layout)."
    )
