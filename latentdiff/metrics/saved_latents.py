"""A benchmark's sampled latents, saved beside its images and decoded again by another decoder.

A latent model's FID is bounded by its decoder, and a new decoder (a fine-tune of the autoencoder's decoder, as
Stable Diffusion's ft-MSE VAE) must be judged on what the diffusion model samples, not on reconstructions of real
images: a decoder can reconstruct test images better (lower rFID) yet turn sampled latents into worse images.
``latentdiff eval-t2i --save-latents`` keeps the latents it sampled; ``--from-latents DIR`` decodes them with the
``--ckpt`` model's decoder and scores the images, so two decoders see exactly the same latents and only the
decoding (seconds) is repeated, not the sampling.

Each generation batch is one ``DIR/latents-FIRST-LAST.safetensors`` (FIRST..LAST: its image indices) holding
``latents`` (N, C, h, w) float32 in the diffusion model's latent space, or ``codes`` (N, h, w) int64 for
VQ-Diffusion, and in its metadata the format, the kind (``kl`` / ``vq``), the first index, the KL latents' scaling
and shift factors, the model's name and hash, the benchmark settings and each image's generation parameters (the
PNG text, whose first line is the caption). A decoder whose autoencoder has other factors gets the latents
rescaled to its own (``(z / s + b - b') · s'``); the same factors leave them untouched, so decoding them with the
model that sampled them gives its images bit for bit.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentdiff.atomic import atomic_write

FORMAT = "latentdiff-sampled-latents/1"
_NAME = re.compile(r"latents-(\d+)-(\d+)\.safetensors")


def latent_kind(pipe) -> str:
    """``kl`` for a latent-diffusion pipeline, ``vq`` for VQ-Diffusion."""
    return "vq" if pipe.config.type == "vq_diffusion" else "kl"


def save_batch(folder: str | Path, first: int, pipe, latents: torch.Tensor, texts: list[str],
               settings: dict | None = None) -> Path:
    """Write the sampled ``latents`` of images ``first``..``first + N - 1`` (``texts``: their PNG parameters);
    an existing file is never overwritten."""
    if len(texts) != latents.shape[0]:
        raise ValueError(f"{latents.shape[0]} latents but {len(texts)} parameter texts")
    kind = latent_kind(pipe)
    meta = {"format": FORMAT, "kind": kind, "first": str(first), "model": pipe.name, "model_hash": pipe.model_hash,
            "settings": json.dumps(settings or {}), "parameters": json.dumps(texts, ensure_ascii=False)}
    if kind == "kl":
        cfg = pipe.autoencoder.cfg
        meta.update(scaling_factor=repr(float(cfg.scaling_factor)), shift_factor=repr(float(cfg.shift_factor)))
        tensors = {"latents": latents.detach().float().cpu().contiguous()}
    else:
        tensors = {"codes": latents.detach().long().cpu().contiguous()}
    from safetensors.torch import save

    path = Path(folder) / f"latents-{first:06d}-{first + len(texts) - 1:06d}.safetensors"
    with atomic_write(path, "wb", overwrite=False) as f:
        f.write(save(tensors, metadata=meta))
    return path


@dataclass
class SavedLatents:
    """The latents found in a folder, by image index."""

    folder: Path
    kind: str
    latents: dict[int, torch.Tensor] = field(default_factory=dict)
    texts: dict[int, str] = field(default_factory=dict)
    factors: dict[int, tuple[float, float]] = field(default_factory=dict)  # KL: (scaling, shift) of each image
    models: set[str] = field(default_factory=set)  # "name (hash)" of the models that sampled them
    settings: dict = field(default_factory=dict)  # the benchmark settings of the run that saved the first file

    def span(self) -> str:
        return f"{min(self.latents)}..{max(self.latents)}" if self.latents else "none"

    def check(self, pipe, first: int, captions: list[str]) -> None:
        """``ValueError`` unless images ``first``.. are all saved, for these ``captions``, and fit ``pipe``'s
        decoder (same kind, latent channels, codes within its codebook): checked before anything is written."""
        missing = [i for i in range(first, first + len(captions)) if i not in self.latents]
        if missing:
            raise ValueError(f"{self.folder} holds no latents for images {missing[0]}..{missing[-1]} (it holds "
                             f"{len(self.latents)}: images {self.span()}); pass the --start and --num-samples of "
                             "the run that saved them, or fewer")
        for i, caption in enumerate(captions, start=first):
            sampled_for = self.texts[i].split("\n", 1)[0]
            if sampled_for != caption:
                raise ValueError(f"the latents of image {i} were sampled for {sampled_for!r}, not {caption!r}: "
                                 "pass the --captions of the run that saved them")
        kind, example = latent_kind(pipe), self.latents[first]
        if kind != self.kind:
            raise ValueError(f"{self.folder} holds {'VQ code grids' if self.kind == 'vq' else 'KL latents'}; the "
                             f"model {pipe.name} has a {'VQ' if kind == 'vq' else 'KL'} autoencoder")
        if kind == "vq":
            size, top = pipe.vqvae.quantize.num_codes, max(int(self.latents[i].max()) for i in self.latents)
            if top >= size or min(int(self.latents[i].min()) for i in self.latents) < 0:
                raise ValueError(f"the saved codes reach {top}; the model {pipe.name}'s codebook has {size} codes")
        elif example.shape[0] != pipe.autoencoder.cfg.embed_dim:
            raise ValueError(f"the saved latents have {example.shape[0]} channels; the model {pipe.name}'s "
                             f"autoencoder takes {pipe.autoencoder.cfg.embed_dim}")

    def batch(self, first: int, n: int) -> tuple[torch.Tensor, list[str], list[tuple[float, float]]]:
        """The latents, parameter texts and (KL) factors of images ``first``..``first + n - 1`` (:meth:`check`)."""
        indices = range(first, first + n)
        return (torch.stack([self.latents[i] for i in indices]), [self.texts[i] for i in indices],
                [self.factors.get(i, (1.0, 0.0)) for i in indices])


def saved_indices(folder: str | Path) -> list[int]:
    """The image indices a folder's file names claim (nothing read; :func:`load_saved` checks them)."""
    folder = Path(folder)
    spans = [_NAME.fullmatch(p.name) for p in folder.iterdir()] if folder.is_dir() else []
    return sorted(i for m in spans if m for i in range(int(m.group(1)), int(m.group(2)) + 1))


def load_saved(folder: str | Path) -> SavedLatents:
    """Read every ``latents-*.safetensors`` of ``folder``; a damaged, foreign or overlapping file raises
    ``ValueError`` naming it."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of saved latents (eval-t2i --save-latents writes OUTDIR/latents)")
    files = sorted(p for p in folder.iterdir() if _NAME.fullmatch(p.name))
    if not files:
        raise ValueError(f"{folder} holds no latents-*.safetensors files")
    saved = None
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, not {FORMAT!r}")
            kind, first, texts = meta["kind"], int(meta["first"]), json.loads(meta["parameters"])
            values = tensors["latents" if kind == "kl" else "codes"]
            factors = (float(meta["scaling_factor"]), float(meta["shift_factor"])) if kind == "kl" else None
        except ValueError as e:
            raise ValueError(f"{path} is not a saved-latents file: {e}") from None
        except (KeyError, OSError, RuntimeError, SafetensorError) as e:
            raise ValueError(f"{path} is damaged or not a saved-latents file ({type(e).__name__}: {e})") from None
        if values.dim() != (4 if kind == "kl" else 3) or values.shape[0] != len(texts):
            raise ValueError(f"{path}: {tuple(values.shape)} latents for {len(texts)} images")
        named = tuple(int(g) for g in _NAME.fullmatch(path.name).groups())
        if named != (first, first + len(texts) - 1):
            raise ValueError(f"{path} holds images {first}..{first + len(texts) - 1}, not those of its name")
        if saved is None:
            saved = SavedLatents(folder, kind, settings=json.loads(meta.get("settings", "{}")))
        elif kind != saved.kind or values.shape[1:] != next(iter(saved.latents.values())).shape:
            raise ValueError(f"{path} holds {kind} latents {tuple(values.shape[1:])}, unlike the files before it")
        for j, (z, text) in enumerate(zip(values, texts)):
            if first + j in saved.latents:
                raise ValueError(f"image {first + j} is in two files of {folder} (the second: {path.name})")
            saved.latents[first + j], saved.texts[first + j] = z, text
            if factors is not None:
                saved.factors[first + j] = factors
        saved.models.add(f"{meta.get('model', '')} ({meta.get('model_hash', '')})")
    return saved


def decode_batch(pipe, saved: SavedLatents, first: int, n: int) -> tuple[torch.Tensor, list[str]]:
    """(images (n, 3, H, W) float32, PNG texts) of the saved images ``first``.., decoded by ``pipe``'s decoder
    (:meth:`SavedLatents.check` them first); the texts name it as the VAE, as AUTOMATIC1111 does."""
    latents, texts, factors = saved.batch(first, n)
    if latent_kind(pipe) == "kl":
        cfg = pipe.autoencoder.cfg
        own = (float(cfg.scaling_factor), float(cfg.shift_factor))
        if any(f != own for f in factors):
            s, b = torch.tensor(factors, dtype=torch.float64).T.view(2, -1, 1, 1, 1)
            latents = ((latents.double() / s + b - own[1]) * own[0]).float()  # the same latents, its own scaling
    vae = f", VAE hash: {pipe.model_hash}, VAE: {pipe.name}"
    return pipe.decode_output(latents), [text + vae for text in texts]
