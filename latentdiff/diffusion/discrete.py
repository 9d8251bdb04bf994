"""VQ-Diffusion: the mask-and-replace discrete diffusion over K codes plus [MASK] (Gu et al. 2022, Sec. 3).

Code indices ``0..K-1`` are codebook entries; index ``K`` (the last) is [MASK]. One forward step (Eq. 7) keeps a
code with probability ``alpha_t + beta_t``, moves it to each other code with ``beta_t`` and masks it with
``gamma_t``; [MASK] absorbs. Everything is computed in log space; derivations are in docs/vq_diffusion.md.

Notation (0-based, as in the official code and diffusers): the network timestep ``t`` in ``0..T-1`` names the
state ``x_t`` reached after ``t + 1`` forward steps (the paper's x_{t+1}); ``t = 0`` is the last denoising step,
whose target is the clean ``x0``. Tables indexed by *step counts* ``m, n`` in ``0..T`` are marked as such.

    symbol        code                              meaning
    K             schedule.num_codes                codebook size; [MASK] = K = schedule.mask_index
    ᾱ_n, γ̄_n      alpha_t_cumprod, gamma_t_cumprod   cumulative keep / mask probabilities (Eq. 8)
    β̄_n           beta_t_cumprod                    cumulative probability of moving to one given other code
    Q_{m→n}       log_*_transition[m, n]            n - m forward steps, again of the mask-and-replace form
    p_θ(x0|x_t)   log_x0 (B, K, N)                  the network's prediction, log-probabilities over codes
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.config import DiscreteScheduleConfig

LOG_ZERO = -70.0  # log(0) floor of the official code: one-hot vectors and clamped log-probabilities


def index_to_log_onehot(x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Codes (B, N) long -> log one-hot (B, num_classes, N) with log(0) floored at ``LOG_ZERO``."""
    onehot = F.one_hot(x, num_classes).transpose(1, 2)  # (B, C, N)
    return torch.where(onehot.bool(), 0.0, LOG_ZERO)


def sample_categorical(log_probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one class per position from (unnormalised) log-probabilities (B, C, N) -> (B, N), Gumbel-max trick."""
    u = torch.rand(log_probs.shape, generator=generator, device=log_probs.device)
    gumbel = -torch.log(-torch.log(u + 1e-30) + 1e-30)
    return (log_probs + gumbel).argmax(dim=1)


def multinomial_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over dim 1 of log-probabilities (B, C, N) -> (B, N)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


class DiscreteSchedule:
    """Mask-and-replace transition schedule with closed-form q(x_t|x0), single steps and posteriors.

    Sec. 4.1 of Gu et al.: ᾱ_n falls and γ̄_n rises linearly over the T steps; per-step quantities follow from the
    cumulative ones as in the official code (α_n = ᾱ_n/ᾱ_{n-1}, 1 - γ_n = (1 - γ̄_n)/(1 - γ̄_{n-1}),
    β_n = (1 - α_n - γ_n)/K). Any ``n - m`` consecutive steps again form a mask-and-replace matrix with
    α = ᾱ_n/ᾱ_m, 1 - γ = (1 - γ̄_n)/(1 - γ̄_m), β = (1 - α - γ)/K; these are tabulated once for every pair.
    """

    def __init__(self, num_codes: int, num_timesteps: int = 100, alpha_cumprod_start: float = 0.99999,
                 alpha_cumprod_end: float = 0.000009, gamma_cumprod_start: float = 0.000009,
                 gamma_cumprod_end: float = 0.99999, device: torch.device | str | None = None):
        if num_codes < 2:
            raise ValueError(f"num_codes={num_codes!r} must be >= 2")
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps={num_timesteps!r} must be >= 2")
        self.num_codes = K = num_codes
        self.mask_index = K
        self.num_classes = K + 1
        self.num_timesteps = T = num_timesteps
        frac = torch.arange(T, dtype=torch.float64) / (T - 1)
        alpha_bar = alpha_cumprod_start + frac * (alpha_cumprod_end - alpha_cumprod_start)  # ᾱ_1..ᾱ_T
        gamma_bar = gamma_cumprod_start + frac * (gamma_cumprod_end - gamma_cumprod_start)  # γ̄_1..γ̄_T
        alpha_bar = torch.cat([alpha_bar.new_ones(1), alpha_bar])  # (T+1,) by step count, ᾱ_0 = 1
        gamma_bar = torch.cat([gamma_bar.new_zeros(1), gamma_bar])  # (T+1,), γ̄_0 = 0
        # Q_{m→n} for every pair of step counts m <= n (rows: from m, columns: to n); NaN where m > n.
        valid = torch.ones(T + 1, T + 1, dtype=torch.bool).triu()
        alpha = alpha_bar[None, :] / alpha_bar[:, None]  # (T+1, T+1)
        gamma = 1 - (1 - gamma_bar[None, :]) / (1 - gamma_bar[:, None])  # (T+1, T+1)
        beta = (1 - alpha - gamma) / K
        steps = torch.arange(T)
        if (beta[steps, steps + 1] < 0).any() or (gamma[steps, steps + 1] < 0).any():
            raise ValueError(f"alpha_cumprod {alpha_cumprod_start}->{alpha_cumprod_end} and gamma_cumprod "
                             f"{gamma_cumprod_start}->{gamma_cumprod_end} give a negative per-step beta_t or gamma_t "
                             f"(need alpha_cumprod to fall and gamma_cumprod to rise, with alpha_t + gamma_t <= 1)")

        def log_table(p: torch.Tensor) -> torch.Tensor:
            return torch.where(valid, p.clamp(min=0).log().clamp(min=LOG_ZERO), math.nan).float().to(device)

        self.log_alpha_transition = log_table(alpha)  # (T+1, T+1) log α_{m→n}
        self.log_beta_transition = log_table(beta)
        self.log_gamma_transition = log_table(gamma)
        # Per-step (Q_t) and cumulative (Q̄_t) views by 0-based timestep t, i.e. step count t + 1.
        self.alpha_t, self.beta_t, self.gamma_t = (p[steps, steps + 1].float().to(device) for p in (alpha, beta, gamma))
        self.alpha_t_cumprod, self.beta_t_cumprod, self.gamma_t_cumprod = (
            p[0, 1:].float().to(device) for p in (alpha, beta, gamma))
        self.log_alpha_t, self.log_beta_t, self.log_gamma_t = (
            tab[steps, steps + 1] for tab in self._log_tables())
        self.log_alpha_t_cumprod, self.log_beta_t_cumprod, self.log_gamma_t_cumprod = (
            tab[0, 1:] for tab in self._log_tables())
        self._config = dict(num_codes=num_codes, num_timesteps=num_timesteps, alpha_cumprod_start=alpha_cumprod_start,
                            alpha_cumprod_end=alpha_cumprod_end, gamma_cumprod_start=gamma_cumprod_start,
                            gamma_cumprod_end=gamma_cumprod_end)

    @classmethod
    def from_config(cls, cfg: DiscreteScheduleConfig, num_codes: int,
                    device: torch.device | str | None = None) -> DiscreteSchedule:
        return cls(num_codes, cfg.num_timesteps, cfg.alpha_cumprod_start, cfg.alpha_cumprod_end,
                   cfg.gamma_cumprod_start, cfg.gamma_cumprod_end, device=device)

    def to(self, device: torch.device | str) -> DiscreteSchedule:
        """The same schedule with its tables on ``device``."""
        return DiscreteSchedule(**self._config, device=device)

    @property
    def device(self) -> torch.device:
        return self.log_alpha_transition.device

    def _log_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.log_alpha_transition, self.log_beta_transition, self.log_gamma_transition

    def _params(self, m: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log (α, β, γ) of Q_{m→n} for per-sample step counts m, n (B,) -> three (B, 1, 1) tensors."""
        return tuple(tab[m, n].view(-1, 1, 1) for tab in self._log_tables())

    def _timesteps(self, t: torch.Tensor | int, batch: int) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.device, dtype=torch.long)
        return t.expand(batch) if t.dim() == 0 else t

    # ---------------------------------------------------------------------------------------------------------
    # Forward process
    # ---------------------------------------------------------------------------------------------------------

    def _log_rows(self, x_src: torch.Tensor, log_a, log_b, log_c) -> torch.Tensor:
        """Rows of Q for source codes: log q(x_to = j | x_from = x_src) for every j, (B, N) -> (B, K+1, N)."""
        K = self.num_codes
        j = torch.arange(K + 1, device=x_src.device).view(1, -1, 1)
        rows = torch.where(j == x_src[:, None, :], torch.logaddexp(log_a, log_b), log_b)  # (B, K+1, N)
        rows = torch.where(j == K, log_c, rows)
        from_mask = (x_src == K)[:, None, :]  # [MASK] absorbs
        return torch.where(from_mask, torch.where(j == K, 0.0, LOG_ZERO), rows)

    def _log_likelihood(self, x_t: torch.Tensor, log_a, log_b, log_c) -> torch.Tensor:
        """Columns of Q for observed codes: log q(x_to = x_t | x_from = j) for every j, (B, N) -> (B, K+1, N)."""
        K = self.num_codes
        j = torch.arange(K + 1, device=x_t.device).view(1, -1, 1)
        col = torch.where(j == x_t[:, None, :], torch.logaddexp(log_a, log_b), log_b)  # x_t a code, j a code
        is_mask = (x_t == K)[:, None, :]
        col = torch.where(is_mask, log_c, col)  # a code j is masked with probability γ
        return torch.where(j == K, torch.where(is_mask, 0.0, LOG_ZERO), col)  # j = [MASK] only stays [MASK]

    def q_probs(self, log_x0: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """log q(x_t | x0) = log(x0 Q̄_t) in closed form (Eq. 8) for a normalised distribution over codes.

        log_x0: (B, K, N) log-probabilities over the K codes (no [MASK] mass); t: (B,) or int -> (B, K+1, N).
        """
        B, K, N = log_x0.shape
        n = self._timesteps(t, B) + 1
        log_a, log_b, log_c = self._params(torch.zeros_like(n), n)
        return torch.cat([torch.logaddexp(log_x0 + log_a, log_b), log_c.expand(B, 1, N)], dim=1)

    def q_log_probs(self, x0: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """log q(x_t | x0) for codes x0 (B, N) -> (B, K+1, N) (Eq. 8)."""
        n = self._timesteps(t, x0.shape[0]) + 1
        return self._log_rows(x0, *self._params(torch.zeros_like(n), n))

    def q_step_log_probs(self, x_prev: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """log q(x_t | x_{t-1}) for codes x_{t-1} (B, N) (may contain [MASK]) -> (B, K+1, N) (Eq. 7)."""
        n = self._timesteps(t, x_prev.shape[0]) + 1
        return self._log_rows(x_prev, *self._params(n - 1, n))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor | int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x0): codes (B, N) -> codes (B, N)."""
        return sample_categorical(self.q_log_probs(x0, t), generator)

    # ---------------------------------------------------------------------------------------------------------
    # Posterior
    # ---------------------------------------------------------------------------------------------------------

    def q_posterior(self, log_x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int,
                    t_prev: torch.Tensor | int | None = None) -> torch.Tensor:
        """log Σ_{x0} q(x_s | x_t, x0) p(x0), s = ``t_prev`` (default t - 1; -1 is the clean state x0).

        Eq. 11 of Gu et al. with p(x0) = p_θ(x0|x_t) gives p_θ(x_{t-1}|x_t); with a one-hot x0 it is the true
        posterior q(x_{t-1}|x_t, x0). ``t_prev < t - 1`` is the fast-inference jump of Tang et al. 2022 (Sec. 3.3),
        here with the exact multi-step transition Q_{s→t}. Shapes: log_x0 (B, K, N) normalised log-probabilities
        over codes, x_t (B, N) -> (B, K+1, N), clamped to [LOG_ZERO, 0].

            p(x_s = j | x_t) = Σ_i p(x0 = i) q(x_t | x_s = j) q(x_s = j | x0 = i) / q(x_t | x0 = i)

        1. w_i = p(x0 = i) / q(x_t | x0 = i), normalised to w̃ = w / S (S = Σ_i w_i; logsumexp for stability);
        2. Σ_i w̃_i q(x_s = j | x0 = i) is the closed form q(x_s | w̃) of Eq. 8;
        3. multiply by the likelihood q(x_t | x_s = j) of Q_{s→t} and by S.
        """
        B, K, N = log_x0.shape
        n = self._timesteps(t, B) + 1  # step count of x_t
        m = n - 1 if t_prev is None else self._timesteps(t_prev, B) + 1  # step count of the target x_s
        zero = torch.zeros_like(n)
        log_q_xt_given_x0 = self._log_likelihood(x_t, *self._params(zero, n))[:, :K]  # (B, K, N)
        log_w = log_x0 - log_q_xt_given_x0  # step 1
        log_s = torch.logsumexp(log_w, dim=1, keepdim=True)  # (B, 1, N)
        log_a, log_b, log_c = self._params(zero, m)  # step 2: q(x_s | w̃)
        log_prior = torch.cat([torch.logaddexp(log_w - log_s + log_a, log_b), log_c.expand(B, 1, N)], dim=1)
        log_lik = self._log_likelihood(x_t, *self._params(m, n))  # step 3: q(x_t | x_s = j), (B, K+1, N)
        return (log_prior + log_lik + log_s).clamp(LOG_ZERO, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Training objective
# ---------------------------------------------------------------------------------------------------------------


class ImportanceTimestepSampler(nn.Module):
    """Loss-aware sampling of t (Nichol & Dhariwal 2021, Sec. 3.3; as in the official VQ-Diffusion code).

    Draws t uniformly until every t has been seen 10 times, then with p(t) ∝ sqrt(E[L_t²]) (an EMA, decay 0.9,
    in ``Lt_history``), where the decoder term t = 0 borrows the weight of t = 1. Buffers are saved with the
    trainer's state dict. Under DDP, all-reduce ``vlb`` before :meth:`update` to keep ranks identical.
    """

    def __init__(self, num_timesteps: int, min_count: int = 10):
        super().__init__()
        self.num_timesteps = num_timesteps
        self.min_count = min_count
        self.register_buffer("Lt_history", torch.zeros(num_timesteps))
        self.register_buffer("Lt_count", torch.zeros(num_timesteps))

    def probabilities(self) -> torch.Tensor | None:
        """p(t) (T,), or None while sampling is still uniform."""
        if not bool((self.Lt_count >= self.min_count).all()):
            return None
        weights = torch.sqrt(self.Lt_history + 1e-10) + 1e-4
        weights[0] = weights[1]
        return weights / weights.sum()

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> t (B,) long, p(t) (B,) float."""
        device, T = self.Lt_history.device, self.num_timesteps
        p_all = self.probabilities()
        if p_all is None:
            t = torch.randint(0, T, (batch_size,), device=device, generator=generator)
            return t, torch.full((batch_size,), 1.0 / T, device=device)
        t = torch.multinomial(p_all, batch_size, replacement=True, generator=generator)
        return t, p_all[t]

    @torch.no_grad()
    def update(self, t: torch.Tensor, vlb: torch.Tensor) -> None:
        """Record per-sample losses L_t (B,) at timesteps t (B,)."""
        new = 0.1 * vlb.float().pow(2) + 0.9 * self.Lt_history[t]
        self.Lt_history.scatter_(0, t, new)
        self.Lt_count.scatter_add_(0, t, torch.ones_like(new))


def vq_diffusion_loss(schedule: DiscreteSchedule, model, x0: torch.Tensor, t: torch.Tensor | None = None, *,
                      model_kwargs: dict | None = None, timestep_sampler: ImportanceTimestepSampler | None = None,
                      auxiliary_loss_weight: float = 5e-4, adaptive_auxiliary_loss: bool = True,
                      mask_weight: tuple[float, float] = (1.0, 1.0),
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """VQ-Diffusion training loss for clean codes x0 (B, N): L_vlb plus the auxiliary x0 term (Gu et al. Eq. 5, 12).

    ``model(x_t, t, **model_kwargs)`` returns log p_θ(x0|x_t) (B, K, N). t (B,) is drawn by ``timestep_sampler``
    (importance sampling, which it then updates) or uniformly when both are None; each term is divided by p(t).

        L_t   = KL(q(x_{t-1}|x_t, x0) || p_θ(x_{t-1}|x_t))  for t > 0, -log p_θ(x0|x_1) for t = 0 (decoder NLL)
        L_aux = KL(x0 || p_θ(x0|x_t)) for t > 0 (the decoder NLL again at t = 0), weighted by
                ``auxiliary_loss_weight`` times (2 - t/T) when ``adaptive_auxiliary_loss`` (official code)
        mask_weight = (w_masked, w_unmasked) weights the per-token KL terms by whether x_t is [MASK] there.

    Returns ``loss`` (scalar, summed over tokens and averaged over B and N as the official code), and detached
    ``vlb`` (unbiased estimate of Σ_t L_t per token, nats), ``aux`` (per token) and ``t``.
    """
    B, N = x0.shape
    K, T = schedule.num_codes, schedule.num_timesteps
    if t is not None:
        pt = torch.full((B,), 1.0 / T, device=x0.device)
    elif timestep_sampler is not None:
        t, pt = timestep_sampler.sample(B, generator)
    else:
        t = torch.randint(0, T, (B,), device=x0.device, generator=generator)
        pt = torch.full((B,), 1.0 / T, device=x0.device)
    x_t = schedule.q_sample(x0, t, generator)  # (B, N)
    log_x0_pred = model(x_t, t, **(model_kwargs or {})).float().clamp(min=LOG_ZERO)  # (B, K, N)
    log_x0 = index_to_log_onehot(x0, K)  # (B, K, N)
    log_model = schedule.q_posterior(log_x0_pred, x_t, t)  # p_θ(x_{t-1}|x_t), (B, K+1, N)
    log_true = schedule.q_posterior(log_x0, x_t, t)  # q(x_{t-1}|x_t, x0)
    weight = torch.where(x_t == K, mask_weight[0], mask_weight[1])  # (B, N)
    is_decoder = t == 0
    nll = -log_model.gather(1, x0[:, None, :]).squeeze(1).sum(dim=1)  # (B,)
    kl = (multinomial_kl(log_true, log_model) * weight).sum(dim=1)  # (B,)
    vlb = torch.where(is_decoder, nll, kl)  # (B,)
    if timestep_sampler is not None:
        timestep_sampler.update(t, vlb.detach())
    loss = vlb / pt
    aux = torch.zeros_like(vlb)
    if auxiliary_loss_weight:
        kl_aux = (multinomial_kl(log_x0, log_x0_pred) * weight).sum(dim=1)  # (B,)
        aux = torch.where(is_decoder, nll, kl_aux)
        aux_weight = (2.0 - t.float() / T) if adaptive_auxiliary_loss else 1.0
        loss = loss + auxiliary_loss_weight * aux_weight * aux / pt
    return {"loss": loss.sum() / (B * N), "vlb": (vlb / pt).detach().mean() / N, "aux": aux.detach().mean() / N,
            "t": t}
