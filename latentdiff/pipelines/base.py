"""What every text-to-image pipeline shares: named parts, construction from a config or from state dicts, saving,
moving between devices, and the call that turns generated tensors into PIL images with their parameters."""

from __future__ import annotations

import hashlib
import warnings
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

    def __call__(self, prompt, **kwargs) -> list[Image.Image | None]:
        """PIL images of :meth:`generate`, each with its ``parameters`` text in ``info``. An image whose pixels
        are not finite (NaN or inf even when decoded in float32) is None, with a warning naming its seed: it is
        never turned into a black or garbage picture."""
        images, params = self.generate(prompt, **kwargs)
        finite = torch.isfinite(images).flatten(1).all(1).tolist()
        pil = to_pil(torch.nan_to_num(images))
        out: list[Image.Image | None] = []
        for im, p, ok in zip(pil, params, finite):
            if not ok:
                warnings.warn(f"image with seed {p.seed} has NaN or inf pixels even decoded in float32; not returned "
                              "(try another seed, fp32 or bf16 precision)", stacklevel=2)
                out.append(None)
                continue
            im.info["parameters"] = p.to_text()
            out.append(im)
        return out


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    """The SHA-256 of a file as hex, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# generate()'s arguments and the types each accepts (None: the model's default, where the signature allows it)
_ARG_TYPES = {"steps": (int, "an integer"), "seed": (int, "an integer"), "height": (int, "an integer"),
              "width": (int, "an integer"), "num_images_per_prompt": (int, "an integer"),
              "scale": ((int, float), "a number"), "eta": ((int, float), "a number"),
              "strength": ((int, float), "a number"), "truncation": ((int, float), "a number"),
              "sampler": (str, "a string"), "clip_skip": (int, "an integer")}


def check_arg_types(**values) -> None:
    """TypeError naming the argument for a value of the wrong type (``steps="10"``, ``height=32.0``); bools are
    not numbers here. ``prompt``/``negative_prompt``: a string or a list of strings. None passes (a default), except
    for ``prompt``."""
    for name, value in values.items():
        if value is None and name != "prompt":
            continue
        if name in ("prompt", "negative_prompt", "seeds"):
            kind = int if name == "seeds" else str
            items = [value] if isinstance(value, kind) and name != "seeds" else value
            if not isinstance(items, (list, tuple)) or not all(isinstance(v, kind) and not isinstance(v, bool)
                                                                for v in items):
                what = "a list of integers" if name == "seeds" else "a string or a list of strings"
                raise TypeError(f"{name} must be {what}, got {value!r:.80}")
            continue
        types, what = _ARG_TYPES[name]
        if isinstance(value, bool) or not isinstance(value, types):
            raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r:.80}")


def decode_finite(decode, z: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """``decode(z)`` as float32 images (N, 3, H, W); images that come out with NaN or inf in a half precision
    (fp16 overflow) are decoded again with ``module`` in float32. An image still not finite is left as it is: the
    caller must not write it (:meth:`Pipeline.__call__` gives None for it)."""
    images = decode(z).float()
    bad = ~torch.isfinite(images).flatten(1).all(1)  # (N,)
    dtype = next(module.parameters()).dtype
    if bad.any() and dtype != torch.float32:
        module.float()  # fp16/bf16 -> fp32 -> back is exact, so the weights come back unchanged
        try:
            again = z[bad].float() if z.is_floating_point() else z[bad]  # latents in fp32; codes as they are
            images[bad] = decode(again).float()
        finally:
            module.to(dtype)
    return images


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
