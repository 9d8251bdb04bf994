"""Read a diffusers VQ-Diffusion folder (e.g. ``microsoft/vq-diffusion-ithq``) into a config and state dicts.

Layout (``model_index.json`` with ``"_class_name": "VQDiffusionPipeline"``)::

    vqvae/                                          VQModel             -> parts["vqvae"]
    transformer/                                    Transformer2DModel  -> parts["transformer"]
    learned_classifier_free_sampling_embeddings/    null condition      -> parts["transformer"]["null_context"]
    text_encoder/                                   CLIPTextModel       -> parts["text_encoder"]
    scheduler/scheduler_config.json                 VQDiffusionScheduler -> DiscreteScheduleConfig
    tokenizer/                                      not read: latentdiff's CLIP BPE tokenizer gives the same ids

Key and config conversion live in :mod:`latentdiff.io.convert_vq`; the pipeline is built by
:func:`latentdiff.pipelines.load.load_vq_diffusion_folder`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from latentdiff.config import DiscreteScheduleConfig, VQDiffusionConfig, from_dict
from latentdiff.io.checkpoint import CheckpointError, check_finite
from latentdiff.io.convert_text import text_config_from_hf
from latentdiff.io.convert_vq import (
    transformer_config_from_diffusers,
    transformer_state_dict_from_diffusers,
    vq_model_config_from_diffusers,
    vq_model_state_dict_from_diffusers,
)
from latentdiff.io.diffusers_folder import pipeline_class, read_component, read_json
from latentdiff.io.stable_diffusion import hf_text_weights

PIPELINE_CLASS = "VQDiffusionPipeline"
NULL_EMBEDDINGS = "learned_classifier_free_sampling_embeddings"


def is_vq_diffusion_folder(path: str | Path) -> bool:
    """True for a folder whose ``model_index.json`` names diffusers' ``VQDiffusionPipeline``."""
    return pipeline_class(path) == PIPELINE_CLASS


def schedule_config_from_diffusers(sched: dict, num_codes: int) -> DiscreteScheduleConfig:
    """``VQDiffusionScheduler`` config -> :class:`DiscreteScheduleConfig` (its defaults for missing keys)."""
    classes = sched.get("num_vec_classes")
    if classes is not None and int(classes) != num_codes + 1:
        raise ValueError(f"scheduler num_vec_classes={classes} must be the VQ codebook size + 1 = {num_codes + 1}")
    defaults = DiscreteScheduleConfig()
    return from_dict(DiscreteScheduleConfig, {
        "num_timesteps": int(sched.get("num_train_timesteps", defaults.num_timesteps)),
        "alpha_cumprod_start": float(sched.get("alpha_cum_start", defaults.alpha_cumprod_start)),
        "alpha_cumprod_end": float(sched.get("alpha_cum_end", defaults.alpha_cumprod_end)),
        "gamma_cumprod_start": float(sched.get("gamma_cum_start", defaults.gamma_cumprod_start)),
        "gamma_cumprod_end": float(sched.get("gamma_cum_end", defaults.gamma_cumprod_end)),
    })


def vq_diffusion_from_diffusers(configs: dict[str, dict], weights: dict[str, dict[str, torch.Tensor]],
                                source: str = "diffusers model") -> tuple[VQDiffusionConfig, dict[str, dict]]:
    """``(config, {"vqvae", "transformer", "text_encoder": state dict})`` from the diffusers components' configs
    and state dicts, keyed by their folder names (``scheduler`` and the null embeddings' config may be missing).

    The text states are L2-normalised per token (``normalize_context``), as diffusers' pipeline feeds them; the
    sampling defaults are diffusers' (guidance scale 5, no truncation).
    """
    try:
        vq_cfg = vq_model_config_from_diffusers(configs["vqvae"])
        text_cfg = text_config_from_hf(configs["text_encoder"])
        tf_cfg = transformer_config_from_diffusers(configs["transformer"], configs.get(NULL_EMBEDDINGS),
                                                   context_length=text_cfg.context_length)
        schedule = schedule_config_from_diffusers(configs.get("scheduler", {}), vq_cfg.num_codes)
        cfg = VQDiffusionConfig(image_size=tf_cfg.latent_size * vq_cfg.downsample_factor, vqvae=vq_cfg,
                                transformer=tf_cfg, text_encoder=text_cfg, schedule=schedule)
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{source}: unsupported configuration: {e}") from None
    null_context = None
    if tf_cfg.learned_null_context:
        null = weights.get(NULL_EMBEDDINGS, {})
        if "embeddings" not in null:
            raise CheckpointError(f"{source}: {NULL_EMBEDDINGS} has no 'embeddings' tensor (keys: {sorted(null)})")
        null_context = null["embeddings"]
    try:
        parts = {"vqvae": vq_model_state_dict_from_diffusers(weights["vqvae"]),
                 "transformer": transformer_state_dict_from_diffusers(weights["transformer"], null_context),
                 "text_encoder": hf_text_weights(weights["text_encoder"])}
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{source}: the weights do not fit their config.json: {e}") from None
    for name, sd in parts.items():
        check_finite(sd, f"{source} ({name})")
    return cfg, parts


def read_vq_diffusion_folder(folder: str | Path) -> tuple[VQDiffusionConfig, dict[str, dict[str, torch.Tensor]]]:
    """:func:`vq_diffusion_from_diffusers` on the files of a diffusers VQ-Diffusion folder."""
    folder = Path(folder)
    if not is_vq_diffusion_folder(folder):
        raise CheckpointError(f"{folder} is not a diffusers VQ-Diffusion folder (model_index.json with "
                              f"\"_class_name\": \"{PIPELINE_CLASS}\")")
    configs = {name: read_json(folder / name / "config.json") for name in ("vqvae", "transformer", "text_encoder")}
    for name, path in ((NULL_EMBEDDINGS, folder / NULL_EMBEDDINGS / "config.json"),
                       ("scheduler", folder / "scheduler" / "scheduler_config.json")):
        if path.is_file():
            configs[name] = read_json(path)
    weights = {name: read_component(folder, name) for name in ("vqvae", "transformer", "text_encoder")}
    weights[NULL_EMBEDDINGS] = read_component(folder, NULL_EMBEDDINGS, required=False)
    return vq_diffusion_from_diffusers(configs, weights, str(folder))
