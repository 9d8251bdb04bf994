"""Gaussian diffusion math: forward process, posterior, ε / x0 / v conversions, training targets and losses.

Notation (variable -> symbol): ``x0`` -> x_0, ``x_t`` -> x_t, ``eps`` -> ε, ``v`` -> v, ``t`` -> t (integer,
0-based, shape (B,)), ᾱ_t -> ``schedule.alphas_cumprod[t]``. Coefficients are gathered at t and broadcast with
``schedule.extract``. Identities used throughout (Eq. 4 of DDPM; Sec. 4 and App. D of Salimans & Ho 2022):

    x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε            v = √ᾱ_t ε - √(1-ᾱ_t) x0
    x0  = √ᾱ_t x_t - √(1-ᾱ_t) v            ε = √(1-ᾱ_t) x_t + √ᾱ_t v

See docs/diffusion.md for the derivations.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from latentdiff.diffusion.schedule import DiffusionSchedule

VARIANCE_TYPES = ("fixed_small", "fixed_large")


def q_sample(schedule: DiffusionSchedule, x0: torch.Tensor, t: torch.Tensor,
             noise: torch.Tensor | None = None) -> torch.Tensor:
    """Sample q(x_t | x0) = N(√ᾱ_t x0, (1-ᾱ_t) I) in closed form (Eq. 4 of DDPM): x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε."""
    if noise is None:
        noise = torch.randn_like(x0)
    return (schedule.extract(schedule.sqrt_alphas_cumprod, t, x0) * x0
            + schedule.extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * noise)


def q_posterior(schedule: DiffusionSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                variance_type: str = "fixed_small") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and log-variance of q(x_{t-1} | x_t, x0) (Eq. 6-7 of DDPM).

    mean = coef1 · x0 + coef2 · x_t (same shape as x_t). ``variance_type``: ``fixed_small`` is the true posterior
    variance β̃_t (log clipped at t=0, where β̃_0 = 0); ``fixed_large`` is β_t, with β̃_1 at t=0 (the larger
    choice of Sec. 3.2 of DDPM, as in ADM). Variances have shape (B, 1, ..., 1).
    """
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type={variance_type!r} is not one of {list(VARIANCE_TYPES)}")
    mean = (schedule.extract(schedule.posterior_mean_coef1, t, x_t) * x0
            + schedule.extract(schedule.posterior_mean_coef2, t, x_t) * x_t)
    if variance_type == "fixed_small":
        variance = schedule.extract(schedule.posterior_variance, t, x_t)
        log_variance = schedule.extract(schedule.posterior_log_variance_clipped, t, x_t)
    else:
        large = torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]])  # (T,)
        variance = schedule.extract(large, t, x_t)
        log_variance = schedule.extract(torch.log(large), t, x_t)
    return mean, variance, log_variance


# ---------------------------------------------------------------------------------------------------------------
# ε / x0 / v conversions
# ---------------------------------------------------------------------------------------------------------------


def predict_x0_from_eps(schedule: DiffusionSchedule, x_t: torch.Tensor, t: torch.Tensor,
                        eps: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t = √(1/ᾱ_t) x_t - √(1/ᾱ_t - 1) ε (Eq. 15 of DDPM, ADM form)."""
    return (schedule.extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - schedule.extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)


def predict_eps_from_x0(schedule: DiffusionSchedule, x_t: torch.Tensor, t: torch.Tensor,
                        x0: torch.Tensor) -> torch.Tensor:
    """ε = (x_t - √ᾱ_t x0) / √(1-ᾱ_t) (finite also at ᾱ_t = 0, a zero-terminal-SNR schedule's last step)."""
    return ((x_t - schedule.extract(schedule.sqrt_alphas_cumprod, t, x_t) * x0)
            / schedule.extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t))


def get_v(schedule: DiffusionSchedule, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Velocity v = √ᾱ_t ε - √(1-ᾱ_t) x0 (Sec. 4 of Salimans & Ho 2022)."""
    return (schedule.extract(schedule.sqrt_alphas_cumprod, t, x0) * eps
            - schedule.extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * x0)


def x0_from_v(schedule: DiffusionSchedule, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x0 = √ᾱ_t x_t - √(1-ᾱ_t) v."""
    return (schedule.extract(schedule.sqrt_alphas_cumprod, t, x_t) * x_t
            - schedule.extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * v)


def eps_from_v(schedule: DiffusionSchedule, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ε = √(1-ᾱ_t) x_t + √ᾱ_t v."""
    return (schedule.extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
            + schedule.extract(schedule.sqrt_alphas_cumprod, t, x_t) * v)


def to_x0_eps(schedule: DiffusionSchedule, pred: torch.Tensor, x_t: torch.Tensor,
              t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Interpret a network output by ``schedule.prediction_type``; returns (pred_x0, pred_eps)."""
    kind = schedule.prediction_type
    if kind == "epsilon":
        return predict_x0_from_eps(schedule, x_t, t, pred), pred
    if kind == "v_prediction":
        return x0_from_v(schedule, x_t, t, pred), eps_from_v(schedule, x_t, t, pred)
    return pred, predict_eps_from_x0(schedule, x_t, t, pred)


def x0_eps_coefficients(prediction_type: str, alpha_cumprod: float) -> tuple[float, float, float, float]:
    """Scalar form of :func:`to_x0_eps` at any ᾱ in (0, 1), in float64 (samplers precompute these per step).

    Returns (a, b, c, d) with x0 = a·x_t + b·pred and ε = c·x_t + d·pred.
    """
    s, r = math.sqrt(alpha_cumprod), math.sqrt(1.0 - alpha_cumprod)  # √ᾱ, √(1-ᾱ)
    if prediction_type == "epsilon":
        return 1.0 / s, -r / s, 0.0, 1.0
    if prediction_type == "v_prediction":
        return s, -r, r, s
    if prediction_type == "sample":
        return 0.0, 1.0, 1.0 / r, -s / r
    raise ValueError(f"prediction_type={prediction_type!r} is not one of ['epsilon', 'v_prediction', 'sample']")


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def training_target(schedule: DiffusionSchedule, x0: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor) -> torch.Tensor:
    """Regression target for ``schedule.prediction_type``: ε, v = √ᾱ ε - √(1-ᾱ) x0, or x0."""
    kind = schedule.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return get_v(schedule, x0, t, noise)
    return x0


def min_snr_weights(schedule: DiffusionSchedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"),
    (B,) -> (B,) float32.

    The weight min(SNR_t, γ) applies to the x0-space loss; for an ε or v target the same weighting reads
    min(SNR, γ) / SNR and min(SNR, γ) / (SNR + 1), since ‖ε̂ - ε‖² = SNR · ‖x̂0 - x0‖² and
    ‖v̂ - v‖² = (SNR + 1) · ‖x̂0 - x0‖² (docs/diffusion.md).
    """
    if gamma <= 0:
        raise ValueError(f"min_snr_gamma={gamma!r} must be > 0")
    snr = schedule.snr(t)  # (B,)
    clipped = snr.clamp(max=gamma)
    kind = schedule.prediction_type
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def training_losses(schedule: DiffusionSchedule, model: Callable[..., torch.Tensor], x0: torch.Tensor,
                    t: torch.Tensor, noise: torch.Tensor | None = None, model_kwargs: dict | None = None,
                    min_snr_gamma: float | None = None, noise_offset: float = 0.0,
                    input_perturbation: float = 0.0) -> dict[str, torch.Tensor]:
    """Simple diffusion loss L_simple (Eq. 14 of DDPM) for any prediction type, per sample.

    x0: (B, C, H, W) clean (latent) data; t: (B,) long. Returns ``mse`` (B,), the mean squared error of the
    network output against its target, and ``loss`` (B,), the same optionally weighted by min-SNR-γ. Both are
    float32 whatever the model's dtype; the caller takes ``loss.mean()``.

    Two options change the noise, in this order and with these draws (after ``noise``, from the global RNG on
    x0's device), as diffusers' train_text_to_image.py and kohya's sd-scripts do:

    - ``noise_offset`` c (offset noise, Guttenberg 2023): ε ← ε + c · δ with δ ~ N(0, 1) of shape (B, C, 1, 1),
      one shift per sample and channel, so the model also learns to change an image's mean brightness; the target
      is built from this ε.
    - ``input_perturbation`` γ (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion Models"):
      x_t = √ᾱ_t x0 + √(1-ᾱ_t) (ε + γ ξ), ξ ~ N(0, I), while the target stays that of ε (ε, or v built from ε), so
      training sees inputs as imprecise as the sampler's own.
    """
    if noise is None:
        noise = torch.randn_like(x0)
    if noise_offset:
        B, C = x0.shape[:2]
        noise = noise + noise_offset * torch.randn((B, C, *([1] * (x0.dim() - 2))), device=x0.device,
                                                   dtype=noise.dtype)  # (B, C, 1, 1) broadcast
    input_noise = noise + input_perturbation * torch.randn_like(noise) if input_perturbation else noise
    x_t = q_sample(schedule, x0, t, input_noise)
    pred = model(x_t, t, **(model_kwargs or {}))
    if pred.shape != x0.shape:
        raise ValueError(f"model output shape {tuple(pred.shape)} does not match x0 shape {tuple(x0.shape)}")
    target = training_target(schedule, x0, t, noise)
    mse = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    loss = mse if min_snr_gamma is None else mse * min_snr_weights(schedule, t, min_snr_gamma).to(mse.device)
    return {"loss": loss, "mse": mse}


def sample_timesteps(B: int, T: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Uniform training timesteps t ~ U{0, ..., T-1} (Algorithm 1 of DDPM): (B,) long on ``device``.

    Drawn on the generator's device (CPU by default) and moved, so a CPU generator is reproducible everywhere.
    """
    draw_device = generator.device if generator is not None else device
    return torch.randint(0, T, (B,), generator=generator, device=draw_device).to(device)
