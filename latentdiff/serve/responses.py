"""AUTOMATIC1111's response bodies: ``/sdapi/v1/txt2img`` and ``img2img`` answer
``{"images": [base64 PNG, ...], "parameters": {the request}, "info": "<JSON string>"}``; each PNG carries its
``parameters`` text chunk (the infotext); with more than one image and ``do_not_save_grid`` false, a grid comes
first (``index_of_first_image`` 1), as AUTOMATIC1111 returns it.
"""

from __future__ import annotations

import base64
import json
import time

import torch

from latentdiff.io.images import SAMPLER_LABELS, make_grid, png_bytes, to_pil
from latentdiff.serve.jobs import Job
from latentdiff.serve.models import VQ_SAMPLER_LABELS, sampler_name
from latentdiff.serve.schemas import GenerationRequest
from latentdiff.version import __version__


def generation_response(job: Job, req: GenerationRequest) -> dict:
    """The JSON body for a finished job (its results: the images it got, fewer when interrupted)."""
    pil = to_pil(torch.stack([image for image, _ in job.results])) if job.results else []
    infotexts = [p.to_text() for _, p in job.results]
    pngs = [png_bytes(im, text) for im, text in zip(pil, infotexts)]
    first = 0
    if len(pil) > 1 and not req.do_not_save_grid:
        pngs.insert(0, png_bytes(make_grid(pil), infotexts[0]))
        infotexts.insert(0, infotexts[0])
        first = 1
    parameters = req.model_dump()
    if "init_images" in parameters and not parameters.get("include_init_images"):
        parameters["init_images"] = None
    images = [base64.b64encode(data).decode("ascii") for data in pngs] if req.send_images else []
    return {"images": images, "parameters": parameters, "info": json.dumps(info(job, req, infotexts, first))}


def info(job: Job, req: GenerationRequest, infotexts: list[str], index_of_first_image: int) -> dict:
    """AUTOMATIC1111's ``Processed.js()`` fields."""
    s, model = job.settings, job.model
    params = [p for _, p in job.results]
    sampler = params[0].sampler if params else s.get("sampler", "")
    n = job.n_images
    extra = {}
    if s.get("eta"):
        extra["Eta"] = s["eta"]
    return {
        "prompt": job.prompts[0], "all_prompts": job.prompts,
        "negative_prompt": job.negatives[0], "all_negative_prompts": job.negatives,
        "seed": job.seeds[0], "all_seeds": job.seeds,
        "subseed": job.subseed, "all_subseeds": [job.subseed + i for i in range(n)],
        "subseed_strength": req.subseed_strength,
        "width": s["width"], "height": s["height"],
        "sampler_name": sampler_name(sampler), "cfg_scale": s["scale"], "steps": s["steps"],
        "batch_size": job.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model.name, "sd_model_hash": model.hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": req.seed_resize_from_w, "seed_resize_from_h": req.seed_resize_from_h,
        "denoising_strength": s.get("strength", getattr(req, "denoising_strength", None)),
        "extra_generation_params": extra,
        "index_of_first_image": index_of_first_image,
        "infotexts": infotexts,
        "styles": req.styles,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": f"latentdiff {__version__}",
    }


def sampler_items(vq: bool = False) -> list[dict]:
    """``/sdapi/v1/samplers``: AUTOMATIC1111's name of each of our samplers, our id as its alias; with ``vq`` (the
    server holds a VQ-Diffusion model) VQ-Diffusion's two samplers as well."""
    labels = {**SAMPLER_LABELS, **VQ_SAMPLER_LABELS} if vq else SAMPLER_LABELS
    return [{"name": label, "aliases": [sid], "options": {}} for sid, label in labels.items()]
