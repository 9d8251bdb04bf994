"""Text encoders: the common interface and our own trainable encoder.

Every encoder maps prompts to a sequence of hidden states, the U-Net's cross-attention ``context``:

    encoder = build_text_encoder(  # latentdiff.models.text_encoders
        TextEncoderConfig(type="trainable", width=512, layers=6, heads=8))
    context = encoder.encode(["a photo of a cat", ""])  # (2, 77, 512)

Types (``TextEncoderConfig.type``):

- ``trainable``: our own small causal transformer (CLIP's text tower shape), trained with the diffusion model.
- ``clip``: a transformers ``CLIPTextModel`` (Stable Diffusion 1.x), in :mod:`latentdiff.models.text_clip`.
- ``openclip``: the OpenCLIP text tower (Stable Diffusion 2.x), in :mod:`latentdiff.models.text_clip`.

All share the CLIP BPE vocabulary through :class:`~latentdiff.models.tokenizer.Tokenizer`.
``layer="penultimate"`` runs every block but the last and then the final LayerNorm, as Stable Diffusion 2 does.

``clip_skip`` (``encoder(tokens, clip_skip=2)``, AUTOMATIC1111's "Clip skip") counts from that output layer: 1 is
the configured layer, N stops N - 1 blocks earlier, always followed by the final LayerNorm. Weighted and long
prompts (``(word:1.3)``, ``BREAK``, chunks of context_length - 2 tokens) are encoded by
:func:`latentdiff.models.prompt_encoding.encode_prompt_batches`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from latentdiff.config import TextEncoderConfig
from latentdiff.models.attention import attention
from latentdiff.models.tokenizer import Tokenizer


class TextEncoder(nn.Module):
    """Common interface: ``tokenize(prompts) -> (B, L)``, ``forward(tokens) -> (B, L, width)``, ``encode``."""

    def __init__(self, cfg: TextEncoderConfig, pad_token: int = 0):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = Tokenizer(cfg.context_length, pad_token=pad_token)

    @property
    def width(self) -> int:
        return self.cfg.width

    @property
    def context_length(self) -> int:
        return self.cfg.context_length

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def max_clip_skip(self) -> int:
        """The largest valid ``clip_skip``: the number of blocks run for the configured output layer."""
        return self.cfg.layers - (self.cfg.layer == "penultimate")

    def blocks_skipped(self, clip_skip: int) -> int:
        """How many of the last blocks ``clip_skip`` leaves out (the configured layer's, plus clip_skip - 1);
        ValueError unless clip_skip is an integer in [1, max_clip_skip]."""
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or (
                clip_skip != 1 and not 1 <= clip_skip <= self.max_clip_skip):
            raise ValueError(f"clip_skip={clip_skip!r} must be an integer from 1 to {max(self.max_clip_skip, 1)} "
                             f"(this text encoder has {self.cfg.layers} blocks, output layer {self.cfg.layer!r})")
        return clip_skip - 1 + (self.cfg.layer == "penultimate")

    def tokenize(self, prompts: str | list[str]) -> torch.Tensor:
        return self.tokenizer(prompts)  # (B, L)

    def encode(self, prompts: str | list[str], clip_skip: int = 1) -> torch.Tensor:
        """Prompts -> hidden states (B, L, width) on the module's device and in its dtype; longer prompts are cut
        to L tokens (:func:`~latentdiff.models.prompt_encoding.encode_prompt_batches` keeps them whole)."""
        tokens = self.tokenize(prompts)
        if self.device.type == "cuda":  # pinned + non_blocking: the copy does not make the host wait for the GPU
            tokens = tokens.pin_memory().to(self.device, non_blocking=True)
        return self(tokens.to(self.device), clip_skip=clip_skip)

    def unconditional(self, batch_size: int = 1) -> torch.Tensor:
        """The empty prompt's hidden states, encode([""]), repeated: (batch_size, L, width) for guidance."""
        return self.encode([""]).expand(batch_size, -1, -1)

    def freeze(self) -> TextEncoder:
        """Eval mode and no gradients (a frozen conditioning model, as in Stable Diffusion)."""
        self.eval()
        self.requires_grad_(False)
        return self

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        if tokens.dim() != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"tokens must have shape (B, L) with L <= {self.context_length}, "
                             f"got {tuple(tokens.shape)}")


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the GELU approximation of OpenAI CLIP (Radford et al. 2021)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class Block(nn.Module):
    """Pre-LN transformer block (GPT-2, CLIP): x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), activation(act), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln_1(x)).chunk(3, dim=-1)  # 3 x (B, L, W)
        x = x + self.proj(attention(q, k, v, self.heads, mask))  # (B, L, W)
        return x + self.mlp(self.ln_2(x))  # (B, L, W)


class TrainableTextEncoder(TextEncoder):
    """A CLIP-shaped causal text transformer trained from scratch with the diffusion model.

    Token embedding + learned positions, ``layers`` pre-LN blocks with a causal mask (token i sees tokens <= i,
    as in CLIP), final LayerNorm. ``layer="penultimate"`` skips the last block (it then gets no gradient), and
    ``clip_skip`` N skips N - 1 more.
    """

    def __init__(self, cfg: TextEncoderConfig, pad_token: int = 0):
        super().__init__(cfg, pad_token)
        W, L = cfg.width, cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, W)
        self.positional_embedding = nn.Parameter(torch.empty(L, W))
        self.blocks = nn.ModuleList(Block(W, cfg.heads, cfg.mlp_ratio, cfg.act) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(W)
        self.register_buffer("causal_mask", torch.ones(L, L, dtype=torch.bool).tril(), persistent=False)  # (L, L)
        self._init_weights()

    def _init_weights(self) -> None:
        """CLIP's initialisation (Radford et al. 2021, as in open_clip): residual projections scaled by depth."""
        W = self.cfg.width
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = W**-0.5 * (2 * self.cfg.layers) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.qkv.weight, std=W**-0.5)
            nn.init.normal_(block.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp[0].weight, std=(2 * W) ** -0.5)
            nn.init.normal_(block.mlp[2].weight, std=proj_std)
            for linear in (block.qkv, block.proj, block.mlp[0], block.mlp[2]):
                nn.init.zeros_(linear.bias)

    def forward(self, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """tokens (B, L) -> hidden states (B, L, width)."""
        self._check_tokens(tokens)
        skipped = self.blocks_skipped(clip_skip)
        B, L = tokens.shape
        x = self.token_embedding(tokens) + self.positional_embedding[:L]  # (B, L, W)
        mask = self.causal_mask[:L, :L].unsqueeze(0)  # (1, L, L), True = may attend
        for block in self.blocks[:len(self.blocks) - skipped]:
            x = block(x, mask)  # (B, L, W)
        return self.ln_final(x)  # (B, L, W)
