"""Weighted, chunked prompt encoding as AUTOMATIC1111 does it (``modules/sd_hijack_clip.py``, emphasis "Original").

    context, uncond = encode_prompt_batches(text_encoder, [prompts, negatives], clip_skip=1)  # (N, L*k, D) each

Notation: L = the encoder's context length (77 for CLIP), C = L - 2 tokens of text per chunk, k = chunks.

1. Each prompt is parsed and split into chunks of at most C tokens with one weight per token
   (:func:`latentdiff.models.prompts.prompt_chunks`: emphasis, BREAK, the move after the last comma).
2. Every row of every batch gets the same number of chunks k (the largest count of any prompt): short rows are padded
   with chunks of the empty prompt, so a prompt and its negative prompt give contexts of the same length.
3. Chunk i of each row is the row ``[START, tokens..., END, pad...]`` of L ids (weights 1 at start, end and pad),
   encoded on its own: z_i (B, L, D).
4. Emphasis ("Original"): z_i ← z_i · w, then z_i ← z_i · mean(z_i before) / mean(z_i · w), the means over the
   chunk's L × D values of one row. AUTOMATIC1111 takes that mean over the batch it encodes, which is one prompt at
   a time in its txt2img; per row keeps each image independent of its batch. Rows whose weights are all 1 are left
   untouched, so a prompt without emphasis that fits one chunk gives exactly ``text_encoder.encode(prompts)``.
5. The chunks are concatenated along the sequence: (B, L·k, D). The U-Net's cross-attention takes any length.
"""

from __future__ import annotations

import torch

from latentdiff.models.prompts import prompt_chunks
from latentdiff.models.tokenizer import COMMA_TOKEN


def chunk_prompts(encoder, prompts: list[str]) -> list[list[tuple[list[int], list[float]]]]:
    """Each prompt's chunks ``(tokens, weights)`` of at most ``encoder.context_length - 2`` BPE tokens."""
    tokenizer = encoder.tokenizer
    size = tokenizer.context_length - 2
    if size < 1:
        raise ValueError(f"context_length={tokenizer.context_length} leaves no room for text between start and end")
    cache: dict[str, list] = {}
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise TypeError(f"prompts must be strings, got {prompt!r:.200}")
        if prompt not in cache:
            cache[prompt] = prompt_chunks(prompt, tokenizer.encode, size, COMMA_TOKEN)
    return [cache[p] for p in prompts]


def encode_prompt_batches(encoder, batches: list[list[str]], clip_skip: int = 1) -> list[torch.Tensor]:
    """Hidden states of each batch of prompts, all of the same length: a list of (B_j, L·k, D) tensors on the
    encoder's device and in its dtype, k the largest chunk count over every prompt of every batch.

    Each batch is encoded as one call of the encoder per chunk (the rows of a batch together), so a batch of
    prompts without emphasis that fit one chunk gives ``encoder.encode(batch, clip_skip)`` bit for bit.
    """
    encoder.blocks_skipped(clip_skip)  # ValueError before any work
    chunked = [chunk_prompts(encoder, list(batch)) for batch in batches]
    k = max((len(chunks) for rows in chunked for chunks in rows), default=1)
    empty = ([], [])
    return [_encode_rows(encoder, [chunks + [empty] * (k - len(chunks)) for chunks in rows], k, clip_skip)
            for rows in chunked]


def _encode_rows(encoder, rows: list[list[tuple[list[int], list[float]]]], k: int, clip_skip: int) -> torch.Tensor:
    """rows[b][i] = chunk i of row b -> (B, L·k, D)."""
    tokenizer, device = encoder.tokenizer, encoder.device
    L = tokenizer.context_length
    zs = []
    for i in range(k):
        ids = torch.tensor([tokenizer.wrap(row[i][0]) for row in rows], dtype=torch.long, device=device)  # (B, L)
        weights = torch.tensor([[1.0, *row[i][1]] + [1.0] * (L - 1 - len(row[i][1])) for row in rows],
                               device=device)  # (B, L), float32
        zs.append(emphasis(encoder(ids, clip_skip=clip_skip), weights))  # (B, L, D)
    return torch.cat(zs, dim=1)  # (B, L·k, D)


def emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's "Original" emphasis per row: z · w rescaled to z's mean, computed in float32 and returned in
    z's dtype. z (B, L, D), weights (B, L); rows with every weight 1 are returned unchanged."""
    weighted = (weights != 1).any(dim=1)  # (B,)
    if not weighted.any():
        return z
    zf = z.float()
    original_mean = zf.mean(dim=(1, 2), keepdim=True)  # (B, 1, 1)
    scaled = zf * weights[:, :, None]  # (B, L, D)
    new_mean = scaled.mean(dim=(1, 2), keepdim=True)  # (B, 1, 1)
    ratio = torch.where(new_mean != 0, original_mean / new_mean, torch.ones_like(new_mean))  # (B, 1, 1)
    return torch.where(weighted[:, None, None], (scaled * ratio).to(z.dtype), z)  # (B, L, D)
