"""The VQ-Diffusion transformer: log p(x0 | x_t, text) over the codes of a VQ latent grid.

Gu et al. 2022, Sec. 3.3 and Fig. 1: code embeddings (K codes plus [MASK]) with learned 2-D positional
embeddings, blocks of self-attention, cross-attention to the text and a feed-forward, each attention preceded by
an adaptive LayerNorm driven by the diffusion step (AdaLN, their Eq. 13), then LayerNorm and a linear map to the
K code logits ([MASK] is never predicted). Improved VQ-Diffusion (Tang et al. 2022, Sec. 3.2) adds a learned null
condition for classifier-free guidance, ``null_context``.

Parameters correspond one to one with diffusers' discrete ``Transformer2DModel`` (``norm_type="ada_norm"``); the
key mapping lives in latentdiff/io/convert_vq.py:

    code_embed, height_embed, width_embed     latent_image_embedding.{emb, height_emb, width_emb}
    blocks.{i}.norm{1,2}.{time_embed, proj}   transformer_blocks.{i}.norm{1,2}.{emb, linear}
    blocks.{i}.attn{1,2}.to_{q,k,v,out}       transformer_blocks.{i}.attn{1,2}.{to_q, to_k, to_v, to_out.0}
    blocks.{i}.norm3, blocks.{i}.ff.proj_in,  transformer_blocks.{i}.norm3, ff.net.0.proj, ff.net.2
    ff.proj_out
    norm_out, to_logits                       norm_out, out
    null_context                              LearnedClassifierFreeSamplingEmbeddings.embeddings
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from latentdiff.config import VQTransformerConfig
from latentdiff.models.attention import attention


class AdaLayerNorm(nn.Module):
    """LayerNorm without affine parameters, modulated by the timestep: norm(x)·(1 + s_t) + b_t with
    (s_t, b_t) = Linear(SiLU(Embedding(t))) (Gu et al. Eq. 13). x: (B, N, D), t: (B,) -> (B, N, D)."""

    def __init__(self, dim: int, num_timesteps: int):
        super().__init__()
        self.time_embed = nn.Embedding(num_timesteps, dim)
        self.proj = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale, shift = self.proj(F.silu(self.time_embed(t)))[:, None, :].chunk(2, dim=-1)  # (B, 1, D) each
        return self.norm(x) * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head attention of x (B, N, D) over context (B, M, context_dim), or over x itself -> (B, N, D)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        context_dim = dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim, dim, bias=bias)
        self.to_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)  # (B, N, D)
        return self.dropout(self.to_out(out))


class FeedForward(nn.Module):
    """Linear (D -> mult·D), GELU-family activation, dropout, Linear (mult·D -> D)."""

    def __init__(self, dim: int, mult: int, activation: str, dropout: float = 0.0):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim * mult)
        self.proj_out = nn.Linear(dim * mult, dim)
        self.activation = activation
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)  # (B, N, mult*D)
        if self.activation == "gelu_sigmoid":  # GELU2 of VQ-Diffusion, x·σ(1.702x) (Hendrycks & Gimpel Sec. 2)
            h = h * torch.sigmoid(1.702 * h)
        else:
            h = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.proj_out(self.dropout(h))


class VQDiffusionBlock(nn.Module):
    """x + SelfAttn(AdaLN(x, t)); x + CrossAttn(AdaLN(x, t), context); x + FF(LN(x)). x: (B, N, D)."""

    def __init__(self, cfg: VQTransformerConfig):
        super().__init__()
        D = cfg.dim
        self.norm1 = AdaLayerNorm(D, cfg.num_timesteps)
        self.attn1 = Attention(D, cfg.heads, bias=cfg.attention_bias, dropout=cfg.dropout)
        self.norm2 = AdaLayerNorm(D, cfg.num_timesteps)
        self.attn2 = Attention(D, cfg.heads, context_dim=cfg.context_dim, bias=cfg.attention_bias,
                               dropout=cfg.dropout)
        self.norm3 = nn.LayerNorm(D)
        self.ff = FeedForward(D, cfg.ff_mult, cfg.ff_activation, cfg.dropout)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x, t))
        x = x + self.attn2(self.norm2(x, t), context)
        return x + self.ff(self.norm3(x))


class VQDiffusionTransformer(nn.Module):
    """forward(x_t (B, N) long in [0, K], t (B,) or int, context (B, L, context_dim)) -> log p(x0|x_t) (B, K, N).

    N = latent_size² codes in row-major order; index K is [MASK]. The output is a float32 log_softmax.
    """

    def __init__(self, cfg: VQTransformerConfig):
        super().__init__()
        self.cfg = cfg
        D, S = cfg.dim, cfg.latent_size
        self.num_codes = cfg.num_codes
        self.code_embed = nn.Embedding(cfg.num_codes + 1, D)
        self.height_embed = nn.Embedding(S, D)
        self.width_embed = nn.Embedding(S, D)
        self.blocks = nn.ModuleList(VQDiffusionBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(D)
        self.to_logits = nn.Linear(D, cfg.num_codes)
        self.apply(_init_weights)
        if cfg.learned_null_context:
            self.null_context = nn.Parameter(torch.zeros(cfg.context_length, cfg.context_dim))
        else:
            self.register_parameter("null_context", None)

    def positional_embedding(self) -> torch.Tensor:
        """Height plus width embeddings, (S*S, D), position n = row * S + column."""
        pos = self.height_embed.weight[:, None, :] + self.width_embed.weight[None, :, :]  # (S, S, D)
        return rearrange(pos, "h w d -> (h w) d")

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int, context: torch.Tensor) -> torch.Tensor:
        B, N = x_t.shape
        if N != self.cfg.latent_size**2:
            raise ValueError(f"x_t has {N} codes per sample; this transformer expects latent_size² = "
                             f"{self.cfg.latent_size**2}")
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.long)
        t = t.expand(B) if t.dim() == 0 else t  # (B,)
        h = self.code_embed(x_t) + self.positional_embedding()  # (B, N, D)
        context = context.to(h.dtype)
        for block in self.blocks:
            if self.cfg.gradient_checkpointing and self.training:
                h = checkpoint(block, h, t, context, use_reentrant=False)
            else:
                h = block(h, t, context)  # (B, N, D)
        logits = self.to_logits(self.norm_out(h))  # (B, N, K)
        return F.log_softmax(rearrange(logits.float(), "b n k -> b k n"), dim=1)  # (B, K, N)

    def drop_context(self, context: torch.Tensor, prob: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Caption dropout for learnable classifier-free guidance (Tang et al. 2022, Sec. 3.2): each sample's
        context (B, L, D) is replaced by the learned ``null_context`` with probability ``prob``."""
        if self.null_context is None:
            raise ValueError("drop_context needs transformer.learned_null_context=True")
        B = context.shape[0]
        drop = torch.rand(B, device=context.device, generator=generator) < prob  # (B,)
        return torch.where(drop[:, None, None], self.null_context.to(context.dtype)[None], context)


def _init_weights(module: nn.Module) -> None:
    """GPT-style initialisation of the official code: N(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
