"""Samplers against diffusers' schedulers (same model function, timesteps and noise), CFG, argument checks.

The reference loop is the one of diffusers' pipelines: ``x = x_T * init_noise_sigma``, then per timestep
``scale_model_input`` -> model -> ``step``. diffusers draws step noise through ``randn_tensor``; it is replaced by
a list drawn from a generator seeded like ours, so both sides add the same noise at the same step.
"""

import numpy as np
import pytest
import torch

from latentdiff.config import ScheduleConfig
from latentdiff.diffusion.samplers import SAMPLERS, classifier_free_guidance, sample, spaced_timesteps
from latentdiff.diffusion.schedule import DiffusionSchedule
from tests import sd_helpers as H

diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import (  # noqa: E402
    scheduling_ddim,
    scheduling_ddpm,
    scheduling_euler_ancestral_discrete,
)

T = 1000
SD = dict(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
AC = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2, 0)  # ᾱ, float64
TOL = 1e-5


def toy_model(kind):
    """A fixed nonlinear stand-in for a network: the optimal denoiser of N(0, 0.25 I) data (so samples stay O(1))
    plus a t-dependent wiggle. Accepts long or fractional float timesteps."""

    def model(x, t):
        tt = t.double().view(-1, 1, 1, 1)
        ac = AC[t.double().floor().long().clamp(0, T - 1)].view(-1, 1, 1, 1).float()
        wiggle = 0.05 * torch.tanh(3 * x) * torch.cos(tt / 200).float()
        denom = 0.25 * ac + 1 - ac
        eps, x0 = (1 - ac).sqrt() * x / denom, ac.sqrt() * 0.25 * x / denom
        out = {"epsilon": eps, "v_prediction": ac.sqrt() * eps - (1 - ac).sqrt() * x0, "sample": x0}[kind]
        return out + wiggle

    return model


def schedule(kind):
    return DiffusionSchedule.from_config(ScheduleConfig(prediction_type=kind))


def noises(x_T, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(x_T.shape, generator=g) for _ in range(n)]


def reference(monkeypatch, scheduler, model, x_T, noise_list=(), **step_kwargs):
    it = iter(noise_list)

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        return next(it).to(dtype)

    for module in (scheduling_ddpm, scheduling_ddim, scheduling_euler_ancestral_discrete):
        monkeypatch.setattr(module, "randn_tensor", fake_randn)
    x = x_T * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


def diffusers_scheduler(sampler, kind, spacing, offset, karras=False):
    return H.diffusers_scheduler(sampler, karras, **SD, prediction_type=kind, timestep_spacing=spacing,
                                 steps_offset=offset)


# (sampler, extra kwargs, steps, spacing, steps_offset). DDIM runs only where diffusers' DDIMScheduler steps to
# the next listed timestep (see test_ddim_irregular_spacing_against_first_order_solvers for the other spacings).
CASES = (
    [("ddpm", {}, *c) for c in [(50, "leading", 1), (7, "leading", 0), (10, "trailing", 0), (7, "trailing", 0),
                                (20, "linspace", 0)]]
    + [("ddim", {"eta": eta}, *c) for eta in (0.0, 0.5)
       for c in [(50, "leading", 1), (7, "leading", 0), (10, "trailing", 0), (25, "trailing", 0)]]
    + [("dpmpp_2m", {}, *c) for c in [(25, "leading", 1), (7, "leading", 0), (10, "trailing", 0),
                                      (7, "trailing", 0), (20, "linspace", 0), (1, "leading", 1)]]
    + [("dpmpp_2m", {"use_karras_sigmas": True}, *c) for c in [(25, "leading", 1), (7, "trailing", 0),
                                                               (2, "leading", 0)]]
    + [("dpmpp_2m_karras", {}, 10, "trailing", 0)]  # the sampler id of AUTOMATIC1111's "DPM++ 2M Karras"
    + [("euler_a", {}, *c) for c in [(25, "leading", 1), (7, "leading", 0), (10, "trailing", 0),
                                     (7, "trailing", 0), (20, "linspace", 0)]]
)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler,extra,steps,spacing,offset", CASES,
                         ids=["-".join([c[0], *(f"{k}={v}" for k, v in c[1].items()), *map(str, c[2:])])
                              for c in CASES])
def test_matches_diffusers(monkeypatch, kind, sampler, extra, steps, spacing, offset):
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    model = toy_model(kind)
    karras = extra.get("use_karras_sigmas", False) or sampler == "dpmpp_2m_karras"
    ref_sched = diffusers_scheduler(sampler.removesuffix("_karras"), kind, spacing, offset, karras)
    ref_sched.set_timesteps(steps)
    step_kwargs = {"eta": extra["eta"]} if sampler == "ddim" else {}
    ref = reference(monkeypatch, ref_sched, model, x_T, noises(x_T, steps + 1), **step_kwargs)
    ours = sample(model, schedule(kind), x_T, sampler, steps, generator=torch.Generator().manual_seed(1),
                  timestep_spacing=spacing, steps_offset=offset, **extra)
    assert ours.shape == x_T.shape and ours.dtype == x_T.dtype
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_matches_diffusers_sample_prediction(monkeypatch, sampler):
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    model = toy_model("sample")
    ref_sched = diffusers_scheduler(sampler, "sample", "leading", 1)
    ref_sched.set_timesteps(10)
    ref = reference(monkeypatch, ref_sched, model, x_T, noises(x_T, 11))
    ours = sample(model, schedule("sample"), x_T, sampler, 10, generator=torch.Generator().manual_seed(1),
                  steps_offset=1)
    assert (ours - ref).abs().max().item() <= TOL


def test_ddpm_full_chain_matches_diffusers(monkeypatch):
    """steps == T: plain Algorithm 2 of DDPM over all 1000 timesteps.

    Here the reference runs in float64: in float32, DDPMScheduler re-derives β_t = 1 - ᾱ_t/ᾱ_{t-1} from float32
    ᾱ at every step (cancellation: ~1e-4 relative error in β), which drifts 2e-5 from the float64 result over
    1000 steps; ours, with coefficients from float64, stays within 1e-6 of it."""
    x_T = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    model = toy_model("epsilon")
    ref_sched = diffusers_scheduler("ddpm", "epsilon", "leading", 0)
    ref_sched.alphas_cumprod = AC.clone()
    ref_sched.set_timesteps(T)
    ref = reference(monkeypatch, ref_sched, lambda x, t: model(x.float(), t).double(), x_T.double(),
                    noises(x_T, T))
    ours = sample(model, schedule("epsilon"), x_T, "ddpm", T, generator=torch.Generator().manual_seed(1))
    assert ref.dtype == torch.float64 and (ours.double() - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("steps,spacing", [(7, "trailing"), (10, "linspace")])
def test_ddim_irregular_spacing_against_first_order_solvers(monkeypatch, steps, spacing):
    """Where timesteps are not evenly spaced, diffusers' DDIMScheduler steps from t to t - T//steps instead of to
    the next listed timestep (diffusers issues #9261, #12633); we step to the next listed timestep. References
    that do: DDIM(η=0) is first-order DPM-Solver++ (Lu et al. 2022, Sec. 4), DDIM(η=1) is DDPM ancestral."""
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    model = toy_model("epsilon")
    sch = schedule("epsilon")
    ts = spaced_timesteps(T, steps, spacing).astype(int).tolist()
    first_order = diffusers.DPMSolverMultistepScheduler(**SD, solver_order=1, final_sigmas_type="zero")
    first_order.set_timesteps(timesteps=ts)
    ref = reference(monkeypatch, first_order, model, x_T)
    ours = sample(model, sch, x_T, "ddim", steps, timestep_spacing=spacing)
    assert (ours - ref).abs().max().item() <= TOL

    ancestral = diffusers_scheduler("ddpm", "epsilon", spacing, 0)
    ancestral.set_timesteps(steps)
    assert ancestral.timesteps.tolist() == ts
    ref = reference(monkeypatch, ancestral, model, x_T, noises(x_T, steps))
    ours = sample(model, sch, x_T, "ddim", steps, eta=1.0, generator=torch.Generator().manual_seed(1),
                  timestep_spacing=spacing)
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler",
                                 "EulerAncestralDiscreteScheduler"])
def test_spaced_timesteps_match_diffusers(cls):
    """Every spacing/offset/step count: identical where diffusers' list is valid; otherwise we raise ValueError,
    except trailing where numpy's arange adds a spurious last point t = -1 (e.g. steps = 61): we keep `steps`."""
    multistep, fractional_ok = cls == "DPMSolverMultistepScheduler", cls.startswith("Euler")
    for spacing in ("leading", "trailing", "linspace"):
        for offset in ((0, 1) if spacing == "leading" else (0,)):
            ref_sched = getattr(diffusers, cls)(**SD, timestep_spacing=spacing, steps_offset=offset)
            for steps in (1, 2, 3, 7, 13, 50, 61, 103, 333, 500, 998, 999, T):
                ref_sched.set_timesteps(steps)
                ref = ref_sched.timesteps.double().numpy()
                fractional = fractional_ok and spacing == "linspace"
                valid = ref.min() >= 0 and ref.max() <= T - 1 and (fractional or np.all(np.diff(ref) < 0))
                if spacing == "trailing" and len(ref) == steps + 1 and ref[-1] == -1:
                    ref, valid = ref[:-1], True
                if valid:
                    assert len(ref) == steps
                    ours = spaced_timesteps(T, steps, spacing, offset, multistep=multistep, fractional=fractional)
                    np.testing.assert_array_equal(ours, ref, err_msg=f"{cls} {spacing} {offset} {steps}")
                else:
                    with pytest.raises(ValueError, match="timesteps"):
                        spaced_timesteps(T, steps, spacing, offset, multistep=multistep, fractional=fractional)


# ---------------------------------------------------------------------------------------------------------------
# Behaviour
# ---------------------------------------------------------------------------------------------------------------


def test_ddim_eta0_is_deterministic_and_ddpm_follows_its_generator():
    sch, model = schedule("epsilon"), toy_model("epsilon")
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(model, sch, x_T, "ddim", 10), sample(model, sch, x_T, "ddim", 10))
    a = sample(model, sch, x_T, "ddpm", 10, generator=torch.Generator().manual_seed(3))
    b = sample(model, sch, x_T, "ddpm", 10, generator=torch.Generator().manual_seed(3))
    c = sample(model, sch, x_T, "ddpm", 10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_callback_timesteps_and_dtypes(sampler):
    sch, base = schedule("epsilon"), toy_model("epsilon")
    seen_t, calls = [], []

    def model(x, t, context):
        assert context == "ctx" and x.dtype == torch.float16 and t.shape == (2,)
        seen_t.append(t)
        return base(x.float(), t).half()

    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    out = sample(model, sch, x_T, sampler, 6, generator=torch.Generator().manual_seed(1), steps_offset=1,
                 callback=lambda i, n, x_t, x0: calls.append((i, n, x_t, x0)), model_kwargs={"context": "ctx"})
    assert out.dtype == torch.float16 and out.shape == x_T.shape
    assert [c[:2] for c in calls] == [(i, 6) for i in range(6)]
    assert calls[-1][2].dtype == torch.float32 and calls[-1][3].shape == x_T.shape
    assert torch.equal(calls[-1][2].half(), out)  # the last step lands on x0
    assert all(t.dtype == torch.long for t in seen_t)


def test_euler_linspace_passes_fractional_timesteps():
    seen = []

    def model(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    sample(model, schedule("epsilon"), torch.zeros(1, 1, 2, 2), "euler_a", 5, timestep_spacing="linspace")
    assert [t.item() for t in seen] == [999.0, 749.25, 499.5, 249.75, 0.0]
    assert all(t.dtype == torch.float32 for t in seen)


def test_classifier_free_guidance():
    calls = []

    def model(x, t, context):
        calls.append(x.shape[0])
        return torch.tanh(x * context.mean((1, 2)).view(-1, 1, 1, 1)) + 1e-3 * t.view(-1, 1, 1, 1)

    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, 8, 8, generator=gen), torch.tensor([10, 500, 999])
    cond, uncond = torch.randn(3, 5, 16, generator=gen), torch.randn(3, 5, 16, generator=gen)

    one = classifier_free_guidance(model, 1.0)(x, t, context=cond, uncond_context=uncond)
    assert calls == [3]
    assert torch.equal(one, model(x, t, context=cond))

    calls.clear()
    guided = classifier_free_guidance(model, 7.5)(x, t, context=cond, uncond_context=uncond)
    assert calls == [6]  # one batched call
    u, c = model(x, t, context=uncond), model(x, t, context=cond)
    assert (guided - (u + 7.5 * (c - u))).abs().max().item() <= 1e-5

    with pytest.raises(ValueError, match="uncond_context"):
        classifier_free_guidance(model, 7.5)(x, t, context=cond)
    with pytest.raises(ValueError, match="shape"):
        classifier_free_guidance(model, 7.5)(x, t, context=cond, uncond_context=uncond[:1])
    out = sample(classifier_free_guidance(model, 3.0), schedule("epsilon"), x, "dpmpp_2m", 3,
                 model_kwargs={"context": cond, "uncond_context": uncond})
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_bad_arguments():
    sch, model, x_T = schedule("epsilon"), toy_model("epsilon"), torch.zeros(1, 1, 2, 2)
    for steps in (0, -3, T + 1, 2.5, True):
        with pytest.raises(ValueError, match="steps"):
            sample(model, sch, x_T, "ddim", steps)
    with pytest.raises(ValueError) as err:
        sample(model, sch, x_T, "heun", 10)
    assert all(name in str(err.value) for name in SAMPLERS)
    with pytest.raises(ValueError, match="timestep_spacing"):
        sample(model, sch, x_T, "ddim", 10, timestep_spacing="uniform")
    with pytest.raises(ValueError, match="eta"):
        sample(model, sch, x_T, "ddpm", 10, eta=1.0)
    with pytest.raises(ValueError, match="eta"):
        sample(model, sch, x_T, "ddim", 10, eta=-0.1)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        sample(model, sch, x_T, "euler_a", 10, use_karras_sigmas=True)
    with pytest.raises(ValueError, match="steps_offset"):
        sample(model, sch, x_T, "ddim", 10, steps_offset=-1)
    with pytest.raises(ValueError, match="timesteps"):  # leading + offset 1 would reach t = 1000
        sample(model, sch, x_T, "ddim", T, steps_offset=1)
    with pytest.raises(ValueError, match="x_T"):
        sample(model, sch, torch.zeros(1, 1, 2, 2, dtype=torch.long), "ddim", 10)
