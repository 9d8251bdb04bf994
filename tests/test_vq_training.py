"""VQ training objectives with the common trainer: VQ autoencoder, then VQ-Diffusion on its codes, then txt2img."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from latentdiff.cli import txt2img
from latentdiff.config import load_train_config, train_config_from_dict
from latentdiff.diffusion.discrete import ImportanceTimestepSampler
from latentdiff.io.checkpoint import load_model_file
from latentdiff.pipelines import parse_parameters
from latentdiff.training.objectives import build_objective
from latentdiff.training.objectives.vq_diffusion import SyncedTimestepSampler
from latentdiff.training.state import checkpoint_path, load_checkpoint
from latentdiff.training.trainer import Trainer
from tests.tiny import CONFIGS

VQVAE = CONFIGS / "train_tiny_vqvae.yaml"
VQ_DIFFUSION = CONFIGS / "train_tiny_vq_diffusion.yaml"
FAST = ["steps=2", "log_every=2", "sample_every=2", "checkpoint_every=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_shards):
    """A 2-step VQ autoencoder run, then a 2-step VQ-Diffusion run on its export."""
    root = tmp_path_factory.mktemp("vq_runs")
    shards = tiny_shards(8)
    vq_cfg = load_train_config(VQVAE, [f"data.shards={shards}", *FAST])
    vq_record = Trainer(vq_cfg, root / "vqvae", resume="none", progress=False).run()
    diff_cfg = load_train_config(VQ_DIFFUSION, [f"data.shards={shards}", *FAST,
                                                f"objective.vqvae_checkpoint={root / 'vqvae' / 'model.safetensors'}"])
    trainer = Trainer(diff_cfg, root / "vq_diffusion", resume="none", progress=False)
    diff_record = trainer.run()
    return {"root": root, "shards": shards, "vq_record": vq_record, "diff_record": diff_record, "trainer": trainer,
            "diff_cfg": diff_cfg}


def test_vqvae_run_logs_codebook_statistics_and_exports_the_autoencoder(runs):
    record = runs["vq_record"]
    for key in ("l_rec", "vq_loss", "usage", "perplexity", "loss"):
        assert np.isfinite(record[key]), key
    assert 0 < record["usage"] <= 1 and 1 <= record["perplexity"] <= 32
    cfg, parts, _ = load_model_file(runs["root"] / "vqvae" / "model.safetensors")
    assert cfg.type == "vq_diffusion" and set(parts) == {"vqvae"}
    assert "quantize.cluster_size" in parts["vqvae"]  # EMA codebook statistics travel with it
    assert (runs["root"] / "vqvae" / "samples" / "step_00000002.png").is_file()


def test_vq_diffusion_run_uses_the_frozen_autoencoder_and_checkpoints_the_timestep_sampler(runs):
    root, trainer = runs["root"], runs["trainer"]
    _, vq_parts, _ = load_model_file(root / "vqvae" / "model.safetensors")
    cfg, parts, _ = load_model_file(root / "vq_diffusion" / "model.safetensors")
    assert set(parts) == {"vqvae", "transformer", "text_encoder"}
    assert all(torch.equal(v, parts["vqvae"][k]) for k, v in vq_parts["vqvae"].items())
    assert not cfg.transformer.gradient_checkpointing
    sampler = trainer.objective.timestep_sampler
    assert sampler.Lt_count.sum() == 2 * 4  # 2 steps of 4 samples
    state = load_checkpoint(checkpoint_path(root / "vq_diffusion" / "checkpoints", 2))
    saved = state["objective"]["timestep_sampler"]
    assert saved == {"Lt_history": sampler.Lt_history.tolist(), "Lt_count": sampler.Lt_count.tolist()}
    fresh = build_objective(runs["diff_cfg"])
    fresh.load_extra_state(state["objective"])
    assert torch.equal(fresh.timestep_sampler.Lt_history, sampler.Lt_history.cpu())
    assert np.isfinite(runs["diff_record"]["vlb"]) and (root / "vq_diffusion" / "samples").is_dir()


def test_txt2img_on_the_export_writes_a_png_with_parameters(runs, tmp_path):
    out = tmp_path / "out"
    ckpt = runs["root"] / "vq_diffusion" / "model.safetensors"
    assert txt2img.main(["a photo of a cat", "--ckpt", str(ckpt), "--steps", "5", "--seed", "3", "--outdir", str(out),
                         "--quiet"]) == 0
    (png,) = out.glob("*.png")
    image = Image.open(png)
    params = parse_parameters(image.info["parameters"])
    assert image.size == (16, 16) and params["prompt"] == "a photo of a cat" and params["Steps"] == "5"
    assert params["Seed"] == "3" and params["Sampler"] == "VQ-Diffusion" and params["CFG scale"] == "2"


def test_dropped_captions_get_the_learned_null_condition(runs):
    objective = runs["trainer"].objective
    with torch.no_grad():
        context = objective.encode_captions(["a cat", "", "a dog"])
    null = objective.transformer.null_context
    assert torch.equal(context[1], null) and not torch.equal(context[0], null)
    torch.testing.assert_close(context[0].norm(dim=-1), torch.ones(16))  # normalize_context


def test_synced_timestep_sampler_matches_the_plain_one_in_a_process_group(tmp_path):
    t = torch.tensor([0, 3, 3, 9])
    vlb = torch.tensor([1.0, 2.0, 3.0, 4.0])
    plain, synced = ImportanceTimestepSampler(10), SyncedTimestepSampler(10)
    plain.update(t, vlb)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        synced.update(t, vlb)
    finally:
        dist.destroy_process_group()
    assert torch.equal(plain.Lt_history, synced.Lt_history) and torch.equal(plain.Lt_count, synced.Lt_count)


@pytest.mark.parametrize("overrides, message", [
    (["objective.vqvae_checkpoint=MISSING"], "objective.vqvae_checkpoint: checkpoint .* does not exist"),
    (["objective.mask_weight=[1.0]"], "objective.mask_weight=\\[1.0\\] must be two numbers"),
    (["objective.sample_truncation=0"], "objective.sample_truncation=0"),
])
def test_bad_vq_diffusion_configs_are_clear_errors(runs, tmp_path, overrides, message):
    overrides = [o.replace("MISSING", str(tmp_path / "nope.safetensors")) for o in overrides]
    with pytest.raises(ValueError, match=message):
        build_objective(load_train_config(VQ_DIFFUSION, [f"data.shards={runs['shards']}", *overrides]))


@pytest.mark.parametrize("kind", ["vqvae", "vq_diffusion"])
def test_vq_objectives_need_a_vq_model(kind):
    cfg = train_config_from_dict({"objective": {"type": kind}})  # model: the default latent_diffusion config
    with pytest.raises(ValueError, match=f"objective.type='{kind}' trains a VQDiffusionConfig model, but "
                                         f"model.type is 'latent_diffusion'"):
        build_objective(cfg)


def test_a_checkpoint_without_a_vqvae_is_refused(runs, tmp_path):
    from latentdiff.io.checkpoint import save_model_file

    cfg, parts, _ = load_model_file(runs["root"] / "vq_diffusion" / "model.safetensors")
    path = save_model_file(tmp_path / "no_vqvae.safetensors", cfg, {"transformer": parts["transformer"]})
    with pytest.raises(ValueError, match="holds no 'vqvae' weights"):
        build_objective(load_train_config(VQ_DIFFUSION, [f"objective.vqvae_checkpoint={path}"]))


def test_the_anneal_config_continues_the_embedded_model_with_its_autoencoder_frozen(tmp_path):
    """configs/cifar10_vq_diffusion_anneal.yaml (how v1.2 and v1.3 were made): init_from the embedded VQ-Diffusion
    file, its transformer and text encoder train, its VQ autoencoder (and so every code) stays as it was, and the
    learning rate falls on a cosine to 0 over the --max-minutes budget."""
    from latentdiff.assets import EMBEDDED_MODELS
    from tests.tiny import ROOT, make_shards

    config = ROOT / "configs" / "cifar10_vq_diffusion_anneal.yaml"
    embedded = EMBEDDED_MODELS["default-vq"]
    raw = load_train_config(config, [])
    assert raw.init_from == raw.objective.vqvae_checkpoint == "latentdiff/assets/default_vq.safetensors"
    assert (raw.optim.decay, raw.optim.min_lr_ratio, raw.optim.decay_over) == ("cosine", 0.0, "time")
    shards = make_shards(tmp_path / "shards", 8, size=32)
    cfg = load_train_config(config, [f"data.shards={shards}", f"init_from={embedded}",
                                     f"objective.vqvae_checkpoint={embedded}", "data.batch_size=4",
                                     "data.num_workers=0", "steps=2", "optim.warmup_steps=1", "sample_every=0",
                                     "log_every=1", "checkpoint_every=100", "device=cpu", "precision=fp32"])
    trainer = Trainer(cfg, tmp_path / "run", resume="none", progress=False, max_minutes=60)
    assert trainer.schedulers["main"].lr_lambdas[0](1) == 1.0  # after the warmup, at the start of the budget
    trainer.run()
    src_cfg, src, _ = load_model_file(embedded)
    out_cfg, out, _ = load_model_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(v.float(), out["vqvae"][k].float()) for k, v in src["vqvae"].items())
    assert any(not torch.equal(v.float(), out["transformer"][k]) for k, v in src["transformer"].items())
    assert (out_cfg.guidance_scale, out_cfg.truncation_rate) == (src_cfg.guidance_scale, src_cfg.truncation_rate)
