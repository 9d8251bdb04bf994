"""VQ-Diffusion sampling: the reverse chain from all-[MASK], fast jumps, truncation and learned guidance.

- Reverse chain (Gu et al. 2022, Sec. 3.2): x_{t-1} ~ p_θ(x_{t-1}|x_t) = Σ_{x0} q(x_{t-1}|x_t, x0) p_θ(x0|x_t).
- Fast inference (Tang et al. 2022, "Improved VQ-Diffusion", Sec. 3.3): jump from x_t to x_{t-Δ} with
  q(x_{t-Δ}|x_t, x0), so ``steps`` = T/Δ network calls. We use the exact Δ-step transition Q_{t-Δ→t}; the
  official ``sample_fast`` reuses the one-step posterior of an earlier t instead.
- Truncation (the official ``truncation_rate`` r): keep, per position, the most likely codes until their cumulative
  probability reaches r, then renormalise.
- Learnable classifier-free guidance (Tang et al. Sec. 3.2): log p̃(x0|x_t, y) = log_softmax(log p(x0|x_t, ∅) +
  s (log p(x0|x_t, y) - log p(x0|x_t, ∅))), where ∅ is a learned null context.
- Purity sampling (Tang et al. Sec. 3.3, the "high-quality inference strategy"): tokens drawn in the same step are
  drawn independently, so a step that reveals many at once breaks their joint distribution; instead reveal only as
  many [MASK] positions per call as the schedule unmasks on average, chosen with probability proportional to their
  purity max_k p(x0=k|x_t) (confident positions first), and keep revealed codes fixed. See :func:`sample_purity`.

A model is any callable ``model(x_t (B, N) long, t (B,) long, **model_kwargs) -> log p(x0|x_t) (B, K, N)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from latentdiff.diffusion.discrete import LOG_ZERO, DiscreteSchedule, sample_categorical


def truncate(log_p_x0: torch.Tensor, truncation_rate: float) -> torch.Tensor:
    """Keep the top codes of each position whose cumulative probability reaches ``truncation_rate``, renormalise.

    A code is kept when the probability of the strictly more likely codes sums to less than r, so the most likely
    code is always kept. (B, K, N) log-probabilities -> (B, K, N), dropped codes at ``LOG_ZERO``.
    """
    if truncation_rate <= 0:
        raise ValueError(f"truncation_rate={truncation_rate!r} must be in (0, 1]")
    if truncation_rate >= 1.0:
        return log_p_x0
    sorted_log_p, order = torch.sort(log_p_x0, dim=1, descending=True)  # (B, K, N)
    mass_before = sorted_log_p.exp().cumsum(dim=1) - sorted_log_p.exp()
    keep = torch.empty_like(order, dtype=torch.bool).scatter_(1, order, mass_before < truncation_rate)
    kept = log_p_x0.masked_fill(~keep, float("-inf"))
    return torch.log_softmax(kept, dim=1).clamp(min=LOG_ZERO)


def apply_guidance(log_p_cond: torch.Tensor, log_p_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on log p(x0|x_t) (B, K, N), renormalised (Improved VQ-Diffusion, Eq. 9)."""
    guided = log_p_uncond + scale * (log_p_cond - log_p_uncond)
    return torch.log_softmax(guided, dim=1).clamp(min=LOG_ZERO)


def learned_classifier_free_guidance(model: Callable, scale: float, null_context: torch.Tensor) -> Callable:
    """Wrap ``model(x_t, t, context=...)`` so that it returns guided log p(x0|x_t).

    ``null_context`` (L, D) or (B, L, D) is the learned null condition (``VQDiffusionTransformer.null_context``)
    or the encoded empty prompt. Conditional and null passes run as one batch of 2B. With ``scale == 1`` the
    wrapper is the conditional model itself.
    """
    if scale == 1.0:
        return model

    def guided(x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **kwargs) -> torch.Tensor:
        B = x_t.shape[0]
        null = null_context.to(context.dtype).expand(B, -1, -1) if null_context.dim() == 2 else null_context
        if null.shape != context.shape:
            raise ValueError(f"null context {tuple(null.shape)} and text context {tuple(context.shape)} differ")
        log_p = model(torch.cat([x_t, x_t]), torch.cat([t, t]), context=torch.cat([null, context]), **kwargs)
        log_p_uncond, log_p_cond = log_p.float().chunk(2)  # (B, K, N) each
        return apply_guidance(log_p_cond, log_p_uncond, scale)

    return guided


def sampling_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Descending network timesteps for ``steps`` calls: t_i = floor(T (steps - i) / steps) - 1.

    steps = T gives T-1, ..., 0; steps = T/Δ gives jumps of exactly Δ steps (T-1, T-1-Δ, ..., Δ-1).
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps={steps!r} must be between 1 and the number of diffusion steps {num_timesteps}")
    return [num_timesteps * (steps - i) // steps - 1 for i in range(steps)]


@torch.no_grad()
def sample(model: Callable, schedule: DiscreteSchedule, shape: tuple[int, int], *, steps: int | None = None,
           truncation_rate: float = 1.0, generator: torch.Generator | None = None,
           callback: Callable[[int, int, torch.Tensor], None] | None = None, model_kwargs: dict | None = None,
           x_T: torch.Tensor | None = None) -> torch.Tensor:
    """Run the reverse chain from all-[MASK] (or ``x_T``) and return codes (B, N) in [0, K).

    ``steps`` (default T) network calls at :func:`sampling_timesteps`; ``callback(i, t, x)`` after each call.

        t_i       timestep of the current state x (0-based, see discrete.py)
        t_next    the next state's timestep (t_{i+1}), or -1 after the last call: the clean codes x0

    1. log p_θ(x0|x_t) from the model (guidance lives in the model wrapper), truncated to ``truncation_rate``;
    2. before the last call: x ~ p_θ(x_{t_next}|x_t) = Σ_{x0} q(x_{t_next}|x_t, x0) p_θ(x0|x_t);
       at the last call: x0 ~ p_θ(x0|x_t) directly (only codes, never [MASK]).
    """
    B, N = shape
    device = schedule.device
    x = torch.full((B, N), schedule.mask_index, device=device, dtype=torch.long) if x_T is None else x_T.to(device)
    times = sampling_timesteps(schedule.num_timesteps, schedule.num_timesteps if steps is None else steps)
    for i, t in enumerate(times):
        t_now = torch.full((B,), t, device=device, dtype=torch.long)
        log_x0 = truncate(model(x, t_now, **(model_kwargs or {})).float(), truncation_rate)  # step 1, (B, K, N)
        if i + 1 < len(times):  # step 2
            log_probs = schedule.q_posterior(log_x0, x, t_now, torch.full_like(t_now, times[i + 1]))
        else:
            log_probs = log_x0
        x = sample_categorical(log_probs, generator)  # (B, N)
        if callback is not None:
            callback(i, t, x)
    return x


def purity_schedule(schedule: DiscreteSchedule, times: list[int], num_tokens: int) -> list[int]:
    """[MASK] positions left after each call of :func:`sample_purity`: round(N γ̄) at the next call's timestep,
    0 after the last call (non-increasing, since γ̄ rises with t)."""
    gamma_bar = schedule.gamma_t_cumprod.tolist()
    return [round(num_tokens * gamma_bar[t]) for t in times[1:]] + [0]


@torch.no_grad()
def sample_purity(model: Callable, schedule: DiscreteSchedule, shape: tuple[int, int], *, steps: int | None = None,
                  truncation_rate: float = 1.0, generator: torch.Generator | None = None,
                  callback: Callable[[int, int, torch.Tensor], None] | None = None,
                  model_kwargs: dict | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Purity sampling from all-[MASK]: codes (B, N) in [0, K); same model, steps and callback as :func:`sample`.

    At call i (timestep t_i), with p = p_θ(x0|x_t) truncated to ``truncation_rate``:

    1. the number of positions to reveal is the masked count now minus :func:`purity_schedule`'s count, the
       expected number of [MASK] tokens at the next call's timestep (N γ̄_{t_{i+1}}, rounded; all at the last call);
    2. those positions are drawn without replacement among the [MASK] ones with probability proportional to
       purity^(1/temperature), purity = max_k p(x0=k|x_t) (Gumbel top-k; ``temperature`` → 0 is greedy, most
       confident first);
    3. each is given a code drawn from p(x0|x_t) at that position; codes already revealed never change.

    A call that would reveal nothing (more calls than positions, e.g. the full chain of 100 on 8×8 codes) skips
    the network; its callback still runs.
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    B, N = shape
    device = schedule.device
    x = torch.full((B, N), schedule.mask_index, device=device, dtype=torch.long)
    times = sampling_timesteps(schedule.num_timesteps, schedule.num_timesteps if steps is None else steps)
    masked_left = purity_schedule(schedule, times, N)
    masked_now = N
    for i, t in enumerate(times):
        reveal = masked_now - masked_left[i]
        if reveal > 0:
            t_now = torch.full((B,), t, device=device, dtype=torch.long)
            log_x0 = truncate(model(x, t_now, **(model_kwargs or {})).float(), truncation_rate)  # (B, K, N)
            masked = x == schedule.mask_index  # (B, N), the same count in every row
            u = torch.rand((B, N), generator=generator, device=device)
            gumbel = -torch.log(-torch.log(u + 1e-30) + 1e-30)
            score = (log_x0.max(dim=1).values / temperature + gumbel).masked_fill(~masked, float("-inf"))
            chosen = torch.zeros_like(masked).scatter_(1, score.topk(reveal, dim=1).indices, True)
            x = torch.where(chosen, sample_categorical(log_x0, generator), x)
            masked_now = masked_left[i]
        if callback is not None:
            callback(i, t, x)
    return x
