"""Beta schedules and every coefficient derived from them (Gaussian diffusion, DDPM).

    schedule = DiffusionSchedule.from_config(ScheduleConfig())       # Stable Diffusion: scaled_linear
    coef = schedule.extract(schedule.sqrt_alphas_cumprod, t, x)     # (B,) gathered -> (B, 1, 1, 1)

Notation (attribute -> symbol, Ho et al. 2020 "DDPM", Nichol & Dhariwal 2021 "iDDPM"):

    betas                            β_t
    alphas                           α_t = 1 - β_t
    alphas_cumprod                   ᾱ_t = Π_{s<=t} α_s
    alphas_cumprod_prev / _next      ᾱ_{t-1} (ᾱ_{-1} = 1) / ᾱ_{t+1} (ᾱ_T = 0)
    posterior_variance               β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t)                 (Eq. 7 of DDPM)
    posterior_mean_coef1 / 2         μ̃_t = coef1 · x0 + coef2 · x_t                      (Eq. 7 of DDPM)

Timesteps are 0-based: t = 0 is the first noising step, t = T-1 the last. Every coefficient is computed in
float64 (numpy) and stored as a float32 tensor under the ADM (guided-diffusion) name; ``alphas_cumprod_float64``
keeps the float64 ᾱ for samplers, which derive their per-run coefficients from it.
"""

from __future__ import annotations

import numpy as np
import torch

from latentdiff.config import ScheduleConfig

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# Names of the float32 tensors held by a schedule (the ADM vocabulary), in the order they are derived.
COEFFICIENT_NAMES = (
    "betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """DDPM (Sec. 4 of Ho et al. 2020): β_t linear from ``beta_start`` to ``beta_end`` (1e-4 -> 0.02)."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Stable Diffusion / LDM: √β_t linear from √beta_start to √beta_end (0.00085 -> 0.012), then squared."""
    return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """iDDPM cosine schedule (Eq. 17 of Nichol & Dhariwal 2021).

    ᾱ(t) = f(t) / f(0) with f(t) = cos²(((t/T + s) / (1 + s)) · π/2), β_t = 1 - ᾱ(t+1) / ᾱ(t) clipped at
    ``max_beta`` so that the last steps stay finite (Sec. 3.2 of the paper).
    """
    u = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((u + s) / (1 + s) * np.pi / 2) ** 2  # (T+1,), f(0) cancels in the ratio
    return np.minimum(1 - f[1:] / f[:-1], max_beta)


BETA_SCHEDULES = {"linear": linear_betas, "scaled_linear": scaled_linear_betas, "cosine": cosine_betas}

# The ᾱ_{T-1} that σ-parameterised samplers (Euler, DPM-Solver) use in place of 0 on a zero-terminal-SNR schedule,
# so that σ_{T-1} = √((1-ᾱ)/ᾱ) ≈ 4096 stays finite: float16's smallest subnormal, as diffusers does.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale a schedule to zero terminal SNR, Algorithm 1 of Lin et al. 2024 ("Common Diffusion Noise Schedules
    and Sample Steps are Flawed"): shift √ᾱ_t so that its last value is 0, scale it so that its first value is
    unchanged, and convert back to betas.

        √ᾱ'_t = (√ᾱ_t - √ᾱ_{T-1}) · √ᾱ_0 / (√ᾱ_0 - √ᾱ_{T-1}),    β'_t = 1 - ᾱ'_t / ᾱ'_{t-1}   (ᾱ'_{-1} := 1)

    so ᾱ'_{T-1} = 0 and β'_{T-1} = 1: the last step destroys the signal completely, as pure-noise sampling
    assumes.
    Float64 in and out (diffusers computes the same in float32).
    """
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))  # (T,)
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.append(alphas_bar[0], alphas_bar[1:] / alphas_bar[:-1])
    return 1.0 - alphas


class DiffusionSchedule:
    """A discrete Gaussian diffusion q(x_t | x_{t-1}) = N(√α_t x_{t-1}, β_t I) over T steps.

    ``betas``: 1-D array-like of β_t in (0, 1) (so ᾱ_t > 0 and every coefficient is finite), except that the last
    may be exactly 1: a zero-terminal-SNR schedule (:func:`rescale_zero_terminal_snr`), ᾱ_{T-1} = 0, where
    ``sqrt_recip_alphas_cumprod`` and ``sqrt_recipm1_alphas_cumprod`` are +inf at T-1 and ``snr`` is 0; such a
    schedule refuses ``epsilon`` prediction (x0 = (x_t - √(1-ᾱ) ε)/√ᾱ is undefined at ᾱ = 0: Sec. 3.2 of Lin et
    al. 2024). ``prediction_type``: what the network outputs (``epsilon`` | ``v_prediction`` | ``sample``).
    """

    def __init__(self, betas, prediction_type: str = "epsilon"):
        betas = np.asarray(torch.as_tensor(betas, dtype=torch.float64).cpu(), dtype=np.float64)
        if betas.ndim != 1 or betas.size < 1:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all((betas[:-1] > 0) & (betas[:-1] < 1)) or not 0 < betas[-1] <= 1:
            raise ValueError(f"every beta must lie in (0, 1) (the last in (0, 1]), got min={betas.min()!r}, "
                             f"max={betas.max()!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r} is not one of {list(PREDICTION_TYPES)}")
        self.zero_terminal_snr = bool(betas[-1] == 1.0)  # ᾱ_{T-1} = 0
        if self.zero_terminal_snr and prediction_type == "epsilon":
            raise ValueError("a zero-terminal-SNR schedule (last beta = 1) needs prediction_type 'v_prediction' or "
                             "'sample': at SNR 0 the network's input is pure noise, so predicting that noise says "
                             "nothing about x0 (Lin et al. 2024, Sec. 3.2)")
        self.prediction_type = prediction_type
        self.num_timesteps = int(betas.size)

        # All in float64; ᾱ_{-1} = 1 and ᾱ_T = 0 pad the shifted copies.
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        if self.zero_terminal_snr:
            alphas_cumprod[-1] = 0.0  # exactly, whatever the rounding of the product
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        alphas_cumprod_next = np.append(alphas_cumprod[1:], 0.0)
        # Posterior q(x_{t-1} | x_t, x0), Eq. 6-7 of DDPM. β̃_0 = 0, so its log is clipped to log β̃_1 (ADM).
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        clipped = np.append(posterior_variance[1], posterior_variance[1:]) if self.num_timesteps > 1 else [1e-20]
        values = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "alphas_cumprod_next": alphas_cumprod_next,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(clipped),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        }
        with np.errstate(divide="ignore"):  # ᾱ_{T-1} = 0: √(1/ᾱ) and √(1/ᾱ - 1) are +inf there
            values["sqrt_recip_alphas_cumprod"] = np.sqrt(1.0 / alphas_cumprod)
            values["sqrt_recipm1_alphas_cumprod"] = np.sqrt(1.0 / alphas_cumprod - 1.0)
        for name in COEFFICIENT_NAMES:
            setattr(self, name, torch.from_numpy(values[name]).to(torch.float32))  # (T,)
        self.alphas_cumprod_float64 = alphas_cumprod  # numpy (T,), for samplers' per-run coefficients
        self._snr = torch.from_numpy(alphas_cumprod / (1.0 - alphas_cumprod)).to(torch.float32)  # (T,)

    @classmethod
    def from_config(cls, cfg: ScheduleConfig) -> DiffusionSchedule:
        if cfg.beta_schedule == "cosine":
            betas = cosine_betas(cfg.num_timesteps)
        else:
            betas = BETA_SCHEDULES[cfg.beta_schedule](cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
        if cfg.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas, prediction_type=cfg.prediction_type)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: torch.device | str) -> DiffusionSchedule:
        """Move every coefficient tensor to ``device`` (in place); returns ``self``."""
        for name in COEFFICIENT_NAMES:
            setattr(self, name, getattr(self, name).to(device))
        self._snr = self._snr.to(device)
        return self

    def extract(self, coef: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gather ``coef[t]`` and shape it to broadcast against ``x``: (T,), (B,) -> (B, 1, ..., 1) in x.dtype."""
        B = t.shape[0]
        if coef.device != t.device:
            coef = coef.to(t.device)
        out = coef[t.long()].to(x.dtype)  # (B,)
        return out.view(B, *([1] * (x.dim() - 1)))  # (B, 1, ..., 1)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) at integer timesteps t: (B,) -> (B,) float32."""
        snr = self._snr if self._snr.device == t.device else self._snr.to(t.device)
        return snr[t.long()]

    def __repr__(self) -> str:
        return (f"DiffusionSchedule(num_timesteps={self.num_timesteps}, prediction_type={self.prediction_type!r}, "
                f"beta_0={self.betas[0].item():.6g}, beta_T={self.betas[-1].item():.6g})")
