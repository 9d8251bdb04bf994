"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", Eq. 3) on linear and convolution
layers, several adapters per layer, removable.

| symbol | code               | meaning                                                         |
|--------|--------------------|-----------------------------------------------------------------|
| W₀, b  | ``base``           | the wrapped ``nn.Linear`` / ``nn.Conv2d``, never modified        |
| A      | ``down``           | (r, in) or (r, in, kh, kw): the base's kernel, stride, padding  |
| B      | ``up``             | (out, r) or (out, r, 1, 1)                                      |
| α, r   | ``alpha``, ``rank``| the file's alpha and the rank; the update is scaled by α / r    |
| s      | ``scale``          | the user's strength of this adapter (``load_lora(scale=...)``)  |

A wrapped layer computes h = base(x) + Σ_k s_k α_k / r_k · B_k(A_k(x)) (kohya / AUTOMATIC1111 / diffusers
semantics; a 3x3 LoRA is a 3x3 down convolution followed by a 1x1 up convolution, "LoCon"). Code that reads
``layer.weight`` directly (the U-Net's 1x1 projections and GEGLU apply it with ``F.linear``) gets the merged weight
W₀ + Σ s α / r · B A, the same map. :func:`remove_lora` puts the untouched base layer back, so unloading restores
the original outputs exactly.

    add_lora(unet, "input_blocks.1.1.proj_in", "style", down, up, alpha=4.0, scale=0.8)
    remove_lora(unet, "style")        # or remove_lora(unet) for all adapters
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TARGET_TYPES = (nn.Linear, nn.Conv2d)


class LoRA(nn.Module):
    """One low-rank adapter: parameters ``down`` (A) and ``up`` (B), plain-number ``alpha`` and ``scale``."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float | None = None, scale: float = 1.0):
        super().__init__()
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(up)
        self.alpha = float(self.rank if alpha is None else alpha)
        self.scale = float(scale)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def factor(self) -> float:
        """s · α / r, the multiplier of B A."""
        return self.scale * self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        """s α / r · B A in the base weight's shape: (out, in) or (out, in, kh, kw)."""
        up = self.up.flatten(1)  # (out, r)
        if self.down.dim() == 2:
            return self.factor * (up @ self.down)  # (out, in)
        return self.factor * torch.einsum("or,rikl->oikl", up, self.down)  # (out, in, kh, kw)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}"


class LoRALayer(nn.Module):
    """An ``nn.Linear`` or ``nn.Conv2d`` (``base``) with LoRA adapters (``adapters``, by name) added to its output.

    ``weight`` and ``bias`` read like the base's, with ``weight`` merged: W₀ + Σ s α / r · B A.
    x: (..., in) -> (..., out) for a linear base; (B, in, H, W) -> (B, out, H', W') for a convolution.
    """

    def __init__(self, base: nn.Linear | nn.Conv2d):
        super().__init__()
        if not isinstance(base, TARGET_TYPES):
            raise TypeError(f"LoRA wraps nn.Linear or nn.Conv2d, not {type(base).__name__}")
        self.base = base
        self.adapters = nn.ModuleDict()

    @property
    def weight(self) -> torch.Tensor:
        w = self.base.weight
        for adapter in self.adapters.values():
            w = w + adapter.delta_weight().to(w.dtype)
        return w

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        base = self.base
        for adapter in self.adapters.values():
            down, up = adapter.down.to(x.dtype), adapter.up.to(x.dtype)
            if isinstance(base, nn.Conv2d):
                h = F.conv2d(x, down, None, base.stride, base.padding, base.dilation)  # (B, r, H', W')
                h = F.conv2d(h, up)  # (B, out, H', W')
            else:
                h = F.linear(F.linear(x, down), up)  # (..., out)
            out = out + adapter.factor * h
        return out


def fit_shapes(base: nn.Linear | nn.Conv2d, down: torch.Tensor, up: torch.Tensor,
               what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``down``/``up`` in the layout of layer ``base`` (a 1x1 convolution and a linear layer accept each other's
    form); ValueError naming ``what`` when they do not fit."""
    conv = isinstance(base, nn.Conv2d)
    if down.dim() not in (2, 4) or up.dim() != down.dim():
        raise ValueError(f"{what}: LoRA down {tuple(down.shape)} / up {tuple(up.shape)} are not 2-D or 4-D pairs")
    if conv and down.dim() == 2 and base.kernel_size == (1, 1):
        down, up = down[:, :, None, None], up[:, :, None, None]
    elif not conv and down.dim() == 4 and down.shape[2:] == (1, 1) and up.shape[2:] == (1, 1):
        down, up = down.flatten(1), up.flatten(1)
    r = down.shape[0]
    if conv:
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ValueError(f"{what}: LoRA on a grouped or non-zero-padded convolution is not supported")
        want_down, want_up = (r, base.in_channels, *base.kernel_size), (base.out_channels, r, 1, 1)
    else:
        want_down, want_up = (r, base.in_features), (base.out_features, r)
    if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
        raise ValueError(f"{what}: LoRA down {tuple(down.shape)} / up {tuple(up.shape)} do not fit the layer "
                         f"(weight {tuple(base.weight.shape)}): expected {want_down} / {want_up}")
    return down, up


def target_layers(root: nn.Module) -> dict[str, nn.Linear | nn.Conv2d]:
    """The layers of ``root`` that LoRA can adapt, by module name: every ``nn.Linear``/``nn.Conv2d``, and every
    :class:`LoRALayer` (named as its base layer was) with its base."""
    out, bases = {}, set()
    for name, m in root.named_modules():  # parents come before their children
        if isinstance(m, LoRALayer):
            out[name] = m.base
            bases.add(f"{name}.base" if name else "base")
        elif isinstance(m, TARGET_TYPES) and name not in bases:
            out[name] = m
    return out


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def add_lora(root: nn.Module, module_name: str, adapter_name: str, down: torch.Tensor, up: torch.Tensor,
             alpha: float | None = None, scale: float = 1.0) -> LoRA:
    """Add adapter ``adapter_name`` (B = ``up``, A = ``down``) to ``root``'s layer ``module_name``, wrapping it in a
    :class:`LoRALayer` first if needed. The tensors take the base weight's device and dtype."""
    try:
        layer = root.get_submodule(module_name)
    except AttributeError:
        raise ValueError(f"no layer {module_name!r}") from None
    if not isinstance(layer, LoRALayer):
        if not isinstance(layer, TARGET_TYPES):
            raise ValueError(f"{module_name!r} is a {type(layer).__name__}; LoRA applies to nn.Linear and nn.Conv2d")
        parent, child = _parent(root, module_name)
        wrapped = LoRALayer(layer)
        setattr(parent, child, wrapped)
        layer = wrapped
    if not adapter_name or "." in adapter_name or hasattr(layer.adapters, adapter_name):
        raise ValueError(f"{adapter_name!r} cannot name a LoRA adapter (empty, has a dot, or an nn.Module attribute)")
    if adapter_name in layer.adapters:
        raise ValueError(f"{module_name!r} already has a LoRA named {adapter_name!r}")
    down, up = fit_shapes(layer.base, down, up, module_name)
    w = layer.base.weight
    adapter = LoRA(down.detach().to(w.device, w.dtype), up.detach().to(w.device, w.dtype), alpha, scale)
    layer.adapters[adapter_name] = adapter
    return adapter


def lora_layers(root: nn.Module) -> dict[str, LoRALayer]:
    """Every :class:`LoRALayer` under ``root``, by module name."""
    return {name: m for name, m in root.named_modules() if isinstance(m, LoRALayer)}


def remove_lora(root: nn.Module, adapter_name: str | None = None) -> int:
    """Remove adapter ``adapter_name`` (all adapters when None) from every layer of ``root``; a layer left without
    adapters is replaced by its untouched base layer. Returns the number of adapters removed."""
    removed = 0
    for name, layer in lora_layers(root).items():
        for key in [k for k in layer.adapters if adapter_name is None or k == adapter_name]:
            del layer.adapters[key]
            removed += 1
        if not layer.adapters:
            parent, child = _parent(root, name)
            setattr(parent, child, layer.base)
    return removed


def new_lora_weights(layer: nn.Linear | nn.Conv2d, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh (down, up) for training: A ~ kaiming-uniform (a = √5, nn.Linear's default), B = 0, so the adapted
    layer starts equal to the base (Hu et al. 2021, Sec. 4.1). Uses the global torch RNG."""
    w = layer.weight
    if isinstance(layer, nn.Conv2d):
        down = torch.empty(rank, layer.in_channels, *layer.kernel_size)
        up = torch.zeros(layer.out_channels, rank, 1, 1)
    else:
        down, up = torch.empty(rank, layer.in_features), torch.zeros(layer.out_features, rank)
    nn.init.kaiming_uniform_(down, a=math.sqrt(5))
    return down.to(w.device, w.dtype), up.to(w.device, w.dtype)


def merged_state_dict(root: nn.Module) -> dict[str, torch.Tensor]:
    """``root``'s state dict with every LoRA merged into its base weight, under the names the module has without
    LoRA (``x.weight``, not ``x.base.weight``; no adapter tensors): the fine-tuned model as one set of weights."""
    layers = lora_layers(root)
    out = {}
    for key, value in root.state_dict().items():
        module_name, _, rest = key.rpartition(".base.")
        if module_name in layers and "." not in rest:
            out[f"{module_name}.{rest}"] = (layers[module_name].weight if rest == "weight" else value).detach()
        elif key.rpartition(".adapters.")[0] not in layers:
            out[key] = value
    return out
