"""The HTTP API's request bodies and limits: AUTOMATIC1111's field names and JSON types (its
``StableDiffusionTxt2ImgProcessingAPI`` and ``StableDiffusionImg2ImgProcessingAPI``), so that its clients work
unchanged, and :class:`Limits`, the server's upper bounds.

Fields AUTOMATIC1111 gives a fixed default (``steps`` 50, ``cfg_scale`` 7, 512 x 512, its default sampler) default
to ``None`` here, which means the model's own (``pipe.default_steps``, ``default_scale``, ``default_sampler``,
``config.image_size``). Fields of features this server does not have (hires fix, face restoration, tiling,
variation seeds, styles, scripts, inpainting masks) are accepted at their AUTOMATIC1111 defaults and refused with a
422 otherwise (:func:`unsupported`); unknown fields are ignored, as AUTOMATIC1111 does. Floats must be finite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SEED_MAX = 2**32 - 1  # seeds are 32-bit, as AUTOMATIC1111's; -1 means random


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what one request may ask for and on the server's queue."""

    max_pixels: int = 1024 * 1024  # width * height of one image
    max_steps: int = 150
    max_images: int = 16  # n_iter * batch_size of one request
    max_prompt_chars: int = 2000  # prompt and negative prompt, each
    max_body_bytes: int = 16 * 2**20  # request body (img2img carries its init image in base64)
    max_queue: int = 64  # requests waiting for the worker; beyond it: 503 with Retry-After

    def __post_init__(self):
        for name, value in vars(self).items():
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"limit {name}={value!r} must be a positive integer")


class GenerationRequest(BaseModel):
    """What txt2img and img2img share (AUTOMATIC1111's ``StableDiffusionProcessing`` fields)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = Field(-1, ge=-1, le=SEED_MAX, description="-1: random")
    subseed: int = Field(-1, ge=-1, le=SEED_MAX)
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = Field(None, description="'Euler a', 'DPM++ 2M', 'DPM++ 2M Karras', 'DDIM', "
                                                       "'DDPM' (or our ids); "
                                                       "default: the model's own")
    scheduler: str | None = Field(None, description="'automatic' (each sampler's own timesteps), or 'karras' "
                                                    "with 'DPM++ 2M'")
    sampler_index: str | None = Field(None, description="deprecated: sampler_name")
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int | None = Field(None, ge=1, description="default: the model's own")
    cfg_scale: float | None = Field(None, ge=0, description="default: the model's own")
    width: int | None = Field(None, ge=1, description="default: the model's size (img2img: the init image's)")
    height: int | None = Field(None, ge=1, description="default: the model's size (img2img: the init image's)")
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = Field(None, ge=0, description="DDIM's eta (default 0); Euler a accepts only 1")
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = Field(None, description="only sd_model_checkpoint")
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = Field(False, description="ignored: the server writes no files")
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None


class Txt2ImgRequest(GenerationRequest):
    """``POST /sdapi/v1/txt2img``."""

    enable_hr: bool = False
    denoising_strength: float | None = Field(None, ge=0, le=1, description="hires fix only: ignored")
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(GenerationRequest):
    """``POST /sdapi/v1/img2img``: ``init_images`` holds one base64 PNG/JPEG (a ``data:`` URL prefix is allowed);
    ``denoising_strength`` in (0, 1]."""

    init_images: list[str] = Field(default_factory=list)
    resize_mode: int = Field(0, description="only 0 (just resize)")
    image_cfg_scale: float | None = None
    denoising_strength: float = Field(0.75, gt=0, le=1)
    mask: str | None = None
    mask_blur: int | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


# field -> the values that mean "feature not used" (AUTOMATIC1111's defaults and what its clients send)
_UNUSED = {
    "styles": ([],), "subseed_strength": (0, 0.0), "restore_faces": (None, False), "tiling": (None, False),
    "seed_resize_from_h": (-1, 0), "seed_resize_from_w": (-1, 0), "s_noise": (None, 1, 1.0),
    "refiner_checkpoint": (None, ""), "script_name": (None, ""), "script_args": ([],), "alwayson_scripts": ({},),
    "enable_hr": (False,), "mask": (None, ""), "latent_mask": (None, ""), "resize_mode": (0,),
    "initial_noise_multiplier": (None, 1, 1.0),
}


def unsupported(request: GenerationRequest) -> list[str]:
    """The fields of ``request`` that ask for a feature this server does not have (``name=value`` each)."""
    out = []
    for name, allowed in _UNUSED.items():
        if name in type(request).model_fields:
            value = getattr(request, name)
            if value not in allowed:
                out.append(f"{name}={value!r}")
    return out


class OptionsUpdate(BaseModel):
    """``POST /sdapi/v1/options``: only the model checkpoint can be set."""

    model_config = ConfigDict(extra="forbid")

    sd_model_checkpoint: str | None = None
