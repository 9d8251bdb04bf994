"""Guidance in a limited interval (Kynkäänniemi et al. 2024): classifier-free guidance only at the steps whose noise
level σ_t = √((1 - ᾱ_t)/ᾱ_t) lies in (σ_lo, σ_hi]. Against diffusers' Euler ancestral loop with the guidance
switched by diffusers' own ``scheduler.sigmas``; the σ of a timestep against the closed form; the pipeline, txt2img
(the PNG's "Guidance interval" field, --from-png) and eval-t2i."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.cli import eval_t2i, txt2img
from latentdiff.config import ScheduleConfig
from latentdiff.diffusion.samplers import classifier_free_guidance, noise_level, sample
from latentdiff.diffusion.schedule import DiffusionSchedule
from latentdiff.diffusion.timesteps import schedule_sigmas
from latentdiff.io.images import parse_parameters, png_bytes, png_settings

SCALE = 4.0
AC = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)  # ᾱ of linear_schedule()


def cond_model(x, t, context):
    """A stand-in ε network whose output depends on the prompt (context (B,)), x and t: the optimal denoiser of
    N(0, I) data, √(1 - ᾱ_t) x_t, plus a prompt- and t-dependent offset (so samples stay O(1) under guidance)."""
    ac = AC[t.double().floor().long().clamp(0, 999)].view(-1, 1, 1, 1).float()
    c = context.view(-1, 1, 1, 1)
    return (1 - ac).sqrt() * x + 0.1 * c * torch.cos(t.double().view(-1, 1, 1, 1).float() / 150)


def linear_schedule() -> DiffusionSchedule:
    return DiffusionSchedule.from_config(ScheduleConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))


def test_noise_level_is_the_closed_form():
    sigmas = schedule_sigmas(linear_schedule())
    ac = AC.numpy()
    for t in (0, 99, 500, 999):
        assert noise_level(sigmas, t) == pytest.approx(np.sqrt((1 - ac[t]) / ac[t]), rel=1e-12)
    mid = noise_level(sigmas, 99.25)  # fractional (Euler ancestral, linspace): linear between the neighbours
    assert mid == pytest.approx(0.75 * noise_level(sigmas, 99) + 0.25 * noise_level(sigmas, 100), rel=1e-12)
    zero_snr = DiffusionSchedule.from_config(ScheduleConfig(prediction_type="v_prediction",
                                                            rescale_betas_zero_snr=True,
                                                            timestep_spacing="trailing"))
    last = noise_level(schedule_sigmas(zero_snr), 999)
    assert np.isfinite(last) and last > 1000  # ᾱ = 0 taken as 2^-24


@pytest.mark.parametrize("interval", [(0.0, 1e4), (1e4, 2e4), (0.5, 6.0), (2.0, 30.0)])
def test_euler_a_matches_diffusers_with_guidance_switched_by_its_sigmas(monkeypatch, interval):
    """The reference guides exactly where diffusers' EulerAncestralDiscreteScheduler's sigma lies in the interval."""
    pytest.importorskip("diffusers")
    from tests import sd_helpers as H
    from tests.test_samplers import noises, reference

    sch = linear_schedule()
    ref_sched = H.diffusers_scheduler("euler_a", False, num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                      beta_schedule="linear", prediction_type="epsilon",
                                      timestep_spacing="trailing", steps_offset=0)
    ref_sched.set_timesteps(10)
    cond, uncond = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.0])
    guided_sigmas = []

    def ref_model(x, t):
        sigma = float(ref_sched.sigmas[ref_sched.step_index])
        c, u = cond_model(x, t, cond), cond_model(x, t, uncond)
        if interval[0] < sigma <= interval[1]:
            guided_sigmas.append(sigma)
            return u + SCALE * (c - u)
        return c

    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = reference(monkeypatch, ref_sched, ref_model, x_T, noises(x_T, 11))
    calls = []

    def counted(x, t, context):
        calls.append(x.shape[0])
        return cond_model(x, t, context)

    guided = classifier_free_guidance(counted, SCALE, interval=interval, schedule=sch)
    ours = sample(guided, sch, x_T, "euler_a", 10, generator=torch.Generator().manual_seed(1),
                  timestep_spacing="trailing", model_kwargs={"context": cond, "uncond_context": uncond})
    assert (ours - ref).abs().max().item() <= 1e-5
    assert calls.count(4) == len(guided_sigmas) and calls.count(2) == 10 - len(guided_sigmas)  # 2B only when guided
    assert {(0.0, 1e4): 10, (1e4, 2e4): 0}.get(interval, len(guided_sigmas)) == len(guided_sigmas)
    if interval == (0.5, 6.0):
        assert 0 < len(guided_sigmas) < 10


def test_full_and_empty_intervals_are_plain_guidance_and_none():
    sch = linear_schedule()
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = {"context": torch.tensor([1.0, -0.5]), "uncond_context": torch.zeros(2)}

    def run(scale, **extra):
        return sample(classifier_free_guidance(cond_model, scale, **extra), sch, x_T, "ddim", 8,
                      model_kwargs=kwargs)

    assert torch.equal(run(SCALE, interval=(0.0, 1e4), schedule=sch), run(SCALE))
    assert torch.equal(run(SCALE, interval=(500.0, 1e4), schedule=sch), run(1.0))


@pytest.mark.parametrize("bad", [(1.0, 1.0), (2.0, 1.0), (-1.0, 3.0), (0.0, float("nan")), (1.0,), "ab", None])
def test_bad_intervals_are_refused(bad):
    with pytest.raises(ValueError, match="guidance interval"):
        classifier_free_guidance(cond_model, SCALE, interval=bad if bad is not None else (0.0, -1.0),
                                 schedule=linear_schedule())
    with pytest.raises(ValueError, match="schedule"):
        classifier_free_guidance(cond_model, SCALE, interval=(0.0, 1.0))


def test_pipeline_records_the_interval_and_png_settings_read_it(tiny_ldm_pipe, tmp_path):
    pipe = tiny_ldm_pipe
    kwargs = dict(steps=4, scale=5.0, seed=0, output_type="latent", sampler="euler_a")
    plain, params = pipe.generate("a cat", **kwargs)
    assert "Guidance interval" not in params[0].to_text()
    full, params = pipe.generate("a cat", guidance_interval=(0, 1e4), **kwargs)
    assert torch.equal(full, plain)
    unguided = pipe.generate("a cat", **{**kwargs, "scale": 1.0})[0]
    assert torch.equal(pipe.generate("a cat", guidance_interval=(1e4, 2e4), **kwargs)[0], unguided)
    part, params = pipe.generate("a cat", guidance_interval=(0.5, 3.0), **kwargs)
    assert not torch.equal(part, plain) and not torch.equal(part, unguided)
    text = params[0].to_text()
    assert "Guidance interval: 0.5/3" in text
    path = tmp_path / "p.png"
    path.write_bytes(png_bytes(Image.new("RGB", (8, 8)), text))
    assert png_settings(path)["guidance_interval"] == (0.5, 3.0)
    path.write_bytes(png_bytes(Image.new("RGB", (8, 8)), text.replace("0.5/3", "0.5")))
    with pytest.raises(ValueError, match="Guidance interval"):
        png_settings(path)
    with pytest.raises(ValueError, match="guidance interval"):
        pipe.generate("a cat", guidance_interval=(3.0, 0.5), **kwargs)


def test_txt2img_guidance_interval_and_from_png(tiny_ldm_file, tmp_path, capsys):
    first = tmp_path / "first"
    common = ["--ckpt", str(tiny_ldm_file), "--steps", "4", "--sampler", "euler_a", "--quiet"]
    assert txt2img.main(["a cat", *common, "--seed", "3", "--guidance-interval", "0.5", "3",
                         "--outdir", str(first)]) == 0
    source = first / "00000.png"
    with Image.open(source) as im:
        assert parse_parameters(im.info["parameters"])["Guidance interval"] == "0.5/3"
    again = tmp_path / "again"
    assert txt2img.main(["--from-png", str(source), "--ckpt", str(tiny_ldm_file), "--outdir", str(again),
                         "--quiet"]) == 0
    assert (again / "00000.png").read_bytes() == source.read_bytes()
    plain = tmp_path / "plain"
    assert txt2img.main(["a cat", *common, "--seed", "3", "--outdir", str(plain)]) == 0
    assert (plain / "00000.png").read_bytes() != source.read_bytes()
    every = tmp_path / "every"  # 0 inf: every step guided, recorded as such, and read back from the PNG
    assert txt2img.main(["a cat", *common, "--seed", "3", "--guidance-interval", "0", "inf", "--outdir",
                         str(every)]) == 0
    with Image.open(every / "00000.png") as a, Image.open(plain / "00000.png") as b:
        assert a.tobytes() == b.tobytes() and "Guidance interval: 0/inf" in a.info["parameters"]
    assert txt2img.main(["--from-png", str(every / "00000.png"), "--ckpt", str(tiny_ldm_file), "--outdir",
                         str(every), "--quiet"]) == 0
    assert (every / "00001.png").read_bytes() == (every / "00000.png").read_bytes()
    capsys.readouterr()
    for bad in (["3", "0.5"], ["-1", "2"], ["1", "nan"], ["1"]):
        with pytest.raises(SystemExit) as e:
            txt2img.main(["a cat", *common, "--guidance-interval", *bad, "--outdir", str(tmp_path / "bad")])
        assert e.value.code == 2 and "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_eval_t2i_records_the_interval(tiny_ldm_file, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--ckpt", str(tiny_ldm_file), "--steps", "3", "--sampler", "euler_a", "--num-samples", "2",
            "--reference", "none", "--no-clip", "--device", "cpu", "--quiet"]
    assert eval_t2i.main([*argv, "--guidance-interval", "0.5", "3", "--outdir", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["guidance_interval"] == [0.5, 3.0]
    with Image.open(sorted((out / "images").glob("*.png"))[0]) as im:
        assert "Guidance interval: 0.5/3" in im.info["parameters"]
    with pytest.raises(SystemExit) as e:
        eval_t2i.main([*argv, "--guidance-interval", "3", "0.5", "--outdir", str(tmp_path / "bad")])
    assert e.value.code == 2 and "SIGMA_LO must be below SIGMA_HI" in capsys.readouterr().err


def test_a_model_config_carries_a_default_interval(tiny_ldm_pipe):
    """config.guidance_interval is the model's own interval (as guidance_scale is its scale); an explicit one
    replaces it and (0, inf) guides every step again."""
    import dataclasses

    from latentdiff.config import model_config_from_dict, to_dict
    from latentdiff.pipelines import LatentDiffusionPipeline

    config = dataclasses.replace(tiny_ldm_pipe.config, guidance_interval=[0.5, 3.0])
    pipe = LatentDiffusionPipeline(config, tiny_ldm_pipe.unet, tiny_ldm_pipe.autoencoder, tiny_ldm_pipe.text_encoder)
    kwargs = dict(steps=4, scale=5.0, seed=0, output_type="latent", sampler="euler_a")
    own, params = pipe.generate("a cat", **kwargs)
    assert params[0].guidance_interval == (0.5, 3.0)
    assert torch.equal(own, tiny_ldm_pipe.generate("a cat", guidance_interval=(0.5, 3.0), **kwargs)[0])
    every, params = pipe.generate("a cat", guidance_interval=(0.0, float("inf")), **kwargs)
    assert torch.equal(every, tiny_ldm_pipe.generate("a cat", **kwargs)[0])
    assert model_config_from_dict(to_dict(config)).guidance_interval == [0.5, 3.0]  # stored and read back
    for bad in ([3.0, 0.5], [1.0], [-1.0, 2.0]):
        with pytest.raises(ValueError, match="guidance_interval"):
            model_config_from_dict({**to_dict(config), "guidance_interval": bad})
