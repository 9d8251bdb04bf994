"""LoRA training (``objective.lora``): a tiny random SD 1 model fine-tuned with only its adapters trainable, whose
kohya-format ``lora.safetensors`` loads in diffusers (``load_lora_weights``) and in ``pipe.load_lora`` with the same
outputs, whose exported model equals base + LoRA, and whose resume after a stop is exact."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors import safe_open

from latentdiff import load_pipeline
from latentdiff.config import to_dict
from latentdiff.config.train import train_config_from_dict
from latentdiff.io.checkpoint import load_model_file
from latentdiff.models.lora import lora_layers
from latentdiff.training.logging import read_log
from latentdiff.training.trainer import Trainer
from tests import sd_helpers as H


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(diffusers U-Net, VAE, CLIP text model, the same model as a latentdiff model file)."""
    unet, vae, text = H.diffusers_unet(sd2=False), H.diffusers_vae(), H.clip_text_model()
    folder = tmp_path_factory.mktemp("lora_train")
    single = H.save_single_file(folder / "sd1.safetensors", H.compvis_state(unet, vae, text, sd2=False))
    return unet, vae, text, load_pipeline(single, overrides=H.SD1_OVERRIDES).save(folder / "base.safetensors")


def lora_config(model_file, shards, **objective) -> dict:
    model = to_dict(load_model_file(model_file)[0])
    model["image_size"] = H.IMAGE_SIZE
    return {
        "model": model, "init_from": str(model_file),
        "objective": {"type": "latent_diffusion", "sample_prompts": ["a cat"], "sample_steps": 1,
                      "lora": {"rank": 2, "alpha": 1.0, "text_encoder": True}, **objective},
        "data": {"shards": str(shards), "image_size": H.IMAGE_SIZE, "batch_size": 2, "num_workers": 0,
                 "shuffle_buffer": 4},
        "optim": {"lr": 5e-3}, "ema": {"enabled": True, "decay": 0.5}, "precision": "fp32", "device": "cpu",
        "steps": 4, "log_every": 1, "sample_every": 4, "checkpoint_every": 2, "seed": 3,
    }


def plain_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A LoRA-wrapped module's own weights under their original names (adapters left out)."""
    return {k.replace(".base.", "."): v for k, v in module.state_dict().items() if ".adapters." not in k}


def kohya_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@torch.no_grad()
def outputs(unet_fn, text_fn, ids):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, H.LATENT, H.LATENT, generator=g)
    context = torch.randn(2, 77, H.TEXT_WIDTH, generator=g)
    return unet_fn(x, torch.tensor([5, 600]), context), text_fn(ids)


def test_lora_run_trains_only_adapters_and_exports_a_kohya_file(base, tmp_path, tiny_shards):
    d_unet, d_vae, d_text, model_file = base
    cfg = train_config_from_dict(lora_config(model_file, tiny_shards(8)))
    trainer = Trainer(cfg, tmp_path / "run", resume="none", progress=False)
    objective = trainer.objective
    assert list(trainer.optimizers["main"].param_groups[0]["params"])  # adapters only:
    trained = {id(p) for g in trainer.optimizers["main"].param_groups for p in g["params"]}
    assert trained == {id(p) for p in objective.trainable["lora"].parameters()}
    _, src, _ = load_model_file(model_file)
    trainer.run()

    # the model's own weights are bit-identical, the adapters moved, the loss stayed finite
    for name in ("unet", "text_encoder"):
        torch.testing.assert_close(plain_state(getattr(objective, name)), src[name], rtol=0, atol=0)
    ups = [a.up for layer in lora_layers(objective.unet).values() for a in layer.adapters.values()]
    assert ups and all(bool(u.abs().sum() > 0) for u in ups)  # B starts at 0
    assert len(lora_layers(objective.text_encoder)) == 2 * 6  # 2 CLIP layers: q, k, v, out, fc1, fc2
    log = read_log(tmp_path / "run" / "log.jsonl")
    assert len(log) == 4 and all(math.isfinite(r["loss"]) for r in log)

    # lora.safetensors: kohya keys only, a small fraction of the model
    lora_file = tmp_path / "run" / "lora.safetensors"
    tensors = kohya_tensors(lora_file)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.alpha" in tensors
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.") for k in tensors)
    assert lora_file.stat().st_size < (tmp_path / "run" / "model.safetensors").stat().st_size / 20

    # base + our load_lora == the exported (merged) model == diffusers' load_lora_weights
    pipe = load_pipeline(model_file)
    pipe.load_lora(lora_file)
    merged = load_pipeline(tmp_path / "run" / "model.safetensors")
    ids = pipe.text_encoder.tokenize(["a photo of thing 1", "a dog"])
    ours = outputs(pipe.unet, pipe.text_encoder, ids)
    theirs_merged = outputs(merged.unet, merged.text_encoder, ids)
    base_out = outputs(load_pipeline(model_file).unet, load_pipeline(model_file).text_encoder, ids)
    assert float((ours[0] - base_out[0]).abs().max()) > 1e-6  # the LoRA changes the model
    for a, b in zip(ours, theirs_merged):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)

    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline(vae=d_vae, text_encoder=copy.deepcopy(d_text), tokenizer=H.clip_tokenizer(),
                                  unet=copy.deepcopy(d_unet), scheduler=H.ddim_scheduler(), safety_checker=None,
                                  feature_extractor=None, requires_safety_checker=False)
    ref.load_lora_weights(str(lora_file))
    theirs = outputs(lambda x, t, c: ref.unet(x, t, encoder_hidden_states=c).sample,
                     lambda i: ref.text_encoder(i).last_hidden_state, ids)
    for a, b in zip(ours, theirs):
        print(f"max |ours - diffusers| = {float((a - b).abs().max()):.2e}")
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_lora_run_resumes_exactly(base, tmp_path, tiny_shards):
    model_file = base[3]
    raw = lora_config(model_file, tiny_shards(8), lora={"rank": 2, "targets": ["attn2"]})
    cfg = train_config_from_dict({**raw, "steps": 3, "checkpoint_every": 1, "sample_every": 0})
    Trainer(cfg, tmp_path / "straight", resume="none", progress=False).run()
    Trainer(cfg, tmp_path / "stopped", resume="none", progress=False, max_steps=1).run()  # checkpoint at step 1
    resumed = Trainer(cfg, tmp_path / "stopped", resume="auto", progress=False)
    assert resumed.step == 1
    resumed.run()
    a, b = kohya_tensors(tmp_path / "straight" / "lora.safetensors"), kohya_tensors(tmp_path / "stopped" /
                                                                                   "lora.safetensors")
    assert sorted(a) == sorted(b) and all("_attn2_" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_lora_config_errors(base, tmp_path, tiny_shards):
    model_file = base[3]
    raw = lora_config(model_file, tiny_shards(8))
    with pytest.raises(ValueError, match="set init_from"):
        train_config_from_dict({**raw, "init_from": None})
    with pytest.raises(ValueError, match="rank"):
        train_config_from_dict(lora_config(model_file, tiny_shards(8), lora={"rank": 0}))
    cfg = train_config_from_dict(lora_config(model_file, tiny_shards(8), lora={"targets": ["nothing"]}))
    with pytest.raises(ValueError, match="name no layer of the unet"):
        Trainer(cfg, tmp_path / "bad", resume="none", progress=False)


def test_example_config_adapts_the_embedded_model(tmp_path, tiny_shards):
    """configs/cifar10_ldm_lora.yaml for two steps on tiny shards: its LoRA (U-Net only, kohya names) loads onto
    the embedded default model, and base + LoRA equals the run's merged export."""
    from latentdiff.config import load_train_config
    from tests.tiny import CONFIGS

    cfg = load_train_config(CONFIGS / "cifar10_ldm_lora.yaml", [
        f"data.shards={tiny_shards(8)}", "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=4",
        "steps=2", "sample_every=0", "checkpoint_every=2", "device=cpu", "precision=fp32", "optim.warmup_steps=0"])
    Trainer(cfg, tmp_path / "run", resume="none", progress=False).run()
    lora_file = tmp_path / "run" / "lora.safetensors"
    assert all(k.startswith("lora_unet_") for k in kohya_tensors(lora_file))
    pipe = load_pipeline("default")
    pipe.load_lora(lora_file, scale=1.0)
    merged = load_pipeline(tmp_path / "run" / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    C, S = pipe.config.unet.in_channels, pipe.config.image_size // pipe.config.autoencoder.downsample_factor
    x, context = torch.randn(2, C, S, S, generator=g), pipe.text_encoder.encode(["a photo of a cat", ""])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, torch.tensor([3, 900]), context),
                                   merged.unet(x, torch.tensor([3, 900]), context), rtol=0, atol=1e-5)
