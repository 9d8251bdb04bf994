"""Beta schedules and derived coefficients: known values, closed forms, float64 -> float32 storage."""

import math

import numpy as np
import pytest
import torch

from latentdiff.config import ScheduleConfig
from latentdiff.diffusion.schedule import COEFFICIENT_NAMES, DiffusionSchedule
from tests.tiny import close


def make(beta_schedule, **kw):
    return DiffusionSchedule.from_config(ScheduleConfig(beta_schedule=beta_schedule, **kw))


def test_scaled_linear_known_values():
    s = make("scaled_linear")  # Stable Diffusion defaults
    assert s.num_timesteps == 1000 and s.prediction_type == "epsilon"
    assert s.betas[0].item() == pytest.approx(0.00085, rel=1e-6)
    assert s.betas[-1].item() == pytest.approx(0.012, rel=1e-6)
    # √β is linear: its second difference vanishes.
    root = np.sqrt(s.betas.double().numpy())
    assert np.abs(np.diff(root, 2)).max() < 1e-8
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.0046601, rel=1e-4)  # SD's ᾱ_999


def test_linear_ddpm_known_values():
    s = make("linear", beta_start=1e-4, beta_end=0.02)
    assert s.betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert s.betas[-1].item() == pytest.approx(0.02, rel=1e-6)
    assert np.abs(np.diff(s.betas.double().numpy(), 2)).max() < 1e-8  # linear up to float32 rounding
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)  # DDPM's ᾱ_T


def test_cosine_matches_eq17():
    T, s_ = 1000, 0.008
    sched = make("cosine", num_timesteps=T)

    def f(t):
        return math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2

    betas = [min(1 - f(t + 1) / f(t), 0.999) for t in range(T)]
    np.testing.assert_allclose(sched.betas.numpy(), np.array(betas, dtype=np.float32), rtol=1e-6)
    assert sched.betas.max().item() == pytest.approx(0.999)  # the last step is clipped
    # Before any clipping, ᾱ_t = f(t+1) / f(0) (0-based t).
    abar = np.array([f(t + 1) / f(0) for t in range(T)])
    unclipped = np.array(betas) < 0.999
    np.testing.assert_allclose(sched.alphas_cumprod.numpy()[unclipped], abar[unclipped], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_invariants(kind):
    s = make(kind)
    ac = s.alphas_cumprod.double()
    assert torch.all(ac[1:] < ac[:-1]), "ᾱ must be strictly decreasing"
    assert 0 < ac[-1] < ac[0] < 1
    assert s.posterior_variance[0].item() == 0.0
    assert s.alphas_cumprod_prev[0].item() == 1.0 and s.alphas_cumprod_next[-1].item() == 0.0
    close(s.alphas_cumprod_prev[1:], s.alphas_cumprod[:-1], rtol=0, atol=0)
    close(s.alphas_cumprod_next[:-1], s.alphas_cumprod[1:], rtol=0, atol=0)
    # Clipped log variance: log β̃_1 at t = 0, log β̃_t elsewhere.
    assert s.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(s.posterior_variance[1].item()),
                                                                       rel=1e-6)
    close(s.posterior_log_variance_clipped[1:], s.posterior_variance[1:].log(), rtol=1e-6, atol=1e-6)
    # The posterior mean (Eq. 7 of DDPM) at x_t = √ᾱ_t x0 (its mean) is E[x_{t-1} | x0] = √ᾱ_{t-1} x0.
    lhs = s.posterior_mean_coef1.double() + s.posterior_mean_coef2.double() * s.sqrt_alphas_cumprod.double()
    close(lhs, s.alphas_cumprod_prev.double().sqrt(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_float64_then_float32(kind):
    """Every coefficient equals an independent float64 computation rounded once to float32."""
    s = make(kind)
    cfg = ScheduleConfig(beta_schedule=kind)
    if kind == "cosine":
        u = torch.arange(1001, dtype=torch.float64) / 1000
        f = torch.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        b = torch.clamp(1 - f[1:] / f[:-1], max=0.999)
    elif kind == "linear":
        b = torch.linspace(cfg.beta_start, cfg.beta_end, 1000, dtype=torch.float64)
    else:
        b = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - b, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    expected = {
        "betas": b, "alphas": 1 - b, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - ac).log(), "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
        "posterior_variance": b * (1 - ac_prev) / (1 - ac),
        "posterior_mean_coef1": b * ac_prev.sqrt() / (1 - ac),
        "posterior_mean_coef2": (1 - ac_prev) * (1 - b).sqrt() / (1 - ac),
    }
    for name in COEFFICIENT_NAMES:
        assert getattr(s, name).dtype == torch.float32, name
    for name, value in expected.items():
        close(getattr(s, name), value.float(), rtol=2e-7, atol=1e-12, msg=name)
    np.testing.assert_allclose(s.alphas_cumprod_float64, ac.numpy(), rtol=1e-13)


def test_constructor_extract_snr_to():
    s = make("scaled_linear", prediction_type="v_prediction")
    plain = DiffusionSchedule(torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2,
                              prediction_type="v_prediction")
    assert plain.prediction_type == "v_prediction" and plain.num_timesteps == 1000
    for name in COEFFICIENT_NAMES:
        close(getattr(plain, name), getattr(s, name), rtol=0, atol=0)
    t = torch.tensor([0, 10, 999])
    x = torch.zeros(3, 4, 5, 6)
    c = s.extract(s.sqrt_alphas_cumprod, t, x)
    assert c.shape == (3, 1, 1, 1) and c.dtype == x.dtype
    close(c.flatten(), s.sqrt_alphas_cumprod[t])
    assert s.extract(s.betas, t, x.double()).dtype == torch.float64
    ac = s.alphas_cumprod_float64[t.numpy()]
    close(s.snr(t), torch.from_numpy(ac / (1 - ac)).float())
    assert s.to("cpu") is s and s.device == torch.device("cpu")


def test_bad_arguments():
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionSchedule([0.1, 0.2], prediction_type="noise")
    with pytest.raises(ValueError, match="beta"):
        DiffusionSchedule([0.1, 1.0])
    with pytest.raises(ValueError, match="beta"):
        DiffusionSchedule([0.0, 0.1])
    with pytest.raises(ValueError, match="1-D"):
        DiffusionSchedule([[0.1, 0.2]])
