"""Vocal separation: on by default when the separator model is present (the official behaviour), off on request,
and said either way in the result and the mp4's metadata. The separator itself is a stand-in: the real one needs
the official Kim_Vocal_2 model, which cannot be downloaded here."""

import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile

from hallo3.inference import GenerationSettings, PortraitAnimator
from hallo3.loading import LoadedModel
from hallo3.video_io import probe_video

from .conftest import ASSETS


class StandInSeparator:
    """audio-separator's `Separator` API: writes a 'vocals' stem (the input at half volume) into `output_dir`."""

    calls: list[str] = []

    def __init__(self, output_dir: str, output_single_stem: str, model_file_dir: str):
        self.output_dir = Path(output_dir)

    def load_model(self, name: str) -> None:
        assert name == "Kim_Vocal_2.onnx"

    def separate(self, path: str) -> list[str]:
        waveform, rate = soundfile.read(path, dtype="float32")
        stem = self.output_dir / "speech_(Vocals).wav"
        soundfile.write(stem, waveform * 0.5, rate)
        StandInSeparator.calls.append(path)
        return [stem.name]


@pytest.fixture
def separator_folder(tmp_path, monkeypatch) -> Path:
    package = types.ModuleType("audio_separator")
    module = types.ModuleType("audio_separator.separator")
    module.Separator = StandInSeparator  # type: ignore[attr-defined]
    package.separator = module  # type: ignore[attr-defined]
    package.__spec__ = types.SimpleNamespace(name="audio_separator")  # type: ignore[assignment]
    monkeypatch.setitem(sys.modules, "audio_separator", package)
    monkeypatch.setitem(sys.modules, "audio_separator.separator", module)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "audio_separator" else None)
    folder = tmp_path / "audio_separator"
    folder.mkdir()
    (folder / "Kim_Vocal_2.onnx").write_bytes(b"stand-in")
    StandInSeparator.calls = []
    return folder


@pytest.mark.parametrize("separate", [True, False])
def test_vocals_are_separated_unless_turned_off_and_the_video_says_which(
    tmp_path, tiny_pipeline, separator_folder, monkeypatch, separate
):
    t = np.arange(16000) / 16000
    soundfile.write(tmp_path / "speech.wav", (0.4 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)
    heard = []
    original_call = type(tiny_pipeline).__call__

    def listening_call(self, *args, **kwargs):
        heard.append(np.abs(kwargs["audio"]).max())
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_pipeline), "__call__", listening_call)
    stems_before = set(Path(tempfile.gettempdir()).glob("hallo3-vocals-*"))
    animator = PortraitAnimator(LoadedModel(tiny_pipeline, "tiny", vocal_separator_dir=separator_folder), "cpu")
    settings = GenerationSettings(num_inference_steps=1, seed=0, separate_vocals=separate)
    result = animator.generate(ASSETS / "0001.jpg", tmp_path / "speech.wav", tmp_path / "v.mp4", settings)

    if separate:
        assert StandInSeparator.calls and heard[0] == pytest.approx(0.2, abs=0.01)  # wav2vec2 heard the vocals
        assert result.inputs["vocals"] == "separated (Kim_Vocal_2.onnx)"
    else:
        assert not StandInSeparator.calls and heard[0] == pytest.approx(0.4, abs=0.01)
        assert result.inputs["vocals"] == "not separated (turned off)"
    assert f"vocals: {result.inputs['vocals']}" in probe_video(tmp_path / "v.mp4")["comment"]
    assert "identity embedding" in result.inputs["face"]
    assert set(Path(tempfile.gettempdir()).glob("hallo3-vocals-*")) == stems_before  # the stem's folder is removed


def test_without_the_model_folder_the_reason_is_given(tmp_path, tiny_animator):
    t = np.arange(16000) / 16000
    soundfile.write(tmp_path / "speech.wav", (0.4 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)
    settings = GenerationSettings(num_inference_steps=1, seed=0)
    result = tiny_animator.generate(ASSETS / "0001.jpg", tmp_path / "speech.wav", tmp_path / "v.mp4", settings)
    assert result.inputs["vocals"] == "not separated (no audio_separator model folder)"
