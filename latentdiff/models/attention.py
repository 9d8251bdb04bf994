"""The one attention op, and the attention layers built on it.

Every attention in latentdiff (U-Net transformers, autoencoder mid-blocks, text encoders, the VQ-Diffusion
transformer) calls :func:`attention`. It uses ``torch.nn.functional.scaled_dot_product_attention`` (flash /
memory-efficient kernels on CUDA, a fused kernel on CPU), or xformers' memory-efficient attention when xformers
is importable, the tensors are on CUDA and ``set_attention_backend("xformers")`` (or "auto") selected it.

Choosing the backend: ``set_attention_backend(name)`` in a program, or the environment variable
``LATENTDIFF_ATTENTION=auto|sdpa|xformers|math``, read once at import (a value that cannot be used is ignored with
a warning: an unknown name, or ``xformers`` when xformers is not importable). ``auto``'s preference for xformers
over SDPA on CUDA is a default, not a measurement: ``benchmarks/bench_attention.py`` times both on the card, in
one run, and says which one ``auto`` should pick there; where SDPA measures faster, apply that with
``LATENTDIFF_ATTENTION=sdpa`` (or ``set_attention_backend("sdpa")``). Under ``auto``, an xformers that imports but
cannot run (a wheel built for another torch or CUDA: "No operator found") is dropped for SDPA after one warning.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional, CUDA only
    import xformers.ops as _xops

    XFORMERS_ERROR: str | None = None
except Exception as e:  # ImportError, or a broken build without CUDA kernels
    _xops = None
    XFORMERS_ERROR = f"{type(e).__name__}: {e}"  # why xformers is not available (benchmarks report it)

BACKENDS = ("auto", "sdpa", "xformers", "math")
ENV_VAR = "LATENTDIFF_ATTENTION"


def _backend_from_env() -> str:
    """The backend at import: ``$LATENTDIFF_ATTENTION`` when it is set to a usable name, else ``auto``."""
    name = os.environ.get(ENV_VAR, "").strip()
    if not name:
        return "auto"
    if name not in BACKENDS:
        warnings.warn(f"{ENV_VAR}={name!r} is not one of {list(BACKENDS)}: ignored, attention backend 'auto'",
                      stacklevel=2)
        return "auto"
    if name == "xformers" and _xops is None:
        warnings.warn(f"{ENV_VAR}=xformers ignored: xformers is not importable ({XFORMERS_ERROR}); attention "
                      "backend 'auto' (SDPA)", stacklevel=2)
        return "auto"
    return name


_BACKEND = _backend_from_env()  # auto | sdpa | xformers | math


def set_attention_backend(name: str) -> None:
    """Choose the attention kernel: ``auto`` (xformers on CUDA when importable, else SDPA), ``sdpa``,
    ``xformers`` or ``math`` (plain softmax, a reference for tests). Overrides ``$LATENTDIFF_ATTENTION``."""
    global _BACKEND
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {list(BACKENDS)}")
    if name == "xformers" and _xops is None:
        raise ValueError(f"attention backend 'xformers' was asked for but xformers is not importable "
                         f"({XFORMERS_ERROR})")
    _BACKEND = name


def get_attention_backend() -> str:
    return _BACKEND


def attention_kernel(device: torch.device | str) -> str:
    """The kernel :func:`attention` runs now for unmasked inputs on ``device``: ``xformers``, ``sdpa`` or ``math``
    (``auto`` resolved; masked inputs never go to xformers)."""
    if _BACKEND == "math":
        return "math"
    on_cuda = torch.device(device).type == "cuda"
    usable = _xops is not None and (_BACKEND == "xformers" or (_BACKEND == "auto" and _XFORMERS_FAILED is None))
    return "xformers" if usable and on_cuda else "sdpa"


_XFORMERS_FAILED: str | None = None  # why ``auto`` stopped using xformers in this process (its first failure)


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """xformers' memory-efficient attention of (B, N, h, d) tensors. Under ``auto``, an xformers that imports but
    has no kernel for these inputs (a wheel built for another torch or CUDA: "No operator found") makes ``auto``
    use SDPA from then on, with one warning, and returns None; the ``xformers`` backend raises instead."""
    global _XFORMERS_FAILED
    try:
        return _xops.memory_efficient_attention(q, k, v)
    except torch.OutOfMemoryError:
        raise
    except (NotImplementedError, RuntimeError) as e:  # no operator, a kernel library that does not load
        if _BACKEND != "auto":
            raise
        _XFORMERS_FAILED = str(e).splitlines()[0] if str(e) else type(e).__name__
        warnings.warn(f"xformers cannot run attention here ({_XFORMERS_FAILED}); attention backend 'auto' uses "
                      f"PyTorch SDPA from now on (set {ENV_VAR}=sdpa to skip xformers)", stacklevel=3)
        return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head scaled dot-product attention, softmax(q kᵀ / √d) v, per head.

    q: (B, N, heads*d), k: (B, M, heads*d), v: (B, M, heads*dv) -> (B, N, heads*dv).
    mask (optional): boolean (B, M) or (B, 1|N, M); True marks keys that may be attended to.
    """
    B, N, _ = q.shape
    M = k.shape[1]
    q = q.view(B, N, heads, -1)  # (B, N, h, d)
    k = k.view(B, M, heads, -1)  # (B, M, h, d)
    v = v.view(B, M, heads, -1)  # (B, M, h, dv)
    if mask is None and q.is_cuda and attention_kernel(q.device) == "xformers":
        out = _xformers_attention(q, k, v)  # (B, N, h, dv), or None: auto fell back to SDPA
        if out is not None:
            return out.reshape(B, N, -1)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, h, N|M, d)
    if mask is not None:
        mask = mask.view(B, 1, 1, M) if mask.dim() == 2 else mask.unsqueeze(1)  # (B, 1, 1|N, M)
    if _BACKEND == "math":
        scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, h, N, M)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out = (scores.softmax(dim=-1) @ v.float()).to(v.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, dv)
    return out.transpose(1, 2).reshape(B, N, -1)  # (B, N, h*dv)


# --------------------------------------------------------------------------------------------------------------
# Layers (Stable Diffusion / CompVis ``ldm.modules.attention`` parameter names)
# --------------------------------------------------------------------------------------------------------------


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (self-attention when ``context`` is None).

    x: (B, N, query_dim), context: (B, M, context_dim) -> (B, N, query_dim). Parameters ``to_q``, ``to_k``,
    ``to_v`` (no bias) and ``to_out.0``, as in Stable Diffusion.

    Fused projections (:meth:`fuse`, for inference speed): ``to_qkv`` = [W_q; W_k; W_v] computes q, k and v of a
    self-attention in one matrix product, ``to_kv`` = [W_k; W_v] the keys and values of a cross-attention in one;
    the outputs are the unfused ones (the same rows of the same weights). ``fused`` says which ("qkv", "kv" or
    None). The state dict always holds ``to_q``, ``to_k``, ``to_v``: saving splits the fused weight, loading joins
    the three (state-dict hooks), so files and LoRA names never see the fused layer.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.fused: str | None = None
        self.register_state_dict_post_hook(_split_fused_state)
        self.register_load_state_dict_pre_hook(_join_fused_state)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.fused == "qkv" and context is None:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)  # (B, N, h*d) each, views of one product
        elif self.fused == "qkv":  # a fused self-attention asked to attend to a context: row blocks of W
            w_q, w_kv = self.to_qkv.weight.tensor_split([self.to_qkv.out_features // 3])
            q = F.linear(x, w_q)  # (B, N, h*d)
            k, v = F.linear(context, w_kv).chunk(2, dim=-1)  # (B, M, h*d) each
        elif self.fused == "kv":
            q = self.to_q(x)  # (B, N, h*d)
            k, v = self.to_kv(x if context is None else context).chunk(2, dim=-1)  # (B, M, h*d) each
        else:
            context = x if context is None else context
            q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out(attention(q, k, v, self.heads, mask))  # (B, N, query_dim)

    def fuse(self, self_attention: bool) -> None:
        """Replace ``to_q``, ``to_k``, ``to_v`` by ``to_qkv`` (``self_attention``) or ``to_k``, ``to_v`` by
        ``to_kv``. ValueError when a projection is not a plain ``nn.Linear`` (a LoRA is loaded on it)."""
        if self.fused is not None:
            return
        names = ("to_q", "to_k", "to_v") if self_attention else ("to_k", "to_v")
        layers = [getattr(self, n) for n in names]
        if any(type(layer) is not nn.Linear for layer in layers):
            raise ValueError("cannot fuse attention projections that carry LoRA adapters: unload_lora() first")
        if self_attention and self.to_k.in_features != self.to_q.in_features:
            raise ValueError(f"a self-attention needs key width {self.to_q.in_features}, got {self.to_k.in_features}")
        fused = "qkv" if self_attention else "kv"
        setattr(self, f"to_{fused}", _joined_linear(layers))
        for n in names:
            delattr(self, n)
        self.fused = fused
        _move_to_end(self, "to_out")  # module order as unfused: projections first (named_modules, repr)

    def unfuse(self) -> None:
        """The separate ``to_q``, ``to_k``, ``to_v`` again (the same weights, split)."""
        if self.fused is None:
            return
        joined = self._modules.pop(f"to_{self.fused}")
        names = ("to_q", "to_k", "to_v") if self.fused == "qkv" else ("to_k", "to_v")
        w = joined.weight.detach()
        for n, part in zip(names, w.chunk(len(names))):
            layer = nn.Linear(part.shape[1], part.shape[0], bias=False, device="meta")
            layer.weight = nn.Parameter(part.clone(), requires_grad=joined.weight.requires_grad)
            setattr(self, n, layer)
        self.fused = None
        _move_to_end(self, "to_q", "to_k", "to_v", "to_out")


def _move_to_end(module: nn.Module, *names: str) -> None:
    """Put the children ``names`` last, in that order (the order of named_modules() and state_dict())."""
    for n in names:
        module._modules[n] = module._modules.pop(n)


def _joined_linear(layers: list[nn.Linear]) -> nn.Linear:
    """One bias-free ``nn.Linear`` whose weight stacks the layers' weights by rows: (Σ out, in)."""
    w = torch.cat([layer.weight.detach() for layer in layers])  # (Σ out, in)
    joined = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    joined.weight = nn.Parameter(w, requires_grad=layers[0].weight.requires_grad)
    return joined


def _split_fused_state(module: CrossAttention, state: dict, prefix: str, local_metadata: dict) -> None:
    """state_dict() post-hook: a fused weight goes out as ``to_q``/``to_k``/``to_v`` (copies), in the unfused order."""
    if module.fused is None:
        return
    own = {k: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}  # this module's, the last added
    names = ("to_q", "to_k", "to_v") if module.fused == "qkv" else ("to_k", "to_v")
    parts = own.pop(f"{prefix}to_{module.fused}.weight").chunk(len(names))
    split = {f"{prefix}{n}.weight": w.clone() for n, w in zip(names, parts)}
    if module.fused == "kv":
        split = {f"{prefix}to_q.weight": own.pop(f"{prefix}to_q.weight"), **split}
    state.update(split)
    state.update(own)  # to_out.*


def _join_fused_state(module: CrossAttention, state: dict, prefix: str, *args) -> None:
    """load_state_dict() pre-hook: ``to_q``/``to_k``/``to_v`` of a file load into the fused weight."""
    if module.fused is None:
        return
    names = ("to_q", "to_k", "to_v") if module.fused == "qkv" else ("to_k", "to_v")
    keys = [f"{prefix}{n}.weight" for n in names]
    if all(k in state for k in keys):
        state[f"{prefix}to_{module.fused}.weight"] = torch.cat([state.pop(k) for k in keys])


def fuse_qkv(root: nn.Module) -> int:
    """Fuse the projections of every :class:`BasicTransformerBlock` under ``root``: q/k/v of its self-attention
    (``attn1``), k/v of its cross-attention (``attn2``). Nothing is changed when one cannot be fused (ValueError:
    a LoRA is loaded on it). Returns the number of attention layers fused now."""
    todo = [(a, own) for b in root.modules() if isinstance(b, BasicTransformerBlock)
            for a, own in ((b.attn1, True), (b.attn2, False)) if a.fused is None]
    for attn, own in todo:
        names = ("to_q", "to_k", "to_v") if own else ("to_k", "to_v")
        if any(type(getattr(attn, n)) is not nn.Linear for n in names):
            raise ValueError("cannot fuse attention projections that carry LoRA adapters: unload_lora() first")
    for attn, own in todo:
        attn.fuse(self_attention=own)
    return len(todo)


def unfuse_qkv(root: nn.Module) -> int:
    """Split every fused attention projection under ``root`` back; returns how many layers were fused."""
    fused = [m for m in root.modules() if isinstance(m, CrossAttention) and m.fused is not None]
    for m in fused:
        m.unfuse()
    return len(fused)


class GEGLU(nn.Module):
    """Gated GELU projection, ``a * gelu(g)`` with ``[a, g] = proj(x)`` (Shazeer 2020, "GLU Variants", Eq. 6).

    The two halves are computed as two matrix products with the row blocks of ``proj`` so that ``gelu`` runs on
    a contiguous tensor (on a strided half of one product it is several times slower on CPU).
    """

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_a, w_gate = self.proj.weight.chunk(2)  # (dim_out, dim_in) each
        b_a, b_gate = self.proj.bias.chunk(2)  # (dim_out,) each
        return F.linear(x, w_a, b_a) * F.gelu(F.linear(x, w_gate, b_gate))  # (..., dim_out)


class FeedForward(nn.Module):
    """GEGLU feed-forward ``dim -> mult*dim -> dim``; parameters ``net.0.proj`` and ``net.2``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention over ``context``, GEGLU feed-forward.

    x: (B, N, dim), context: (B, M, context_dim) -> (B, N, dim).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim=context_dim, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on ``context`` (Rombach et al. 2022, Sec. 3.3).

    GroupNorm, projection in, ``depth`` :class:`BasicTransformerBlock`, projection out, residual.
    The projections are 1x1 convolutions (SD 1.x) or linear layers (``use_linear``, SD 2.x); both are applied
    as one matrix product over the flattened pixels, which is the same map.
    x: (B, C, H, W), context: (B, M, context_dim) -> (B, C, H, W).
    """

    def __init__(self, in_channels: int, heads: int, dim_head: int, context_dim: int, depth: int = 1,
                 use_linear: bool = False, dropout: float = 0.0, norm_num_groups: int = 32):
        super().__init__()
        inner_dim = heads * dim_head
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim, dropout) for _ in range(depth))
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C)
        h = F.linear(h, self.proj_in.weight.flatten(1), self.proj_in.bias)  # (B, HW, inner)
        for block in self.transformer_blocks:
            h = block(h, context)  # (B, HW, inner)
        h = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)  # (B, HW, C)
        return x + h.view(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
