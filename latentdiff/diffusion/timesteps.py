"""Where a sampling run stands: its timesteps and the noise level σ of each step, shared by the samplers and by
:func:`latentdiff.diffusion.samplers.noise_to_step` (which noises clean latents to a run's start step, img2img).

σ is the k-diffusion noise level σ_t = √((1 - ᾱ_t) / ᾱ_t) (Karras et al. 2022), so ᾱ = 1 / (σ² + 1).
"""

from __future__ import annotations

import numpy as np

from latentdiff.diffusion.schedule import ZERO_SNR_ALPHA_CUMPROD, DiffusionSchedule

SPACINGS = ("leading", "trailing", "linspace")


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "leading", steps_offset: int = 0, *,
                     multistep: bool = False, fractional: bool = False) -> np.ndarray:
    """Descending sampling timesteps (float64 array of length ``steps``), as diffusers' ``set_timesteps``.

    Spacings follow Table 2 of Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"):
    ``leading`` = k · (T // n) + steps_offset (Stable Diffusion configs use steps_offset=1), ``trailing`` =
    round(T - k · T/n) - 1, ``linspace`` = round(linspace(0, T-1, n)). ``multistep`` selects DPM-Solver's variant,
    which lays n = steps + 1 points and drops the smallest (its last step jumps to σ = 0 instead);
    ``fractional`` keeps linspace points unrounded (float32), as the Euler schedulers do.
    """
    T = num_timesteps
    n = steps + 1 if multistep else steps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n)
        ts = ts.astype(np.float32).astype(np.float64) if fractional else ts.round()
        ts = ts[::-1][:steps]
    elif spacing == "leading":
        ts = (np.arange(n) * (T // n)).astype(np.float64)[::-1][:steps] + steps_offset
    elif spacing == "trailing":
        # arange(T, 0, -T/n) can overshoot by one float-rounded point near 0 (e.g. n = 61); keep exactly n.
        ts = np.round(np.arange(T, 0, -T / steps)[:steps]) - 1
    else:
        raise ValueError(f"timestep_spacing={spacing!r} is not one of {list(SPACINGS)}")
    ts = ts.copy()  # positive strides, for torch.as_tensor
    if ts[0] > T - 1 or ts[-1] < 0 or (not fractional and np.any(np.diff(ts) >= 0)):
        raise ValueError(f"steps={steps} with timestep_spacing={spacing!r} and steps_offset={steps_offset} gives "
                         f"timesteps outside 0..{T - 1} or repeated ({ts[:3].tolist()}...{ts[-3:].tolist()}); "
                         f"use fewer steps or timestep_spacing='trailing'")
    return ts


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """σ_i = (σ_max^(1/ρ) + i/(n-1) · (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ, i = 0..n-1 (Eq. 5 of Karras et al. 2022)."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def schedule_sigmas(schedule: DiffusionSchedule) -> np.ndarray:
    """k-diffusion noise levels σ_t = √((1 - ᾱ_t) / ᾱ_t), increasing in t: (T,) float64.

    On a zero-terminal-SNR schedule ᾱ_{T-1} = 0 is taken as 2^-24 (σ ≈ 4096), as diffusers' Euler and DPM-Solver
    schedulers do, so that σ-parameterised samplers start from a finite σ.
    """
    ac = np.where(schedule.alphas_cumprod_float64 == 0.0, ZERO_SNR_ALPHA_CUMPROD, schedule.alphas_cumprod_float64)
    return np.sqrt((1.0 - ac) / ac)


def sigma_to_t(sigma: np.ndarray, all_sigmas: np.ndarray) -> np.ndarray:
    """Invert σ(t) by linear interpolation in log σ, clamped to [0, T-1]."""
    return np.interp(np.log(sigma), np.log(all_sigmas), np.arange(all_sigmas.size, dtype=np.float64))


def run_sigmas(schedule: DiffusionSchedule, sampler: str, steps: int, spacing: str = "leading",
               steps_offset: int = 0, use_karras_sigmas: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The timesteps of a ``sampler`` run and the noise level σ it gives each step: two float64 arrays (steps,).

    ddpm/ddim: the spaced timesteps, σ = σ_t (+inf at ᾱ = 0). dpmpp_2m: DPM-Solver's multistep spacing, or Karras
    sigmas with the nearest timesteps. euler_a: σ interpolated at the timesteps (fractional ones for ``linspace``).
    """
    T = schedule.num_timesteps
    all_sigmas = schedule_sigmas(schedule)
    if sampler == "dpmpp_2m" and use_karras_sigmas:  # spacing is ignored: the timesteps follow the Karras sigmas
        sigmas = karras_sigmas(all_sigmas[0], all_sigmas[-1], steps)
        return np.round(sigma_to_t(sigmas, all_sigmas)), sigmas
    if sampler == "euler_a":
        fractional = spacing == "linspace"
        ts = spaced_timesteps(T, steps, spacing, steps_offset, fractional=fractional)
        return ts, np.interp(ts, np.arange(T, dtype=np.float64), all_sigmas)
    ts = spaced_timesteps(T, steps, spacing, steps_offset, multistep=sampler == "dpmpp_2m")
    if sampler in ("ddpm", "ddim"):  # these use ᾱ_t itself: σ_T = +inf (ᾱ = 1/(σ² + 1) = 0) on a zero-SNR schedule
        ac = schedule.alphas_cumprod_float64[ts.astype(np.int64)]
        with np.errstate(divide="ignore"):
            return ts, np.sqrt((1.0 - ac) / ac)
    return ts, all_sigmas[ts.astype(np.int64)]
