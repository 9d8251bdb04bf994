import pytest
import torch

import latentdiff
from latentdiff.io.checkpoint import CheckpointError
from latentdiff.pipelines import LatentDiffusionPipeline, parse_parameters
from tests.tiny import tiny_ldm_config


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return LatentDiffusionPipeline.from_config(tiny_ldm_config(), name="tiny")


def test_exposes_parts_and_returns_pil(pipe):
    assert pipe.unet is not None and pipe.autoencoder is not None and pipe.text_encoder is not None
    assert pipe.schedule.num_timesteps == 100
    images = pipe(["a cat", "a dog"], steps=3, seed=1, num_images_per_prompt=2)
    assert len(images) == 4 and images[0].size == (16, 16) and images[0].mode == "RGB"
    params = parse_parameters(images[3].info["parameters"])
    assert params["prompt"] == "a dog" and params["Seed"] == "4" and params["CFG scale"] == "3"


def test_checkpoint_round_trip_is_bit_identical(pipe, tmp_path):
    path = pipe.save(tmp_path / "tiny.safetensors")
    loaded = latentdiff.load_pipeline(path)
    assert loaded.config == pipe.config
    for sampler in ("ddim", "ddpm", "dpmpp_2m", "euler_a"):
        a, _ = pipe.generate("a photo of a cat", steps=4, seed=7, sampler=sampler, negative_prompt="blurry")
        b, _ = loaded.generate("a photo of a cat", steps=4, seed=7, sampler=sampler, negative_prompt="blurry")
        assert torch.equal(a, b), sampler


def test_seed_reproduces_each_image_alone(pipe):
    batch, _ = pipe.generate("a cat", steps=3, seed=10, num_images_per_prompt=3)
    alone, _ = pipe.generate("a cat", steps=3, seed=12)
    torch.testing.assert_close(batch[2:], alone, atol=1e-5, rtol=0)


def test_latent_output_decodes_to_the_images(pipe):
    images, _ = pipe.generate("a cat", steps=3, seed=4, num_images_per_prompt=2)
    latents, params = pipe.generate("a cat", steps=3, seed=4, num_images_per_prompt=2, output_type="latent")
    C, f = pipe.config.autoencoder.embed_dim, pipe.config.autoencoder.downsample_factor
    size = pipe.config.image_size // f
    assert latents.shape == (2, C, size, size) and len(params) == 2
    with torch.inference_mode():
        torch.testing.assert_close(pipe.autoencoder.decode(latents), images)


def test_scale_one_equals_conditional_only(pipe):
    a, _ = pipe.generate("a cat", steps=3, seed=0, scale=1.0)
    b, _ = pipe.generate("a cat", steps=3, seed=0, scale=1.0, negative_prompt="ignored without guidance")
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, message", [
    ({"height": 15}, "height=15 must be a positive multiple of 4"),
    ({"width": 0}, "width=0 must be a positive multiple of 4"),
    ({"steps": 0}, "steps=0 must be between 1 and 100"),
    ({"steps": 101}, "steps=101"),
    ({"sampler": "plms"}, "unknown sampler 'plms'"),
    ({"negative_prompt": ["a", "b"]}, "2 negative prompts given for 1 prompts"),
    ({"output_type": "np"}, "output_type='np' must be 'image' or 'latent'"),
])
def test_bad_arguments(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.generate("a cat", **kwargs)


def test_wrong_shaped_weights_are_reported(pipe, tmp_path):
    path = pipe.save(tmp_path / "a.safetensors")
    other = tiny_ldm_config(unet={"model_channels": 16, "channel_mult": [1, 2], "attention_resolutions": [2],
                                  "num_heads": 2, "context_dim": 32, "norm_num_groups": 8})
    LatentDiffusionPipeline.from_config(other).save(tmp_path / "b.safetensors")
    from latentdiff.io.checkpoint import load_model_file

    _, parts, _ = load_model_file(tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match="unet weights do not fit the model: .*shape mismatch"):
        LatentDiffusionPipeline.from_parts(pipe.config, parts)
    assert path.exists()


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        latentdiff.load_pipeline(tmp_path / "nope.safetensors")
