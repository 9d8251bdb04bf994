"""Text-to-image pipelines and :func:`load_pipeline`, the entry point.

    pipe = load_pipeline()                                   # the embedded default model
    pipe = load_pipeline("model.safetensors", device="cuda", dtype=torch.bfloat16)
    images = pipe(["a photo of a cat", "a photo of a ship"], steps=25, scale=5.0, seed=0)

A path may be the project's own model file, a Stable Diffusion single file (.safetensors/.ckpt, original
layout) or a diffusers folder (``model_index.json``). Modules: ``base`` (what every pipeline shares), ``latent``
(latent diffusion), ``vq`` (VQ-Diffusion), ``load`` (checkpoint -> pipeline).
"""

from latentdiff.io.images import GenerationParams, parse_parameters
from latentdiff.pipelines.base import Pipeline
from latentdiff.pipelines.latent import LatentDiffusionPipeline
from latentdiff.pipelines.load import PIPELINES, load_pipeline, load_stable_diffusion, load_vq_diffusion_folder
from latentdiff.pipelines.vq import VQDiffusionPipeline, VQGenerationParams

__all__ = ["PIPELINES", "GenerationParams", "LatentDiffusionPipeline", "Pipeline", "VQDiffusionPipeline",
           "VQGenerationParams", "load_pipeline", "load_stable_diffusion", "load_vq_diffusion_folder",
           "parse_parameters"]
