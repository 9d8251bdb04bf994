"""Which kind of checkpoint a path is: the one detector that loading and conversion share.

- ``latentdiff``: the project's own ``.safetensors`` model file (``format: latentdiff`` in its metadata);
- ``diffusers``: a folder with ``model_index.json`` (:func:`latentdiff.io.diffusers_folder.pipeline_class` tells
  a Stable Diffusion pipeline from a VQ-Diffusion one);
- ``sd``: any other file, read as a Stable Diffusion single file (``.safetensors``, or ``.ckpt``/``.pt``/``.pth``/
  ``.bin`` through ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

from pathlib import Path

from latentdiff.io.checkpoint import PICKLE_SUFFIXES, CheckpointError, is_model_file
from latentdiff.io.diffusers_folder import MODEL_INDEX

FORMATS = ("sd", "diffusers", "latentdiff")


def detect_format(path: str | Path) -> str:
    """``'latentdiff'``, ``'diffusers'`` or ``'sd'``; :class:`CheckpointError` for a path that is none of them."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        if not (path / MODEL_INDEX).is_file():
            raise CheckpointError(f"{path} is a folder without {MODEL_INDEX}, not a diffusers pipeline")
        return "diffusers"
    if is_model_file(path):
        return "latentdiff"
    if path.suffix != ".safetensors" and path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unsupported checkpoint type {path.suffix!r}; expected a .safetensors or "
                              f"{'/'.join(PICKLE_SUFFIXES)} file or a diffusers folder")
    return "sd"
