"""A validated request as work for the worker: :class:`Job` holds one request's images (prompt, negative prompt
and seed of each) and the settings that must match for requests to share one ``generate`` call (:attr:`Job.key`).
:func:`plan_job` checks an AUTOMATIC1111 request against the limits and the model and raises
:class:`RequestError` (answered with a 422) for anything wrong, so that the worker only ever runs valid work.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import itertools
import random
import time
from dataclasses import dataclass, field

from latentdiff.serve.models import ModelSet, ServedModel, sampler_for
from latentdiff.serve.schemas import SEED_MAX, GenerationRequest, Img2ImgRequest, Limits, unsupported

CFG_MAX = 100.0  # classifier-free guidance scale at most (AUTOMATIC1111's UI stops at 30)
_unique = itertools.count()


class RequestError(ValueError):
    """A client's mistake: answered with ``status`` (422 unless said otherwise) and this message."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass
class Job:
    """One request's images and settings. ``key`` is equal for requests that may run in one generate call."""

    kind: str  # "txt2img" or "img2img"
    model: ServedModel
    prompts: list[str]  # one per image (batch_size * n_iter)
    negatives: list[str]
    seeds: list[int]
    settings: dict  # generate() keyword arguments shared by the whole call: steps, scale, sampler, height, ...
    key: tuple
    batch_size: int  # images per iteration (VQ-Diffusion: one random stream per iteration)
    subseed: int = -1
    arrival: float = field(default_factory=time.monotonic)
    results: list = field(default_factory=list)  # (image (3, H, W) tensor in [-1, 1], GenerationParams) each
    interrupted: bool = False

    @property
    def n_images(self) -> int:
        return len(self.prompts)


def plan_job(req: GenerationRequest, kind: str, models: ModelSet, limits: Limits) -> Job:
    """The :class:`Job` of a request; :class:`RequestError` for anything this server cannot or will not do."""
    bad = unsupported(req)
    if bad:
        raise RequestError(f"not supported by this server: {', '.join(bad)}")
    for name in ("prompt", "negative_prompt"):
        if len(getattr(req, name)) > limits.max_prompt_chars:
            raise RequestError(f"{name} is {len(getattr(req, name))} characters long; the limit is "
                               f"{limits.max_prompt_chars}")
    model = _model_of(req, models)
    pipe = model.pipe
    n = req.batch_size * req.n_iter
    if n > limits.max_images:
        raise RequestError(f"batch_size * n_iter = {n} images; the limit is {limits.max_images} per request")
    sampler = _sampler_of(req, pipe.default_sampler, model.is_vq)
    scheduler = (req.scheduler or "automatic").lower()
    if scheduler == "karras" and not model.is_vq and sampler in ("dpmpp_2m", "dpmpp_2m_karras"):
        sampler = "dpmpp_2m_karras"  # AUTOMATIC1111 1.9+: sampler "DPM++ 2M" with scheduler "Karras"
    elif scheduler != "automatic":
        raise RequestError(f"unknown scheduler {req.scheduler!r}; 'automatic' (each sampler's own timesteps), or "
                           f"'karras' with the sampler 'DPM++ 2M'")
    steps = pipe.default_steps if req.steps is None else req.steps
    top = min(limits.max_steps, pipe.schedule.num_timesteps)
    if steps > top:
        raise RequestError(f"steps={steps}: at most {top}")
    scale = pipe.default_scale if req.cfg_scale is None else req.cfg_scale
    if scale > CFG_MAX:
        raise RequestError(f"cfg_scale={scale:g}: at most {CFG_MAX:g}")
    eta = _eta_of(req.eta, sampler, model.is_vq)

    settings = {"steps": steps, "scale": scale, "eta": eta, "sampler": sampler}
    init_digest = strength = None
    if kind == "img2img":
        if model.is_vq:
            raise RequestError(f"img2img needs a latent-diffusion model; {model.name!r} is a VQ-Diffusion model")
        init_image, init_digest = _init_image(req, limits)
        strength = req.denoising_strength
        settings.update(init_image=init_image, strength=strength)
        default_hw = _fitted(init_image, pipe.size_multiple)
        from latentdiff.pipelines.init_image import start_step

        try:
            start_step(steps, strength)
        except ValueError as e:
            raise RequestError(str(e)) from None
    else:
        default_hw = (pipe.config.image_size, pipe.config.image_size)
    height = default_hw[0] if req.height is None else req.height
    width = default_hw[1] if req.width is None else req.width
    if width * height > limits.max_pixels:
        raise RequestError(f"width x height = {width} x {height} = {width * height} pixels; the limit is "
                           f"{limits.max_pixels}")
    try:
        pipe.check_size(height, width)
    except ValueError as e:
        raise RequestError(str(e)) from None
    settings.update(height=height, width=width)

    seed = req.seed if req.seed != -1 else random.randrange(SEED_MAX - n + 1)
    subseed = req.subseed if req.subseed != -1 else random.randrange(SEED_MAX + 1)
    key = (model.name, kind, height, width, steps, sampler, scale, eta, init_digest, strength)
    if model.is_vq:  # one random stream per call: a VQ-Diffusion request never shares its calls
        key += (next(_unique),)
    else:  # every row of a call is padded to the most prompt chunks in it: only equal counts share a call
        key += (_chunks(pipe, req.prompt, req.negative_prompt if scale != 1 else None),)
    return Job(kind, model, [req.prompt] * n, [req.negative_prompt] * n, [seed + i for i in range(n)], settings,
               key, req.batch_size, subseed)


def _chunks(pipe, prompt: str, negative: str | None) -> int:
    """The chunks of the text encoder's context (75 tokens each for CLIP) the prompt and, under guidance, the
    negative prompt take: a call encodes every row with the most chunks of any (models/prompt_encoding.py)."""
    from latentdiff.models.prompt_encoding import chunk_prompts

    texts = [prompt] if negative is None else [prompt, negative]
    try:
        return max(len(chunks) for chunks in chunk_prompts(pipe.text_encoder, texts))
    except ValueError as e:  # a prompt the parser refuses
        raise RequestError(f"prompt: {e}") from None


def _model_of(req: GenerationRequest, models: ModelSet) -> ServedModel:
    override = dict(req.override_settings or {})
    name = override.pop("sd_model_checkpoint", None)
    if override:
        raise RequestError(f"override_settings: only sd_model_checkpoint can be set, not {', '.join(override)}")
    if name is None:
        return models.current
    if not isinstance(name, str):
        raise RequestError(f"override_settings.sd_model_checkpoint must be a model name, got {name!r}")
    try:
        return models.find(name)
    except ValueError as e:
        raise RequestError(str(e)) from None


def _sampler_of(req: GenerationRequest, default: str, vq: bool) -> str:
    name = req.sampler_name or req.sampler_index
    if not name:
        return default
    try:
        return sampler_for(name, vq) or default
    except ValueError as e:
        raise RequestError(str(e)) from None


def _eta_of(eta: float | None, sampler: str, vq: bool) -> float:
    """The eta generate() gets. AUTOMATIC1111 applies eta to DDIM (default 0) and to ancestral samplers, whose
    eta 1 is Euler a itself; other samplers ignore it. ``Euler a`` with another eta is refused."""
    if vq:
        return 0.0
    if sampler == "ddim":
        return 0.0 if eta is None else float(eta)
    if sampler == "euler_a" and eta is not None and eta != 1:
        raise RequestError(f"eta={eta:g}: Euler a runs with eta 1 only (use DDIM for another eta)")
    return 0.0


def _init_image(req: Img2ImgRequest, limits: Limits):
    """The one init image of an img2img request as RGB PIL, and a digest of its pixels."""
    from PIL import Image, UnidentifiedImageError

    if len(req.init_images) != 1:
        raise RequestError(f"init_images must hold exactly one image, got {len(req.init_images)}")
    text = req.init_images[0]
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("init_images[0] is not valid base64") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > 4 * limits.max_pixels:
                raise RequestError(f"init_images[0] is {w} x {h} pixels; at most {4 * limits.max_pixels} in all")
            image = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        if isinstance(e, RequestError):
            raise
        raise RequestError(f"init_images[0] is not a readable image ({e})") from None
    return image, hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()


def _fitted(image, multiple: int) -> tuple[int, int]:
    from latentdiff.pipelines.init_image import fitted_size

    return fitted_size(image, multiple)
