"""LoRA loading for latent-diffusion pipelines (kohya / AUTOMATIC1111 and diffusers / PEFT files, see
:mod:`latentdiff.io.lora`), and AUTOMATIC1111's ``<lora:NAME:SCALE>`` prompt tags.

    pipe.load_lora("style.safetensors", scale=0.8)        # name "style" (the file's stem)
    pipe.load_lora("detail.safetensors", scale=0.5)       # several at once, each with its own scale
    pipe.loras                                            # [("style", 0.8, "3f2a1c..."), ("detail", 0.5, ...)]
    pipe.unload_lora("style")                             # or unload_lora() for all: the original weights again
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from latentdiff.io.lora import layer_names, lora_hash, match_lora, read_lora
from latentdiff.models.lora import add_lora, fit_shapes, remove_lora, target_layers

# <lora:NAME> or <lora:NAME:SCALE> (AUTOMATIC1111's extra-network syntax)
LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::([^<>]*))?>")


@dataclass
class LoadedLoRA:
    name: str
    scale: float
    hash: str  # AUTOMATIC1111's short hash (io.lora.lora_hash)
    key: str  # the adapter name inside the LoRA layers
    path: Path
    from_prompt: bool = False  # loaded for a <lora:NAME:SCALE> tag by use_prompt_loras


class LoRAMixin:
    """``load_lora``, ``unload_lora`` and ``loras`` for a pipeline with ``unet`` and ``text_encoder``."""

    _loaded_loras: list[LoadedLoRA]
    _lora_count: int = 0

    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None) -> str:
        """Add the LoRA of file ``path`` with strength ``scale`` as ``name`` (default: the file's stem) to the U-Net
        and text encoder; returns the name. Nothing is changed when it fails: ValueError for a missing or unreadable
        file, keys that fit no layer of this model (named), weights of the wrong shape, a name already loaded.
        Fused attention projections (``fuse_qkv``) are split back into to_q, to_k, to_v first, the layers LoRA
        files adapt (the outputs are unchanged)."""
        path = Path(path)
        name = path.stem if name is None else str(name)
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"LoRA scale {scale} must be a finite number")
        if any(lo.name == name for lo in self.loaded_loras):
            raise ValueError(f"a LoRA named {name!r} is already loaded (unload_lora({name!r}) first)")
        self.unet.unfuse_qkv()  # fused q/k/v (pipelines/fast.py fuse_qkv): LoRA files name to_q, to_k, to_v
        modules = {"unet": self.unet, "text_encoder": self.text_encoder}
        entries = match_lora(read_lora(path), layer_names(self.unet, self.text_encoder), source=str(path))
        layers = {c: target_layers(m) for c, m in modules.items()}
        errors = []
        for e in entries:
            try:
                fit_shapes(layers[e.component][e.module], e.down, e.up, e.keys[0].rpartition(".")[0] or e.keys[0])
            except ValueError as err:
                errors.append(str(err))
        if errors:
            raise ValueError(f"{path}: {len(errors)} layer(s) do not fit this model (a LoRA for another "
                             f"architecture?): {'; '.join(errors[:5])}")
        key = f"lora{LoRAMixin._lora_count}"
        LoRAMixin._lora_count += 1
        for e in entries:
            add_lora(modules[e.component], e.module, key, e.down, e.up, e.alpha, scale)
        self.loaded_loras.append(LoadedLoRA(name, scale, lora_hash(path), key, path))
        return name

    def unload_lora(self, name: str | None = None) -> None:
        """Remove LoRA ``name`` (all when None); the layers it alone adapted become the original layers again."""
        if name is not None and not any(lo.name == name for lo in self.loaded_loras):
            raise ValueError(f"no LoRA named {name!r} is loaded (loaded: {[lo.name for lo in self.loaded_loras]})")
        for lo in [lo for lo in self.loaded_loras if name is None or lo.name == name]:
            for module in (self.unet, self.text_encoder):
                remove_lora(module, lo.key)
            self.loaded_loras.remove(lo)

    def use_prompt_loras(self, prompt: str, lora_dir: str | Path | None) -> str:
        """AUTOMATIC1111's prompt tags: load ``lora_dir/NAME.safetensors`` at SCALE for each ``<lora:NAME:SCALE>``
        of ``prompt`` (first unloading those a previous call loaded; LoRAs from :meth:`load_lora` stay) and
        return the prompt without its tags, the text to encode. ValueError for a tag whose file is missing."""
        clean, tags = split_lora_tags(prompt)
        for lo in [lo for lo in self.loaded_loras if lo.from_prompt]:
            self.unload_lora(lo.name)
        for name, scale in tags:
            self.load_lora(tag_lora_file(lora_dir, name), scale, name=name)
            self.loaded_loras[-1].from_prompt = True
        return clean

    @property
    def loaded_loras(self) -> list[LoadedLoRA]:
        if "_loaded_loras" not in self.__dict__:
            self._loaded_loras = []
        return self._loaded_loras

    @property
    def loras(self) -> list[tuple[str, float, str]]:
        """(name, scale, short hash) of each loaded LoRA, in loading order (what the PNG parameters record)."""
        return [(lo.name, lo.scale, lo.hash) for lo in self.loaded_loras]

    def save(self, path, overwrite: bool = False):
        """The model file of :meth:`Pipeline.save`; refused (ValueError) while LoRAs are loaded."""
        if self.loaded_loras:
            raise ValueError(f"LoRAs {[lo.name for lo in self.loaded_loras]} are loaded: unload_lora() before "
                             "save (the model file holds the model's own weights)")
        return super().save(path, overwrite=overwrite)


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """(prompt without its ``<lora:NAME[:SCALE]>`` tags, [(NAME, SCALE)] in order; SCALE defaults to 1).
    ValueError for a SCALE that is not a finite number."""
    tags = []
    for m in LORA_TAG.finditer(prompt):
        name, value = m.group(1).strip(), m.group(2)
        try:
            scale = 1.0 if value is None or not value.strip() else float(value)
        except ValueError:
            scale = math.nan
        if not math.isfinite(scale):
            raise ValueError(f"{m.group(0)}: the scale must be a number, as in <lora:{name}:0.8>")
        tags.append((name, scale))
    return LORA_TAG.sub("", prompt).strip(), tags


def tag_lora_file(lora_dir: str | Path | None, name: str) -> Path:
    """The file of a ``<lora:NAME>`` tag: ``lora_dir/NAME.safetensors``; ValueError when there is none."""
    if lora_dir is None:
        raise ValueError(f"<lora:{name}> in the prompt needs a LoRA folder (txt2img --lora-dir) holding "
                         f"{name}.safetensors")
    path = Path(lora_dir) / f"{name}.safetensors"
    if not path.is_file():
        raise ValueError(f"<lora:{name}>: {path} does not exist")
    return path


def lora_spec(spec: str) -> tuple[Path, float]:
    """``PATH[:SCALE]`` (txt2img --lora) -> (path, scale); without a numeric SCALE the whole text is the path and the
    scale 1. ValueError for a non-finite SCALE."""
    path, sep, value = spec.rpartition(":")
    if sep and path:
        try:
            scale = float(value)
        except ValueError:
            return Path(spec), 1.0
        if not math.isfinite(scale):
            raise ValueError(f"--lora {spec}: the scale must be a finite number")
        return Path(path), scale
    return Path(spec), 1.0
