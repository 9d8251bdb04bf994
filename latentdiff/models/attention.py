"""The one attention op, and the attention layers built on it.

Every attention in latentdiff (U-Net transformers, autoencoder mid-blocks, text encoders, the VQ-Diffusion
transformer) calls :func:`attention`. It uses ``torch.nn.functional.scaled_dot_product_attention`` (flash /
memory-efficient kernels on CUDA, a fused kernel on CPU), or xformers' memory-efficient attention when xformers
is importable, the tensors are on CUDA and ``set_attention_backend("xformers")`` (or "auto") selected it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:  # optional, CUDA only
    import xformers.ops as _xops
except Exception:  # ImportError, or a broken build without CUDA kernels
    _xops = None

_BACKEND = "auto"  # auto | sdpa | xformers | math


def set_attention_backend(name: str) -> None:
    """Choose the attention kernel: ``auto`` (xformers on CUDA when importable, else SDPA), ``sdpa``,
    ``xformers`` or ``math`` (plain softmax, a reference for tests)."""
    global _BACKEND
    if name not in ("auto", "sdpa", "xformers", "math"):
        raise ValueError(f"attention backend {name!r} is not one of ['auto', 'sdpa', 'xformers', 'math']")
    if name == "xformers" and _xops is None:
        raise ValueError("attention backend 'xformers' was asked for but xformers is not importable")
    _BACKEND = name


def get_attention_backend() -> str:
    return _BACKEND


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
    use_xformers = (_xops is not None and q.is_cuda and mask is None and _BACKEND in ("auto", "xformers"))
    if use_xformers:
        out = _xops.memory_efficient_attention(q, k, v)  # (B, N, h, dv)
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

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, mask)  # (B, N, h*d)
        return self.to_out(out)  # (B, N, query_dim)


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
