"""Packing a trained model file for shipping: a fine-tuned decoder swapped in, a caption vocabulary to keep.

    name = swap_decoder(parts, other_parts, "runs/decoder_ft/model.safetensors")   # in place
    ids = vocabulary_ids(cfg.text_encoder, captions)   # rows of the token embedding to store exactly

``latentdiff pack-model`` (:mod:`latentdiff.cli.pack_model`) puts these together with float16 weights, a name and
config changes; :func:`~latentdiff.io.checkpoint.save_model_file` stores the kept rows (``keep_rows``).
"""

from __future__ import annotations

import torch

from latentdiff.config import TextEncoderConfig
from latentdiff.models.autoencoder_blocks import DECODER_SIDE
from latentdiff.models.tokenizer import Tokenizer, default_pad_token

AUTOENCODERS = ("autoencoder", "vqvae")  # component names of the autoencoder in a model file
Parts = dict[str, dict[str, torch.Tensor]]


def _decoder_side(key: str) -> bool:
    return key.split(".", 1)[0] in DECODER_SIDE


def swap_decoder(parts: Parts, other: Parts, source: str) -> str:
    """Replace, in place, the decoder side of ``parts``' autoencoder by that of ``other`` (the parts of the model
    file ``source``), whose encoder side must equal ours (to the lower of the two precisions): the diffusion model
    knows only those latents. Returns the autoencoder's component name; ``ValueError`` says what does not fit."""
    names = [n for n in AUTOENCODERS if n in parts and n in other]
    if not names:
        raise ValueError(f"--decoder {source} and the source share no autoencoder component "
                         f"({sorted(other)} vs {sorted(parts)})")
    name = names[0]
    ours, theirs = parts[name], other[name]
    if set(ours) != set(theirs) or any(ours[k].shape != theirs[k].shape for k in ours):
        raise ValueError(f"--decoder {source}: its {name} has other tensors or shapes than the source's")
    for key in ours:
        if _decoder_side(key):
            continue
        a, b = ours[key], theirs[key]
        low = a.dtype if a.element_size() <= b.element_size() else b.dtype
        if not torch.equal(a.to(low), b.to(low)):
            raise ValueError(f"--decoder {source}: its encoder side differs from the source's ({name}.{key}); "
                             f"train the decoder with objective.train_decoder_only=true from the source")
    parts[name] = {k: (theirs[k].to(v.dtype) if _decoder_side(k) else v) for k, v in ours.items()}
    return name


def vocabulary_ids(text_encoder_cfg: TextEncoderConfig, captions: list[str]) -> torch.Tensor:
    """Sorted ids of every token the model's tokenizer gives for ``captions`` and for the empty caption."""
    tokenizer = Tokenizer(text_encoder_cfg.context_length, pad_token=default_pad_token(text_encoder_cfg))
    ids = {int(i) for i in tokenizer("")[0]}
    for caption in sorted(set(captions)):
        ids.update(int(i) for i in tokenizer(caption)[0])
    return torch.tensor(sorted(ids), dtype=torch.long)
