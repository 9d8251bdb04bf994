import numpy as np
import pytest
import torch
from PIL import Image

import latentdiff
from latentdiff.io.checkpoint import CheckpointError, load_model_file, save_model_file
from latentdiff.models.autoencoder_kl import AutoencoderKL
from latentdiff.models.text_encoders import TEXT_ENCODERS
from latentdiff.models.unet import UNetModel
from latentdiff.pipelines import LatentDiffusionPipeline, parse_parameters
from tests.tiny import tiny_ldm_config


@pytest.fixture(scope="module")
def pipe(tiny_ldm_pipe):
    return tiny_ldm_pipe


def test_exposes_parts_and_returns_pil(pipe):
    cfg = pipe.config
    assert pipe.modules() == {"unet": pipe.unet, "autoencoder": pipe.autoencoder, "text_encoder": pipe.text_encoder}
    assert isinstance(pipe.unet, UNetModel) and pipe.unet.cfg == cfg.unet
    assert isinstance(pipe.autoencoder, AutoencoderKL) and pipe.autoencoder.cfg == cfg.autoencoder
    assert type(pipe.text_encoder) is TEXT_ENCODERS[cfg.text_encoder.type] and pipe.text_encoder.cfg == cfg.text_encoder
    assert pipe.schedule.num_timesteps == 100 and pipe.name == "tiny"
    assert not any(m.training for m in pipe.modules().values())
    images = pipe(["a cat", "a dog"], steps=3, seed=1, num_images_per_prompt=2)
    assert len(images) == 4 and all(isinstance(im, Image.Image) for im in images)
    assert images[0].size == (16, 16) and images[0].mode == "RGB"
    # the PIL images are generate()'s images, mapped from [-1, 1] to 0..255
    tensors, _ = pipe.generate(["a cat", "a dog"], steps=3, seed=1, num_images_per_prompt=2)
    expected = ((tensors.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.stack([np.asarray(im) for im in images]), expected)
    params = parse_parameters(images[3].info["parameters"])
    assert params["prompt"] == "a dog" and params["Seed"] == "4" and params["CFG scale"] == "3"
    assert params["Model"] == "tiny" and params["Steps"] == "3" and params["Size"] == "16x16"


def test_checkpoint_round_trip_is_bit_identical(pipe, tmp_path):
    path = pipe.save(tmp_path / "tiny.safetensors")
    loaded = latentdiff.load_pipeline(path)
    assert loaded.config == pipe.config
    for sampler in ("ddim", "ddpm", "dpmpp_2m", "euler_a"):
        a, _ = pipe.generate("a photo of a cat", steps=4, seed=7, sampler=sampler, negative_prompt="blurry")
        b, _ = loaded.generate("a photo of a cat", steps=4, seed=7, sampler=sampler, negative_prompt="blurry")
        assert torch.equal(a, b), sampler


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0), ("dpmpp_2m", 0.0),
                                         ("euler_a", 0.0)])
def test_seed_reproduces_each_image_alone(pipe, sampler, eta):
    """Each image has its own random stream (x_T, then step noise), so it comes out the same made alone, with
    any sampler; ``seeds`` gives each image its seed (what a server batching requests needs)."""
    kw = dict(steps=3, sampler=sampler, eta=eta)
    batch, params = pipe.generate(["a cat", "a dog"], seed=10, num_images_per_prompt=2, **kw)
    alone, _ = pipe.generate("a dog", seed=12, **kw)
    torch.testing.assert_close(batch[2:3], alone, atol=1e-5, rtol=0)
    mixed, mixed_params = pipe.generate(["a dog", "a cat"], seeds=[13, 11], **kw)
    torch.testing.assert_close(mixed, batch[[3, 1]], atol=1e-5, rtol=0)
    assert [p.seed for p in mixed_params] == [13, 11] and [p.seed for p in params] == [10, 11, 12, 13]
    with pytest.raises(ValueError, match="one per image"):
        pipe.generate("a dog", seeds=[1, 2], **kw)


def test_latent_output_decodes_to_the_images(pipe):
    images, _ = pipe.generate("a cat", steps=3, seed=4, num_images_per_prompt=2)
    latents, params = pipe.generate("a cat", steps=3, seed=4, num_images_per_prompt=2, output_type="latent")
    C, f = pipe.config.autoencoder.embed_dim, pipe.config.autoencoder.downsample_factor
    size = pipe.config.image_size // f
    assert latents.shape == (2, C, size, size) and len(params) == 2
    with torch.inference_mode():
        torch.testing.assert_close(pipe.autoencoder.decode(latents), images)


def test_scale_one_equals_conditional_only(pipe):
    batches = []
    handle = pipe.unet.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        a, _ = pipe.generate("a cat", steps=3, seed=0, scale=1.0)
        assert batches == [1, 1, 1]  # one conditional U-Net call per step, no unconditional half
        b, _ = pipe.generate("a cat", steps=3, seed=0, scale=1.0, negative_prompt="ignored without guidance")
    finally:
        handle.remove()
    assert torch.equal(a, b)
    # with guidance the negative prompt is used: the equality above is not the negative prompt being dropped
    c, _ = pipe.generate("a cat", steps=3, seed=0, scale=3.0)
    d, _ = pipe.generate("a cat", steps=3, seed=0, scale=3.0, negative_prompt="ignored without guidance")
    assert not torch.equal(c, d) and not torch.equal(a, c)


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


def test_wrong_shaped_weights_are_reported(tmp_path):
    """A model file whose U-Net weights are narrower than its config says: refused, naming tensors and shapes."""
    narrow = LatentDiffusionPipeline.from_config(tiny_ldm_config(unet={"model_channels": 16}))
    _, parts, _ = load_model_file(narrow.save(tmp_path / "narrow.safetensors"))
    path = save_model_file(tmp_path / "mismatch.safetensors", tiny_ldm_config(), parts)  # config: 32 channels
    with pytest.raises(CheckpointError) as e:
        latentdiff.load_pipeline(path)
    message = str(e.value)
    assert message.startswith("unet weights do not fit the model: ") and "shape mismatch(es)" in message
    assert "'input_blocks.0.0.weight: file (16, 4, 3, 3) vs model (32, 4, 3, 3)'" in message
    assert "missing key" not in message and "unexpected key" not in message  # same names, other shapes
    with pytest.raises(CheckpointError, match="unet weights do not fit"):
        LatentDiffusionPipeline.from_parts(tiny_ldm_config(), parts)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        latentdiff.load_pipeline(tmp_path / "nope.safetensors")


def test_model_default_sampler_and_steps(pipe):
    """generate() without steps and sampler uses the config's (here Euler ancestral in 3 steps); given, they win."""
    cfg = tiny_ldm_config(sampler="euler_a", steps=3)
    own = LatentDiffusionPipeline(cfg, pipe.unet, pipe.autoencoder, pipe.text_encoder, name="tiny")
    assert (own.default_sampler, own.default_steps) == ("euler_a", 3)
    calls = []
    images, params = own.generate("a cat", seed=2, callback=lambda i, *_: calls.append(i))
    assert len(calls) == 3 and (params[0].sampler, params[0].steps) == ("euler_a", 3)
    assert "Steps: 3, Sampler: Euler a, CFG scale: 3" in params[0].to_text()
    assert torch.equal(images, pipe.generate("a cat", seed=2, sampler="euler_a", steps=3)[0])
    _, params = own.generate("a cat", seed=2, sampler="ddim", steps=2)
    assert (params[0].sampler, params[0].steps) == ("ddim", 2)
    assert (pipe.default_sampler, pipe.default_steps) == ("ddim", 25)  # a config without them: DDIM, 25 steps


@pytest.mark.parametrize("sampler, label", [("ddim", "DDIM"), ("ddpm", "DDPM"), ("dpmpp_2m", "DPM++ 2M"),
                                            ("dpmpp_2m_karras", "DPM++ 2M Karras"), ("euler_a", "Euler a")])
def test_parameters_name_samplers_as_automatic1111(sampler, label):
    from latentdiff.io.images import GenerationParams, sampler_id

    text = GenerationParams("a cat", "", 20, sampler, 7.5, 42, 512, 768).to_text()
    assert text.splitlines()[1] == f"Steps: 20, Sampler: {label}, CFG scale: 7.5, Seed: 42, Size: 512x768"
    assert parse_parameters(text)["Sampler"] == sampler  # back to our id
    assert sampler_id(label) == sampler_id(sampler) == sampler
    old = text.replace(f"Sampler: {label}", f"Sampler: {sampler}")  # files written before used our ids
    assert parse_parameters(old)["Sampler"] == sampler


def test_unknown_sampler_names_pass_through():
    from latentdiff.io.images import sampler_id

    assert sampler_id("DPM++ 2M Karras") == "dpmpp_2m_karras"
    assert sampler_id("Euler") == "Euler" and sampler_id("VQ-Diffusion") == "VQ-Diffusion"
    assert parse_parameters("a car\nSteps: 20, Sampler: UniPC")["Sampler"] == "UniPC"


def test_model_hash_is_automatic1111s_short_sha256(pipe, tmp_path):
    import hashlib

    assert pipe.model_hash == ""  # built in memory: no file to hash
    path = pipe.save(tmp_path / "tiny.safetensors")
    loaded = latentdiff.load_pipeline(path)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert loaded.model_hash == expected
    params = parse_parameters(loaded("a cat", steps=1, seed=0)[0].info["parameters"])
    assert params["Model hash"] == expected and params["Model"] == "tiny"
    assert "Clip skip" not in params  # written only when > 1
