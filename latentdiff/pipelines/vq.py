"""Text-to-image with VQ-Diffusion: text encoder -> discrete-diffusion transformer -> VQ decoder.

    from latentdiff import load_pipeline
    pipe = load_pipeline("runs/cifar10_vq_diffusion/model.safetensors")     # dispatched by the stored config type
    images = pipe("a photo of a ship", steps=25, scale=5.0, truncation=0.86, seed=0)   # list of PIL images
    pipe = load_vq_diffusion_folder("vq-diffusion-ithq")                    # a diffusers VQ-Diffusion folder

The call interface is :class:`latentdiff.pipelines.latent.LatentDiffusionPipeline`'s, with these differences:

- ``steps`` network calls walk the T-step chain in jumps of T/steps (fast inference of Improved VQ-Diffusion,
  Tang et al. 2022, Sec. 3.3; ``steps=T`` is the full chain, ``steps=T/s`` skips s steps per call);
- ``scale`` is classifier-free guidance against the learned null condition (or the empty prompt when the model
  has none); negative prompts are not supported (the null condition is not a prompt);
- ``truncation`` keeps the codes covering that much probability at each position (default: the config's
  ``truncation_rate``);
- two samplers: ``"vq"``, the reverse chain, and ``"vq_purity"``, purity sampling (Improved VQ-Diffusion's
  high-quality inference: confident positions revealed first, a schedule's worth per call); the default is the
  config's ``sampler``, and a latent-diffusion sampler name (``"ddim"``...) also means the default, so that callers
  written for latent diffusion run unchanged;
- the image size is fixed by the transformer's positional embeddings (``config.image_size``);
- one random stream (seeded with ``seed``) serves the whole batch, so the parameters of every image of a call
  record the same seed and its position in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from latentdiff.config import VQDiffusionConfig
from latentdiff.diffusion.discrete import DiscreteSchedule
from latentdiff.diffusion.discrete_sampling import learned_classifier_free_guidance, sample, sample_purity
from latentdiff.diffusion.samplers import SAMPLERS
from latentdiff.io.images import GenerationParams
from latentdiff.models.text_encoders import build_text_encoder
from latentdiff.models.transformer import VQDiffusionTransformer
from latentdiff.models.vqvae import VQAutoencoder
from latentdiff.pipelines.base import Pipeline, check_arg_types, check_output_type, decode_finite

# Sampler id -> (sampling function, the name written in the PNG parameters).
VQ_SAMPLERS = {"vq": (sample, "VQ-Diffusion"), "vq_purity": (sample_purity, "VQ-Diffusion purity")}


def vq_sampler_id(name: str) -> str | None:
    """The VQ sampler id of an id or of the name a PNG records ("VQ-Diffusion purity" -> "vq_purity"); None if
    neither."""
    if name in VQ_SAMPLERS:
        return name
    return next((sid for sid, (_, label) in VQ_SAMPLERS.items() if label == name), None)


@dataclass
class VQGenerationParams(GenerationParams):
    """:class:`GenerationParams` plus the VQ-Diffusion settings, in the same ``parameters`` text format."""

    truncation: float = 1.0
    batch_size: int = 1
    batch_pos: int = 0

    def to_text(self) -> str:
        text = f"{super().to_text()}, Truncation: {self.truncation:g}"
        if self.batch_size > 1:
            text += f", Batch size: {self.batch_size}, Batch pos: {self.batch_pos}"
        return text


class VQDiffusionPipeline(Pipeline):
    """VQ autoencoder + text encoder + VQ-Diffusion transformer + mask-and-replace schedule."""

    components = ("vqvae", "transformer", "text_encoder")
    main_component = "transformer"

    def __init__(self, config: VQDiffusionConfig, vqvae: VQAutoencoder, transformer: VQDiffusionTransformer,
                 text_encoder: torch.nn.Module, name: str = ""):
        self.config = config
        self.vqvae = vqvae.eval()
        self.transformer = transformer.eval()
        self.text_encoder = text_encoder.eval()
        self.schedule = DiscreteSchedule.from_config(config.schedule, config.vqvae.num_codes, device=self.device)
        self.name = name

    @classmethod
    def build_modules(cls, config: VQDiffusionConfig) -> dict[str, torch.nn.Module]:
        return {"vqvae": VQAutoencoder(config.vqvae), "transformer": VQDiffusionTransformer(config.transformer),
                "text_encoder": build_text_encoder(config.text_encoder)}

    @classmethod
    def missing_hint(cls, parts: dict[str, dict]) -> str:
        if set(parts) == {"vqvae"}:
            return (" (a VQ autoencoder alone, as a vqvae training run exports, is used through "
                    "objective.vqvae_checkpoint)")
        return ""

    @property
    def autoencoder(self) -> VQAutoencoder:
        """The VQ autoencoder, under the name the continuous pipeline uses."""
        return self.vqvae

    @property
    def size_multiple(self) -> int:
        return self.config.vqvae.downsample_factor

    @property
    def default_sampler(self) -> str:
        """The config's sampler: ``vq`` (the reverse chain) or ``vq_purity``."""
        return self.config.sampler

    @property
    def default_steps(self) -> int:
        """All T steps of the chain."""
        return self.schedule.num_timesteps

    # -- generation --------------------------------------------------------------------------------------------
    def check_size(self, height: int, width: int) -> None:
        f, size = self.size_multiple, self.config.image_size
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % f:
                raise ValueError(f"{name}={value} must be a positive multiple of {f} (VQ autoencoder downsampling "
                                 f"of this model)")
            if value != size:
                raise ValueError(f"{name}={value}: this VQ-Diffusion model generates {size}x{size} images only "
                                 f"(a fixed {size // f}x{size // f} code grid)")

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> the transformer's text context (N, L, D), L2-normalised per token when the config says so."""
        context = self.text_encoder.encode(prompts)  # (N, L, D)
        return F.normalize(context, dim=-1) if self.config.normalize_context else context

    def null_context(self, batch_size: int) -> torch.Tensor:
        """The unconditional context of guidance: the learned null condition (L, D), or the empty prompt's
        encoding (N, L, D) for a transformer without one."""
        if self.transformer.null_context is not None:
            return self.transformer.null_context
        return self.encode_prompts([""]).expand(batch_size, -1, -1)

    @torch.inference_mode()
    def generate(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 steps: int | None = None, scale: float | None = None, sampler: str | None = None,
                 seed: int | None = None, height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, truncation: float | None = None, eta: float = 0.0,
                 callback: Callable | None = None, output_type: str = "image", init_image=None,
                 strength: float = 0.8) -> tuple[torch.Tensor, list[VQGenerationParams]]:
        """Images as a (N, 3, H, W) tensor in [-1, 1] plus the parameters of each; with ``output_type="latent"``
        the sampled code grids (N, h, w) long instead (:meth:`decode_output` makes the images).

        ``steps``: network calls (default: T, the full chain). ``callback(i, steps, codes)`` after each call,
        codes (N, h*w) long. ``eta`` exists for call compatibility and must be 0; so do ``init_image`` (must be
        None: img2img needs a latent-diffusion model) and ``strength``.
        """
        check_arg_types(prompt=prompt, negative_prompt=negative_prompt, steps=steps, scale=scale, seed=seed,
                        height=height, width=width, num_images_per_prompt=num_images_per_prompt,
                        truncation=truncation, eta=eta, strength=strength)
        if init_image is not None:
            raise ValueError("img2img needs a latent-diffusion model; this is a VQ-Diffusion model (no init_image)")
        check_output_type(output_type)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompt given")
        negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt or [])
        if any(negatives):
            raise ValueError("VQ-Diffusion does not support negative prompts: its guidance contrasts the prompt "
                             "with the model's learned null condition")
        T = self.schedule.num_timesteps
        steps = T if steps is None else steps
        scale = self.default_scale if scale is None else scale
        if not math.isfinite(scale):
            raise ValueError(f"scale={scale} must be a finite number")
        truncation = self.config.truncation_rate if truncation is None else truncation
        height = self.config.image_size if height is None else height
        width = self.config.image_size if width is None else width
        self.check_size(height, width)
        if not 0 < steps <= T:
            raise ValueError(f"steps={steps} must be between 1 and {T}")
        if not 0 < truncation <= 1:
            raise ValueError(f"truncation={truncation} must be in (0, 1]")
        sampler_id = self.default_sampler if sampler is None or sampler in SAMPLERS else vq_sampler_id(sampler)
        if sampler_id is None:
            raise ValueError(f"unknown sampler {sampler!r}; VQ-Diffusion's samplers are {', '.join(VQ_SAMPLERS)}")
        sample_fn, sampler_label = VQ_SAMPLERS[sampler_id]
        if eta:
            raise ValueError(f"eta={eta} applies to DDIM only; VQ-Diffusion sampling has no eta")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt} must be >= 1")
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())

        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        N, S = len(prompts), self.config.transformer.latent_size
        context = self.encode_prompts(prompts).to(self.dtype)  # (N, L, D)
        transformer = self.transformer

        def model(x_t, t, context):
            return transformer(x_t, t, context)  # (N, K, S*S) float32 log-probabilities

        guided = learned_classifier_free_guidance(model, scale, self.null_context(N).to(self.dtype))
        step_callback = None if callback is None else (lambda i, t, x: callback(i, steps, x))
        codes = sample_fn(guided, self.schedule, (N, S * S), steps=steps, truncation_rate=truncation,
                       generator=torch.Generator(self.device).manual_seed(seed), callback=step_callback,
                       model_kwargs={"context": context})  # (N, S*S)
        params = [VQGenerationParams(p, "", steps, sampler_label, scale, seed, width, height, model=self.name,
                                     model_hash=self.model_hash, truncation=truncation, batch_size=N, batch_pos=i)
                  for i, p in enumerate(prompts)]
        if output_type == "latent":
            return codes.view(N, S, S), params
        return self.decode_output(codes.view(N, S, S)), params  # (N, 3, H, W)

    @torch.inference_mode()
    def decode_output(self, codes: torch.Tensor) -> torch.Tensor:
        """The images (N, 3, H, W) float32 of sampled code grids (N, h, w) (``generate(..., output_type="latent")``),
        as ``generate`` decodes them."""
        return decode_finite(self.vqvae.decode_codes, codes.to(self.device), self.vqvae)
