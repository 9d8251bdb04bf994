"""Exponential moving average of model weights (Polyak averaging), as kept by every diffusion trainer.

| symbol | code            | meaning                                         |
|--------|-----------------|-------------------------------------------------|
| θ      | live parameter  | the weights the optimizer updates               |
| θ̄      | ``shadow[name]``| their moving average, exported at the end       |
| β_n    | ``decay_at(n)`` | decay used at the n-th EMA update               |

Update (after each optimizer step): θ̄ ← β_n θ̄ + (1 − β_n) θ. With ``warmup`` the decay ramps up as
β_n = min(β, (1 + n) / (10 + n)) (TensorFlow's ``ExponentialMovingAverage(num_updates=n)``, used by CompVis
``LitEma``), so early averages are not dominated by the random initialisation.

Only floating-point parameters are averaged; buffers (e.g. normalisation statistics) are used as they are.

Sharded parameters (FSDP2 ``DTensor``): θ̄ has the parameter's type and placement, so each rank holds and averages
only its own shard (the update is elementwise, so no communication is needed), checkpoints save θ̄ shard by shard,
and :meth:`EMA.swapped` puts each rank's shard of θ̄ into its shard of θ (a full export then gathers them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (a view: in-place ops change the DTensor), any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


class EMA:
    """Shadow copies of the parameters of ``modules`` (a dict name -> module), in float32."""

    def __init__(self, modules: dict[str, nn.Module], decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay={decay!r} must be in [0, 1)")
        self.modules = modules
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().float().clone() for name, p in self._params()}

    def _params(self) -> Iterator[tuple[str, nn.Parameter]]:
        for prefix, module in self.modules.items():
            for name, p in module.named_parameters():
                if p.requires_grad and p.is_floating_point():
                    yield f"{prefix}.{name}", p

    def decay_at(self, n: int) -> float:
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """θ̄ ← β_n θ̄ + (1 − β_n) θ for every tracked parameter."""
        beta = self.decay_at(self.num_updates)
        names, params = zip(*self._params())
        shadows = [_local(self.shadow[n]) for n in names]
        live = [_local(p.detach()).float() for p in params]
        torch._foreach_lerp_(shadows, live, 1.0 - beta)  # θ̄ + (1-β)(θ - θ̄), shard by shard
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Temporarily put the averaged weights into the modules (for sampling and export); exact restore."""
        backup = {}
        with torch.no_grad():
            for name, p in self._params():
                backup[name] = _local(p.detach()).clone()
                _local(p.detach()).copy_(_local(self.shadow[name]))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self._params():
                    _local(p.detach()).copy_(backup[name])

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted(set(self.shadow) - set(state["shadow"]))
        unexpected = sorted(set(state["shadow"]) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"EMA state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, value in state["shadow"].items():
            _local(self.shadow[name]).copy_(_local(value))
        self.num_updates = int(state["num_updates"])
