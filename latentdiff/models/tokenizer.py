"""The CLIP BPE tokenizer every text encoder uses, its special tokens, and each encoder family's padding.

    tokenizer = Tokenizer(context_length=77, pad_token=0)
    ids = tokenizer(["a photo of a cat", ""])  # (2, 77) long: [START, bpe..., END, pad...]

All encoders share the CLIP BPE vocabulary (49,408 tokens; start 49406, end 49407), read from the merges shipped
inside open_clip_torch (no download).
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import torch

from latentdiff.config import TextEncoderConfig

START_TOKEN = 49406  # <|startoftext|>
END_TOKEN = 49407  # <|endoftext|>
COMMA_TOKEN = 267  # ",</w>"


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
            rows.append(self.wrap(bpe))
        return torch.tensor(rows, dtype=torch.long).reshape(len(prompts), self.context_length)  # (B, L)

    def wrap(self, bpe) -> list[int]:
        """BPE ids (at most context_length - 2) -> one row ``[START, bpe..., END, pad...]`` of context_length ids."""
        if len(bpe) > self.context_length - 2:
            raise ValueError(f"{len(bpe)} tokens do not fit a row of {self.context_length} with start and end")
        row = [START_TOKEN, *bpe, END_TOKEN]
        return row + [self.pad_token] * (self.context_length - len(row))

    @staticmethod
    def lengths(ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B,) number of real tokens, start and end included (the end token's index + 1)."""
        return (ids == END_TOKEN).int().argmax(dim=1) + 1


def default_pad_token(cfg: TextEncoderConfig) -> int:
    """The padding each encoder was trained with: OpenAI CLIP as used by Stable Diffusion 1.x (``clip`` with
    ``quick_gelu``) pads with the end token (transformers' tokenizer); OpenCLIP-trained towers (``openclip``, or
    ``clip`` with ``gelu`` as in diffusers' Stable Diffusion 2 folders) and our own encoder pad with 0."""
    return END_TOKEN if cfg.type == "clip" and cfg.act == "quick_gelu" else 0
