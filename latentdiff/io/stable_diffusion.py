"""Load Stable Diffusion 1.x / 2.x weights: original single files and diffusers folders, with no network.

Single files (CompVis layout, ``.safetensors`` or ``.ckpt``) hold ``model.diffusion_model.*`` (U-Net),
``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.*`` (SD 1: CLIP ViT-L/14 in transformers' layout)
or ``cond_stage_model.model.*`` (SD 2: OpenCLIP ViT-H/14), and optionally ``model_ema.*`` (EMA copy of the U-Net,
names with the dots removed, as CompVis' ``LitEma`` stores them). EMA weights are used by default when the file
holds a complete copy. Only the tensors the pipeline uses are read (an EMA file's second U-Net is not).

The architecture is read off the weights (channels, levels, attention levels, context width, conv vs linear
projections, text tower shape); what weights cannot say comes from the family's bundled YAML in ``configs/``
(``sd15.yaml``, ``sd2_base.yaml``, ``sd2_768_v.yaml``): head layout, schedule, text activation and layer, image
size. The family is the text encoder's: CLIP -> SD 1.x, OpenCLIP -> SD 2.x. Choices the weights leave open are
reported by a warning, never guessed silently:

- SD 2.x base (ε) and SD 2.x 768-v (v-prediction) share one architecture: unless ``prediction_type`` is given,
  ε is assumed.
- a U-Net of non-released size takes its family's head layout unless ``unet.num_heads`` /
  ``unet.num_head_channels`` is given in ``overrides``.

``overrides`` are dotted ``key=value`` settings applied to the inferred config (``config.apply_overrides``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from latentdiff.assets import SD_CONFIGS_DIR
from latentdiff.config import (
    LatentDiffusionConfig,
    ScheduleConfig,
    apply_overrides,
    from_dict,
    load_config,
    model_config_from_dict,
    to_dict,
)
from latentdiff.io.checkpoint import CheckpointError, check_finite
from latentdiff.io.convert_text import openclip_text_to_hf, text_config_from_hf, text_config_from_state_dict
from latentdiff.io.convert_unet import (
    unet_config_from_diffusers,
    unet_config_from_state_dict,
    unet_state_dict_from_diffusers,
)
from latentdiff.io.convert_vae import (
    autoencoder_config_from_diffusers,
    autoencoder_config_from_state_dict,
    vae_state_dict_from_diffusers,
)
from latentdiff.io.diffusers_folder import MODEL_INDEX, read_component, read_json
from latentdiff.io.formats import detect_format
from latentdiff.io.safetensors_stream import TensorSource

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
NOT_TEXT_WEIGHTS = ("position_ids", "logit_scale", "attn_mask")  # buffers and CLIP's contrastive scale
RELEASED_MODEL_CHANNELS = 320  # every SD 1.x / 2.x U-Net
Parts = dict[str, dict[str, torch.Tensor]]


# -- family defaults ----------------------------------------------------------------------------------------------

def family_config(text_kind: str, prediction_type: str | None) -> LatentDiffusionConfig:
    """The bundled config of the family the text encoder identifies (``clip``: SD 1.x, ``openclip``: SD 2.x)."""
    if text_kind == "clip":
        name = "sd15.yaml"
    else:
        name = "sd2_768_v.yaml" if prediction_type == "v_prediction" else "sd2_base.yaml"
    path = SD_CONFIGS_DIR / name
    if not path.is_file():
        raise CheckpointError(f"the bundled Stable Diffusion config {path} is missing from this install")
    return load_config(path)


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)


def _gives(overrides: list[str], *keys: str) -> bool:
    return any(o.split("=", 1)[0].strip() in keys for o in overrides)


def _finish_config(data: dict, overrides: list[str], source: str) -> LatentDiffusionConfig:
    """Apply dotted overrides to a full config dict and validate it; errors name the source."""
    try:
        return model_config_from_dict(apply_overrides(data, list(overrides)))
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


# -- single files ---------------------------------------------------------------------------------------------------

def _ema_key(unet_key: str) -> str:
    """``model_ema.diffusion_model<name without dots>`` (CompVis LitEma naming)."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def _unet_keys(source: TensorSource, use_ema: bool | None) -> dict[str, str]:
    """U-Net parameter name -> key to read: the EMA copy by default when complete, else the raw weights."""
    raw = {k[len(UNET_PREFIX):]: k for k in source.keys() if k.startswith(UNET_PREFIX)}
    keys = set(source.keys())
    has_ema = bool(raw) and all(_ema_key(k) in keys for k in raw)
    if use_ema and not has_ema:
        raise CheckpointError(f"{source.path}: EMA weights were asked for but the file holds no complete "
                              f"'{EMA_PREFIX}*' copy of the U-Net")
    if has_ema and use_ema is not False:
        return {k: _ema_key(k) for k in raw}
    return raw


def _clip_name(key: str) -> str:
    """``transformer.[text_model.]x`` -> ``transformer.text_model.x`` (files from before transformers 4.x lack
    ``text_model.``)."""
    return "transformer.text_model." + key.removeprefix("transformer.").removeprefix("text_model.")


def read_single_file(path: str | Path, use_ema: bool | None = None) -> tuple[str, Parts]:
    """``(text_kind, parts)`` of an original-layout file: CompVis-named U-Net / VAE weights and the text weights
    as latentdiff's encoders name them (``transformer.text_model.*`` for ``clip``, ``model.*`` for ``openclip``).

    ``use_ema``: ``None`` takes the EMA U-Net when the file holds one, ``True`` requires it, ``False`` refuses it.
    """
    path = Path(path)
    source = TensorSource(path)
    keys = source.keys()
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise CheckpointError(f"{path} looks like a Stable Diffusion XL checkpoint, which is not supported "
                              f"(only SD 1.x and 2.x)")
    if not any(k.startswith(UNET_PREFIX) for k in keys) or not any(k.startswith(VAE_PREFIX) for k in keys):
        raise CheckpointError(f"{path} is not a Stable Diffusion checkpoint: no '{UNET_PREFIX}*' or '{VAE_PREFIX}*' "
                              f"weights (a diffusers component file? pass the pipeline folder instead)")
    if any(k.startswith(SD2_TEXT_PREFIX) for k in keys):
        text_kind = "openclip"
    elif any(k.startswith(SD1_TEXT_PREFIX) for k in keys):
        text_kind = "clip"
    else:
        raise CheckpointError(f"{path} holds no text encoder ('{SD1_TEXT_PREFIX}*' or '{SD2_TEXT_PREFIX}*')")

    unet = {name: source.get(key) for name, key in _unet_keys(source, use_ema).items()}
    vae = {k[len(VAE_PREFIX):]: source.get(k) for k in keys
           if k.startswith(VAE_PREFIX) and not k.startswith(VAE_PREFIX + "loss.")}  # training-only LPIPS/GAN
    text = {k[len(TEXT_PREFIX):]: source.get(k) for k in keys
            if k.startswith(TEXT_PREFIX) and not k.endswith(NOT_TEXT_WEIGHTS)}
    if text_kind == "clip":
        text = {_clip_name(k): v for k, v in text.items() if k.startswith("transformer.")}
    else:
        text = {k: v for k, v in text.items() if k.startswith("model.")}
    return text_kind, {"unet": unet, "autoencoder": vae, "text_encoder": text}


def single_file_config(parts: Parts, text_kind: str, prediction_type: str | None = None,
                       overrides: list[str] = (), source: str = "checkpoint") -> LatentDiffusionConfig:
    """Infer the config of an original-layout file's weights (see the module docstring)."""
    base = family_config(text_kind, prediction_type)
    if text_kind == "openclip" and prediction_type is None and not _gives(overrides, "schedule.prediction_type"):
        _warn(f"{source}: SD 2.x base (epsilon) and SD 2.x 768-v (v_prediction) share one architecture; assuming "
              f"prediction_type='epsilon'. Pass prediction_type='v_prediction' (tools: --prediction-type "
              f"v_prediction) for 768-v checkpoints, or prediction_type='epsilon' to silence this warning.")
    try:
        unet_cfg = unet_config_from_state_dict(parts["unet"], num_heads=base.unet.num_heads,
                                               num_head_channels=base.unet.num_head_channels)
        ae_cfg = autoencoder_config_from_state_dict(parts["autoencoder"],
                                                    scaling_factor=base.autoencoder.scaling_factor)
        # Shapes from the weights; what weights cannot say (activation, which layer feeds the U-Net) from the family.
        text_cfg = text_config_from_state_dict(parts["text_encoder"], text_kind, act=base.text_encoder.act,
                                               layer=base.text_encoder.layer,
                                               openclip_model=base.text_encoder.openclip_model)
    except ValueError as e:
        raise CheckpointError(f"{source}: cannot read the architecture off the weights: {e}") from None
    if (unet_cfg.model_channels != RELEASED_MODEL_CHANNELS
            and not _gives(overrides, "unet.num_heads", "unet.num_head_channels")):
        layout = (f"num_heads={base.unet.num_heads}" if base.unet.num_heads is not None
                  else f"num_head_channels={base.unet.num_head_channels}")
        _warn(f"{source}: the U-Net (model_channels={unet_cfg.model_channels}) is not a released Stable Diffusion "
              f"size and its weights do not record the attention head layout; assuming the family's {layout}. "
              f"To choose, pass overrides=['unet.num_head_channels=64'] (or unet.num_heads=N) to load_pipeline, or "
              f"--set the same in `latentdiff convert`.")
    data = to_dict(base)
    data.update(unet=to_dict(unet_cfg), autoencoder=to_dict(ae_cfg), text_encoder=to_dict(text_cfg))
    if prediction_type is not None:
        data["schedule"]["prediction_type"] = prediction_type
    return _finish_config(data, overrides, source)


def load_single_file(path: str | Path, prediction_type: str | None = None, use_ema: bool | None = None,
                     overrides: list[str] = ()) -> tuple[LatentDiffusionConfig, Parts]:
    """``(config, {"unet": sd, "autoencoder": sd, "text_encoder": sd})`` from an original-layout file."""
    text_kind, parts = read_single_file(path, use_ema)
    cfg = single_file_config(parts, text_kind, prediction_type, overrides, str(path))
    _check_parts(parts, str(path))
    return cfg, parts


# -- diffusers folders ----------------------------------------------------------------------------------------------

_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


def schedule_config_from_diffusers(sched: dict, prediction_type: str | None = None) -> ScheduleConfig:
    """A diffusers scheduler config (``scheduler_config.json``) as our :class:`ScheduleConfig`."""
    if sched.get("trained_betas") is not None:
        raise ValueError("schedulers with explicit trained_betas are not supported")
    name = sched.get("beta_schedule", "scaled_linear")
    if name not in _BETA_SCHEDULES:
        raise ValueError(f"beta_schedule={name!r} is not one of {sorted(_BETA_SCHEDULES)}")
    return from_dict(ScheduleConfig, {
        "beta_schedule": _BETA_SCHEDULES[name],
        "num_timesteps": sched.get("num_train_timesteps", 1000),
        "beta_start": sched.get("beta_start", 0.00085),
        "beta_end": sched.get("beta_end", 0.012),
        "prediction_type": prediction_type or sched.get("prediction_type", "epsilon"),
        "timestep_spacing": sched.get("timestep_spacing", "leading"),
        "steps_offset": sched.get("steps_offset", 1 if sched.get("timestep_spacing", "leading") == "leading" else 0),
        "rescale_betas_zero_snr": bool(sched.get("rescale_betas_zero_snr", False)),
    })


def hf_text_weights(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModel`` state dict (any transformers version) as latentdiff's ``clip`` encoder
    names it (``transformer.text_model.*``); a projection (``CLIPTextModelWithProjection``) is dropped."""
    if any(k.startswith("transformer.resblocks.") for k in sd):  # an OpenCLIP tower saved in the folder
        sd = openclip_text_to_hf(sd)
    return {"transformer.text_model." + k.removeprefix("text_model."): v for k, v in sd.items()
            if not k.startswith("text_projection") and not k.endswith("position_ids")}


def load_diffusers_folder(folder: str | Path, prediction_type: str | None = None,
                          overrides: list[str] = ()) -> tuple[LatentDiffusionConfig, Parts]:
    """``(config, parts)`` from a diffusers Stable Diffusion folder (``model_index.json`` at its root)."""
    folder = Path(folder)
    if not (folder / MODEL_INDEX).is_file():
        raise CheckpointError(f"{folder} is not a diffusers pipeline folder (no {MODEL_INDEX})")
    index = read_json(folder / MODEL_INDEX)
    kind = index.get("_class_name", "?")
    if "text_encoder_2" in index or not all(k in index for k in ("unet", "vae", "text_encoder")):
        raise CheckpointError(f"{folder} holds a diffusers {kind}, not a Stable Diffusion 1.x/2.x pipeline "
                              f"(unet, vae and one text_encoder)")
    unet_json = read_json(folder / "unet" / "config.json")
    vae_json = read_json(folder / "vae" / "config.json")
    text_json = read_json(folder / "text_encoder" / "config.json")
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched_json = read_json(sched_path) if sched_path.is_file() else {}
    try:
        unet_cfg = unet_config_from_diffusers(unet_json)
        ae_cfg = autoencoder_config_from_diffusers(vae_json)
        text_cfg = text_config_from_hf(text_json)
        schedule = schedule_config_from_diffusers(sched_json, prediction_type)
    except ValueError as e:
        raise CheckpointError(f"{folder}: unsupported configuration: {e}") from None
    if (prediction_type is None and "prediction_type" not in sched_json and unet_cfg.context_dim == 1024
            and not _gives(overrides, "schedule.prediction_type")):
        _warn(f"{folder}: the scheduler config does not say the prediction type of this SD 2.x-like model; assuming "
              f"'epsilon'. Pass prediction_type='v_prediction' for 768-v models, or 'epsilon' to silence this.")
    try:
        unet = unet_state_dict_from_diffusers(read_component(folder, "unet"), unet_cfg)
        vae = vae_state_dict_from_diffusers(read_component(folder, "vae"))
        text = hf_text_weights(read_component(folder, "text_encoder"))
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{folder}: the weights do not fit their config.json: {e}") from None
    data = to_dict(LatentDiffusionConfig(unet=unet_cfg, autoencoder=ae_cfg, text_encoder=text_cfg,
                                         schedule=schedule, image_size=_image_size(unet_json, unet_cfg, ae_cfg)))
    cfg = _finish_config(data, overrides, str(folder))
    parts = {"unet": unet, "autoencoder": vae, "text_encoder": text}
    _check_parts(parts, str(folder))
    return cfg, parts


def _image_size(unet_json: dict, unet_cfg, ae_cfg) -> int:
    """The U-Net's ``sample_size`` in pixels, rounded to a size the model can sample."""
    factor = ae_cfg.downsample_factor * unet_cfg.downsample_factor
    size = int(unet_json.get("sample_size", 64)) * ae_cfg.downsample_factor
    return max(factor, size // factor * factor)


# -- both -----------------------------------------------------------------------------------------------------------

def _check_parts(parts: Parts, source: str) -> None:
    for name, sd in parts.items():
        check_finite(sd, f"{source} ({name})")


def unify_dtype(parts: Parts, dtype: torch.dtype | None = None) -> Parts:
    """Cast every floating tensor to ``dtype`` (default: the U-Net's dominant floating dtype, i.e. the file's), so
    that a file mixing precisions (e.g. an fp32 VAE beside an fp16 U-Net) gives modules of one dtype."""
    if dtype is None:
        counts: dict[torch.dtype, int] = {}
        for v in parts["unet"].values():
            if v.is_floating_point():
                counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
        dtype = max(counts, key=counts.get) if counts else torch.float32
    return {name: {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
            for name, sd in parts.items()}


def read_stable_diffusion(path: str | Path, prediction_type: str | None = None, use_ema: bool | None = None,
                          overrides: list[str] = ()) -> tuple[LatentDiffusionConfig, Parts]:
    """``(config, parts)`` from a single file (``.safetensors``/``.ckpt``) or a diffusers folder."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "latentdiff":
        raise CheckpointError(f"{path} is a latentdiff model file, not a Stable Diffusion checkpoint")
    if fmt == "diffusers":
        if use_ema:
            raise CheckpointError(f"{path}: a diffusers folder holds one U-Net; EMA selection applies to single files")
        return load_diffusers_folder(path, prediction_type, overrides)
    return load_single_file(path, prediction_type, use_ema, overrides)
