"""What every text-to-image pipeline shares: named parts, construction from a config or from state dicts, saving,
moving between devices, and the call that turns generated tensors into PIL images with their parameters."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from PIL import Image

from latentdiff.io.checkpoint import CheckpointError, empty_parameters, load_into, save_model_file
from latentdiff.io.images import to_pil


class Pipeline:
    """What every text-to-image pipeline shares: named parts, construction from a config (random weights) or from
    state dicts (empty parameters filled by assignment), saving to the project's file, moving between devices.

    Subclasses set ``components`` (constructor argument names, also the prefixes in the model file) and
    ``main_component`` (whose parameters give ``device``/``dtype``), and implement ``build_modules``.
    """

    components: tuple[str, ...] = ()
    main_component: str = ""
    source: Path | None = None  # the file it was loaded from (load_pipeline sets it), for model_hash
    _model_hash: str | None = None

    @classmethod
    def build_modules(cls, config) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    @classmethod
    def missing_hint(cls, parts: dict[str, dict]) -> str:
        """Extra words for the error about a file that lacks some components."""
        return ""

    @classmethod
    def from_config(cls, config, name: str = ""):
        """Random weights (for tests and as the start of training)."""
        return cls(config, **cls.build_modules(config), name=name)

    @classmethod
    def from_parts(cls, config, parts: dict[str, dict], name: str = ""):
        """Build from state dicts: modules are built with empty (meta) parameters and take the loaded tensors by
        assignment, so the weights are held once, in the file's dtype, and nothing is randomly initialised."""
        missing = [c for c in cls.components if c not in parts]
        if missing:
            raise CheckpointError(f"model file has no {missing} weights{cls.missing_hint(parts)}")
        with empty_parameters():
            modules = cls.build_modules(config)
        for component, module in modules.items():
            load_into(module, parts[component], component, assign=True)
            left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
            if left:
                raise CheckpointError(f"{component}: tensors not provided by the file: {left[:5]}")
        return cls(config, **modules, name=name)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the project's single-file ``.safetensors`` (weights + config), read back by ``load_pipeline``."""
        return save_model_file(path, self.config, self.modules(), overwrite=overwrite)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {c: getattr(self, c) for c in self.components}

    def to(self, device=None, dtype=None):
        for m in self.modules().values():
            m.to(device=device, dtype=dtype)
        if device is not None:
            self.schedule = self.schedule.to(self.device)
        return self

    @property
    def device(self) -> torch.device:
        return next(getattr(self, self.main_component).parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(getattr(self, self.main_component).parameters()).dtype

    @property
    def model_hash(self) -> str:
        """AUTOMATIC1111's short model hash ("AutoV2"): the first 10 hex digits of the SHA-256 of the file it was
        loaded from, computed on first use; "" for a folder or a pipeline built in memory."""
        if self._model_hash is None:
            self._model_hash = file_sha256(self.source)[:10] if self.source and Path(self.source).is_file() else ""
        return self._model_hash

    @property
    def default_scale(self) -> float:
        return self.config.guidance_scale

    def __call__(self, prompt, **kwargs) -> list[Image.Image]:
        """PIL images of :meth:`generate`, each with its ``parameters`` text in ``info``."""
        images, params = self.generate(prompt, **kwargs)
        pil = to_pil(images)
        for im, p in zip(pil, params):
            im.info["parameters"] = p.to_text()
        return pil


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    """The SHA-256 of a file as hex, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_output_type(output_type: str) -> None:
    if output_type not in ("image", "latent"):
        raise ValueError(f"output_type={output_type!r} must be 'image' or 'latent'")


def broadcast_negative(negative_prompt, n: int) -> list[str]:
    if negative_prompt is None:
        return [""] * n
    if isinstance(negative_prompt, str):
        return [negative_prompt] * n
    negative_prompt = list(negative_prompt)
    if len(negative_prompt) != n:
        raise ValueError(f"{len(negative_prompt)} negative prompts given for {n} prompts")
    return negative_prompt
