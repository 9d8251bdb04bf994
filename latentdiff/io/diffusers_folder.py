"""Reading diffusers pipeline folders: ``model_index.json``, each component's ``config.json`` and its weights.

A folder holds one sub-folder per component (``unet/``, ``vae/``, ``text_encoder/``, ``transformer/``, ...), each
with a ``config.json`` and a weight file: safetensors first, then fp16 variants, then pickles (read with
``torch.load(weights_only=True)``); a sharded file is read through its ``.index.json``. The Stable Diffusion and
VQ-Diffusion loaders (:mod:`latentdiff.io.stable_diffusion`, :mod:`latentdiff.io.vq_diffusion`) both read through
this module.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from latentdiff.io.checkpoint import CheckpointError
from latentdiff.io.safetensors_stream import TensorSource

MODEL_INDEX = "model_index.json"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "model.fp16.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin",
                "diffusion_pytorch_model.fp16.bin", "pytorch_model.fp16.bin")


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; :class:`CheckpointError` naming the file if missing or malformed."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def is_diffusers_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / MODEL_INDEX).is_file()


def pipeline_class(folder: str | Path) -> str | None:
    """The ``_class_name`` of a folder's ``model_index.json`` (``None`` when it has none or cannot be read)."""
    if not is_diffusers_folder(folder):
        return None
    try:
        name = read_json(Path(folder) / MODEL_INDEX).get("_class_name")
    except CheckpointError:
        return None
    return name if isinstance(name, str) else None


def read_component(folder: str | Path, component: str, required: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of ``folder/component`` from the first weight file of :data:`WEIGHT_FILES` that exists (or all
    the shards its ``.index.json`` lists). A missing component raises, or gives ``{}`` when not ``required``."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        index = folder / component / (name + ".index.json")
        files = sorted(set(read_json(index).get("weight_map", {}).values())) if index.is_file() else [name]
        paths = [folder / component / f for f in files]
        if all(p.is_file() for p in paths):
            out = {}
            for p in paths:
                source = TensorSource(p)
                out.update({k: source.get(k) for k in source.keys()})
            return out
    if required:
        raise CheckpointError(f"{folder / component}: none of {list(WEIGHT_FILES)} found")
    return {}
