"""Text-to-image with latent diffusion (the Stable Diffusion family): text encoder -> U-Net under classifier-free
guidance, walked by a sampler -> autoencoder decoder.

    pipe = LatentDiffusionPipeline.from_config(cfg)           # random weights; load_pipeline(path) for trained ones
    images, params = pipe.generate(["a photo of a cat"], steps=25, scale=5.0, seed=0)   # (N, 3, H, W) in [-1, 1]
    images, params = pipe.generate("a ship")   # the model's own sampler, steps and scale (its config's)
    images = pipe("a watercolor cat", init_image=Image.open("cat.png"), strength=0.75)  # img2img: PIL images
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from latentdiff.config import LatentDiffusionConfig
from latentdiff.diffusion.samplers import (
    SAMPLERS,
    check_guidance_interval,
    classifier_free_guidance,
    noise_to_step,
    sample,
)
from latentdiff.diffusion.schedule import DiffusionSchedule
from latentdiff.io.images import GenerationParams
from latentdiff.models.autoencoder_kl import AutoencoderKL
from latentdiff.models.prompt_encoding import encode_prompt_batches
from latentdiff.models.text_encoders import build_text_encoder
from latentdiff.models.unet import UNetModel
from latentdiff.pipelines.base import Pipeline, broadcast_negative, check_arg_types, check_output_type, decode_finite
from latentdiff.pipelines.fast import FastPathMixin
from latentdiff.pipelines.init_image import fitted_size, image_to_tensor, start_step
from latentdiff.pipelines.inpaint import check_mask_blur, inpainting, is_inpainting_unet, mask_to_tensor
from latentdiff.pipelines.lora import LoRAMixin


class LatentDiffusionPipeline(LoRAMixin, FastPathMixin, Pipeline):
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

    @property
    def default_sampler(self) -> str:
        return self.config.sampler

    @property
    def default_steps(self) -> int:
        return self.config.steps

    # -- generation --------------------------------------------------------------------------------------------
    def check_size(self, height: int, width: int) -> None:
        m = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % m:
                raise ValueError(f"{name}={value} must be a positive multiple of {m} "
                                 f"(autoencoder x U-Net downsampling of this model)")

    @torch.inference_mode()
    def generate(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 steps: int | None = None, scale: float | None = None, sampler: str | None = None,
                 seed: int | None = None, seeds: list[int] | None = None, height: int | None = None,
                 width: int | None = None, num_images_per_prompt: int = 1, eta: float = 0.0,
                 callback: Callable | None = None, output_type: str = "image", init_image=None,
                 strength: float | None = None, clip_skip: int = 1, mask_image=None,
                 mask_blur: float = 0, guidance_rescale: float = 0.0,
                 guidance_interval: tuple[float, float] | None = None) -> tuple[torch.Tensor, list[GenerationParams]]:
        """Images as a (N, 3, H, W) tensor in [-1, 1] plus the parameters of each; with ``output_type="latent"``
        the sampled latents (N, C, h, w) float32 instead, undecoded (:meth:`decode_output` makes the images).
        ``steps``, ``sampler`` and ``scale`` left ``None`` are the model's own (its config's ``steps``, ``sampler``
        and ``guidance_scale``: :attr:`default_steps`, :attr:`default_sampler`, :attr:`default_scale`).

        img2img (SDEdit, Meng et al. 2022, as diffusers' ``StableDiffusionImg2ImgPipeline``): ``init_image`` (a PIL
        image, resized to height x width, default its own size rounded down to a multiple of ``size_multiple``) is
        encoded (posterior mode), noised to the step k that ``strength`` in (0, 1] selects (:func:`start_step`),
        and the run's last steps - k steps denoise it. The noise is image i's x_T (seed + i), so a seed reproduces.
        At strength 1 the image is noised to the first step, which keeps √ᾱ_{t_0} of it, as diffusers does.
        ``strength`` defaults to 0.8 (diffusers' img2img), 1.0 when inpainting.

        Inpainting (as diffusers' ``StableDiffusionInpaintPipeline``; :mod:`latentdiff.pipelines.inpaint`):
        ``mask_image`` (a PIL image, white = repaint, resized to the image; ``mask_blur`` R > 0 blurs it first as
        AUTOMATIC1111 does) with ``init_image``. An inpainting U-Net (in_channels 2C + 1) sees the mask and the
        masked image's latents at every step; an ordinary U-Net gets the known region blended back after every
        step, so the kept latents end as the init image's. At strength 1 the run starts from pure noise x_T, as
        diffusers' inpainting does. The parameters then record "Mask blur: R".

        Randomness is per image: image i has its own CPU generator seeded with its seed (``seed + i``, or
        ``seeds[i]`` when given: one per image, after ``num_images_per_prompt``), which draws its x_T and then
        every step noise of a stochastic sampler (euler_a, ddpm, ddim with eta > 0). So an image is the same
        whatever batch it was made in, on the same device and precision.

        Prompts and negative prompts take AUTOMATIC1111's syntax (``(word:1.3)``, ``[word]``, ``BREAK``) and any
        length (docs/prompts.md); ``clip_skip`` N > 1 conditions on the text encoder's output N - 1 blocks
        earlier (recorded as "Clip skip: N").

        ``guidance_rescale`` φ in [0, 1] (Lin et al. 2024, Eq. 15-16; diffusers' ``guidance_rescale``) scales each
        guided prediction back towards the standard deviation of the conditional one (0: plain guidance; 0.7 is
        the paper's choice for zero-terminal-SNR models; see ``classifier_free_guidance`` in diffusion/guidance.py).
        ``guidance_interval`` (σ_lo, σ_hi) guides only the steps whose noise level σ_t = √((1 - ᾱ_t)/ᾱ_t) lies in
        (σ_lo, σ_hi] and takes the conditional prediction alone elsewhere (Kynkäänniemi et al. 2024); None: the
        model's own (its config's ``guidance_interval``; None there: every step), (0, inf): every step. Fewer
        guided steps also mean fewer U-Net calls.
        """
        if isinstance(guidance_rescale, bool) or not isinstance(guidance_rescale, (int, float)):
            raise TypeError(f"guidance_rescale must be a number, got {type(guidance_rescale).__name__}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale={guidance_rescale!r} must be in [0, 1]")
        if guidance_interval is None:
            guidance_interval = self.config.guidance_interval  # the model's own (None: every step)
        if guidance_interval is not None:
            guidance_interval = check_guidance_interval(guidance_interval)
        check_arg_types(prompt=prompt, negative_prompt=negative_prompt, steps=steps, scale=scale, sampler=sampler,
                        seed=seed, seeds=seeds, height=height, width=width, eta=eta, strength=strength,
                        num_images_per_prompt=num_images_per_prompt, clip_skip=clip_skip)
        check_output_type(output_type)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        scale = self.default_scale if scale is None else scale
        steps = self.default_steps if steps is None else steps
        sampler = self.default_sampler if sampler is None else sampler
        if not math.isfinite(scale):
            raise ValueError(f"scale={scale} must be a finite number")
        if not prompts:
            raise ValueError("no prompt given")
        negatives = broadcast_negative(negative_prompt, len(prompts))
        default_hw = (self.config.image_size,) * 2 if init_image is None else fitted_size(init_image,
                                                                                          self.size_multiple)
        height = default_hw[0] if height is None else height
        width = default_hw[1] if width is None else width
        self.check_size(height, width)
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
        if not 0 < steps <= self.schedule.num_timesteps:
            raise ValueError(f"steps={steps} must be between 1 and {self.schedule.num_timesteps}")
        if mask_image is not None and init_image is None:
            raise ValueError("mask_image needs init_image (the picture to inpaint)")
        strength = (0.8 if mask_image is None else 1.0) if strength is None else strength
        k = None if init_image is None else start_step(steps, strength)  # ValueError for a bad strength
        mask = None if mask_image is None else mask_to_tensor(mask_image, height, width, check_mask_blur(mask_blur))
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt} must be >= 1")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = [n for n in negatives for _ in range(num_images_per_prompt)]
        N = len(prompts)
        seeds = image_seeds(seed, seeds, N)
        device, dtype = self.device, self.dtype
        context, uncond = self.encode_prompts(prompts, negatives, guided=scale != 1.0,
                                              clip_skip=clip_skip)  # (N, L·k, D) each; uncond
        # is None without guidance

        C = self.config.autoencoder.embed_dim
        f = self.config.autoencoder.downsample_factor
        generator = [torch.Generator().manual_seed(s) for s in seeds]  # one stream per image: x_T, then step noise
        x_T = torch.stack([torch.randn(C, height // f, width // f, generator=g)
                           for g in generator]).to(device)  # (N, C, h, w), float32
        s = self.config.schedule
        noise = x_T
        image = None if init_image is None else image_to_tensor(init_image, height, width)  # (1, 3, H, W)
        z_init = None
        if image is not None:  # img2img: x_{t_k} = √ᾱ_k z0 + √(1-ᾱ_k) x_T (Eq. 4 of DDPM), step k's noise level
            z_init = self.encode_images(image.to(device, dtype)).float()  # (1, C, h, w)
            if mask is not None and k == 0:  # inpainting at strength 1: pure noise, as diffusers
                k = None
            else:
                x_T = noise_to_step(z_init.expand_as(x_T), x_T, self.schedule, sampler, steps, k, s.timestep_spacing,
                                    s.steps_offset)  # (N, C, h, w)

        unet = self.denoising_unet()  # the U-Net, or under DeepCache a step counter of this call (pipelines/fast.py)

        def model(x_t, t, context):
            return unet(x_t.to(dtype), t, context).float()

        step_hook = None
        if mask is not None or is_inpainting_unet(self.config):
            model, step_hook = inpainting(self, model, image, mask, z_init, noise, sampler, steps)
        guided = classifier_free_guidance(model, scale, float(guidance_rescale), interval=guidance_interval,
                                          schedule=self.schedule)
        kwargs = {"context": context} if uncond is None else {"context": context, "uncond_context": uncond}
        z0 = sample(guided, self.schedule, x_T, sampler=sampler, steps=steps, eta=eta, generator=generator,
                    timestep_spacing=s.timestep_spacing, steps_offset=s.steps_offset, callback=callback,
                    model_kwargs=kwargs, start_step=k, step_hook=step_hook)
        strength = None if init_image is None else float(strength)
        params = [GenerationParams(p, n, steps, sampler, scale, sd, width, height, eta, self.name, strength,
                                   model_hash=self.model_hash, clip_skip=clip_skip, loras=tuple(self.loras),
                                   mask_blur=None if mask is None else float(mask_blur),
                                   guidance_rescale=float(guidance_rescale), guidance_interval=guidance_interval,
                                   deepcache=None if self.deepcache is None else
                                   (self.deepcache.interval, self.deepcache.branch))
                  for p, n, sd in zip(prompts, negatives, seeds)]
        if output_type == "latent":
            return z0.float(), params
        return self.decode_output(z0), params  # (N, 3, H, W)

    @torch.inference_mode()
    def decode_output(self, latents: torch.Tensor) -> torch.Tensor:
        """The images (N, 3, H, W) float32 of sampled latents (``generate(..., output_type="latent")``), as
        ``generate`` decodes them: in the pipeline's precision, again in float32 for an image that overflows."""
        return decode_finite(self.decode_latents, latents.to(self.device, self.dtype), self.autoencoder)

    def encode_prompts(self, prompts: list[str], negatives: list[str], guided: bool = True, clip_skip: int = 1
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The U-Net's cross-attention contexts of the prompts and (when ``guided``) of the negative prompts:
        (N, L·k, D) each, in the pipeline's dtype; the unconditional one is None without guidance. Prompts are
        read as AUTOMATIC1111 reads them (emphasis, BREAK, chunks of L - 2 tokens, k the most chunks of any prompt
        or negative prompt: :func:`~latentdiff.models.prompt_encoding.encode_prompt_batches`); ``clip_skip`` N > 1
        takes the text encoder's output N - 1 blocks earlier."""
        dtype = self.dtype
        batches = [prompts, negatives] if guided else [prompts]
        encoded = encode_prompt_batches(self.text_encoder, batches, clip_skip=clip_skip)  # (N, L·k, D) each
        context = encoded[0].to(dtype)
        uncond = encoded[1].to(dtype) if guided else None
        return context, uncond


def image_seeds(seed: int | None, seeds: list[int] | None, n: int) -> list[int]:
    """The seed of each of ``n`` images: ``seeds`` as given (exactly n), else ``seed + i`` (a random seed when
    ``seed`` is None)."""
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds given for {n} images: one per image")
        if seed is not None:
            raise ValueError("give seed or seeds, not both")
        return seeds
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    return [seed + i for i in range(n)]
