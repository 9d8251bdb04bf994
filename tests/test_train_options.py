"""Training and sampling options carried over from diffusers and kohya's sd-scripts, each against an independent
reference: v-prediction targets and min-SNR-γ weights (diffusers' compute_snr), offset noise and input perturbation
(the formulas of diffusers' train_text_to_image.py), zero-terminal-SNR schedules (diffusers'
rescale_zero_terminal_snr and its schedulers with rescale_betas_zero_snr=True), guidance rescale (diffusers'
rescale_noise_cfg), the optimizer choice (exact resume) and TensorBoard logging (event files read back)."""

import dataclasses
import sys

import numpy as np
import pytest
import torch

from latentdiff.config import LatentDiffusionConfig, ScheduleConfig, load_train_config, model_config_from_dict, to_dict
from latentdiff.config.train import LatentDiffusionObjectiveConfig, OptimConfig
from latentdiff.diffusion import gaussian as g
from latentdiff.diffusion.samplers import classifier_free_guidance, noise_to_step, sample
from latentdiff.diffusion.schedule import DiffusionSchedule, rescale_zero_terminal_snr, scaled_linear_betas
from latentdiff.training.logging import LossLog
from latentdiff.training.optim import build_optimizer
from latentdiff.training.state import checkpoint_path, load_checkpoint
from latentdiff.training.trainer import Trainer
from tests import sd_helpers as H
from tests.test_samplers import noises, reference, toy_model
from tests.tiny import CONFIGS

diffusers = pytest.importorskip("diffusers")

T = 1000
SD = dict(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
ZTSNR = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")


def sd_schedule(kind: str, zero_snr: bool = False) -> DiffusionSchedule:
    extra = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"} if zero_snr else {}
    return DiffusionSchedule.from_config(ScheduleConfig(prediction_type=kind, **extra))


# ---------------------------------------------------------------------------------------------------------------
# 1. v-prediction: target and min-SNR-γ weights
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_targets_and_min_snr_weights_match_diffusers(kind, zero_snr):
    """The loss of training_losses equals train_text_to_image.py's: target = noise or get_velocity, per-sample MSE
    times min(SNR, γ)/SNR (ε) or min(SNR, γ)/(SNR + 1) (v), SNR from diffusers' compute_snr."""
    from diffusers.training_utils import compute_snr

    if zero_snr and kind == "epsilon":
        pytest.skip("zero terminal SNR refuses epsilon prediction")
    ref = diffusers.DDPMScheduler(**SD, prediction_type=kind, rescale_betas_zero_snr=zero_snr)
    sch, gamma = sd_schedule(kind, zero_snr), 5.0
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 1, 200, 500, 998, 999])
    pred = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    out = g.training_losses(sch, lambda x, tt: pred, x0, t, noise=noise, min_snr_gamma=gamma)

    target = noise if kind == "epsilon" else ref.get_velocity(x0, noise, t)
    torch.testing.assert_close(g.training_target(sch, x0, t, noise), target, rtol=1e-5, atol=1e-5)
    snr = compute_snr(ref, t)
    weights = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    weights = weights / snr if kind == "epsilon" else weights / (snr + 1)
    rtol = 1e-4 if zero_snr else 1e-5  # diffusers rescales in float32: β_1 = 1 - ᾱ_1/ᾱ_0 to ~1e-4
    torch.testing.assert_close(g.min_snr_weights(sch, t, gamma), weights, rtol=rtol, atol=1e-7)
    mse = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
    torch.testing.assert_close(out["loss"], mse * weights, rtol=rtol, atol=1e-6)
    if zero_snr:  # SNR 0 at the last step: the v weight is 0 there, as diffusers computes it
        assert snr[-1] == 0 and out["loss"][-1] == 0


# ---------------------------------------------------------------------------------------------------------------
# 2. Offset noise and input perturbation
# ---------------------------------------------------------------------------------------------------------------


def diffusers_training_inputs(scheduler, latents, timesteps, noise_offset, input_perturbation):
    """The noise, noisy latents and target of diffusers' examples/text_to_image/train_text_to_image.py, with its
    draws in its order (noise, offset, perturbation), from the global RNG."""
    noise = torch.randn_like(latents)
    if noise_offset:
        noise += noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device)
    if input_perturbation:
        new_noise = noise + input_perturbation * torch.randn_like(noise)
        noisy_latents = scheduler.add_noise(latents, new_noise, timesteps)
    else:
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(latents, noise, timesteps)
    return noisy_latents, target


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("offset,perturbation", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.1), (0.05, 0.2)])
def test_offset_noise_and_input_perturbation_match_train_text_to_image(kind, offset, perturbation):
    ref = diffusers.DDPMScheduler(**SD, prediction_type=kind)
    sch = sd_schedule(kind)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500, 990])
    seen = {}

    def model(x_t, tt):
        seen["x_t"] = x_t
        return torch.zeros_like(x_t)

    torch.manual_seed(7)
    out = g.training_losses(sch, model, x0, t, noise_offset=offset, input_perturbation=perturbation)
    after_ours = torch.rand(())
    torch.manual_seed(7)
    x_t, target = diffusers_training_inputs(ref, x0, t, offset, perturbation)
    assert torch.rand(()) == after_ours  # the same number of draws
    torch.testing.assert_close(seen["x_t"], x_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["mse"], target.pow(2).mean(dim=[1, 2, 3]), rtol=1e-5, atol=1e-6)


def test_offset_noise_is_one_shift_per_sample_and_channel():
    """ε' - ε is constant over each (sample, channel) plane, with the offset's scale."""
    sch = sd_schedule("epsilon")
    x0, t = torch.zeros(64, 4, 8, 8), torch.full((64,), 500)
    noise = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = {}
    g.training_losses(sch, lambda x, tt: seen.setdefault("x", x), x0, t, noise=noise, noise_offset=0.5)
    eps = seen["x"] / sch.sqrt_one_minus_alphas_cumprod[500]  # x0 = 0: x_t = √(1-ᾱ) ε'
    shift = eps - noise  # (64, 4, 8, 8)
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift), rtol=0, atol=1e-5)
    assert 0.4 < shift[:, :, 0, 0].std().item() < 0.6


def test_noise_options_are_checked_and_reach_the_loss(monkeypatch):
    for name in ("noise_offset", "input_perturbation"):
        for bad in (-0.1, float("nan"), float("inf")):
            with pytest.raises(ValueError, match=name):
                LatentDiffusionObjectiveConfig(**{name: bad})
    from latentdiff.training.objectives import build_objective
    from latentdiff.training.objectives import latent_diffusion as ld

    cfg = load_train_config(CONFIGS / "train_tiny_ldm.yaml", ["objective.noise_offset=0.1",
                                                              "objective.input_perturbation=0.2"])
    objective = build_objective(cfg)
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return {"loss": torch.zeros(2), "mse": torch.zeros(2)}

    monkeypatch.setattr(ld, "training_losses", spy)
    objective({"image": torch.zeros(2, 3, 16, 16), "caption": ["a", "b"]}, 0)
    assert seen["noise_offset"] == 0.1 and seen["input_perturbation"] == 0.2


# ---------------------------------------------------------------------------------------------------------------
# 3. Zero terminal SNR: schedule, config, samplers, guidance rescale
# ---------------------------------------------------------------------------------------------------------------


def test_rescale_zero_terminal_snr_matches_diffusers():
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as reference_rescale

    betas = scaled_linear_betas(T, 0.00085, 0.012)
    ours = rescale_zero_terminal_snr(betas)
    np.testing.assert_allclose(ours, reference_rescale(torch.from_numpy(betas)).numpy(), rtol=1e-12, atol=1e-15)
    ac, ac_old = np.cumprod(1 - ours), np.cumprod(1 - betas)
    assert ours[-1] == 1.0 and ac[-1] == 0.0 and np.isclose(ac[0], ac_old[0], rtol=1e-12)  # Alg. 1 of Lin et al.
    sch = sd_schedule("v_prediction", zero_snr=True)
    assert sch.zero_terminal_snr and sch.alphas_cumprod[-1] == 0 and sch.snr(torch.tensor([T - 1])) == 0
    ref = diffusers.DDIMScheduler(**SD, rescale_betas_zero_snr=True)
    torch.testing.assert_close(sch.alphas_cumprod, ref.alphas_cumprod, rtol=1e-5, atol=1e-8)
    for name in ("posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2", "sqrt_alphas_cumprod"):
        assert torch.isfinite(getattr(sch, name)).all(), name


def test_zero_terminal_snr_config_checks_and_old_files():
    with pytest.raises(ValueError, match="epsilon"):
        ScheduleConfig(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    with pytest.raises(ValueError, match="leading"):
        ScheduleConfig(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    ScheduleConfig(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="linspace")
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        DiffusionSchedule(rescale_zero_terminal_snr(scaled_linear_betas(T, 0.00085, 0.012)), "epsilon")
    old = to_dict(LatentDiffusionConfig())  # a model file written before the field existed
    del old["schedule"]["rescale_betas_zero_snr"]
    assert model_config_from_dict(old).schedule.rescale_betas_zero_snr is False



def test_zero_terminal_snr_survives_the_diffusers_scheduler_config():
    """Exported as diffusers' ``rescale_betas_zero_snr``: diffusers' DDIMScheduler builds the same ᾱ from it, and
    our reader of scheduler configs gives the setting back."""
    from diffusers import DDIMScheduler

    from latentdiff.io.export import scheduler_config
    from latentdiff.io.stable_diffusion import schedule_config_from_diffusers

    cfg = LatentDiffusionConfig(schedule=ScheduleConfig(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                                        timestep_spacing="trailing", steps_offset=0))
    sched = scheduler_config(cfg)
    theirs = DDIMScheduler.from_config({k: v for k, v in sched.items() if k != "_class_name"})
    ours = DiffusionSchedule.from_config(cfg.schedule)
    assert theirs.alphas_cumprod[-1].item() == 0.0
    torch.testing.assert_close(theirs.alphas_cumprod.double(), torch.from_numpy(ours.alphas_cumprod_float64),
                               rtol=1e-5, atol=1e-6)  # theirs are float32
    assert schedule_config_from_diffusers(sched) == cfg.schedule

ZTSNR_CASES = [("ddpm", {}), ("ddim", {}), ("ddim", {"eta": 0.5}), ("dpmpp_2m", {}),
               ("dpmpp_2m", {"use_karras_sigmas": True}), ("euler_a", {})]


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
@pytest.mark.parametrize("sampler,extra", ZTSNR_CASES, ids=[f"{s}-{e}" for s, e in ZTSNR_CASES])
def test_zero_terminal_snr_samplers_match_diffusers(monkeypatch, kind, sampler, extra):
    """Trailing spacing from t = T-1, where ᾱ = 0 (2^-24 for the σ samplers, as diffusers)."""
    if sampler == "euler_a" and kind == "sample":
        pytest.skip("diffusers' Euler ancestral has no sample prediction")
    steps = 10
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    model = toy_model(kind)
    ref_sched = H.diffusers_scheduler(sampler, extra.get("use_karras_sigmas", False), **SD, **ZTSNR,
                                      prediction_type=kind)
    ref_sched.set_timesteps(steps)
    assert ref_sched.timesteps[0] == T - 1
    step_kwargs = {"eta": extra.get("eta", 0.0)} if sampler == "ddim" else {}
    ref = reference(monkeypatch, ref_sched, model, x_T, noises(x_T, steps + 1), **step_kwargs)
    ours = sample(model, sd_schedule(kind, zero_snr=True), x_T, sampler, steps, timestep_spacing="trailing",
                  generator=torch.Generator().manual_seed(1), **extra)
    assert torch.isfinite(ref).all() and torch.isfinite(ours).all()
    assert (ours - ref).abs().max().item() <= 1e-4


def test_zero_terminal_snr_img2img_start_and_leading_warning():
    sch = sd_schedule("v_prediction", zero_snr=True)
    x0, noise = torch.ones(1, 4, 8, 8), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for sampler in ("ddim", "ddpm"):  # ᾱ_{T-1} = 0: the first step's x_t is the noise alone
        assert torch.equal(noise_to_step(x0, noise, sch, sampler, 10, 0, "trailing"), noise)
    euler = noise_to_step(x0, noise, sch, "euler_a", 10, 0, "trailing")
    torch.testing.assert_close(euler, 2**-12 * x0 + (1 - 2**-24) ** 0.5 * noise)
    with pytest.warns(UserWarning, match="leading"):
        sample(toy_model("v_prediction"), sch, noise, "ddim", 5, timestep_spacing="leading")


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_guidance_rescale_matches_rescale_noise_cfg(phi):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    weights = torch.randn(2, 4, 1, 1, generator=torch.Generator().manual_seed(0))

    def model(x, t, context):
        return x * context.view(-1, 1, 1, 1) + weights.repeat(x.shape[0] // 2, 1, 1, 1) * t.view(-1, 1, 1, 1)

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, cond, uncond = torch.tensor([3.0, 5.0]), torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.25])
    scale = 7.5
    ours = classifier_free_guidance(model, scale, phi)(x, t, context=cond, uncond_context=uncond)
    text, empty = model(x, t, cond), model(x, t, uncond)
    ref = rescale_noise_cfg(empty + scale * (text - empty), text, guidance_rescale=phi)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rescale"):
        classifier_free_guidance(model, scale, 1.5)


def png_settings_of(text: str, tmp_path) -> dict:
    from PIL import Image

    from latentdiff.io.images import png_bytes, png_settings

    path = tmp_path / "params.png"
    path.write_bytes(png_bytes(Image.new("RGB", (8, 8)), text))
    return png_settings(path)


def test_pipeline_and_txt2img_guidance_rescale(tmp_path):
    from latentdiff.cli.txt2img import build_parser
    from tests.tiny import fresh_tiny_pipe

    pipe = fresh_tiny_pipe()
    kwargs = dict(steps=3, scale=5.0, seed=0, output_type="latent")
    plain, _ = pipe.generate("a cat", **kwargs)
    assert torch.equal(pipe.generate("a cat", guidance_rescale=0.0, **kwargs)[0], plain)
    rescaled, params = pipe.generate("a cat", guidance_rescale=0.7, **kwargs)
    assert torch.isfinite(rescaled).all() and not torch.allclose(rescaled, plain)
    assert "CFG Rescale phi: 0.7" in params[0].to_text()  # recorded, and read back for --from-png
    assert png_settings_of(params[0].to_text(), tmp_path)["guidance_rescale"] == 0.7
    for bad in (1.5, float("nan")):
        with pytest.raises(ValueError, match="guidance_rescale"):
            pipe.generate("a cat", guidance_rescale=bad, **kwargs)
    assert build_parser().parse_args(["x", "--guidance-rescale", "0.7"]).guidance_rescale == 0.7
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["x", "--guidance-rescale", "1.5"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------------------------
# 4. Optimizers
# ---------------------------------------------------------------------------------------------------------------


def test_optimizer_choice():
    with pytest.raises(ValueError, match="optim.optimizer"):
        OptimConfig(optimizer="sgd")
    params = [torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.zeros(8))]
    cfg = OptimConfig(optimizer="adafactor", lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(params, cfg)
    assert isinstance(opt, torch.optim.Adafactor) and [gr["weight_decay"] for gr in opt.param_groups] == [0.1, 0.0]
    assert isinstance(build_optimizer(params, OptimConfig()), torch.optim.AdamW)


def test_adamw8bit_clear_error_without_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], OptimConfig(optimizer="adamw8bit"))


def test_adamw8bit_is_bitsandbytes_adamw8bit():
    """Our optimizer makes the same steps as bitsandbytes' AdamW8bit built by hand (8-bit state for big tensors)."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 128))  # 8192 elements: 8-bit moments
    b = torch.nn.Parameter(a.detach().clone())
    cfg = OptimConfig(optimizer="adamw8bit", lr=1e-2, weight_decay=0.01, betas=[0.8, 0.99])
    ours = build_optimizer([a], cfg)
    ref = bnb.optim.AdamW8bit([b], lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.01)
    for step in range(3):
        grad = torch.randn(64, 128, generator=torch.Generator().manual_seed(step))
        for p, opt in ((a, ours), (b, ref)):
            p.grad = grad.clone()
            opt.step()
    assert torch.equal(a, b) and ours.state[a]["state1"].dtype == torch.uint8


@pytest.mark.parametrize("optimizer", ["adamw8bit", "adafactor"])
def test_optimizer_state_resumes_exactly(tmp_path, tiny_shards, optimizer):
    """2 steps in one go == 1 step, then a resumed run to 2 (weights, EMA, optimizer state, RNG), with the noise
    options on (their draws come from the checkpointed RNG streams too)."""
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    shards = tiny_shards(16)
    sets = [f"data.shards={shards}", "steps=2", "checkpoint_every=1", "sample_every=0", "log_every=1",
            f"optim.optimizer={optimizer}", "objective.noise_offset=0.1", "objective.input_perturbation=0.1"]
    cfg = load_train_config(CONFIGS / "train_tiny_ldm.yaml", sets)
    Trainer(cfg, tmp_path / "ref", resume="none", progress=False).run()
    Trainer(cfg, tmp_path / "cut", resume="none", progress=False, max_steps=1).run()
    Trainer(cfg, tmp_path / "cut", resume="auto", progress=False).run()
    ref, cut = (load_checkpoint(checkpoint_path(tmp_path / d / "checkpoints", 2)) for d in ("ref", "cut"))
    state = ref["optimizers"]["main"]["state"]
    if optimizer == "adamw8bit":  # bitsandbytes nests its quantised state under one key
        assert any(s["__bnb_optimizer_quant_state__"]["state1"].dtype == torch.uint8 for s in state.values())
    else:
        assert any("row_var" in s for s in state.values())
    for key in ("modules", "ema", "optimizers"):
        assert _flatten(ref[key]) == _flatten(cut[key]), key


def _flatten(obj, prefix=""):
    """Nested state -> {path: bytes of tensors / plain values}, for exact comparison."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flatten(val, f"{prefix}.{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _flatten(val, f"{prefix}[{i}]").items()}
    if torch.is_tensor(obj):
        return {prefix: (obj.dtype, tuple(obj.shape), obj.detach().cpu().contiguous().view(-1).view(torch.uint8)
                         .numpy().tobytes())}
    return {prefix: obj}


# ---------------------------------------------------------------------------------------------------------------
# 5. TensorBoard
# ---------------------------------------------------------------------------------------------------------------


def _events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_images_and_resume_purge(tmp_path):
    pytest.importorskip("tensorboard")
    from PIL import Image

    logdir = tmp_path / "tensorboard"
    log = LossLog(tmp_path / "log.jsonl", tensorboard_dir=logdir)
    log.truncate_after(0)
    for step in (1, 2, 3, 4):
        log.append({"step": step, "loss": 1.0 / step, "lr": 1e-4, "grad_norm_main": float("nan")})
    Image.new("RGB", (6, 4), (255, 0, 0)).save(tmp_path / "grid.png")
    log.add_image_grid(4, tmp_path / "grid.png")
    acc = _events(logdir)
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("loss")] == [(s, round(1 / s, 6)) for s in (1, 2, 3, 4)]
    assert "grad_norm_main" not in acc.Tags()["scalars"]  # non-finite values are left out
    (image,) = acc.Images("samples")
    assert (image.step, image.width, image.height) == (4, 6, 4)
    log.tensorboard.close()

    resumed = LossLog(tmp_path / "log.jsonl", tensorboard_dir=logdir)  # a run resumed from step 2
    resumed.truncate_after(2)
    resumed.append({"step": 3, "loss": 7.0})
    resumed.tensorboard.close()
    assert [(e.step, e.value) for e in _events(logdir).Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, 7.0)]


def test_tensorboard_missing_is_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    log = LossLog(tmp_path / "log.jsonl", tensorboard_dir=tmp_path / "tensorboard")
    log.append({"step": 1, "loss": 1.0})
    log.append({"step": 2, "loss": 1.0})
    log.add_image_grid(2, tmp_path / "missing.png")
    assert capsys.readouterr().err.count("tensorboard package is not installed") == 1
    assert not (tmp_path / "tensorboard").exists() and len(log.path.read_text().splitlines()) == 2


def test_trainer_writes_tensorboard(tmp_path, tiny_shards):
    pytest.importorskip("tensorboard")
    cfg = load_train_config(CONFIGS / "train_tiny_ldm.yaml", [f"data.shards={tiny_shards(16)}", "steps=2",
                                                              "sample_every=2", "log_every=1", "checkpoint_every=2"])
    Trainer(cfg, tmp_path / "run", resume="none", progress=False).run()
    acc = _events(tmp_path / "run" / "tensorboard")
    assert [e.step for e in acc.Scalars("loss")] == [1, 2] and "lr" in acc.Tags()["scalars"]
    assert [e.step for e in acc.Images("samples")] == [2]


def test_dataclass_defaults_unchanged():
    """The new options default to the old behaviour."""
    assert OptimConfig().optimizer == "adamw"
    obj = LatentDiffusionObjectiveConfig()
    assert obj.noise_offset == 0.0 and obj.input_perturbation == 0.0
    assert dataclasses.asdict(ScheduleConfig())["rescale_betas_zero_snr"] is False


def test_text_cache_of_a_frozen_encoder(tmp_path, tiny_shards, monkeypatch):
    """objective.text_cache: each distinct caption is encoded once (alone), the contexts equal the encoder's own,
    the run resumes exactly, and a trained text encoder is refused."""
    from latentdiff.training.objectives.latent_diffusion import TextCache

    with pytest.raises(ValueError, match="text_cache needs a frozen text encoder"):
        LatentDiffusionObjectiveConfig(text_cache=8)
    shards = tiny_shards(16)
    sets = [f"data.shards={shards}", "steps=2", "checkpoint_every=1", "sample_every=0", "log_every=1",
            "objective.train_text_encoder=false", "objective.text_cache=64"]
    cfg = load_train_config(CONFIGS / "train_tiny_ldm.yaml", sets)
    trainer = Trainer(cfg, tmp_path / "ref", resume="none", progress=False)
    cache, encoded = trainer.objective.text_cache, []
    encode = cache.text_encoder.encode
    monkeypatch.setattr(cache.text_encoder, "encode", lambda captions: encoded.extend(captions) or encode(captions))
    trainer.run()
    assert encoded and len(encoded) == len(set(encoded)) == len(cache.entries)  # once per distinct caption
    captions = list(cache.entries)
    torch.testing.assert_close(cache(captions), encode(captions), rtol=1e-5, atol=1e-6)
    Trainer(cfg, tmp_path / "cut", resume="none", progress=False, max_steps=1).run()
    Trainer(cfg, tmp_path / "cut", resume="auto", progress=False).run()
    ref, cut = (load_checkpoint(checkpoint_path(tmp_path / d / "checkpoints", 2)) for d in ("ref", "cut"))
    assert _flatten(ref["modules"]) == _flatten(cut["modules"])
    small = TextCache(cache.text_encoder, 2)  # least recently used captions are evicted
    small(["a", "b"]), small(["a"]), small(["c"])
    assert list(small.entries) == ["a", "c"]
