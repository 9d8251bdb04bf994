"""Trainer pieces (LR schedule, EMA, RNG states, log, config, losses), the non-finite guard, and a tiny end-to-end
run of latentdiff train: autoencoder, then latent diffusion on its latents, whose export loads as a pipeline."""

import json
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

import latentdiff
from latentdiff.cli import train as train_cli
from latentdiff.config import load_train_config
from latentdiff.io.checkpoint import load_model_file
from latentdiff.metrics.classifier import CifarClassifier, save_classifier
from latentdiff.training.ema import EMA
from latentdiff.training.logging import LossLog, read_log
from latentdiff.training.objectives.discriminator import PatchDiscriminator, hinge_d_loss
from latentdiff.training.objectives.perceptual import LPIPS, ClassifierFeatureDistance
from latentdiff.training.optim import lr_lambda
from latentdiff.training.state import capture_rng, list_checkpoints, load_checkpoint, restore_rng
from latentdiff.training.trainer import NonFiniteError, Trainer
from tests.tiny import CONFIGS

AE_CONFIG = CONFIGS / "train_tiny_autoencoder.yaml"
LDM_CONFIG = CONFIGS / "train_tiny_ldm.yaml"


# -- pieces ----------------------------------------------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine():
    f = [lr_lambda(s, warmup_steps=4, total_steps=12, decay="cosine", min_lr_ratio=0.1) for s in range(13)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0) and f[8] == pytest.approx(0.55) and f[12] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert lr_lambda(100, 0, 10, "constant", 0.0) == 1.0


def test_ema_warmup_decay_and_exact_swap():
    net = torch.nn.Linear(3, 2)
    ema = EMA({"net": net}, decay=0.99, warmup=True)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10**6) == 0.99
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update()  # β_0 = 0.1: θ̄ = 0.1 θ̄ + 0.9 θ
    expected = 0.1 * before["weight"] + 0.9 * net.weight.detach()
    torch.testing.assert_close(ema.shadow["net.weight"], expected)
    live = net.weight.detach().clone()
    with ema.swapped():
        assert torch.equal(net.weight, ema.shadow["net.weight"])
    assert torch.equal(net.weight, live)
    other = EMA({"net": net}, decay=0.99)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and torch.equal(other.shadow["net.weight"], ema.shadow["net.weight"])


def test_rng_states_round_trip_through_weights_only_file(tmp_path):
    state = capture_rng()
    torch.save({"rng": state}, tmp_path / "rng.pt")
    draws = (torch.rand(3), random.random(), np.random.rand())
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], again[0]) and draws[1:] == again[1:]


def test_loss_log_skips_cut_line_and_truncates(tmp_path):
    log = LossLog(tmp_path / "log.jsonl", tmp_path / "loss.png", plot_interval=0)
    for step in (1, 2, 3):
        log.append({"step": step, "loss": 1.0 / step})
    with open(log.path, "a") as f:
        f.write('{"step": 4, "lo')  # a kill in the middle of a write
    assert [r["step"] for r in read_log(log.path)] == [1, 2, 3]
    log.truncate_after(2)
    assert log.path.read_text().count("\n") == 2 and [r["step"] for r in read_log(log.path)] == [1, 2]
    log.plot()
    assert Image.open(tmp_path / "loss.png").size[0] > 100


def test_train_config_overrides_are_strict(tmp_path):
    cfg = load_train_config(LDM_CONFIG, ["optim.lr=0.5", "model.unet.model_channels=16", "objective.min_snr_gamma=5"])
    assert cfg.optim.lr == 0.5 and cfg.model.unet.model_channels == 16 and cfg.objective.min_snr_gamma == 5.0
    with pytest.raises(ValueError, match="unknown key 'optim.nope'"):
        load_train_config(LDM_CONFIG, ["optim.nope=1"])
    with pytest.raises(ValueError, match="objective.disc_start"):
        load_train_config(LDM_CONFIG, ["objective.disc_start=1"])  # not a latent-diffusion setting
    with pytest.raises(ValueError, match="precision"):
        load_train_config(AE_CONFIG, ["precision=fp64"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective: {type: gan}\n")
    with pytest.raises(ValueError, match="objective.type='gan'"):
        load_train_config(bad)


@pytest.mark.parametrize("argv, message", [
    (["--config", str(AE_CONFIG), "--set", "optim.nope=1"], "override 'optim.nope=1': unknown key 'optim.nope'"),
    (["--config", str(AE_CONFIG)], "data.shards is empty"),
    (["--config", "MISSING"], "cannot read config MISSING"),
])
def test_cli_bad_input_exits_2(tmp_path, capsys, argv, message):
    argv = [a.replace("MISSING", str(tmp_path / "missing.yaml")) for a in argv]
    message = message.replace("MISSING", str(tmp_path / "missing.yaml"))
    with pytest.raises(SystemExit) as e:
        train_cli.main([*argv, "--outdir", str(tmp_path / "run")], prog="latentdiff train")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"latentdiff train: error: {message}" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_discriminator_and_lpips():
    d = PatchDiscriminator(channels=8, layers=2)
    assert d(torch.randn(2, 3, 12, 12)).shape == (2, 1, 1, 1)
    assert hinge_d_loss(torch.full((2,), 2.0), torch.full((2,), -2.0)) == 0  # confident and right: no loss
    lpips = LPIPS()
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(lpips(x, x), torch.zeros(2)) and (lpips(x, y).abs() > 0).all()
    with pytest.raises(ValueError, match="perceptual_weight=0"):
        LPIPS.from_files("/nonexistent/vgg.pth", "/nonexistent/vgg16.pth")


def test_classifier_feature_distance_is_lpips_baseline_on_the_classifiers_activations():
    """Σ_l mean_hw Σ_c (n_l(x) − n_l(y))², n_l the channel-unit-normalised activations the classifier computes after
    its whitening layer (GELU) and after each block, read here by forward hooks on the classifier itself."""
    torch.manual_seed(0)
    clf = CifarClassifier([f"c{i}" for i in range(3)], widths=(8, 16)).eval()
    taken = []
    clf.whiten.register_forward_hook(lambda m, i, o: taken.append(torch.nn.functional.gelu(o)))
    for block in clf.blocks:
        block.register_forward_hook(lambda m, i, o: taken.append(o))
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        clf(x), clf(y)
    feats_x, feats_y = taken[:3], taken[3:]
    unit = [(a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)) for a, b in zip(feats_x, feats_y)]
    expected = sum((a - b).pow(2).sum(dim=1).mean(dim=(1, 2)) for a, b in unit)
    dist = ClassifierFeatureDistance(clf)
    taken.clear()
    torch.testing.assert_close(dist(x, y), expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(dist(x, x), torch.zeros(2)) and not any(p.requires_grad for p in dist.parameters())
    y.requires_grad_(True)
    dist(x, y).sum().backward()
    assert y.grad.abs().sum() > 0  # the gradient reaches the reconstruction
    assert dist.train().training is False  # frozen batch norms
    assert dist(x[:, :, :20, :20], y[:, :, :20, :20].detach()).shape == (2,)  # resized to the classifier's size


def test_autoencoder_trains_with_a_classifier_perceptual_loss(tmp_path, tiny_shards):
    """objective.perceptual_classifier: the perceptual term on a classifier file's features (no VGG16 needed); the
    classifier stays frozen and is not part of the exported model."""
    clf_path = tmp_path / "percept.safetensors"
    save_classifier(CifarClassifier([f"c{i}" for i in range(3)], widths=(8, 8), image_size=16), clf_path)
    shards = tiny_shards(16)
    cfg = load_train_config(AE_CONFIG, [f"data.shards={shards}", "sample_every=0", "log_every=1", "steps=2",
                                        "checkpoint_every=100", "objective.perceptual_weight=1.0",
                                        f"objective.perceptual_classifier={clf_path}"])
    trainer = Trainer(cfg, tmp_path / "run", resume="none", progress=False)
    clf_before = {k: v.clone() for k, v in trainer.objective.lpips.state_dict().items()}
    trainer.run()
    assert all(torch.equal(v, trainer.objective.lpips.state_dict()[k]) for k, v in clf_before.items())
    rows = read_log(tmp_path / "run" / "log.jsonl")
    assert len(rows) == 2 and all(r["lpips"] > 0 for r in rows)
    _, tensors, _ = load_model_file(tmp_path / "run" / "model.safetensors")
    assert set(tensors) == {"autoencoder"}
    with pytest.raises(ValueError, match="needs objective.perceptual_weight > 0"):
        load_train_config(AE_CONFIG, [f"objective.perceptual_classifier={clf_path}"])
    with pytest.raises(ValueError, match="not found"):
        Trainer(load_train_config(AE_CONFIG, [f"data.shards={shards}", "objective.perceptual_weight=1.0",
                                              "objective.perceptual_classifier=/nonexistent.safetensors"]),
                tmp_path / "bad", resume="none", progress=False)


def test_discriminator_warmup_trains_only_the_discriminator(tmp_path, tiny_shards):
    """objective.disc_warmup: for its steps from disc_start on, the loss is L_D alone, so a decoder fine-tune (here
    of a tiny VQ autoencoder's file) keeps every weight while the fresh discriminator learns; then both train."""
    vq_config, shards = CONFIGS / "train_tiny_vqvae.yaml", tiny_shards(16)
    common = [f"data.shards={shards}", "sample_every=0", "log_every=1", "checkpoint_every=100"]
    Trainer(load_train_config(vq_config, [*common, "steps=1"]), tmp_path / "src", resume="none",
            progress=False).run()
    source = tmp_path / "src" / "model.safetensors"
    _, src, _ = load_model_file(source)
    finetune = [*common, f"init_from={source}", "objective.train_decoder_only=true", "objective.disc_start=0",
                "objective.disc_warmup=2"]
    for steps in (2, 3):
        trainer = Trainer(load_train_config(vq_config, [*finetune, f"steps={steps}"]), tmp_path / f"ft{steps}",
                          resume="none", progress=False)
        d_before = {k: v.clone() for k, v in trainer.objective.discriminator.state_dict().items()}
        trainer.run()
        d_after = trainer.objective.discriminator.state_dict()
        assert any(not torch.equal(d_before[k], d_after[k]) for k in d_before)  # D learned in every run
        _, out, _ = load_model_file(tmp_path / f"ft{steps}" / "model.safetensors")
        changed = {k.split(".")[0] for k in src["vqvae"] if not torch.equal(src["vqvae"][k], out["vqvae"][k])}
        assert changed == (set() if steps == 2 else {"decoder", "post_quant_conv"})
        rows = read_log(tmp_path / f"ft{steps}" / "log.jsonl")
        assert [("d_loss" in r, "d_weight" in r) for r in rows] == [(True, False)] * 2 + [(True, True)] * (steps - 2)
    with pytest.raises(ValueError, match="objective.disc_warmup=2 needs a discriminator"):
        load_train_config(vq_config, [*common, "objective.disc_weight=0", "objective.disc_warmup=2"])


# -- the loop --------------------------------------------------------------------------------------------------


def _tiny_trainer(tmp_path, shards, extra=()) -> Trainer:
    cfg = load_train_config(AE_CONFIG, [f"data.shards={shards}", "sample_every=0",
                                        "checkpoint_every=1", "objective.disc_weight=0", *extra])
    return Trainer(cfg, tmp_path / "run", resume="none", progress=False)


def test_nonfinite_loss_stops_before_the_update(tmp_path, tiny_shards):
    trainer = _tiny_trainer(tmp_path, tiny_shards(16))
    forward = trainer.objective.forward

    def poisoned(batch, step):
        loss, logs = forward(batch, step)
        return (loss * math.nan if step == 2 else loss), logs

    trainer.objective.forward = poisoned
    with pytest.raises(NonFiniteError, match="loss became nan at step 2"):
        trainer.run()
    ckpts = trainer.outdir / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpts)] == [2, 1]  # nothing written at or after the bad step
    state = load_checkpoint(ckpts / "step_00000002.pt")
    assert all(torch.isfinite(v).all() for v in state["modules"]["autoencoder"].values())
    assert all(torch.isfinite(p).all() for p in trainer.objective.autoencoder.parameters())  # no broken update
    assert not (trainer.outdir / "model.safetensors").exists()


def test_nonfinite_gradient_stops(tmp_path, tiny_shards):
    trainer = _tiny_trainer(tmp_path, tiny_shards(16), ["steps=2"])
    weight = trainer.objective.autoencoder.decoder.conv_out.weight
    weight.register_hook(lambda g: g * math.inf)
    with pytest.raises(NonFiniteError, match="non-finite gradient norm"):
        trainer.run()
    assert list_checkpoints(trainer.outdir / "checkpoints") == []
    assert torch.isfinite(weight).all()


def test_end_to_end_autoencoder_then_latent_diffusion(tmp_path, tiny_shards):
    main = train_cli.main
    shards = tiny_shards(16)
    ae_dir, ldm_dir = tmp_path / "ae", tmp_path / "ldm"
    common = ["--set", f"data.shards={shards}", "--set", "steps=3", "--set", "log_every=1", "--no-progress"]
    assert main(["--config", str(AE_CONFIG), "--outdir", str(ae_dir), *common]) == 0
    ae_cfg, parts, meta = load_model_file(ae_dir / "model.safetensors")
    assert set(parts) == {"autoencoder"} and meta["step"] == "3" and meta["ema"] == "true"

    assert main(["--config", str(LDM_CONFIG), "--outdir", str(ldm_dir), *common,
                 "--set", f"objective.autoencoder_checkpoint={ae_dir / 'model.safetensors'}",
                 "--set", "gradient_checkpointing=true", "--set", "objective.min_snr_gamma=5"]) == 0
    for run in (ae_dir, ldm_dir):
        records = read_log(run / "log.jsonl")
        assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
        assert (run / "loss.png").is_file() and (run / "samples" / "step_00000003.png").is_file()
        assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [3, 2]
        assert json.loads(load_checkpoint(run / "checkpoints" / "step_00000003.pt")["config"])["steps"] == 3

    pipe = latentdiff.load_pipeline(ldm_dir / "model.safetensors")
    assert pipe.config.unet.gradient_checkpointing is False
    assert pipe.config.autoencoder.scaling_factor != ae_cfg.autoencoder.scaling_factor  # set from latent std
    torch.testing.assert_close(pipe.autoencoder.state_dict(), parts["autoencoder"])  # the frozen autoencoder
    images = pipe(["a photo of thing 1"], steps=2, seed=0)
    assert images[0].size == (16, 16)


def test_resume_from_an_older_checkpoint_sets_newer_ones_aside(tmp_path, tiny_shards):
    trainer = _tiny_trainer(tmp_path, tiny_shards(16), ["steps=2"])
    trainer.run()
    ckpts = trainer.outdir / "checkpoints"
    older = Trainer(trainer.cfg, trainer.outdir, resume=str(ckpts / "step_00000001.pt"), progress=False)
    assert older.step == 1 and [s for s, _ in list_checkpoints(ckpts)] == [1]
    assert (ckpts / "abandoned-step_00000002.pt").is_file()
    older.run()
    assert [s for s, _ in list_checkpoints(ckpts)] == [2, 1]


def test_max_minutes_stops_after_the_step_that_passes_it_and_exports(tmp_path, tiny_shards):
    cfg = load_train_config(AE_CONFIG, [f"data.shards={tiny_shards(16)}", "sample_every=0",
                                        "checkpoint_every=100", "log_every=100", "steps=50",
                                        "objective.disc_weight=0"])
    trainer = Trainer(cfg, tmp_path / "run", resume="none", progress=False, max_minutes=1e-9)
    record = trainer.run()
    assert trainer.stopped_by_time and trainer.step == 1 and record["step"] == 1  # logged although 1 % 100 != 0
    assert [s for s, _ in list_checkpoints(trainer.outdir / "checkpoints")] == [1]
    assert load_model_file(trainer.outdir / "model.safetensors")[2]["step"] == "1"
    resumed = Trainer(cfg, trainer.outdir, resume="auto", progress=False)  # no budget: runs on to cfg.steps
    assert resumed.step == 1 and resumed.stop_step == 50 and not resumed.stopped_by_time


def test_time_decay_spans_the_budget(tmp_path, tiny_shards, monkeypatch):
    """optim.decay_over=time: cosine over the share of --max-minutes spent after the warmup, whatever the steps;
    the clock here is the step count (1 s per step), so the multipliers are known exactly."""
    import types

    import latentdiff.training.trainer as trainer_module

    cfg = load_train_config(AE_CONFIG, [f"data.shards={tiny_shards(16)}", "sample_every=0", "checkpoint_every=100",
                                        "log_every=1", "steps=1000", "objective.disc_weight=0", "optim.warmup_steps=2",
                                        "optim.decay=cosine", "optim.min_lr_ratio=0.1", "optim.decay_over=time"])
    trainer = Trainer(cfg, tmp_path / "run", resume="none", progress=False, max_minutes=10 / 60)  # 10 s
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: float(trainer.step)))
    trainer.run()
    assert trainer.stopped_by_time and trainer.step == 10
    lrs = [r["lr"] / cfg.optim.lr for r in read_log(trainer.outdir / "log.jsonl")]  # the LR of the next step
    # steps 1, 2: warmup (0.5, then 1 for step 2); after step s >= 2 the LR uses p = (s - 1 - 2) / (10 - 2)
    expected = [1.0, 1.0] + [lr_lambda(s, 2, 1000, "cosine", 0.1, progress=(s - 3) / 8) for s in range(3, 11)]
    assert lrs == pytest.approx(expected)
    assert lrs[-1] == pytest.approx(lr_lambda(10, 2, 1000, "cosine", 0.1, progress=7 / 8))
    no_budget = Trainer(cfg, tmp_path / "no_budget", resume="none", progress=False)  # step-based, over cfg.steps
    assert no_budget.schedulers["main"].lr_lambdas[0](501) == lr_lambda(501, 2, 1000, "cosine", 0.1)
    no_budget.close()

def test_init_from_fine_tunes_an_export_and_decoder_only_keeps_the_encoder(tmp_path, tiny_shards):
    main = train_cli.main
    shards = tiny_shards(16)
    common = ["--set", f"data.shards={shards}", "--set", "steps=2", "--set", "sample_every=0", "--no-progress"]
    assert main(["--config", str(AE_CONFIG), "--outdir", str(tmp_path / "ae"), *common]) == 0
    assert main(["--config", str(LDM_CONFIG), "--outdir", str(tmp_path / "ldm"), *common,
                 "--set", f"objective.autoencoder_checkpoint={tmp_path / 'ae' / 'model.safetensors'}"]) == 0
    source = tmp_path / "ldm" / "model.safetensors"
    src_cfg, src, _ = load_model_file(source)

    # latent diffusion from a full export: every component and the latent scale come from the file
    cfg = load_train_config(LDM_CONFIG, [f"data.shards={shards}", f"init_from={source}", "steps=1",
                                         "sample_every=0", "objective.autoencoder_checkpoint=null"])
    trainer = Trainer(cfg, tmp_path / "ft", resume="none", progress=False)
    for name in ("unet", "text_encoder", "autoencoder"):
        torch.testing.assert_close(getattr(trainer.objective, name).state_dict(), src[name], rtol=0, atol=0)
    trainer.run()
    ft_cfg, ft, _ = load_model_file(tmp_path / "ft" / "model.safetensors")
    assert ft_cfg.autoencoder.scaling_factor == src_cfg.autoencoder.scaling_factor  # not re-estimated
    assert not torch.equal(ft["unet"]["out.2.weight"], src["unet"]["out.2.weight"])  # and it trained

    # the decoder of that file's autoencoder, fine-tuned alone: the encoder side stays bit-identical
    cfg = load_train_config(AE_CONFIG, [f"data.shards={shards}", f"init_from={source}", "steps=2",
                                        "sample_every=0", "objective.train_decoder_only=true"])
    trainer = Trainer(cfg, tmp_path / "dec", resume="none", progress=False)
    assert sorted(trainer.objective.frozen) == ["autoencoder.encoder", "autoencoder.quant_conv"]
    trainer.run()
    _, dec, _ = load_model_file(tmp_path / "dec" / "model.safetensors")
    before, after = src["autoencoder"], dec["autoencoder"]
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"decoder", "post_quant_conv"}

    # a file without the networks a run exports is refused by name
    cfg = load_train_config(LDM_CONFIG, [f"data.shards={shards}", f"init_from={tmp_path / 'ae' / 'model.safetensors'}"])
    with pytest.raises(ValueError, match=r"holds no \['text_encoder', 'unet'\] weights"):
        Trainer(cfg, tmp_path / "bad", resume="none", progress=False)
