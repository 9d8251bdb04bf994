"""The one attention op, and the attention layers built on it.

Every attention in latentdiff (U-Net transformers, autoencoder mid-blocks, text encoders, the VQ-Diffusion
transformer) calls :func:`attention`. It uses ``torch.nn.functional.scaled_dot_product_attention`` (flash /
memory-efficient kernels on CUDA, a fused kernel on CPU), or xformers' memory-efficient attention when xformers
is importable, the tensors are on CUDA and ``set_attention_backend("xformers")`` (or "auto") selected it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
