"""Real weights (`pytest -m slow`): set HALLO3_MODEL to a converted folder or the official pretrained_models/."""

import math
import os
from pathlib import Path

import pytest
import torch

from .conftest import ASSETS


pytestmark = pytest.mark.slow
MODEL = os.environ.get("HALLO3_MODEL")
needs_weights = pytest.mark.skipif(not MODEL or not Path(MODEL).exists(), reason="set HALLO3_MODEL to real weights")


@needs_weights
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the 5B model needs a CUDA GPU")
def test_real_model_makes_a_short_talking_video(tmp_path):
    from hallo3.inference import main
    from hallo3.preprocessing.audio import load_audio
    from hallo3.video_io import probe_video

    output = tmp_path / "real.mp4"
    code = main(
        [
            "--model",
            MODEL,
            "--image",
            str(ASSETS / "0008.jpg"),
            "--audio",
            str(ASSETS / "0008.wav"),
            "--output",
            str(output),
            "--steps",
            "10",
            "--seed",
            "0",
            "--memory-mode",
            "model-offload",
        ]
    )
    assert code == 0
    seconds = len(load_audio(ASSETS / "0008.wav")) / 16000
    video = probe_video(output)
    assert video["num_frames"] == math.ceil(seconds * 25) and video["width"] == video["height"] == 480


@needs_weights
def test_real_checkpoint_converts_and_loads_strictly(tmp_path):
    from hallo3 import Hallo3ReferenceNet, Hallo3Transformer3DModel
    from hallo3.convert_sat_checkpoint import convert

    source = Path(MODEL) / "hallo3"
    if not (source / "latest").is_file():
        pytest.skip("HALLO3_MODEL is not the official pretrained_models/ layout")
    out = convert(source, tmp_path / "converted")
    with torch.device("meta"):
        Hallo3Transformer3DModel.from_config(Hallo3Transformer3DModel.load_config(out / "transformer"))
        Hallo3ReferenceNet.from_config(Hallo3ReferenceNet.load_config(out / "reference_net"))
    assert Hallo3Transformer3DModel.load_config(out / "transformer")["num_layers"] == 42
