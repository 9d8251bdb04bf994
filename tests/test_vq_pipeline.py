"""VQDiffusionPipeline: round trips, generation, guidance, fast sampling, diffusers folders, bad input."""

import json

import pytest
import torch
from safetensors.torch import save_file

import latentdiff
from latentdiff.config import model_config_from_dict
from latentdiff.diffusion.discrete_sampling import sample, sample_purity
from latentdiff.io.checkpoint import CheckpointError, save_model_file
from latentdiff.io.convert_vae import vae_state_dict_to_diffusers
from latentdiff.io.convert_vq import transformer_config_to_diffusers, transformer_state_dict_to_diffusers
from latentdiff.pipelines import VQDiffusionPipeline, load_vq_diffusion_folder, parse_parameters
from tests.tiny import jitter

K, S, T = 32, 4, 10  # codes, code grid side, diffusion steps


def tiny_vq_config(**overrides):
    data = {
        "type": "vq_diffusion", "image_size": 16, "guidance_scale": 3.0, "truncation_rate": 0.9,
        "vqvae": {"ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "norm_num_groups": 4, "z_channels": 8,
                  "embed_dim": 8, "num_codes": K},
        "transformer": {"num_codes": K, "latent_size": S, "dim": 16, "heads": 2, "depth": 1, "context_dim": 16,
                        "context_length": 16, "num_timesteps": T},
        "text_encoder": {"type": "trainable", "width": 16, "layers": 1, "heads": 2, "context_length": 16},
        "schedule": {"num_timesteps": T},
    }
    data.update(overrides)
    return model_config_from_dict(data)


def randomize(pipe: VQDiffusionPipeline, seed: int = 0) -> VQDiffusionPipeline:
    """Sharper random predictions (and a non-zero learned null condition) than the default initialisation."""
    jitter(pipe.transformer, std=0.3, seed=seed)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    return randomize(VQDiffusionPipeline.from_config(tiny_vq_config(), name="tiny"))


def final_codes(pipe, **kwargs):
    seen = []
    images, params = pipe.generate(callback=lambda i, n, x: seen.append((i, n, x.clone())), **kwargs)
    return images, params, seen


def test_exposes_parts_and_generates_valid_codes_and_images(pipe):
    assert pipe.autoencoder is pipe.vqvae and pipe.transformer is not None and pipe.text_encoder is not None
    assert pipe.schedule.num_timesteps == T and pipe.size_multiple == 4 and pipe.default_scale == 3.0
    images, params, seen = final_codes(pipe, prompt=["a cat", "a dog"], steps=5, seed=1, num_images_per_prompt=2)
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32 and torch.isfinite(images).all()
    assert [(i, n) for i, n, _ in seen] == [(i, 5) for i in range(5)]
    codes = seen[-1][2]
    assert codes.shape == (4, S * S) and codes.min() >= 0 and codes.max() < K  # no [MASK] left
    with torch.no_grad():
        expected = pipe.vqvae.decode_codes(codes.view(4, S, S))
    torch.testing.assert_close(images, expected)
    latent, _ = pipe.generate(["a cat", "a dog"], steps=5, seed=1, num_images_per_prompt=2, output_type="latent")
    assert torch.equal(latent, codes.view(4, S, S))
    pil = pipe(["a cat", "a dog"], steps=5, seed=1, num_images_per_prompt=2)
    assert len(pil) == 4 and pil[0].size == (16, 16) and pil[0].mode == "RGB"
    text = parse_parameters(pil[3].info["parameters"])
    assert text["prompt"] == "a dog" and text["Seed"] == "1" and text["Steps"] == "5"
    assert text["Truncation"] == "0.9" and text["CFG scale"] == "3" and text["Sampler"] == "VQ-Diffusion"
    assert text["Batch size"] == "4" and text["Batch pos"] == "3" and text["Size"] == "16x16"


def test_round_trip_through_load_pipeline_is_bit_identical(pipe, tmp_path):
    path = pipe.save(tmp_path / "tiny_vq.safetensors")
    loaded = latentdiff.load_pipeline(path)
    assert isinstance(loaded, VQDiffusionPipeline) and loaded.config == pipe.config
    for name, module in pipe.modules().items():
        other = loaded.modules()[name].state_dict()
        assert all(torch.equal(v, other[k]) for k, v in module.state_dict().items()), name
    for kwargs in ({"steps": T}, {"steps": 2, "scale": 1.0}, {"steps": 5, "truncation": 0.5}):
        a, _ = pipe.generate("a photo of a cat", seed=7, **kwargs)
        b, _ = loaded.generate("a photo of a cat", seed=7, **kwargs)
        assert torch.equal(a, b), kwargs


def test_scale_one_is_the_conditional_chain(pipe):
    """With scale 1 the null condition is never used: the output equals the plain conditional chain."""
    images, _, seen = final_codes(pipe, prompt="a cat", steps=5, seed=3, scale=1.0, truncation=1.0)
    context = pipe.encode_prompts(["a cat"])

    def conditional(x_t, t, context):
        return pipe.transformer(x_t, t, context)

    with torch.inference_mode():
        codes = sample(conditional, pipe.schedule, (1, S * S), steps=5, generator=torch.Generator().manual_seed(3),
                       model_kwargs={"context": context})
    assert torch.equal(seen[-1][2], codes)
    null = pipe.transformer.null_context
    saved = null.detach().clone()
    with torch.no_grad():
        null.add_(5.0)
    try:
        again, _ = pipe.generate("a cat", steps=5, seed=3, scale=1.0, truncation=1.0)
    finally:
        with torch.no_grad():
            null.copy_(saved)
    assert torch.equal(images, again)
    guided, _ = pipe.generate("a cat", steps=5, seed=3, scale=4.0, truncation=1.0)
    assert not torch.equal(images, guided)


def test_purity_sampler_by_argument_or_config_default(pipe, tmp_path):
    """sampler="vq_purity" runs sample_purity with the same guided model and seed, and records its name; a config
    whose sampler is vq_purity uses it by default (and for a latent-diffusion sampler name)."""
    images, params, seen = final_codes(pipe, prompt="a cat", steps=5, seed=3, scale=1.0, truncation=1.0,
                                       sampler="vq_purity")
    context = pipe.encode_prompts(["a cat"])
    with torch.inference_mode():
        codes = sample_purity(lambda x_t, t, context: pipe.transformer(x_t, t, context), pipe.schedule,
                              (1, S * S), steps=5, generator=torch.Generator().manual_seed(3),
                              model_kwargs={"context": context})
    assert torch.equal(seen[-1][2], codes)
    assert [int((x == K).sum()) for _, _, x in seen] == [12, 9, 5, 2, 0]  # round(16 γ̄) at t = 7, 5, 3, 1; 0
    assert params[0].sampler == "VQ-Diffusion purity" and "Sampler: VQ-Diffusion purity," in params[0].to_text()
    chain, _ = pipe.generate("a cat", steps=5, seed=3, scale=1.0, truncation=1.0)
    assert not torch.equal(images, chain) and pipe.default_sampler == "vq"
    by_label, _ = pipe.generate("a cat", steps=5, seed=3, scale=1.0, truncation=1.0, sampler="VQ-Diffusion purity")
    assert torch.equal(by_label, images)

    purity = VQDiffusionPipeline(tiny_vq_config(sampler="vq_purity"), pipe.vqvae, pipe.transformer, pipe.text_encoder)
    assert purity.default_sampler == "vq_purity"
    for sampler in (None, "ddim"):
        again, params = purity.generate("a cat", steps=5, seed=3, scale=1.0, truncation=1.0, sampler=sampler)
        assert torch.equal(again, images) and params[0].sampler == "VQ-Diffusion purity"
    loaded = latentdiff.load_pipeline(purity.save(tmp_path / "purity.safetensors"))
    assert loaded.config.sampler == "vq_purity"
    with pytest.raises(ValueError, match="sampler='chain' is not one of"):
        tiny_vq_config(sampler="chain")


@pytest.mark.parametrize("skip", [1, 2, 5])
def test_fast_sampling_makes_T_over_skip_transformer_calls(pipe, skip):
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        pipe.generate(["a cat", "a dog"], steps=T // skip, seed=0)
    finally:
        handle.remove()
    assert calls == [4] * (T // skip)  # one batched call (conditional + null, 2 prompts) per step


def test_without_learned_null_context_guidance_uses_the_empty_prompt():
    torch.manual_seed(0)
    cfg = tiny_vq_config(normalize_context=False, transformer={
        "num_codes": K, "latent_size": S, "dim": 16, "heads": 2, "depth": 1, "context_dim": 16,
        "context_length": 16, "num_timesteps": T, "learned_null_context": False})
    p = randomize(VQDiffusionPipeline.from_config(cfg))
    assert p.transformer.null_context is None
    empty = p.text_encoder.encode([""])
    torch.testing.assert_close(p.null_context(2), empty.expand(2, -1, -1))
    contexts = []
    handle = p.transformer.register_forward_hook(lambda m, args, out: contexts.append(args[2]))
    try:
        images, _ = p.generate(["a cat", "a dog"], steps=2, seed=0)
    finally:
        handle.remove()
    assert images.shape == (2, 3, 16, 16) and len(contexts) == 2
    for context in contexts:  # each step: one batch of the null (empty-prompt) half, then the prompts' half
        torch.testing.assert_close(context[:2], empty.expand(2, -1, -1))
        torch.testing.assert_close(context[2:], p.text_encoder.encode(["a cat", "a dog"]))


@pytest.mark.parametrize("kwargs, message", [
    ({"height": 15}, "height=15 must be a positive multiple of 4"),
    ({"width": 32}, "width=32: this VQ-Diffusion model generates 16x16 images only"),
    ({"steps": 0}, "steps=0 must be between 1 and 10"),
    ({"steps": 11}, "steps=11"),
    ({"truncation": 0.0}, "truncation=0.0 must be in"),
    ({"truncation": 1.5}, "truncation=1.5 must be in"),
    ({"sampler": "plms"}, "unknown sampler 'plms'"),
    ({"negative_prompt": "blurry"}, "does not support negative prompts"),
    ({"eta": 0.5}, "eta=0.5 applies to DDIM only"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt=0"),
    ({"prompt": []}, "no prompt given"),
    ({"output_type": "pil"}, "output_type='pil' must be"),
])
def test_bad_arguments(pipe, kwargs, message):
    kwargs = {"prompt": "a cat", **kwargs}
    with pytest.raises(ValueError, match=message):
        pipe.generate(**kwargs)


def test_accepts_the_continuous_call_defaults(pipe):
    """What txt2img passes to every pipeline: a continuous sampler name, eta 0, an empty negative prompt."""
    a, _ = pipe.generate("a cat", steps=2, seed=0, sampler="ddim", eta=0.0, negative_prompt="")
    b, _ = pipe.generate("a cat", steps=2, seed=0, sampler="vq", negative_prompt=[""])
    assert torch.equal(a, b)


def test_a_vqvae_only_file_is_refused_with_a_hint(pipe, tmp_path):
    path = save_model_file(tmp_path / "vq_only.safetensors", pipe.config, {"vqvae": pipe.vqvae})
    with pytest.raises(CheckpointError, match="no \\['transformer', 'text_encoder'\\] weights.*vqvae_checkpoint"):
        latentdiff.load_pipeline(path)


def write_diffusers_folder(pipe: VQDiffusionPipeline, folder):
    """The layout diffusers' VQDiffusionPipeline.save_pretrained writes, from our weights."""
    cfg = pipe.config
    vq, tf, te = cfg.vqvae, cfg.transformer, cfg.text_encoder
    n = len(vq.ch_mult)
    components = {
        "vqvae": ({"_class_name": "VQModel", "in_channels": 3, "out_channels": 3,
                   "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
                   "block_out_channels": [vq.ch * m for m in vq.ch_mult], "layers_per_block": vq.num_res_blocks,
                   "latent_channels": vq.z_channels, "num_vq_embeddings": vq.num_codes, "vq_embed_dim": vq.embed_dim,
                   "norm_num_groups": vq.norm_num_groups, "norm_type": "group", "sample_size": cfg.image_size},
                  {**vae_state_dict_to_diffusers({k: v for k, v in pipe.vqvae.state_dict().items()
                                                  if not k.startswith("quantize.")}),
                   "quantize.embedding.weight": pipe.vqvae.quantize.embedding.weight}),
        "transformer": ({"_class_name": "Transformer2DModel", **transformer_config_to_diffusers(tf)},
                        transformer_state_dict_to_diffusers(pipe.transformer.state_dict())[0]),
        "learned_classifier_free_sampling_embeddings": (
            {"_class_name": "LearnedClassifierFreeSamplingEmbeddings", "learnable": True,
             "hidden_size": tf.context_dim, "length": tf.context_length},
            {"embeddings": pipe.transformer.null_context}),
    }
    for name, (config, weights) in components.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(config))
        save_file({k: v.detach().contiguous() for k, v in weights.items()},
                  str(folder / name / "diffusion_pytorch_model.safetensors"))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "VQDiffusionScheduler", "num_vec_classes": K + 1, "num_train_timesteps": T}))
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "VQDiffusionPipeline", "vqvae": ["diffusers", "VQModel"],
         "transformer": ["diffusers", "Transformer2DModel"], "text_encoder": ["transformers", "CLIPTextModel"]}))
    return te


def test_diffusers_folder_loads_with_the_same_outputs(tmp_path):
    torch.manual_seed(1)
    cfg = tiny_vq_config(text_encoder={"type": "clip", "width": 16, "layers": 1, "heads": 2, "context_length": 16,
                                       "act": "quick_gelu"})
    pipe = randomize(VQDiffusionPipeline.from_config(cfg))
    folder = tmp_path / "vq-diffusion-tiny"
    write_diffusers_folder(pipe, folder)
    hf = pipe.text_encoder.transformer.text_model
    (folder / "text_encoder").mkdir()
    (folder / "text_encoder" / "config.json").write_text(json.dumps(hf.config.to_dict()))
    save_file({f"text_model.{k}": v.contiguous() for k, v in hf.state_dict().items()},
              str(folder / "text_encoder" / "model.safetensors"))
    loaded = load_vq_diffusion_folder(folder)
    assert loaded.config.image_size == 16 and loaded.config.schedule == pipe.config.schedule
    assert loaded.config.transformer.learned_null_context and loaded.config.normalize_context
    loaded.config.truncation_rate = pipe.config.truncation_rate = 1.0
    loaded.config.guidance_scale = pipe.config.guidance_scale = 5.0
    a, _ = pipe.generate("a photo of a cat", steps=5, seed=2)
    b, _ = loaded.generate("a photo of a cat", steps=5, seed=2)
    assert torch.equal(a, b)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(CheckpointError, match="not a diffusers VQ-Diffusion folder"):
        load_vq_diffusion_folder(folder)
