"""CLIP score of image–caption pairs with an open_clip model.

CLIP score (Hessel et al., 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning", Eq. 1,
with w = 100 as torchmetrics' ``CLIPScore`` documents it) of a pair is

    score(I, C) = 100 · max(cos(E_I, E_C), 0)

with E_I, E_C the image and text embeddings; a set's score is the mean over pairs. (torchmetrics' code clamps the
mean instead of each pair; the two agree whenever no cosine is negative, as with any trained CLIP model.)

Images go through the model's own preprocessing (open_clip: resize, centre crop, normalise); tensors in [0, 1]
are first quantised to uint8 PIL images, so a tensor and the PIL image it came from score the same.

Weights come from a local file (``weights``: a .safetensors/.bin/.pt state dict, loaded with weights_only=True by
open_clip) or from an open_clip pretrained tag found in the local cache (Hugging Face hub cache, or ~/.cache/clip
for URL-hosted ones). Nothing is downloaded unless ``allow_download=True``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from latentdiff.data.decode import decode_image
from latentdiff.data.image_sources import (
    FolderSource,
    Sample,
    SampleStream,
    SourceError,
    TarSource,
    select_samples,
    selection_text,
)


class ClipWeightsError(RuntimeError):
    """No usable CLIP weights; the message says how to provide them."""


def _as_pil(images: torch.Tensor | Sequence[Image.Image]) -> list[Image.Image]:
    if isinstance(images, torch.Tensor):
        B, C, H, W = images.shape
        if C != 3:
            raise ValueError(f"images must be (B, 3, H, W) RGB, got {tuple(images.shape)}")
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)  # (B, 3, H, W)
        return [Image.fromarray(a) for a in pixels.permute(0, 2, 3, 1).cpu().numpy()]  # B x (H, W, 3)
    return [image.convert("RGB") for image in images]


@torch.no_grad()
def clip_score_from_pixels(
    pixels: torch.Tensor, captions: Sequence[str], model: torch.nn.Module, tokenizer
) -> torch.Tensor:
    """Per-pair scores (B,) of preprocessed images (B, 3, h, w) and their captions."""
    B = pixels.shape[0]
    if len(captions) != B:
        raise ValueError(f"{B} images but {len(captions)} captions")
    device = next(model.parameters()).device
    image_emb = model.encode_image(pixels.to(device)).float()  # (B, E)
    text_emb = model.encode_text(tokenizer(list(captions)).to(device)).float()  # (B, E)
    return 100.0 * F.cosine_similarity(image_emb, text_emb, dim=-1).clamp(min=0)  # (B,)


def clip_score(
    images: torch.Tensor | Sequence[Image.Image],
    captions: Sequence[str],
    model: torch.nn.Module,
    preprocess,
    tokenizer,
) -> torch.Tensor:
    """Per-pair CLIP scores (B,) in [0, 100]: images (B, 3, H, W) float in [0, 1] or a list of PIL images."""
    pil = _as_pil(images)
    if len(pil) != len(captions):
        raise ValueError(f"{len(pil)} images but {len(captions)} captions")
    pixels = torch.stack([preprocess(image) for image in pil])  # (B, 3, h, w)
    return clip_score_from_pixels(pixels, captions, model, tokenizer)


def cached_pretrained(model_name: str, tag: str) -> str | None:
    """Local path of open_clip's pretrained ``tag`` for ``model_name`` if already downloaded, else None."""
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        raise ValueError(f"open_clip has no pretrained tag {tag!r} for {model_name!r} (open_clip.list_pretrained())")
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])
        names = [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME] if not filename else [filename]
        for name in names:
            path = try_to_load_from_cache(repo, name)
            if isinstance(path, str):  # else None or a "known missing" marker
                return path
    if cfg.get("url"):
        path = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if path.is_file():
            return str(path)
    return None


def load_clip(
    model_name: str = "ViT-B-32",
    pretrained: str | None = "laion2b_s34b_b79k",
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    allow_download: bool = False,
):
    """Return (model, preprocess, tokenizer, description) for a local weights file or a cached pretrained tag."""
    if model_name not in open_clip.list_models():
        raise ValueError(f"unknown open_clip model {model_name!r} (see open_clip.list_models())")
    preprocess_cfg = {}
    if weights is not None:
        if not Path(weights).is_file():
            raise ClipWeightsError(f"CLIP weights file not found: {weights}")
        checkpoint, description = str(weights), f"{model_name} from {weights}"
    elif pretrained is not None:
        checkpoint, description = cached_pretrained(model_name, pretrained), f"{model_name} {pretrained}"
        cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        preprocess_cfg = {  # a file path loses the tag's preprocessing settings: pass them explicitly
            f"image_{k}": cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg
        }
        if checkpoint is None:
            if not allow_download:
                raise ClipWeightsError(
                    f"the weights of {model_name} {pretrained} are not in the local cache and downloading is off: "
                    "pass --weights PATH (.safetensors/.bin state dict) or rerun with --allow-download"
                )
            checkpoint = pretrained
    else:
        raise ValueError("pass a pretrained tag or a weights file: a randomly initialised CLIP scores nothing")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=checkpoint, device=device, weights_only=True, **preprocess_cfg
        )
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as err:  # open_clip raises RuntimeError/KeyError/OSError/... for bad or foreign checkpoints
        raise ClipWeightsError(f"cannot load {description}: {type(err).__name__}: {err}") from err
    model.eval()
    return model, preprocess, tokenizer, description


def caption_of(sample: Sample, image: Image.Image) -> str | None:
    """The sample's .txt caption, else the first line of a PNG ``parameters`` text chunk, else None.

    ``image`` is the decoded image (latentdiff.data.decode.decode_image), which keeps the PNG's text chunks in
    ``info``.
    """
    if sample.caption:
        return sample.caption
    parameters = image.info.get("parameters")  # AUTOMATIC1111-style generation parameters
    if not isinstance(parameters, str) or not parameters.strip():
        return None
    return parameters.strip().splitlines()[0].strip()


class ClipInput:
    """DataLoader transform: Sample -> (name, preprocessed image (3, h, w) or None, caption or None, error)."""

    def __init__(self, preprocess):
        self.preprocess = preprocess

    def __call__(self, sample: Sample):
        if sample.image is None:
            return sample.name, None, None, sample.error
        try:
            image = decode_image(sample.image)
            caption = caption_of(sample, image)
            pixels = self.preprocess(image)
        except Exception as err:  # decoders raise OSError, ValueError, SyntaxError, DecompressionBombError...
            return sample.name, None, None, f"{type(err).__name__}: {err}"
        return sample.name, pixels, caption, None if caption else "no caption"


def _collate(items):
    """-> (pixels (B, 3, h, w) or None, captions, failures [(name, reason)])."""
    good = [(pixels, caption) for _, pixels, caption, error in items if error is None]
    failures = [(name, error) for name, _, _, error in items if error is not None]
    pixels = torch.stack([p for p, _ in good]) if good else None
    return pixels, [c for _, c in good], failures


def score_source(
    source: FolderSource | TarSource,
    model: torch.nn.Module,
    preprocess,
    tokenizer,
    *,
    num_samples: int | None = None,
    subset: str = "random",
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
) -> tuple[torch.Tensor, list[tuple[str, str]], str]:
    """Per-pair scores (N,) of an opened source, the skipped samples [(name, reason)] and the selection text."""
    needs_total = isinstance(source, FolderSource) or (num_samples is not None and subset == "random")
    total = source.count() if needs_total else None
    selection = select_samples(total, num_samples, subset, seed)
    loader = DataLoader(
        SampleStream(source, selection, ClipInput(preprocess), captions=True),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    scores, failures = [], []
    expected = len(selection) if selection is not None else total
    with tqdm(total=expected, unit="pair", disable=not progress, desc="CLIP", mininterval=5.0) as bar:
        for pixels, captions, failed in loader:
            failures += failed
            if pixels is not None:
                scores.append(clip_score_from_pixels(pixels, captions, model, tokenizer).cpu())
            bar.update(len(failed) + len(captions))
    if not scores:
        raise SourceError(f"{source.description}: no scorable image–caption pairs ({len(failures)} skipped)")
    return torch.cat(scores), failures, selection_text(selection, total, subset, seed)
