"""VQ-Diffusion math: transition matrices, posterior, loss and sampling, against dense matrices and diffusers."""

import pytest
import torch

from latentdiff.config import DiscreteScheduleConfig
from latentdiff.diffusion.discrete import (
    LOG_ZERO,
    DiscreteSchedule,
    ImportanceTimestepSampler,
    index_to_log_onehot,
    vq_diffusion_loss,
)
from latentdiff.diffusion.discrete_sampling import (
    apply_guidance,
    learned_classifier_free_guidance,
    purity_schedule,
    sample,
    sample_purity,
    sampling_timesteps,
    truncate,
)

K, T = 5, 8  # codes (mask index K), diffusion steps


@pytest.fixture(scope="module")
def schedule():
    return DiscreteSchedule(K, T)


def dense_step(schedule, t):
    """Q_t as a dense (K+1, K+1) float64 matrix built from the per-step scalars: Q[i, j] = q(x_t = j | x_{t-1} = i)."""
    a, b, c = (float(v[t]) for v in (schedule.alpha_t, schedule.beta_t, schedule.gamma_t))
    Q = torch.full((K + 1, K + 1), b, dtype=torch.float64)
    Q[:K, :K] += a * torch.eye(K, dtype=torch.float64)
    Q[:K, K] = c
    Q[K] = 0.0
    Q[K, K] = 1.0
    return Q


def dense_product(schedule, m, n):
    """Q_{m→n} = Q_{m+1} ... Q_n by step counts (identity when m == n)."""
    Q = torch.eye(K + 1, dtype=torch.float64)
    for step in range(m, n):  # 0-based timestep `step` is step count step + 1
        Q = Q @ dense_step(schedule, step)
    return Q


def all_codes():
    return torch.arange(K + 1)[None, :]  # (1, K+1): every class as a batch of one sequence


def test_step_and_cumulative_rows_sum_to_one_and_mask_absorbs(schedule):
    for t in range(T):
        step = schedule.q_step_log_probs(all_codes(), t)[0].exp().T  # (K+1 sources, K+1 targets)
        cum = schedule.q_log_probs(all_codes(), t)[0].exp().T
        for Q in (step, cum):
            torch.testing.assert_close(Q.sum(dim=1), torch.ones(K + 1), atol=1e-6, rtol=0)
            assert Q[K, K] == 1.0 and torch.all(Q[K, :K] < 1e-29)  # [MASK] stays [MASK]
        torch.testing.assert_close(step.double(), dense_step(schedule, t), atol=1e-7, rtol=0)
        assert torch.all(step[:K, K] > 0)  # every code can be masked


def test_cumulative_equals_product_of_steps(schedule):
    for t in range(T):
        cum = schedule.q_log_probs(all_codes(), t)[0].exp().T.double()  # rows: x0
        torch.testing.assert_close(cum[:K], dense_product(schedule, 0, t + 1)[:K], atol=1e-6, rtol=0)


def test_paper_default_schedule_endpoints():
    s = DiscreteSchedule.from_config(DiscreteScheduleConfig(), num_codes=K)
    assert s.num_timesteps == 100
    torch.testing.assert_close(s.alpha_t_cumprod[[0, -1]], torch.tensor([0.99999, 0.000009]))
    torch.testing.assert_close(s.gamma_t_cumprod[[0, -1]], torch.tensor([0.000009, 0.99999]))
    torch.testing.assert_close(s.alpha_t_cumprod, torch.cumprod(s.alpha_t.double(), 0).float())
    torch.testing.assert_close(1 - s.gamma_t_cumprod, torch.cumprod(1 - s.gamma_t.double(), 0).float())
    assert torch.all(s.beta_t >= 0) and torch.all(s.beta_t_cumprod >= 0)


def test_bad_schedule_is_rejected():
    with pytest.raises(ValueError, match="alpha_cumprod"):
        DiscreteScheduleConfig(alpha_cumprod_start=0.5, alpha_cumprod_end=0.9)
    with pytest.raises(ValueError, match="negative per-step"):
        DiscreteSchedule(K, T, gamma_cumprod_start=0.5, gamma_cumprod_end=0.1)


def test_closed_form_for_distributions_matches_codes(schedule):
    x0 = torch.randint(0, K, (2, 6), generator=torch.Generator().manual_seed(0))
    for t in (0, 3, T - 1):
        torch.testing.assert_close(schedule.q_probs(index_to_log_onehot(x0, K), t), schedule.q_log_probs(x0, t),
                                   atol=1e-5, rtol=0)


def bayes_posterior(schedule, p_x0, x_t, n, m):
    """Dense Bayes: p(x_m = j | x_n) = Σ_i p_i Q_{m→n}[j, x_n] Q̄_m[i, j] / Q̄_n[i, x_n], for one position."""
    Qbar_m, Qbar_n, Q_mn = dense_product(schedule, 0, m), dense_product(schedule, 0, n), dense_product(schedule, m, n)
    out = torch.zeros(K + 1, dtype=torch.float64)
    for i in range(K):
        out += p_x0[i] * Q_mn[:, x_t] * Qbar_m[i, :] / Qbar_n[i, x_t]
    return out


@pytest.mark.parametrize("jump", [1, 3])
def test_posterior_equals_dense_bayes(schedule, jump):
    g = torch.Generator().manual_seed(1)
    p_x0 = torch.softmax(torch.randn(1, K, K + 1, generator=g) * 2, dim=1)  # one distribution per position
    x_t = all_codes()  # every observed class, [MASK] included
    for t in range(jump - 1, T):
        got = schedule.q_posterior(p_x0.log(), x_t, t, t - jump)[0].exp().double()  # (K+1, K+1 positions)
        for pos in range(K + 1):
            want = bayes_posterior(schedule, p_x0[0, :, pos].double(), pos, t + 1, t + 1 - jump)
            torch.testing.assert_close(got[:, pos], want, atol=2e-5, rtol=1e-4)


def test_posterior_matches_diffusers(schedule):
    from diffusers.schedulers.scheduling_vq_diffusion import VQDiffusionScheduler

    ref = VQDiffusionScheduler(num_vec_classes=K + 1, num_train_timesteps=T)
    g = torch.Generator().manual_seed(2)
    log_p = torch.log_softmax(torch.randn(3, K, 9, generator=g), dim=1)
    x_t = torch.randint(0, K + 1, (3, 9), generator=g)
    for t in range(T):
        ours, theirs = schedule.q_posterior(log_p, x_t, t), ref.q_posterior(log_p, x_t, t)
        torch.testing.assert_close(ours.exp(), theirs.exp(), atol=1e-6, rtol=1e-5)
        visible = theirs > -30
        torch.testing.assert_close(ours[visible], theirs[visible], atol=1e-4, rtol=1e-5)


def test_schedule_tables_match_diffusers(schedule):
    from diffusers.schedulers.scheduling_vq_diffusion import VQDiffusionScheduler

    ref = VQDiffusionScheduler(num_vec_classes=K + 1, num_train_timesteps=T)
    for ours, theirs in ((schedule.log_alpha_t, ref.log_at), (schedule.log_beta_t, ref.log_bt),
                         (schedule.log_gamma_t, ref.log_ct), (schedule.log_alpha_t_cumprod, ref.log_cumprod_at[:T]),
                         (schedule.log_beta_t_cumprod, ref.log_cumprod_bt[:T]),
                         (schedule.log_gamma_t_cumprod, ref.log_cumprod_ct[:T])):
        torch.testing.assert_close(ours, theirs)


def oracle(x0):
    """A perfect x0 predictor: log one-hot of the true codes, whatever x_t and t."""
    return lambda x_t, t, **kw: index_to_log_onehot(x0, K)


def test_perfect_predictor_gives_zero_loss(schedule):
    x0 = torch.randint(0, K, (4, 10), generator=torch.Generator().manual_seed(3))
    for t in range(T):
        out = vq_diffusion_loss(schedule, oracle(x0), x0, torch.full((4,), t), generator=torch.Generator())
        assert abs(out["vlb"].item()) < 1e-4 and abs(out["aux"].item()) < 1e-4 and abs(out["loss"].item()) < 1e-3


def test_loss_trains_and_weights():
    schedule = DiscreteSchedule(K, T)
    logits = torch.zeros(1, K, 10, requires_grad=True)
    x0 = torch.randint(0, K, (4, 10), generator=torch.Generator().manual_seed(4))
    model = lambda x_t, t, **kw: torch.log_softmax(logits.expand(x_t.shape[0], -1, -1), dim=1)  # noqa: E731
    out = vq_diffusion_loss(schedule, model, x0, generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss"] > 0 and logits.grad.abs().sum() > 0
    gen = torch.Generator().manual_seed(5)
    t = torch.full((4,), T // 2)
    base = vq_diffusion_loss(schedule, model, x0, t, auxiliary_loss_weight=0.0, generator=gen.manual_seed(5))
    zero_mask = vq_diffusion_loss(schedule, model, x0, t, auxiliary_loss_weight=0.0, mask_weight=(0.0, 1.0),
                                  generator=gen.manual_seed(5))
    assert zero_mask["vlb"] < base["vlb"]  # the masked tokens' KL terms were dropped


def test_importance_sampler_is_uniform_then_loss_aware():
    sampler = ImportanceTimestepSampler(T)
    g = torch.Generator().manual_seed(0)
    t, pt = sampler.sample(16, g)
    assert torch.all(pt == 1.0 / T) and sampler.probabilities() is None
    losses = torch.arange(T, dtype=torch.float32) + 1.0
    for _ in range(10):
        sampler.update(torch.arange(T), losses)
    p = sampler.probabilities()
    assert p is not None and torch.isclose(p.sum(), torch.tensor(1.0))
    assert p[0] == p[1] and torch.all(p[2:].diff() > 0)  # ∝ sqrt(E[L_t²]), decoder term borrows t = 1
    t, pt = sampler.sample(1000, g)
    torch.testing.assert_close(pt, p[t])


class CountingModel:
    """Random but deterministic log p(x0|x_t) that counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x_t, t, context=None):
        self.calls += 1
        g = torch.Generator().manual_seed(int(t[0]))
        B, N = x_t.shape
        log_p = torch.log_softmax(torch.randn(1, K, N, generator=g) * 3, dim=1).expand(B, -1, -1)
        return log_p if context is None else log_p + 0 * context.sum()


def test_full_chain_ends_unmasked(schedule):
    model = CountingModel()
    seen = []
    x = sample(model, schedule, (3, 12), generator=torch.Generator().manual_seed(0),
               callback=lambda i, t, x: seen.append((i, t)))
    assert x.shape == (3, 12) and x.dtype == torch.long
    assert torch.all((x >= 0) & (x < K))
    assert model.calls == T and seen == list(enumerate(range(T - 1, -1, -1)))


@pytest.mark.parametrize("skip", [2, 4, 8])
def test_fast_sampling_uses_T_over_s_calls(schedule, skip):
    model = CountingModel()
    x = sample(model, schedule, (2, 6), steps=T // skip, generator=torch.Generator().manual_seed(0))
    assert model.calls == T // skip and torch.all(x < K)
    assert sampling_timesteps(T, T // skip) == list(range(T - 1, -1, -skip))


def test_sampling_is_reproducible(schedule):
    a = sample(CountingModel(), schedule, (2, 6), generator=torch.Generator().manual_seed(7))
    b = sample(CountingModel(), schedule, (2, 6), generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_truncation_keeps_the_right_set():
    p = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])  # sorted: 0.4, 0.3, 0.15, 0.1, 0.05
    log_p = p.log().view(1, K, 1)
    for r, kept in ((0.3, {1}), (0.5, {1, 3}), (0.75, {1, 3, 4}), (0.9, {1, 3, 4, 2}), (0.99, {0, 1, 2, 3, 4})):
        out = truncate(log_p, r)[0, :, 0]
        assert {i for i in range(K) if out[i] > LOG_ZERO} == kept, r
        torch.testing.assert_close(out.exp().sum(), torch.tensor(1.0))
        torch.testing.assert_close(out[list(kept)].exp(), p[list(kept)] / p[list(kept)].sum())
    assert truncate(log_p, 1.0) is log_p


def test_guidance():
    g = torch.Generator().manual_seed(0)
    cond, uncond = (torch.log_softmax(torch.randn(2, K, 4, generator=g), dim=1) for _ in range(2))
    torch.testing.assert_close(apply_guidance(cond, uncond, 1.0), cond)
    guided = apply_guidance(cond, uncond, 3.0)
    torch.testing.assert_close(guided, torch.log_softmax(uncond + 3 * (cond - uncond), dim=1))

    def model(x_t, t, context):  # log p depends on the context through its mean
        base = torch.log_softmax(torch.randn(1, K, x_t.shape[1], generator=torch.Generator().manual_seed(1)), 1)
        return torch.log_softmax(base + context.mean(dim=(1, 2))[:, None, None] * torch.arange(K)[None, :, None], 1)

    null = torch.zeros(3, 2)
    context = torch.ones(2, 3, 2)
    x_t, t = torch.full((2, 4), K), torch.tensor([5, 5])
    assert learned_classifier_free_guidance(model, 1.0, null) is model
    torch.testing.assert_close(learned_classifier_free_guidance(model, 1.0 + 1e-12, null)(x_t, t, context=context),
                               model(x_t, t, context), atol=1e-5, rtol=0)
    guided = learned_classifier_free_guidance(model, 4.0, null)(x_t, t, context=context)
    want = apply_guidance(model(x_t, t, context), model(x_t, t, null.expand(2, -1, -1)), 4.0)
    torch.testing.assert_close(guided, want)


@pytest.mark.parametrize("steps", [T, T // 2, 1])
def test_purity_sampling_reveals_the_expected_mask_count_and_never_changes_a_code(schedule, steps):
    """Each call leaves round(N γ̄) [MASK] tokens of the next call's timestep (0 after the last); revealed codes
    stay."""
    N = 40
    times = sampling_timesteps(T, steps)
    left = purity_schedule(schedule, times, N)
    gamma_bar = schedule.gamma_t_cumprod.double()
    assert left == [round(N * float(gamma_bar[t])) for t in times[1:]] + [0]
    assert all(a >= b for a, b in zip([N] + left, left))
    states = []
    model = CountingModel()
    x = sample_purity(model, schedule, (3, N), steps=steps, generator=torch.Generator().manual_seed(0),
                      callback=lambda i, t, x: states.append(x.clone()))
    assert len(states) == steps and torch.all((x >= 0) & (x < K)) and torch.equal(states[-1], x)
    assert model.calls == sum(a > b for a, b in zip([N] + left, left))  # the network only where a call reveals
    before = torch.full((3, N), K)
    for state, n_left in zip(states, left):
        assert ((state == K).sum(dim=1) == n_left).all()
        revealed = before != K
        assert torch.equal(state[revealed], before[revealed])  # a code once revealed never changes
        before = state
    again = sample_purity(CountingModel(), schedule, (3, N), steps=steps, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, again)


def test_purity_skips_the_network_on_calls_that_reveal_nothing(schedule):
    """4 positions over the 8-step chain: round(4 γ̄) stays put on some calls, which make no network call."""
    left = purity_schedule(schedule, sampling_timesteps(T, T), 4)
    revealing = sum(a > b for a, b in zip([4] + left, left))
    assert revealing < T
    model, seen = CountingModel(), []
    sample_purity(model, schedule, (2, 4), generator=torch.Generator().manual_seed(0),
                  callback=lambda i, t, x: seen.append(i))
    assert model.calls == revealing and seen == list(range(T))


def test_purity_picks_positions_in_proportion_to_purity():
    """The first position revealed out of two is position j with probability purity_j / (purity_1 + purity_2)
    (purity = the largest p(x0|x_t) there); temperature τ makes it purity_j^(1/τ) / Σ purity^(1/τ)."""
    sched = DiscreteSchedule(K, 4)
    assert purity_schedule(sched, sampling_timesteps(4, 2), 2) == [1, 0]  # the first of 2 calls reveals one of 2
    p = torch.tensor([[0.9, 0.025, 0.025, 0.025, 0.025], [0.3, 0.2, 0.2, 0.2, 0.1]]).T  # (K, 2): purity 0.9, 0.3
    first = []

    def model(x_t, t, context=None):
        return p.log()[None].expand(x_t.shape[0], -1, -1)

    B = 20000
    for temperature, want in ((1.0, 0.9 / 1.2), (0.5, 0.81 / 0.9)):
        first.clear()
        sample_purity(model, sched, (B, 2), steps=2, generator=torch.Generator().manual_seed(1),
                      temperature=temperature, callback=lambda i, t, x: first.append(x.clone()) if i == 0 else None)
        share = (first[0][:, 0] != K).double().mean().item()  # position 0 revealed first
        assert abs(share - want) < 4 * (want * (1 - want) / B) ** 0.5, (temperature, share, want)
        codes = first[0][:, 0][first[0][:, 0] != K]  # its code is drawn from p(x0) there
        assert abs((codes == 0).double().mean().item() - 0.9) < 0.02
    with pytest.raises(ValueError, match="temperature"):
        sample_purity(model, sched, (1, 2), temperature=0.0)


def test_purity_keeps_the_joint_distribution_that_one_step_breaks():
    """Improved VQ-Diffusion's example: data AA and BB, each half the time. A model that knows this predicts
    50/50 for each position while both are masked and the partner's code once one is revealed. Drawing both
    positions in one step gives AB and BA half the time; purity sampling reveals one per call and never does."""
    sched = DiscreteSchedule(K, 8)
    A, B = 1, 3

    def model(x_t, t, context=None):
        n = x_t.shape[0]
        p = torch.full((n, K, 2), 1e-6)
        both = (x_t == K).all(dim=1)
        p[both, A, :] = p[both, B, :] = 0.5
        for j in (0, 1):  # position j revealed: both positions take its code
            known = (x_t[:, j] != K) & ~both
            p[known, x_t[known, j], :] = 1.0
        return torch.log(p / p.sum(dim=1, keepdim=True))

    n = 4000
    one_step = sample(model, sched, (n, 2), steps=1, generator=torch.Generator().manual_seed(0))
    mixed = (one_step[:, 0] != one_step[:, 1]).double().mean().item()
    assert 0.45 < mixed < 0.55
    x = sample_purity(model, sched, (n, 2), steps=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 0], x[:, 1]) and 0.45 < (x[:, 0] == A).double().mean().item() < 0.55
