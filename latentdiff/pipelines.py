"""Text-to-image pipelines and :func:`load_pipeline`, the entry point.

    pipe = load_pipeline()                                   # the embedded default model
    pipe = load_pipeline("model.safetensors", device="cuda", dtype=torch.bfloat16)
    images = pipe(["a photo of a cat", "a photo of a ship"], steps=25, scale=5.0, seed=0)

A path may be the project's own model file, a Stable Diffusion single file (.safetensors/.ckpt, original
layout) or a diffusers folder (``model_index.json``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentdiff.config import LatentDiffusionConfig
from latentdiff.diffusion.samplers import SAMPLERS, classifier_free_guidance, sample
from latentdiff.diffusion.schedule import DiffusionSchedule
from latentdiff.io.checkpoint import (
    CheckpointError,
    empty_parameters,
    is_model_file,
    load_into,
    load_model_file,
    save_model_file,
)
from latentdiff.models.autoencoder_kl import AutoencoderKL
from latentdiff.models.text import build_text_encoder
from latentdiff.models.unet import UNetModel

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = ASSETS / "default.safetensors"
DEFAULT_VQ_MODEL = ASSETS / "default_vq.safetensors"
EMBEDDED_MODELS = {"default": DEFAULT_MODEL, "default-vq": DEFAULT_VQ_MODEL}  # names load_pipeline accepts


@dataclass
class GenerationParams:
    """What produced an image; ``to_text`` writes the AUTOMATIC1111 ``parameters`` format."""

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

    def to_text(self) -> str:
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        fields = [f"Steps: {self.steps}", f"Sampler: {self.sampler}", f"CFG scale: {self.scale:g}",
                  f"Seed: {self.seed}", f"Size: {self.width}x{self.height}"]
        if self.eta:
            fields.append(f"Eta: {self.eta:g}")
        if self.model:
            fields.append(f"Model: {self.model}")
        lines.append(", ".join(fields))
        return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, str]:
    """Parse an AUTOMATIC1111 ``parameters`` chunk back into a dict (prompt, negative prompt, fields)."""
    lines = text.strip().split("\n")
    out = {"prompt": lines[0], "negative_prompt": ""}
    for line in lines[1:]:
        if line.startswith("Negative prompt: "):
            out["negative_prompt"] = line[len("Negative prompt: "):]
        else:
            for item in line.split(", "):
                key, sep, value = item.partition(": ")
                if sep:
                    out[key] = value
    return out


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images (clamped, rounded to uint8)."""
    arr = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


class Pipeline:
    """What every text-to-image pipeline shares: named parts, construction from a config (random weights) or from
    state dicts (empty parameters filled by assignment), saving to the project's file, moving between devices.

    Subclasses set ``components`` (constructor argument names, also the prefixes in the model file) and
    ``main_component`` (whose parameters give ``device``/``dtype``), and implement ``build_modules``.
    """

    components: tuple[str, ...] = ()
    main_component: str = ""

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
    def default_scale(self) -> float:
        return self.config.guidance_scale


class LatentDiffusionPipeline(Pipeline):
    """Text encoder -> U-Net under classifier-free guidance, walked by a sampler -> autoencoder decoder."""

    components = ("unet", "autoencoder", "text_encoder")
    main_component = "unet"

    def __init__(self, config: LatentDiffusionConfig, unet: UNetModel, autoencoder: AutoencoderKL,
                 text_encoder: torch.nn.Module, name: str = ""):
        self.config = config
        self.unet = unet.eval()
        self.autoencoder = autoencoder.eval()
        self.text_encoder = text_encoder.eval()
        self.schedule = DiffusionSchedule.from_config(config.schedule)
        self.name = name

    @classmethod
    def build_modules(cls, config: LatentDiffusionConfig) -> dict[str, torch.nn.Module]:
        return {"unet": UNetModel(config.unet), "autoencoder": AutoencoderKL(config.autoencoder),
                "text_encoder": build_text_encoder(config.text_encoder)}

    @property
    def size_multiple(self) -> int:
        return self.config.autoencoder.downsample_factor * self.config.unet.downsample_factor

    # -- generation --------------------------------------------------------------------------------------------
    def check_size(self, height: int, width: int) -> None:
        m = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % m:
                raise ValueError(f"{name}={value} must be a positive multiple of {m} "
                                 f"(autoencoder x U-Net downsampling of this model)")

    @torch.inference_mode()
    def generate(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, steps: int = 25,
                 scale: float | None = None, sampler: str = "ddim", seed: int | None = None, height: int | None = None,
                 width: int | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 callback: Callable | None = None, output_type: str = "image",
                 ) -> tuple[torch.Tensor, list[GenerationParams]]:
        """Images as a (N, 3, H, W) tensor in [-1, 1] plus the parameters of each; with ``output_type="latent"``
        the sampled latents (N, C, h, w) instead, undecoded (``self.autoencoder.decode`` makes the images)."""
        check_output_type(output_type)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        scale = self.default_scale if scale is None else scale
        if not prompts:
            raise ValueError("no prompt given")
        negatives = _broadcast_negative(negative_prompt, len(prompts))
        height = self.config.image_size if height is None else height
        width = self.config.image_size if width is None else width
        self.check_size(height, width)
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
        if not 0 < steps <= self.schedule.num_timesteps:
            raise ValueError(f"steps={steps} must be between 1 and {self.schedule.num_timesteps}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt} must be >= 1")
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())

        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        N = len(prompts)
        device, dtype = self.device, self.dtype
        context = self.text_encoder.encode(prompts).to(dtype)  # (N, L, D)
        uncond = self.text_encoder.encode(negatives).to(dtype) if scale != 1.0 else None  # (N, L, D)

        C = self.config.autoencoder.embed_dim
        f = self.config.autoencoder.downsample_factor
        seeds = [seed + i for i in range(N)]
        x_T = torch.stack([torch.randn(C, height // f, width // f, generator=torch.Generator().manual_seed(s))
                           for s in seeds]).to(device)  # (N, C, h, w), float32; per-image seeds reproduce alone
        generator = torch.Generator(device).manual_seed(seed)

        unet = self.unet

        def model(x_t, t, context):
            return unet(x_t.to(dtype), t, context).float()

        guided = classifier_free_guidance(model, scale)
        kwargs = {"context": context} if uncond is None else {"context": context, "uncond_context": uncond}
        s = self.config.schedule
        z0 = sample(guided, self.schedule, x_T, sampler=sampler, steps=steps, eta=eta, generator=generator,
                    timestep_spacing=s.timestep_spacing, steps_offset=s.steps_offset, callback=callback,
                    model_kwargs=kwargs)
        params = [GenerationParams(p, n, steps, sampler, scale, sd, width, height, eta, self.name)
                  for p, n, sd in zip(prompts, negatives, seeds)]
        if output_type == "latent":
            return z0.float(), params
        return self.autoencoder.decode(z0.to(dtype)).float(), params  # (N, 3, H, W)

    def __call__(self, prompt, **kwargs) -> list[Image.Image]:
        images, params = self.generate(prompt, **kwargs)
        pil = to_pil(images)
        for im, p in zip(pil, params):
            im.info["parameters"] = p.to_text()
        return pil


def check_output_type(output_type: str) -> None:
    if output_type not in ("image", "latent"):
        raise ValueError(f"output_type={output_type!r} must be 'image' or 'latent'")


def _broadcast_negative(negative_prompt, n: int) -> list[str]:
    if negative_prompt is None:
        return [""] * n
    if isinstance(negative_prompt, str):
        return [negative_prompt] * n
    negative_prompt = list(negative_prompt)
    if len(negative_prompt) != n:
        raise ValueError(f"{len(negative_prompt)} negative prompts given for {n} prompts")
    return negative_prompt


PIPELINES: dict[str, type] = {"latent_diffusion": LatentDiffusionPipeline}


def register_pipeline(model_type: str, cls: type) -> None:
    """Add a pipeline class for a model config ``type`` (the VQ-Diffusion path registers itself)."""
    PIPELINES[model_type] = cls


def load_pipeline(path: str | Path | None = None, device=None, dtype=None, **kwargs):
    """Load a text-to-image pipeline.

    ``path``: ``None`` or ``"default"`` (the embedded latent-diffusion model), ``"default-vq"`` (the embedded
    VQ-Diffusion model) -- both stored in float16 and loaded in float32 unless ``dtype`` is given --, the
    project's ``.safetensors`` model file, a Stable
    Diffusion single file (``.safetensors``/``.ckpt``) or a diffusers folder (Stable Diffusion, or VQ-Diffusion:
    ``model_index.json`` naming ``VQDiffusionPipeline``). ``device``/``dtype`` move it after loading. Extra
    keyword arguments go to the Stable Diffusion loaders (e.g. ``prediction_type``).
    Raises :class:`~latentdiff.io.checkpoint.CheckpointError` (a ``ValueError``) with a clear message.
    """
    if path is None or (isinstance(path, str) and path in EMBEDDED_MODELS):
        path = EMBEDDED_MODELS[path or "default"]
        if not path.is_file():
            raise CheckpointError(f"the embedded model {path} is missing from this install; pass a checkpoint path")
        dtype = dtype or torch.float32  # stored in float16 to stay small; computed in float32 unless asked
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if is_model_file(path):
        cfg, parts, metadata = load_model_file(path)
        cls = PIPELINES.get(cfg.type)
        if cls is None:
            raise CheckpointError(f"{path}: no pipeline for model type {cfg.type!r}")
        pipe = cls.from_parts(cfg, parts, name=metadata.get("name", path.stem))
    else:
        from latentdiff.io.vq_diffusion import is_vq_diffusion_folder

        if is_vq_diffusion_folder(path):
            from latentdiff.pipelines_vq import load_vq_diffusion_folder

            pipe = load_vq_diffusion_folder(path)
        else:
            from latentdiff.io.stable_diffusion import load_stable_diffusion

            pipe = load_stable_diffusion(path, **kwargs)
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    return pipe


from latentdiff import pipelines_vq  # noqa: E402,F401  (registers "vq_diffusion"; it imports this module)
