"""The generation settings: one set of defaults for every front end, one validator with the documented limits."""

import inspect
import math

import numpy as np
import pytest

from hallo3.inference import build_parser
from hallo3.pipeline_hallo3 import Hallo3Pipeline
from hallo3.settings import DEFAULTS, SettingError, check_settings


def test_the_pipeline_and_the_cli_start_from_the_same_defaults():
    official = {"num_inference_steps": 50, "guidance_scale": 3.5, "motion_frames": 2, "audio_guidance_scale": None}
    assert {name: getattr(DEFAULTS, name) for name in official} == official
    pipeline_defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(Hallo3Pipeline.__call__).parameters.items()
        if hasattr(DEFAULTS, name)
    }
    assert set(pipeline_defaults) == set(DEFAULTS.pipeline_kwargs())
    assert pipeline_defaults == DEFAULTS.pipeline_kwargs()
    cli_defaults = vars(build_parser().parse_args([]))
    for name in ("prompt", "num_inference_steps", "guidance_scale", "audio_guidance_scale", "motion_frames", "seed"):
        assert cli_defaults[name] == getattr(DEFAULTS, name), name


ACCEPTED = {
    "num_inference_steps": [1, 50, 1000, np.int64(4)],
    "guidance_scale": [1, 1.0, 3.5, 20],
    "audio_guidance_scale": [None, 0, 0.0, 6.5],
    "motion_frames": [0, 1, 2, 3],
    "seed": [None, 0, 2**63 - 1],
    "max_audio_seconds": [None, 0.1, 600.0],
}
REFUSED = {
    "num_inference_steps": [0, -1, 1001, 2.5, True],
    "guidance_scale": [0.99, 0, -1, math.inf, math.nan, None],
    "audio_guidance_scale": [-0.1, math.inf, math.nan],
    "motion_frames": [-1, 4, 1.0],
    "seed": [-1, 2**63, 1.5],
    "max_audio_seconds": [0, -5, math.nan, math.inf],
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_each_limit_is_where_the_docs_put_it(name):
    for value in ACCEPTED[name]:
        check_settings(**{name: value})
    for value in REFUSED[name]:
        with pytest.raises(SettingError) as refused:
            check_settings(**{name: value})
        assert refused.value.name == name and f"got {value}" in str(refused.value)


def test_each_front_end_names_the_setting_its_own_way():
    with pytest.raises(SettingError) as refused:
        check_settings(motion_frames=4)
    assert str(refused.value).startswith("`motion_frames` must be 0..3 (2 as trained")
    assert refused.value.naming("--motion-frames").startswith("--motion-frames: must be 0..3 (2 as trained")
    assert isinstance(refused.value, ValueError)  # callers that catch ValueError keep working
