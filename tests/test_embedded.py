"""The models shipped in latentdiff/assets/ load by name and generate (the README's Quickstart relies on them)."""

import pytest
import torch

import latentdiff
from latentdiff.assets import EMBEDDED_MODELS
from latentdiff.io.checkpoint import read_safetensors
from latentdiff.metrics.t2i import CIFAR10_CLASSES, class_prompts


@pytest.mark.parametrize("name, kind", [("default", "LatentDiffusionPipeline"),
                                        ("default-vq", "VQDiffusionPipeline")])
def test_embedded_model_loads_by_name_and_generates(name, kind):
    pipe = latentdiff.load_pipeline(name)
    assert type(pipe).__name__ == kind and pipe.name.startswith("latentdiff-cifar10")
    assert all(p.dtype == torch.float32 for m in pipe.modules().values() for p in m.parameters())
    images, params = pipe.generate(["a photo of a cat"], steps=2, seed=0)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    assert params[0].prompt == "a photo of a cat"


def test_no_path_means_the_default_model():
    assert latentdiff.load_pipeline().name == latentdiff.load_pipeline("default").name


def test_vq_default_keeps_every_class_caption_token():
    """tools/pack_model.py --vocabulary kept the embedding rows of the training captions' tokens."""
    tensors, meta = read_safetensors(EMBEDDED_MODELS["default-vq"])
    assert "compact_rows" in meta
    kept = set(tensors["text_encoder.token_embedding.weight.kept_ids"].tolist())
    tokenize = latentdiff.load_pipeline("default-vq").text_encoder.tokenize
    for caption in class_prompts(CIFAR10_CLASSES, 10).captions + [""]:
        assert set(tokenize(caption)[0].tolist()) <= kept, caption


def test_default_model_samples_with_its_sweep_winner():
    """The embedded model's config names the sampler and steps its sampler sweep found best, and the guidance
    interval and scale of BENCHMARKS.md's "Guidance in a limited interval" (v1.5: v1.3's weights)."""
    pipe = latentdiff.load_pipeline("default")
    assert (pipe.config.sampler, pipe.config.steps) == ("euler_a", 10)
    assert (pipe.default_sampler, pipe.default_steps) == ("euler_a", 10)
    assert (pipe.config.guidance_scale, pipe.config.guidance_interval) == (11.0, [0.0, 2.5])
    _, params = pipe.generate(["a photo of a cat"], steps=2, seed=0)
    assert params[0].guidance_interval == (0.0, 2.5) and "Guidance interval: 0/2.5" in params[0].to_text()
    _, meta = read_safetensors(EMBEDDED_MODELS["default"])
    assert "compact_rows" in meta and meta["name"] == "latentdiff-cifar10-v1.5"
