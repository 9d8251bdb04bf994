"""The models a server holds: each loaded once at start, named, and looked up only by those names (never by a
client's file path).

    models = ModelSet.load(["default", "default-vq"], device, dtype)
    models.find("default")          # by name, by AUTOMATIC1111 title "default [0123456789]" or by short hash
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Our sampler ids and AUTOMATIC1111's names for them (what /sdapi/v1/samplers lists); VQ-Diffusion's own two.
from latentdiff.io.images import SAMPLER_LABELS
from latentdiff.pipelines.vq import VQ_SAMPLERS

VQ_SAMPLER_LABELS = {sid: label for sid, (_, label) in VQ_SAMPLERS.items()}  # "vq_purity": "VQ-Diffusion purity"


def _names(labels: dict[str, str]) -> dict[str, str]:
    """Lower-case AUTOMATIC1111 name or id -> id."""
    return {**{label.lower(): sid for sid, label in labels.items()}, **{sid: sid for sid in labels}}


SAMPLER_NAMES, VQ_SAMPLER_NAMES = _names(SAMPLER_LABELS), _names(VQ_SAMPLER_LABELS)


def sampler_for(name: str, vq: bool = False) -> str | None:
    """Our sampler id for an AUTOMATIC1111 sampler name or one of our ids (any case), for a latent-diffusion model
    or (``vq``) a VQ-Diffusion one. A VQ-Diffusion model runs its own samplers ("VQ-Diffusion", "VQ-Diffusion
    purity"); a latent-diffusion sampler's name asked of it gives None (its own default runs: AUTOMATIC1111's
    clients send a sampler with every request). ValueError for an unknown name and for a VQ-Diffusion sampler
    asked of a latent-diffusion model."""
    key = name.strip().lower()
    if key in VQ_SAMPLER_NAMES:
        if not vq:
            raise ValueError(f"sampler {name!r} is VQ-Diffusion's; this is a latent-diffusion model: choose one of "
                             f"{', '.join(SAMPLER_LABELS.values())}")
        return VQ_SAMPLER_NAMES[key]
    sid = SAMPLER_NAMES.get(key)
    if sid is None:
        choices = [*SAMPLER_LABELS.values(), *VQ_SAMPLER_LABELS.values()] if vq else SAMPLER_LABELS.values()
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(choices)}")
    return None if vq else sid


def sampler_name(sid: str) -> str:
    """AUTOMATIC1111's name of one of our sampler ids, latent or VQ-Diffusion ("vq_purity" -> "VQ-Diffusion
    purity"); other names are kept as they are."""
    return VQ_SAMPLER_LABELS.get(sid) or SAMPLER_LABELS.get(sid, sid)


@dataclass
class ServedModel:
    """One loaded pipeline and the names clients may use for it."""

    name: str  # AUTOMATIC1111's model_name: "default", or the file's or folder's stem
    filename: str  # the file or folder name (never its full path: clients do not learn the server's paths)
    pipe: object  # a LatentDiffusionPipeline or VQDiffusionPipeline

    @property
    def hash(self) -> str | None:
        """AUTOMATIC1111's short hash (10 hex digits of the file's SHA-256); None for a folder."""
        return self.pipe.model_hash or None

    @property
    def title(self) -> str:
        """AUTOMATIC1111's title: ``name [hash]`` (``name`` alone without a hash)."""
        return f"{self.name} [{self.hash}]" if self.hash else self.name

    @property
    def is_vq(self) -> bool:
        return self.pipe.config.type == "vq_diffusion"

    def a1111(self) -> dict:
        """The ``/sdapi/v1/sd-models`` entry."""
        return {"title": self.title, "model_name": self.name, "hash": self.hash, "sha256": None,
                "filename": self.filename, "config": None}


class ModelSet:
    """The configured models, in order; the first is the current one until ``sd_model_checkpoint`` changes it."""

    def __init__(self, models: list[ServedModel]):
        if not models:
            raise ValueError("a server needs at least one model")
        names = [m.name for m in models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two checkpoints have the same name {dup[0]!r}; rename one of the files")
        self.models = models
        self.current = models[0]

    @classmethod
    def load(cls, ckpts: list[str], device=None, dtype=None) -> ModelSet:
        """Load each of ``ckpts`` (``default``, ``default-vq``, files or folders) with ``load_pipeline``; raises
        ValueError (CheckpointError) or OSError naming the one that failed."""
        from latentdiff.pipelines.load import load_pipeline

        models = []
        for ckpt in ckpts or ["default"]:
            pipe = load_pipeline(ckpt, device=device, dtype=dtype)
            if ckpt in ("default", "default-vq"):
                name, filename = ckpt, f"{ckpt}.safetensors"
            else:
                path = Path(ckpt)
                name, filename = (path.name if path.is_dir() else path.stem), path.name
            _ = pipe.model_hash  # hash the file now, not during the first request
            models.append(ServedModel(name, filename, pipe))
        return cls(models)

    def find(self, name: str) -> ServedModel:
        """The model called ``name`` (its name, title or short hash); ValueError naming the choices otherwise."""
        for m in self.models:
            if name in (m.name, m.title, m.filename) or (m.hash and name == m.hash):
                return m
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(m.title for m in self.models)}")
