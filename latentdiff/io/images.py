"""Generated images as files: tensors to PIL images, the AUTOMATIC1111 ``parameters`` text that records how an
image was made (:class:`GenerationParams`, :func:`parse_parameters`), PNGs that carry it and never overwrite, and
sample grids."""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from latentdiff.atomic import atomic_write

# Our sampler ids (diffusion.samplers.SAMPLERS) -> the names AUTOMATIC1111 writes in its ``parameters`` text.
SAMPLER_LABELS = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras",
                  "euler_a": "Euler a"}
_LABEL_IDS = {label: sampler for sampler, label in SAMPLER_LABELS.items()}


def sampler_label(sampler: str) -> str:
    """The AUTOMATIC1111 name of one of our sampler ids ("euler_a" -> "Euler a"); other names are kept as they are."""
    return SAMPLER_LABELS.get(sampler, sampler)


def sampler_id(name: str) -> str:
    """Our sampler id for an AUTOMATIC1111 name or for an id ("Euler a" and "euler_a" -> "euler_a"); a name neither
    knows (another program's sampler, "VQ-Diffusion") is kept as it is."""
    return _LABEL_IDS.get(name, name)


@dataclass
class GenerationParams:
    """What produced an image; ``to_text`` writes the AUTOMATIC1111 ``parameters`` format (``sampler`` holds our
    sampler id, written as AUTOMATIC1111 names it: ``Sampler: Euler a`` for ``euler_a``)."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    scale: float
    seed: int
    width: int
    height: int
    eta: float = 0.0
    model: str = ""
    denoising_strength: float | None = None  # img2img only
    model_hash: str = ""  # AUTOMATIC1111's short hash of the model file: the first 10 hex digits of its SHA-256
    clip_skip: int = 1  # 1 = the text encoder's own output layer; written only when > 1
    loras: tuple = ()  # (name, scale, short hash) of each LoRA applied
    mask_blur: float | None = None  # inpainting only: the mask's blur in pixels, written even when 0
    guidance_rescale: float = 0.0  # guidance rescale φ (Lin et al. 2024); written only when > 0
    guidance_interval: tuple[float, float] | None = None  # (σ_lo, σ_hi] of the guided steps, when limited
    deepcache: tuple[int, int] | None = None  # DeepCache (interval, branch) when it was on

    def to_text(self) -> str:
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        fields = [f"Steps: {self.steps}", f"Sampler: {sampler_label(self.sampler)}", f"CFG scale: {self.scale:g}",
                  f"Seed: {self.seed}", f"Size: {self.width}x{self.height}"]
        if self.eta:
            fields.append(f"Eta: {self.eta:g}")
        if self.model_hash:
            fields.append(f"Model hash: {self.model_hash}")
        if self.model:
            fields.append(f"Model: {self.model}")
        if self.denoising_strength is not None:
            fields.append(f"Denoising strength: {self.denoising_strength:g}")
        if self.mask_blur is not None:
            fields.append(f"Mask blur: {self.mask_blur:g}")
        if self.clip_skip > 1:
            fields.append(f"Clip skip: {self.clip_skip}")
        if self.guidance_rescale:
            fields.append(f"CFG Rescale phi: {self.guidance_rescale:g}")
        if self.guidance_interval is not None:
            fields.append(f"Guidance interval: {self.guidance_interval[0]:g}/{self.guidance_interval[1]:g}")
        if self.deepcache is not None:
            fields.append(f"DeepCache: {self.deepcache[0]}/{self.deepcache[1]}")
        if self.loras:  # AUTOMATIC1111: Lora hashes: "name1: hash1, name2: hash2" (quoted: it holds ", ")
            hashes = ", ".join(f"{name}: {h}" for name, _, h in self.loras)
            fields.append(f"Lora hashes: {json.dumps(hashes, ensure_ascii=False)}")
        lines.append(", ".join(fields))
        return "\n".join(lines)


# One "Key: value" field of the parameters line; a value in double quotes may hold ", " (AUTOMATIC1111's re_param).
_FIELD = re.compile(r'\s*(\w[\w \-/]+): ("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, str]:
    """Parse an AUTOMATIC1111 ``parameters`` chunk back into a dict (prompt, negative prompt, fields); the
    ``Sampler`` field becomes our sampler id when it names one of ours (:func:`sampler_id`)."""
    lines = text.strip().split("\n")
    out = {"prompt": lines[0], "negative_prompt": ""}
    for line in lines[1:]:
        if line.startswith("Negative prompt: "):
            out["negative_prompt"] = line[len("Negative prompt: "):]
        else:
            for m in _FIELD.finditer(line):
                key, value = m.group(1), m.group(2)
                if value.startswith('"'):
                    try:
                        value = json.loads(value)
                    except ValueError:
                        pass
                out[key] = value
    if "Sampler" in out:
        out["Sampler"] = sampler_id(out["Sampler"])
    return out


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images (clamped, rounded to uint8)."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """Encode a PNG with an optional ``parameters`` tEXt chunk (the AUTOMATIC1111 convention)."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png_new(image: Image.Image, outdir: str | Path, parameters: str | None = None, stem: str = "",
                 first_index: int = 0) -> Path:
    """Write ``outdir/NNNNN[-stem].png`` with the next free number (at least ``first_index``); an existing file is
    never overwritten."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    data = png_bytes(image, parameters)
    index = max(_next_index(outdir), first_index)
    while True:
        path = outdir / (f"{index:05d}-{stem}.png" if stem else f"{index:05d}.png")
        try:
            with atomic_write(path, "wb", overwrite=False) as f:
                f.write(data)
            return path
        except FileExistsError:
            index += 1


def _next_index(outdir: Path) -> int:
    numbers = [int(p.name[:5]) for p in outdir.glob("*.png") if p.name[:5].isdigit()]
    return max(numbers, default=-1) + 1


def make_grid(images: list[Image.Image], cols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile images (same size) into a grid, ``cols`` per row (default: about square)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def png_settings(path: str | Path) -> dict:
    """The settings recorded in the ``parameters`` chunk of a PNG that latentdiff wrote, keyed by txt2img's option
    names: prompt, negative_prompt, steps, sampler (our id when it is one of ours), scale, seed, H, W, eta, model, and
    where present loras (the names in ``Lora hashes``), strength (img2img's ``Denoising strength``), mask_blur
    (inpainting's ``Mask blur``), clip_skip (``Clip skip``), guidance_rescale (``CFG Rescale phi``),
    guidance_interval (``Guidance interval: lo/hi``, a float pair),
    deepcache/deepcache_branch (``DeepCache: N/K``), truncation and batch_size/batch_pos (VQ-Diffusion).
    Raises ValueError with one clear message for an unreadable file, a PNG without that chunk, or a text without
    the Steps and Seed fields (or with a malformed value)."""
    try:
        with Image.open(path) as im:
            text = im.info.get("parameters")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a readable image ({e})") from None
    if not isinstance(text, str) or not text.strip():
        raise ValueError("has no 'parameters' text chunk (not a PNG that latentdiff or AUTOMATIC1111 wrote)")
    fields = parse_parameters(text)
    missing = [key for key in ("Steps", "Seed") if key not in fields]
    if missing:
        raise ValueError(f"its 'parameters' text lacks {' and '.join(missing)}, so the image cannot be regenerated")
    out: dict = {"prompt": fields["prompt"], "negative_prompt": fields["negative_prompt"], "eta": 0.0,
                 "model": fields.get("Model", "")}
    try:
        out["steps"], out["seed"] = int(fields["Steps"]), int(fields["Seed"])
        if "Sampler" in fields:
            out["sampler"] = fields["Sampler"]
        for key, name in (("scale", "CFG scale"), ("eta", "Eta"), ("strength", "Denoising strength"),
                          ("truncation", "Truncation"), ("mask_blur", "Mask blur"),
                          ("guidance_rescale", "CFG Rescale phi")):
            if name in fields:
                out[key] = float(fields[name])
        if "Size" in fields:
            out["W"], out["H"] = (int(v) for v in fields["Size"].split("x"))
        for key, name in (("batch_size", "Batch size"), ("batch_pos", "Batch pos"), ("clip_skip", "Clip skip")):
            if name in fields:
                out[key] = int(fields[name])
    except ValueError as e:
        raise ValueError(f"its 'parameters' text has a malformed value ({e})") from None
    if "DeepCache" in fields:  # "interval/branch"
        try:
            out["deepcache"], out["deepcache_branch"] = (int(v) for v in fields["DeepCache"].split("/"))
        except ValueError:
            raise ValueError(f"its DeepCache field {fields['DeepCache']!r} is not interval/branch") from None
    if "Guidance interval" in fields:  # "sigma_lo/sigma_hi"
        try:
            lo, hi = (float(v) for v in fields["Guidance interval"].split("/"))
        except ValueError:
            raise ValueError(f"its Guidance interval field {fields['Guidance interval']!r} is not lo/hi") from None
        out["guidance_interval"] = (lo, hi)
    if "Lora hashes" in fields:  # "name1: hash1, name2: hash2" -> the names
        out["loras"] = re.findall(r"(.+?): [0-9a-fA-F]+(?:, |$)", fields["Lora hashes"])
    return out
