"""The Python API is as strict as the command line: unknown keyword arguments and values of the wrong type raise
a TypeError (or ValueError) that names them, instead of being ignored or failing deep inside."""

from __future__ import annotations

import pytest
import torch

import latentdiff
from latentdiff.pipelines.base import check_arg_types


@pytest.mark.parametrize("kwargs, match", [
    ({"bogus": 3}, "bogus"),
    ({"dtype": "fp16"}, "dtype must be a torch.dtype"),
    ({"device": 1.5}, "device must be"),
])
def test_load_pipeline_names_bad_arguments(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        latentdiff.load_pipeline(**kwargs)


def test_load_pipeline_refuses_a_path_of_the_wrong_type():
    with pytest.raises(TypeError, match="path must be a str or a path, got int"):
        latentdiff.load_pipeline(3)


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": "10"}, "steps must be an integer, got str"),
    ({"seed": "a"}, "seed must be an integer"),
    ({"scale": "x"}, "scale must be a number"),
    ({"height": 32.0}, "height must be an integer, got float"),
    ({"num_images_per_prompt": 2.5}, "num_images_per_prompt must be an integer"),
    ({"eta": None}, None),  # None is a default, fine
    ({"negative_prompt": 3}, "negative_prompt must be a string or a list of strings"),
    ({"prompt": None}, "prompt must be a string or a list of strings"),
    ({"prompt": ["a", 3]}, "prompt must be a string or a list of strings"),
    ({"seeds": 3}, "seeds must be a list of integers"),
    ({"steps": True}, "steps must be an integer, got bool"),
    ({"bogus": 1}, "bogus"),
])
def test_generate_names_bad_arguments(tiny_ldm_pipe, kwargs, match):
    args = {"prompt": "a cat", "steps": 1, **kwargs}
    if match is None:
        check_arg_types(**{k: v for k, v in kwargs.items()})
        return
    with pytest.raises(TypeError, match=match):
        tiny_ldm_pipe.generate(**args)


def test_vq_generate_names_bad_arguments():
    from latentdiff.pipelines import VQDiffusionPipeline
    from tests.test_vq_pipeline import tiny_vq_config

    pipe = VQDiffusionPipeline.from_config(tiny_vq_config())
    with pytest.raises(TypeError, match="truncation must be a number"):
        pipe.generate("a cat", truncation="0.9")
    with pytest.raises(TypeError, match="steps must be an integer"):
        pipe.generate("a cat", steps=torch.tensor(3))
