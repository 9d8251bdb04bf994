"""The training loop's non-finite guard, kept on the device: a step never waits for the GPU to learn whether its
loss and gradients were finite.

Per optimizer step s (every quantity a 0-dim tensor on the training device; nothing is read back per step):

| symbol    | code                  | meaning                                                                 |
|-----------|-----------------------|-------------------------------------------------------------------------|
| L_s       | ``loss``              | the step's loss (mean over micro-batches and ranks)                     |
| n_s^k     | ``norms``             | gradient norm of optimizer k, before clipping                           |
| c_s       | ``skipped``           | steps in a row with a non-finite gradient                               |
| F         | ``first_step``        | the first fatal step (-1: none yet), with its L_F and n_F kept           |
| may_skip  | ``may_skip``          | fp16's GradScaler is on: a non-finite gradient is an overflow, not fatal |

1. bad_L = ¬finite(L_s); bad_g = ¬finite(Σ_k n_s^k) (a norm is finite iff every gradient entry is, up to an overflow
   of the norm itself, which is then treated as non-finite too).
2. c_s = (c_{s−1} + 1) · bad_g.
3. fatal_s = bad_L ∨ (bad_g ∧ (¬may_skip ∨ c_s ≥ ``MAX_SKIPPED_STEPS``)); F ← s at the first fatal step.
4. skip_s = bad_L ∨ bad_g ∨ (F ≥ 0): :func:`step_unless` gives it to the optimizers as ``found_inf`` (the on-device
   skip of the fused AdamW kernels, the protocol ``GradScaler.step`` uses), so no update with a non-finite gradient
   is ever applied, and after a fatal step no update at all: the weights stay those from before step F.

:meth:`NonFiniteGuard.check` is the sync point (one device-to-host read): it raises :class:`NonFiniteError` naming
step F, and returns c_s. The trainer calls it after every step that logs, draws a sample grid, checkpoints or ends
the run (``stop_step``, ``max_minutes``), before any of that is written, on every rank alike. So a run whose step
F is fatal raises at the first such step after F: after at most min(``log_every``, ``checkpoint_every``,
``sample_every``) − 1 further steps (each of them skipped), where it used to raise within step F. No log record,
sample grid, checkpoint or export is written after F; the weights in memory are those from before F (the EMA and
the LR schedule did advance).

What this does not see: reads back inside the objective or the models (the text encoders copy token ids to the
device from pageable memory, one implicit sync per step on CUDA), and the ``max_minutes`` decision under DDP
(a broadcast per step).
"""

from __future__ import annotations

import math

import torch

MAX_SKIPPED_STEPS = 20


class NonFiniteError(RuntimeError):
    """The loss or the gradients became NaN/inf; nothing was saved after the last good checkpoint."""


class NonFiniteGuard:
    """Device-side record of non-finite steps (steps 1-4 of the module docstring) for the optimizers ``names``."""

    def __init__(self, device: torch.device, names: list[str], may_skip: bool, skipped: int = 0):
        self.names = list(names)
        self.may_skip = may_skip
        self.skipped = torch.tensor(skipped, dtype=torch.long, device=device)  # c_s
        self.first_step = torch.tensor(-1, dtype=torch.long, device=device)  # F
        self.first_values = torch.zeros(1 + len(self.names), device=device)  # (L_F, n_F^1, ..., n_F^K)

    @torch.no_grad()
    def record(self, step: int, loss: torch.Tensor, norms: list[torch.Tensor]) -> torch.Tensor:
        """Steps 1-3 for step ``step``; returns skip_s as a 0-dim float32 tensor (1: skip the update)."""
        values = torch.stack([loss.detach().float(), *(n.detach().float() for n in norms)])  # (1 + K,)
        bad_loss = ~torch.isfinite(values[0])
        bad_grad = ~torch.isfinite(values[1:].sum())
        self.skipped = (self.skipped + 1) * bad_grad
        fatal = bad_loss | (bad_grad & (self.skipped >= MAX_SKIPPED_STEPS if self.may_skip else True))
        new = fatal & (self.first_step < 0)
        self.first_step = torch.where(new, step, self.first_step)
        self.first_values = torch.where(new, values, self.first_values)
        return (bad_loss | bad_grad | (self.first_step >= 0)).float()

    def check(self) -> int:
        """The sync point: raise :class:`NonFiniteError` if a step was fatal, else return c_s (steps skipped in a
        row, for the checkpoint)."""
        first, skipped, *values = torch.cat([self.first_step.double().reshape(1), self.skipped.double().reshape(1),
                                             self.first_values.double()]).tolist()
        if first >= 0:
            loss, norms = values[0], dict(zip(self.names, values[1:]))
            if not math.isfinite(loss):
                raise NonFiniteError(f"the loss became {loss} at step {int(first)}")
            more = f" ({MAX_SKIPPED_STEPS} steps skipped in a row by fp16 loss scaling)" if self.may_skip else ""
            raise NonFiniteError(f"non-finite gradient norm {norms} at step {int(first)}{more}")
        return int(skipped)


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``skip`` (0-dim float, 1 = skip). Fused optimizers (``_step_supports_amp_scaling``:
    the fused AdamW the trainer builds) decide on the device through ``found_inf``, as under ``GradScaler.step``
    (gradients already unscaled, so ``grad_scale`` is None); any other optimizer reads ``skip`` back (a host sync)."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, skip
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not skip.item():
        optimizer.step()
