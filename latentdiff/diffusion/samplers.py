"""Reverse-process samplers behind one signature: DDPM, DDIM, DPM-Solver++ (2M) and Euler ancestral.

    x0 = sample(model, schedule, x_T, sampler="dpmpp_2m", steps=25, generator=g, model_kwargs={"context": c})

``model(x_t, t, **model_kwargs) -> prediction`` with x_t in the variance-preserving scale of training and t a (B,)
long tensor of timesteps (a float tensor only for ``euler_a`` with ``linspace`` spacing, whose timesteps are
fractional); the prediction is read through ``schedule.prediction_type``. ``x_T`` is standard normal noise drawn
by the caller; every later draw comes from ``generator``. Classifier-free guidance wraps the model
(:func:`classifier_free_guidance`), so samplers never see it:

    guided = classifier_free_guidance(unet, scale=7.5)
    x0 = sample(guided, schedule, x_T, model_kwargs={"context": cond, "uncond_context": uncond})

Timesteps, coefficients and noise handling reproduce diffusers' DDPMScheduler, DDIMScheduler,
DPMSolverMultistepScheduler and EulerAncestralDiscreteScheduler (tests/test_samplers.py checks this to 1e-5);
docs/diffusion.md lists where and why we depart from them. Every per-run coefficient is computed once, in float64,
from ``schedule.alphas_cumprod_float64``; a step only does tensor arithmetic with Python scalars. The running
sample is kept in (at least) float32 and handed to the model in ``x_T``'s dtype.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from latentdiff.diffusion.gaussian import x0_eps_coefficients
from latentdiff.diffusion.guidance import (  # noqa: F401 - re-exported: guidance wraps the model
    check_guidance_interval,
    classifier_free_guidance,
    noise_level,
)
from latentdiff.diffusion.schedule import DiffusionSchedule
from latentdiff.diffusion.timesteps import SPACINGS, run_sigmas, spaced_timesteps

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
StepHook = Callable[[int, torch.Tensor], torch.Tensor]  # (i, x_{t_{i+1}} in the VP scale) -> replacement
Generators = torch.Generator | list[torch.Generator] | None  # one stream, or one per batch row


@dataclass(frozen=True)
class SamplerOptions:
    """Arguments shared by every sampler in :data:`SAMPLERS` (see :func:`sample` for their meaning)."""

    steps: int = 50
    eta: float = 0.0
    generator: Generators = None
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    use_karras_sigmas: bool = False
    callback: Callback | None = None
    model_kwargs: dict | None = None
    start_step: int | None = None  # None: x_T is pure noise; k: x_T is x_{t_k} (img2img), k steps skipped
    step_hook: StepHook | None = None  # replaces the sample after each step (inpainting's blend)


# ---------------------------------------------------------------------------------------------------------------
# Shared per-run machinery
# ---------------------------------------------------------------------------------------------------------------


class _Denoiser:
    """Calls the model at step i of a run and converts its output to x0 (and ε).

    Per step it holds the timestep tensor, an input scale c_in (1 for VP samplers, 1/√(σ²+1) for Euler, whose
    state is x_σ = x_t / √ᾱ) and the float64 coefficients of :func:`x0_eps_coefficients`, folded with c_in.
    """

    def __init__(self, model, schedule: DiffusionSchedule, x: torch.Tensor, timesteps: np.ndarray,
                 alphas_cumprod: np.ndarray, model_kwargs: dict | None, input_scale: np.ndarray | None = None):
        integral = bool(np.all(timesteps == np.round(timesteps)))
        self.t = torch.as_tensor(timesteps, dtype=torch.long if integral else torch.float32, device=x.device)
        self.c_in = [1.0] * len(timesteps) if input_scale is None else input_scale.tolist()
        self.coefs = []  # (a, b, c, d) per step: x0 = a·x + b·pred, ε = c·x + d·pred, x the sampler's state
        for ac, c_in in zip(alphas_cumprod.tolist(), self.c_in):
            a, b, c, d = x0_eps_coefficients(schedule.prediction_type, ac)
            self.coefs.append((a * c_in, b, c * c_in, d))
        self.model, self.model_kwargs = model, model_kwargs or {}
        self.B, self.model_dtype = x.shape[0], x.dtype

    def __call__(self, i: int, x: torch.Tensor, want_eps: bool = False):
        x_in = x if self.c_in[i] == 1.0 else x * self.c_in[i]
        pred = self.model(x_in.to(self.model_dtype), self.t[i].expand(self.B), **self.model_kwargs).to(x.dtype)
        a, b, c, d = self.coefs[i]
        x0 = a * x + b * pred
        return (x0, c * x + d * pred) if want_eps else x0


def _randn(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal like ``x``, drawn on the generator's device (reproducible across devices) and moved. A list
    of generators draws row b of ``x`` from generator b, so each image's noise is its own stream, whatever the
    batch it is in."""
    if isinstance(generator, (list, tuple)):
        return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype)
                            for g in generator]).to(x.device)
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _start(x_T: torch.Tensor) -> torch.Tensor:
    """The running sample: x_T in at least float32 (reduced-precision inputs are upcast)."""
    return x_T.to(torch.promote_types(x_T.dtype, torch.float32))


def _alpha_bars_with_final(schedule: DiffusionSchedule, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ᾱ at each step and at the step after it; the chain ends at ᾱ = 1 (x0 itself)."""
    ac = schedule.alphas_cumprod_float64[ts.astype(np.int64)]
    return ac, np.append(ac[1:], 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------------------


def ddpm(model, schedule: DiffusionSchedule, x_T: torch.Tensor, opts: SamplerOptions) -> torch.Tensor:
    """Ancestral sampling, Algorithm 2 of DDPM, on a respaced chain with the fixed small variance β̃.

    Notation (variable -> symbol): ac -> ᾱ_t, ac_prev -> ᾱ_{t'} (t' the next timestep, ᾱ = 1 after the last),
    beta -> β'_t = 1 - ᾱ_t/ᾱ_{t'} (the respaced β of Sec. 4 of Nichol & Dhariwal 2021), coef_x0/coef_xt -> the
    posterior mean coefficients of Eq. 7 of DDPM with β'_t, std -> √β̃'_t.
    1. predict x0 at t; 2. x_{t'} = coef_x0 · x0 + coef_xt · x_t; 3. add std · z, except after the last step.
    """
    ts = spaced_timesteps(schedule.num_timesteps, opts.steps, opts.timestep_spacing, opts.steps_offset)
    ac, ac_prev = _alpha_bars_with_final(schedule, ts)
    beta = 1.0 - ac / ac_prev
    coef_x0 = (np.sqrt(ac_prev) * beta / (1.0 - ac)).tolist()
    coef_xt = (np.sqrt(1.0 - beta) * (1.0 - ac_prev) / (1.0 - ac)).tolist()
    std = np.sqrt(beta * (1.0 - ac_prev) / (1.0 - ac)).tolist()
    denoise = _Denoiser(model, schedule, x_T, ts, ac, opts.model_kwargs)
    x, n = _start(x_T), len(ts)
    for i in range(opts.start_step or 0, n):
        x0 = denoise(i, x)
        x = coef_x0[i] * x0 + coef_xt[i] * x
        if i < n - 1:
            x = x + std[i] * _randn(x, opts.generator)
        if opts.step_hook is not None:
            x = opts.step_hook(i, x)
        if opts.callback is not None:
            opts.callback(i, n, x, x0)
    return x.to(x_T.dtype)


def ddim(model, schedule: DiffusionSchedule, x_T: torch.Tensor, opts: SamplerOptions) -> torch.Tensor:
    """DDIM, Eq. 12 of Song et al. 2021, with σ_t(η) of Eq. 16 (η = 0: deterministic; η = 1: DDPM).

    Notation (variable -> symbol): ac -> ᾱ_t, ac_prev -> ᾱ_{t'} (next timestep of the run; 1 after the last),
    sigma -> σ_t(η) = η √((1-ᾱ_{t'})/(1-ᾱ_t)) √(1-ᾱ_t/ᾱ_{t'}), direction -> √(1-ᾱ_{t'}-σ_t²).
    1. predict x0 and ε at t; 2. x_{t'} = √ᾱ_{t'} x0 + direction · ε ("direction pointing to x_t");
    3. add σ_t · z when η > 0 (σ_t = 0 at the last step).
    """
    ts = spaced_timesteps(schedule.num_timesteps, opts.steps, opts.timestep_spacing, opts.steps_offset)
    ac, ac_prev = _alpha_bars_with_final(schedule, ts)
    sigma = opts.eta * np.sqrt((1.0 - ac_prev) / (1.0 - ac) * (1.0 - ac / ac_prev))
    direction = np.sqrt(np.maximum(1.0 - ac_prev - sigma**2, 0.0)).tolist()
    sqrt_ac_prev, sigma = np.sqrt(ac_prev).tolist(), sigma.tolist()
    denoise = _Denoiser(model, schedule, x_T, ts, ac, opts.model_kwargs)
    x, n = _start(x_T), len(ts)
    for i in range(opts.start_step or 0, n):
        x0, eps = denoise(i, x, want_eps=True)
        x = sqrt_ac_prev[i] * x0 + direction[i] * eps
        if sigma[i] > 0:
            x = x + sigma[i] * _randn(x, opts.generator)
        if opts.step_hook is not None:
            x = opts.step_hook(i, x)
        if opts.callback is not None:
            opts.callback(i, n, x, x0)
    return x.to(x_T.dtype)


def dpmpp_2m(model, schedule: DiffusionSchedule, x_T: torch.Tensor, opts: SamplerOptions) -> torch.Tensor:
    """DPM-Solver++(2M), Algorithm 2 of Lu et al. 2022 ("DPM-Solver++"): multistep, second order, data prediction.

    Notation (variable -> symbol): σ -> k-diffusion noise level √((1-ᾱ)/ᾱ) (Karras et al. 2022 Eq. 5 spacing
    when ``use_karras_sigmas``), alpha_t/sigma_t -> VP α = 1/√(σ²+1), σ_VP = σ α, λ = log(α/σ_VP) = -log σ,
    h -> λ_{i+1} - λ_i, r -> h_{i-1}/h_i, m -> m_i, the x0 predicted at step i.
    1. m_i = predicted x0 at step i;
    2. first order (first executed step and last step: solver order 1 at the start, as diffusers after
       ``set_begin_index``, and ``lower_order_final`` with a final σ of 0):
       x_{i+1} = (σ_VP,i+1/σ_VP,i) x_i + α_{i+1} (1 - e^{-h}) m_i;
    3. otherwise the midpoint-style second order: the same with m_i replaced by m_i + (m_i - m_{i-1}) / (2r).
    The final step lands on σ = 0 and returns m_{n-1} exactly. Derivation: docs/diffusion.md.
    """
    n, k = opts.steps, opts.start_step or 0
    ts, sigmas = run_sigmas(schedule, "dpmpp_2m", n, opts.timestep_spacing, opts.steps_offset, opts.use_karras_sigmas)
    sigmas_next = np.append(sigmas[1:], 0.0)
    alpha_next = 1.0 / np.sqrt(sigmas_next**2 + 1)
    ratio = sigmas_next * alpha_next * np.sqrt(sigmas**2 + 1) / sigmas  # σ_VP,i+1 / σ_VP,i
    phi = alpha_next * (1.0 - sigmas_next / sigmas)  # α_{i+1} (1 - e^{-h_i}), since e^{-h_i} = σ_{i+1}/σ_i
    # c_prev[i]: weight of m_{i-1}; second order needs r_i = h_{i-1}/h_i, h_i = log(σ_i/σ_{i+1}).
    c_cur, c_prev = phi.copy(), np.zeros(n)
    for i in range(k + 1, n - 1):  # no m_{i-1} at the first executed step k: first order there
        r = math.log(sigmas[i - 1] / sigmas[i]) / math.log(sigmas[i] / sigmas[i + 1])
        c_cur[i], c_prev[i] = phi[i] * (1 + 0.5 / r), -phi[i] * 0.5 / r
    ratio, c_cur, c_prev = ratio.tolist(), c_cur.tolist(), c_prev.tolist()
    denoise = _Denoiser(model, schedule, x_T, ts, 1.0 / (sigmas**2 + 1), opts.model_kwargs)
    x, m_prev = _start(x_T), None
    for i in range(k, n):
        m = denoise(i, x)
        x = ratio[i] * x + c_cur[i] * m
        if c_prev[i] != 0.0:
            x = x + c_prev[i] * m_prev
        m_prev = m
        if opts.step_hook is not None:
            x = opts.step_hook(i, x)
        if opts.callback is not None:
            opts.callback(i, n, x, m)
    return x.to(x_T.dtype)


def euler_a(model, schedule: DiffusionSchedule, x_T: torch.Tensor, opts: SamplerOptions) -> torch.Tensor:
    """Euler ancestral (k-diffusion's ``sample_euler_ancestral``, η = 1): an Euler step of the probability-flow ODE
    dx/dσ = (x - x0)/σ (Eq. 4 of Karras et al. 2022, σ(t) = t) down to σ_down, then fresh noise σ_up.

    Notation (variable -> symbol): x -> x_σ = x_t/√ᾱ_t (variance-exploding state), σ_i -> noise level at step i
    (σ_n = 0), σ_up = √(σ_{i+1}² (σ_i² - σ_{i+1}²) / σ_i²), σ_down = √(σ_{i+1}² - σ_up²).
    0. x = x_T · s with s = √(σ_0² + 1) for ``leading`` spacing, else σ_0 (diffusers' ``init_noise_sigma``);
       a run from step k > 0 takes x_T = x_{t_k} in the VP scale and s = √(σ_k² + 1), so x_σ = x0 + σ_k ε as
       diffusers' ``add_noise`` gives;
    1. x0 = D(x_σ / √(σ_i² + 1), t_i);  2. d = (x - x0)/σ_i, x ← x + d (σ_down - σ_i);
    3. x ← x + σ_up z (σ_up = 0 at the last step, which returns x0).
    """
    k = opts.start_step or 0
    ts, sigmas = run_sigmas(schedule, "euler_a", opts.steps, opts.timestep_spacing, opts.steps_offset)
    sigmas_next = np.append(sigmas[1:], 0.0)
    sigma_up = np.sqrt(sigmas_next**2 * (sigmas**2 - sigmas_next**2) / sigmas**2)
    sigma_down = np.sqrt(sigmas_next**2 - sigma_up**2)
    dt_over_sigma = ((sigma_down - sigmas) / sigmas).tolist()
    vp_scale = (1.0 / np.sqrt(sigmas_next**2 + 1)).tolist()  # x_σ -> x_t, for the callback and the step hook
    noised = opts.start_step is not None  # x_T is x_{t_k} in the VP scale, not pure noise
    init = math.sqrt(sigmas[k] ** 2 + 1) if opts.timestep_spacing == "leading" or noised else float(sigmas[0])
    denoise = _Denoiser(model, schedule, x_T, ts, 1.0 / (sigmas**2 + 1), opts.model_kwargs,
                        input_scale=1.0 / np.sqrt(sigmas**2 + 1))
    x, n, sigma_up = _start(x_T) * init, len(ts), sigma_up.tolist()
    for i in range(k, n):
        x0 = denoise(i, x)
        x = x + (x - x0) * dt_over_sigma[i]
        if sigma_up[i] > 0:
            x = x + sigma_up[i] * _randn(x, opts.generator)
        if opts.step_hook is not None:  # the hook works in the VP scale: x_t = x_σ / √(σ_{i+1}² + 1)
            x = opts.step_hook(i, x * vp_scale[i]) / vp_scale[i]
        if opts.callback is not None:
            opts.callback(i, n, x * vp_scale[i], x0)
    return x.to(x_T.dtype)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddpm": ddpm, "ddim": ddim, "dpmpp_2m": dpmpp_2m,
                                                    "dpmpp_2m_karras": dpmpp_2m, "euler_a": euler_a}
# Sampler ids that name another sampler with one option set: AUTOMATIC1111's "DPM++ 2M Karras" is DPM-Solver++(2M)
# on Karras noise levels (diffusers' DPMSolverMultistepScheduler with use_karras_sigmas=True).
KARRAS_VARIANTS = {"dpmpp_2m_karras": "dpmpp_2m"}


def _resolve(sampler: str, use_karras_sigmas: bool) -> tuple[str, bool]:
    """(sampler, use_karras_sigmas) with a Karras variant id spelled out as its base sampler and the flag."""
    if isinstance(sampler, str) and sampler in KARRAS_VARIANTS:
        return KARRAS_VARIANTS[sampler], True
    return sampler, use_karras_sigmas


def sample(model, schedule: DiffusionSchedule, x_T: torch.Tensor, sampler: str = "ddim", steps: int = 50,
           eta: float = 0.0, generator: Generators = None, timestep_spacing: str = "leading",
           use_karras_sigmas: bool = False, callback: Callback | None = None, model_kwargs: dict | None = None,
           steps_offset: int = 0, start_step: int | None = None, step_hook: StepHook | None = None) -> torch.Tensor:
    """Run ``sampler`` from x_T ~ N(0, I) (shape (B, C, H, W), drawn by the caller) and return x0.

    ``steps``: 1..T model evaluations. ``eta``: DDIM stochasticity (ddim only). ``generator``: every noise draw
    after x_T (a list: one generator per row of x_T, each row's noise from its own). ``timestep_spacing``:
    leading | trailing | linspace, as diffusers; ``steps_offset`` is added to
    leading timesteps (Stable Diffusion configs use 1 with leading; default 0). ``use_karras_sigmas``: Karras
    noise levels (dpmpp_2m only; the sampler id ``dpmpp_2m_karras`` sets it). ``callback(i, steps, x_t, pred_x0)``
    runs after each step.
    ``start_step`` = k in 0..steps-1 (img2img; None: x_T is pure noise) skips the run's first k steps: x_T is then
    x_{t_k}, the sample at step k's noise level in the VP scale (:func:`noise_to_step` makes it, also for k = 0),
    and steps - k model evaluations follow, each with the coefficients of the full run (DPM-Solver++ takes a
    first-order step at k).
    ``step_hook(i, x) -> x`` (inpainting's blend of the known region) replaces the sample after step i (after its
    noise, before ``callback``): it gets and returns x_{t_{i+1}}, the sample at the next step's noise level in the
    VP scale (every sampler's, Euler's x_σ divided by √(σ_{i+1}² + 1)), x0 after the last step.
    """
    sampler, use_karras_sigmas = _resolve(sampler, use_karras_sigmas)
    opts = _options(schedule, sampler, steps, eta, generator, timestep_spacing, use_karras_sigmas, callback,
                    model_kwargs, steps_offset, start_step, step_hook)
    if not torch.is_tensor(x_T) or not x_T.is_floating_point() or x_T.dim() < 1:
        raise ValueError("x_T must be a floating-point tensor of shape (B, ...)")
    if isinstance(generator, (list, tuple)) and len(generator) != x_T.shape[0]:
        raise ValueError(f"{len(generator)} generators given for a batch of {x_T.shape[0]}: one per row")
    return SAMPLERS[sampler](model, schedule, x_T, opts)


def noise_to_step(x0: torch.Tensor, noise: torch.Tensor, schedule: DiffusionSchedule, sampler: str = "ddim",
                  steps: int = 50, start_step: int = 0, timestep_spacing: str = "leading", steps_offset: int = 0,
                  use_karras_sigmas: bool = False) -> torch.Tensor:
    """x_{t_k}: clean ``x0`` noised with ``noise`` (same shape) to the noise level that ``sampler`` gives step
    k = ``start_step`` of a ``steps``-step run, the x_T of ``sample(..., start_step=k)`` (img2img).

    q(x_t | x0) of Eq. 4 of DDPM: x_t = √ᾱ_k x0 + √(1 - ᾱ_k) ε, with ᾱ_k = 1/(σ_k² + 1) and σ_k the run's
    noise level at step k (:func:`latentdiff.diffusion.timesteps.run_sigmas`): ᾱ at t_k for ddpm/ddim, the Karras σ
    for dpmpp_2m with ``use_karras_sigmas``, the interpolated σ for euler_a. This is diffusers' ``add_noise`` of
    each scheduler after ``set_begin_index(k)``, in the VP scale (Euler's x0 + σ_k ε, divided by √(σ_k² + 1)).
    """
    sampler, use_karras_sigmas = _resolve(sampler, use_karras_sigmas)
    if start_step is None:
        raise ValueError("noise_to_step needs start_step, the index of the step to noise to (0..steps-1)")
    _options(schedule, sampler, steps, 0.0, None, timestep_spacing, use_karras_sigmas, None, None, steps_offset,
             start_step)
    if not torch.is_tensor(x0) or not x0.is_floating_point() or x0.shape != noise.shape:
        raise ValueError(f"x0 and noise must be floating-point tensors of one shape, got {tuple(x0.shape)} and "
                         f"{tuple(noise.shape)}")
    sigmas = run_sigmas(schedule, sampler, steps, timestep_spacing, steps_offset, use_karras_sigmas)[1]
    alpha_bar = 1.0 / (float(sigmas[start_step]) ** 2 + 1.0)
    return math.sqrt(alpha_bar) * x0 + math.sqrt(1.0 - alpha_bar) * noise


def _options(schedule, sampler, steps, eta, generator, timestep_spacing, use_karras_sigmas, callback, model_kwargs,
             steps_offset, start_step, step_hook=None) -> SamplerOptions:
    """Check the arguments of :func:`sample` (ValueError naming the bad one) and bundle them."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {sorted(SAMPLERS)}")
    T = schedule.num_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps={steps!r} must be an integer between 1 and the schedule's num_timesteps={T}")
    if timestep_spacing not in SPACINGS:
        raise ValueError(f"timestep_spacing={timestep_spacing!r} is not one of {list(SPACINGS)}")
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
        raise ValueError(f"steps_offset={steps_offset!r} must be a non-negative integer")
    if start_step is not None and (isinstance(start_step, bool) or not isinstance(start_step, int)
                                   or not 0 <= start_step < steps):
        raise ValueError(f"start_step={start_step!r} must be an integer in 0..steps-1={steps - 1}")
    if eta < 0 or (eta != 0 and sampler != "ddim"):
        raise ValueError(f"eta={eta!r}: eta must be >= 0 and is only used by sampler='ddim' (got {sampler!r})")
    if use_karras_sigmas and sampler != "dpmpp_2m":
        raise ValueError(f"use_karras_sigmas is only supported by sampler='dpmpp_2m' (got {sampler!r})")
    if schedule.zero_terminal_snr and timestep_spacing == "leading":
        warnings.warn("timestep_spacing='leading' on a zero-terminal-SNR schedule never visits the last timestep: "
                      "sampling starts from pure noise at a step whose SNR is not zero (Lin et al. 2024, Sec. 3.3); "
                      "use 'trailing'", stacklevel=3)
    return SamplerOptions(steps=steps, eta=eta, generator=generator, timestep_spacing=timestep_spacing,
                          steps_offset=steps_offset, use_karras_sigmas=use_karras_sigmas, callback=callback,
                          model_kwargs=model_kwargs, start_step=start_step, step_hook=step_hook)
