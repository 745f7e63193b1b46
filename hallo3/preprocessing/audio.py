"""Speech file -> wav2vec2 features at the video frame rate (architecture 5.1).

Decoding takes any common format (wav, flac, ogg, mp3 through libsndfile; m4a/aac and anything else through the
ffmpeg that imageio-ffmpeg ships), downmixes to mono and resamples to 16 kHz with soxr (librosa's default resampler,
which the official code uses). Vocal separation with the official MDX-Net model runs when `audio-separator` and the
model file are present.
"""

import importlib.util
import logging
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile
import soxr
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

from ..settings import check_settings


logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
MIN_SECONDS = 0.2
SEPARATOR_MODEL = "Kim_Vocal_2.onnx"


class AudioError(ValueError):
    """The audio input breaks a rule; the message names the file and the rule."""


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _decode_with_ffmpeg(path: Path, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """Mono 16 kHz samples through ffmpeg. With `max_seconds`, decoding stops one second past it: a file's header
    may not state its length (m4a, aac), and decoding a 10-hour file only to refuse it would take minutes and GBs."""
    limit = ["-t", f"{max_seconds + 1:.3f}"] if max_seconds is not None else []
    result = subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-nostdin", "-i", str(path), *limit, "-vn", "-ac", "1", "-ar", str(SAMPLE_RATE)]
        + ["-f", "f32le", "-"],
        capture_output=True,
    )
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        reason = detail[-1].replace(str(path), name) if detail else "ffmpeg failed"
        raise AudioError(f"audio {name}: not a readable audio file ({reason}).")
    return np.frombuffer(result.stdout, dtype=np.float32).copy(), SAMPLE_RATE


def load_audio(path: str | Path, max_seconds: float | None = None, name: str | None = None) -> np.ndarray:
    """Mono float32 waveform at 16 kHz. Raises `AudioError` for missing, unreadable, empty or too long files.

    `max_seconds` must be a positive number or None (no limit); `name` is how errors name the file (default: the
    path).
    """
    path = Path(path)
    name = name or str(path)
    check_settings(max_audio_seconds=max_seconds)
    if not path.is_file():
        raise AudioError(f"audio {name}: no such file.")
    if path.stat().st_size == 0:
        raise AudioError(f"audio {name}: the file is empty.")
    try:
        info = soundfile.info(str(path))
        duration = info.frames / info.samplerate if info.samplerate else None
    except (soundfile.LibsndfileError, RuntimeError):
        info, duration = None, None
    if duration is not None and max_seconds is not None and duration > max_seconds:
        raise AudioError(f"audio {name}: {duration:.1f} s is longer than the maximum of {max_seconds:g} s.")

    if info is not None:
        try:
            waveform, sample_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
            waveform = waveform.mean(axis=1)
        except (soundfile.LibsndfileError, RuntimeError):
            waveform, sample_rate = _decode_with_ffmpeg(path, name, max_seconds)
    else:
        waveform, sample_rate = _decode_with_ffmpeg(path, name, max_seconds)

    if sample_rate != SAMPLE_RATE:
        waveform = soxr.resample(waveform, sample_rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    seconds = len(waveform) / SAMPLE_RATE
    if seconds < MIN_SECONDS:
        raise AudioError(f"audio {name}: {seconds:.2f} s of sound; at least {MIN_SECONDS} s is needed.")
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(f"audio {name}: longer than the maximum of {max_seconds:g} s.")
    if not np.isfinite(waveform).all():
        raise AudioError(f"audio {name}: the samples contain NaN or infinity; the file is corrupt.")
    return waveform


def separation_unavailable(model_dir: Path | None) -> str | None:
    """Why vocals cannot be separated with `model_dir` (the official `audio_separator` folder), or None if they can."""
    if model_dir is None:
        return "no audio_separator model folder"
    if not (model_dir / SEPARATOR_MODEL).is_file():
        return f"{model_dir} has no {SEPARATOR_MODEL}"
    if importlib.util.find_spec("audio_separator") is None:
        return "audio-separator is not installed (pip install hallo3[separator])"
    return None


def separate_vocals(path: Path, model_dir: Path | None) -> Path | None:
    """Vocals stem through the official Kim_Vocal_2 MDX-Net model (audio-separator), or None when unavailable (see
    `separation_unavailable`). The stem is written to a new temporary folder: the caller removes `result.parent`."""
    if model_dir is None or separation_unavailable(model_dir) is not None:
        return None
    from audio_separator.separator import Separator

    output_dir = Path(tempfile.mkdtemp(prefix="hallo3-vocals-"))
    separator = Separator(output_dir=str(output_dir), output_single_stem="vocals", model_file_dir=str(model_dir))
    separator.load_model(SEPARATOR_MODEL)
    stems = separator.separate(str(path))
    if not stems:
        shutil.rmtree(output_dir, ignore_errors=True)
        return None
    return output_dir / Path(stems[0]).name


def vocals_for_wav2vec(
    path: Path, waveform: np.ndarray, model_dir: Path | None, enabled: bool = True
) -> tuple[np.ndarray, str]:
    """The waveform wav2vec2 should hear: the separated vocals when `enabled` and possible (the official behaviour),
    else `waveform` (the file as it is); and a note saying which, for the log and the video's metadata."""
    reason = "turned off" if not enabled else separation_unavailable(model_dir)
    if reason is not None:
        return waveform, f"not separated ({reason})"
    vocals = separate_vocals(path, model_dir)
    if vocals is None:
        return waveform, "not separated (the separator returned no vocals stem)"
    try:
        return load_audio(vocals), f"separated ({SEPARATOR_MODEL})"
    finally:
        shutil.rmtree(vocals.parent, ignore_errors=True)


def num_video_frames(num_samples: int, fps: int = 25) -> int:
    """ceil(seconds * fps): the number of output frames, one audio feature each (architecture 5.1)."""
    return math.ceil(num_samples / SAMPLE_RATE * fps)


class AudioEncoder:
    """wav2vec2 hidden states of every transformer layer, interpolated to one feature per video frame.

    Follows the official `Wav2VecModel.forward`: the CNN features are linearly interpolated to the frame count
    before the feature projection and transformer, and the normalised waveform is zero-padded so that the frame count
    is a multiple of `clip_length` (architecture 5.1 step 3, 12.16).

    Args:
        model (`Wav2Vec2Model`): wav2vec2-base-960h for the released model (12 layers of 768).
        feature_extractor (`Wav2Vec2FeatureExtractor`): zero-mean, unit-variance normalisation.
    """

    def __init__(self, model: Wav2Vec2Model, feature_extractor: Wav2Vec2FeatureExtractor, fps: int = 25):
        self.model = model.eval()
        self.feature_extractor = feature_extractor
        self.fps = fps

    @torch.no_grad()
    def __call__(self, waveform: np.ndarray, clip_length: int = 49) -> tuple[torch.Tensor, int]:
        """Returns (features [padded frames, layers, hidden], true frame count)."""
        num_frames = num_video_frames(len(waveform), self.fps)
        samples_per_frame = SAMPLE_RATE // self.fps
        input_values = self.feature_extractor(waveform, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
        padded_frames = math.ceil(num_frames / clip_length) * clip_length
        if padded_frames > num_frames:
            input_values = F.pad(input_values, (0, (padded_frames - num_frames) * samples_per_frame))

        device, dtype = self.model.device, self.model.dtype
        cnn_features = self.model.feature_extractor(input_values.to(device, dtype))  # [1, 512, T_50Hz]
        cnn_features = F.interpolate(cnn_features, size=padded_frames, mode="linear", align_corners=True)
        hidden_states, _ = self.model.feature_projection(cnn_features.transpose(1, 2))

        # the outputs of transformer layers 1..L (the official `hidden_states[1:]`); transformers 5 collects hidden
        # states only in the top-level forward, which would skip our interpolation, so hooks collect them here
        layer_outputs = []
        hooks = [
            layer.register_forward_hook(
                lambda m, args, out: layer_outputs.append(out[0] if isinstance(out, tuple) else out)
            )
            for layer in self.model.encoder.layers
        ]
        try:
            self.model.encoder(hidden_states)
        finally:
            for hook in hooks:
                hook.remove()
        features = torch.stack(layer_outputs, dim=2)[0]  # [frames, layers, hidden]
        return features.float().cpu(), num_frames
