""":func:`load_pipeline`, the entry point: any supported checkpoint -> the pipeline of its model type.

    pipe = load_pipeline()                                   # the embedded default model
    pipe = load_pipeline("default-vq")                       # the embedded VQ-Diffusion model
    pipe = load_pipeline("model.safetensors", device="cuda", dtype=torch.bfloat16)
    pipe = load_pipeline("v1-5-pruned-emaonly.safetensors")  # a Stable Diffusion single file, or a diffusers folder
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from latentdiff.assets import EMBEDDED_MODELS
from latentdiff.io.checkpoint import CheckpointError, load_model_file
from latentdiff.io.formats import detect_format
from latentdiff.io.stable_diffusion import read_stable_diffusion, unify_dtype
from latentdiff.io.vq_diffusion import is_vq_diffusion_folder, read_vq_diffusion_folder
from latentdiff.pipelines.latent import LatentDiffusionPipeline
from latentdiff.pipelines.vq import VQDiffusionPipeline

PIPELINES: dict[str, type] = {"latent_diffusion": LatentDiffusionPipeline, "vq_diffusion": VQDiffusionPipeline}


def load_pipeline(path: str | Path | None = None, device=None, dtype=None, compile: bool = False, **kwargs):
    """Load a text-to-image pipeline.

    ``path``: ``None`` or ``"default"`` (the embedded latent-diffusion model), ``"default-vq"`` (the embedded
    VQ-Diffusion model) -- both stored in float16 and loaded in float32 unless ``dtype`` is given --, the
    project's ``.safetensors`` model file, a Stable Diffusion single file (``.safetensors``/``.ckpt``) or a diffusers
    folder (Stable Diffusion, or VQ-Diffusion: ``model_index.json`` naming ``VQDiffusionPipeline``).
    ``device``/``dtype`` move it after loading. ``compile=True`` switches the fast path on (``pipe.compile()``,
    latent-diffusion models; ValueError for VQ-Diffusion). Extra keyword arguments go to the Stable Diffusion loaders
    (``prediction_type``, ``use_ema``, ``overrides``, ``dtype`` of the weights).
    Raises :class:`~latentdiff.io.checkpoint.CheckpointError` (a ``ValueError``) with a clear message.
    """
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or a path, got {type(path).__name__} {path!r:.80}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float16, got {type(dtype).__name__} {dtype!r:.80}")
    if device is not None and (isinstance(device, bool) or not isinstance(device, (str, int, torch.device))):
        raise TypeError(f"device must be a str, an index or a torch.device, got {type(device).__name__} {device!r:.80}")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be True or False, got {type(compile).__name__} {compile!r:.80}")
    if path is None or (isinstance(path, str) and path in EMBEDDED_MODELS):
        path = EMBEDDED_MODELS[path or "default"]
        if not path.is_file():
            raise CheckpointError(f"the embedded model {path} is missing from this install; pass a checkpoint path")
        dtype = dtype or torch.float32  # stored in float16 to stay small; computed in float32 unless asked
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "latentdiff":
        if kwargs:
            raise CheckpointError(f"{path} is a latentdiff model file: {sorted(kwargs)} apply to Stable Diffusion "
                                  f"checkpoints only")
        cfg, parts, metadata = load_model_file(path)
        cls = PIPELINES.get(cfg.type)
        if cls is None:
            raise CheckpointError(f"{path}: no pipeline for model type {cfg.type!r}")
        pipe = cls.from_parts(cfg, parts, name=metadata.get("name", path.stem))
    elif fmt == "diffusers" and is_vq_diffusion_folder(path):
        pipe = load_vq_diffusion_folder(path)
    else:
        pipe = load_stable_diffusion(path, **kwargs)
    pipe.source = path
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    if compile:  # the fast path (#13): torch.compile of the U-Net and the decoder, after the move
        if not hasattr(pipe, "compile"):
            raise ValueError(f"compile=True applies to latent-diffusion models; {path} is a {pipe.config.type} model")
        pipe.compile()
    return pipe


def load_stable_diffusion(path: str | Path, prediction_type: str | None = None, use_ema: bool | None = None,
                          overrides: list[str] = (), dtype: torch.dtype | None = None) -> LatentDiffusionPipeline:
    """A :class:`LatentDiffusionPipeline` from a Stable Diffusion single file or diffusers folder, in the weights'
    dtype unless ``dtype`` is given (see :mod:`latentdiff.io.stable_diffusion`)."""
    path = Path(path)
    cfg, parts = read_stable_diffusion(path, prediction_type, use_ema, overrides)
    return LatentDiffusionPipeline.from_parts(cfg, unify_dtype(parts, dtype), name=path.stem)


def load_vq_diffusion_folder(path: str | Path, device=None, dtype=None) -> VQDiffusionPipeline:
    """A :class:`VQDiffusionPipeline` from a diffusers VQ-Diffusion folder (see :mod:`latentdiff.io.vq_diffusion`)."""
    path = Path(path)
    cfg, parts = read_vq_diffusion_folder(path)
    parts = {name: {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}  # one dtype (fp16 files)
             for name, sd in parts.items()}
    pipe = VQDiffusionPipeline.from_parts(cfg, parts, name=path.name)
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    return pipe
