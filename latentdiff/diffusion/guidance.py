"""Classifier-free guidance (Ho & Salimans 2022) around a denoiser, with guidance rescale (Lin et al. 2024) and
guidance in a limited interval of noise levels (Kynkäänniemi et al. 2024). Samplers never see guidance: it wraps the
model (``latentdiff.diffusion.samplers`` re-exports these names)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from latentdiff.diffusion.schedule import DiffusionSchedule
from latentdiff.diffusion.timesteps import schedule_sigmas


def classifier_free_guidance(model: Callable[..., torch.Tensor], scale: float, rescale: float = 0.0,
                             interval: tuple[float, float] | None = None,
                             schedule: DiffusionSchedule | None = None) -> Callable[..., torch.Tensor]:
    """Wrap ``model(x_t, t, context=...)`` into ``guided(x_t, t, context=..., uncond_context=...)``.

    guided = D(x_t, ∅) + scale · (D(x_t, c) - D(x_t, ∅)) (Eq. 6 of Ho & Salimans 2022, written around the
    unconditional output as Stable Diffusion does), from ONE model call on the batch cat([uncond, cond]) of size
    2B. With scale == 1 that is the conditional output: one call on the B conditional inputs, ``uncond_context``
    unused. Guiding a v or x0 output equals guiding ε, since at fixed (x_t, t) each is affine in the others.
    A negative prompt is just the ``uncond_context`` (the pipeline encodes it instead of the empty prompt).

    ``rescale`` φ in [0, 1] (guidance rescale, Eq. 15-16 and Alg. 2 of Lin et al. 2024; diffusers'
    ``rescale_noise_cfg``): the guided output is scaled back to the per-sample standard deviation of the
    conditional one, x_rescaled = x_cfg · std(D(x_t, c)) / std(x_cfg) (std over all but the batch axis), and mixed
    with it, φ · x_rescaled + (1 - φ) · x_cfg. It acts on the network's output as it is (v for a v-prediction
    model, as in the paper and in diffusers), so it is not the same for ε and v outputs; it counters the
    over-exposure of large scales on zero-terminal-SNR models. φ = 0 (default) is plain guidance.

    ``interval`` (σ_lo, σ_hi) applies guidance only at the steps whose noise level σ_t = √((1 - ᾱ_t) / ᾱ_t) (the
    σ of Karras et al. 2022 and of the Euler samplers, from ``schedule``) lies in (σ_lo, σ_hi]; the other steps take
    the conditional output alone, one model call on B inputs (guidance in a limited interval, Kynkäänniemi et al.
    2024, Sec. 3: guiding at high noise levels pulls samples towards a few modes, at low ones it barely matters).
    None (default): every step. Which steps fall inside depends on the sampler's timesteps: :func:`noise_level`.
    The schedule's noise levels are computed once here, not at every step.
    """
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale={rescale!r} must be in [0, 1]")
    if interval is not None:
        interval = check_guidance_interval(interval)
        if schedule is None:
            raise ValueError("a guidance interval needs the schedule (its noise levels)")
        sigmas = schedule_sigmas(schedule)  # (T,)

    def guided(x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
               uncond_context: torch.Tensor | None = None) -> torch.Tensor:
        if scale == 1 or (interval is not None
                          and not interval[0] < noise_level(sigmas, float(t[0])) <= interval[1]):
            return model(x_t, t, context=context)
        if uncond_context is None:
            raise ValueError(f"classifier-free guidance with scale={scale!r} needs uncond_context")
        if uncond_context.shape != context.shape:
            raise ValueError(f"uncond_context shape {tuple(uncond_context.shape)} does not match "
                             f"context shape {tuple(context.shape)}")
        out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), context=torch.cat([uncond_context, context]))
        uncond, cond = out.chunk(2)  # (B, ...) each
        cfg = uncond + scale * (cond - uncond)
        if rescale == 0.0:
            return cfg
        dims = list(range(1, cfg.dim()))
        rescaled = cfg * (cond.std(dim=dims, keepdim=True) / cfg.std(dim=dims, keepdim=True))  # Eq. 15
        return rescale * rescaled + (1.0 - rescale) * cfg  # Eq. 16

    return guided


def check_guidance_interval(interval) -> tuple[float, float]:
    """``interval`` as a float pair (σ_lo, σ_hi) with 0 <= σ_lo < σ_hi (σ_hi may be inf); ValueError otherwise."""
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance interval must be two numbers (sigma_lo, sigma_hi), got {interval!r}") from None
    if not (0.0 <= lo < hi) or math.isnan(hi):
        raise ValueError(f"guidance interval ({lo:g}, {hi:g}] must satisfy 0 <= sigma_lo < sigma_hi")
    return lo, hi


def noise_level(sigmas: np.ndarray, t: float) -> float:
    """σ_t at timestep t from a schedule's noise levels ``sigmas = schedule_sigmas(schedule)`` (σ_t = √((1 - ᾱ_t) /
    ᾱ_t), ᾱ = 0 counted as 2^-24), as :func:`run_sigmas` gives it: a fractional t (Euler ancestral with ``linspace``
    spacing) interpolates between the integer timesteps."""
    return float(np.interp(t, np.arange(sigmas.size, dtype=np.float64), sigmas))
