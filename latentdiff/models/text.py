"""Text encoders and the CLIP BPE tokenizer.

Every encoder maps prompts to a sequence of hidden states, the U-Net's cross-attention ``context``:

    encoder = build_text_encoder(TextEncoderConfig(type="trainable", width=512, layers=6, heads=8))
    context = encoder.encode(["a photo of a cat", ""])  # (2, 77, 512)

Types (``TextEncoderConfig.type``):

- ``trainable``: our own small causal transformer (CLIP's text tower shape), trained with the diffusion model.
- ``clip``: a transformers ``CLIPTextModel`` (Stable Diffusion 1.x), in :mod:`latentdiff.models.text_clip`.
- ``openclip``: the OpenCLIP text tower (Stable Diffusion 2.x), in :mod:`latentdiff.models.text_clip`.

All share the CLIP BPE vocabulary (49,408 tokens; start 49406, end 49407) through :class:`Tokenizer`.
``layer="penultimate"`` runs every block but the last and then the final LayerNorm, as Stable Diffusion 2 does.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch
import torch.nn as nn

from latentdiff.config import TextEncoderConfig
from latentdiff.models.attention import attention

START_TOKEN = 49406  # <|startoftext|>
END_TOKEN = 49407  # <|endoftext|>


@lru_cache(maxsize=1)
def _bpe():
    """open_clip's SimpleTokenizer: the CLIP BPE merges shipped inside open_clip_torch (no download)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


class Tokenizer:
    """CLIP BPE tokenizer: ``prompts -> LongTensor (B, context_length)``.

    Ids equal open_clip's ``SimpleTokenizer`` and transformers' ``CLIPTokenizer``: ``[START, bpe..., END, pad...]``.
    ``pad_token`` is 0 in open_clip (Stable Diffusion 2.x) and :data:`END_TOKEN` in the transformers tokenizer
    used by Stable Diffusion 1.x. Longer prompts keep their first ``context_length - 2`` tokens (the end token
    stays last) and a warning names the dropped words.
    """

    def __init__(self, context_length: int = 77, pad_token: int = 0):
        if context_length < 2:
            raise ValueError(f"context_length={context_length} must be >= 2 (start and end tokens)")
        if not 0 <= pad_token <= END_TOKEN:
            raise ValueError(f"pad_token={pad_token} must be a token id in [0, {END_TOKEN}]")
        self.context_length = context_length
        self.pad_token = pad_token
        self._bpe = _bpe()
        # training encodes the same few captions every step: BPE is pure Python (~0.1 ms per caption)
        self._encode_cached = lru_cache(maxsize=2**16)(lambda prompt: tuple(self._bpe.encode(prompt)))

    def encode(self, prompt: str) -> list[int]:
        """BPE ids of one prompt, without start/end tokens and without truncation (memoised per prompt)."""
        return list(self._encode_cached(prompt))

    def decode(self, ids) -> str:
        """Text of a sequence of ids; the start token is skipped and decoding stops at the end token."""
        ids = [int(i) for i in ids]
        if END_TOKEN in ids:
            ids = ids[: ids.index(END_TOKEN)]
        return self._bpe.decode([i for i in ids if i != START_TOKEN]).strip()

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a string or a list of strings, got {prompts!r:.200}")
        keep = self.context_length - 2
        rows = []
        for prompt in prompts:
            bpe = self._encode_cached(prompt)
            if len(bpe) > keep:
                dropped = self._bpe.decode(bpe[keep:]).strip()
                warnings.warn(f'prompt truncated to {self.context_length} tokens; dropped: "{dropped}"',
                              stacklevel=2)
                bpe = bpe[:keep]
            row = [START_TOKEN, *bpe, END_TOKEN]
            rows.append(row + [self.pad_token] * (self.context_length - len(row)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(prompts), self.context_length)  # (B, L)

    @staticmethod
    def lengths(ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B,) number of real tokens, start and end included (the end token's index + 1)."""
        return (ids == END_TOKEN).int().argmax(dim=1) + 1


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

    def tokenize(self, prompts: str | list[str]) -> torch.Tensor:
        return self.tokenizer(prompts)  # (B, L)

    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        """Prompts -> hidden states (B, L, width) on the module's device and in its dtype."""
        return self(self.tokenize(prompts).to(self.device))

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
    as in CLIP), final LayerNorm. ``layer="penultimate"`` skips the last block (it then gets no gradient).
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

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) -> hidden states (B, L, width)."""
        self._check_tokens(tokens)
        B, L = tokens.shape
        x = self.token_embedding(tokens) + self.positional_embedding[:L]  # (B, L, W)
        mask = self.causal_mask[:L, :L].unsqueeze(0)  # (1, L, L), True = may attend
        blocks = self.blocks[:-1] if self.cfg.layer == "penultimate" else self.blocks
        for block in blocks:
            x = block(x, mask)  # (B, L, W)
        return self.ln_final(x)  # (B, L, W)


def default_pad_token(cfg: TextEncoderConfig) -> int:
    """The padding each encoder was trained with: OpenAI CLIP as used by Stable Diffusion 1.x (``clip`` with
    ``quick_gelu``) pads with the end token (transformers' tokenizer); OpenCLIP-trained towers (``openclip``, or
    ``clip`` with ``gelu`` as in diffusers' Stable Diffusion 2 folders) and our own encoder pad with 0."""
    return END_TOKEN if cfg.type == "clip" and cfg.act == "quick_gelu" else 0


def build_text_encoder(cfg: TextEncoderConfig, pad_token: int | None = None) -> TextEncoder:
    """Build the encoder named by ``cfg.type``; ``pad_token=None`` picks :func:`default_pad_token`."""
    pad = default_pad_token(cfg) if pad_token is None else pad_token
    if cfg.type == "trainable":
        return TrainableTextEncoder(cfg, pad)
    from latentdiff.models.text_clip import CLIPTextEncoder, OpenCLIPTextEncoder

    if cfg.type == "clip":
        return CLIPTextEncoder(cfg, pad)
    if cfg.type == "openclip":
        return OpenCLIPTextEncoder(cfg, pad)
    raise ValueError(f"text_encoder.type={cfg.type!r} is not one of ['trainable', 'clip', 'openclip']")
