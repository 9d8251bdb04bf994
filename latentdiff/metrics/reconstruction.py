"""Reconstruction quality of an autoencoder: rFID, PSNR and (VQ) codebook use, the floor of a latent model.

    ae = load_autoencoder("default")                     # KL autoencoder of the embedded latent-diffusion model
    images = read_images("cifar10-test.tar.gz")          # uint8 (N, 3, H, W) and names
    recon, codes = reconstruct_all(ae, images.pixels)    # uint8 (N, 3, H, W), codes (N, h, w) or None
    psnr_report(images.pixels, recon)                    # {"psnr": mean per-image dB, "mse": ...}
    stats = image_statistics(recon, features)            # Inception statistics, then fid(stats, reference)

A latent diffusion model samples latents and decodes them, so its FID cannot beat the FID of decode(encode(x)) on
real images x (rFID, as in Rombach et al., 2022, Table 8, and Esser et al., 2021): the reconstruction floor.

Reconstruction: the KL autoencoder decodes the posterior mode, x̂ = D(μ(x)) (no sampling: deterministic); the VQ
autoencoder decodes the nearest codes, x̂ = D(e[argmin_k ||E(x) − e_k||]). x̂ is clamped to [-1, 1] and rounded to
uint8 exactly as saved images are (latentdiff.io.images.to_pil), so rFID scores what a PNG of it would score.

PSNR of an image pair on the 0..255 scale: PSNR = 10 log10(255² / MSE), MSE over all H·W·3 values; reported as the
mean of the per-image values (the convention of taming-transformers and the LDM paper) and as the PSNR of the
mean MSE. An exact reconstruction has MSE 0 and PSNR +inf.

Codebook use of a VQ autoencoder over all codes of all images: with n_k the count of code k among M codes and
p_k = n_k / M, usage = |{k: n_k > 0}| / K and perplexity = exp(−Σ p_k log p_k) (K when all codes are equally used,
1 when one code is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from latentdiff.assets import EMBEDDED_MODELS
from latentdiff.data.decode import decode_image
from latentdiff.data.image_sources import SourceError, open_image_source, select_samples, selection_text
from latentdiff.io.checkpoint import CheckpointError, load_into, load_model_file
from latentdiff.io.formats import detect_format
from latentdiff.metrics.fid import Features, FeatureStatistics
from latentdiff.metrics.frechet import RunningMoments
from latentdiff.metrics.inception import RESIZE_METHOD, resize_for_inception
from latentdiff.models.autoencoder_kl import AutoencoderKL
from latentdiff.models.vqvae import VQAutoencoder


@dataclass
class Autoencoder:
    """An autoencoder to score: ``kind`` "kl" or "vq", the network, where it came from."""

    name: str
    kind: str
    network: torch.nn.Module
    source: str

    @property
    def factor(self) -> int:
        return self.network.downsample_factor

    def latent_shape(self, size: int) -> str:
        """The latent of a ``size``² image: "C×h×w" (KL) or "h×w codes of K" (VQ)."""
        h = size // self.factor
        if self.kind == "kl":
            return f"{self.network.latent_channels}x{h}x{h}"
        return f"{h}x{h} codes of {self.network.cfg.num_codes}"

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.network.parameters())

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images (B, 3, H, W) in [-1, 1] -> (x̂ (B, 3, H, W) unclamped, codes (B, h, w) long or None)."""
        if self.kind == "kl":
            return self.network.decode(self.network.encode(x)), None
        codes = self.network.encode_to_codes(x)  # (B, h, w)
        return self.network.decode_codes(codes), codes


def load_autoencoder(spec: str | Path, device: str | torch.device = "cpu") -> Autoencoder:
    """The autoencoder of a model: ``"default"``/``"default-vq"`` (the embedded models), a latentdiff model file
    (a pipeline's, or an autoencoder run's model.safetensors holding only ``autoencoder.``/``vqvae.`` tensors), or
    any checkpoint :func:`latentdiff.load_pipeline` reads (its ``autoencoder``). Float32, eval mode, on ``device``.
    Raises :class:`CheckpointError` (a ValueError) naming what is wrong."""
    name = str(spec)
    path = EMBEDDED_MODELS[name] if name in EMBEDDED_MODELS else Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such model file or folder")
    if detect_format(path) == "latentdiff":
        cfg, parts, _ = load_model_file(path)
        if "autoencoder" in parts:
            kind, network, state = "kl", AutoencoderKL(cfg.autoencoder), parts["autoencoder"]
        elif "vqvae" in parts:
            kind, network, state = "vq", VQAutoencoder(cfg.vqvae), parts["vqvae"]
        else:
            raise CheckpointError(f"{path}: no autoencoder in this model file (components {sorted(parts)})")
        load_into(network, {k: v.float() for k, v in state.items()}, kind.upper() + " autoencoder")
    else:
        from latentdiff.pipelines.load import load_pipeline

        network = load_pipeline(path).autoencoder
        kind = "vq" if isinstance(network, VQAutoencoder) else "kl"
    return Autoencoder(name, kind, network.float().to(device).eval(), str(path))


@dataclass
class Images:
    """Decoded images of a source: uint8 pixels (N, 3, H, W), their names, and how they were chosen."""

    pixels: torch.Tensor
    names: list[str]
    description: str
    selection: str


def read_images(spec: str | Path, num_samples: int | None = None, subset: str = "random", seed: int = 0,
                progress: bool = False) -> Images:
    """Decode the selected images of a source (folder, archive, shards: latentdiff.data.image_sources) into memory.
    All must be the same size; ``SourceError`` for an unreadable image or mixed sizes (a reconstruction floor is
    measured on every image, none skipped)."""
    source = open_image_source(spec)
    total = source.count()
    selection = select_samples(total, num_samples, subset, seed)
    chosen = None if selection is None else {int(i) for i in selection}
    stop = None if selection is None else int(selection[-1]) + 1
    arrays, names = [], []
    samples = source.iter_samples(lambda i: chosen is None or i in chosen, stop)
    for _, sample in tqdm(samples, total=len(chosen or ()) or total, desc="reading", unit="img",
                          disable=not progress, mininterval=5.0):
        if sample.image is None:
            raise SourceError(f"{sample.name}: unreadable ({sample.error})")
        try:
            array = np.asarray(decode_image(sample.image), dtype=np.uint8)  # (H, W, 3)
        except Exception as err:  # DecodeError, and whatever a decoder raises
            raise SourceError(f"{sample.name}: unreadable image ({err})") from None
        if arrays and array.shape != arrays[0].shape:
            raise SourceError(f"{sample.name}: size {array.shape[1]}x{array.shape[0]} differs from the first "
                              f"image's {arrays[0].shape[1]}x{arrays[0].shape[0]}; all images must be the same size")
        arrays.append(array)
        names.append(sample.name)
    if not arrays:
        raise SourceError(f"{source.description}: no images selected")
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8
    return Images(pixels, names, source.description, selection_text(selection, total, subset, seed))


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (clamped) -> uint8 on the 0..255 scale, rounded as saved images are."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def reconstruct_all(autoencoder: Autoencoder, pixels: torch.Tensor, batch_size: int = 100,
                    progress: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 images (N, 3, H, W) -> uint8 reconstructions (N, 3, H, W) and codes (N, h, w) (VQ) or None."""
    N, C, H, W = pixels.shape
    f = autoencoder.factor
    if H % f or W % f:
        raise ValueError(f"{autoencoder.name}: images are {W}x{H}, not multiples of its downsampling factor {f}")
    device = next(autoencoder.network.parameters()).device
    out, codes = [], []
    for i in tqdm(range(0, N, batch_size), desc=f"reconstructing ({autoencoder.name})", unit="batch",
                  disable=not progress, mininterval=5.0):
        x = pixels[i:i + batch_size].to(device).float().div(127.5).sub(1.0)  # (b, 3, H, W) in [-1, 1]
        recon, batch_codes = autoencoder.reconstruct(x)
        out.append(to_uint8(recon).cpu())
        if batch_codes is not None:
            codes.append(batch_codes.cpu())
    return torch.cat(out), (torch.cat(codes) if codes else None)


def psnr_values(original: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (N,) float64 of uint8 images (N, 3, H, W): 10 log10(255² / MSE); +inf where equal."""
    if original.shape != recon.shape:
        raise ValueError(f"shapes differ: {tuple(original.shape)} vs {tuple(recon.shape)}")
    diff = original.double() - recon.double()  # (N, 3, H, W)
    mse = diff.pow(2).flatten(1).mean(dim=1)  # (N,)
    return 10 * torch.log10(255.0**2 / mse)  # 1/0 = inf: an exact reconstruction


def psnr_report(original: torch.Tensor, recon: torch.Tensor) -> dict:
    """``{"psnr": mean per-image dB, "psnr_of_mean_mse": dB, "mse": mean MSE on 0..255}`` of uint8 image sets."""
    values = psnr_values(original, recon)
    mse = (original.double() - recon.double()).pow(2).mean().item()
    return {"psnr": values.mean().item(), "psnr_of_mean_mse": 10 * math.log10(255.0**2 / mse) if mse else math.inf,
            "mse": mse}


def codebook_report(codes: torch.Tensor, num_codes: int) -> dict:
    """``{"codes_used", "usage", "perplexity"}`` of code indices (any shape) from a codebook of ``num_codes``."""
    counts = torch.bincount(codes.flatten(), minlength=num_codes).double()  # (K,)
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    used = int((counts > 0).sum())
    return {"codes_used": used, "num_codes": num_codes, "usage": used / num_codes, "perplexity": math.exp(entropy)}


@torch.no_grad()
def image_statistics(pixels: torch.Tensor, features: Features, description: str, batch_size: int = 50,
                     device: str | torch.device = "cpu", progress: bool = False) -> FeatureStatistics:
    """FID statistics of uint8 images (N, 3, H, W): the documented resize (latentdiff.metrics.inception), then the
    feature extractor, moments in float64 (as latentdiff.metrics.fid.compute_statistics does for a source)."""
    model = features.load()
    moments = None
    for i in tqdm(range(0, len(pixels), batch_size), desc=f"features ({description})", unit="batch",
                  disable=not progress, mininterval=5.0):
        batch = [resize_for_inception(Image.fromarray(img.permute(1, 2, 0).numpy()))
                 for img in pixels[i:i + batch_size]]  # b x (3, 299, 299) on the 0..255 scale
        x = torch.from_numpy(np.stack(batch) / np.float32(255.0))  # (b, 3, 299, 299) in [0, 1]
        feats = model(x.to(device)).double().cpu().numpy()  # (b, D)
        if moments is None:
            moments = RunningMoments(feats.shape[1])
        moments.update(feats)
    if moments is None or moments.count < 2:
        raise ValueError(f"{description}: FID needs at least 2 images")
    meta = {"source": description, "count": moments.count, "resize": RESIZE_METHOD, "feature_extractor": features.name}
    return FeatureStatistics(moments.mean, moments.covariance(), moments.count, meta)


def fid_subset(count: int, fid_samples: int | None, seed: int) -> np.ndarray:
    """Positions (sorted) of the images whose reconstructions rFID scores: all, or ``fid_samples`` at random."""
    if fid_samples is None or fid_samples >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=fid_samples, replace=False))
