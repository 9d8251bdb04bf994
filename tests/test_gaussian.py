"""Forward process, posterior, ε/x0/v conversions and training losses against independent closed forms."""

import math

import numpy as np
import pytest
import torch

from latentdiff.config import ScheduleConfig
from latentdiff.diffusion import gaussian as g
from latentdiff.diffusion.schedule import DiffusionSchedule
from tests.tiny import close


def make(prediction_type="epsilon", beta_schedule="scaled_linear"):
    return DiffusionSchedule.from_config(ScheduleConfig(beta_schedule=beta_schedule,
                                                        prediction_type=prediction_type))


def test_q_sample_moments():
    """x_t | x0 ~ N(√ᾱ_t x0, (1-ᾱ_t) I): empirical mean and variance over many draws (Eq. 4 of DDPM)."""
    s = make()
    gen = torch.Generator().manual_seed(0)
    N = 20000
    x0 = torch.tensor([1.5, -0.7, 0.2])  # three "pixels"
    for t_ in (0, 300, 999):
        t = torch.full((N,), t_, dtype=torch.long)
        noise = torch.randn(N, 3, generator=gen)
        x_t = g.q_sample(s, x0.expand(N, 3), t, noise).double()
        ac = s.alphas_cumprod_float64[t_]
        mean, var = math.sqrt(ac) * x0.double(), 1 - ac
        # Standard errors: √(var/N) for the mean, var·√(2/N) for the variance; allow 5 of them.
        assert torch.all((x_t.mean(0) - mean).abs() < 5 * math.sqrt(var / N))
        assert torch.all((x_t.var(0) - var).abs() < 5 * var * math.sqrt(2 / N))


def _bayes_posterior(ac_prev, alpha, x0, x_t):
    """Mean and variance of q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0), normalised on a float64 grid."""
    prior_m, prior_s = math.sqrt(ac_prev) * x0, math.sqrt(1 - ac_prev)
    lik_m, lik_s = x_t / math.sqrt(alpha), math.sqrt((1 - alpha) / alpha)  # likelihood as a function of x_{t-1}
    lo = min(prior_m - 10 * prior_s, lik_m - 10 * lik_s)
    hi = max(prior_m + 10 * prior_s, lik_m + 10 * lik_s)
    x = np.linspace(lo, hi, 200001)
    log_p = (-(x_t - math.sqrt(alpha) * x) ** 2 / (2 * (1 - alpha))
             - (x - prior_m) ** 2 / (2 * (1 - ac_prev)))
    w = np.exp(log_p - log_p.max())
    w /= w.sum()
    mean = (w * x).sum()
    return mean, (w * (x - mean) ** 2).sum()


@pytest.mark.parametrize("kind", ["scaled_linear", "cosine"])
def test_q_posterior_matches_bayes(kind):
    s = make(beta_schedule=kind)
    ts = [1, 10, 500, 998]
    x0 = torch.tensor([0.8, -1.3, 0.1, 2.0])
    x_t = torch.tensor([0.3, 1.1, -0.9, 0.4])
    t = torch.tensor(ts)
    mean, var, log_var = g.q_posterior(s, x0, x_t, t)
    for i, t_ in enumerate(ts):
        ac_prev = s.alphas_cumprod_float64[t_ - 1]
        alpha = s.alphas_cumprod_float64[t_] / ac_prev
        m_ref, v_ref = _bayes_posterior(ac_prev, alpha, x0[i].item(), x_t[i].item())
        assert mean[i].item() == pytest.approx(m_ref, rel=1e-4, abs=1e-5)
        assert var[i].item() == pytest.approx(v_ref, rel=1e-4)
        assert log_var[i].item() == pytest.approx(math.log(v_ref), abs=1e-4)
    # t = 0: the posterior is the point mass at x0 (β̃_0 = 0); the log variance is clipped to log β̃_1.
    mean0, var0, log_var0 = g.q_posterior(s, x0, x_t, torch.zeros(4, dtype=torch.long))
    close(mean0, x0)
    assert torch.all(var0 == 0) and torch.allclose(log_var0, s.posterior_variance[1].log())


def test_q_posterior_fixed_large_and_shapes():
    s = make()
    x0, x_t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 1, 700])
    mean, var, log_var = g.q_posterior(s, x0, x_t, t, variance_type="fixed_large")
    assert mean.shape == x0.shape and var.shape == (3, 1, 1, 1) and log_var.shape == (3, 1, 1, 1)
    close(var.flatten(), torch.stack([s.posterior_variance[1], s.betas[1], s.betas[700]]))
    close(log_var, var.log())
    with pytest.raises(ValueError, match="variance_type"):
        g.q_posterior(s, x0, x_t, t, variance_type="learned")


def test_eps_x0_v_identities():
    s = make()
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 3, 4, 4, generator=gen)
    eps = torch.randn(5, 3, 4, 4, generator=gen)
    t = torch.tensor([0, 1, 250, 600, 999])
    x_t = g.q_sample(s, x0, t, eps)
    tol = {"rtol": 1e-5, "atol": 5e-5}
    close(g.predict_x0_from_eps(s, x_t, t, eps), x0, **tol)
    close(g.predict_eps_from_x0(s, x_t, t, x0), eps, **tol)
    v = g.get_v(s, x0, t, eps)
    ac = torch.from_numpy(s.alphas_cumprod_float64[t.numpy()]).float().view(-1, 1, 1, 1)
    close(v, ac.sqrt() * eps - (1 - ac).sqrt() * x0, **tol)  # Salimans & Ho 2022
    close(g.x0_from_v(s, x_t, t, v), x0, **tol)
    close(g.eps_from_v(s, x_t, t, v), eps, **tol)
    # (x_t, v) is (x0, ε) rotated by φ_t, cos φ_t = √ᾱ_t (Sec. 4 of Salimans & Ho 2022): norms are preserved.
    close(v**2 + x_t**2, eps**2 + x0**2, **tol)
    for kind, pred in (("epsilon", eps), ("v_prediction", v), ("sample", x0)):
        sk = make(kind)
        got_x0, got_eps = g.to_x0_eps(sk, pred, x_t, t)
        close(got_x0, x0, **tol)
        close(got_eps, eps, **tol)
        # The scalar form the samplers use agrees with the tensor form.
        for i, t_ in enumerate(t.tolist()):
            a, b, c, d = g.x0_eps_coefficients(kind, float(s.alphas_cumprod_float64[t_]))
            close(a * x_t[i] + b * pred[i], x0[i], **tol)
            close(c * x_t[i] + d * pred[i], eps[i], **tol)


def _ideal_model(s, x0, noise, kind):
    """A perfect predictor: recovers the target of ``kind`` from x_t alone, via float64 closed forms."""

    def model(x_t, t):
        ac = torch.from_numpy(s.alphas_cumprod_float64[t.numpy()]).view(-1, 1, 1, 1)
        eps = (x_t.double() - ac.sqrt() * x0.double()) / (1 - ac).sqrt()
        return {"epsilon": eps, "v_prediction": ac.sqrt() * eps - (1 - ac).sqrt() * x0.double(),
                "sample": x0.double()}[kind].float()

    return model


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_training_losses_perfect_predictor(kind):
    s = make(kind)
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(4, 2, 8, 8, generator=gen), torch.randn(4, 2, 8, 8, generator=gen)
    t = torch.tensor([0, 17, 512, 999])
    out = g.training_losses(s, _ideal_model(s, x0, noise, kind), x0, t, noise=noise)
    assert out["loss"].shape == (4,) and out["mse"].shape == (4,)
    assert out["mse"].max().item() < 1e-8
    out = g.training_losses(s, _ideal_model(s, x0, noise, kind), x0, t, noise=noise, min_snr_gamma=5.0)
    assert out["loss"].max().item() < 1e-8
    # An output off by δ everywhere has mse δ².
    off = g.training_losses(s, lambda x, tt: _ideal_model(s, x0, noise, kind)(x, tt) + 0.1, x0, t, noise=noise)
    close(off["mse"], torch.full((4,), 0.01), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_equal_x0_space_weighting(kind):
    """Hang et al. 2023: the weighted loss of every parameterisation equals min(SNR, γ)·‖x̂0 - x0‖²."""
    s = make(kind)
    gamma = 5.0
    gen = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(6, 2, 4, 4, generator=gen), torch.randn(6, 2, 4, 4, generator=gen)
    t = torch.tensor([0, 50, 200, 400, 700, 999])
    wrong = torch.randn(6, 2, 4, 4, generator=gen)  # an arbitrary network output
    out = g.training_losses(s, lambda x, tt: wrong, x0, t, noise=noise, min_snr_gamma=gamma)
    x_t = g.q_sample(s, x0, t, noise)
    pred_x0, _ = g.to_x0_eps(s, wrong, x_t, t)
    ac = s.alphas_cumprod_float64[t.numpy()]
    snr = torch.from_numpy(ac / (1 - ac))
    x0_mse = (pred_x0.double() - x0.double()).pow(2).flatten(1).mean(1)
    close(out["loss"].double(), snr.clamp(max=gamma) * x0_mse, rtol=2e-4, atol=1e-7)
    expected_w = {"epsilon": snr.clamp(max=gamma) / snr, "v_prediction": snr.clamp(max=gamma) / (snr + 1),
                  "sample": snr.clamp(max=gamma)}[kind]
    close(g.min_snr_weights(s, t, gamma).double(), expected_w, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        g.min_snr_weights(s, t, 0.0)


def test_training_losses_passes_model_kwargs_and_checks_shape():
    s = make()
    seen = {}

    def model(x_t, t, context):
        seen["context"], seen["t"] = context, t
        return torch.zeros_like(x_t)

    x0, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 4])
    out = g.training_losses(s, model, x0, t, model_kwargs={"context": "c"})
    assert seen["context"] == "c" and seen["t"] is t and out["loss"].dtype == torch.float32
    with pytest.raises(ValueError, match="shape"):
        g.training_losses(s, lambda x, tt: x[:, :2], x0, t)


def test_sample_timesteps():
    t = g.sample_timesteps(4096, 1000, torch.Generator().manual_seed(0))
    assert t.shape == (4096,) and t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    assert t.float().mean().item() == pytest.approx(499.5, abs=15)
    close(t, g.sample_timesteps(4096, 1000, torch.Generator().manual_seed(0)))
    assert g.sample_timesteps(3, 10, device="cpu").device == torch.device("cpu")
