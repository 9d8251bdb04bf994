"""Typed configuration for every component.

Each component has a dataclass validated in ``__post_init__`` (a ``ValueError`` names the bad value).
A whole model is a :class:`LatentDiffusionConfig` or :class:`VQDiffusionConfig`; YAML files map onto them
through :data:`MODEL_CONFIGS`, keyed by their ``type`` field (no import-path strings).

    cfg = load_config("configs/cifar10_ldm.yaml", overrides=["unet.model_channels=64"])
    save_config(cfg, "resolved.yaml")

Unknown keys, in files or in dotted overrides, are errors.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    _check(value in choices, f"{name}={value!r} is not one of {list(choices)}")


def _check_positive(name: str, value: float) -> None:
    _check(value > 0, f"{name}={value!r} must be > 0")


# --------------------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ScheduleConfig:
    """Gaussian diffusion: beta schedule and what the network predicts."""

    beta_schedule: str = "scaled_linear"  # linear (DDPM) | scaled_linear (Stable Diffusion) | cosine (iDDPM)
    num_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"  # epsilon | v_prediction | sample
    # Sampling-time defaults: how inference timesteps are spaced (diffusers' names), as the model was released.
    timestep_spacing: str = "leading"  # leading | trailing | linspace
    steps_offset: int = 1  # Stable Diffusion uses 1 with "leading"

    def __post_init__(self):
        _check_choice("schedule.timestep_spacing", self.timestep_spacing, ("leading", "trailing", "linspace"))
        _check(self.steps_offset >= 0, f"schedule.steps_offset={self.steps_offset!r} must be >= 0")
        _check_choice("schedule.beta_schedule", self.beta_schedule, ("linear", "scaled_linear", "cosine"))
        _check_choice("schedule.prediction_type", self.prediction_type, ("epsilon", "v_prediction", "sample"))
        _check_positive("schedule.num_timesteps", self.num_timesteps)
        _check(0 < self.beta_start < self.beta_end < 1, f"need 0 < beta_start < beta_end < 1, got "
               f"beta_start={self.beta_start!r}, beta_end={self.beta_end!r}")


@dataclass
class UNetConfig:
    """Cross-attention U-Net, Stable Diffusion (CompVis ``openaimodel``) layout.

    ``attention_resolutions`` lists downsampling factors (1 = full latent resolution) at which spatial
    transformers are inserted, as in the original configs. Heads are given by count (``num_heads``) or by
    width (``num_head_channels``, SD 2.x uses 64); exactly one of them is set.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [4, 2, 1])
    num_heads: int | None = 8
    num_head_channels: int | None = None
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    norm_num_groups: int = 32
    dropout: float = 0.0
    gradient_checkpointing: bool = False

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "context_dim",
                     "transformer_depth", "norm_num_groups"):
            _check_positive(f"unet.{name}", getattr(self, name))
        _check(len(self.channel_mult) > 0 and all(m > 0 for m in self.channel_mult),
               f"unet.channel_mult={self.channel_mult!r} must be a non-empty list of positive ints")
        _check((self.num_heads is None) != (self.num_head_channels is None),
               f"set exactly one of unet.num_heads={self.num_heads!r} and "
               f"unet.num_head_channels={self.num_head_channels!r}")
        _check(self.model_channels % self.norm_num_groups == 0,
               f"unet.model_channels={self.model_channels} is not divisible by "
               f"unet.norm_num_groups={self.norm_num_groups}")
        max_factor = 2 ** (len(self.channel_mult) - 1)
        for r in self.attention_resolutions:
            _check(r >= 1 and (r & (r - 1)) == 0 and r <= max_factor,
                   f"unet.attention_resolutions entry {r!r} must be a power of two <= {max_factor}")
        _check(0 <= self.dropout < 1, f"unet.dropout={self.dropout!r} must be in [0, 1)")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass
class AutoencoderKLConfig:
    """KL autoencoder, Stable Diffusion VAE (CompVis ``AutoencoderKL``) layout.

    Latents seen by the diffusion model are ``(z - shift_factor) * scaling_factor``; both factors are applied
    inside ``encode``/``decode``. ``attn_resolutions`` lists downsampling factors (1 = input resolution) whose
    ResNet blocks are followed by self-attention (SD's VAE has none there, only the mid-block attention).
    """

    in_channels: int = 3
    out_channels: int = 3
    z_channels: int = 4
    embed_dim: int = 4
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)
    mid_attention: bool = True
    norm_num_groups: int = 32
    dropout: float = 0.0
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "z_channels", "embed_dim", "ch", "num_res_blocks",
                     "norm_num_groups"):
            _check_positive(f"autoencoder.{name}", getattr(self, name))
        _check(len(self.ch_mult) > 0 and all(m > 0 for m in self.ch_mult),
               f"autoencoder.ch_mult={self.ch_mult!r} must be a non-empty list of positive ints")
        _check(self.ch % self.norm_num_groups == 0,
               f"autoencoder.ch={self.ch} is not divisible by autoencoder.norm_num_groups={self.norm_num_groups}")
        _check_positive("autoencoder.scaling_factor", self.scaling_factor)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class TextEncoderConfig:
    """Text encoder: ``trainable`` (ours, from scratch), ``clip`` (transformers CLIPTextModel, SD 1.x) or
    ``openclip`` (OpenCLIP text tower, SD 2.x). All are tokenised with the CLIP BPE vocabulary.

    ``pretrained`` names weights for ``clip``/``openclip`` (a hub id, open_clip tag or local path); ``None``
    builds random weights of the given shape (tests, or weights loaded afterwards from a checkpoint).
    ``layer`` picks the hidden state given to the U-Net: ``last`` (SD 1.x) or ``penultimate`` (SD 2.x).
    """

    type: str = "trainable"  # trainable | clip | openclip
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    context_length: int = 77
    vocab_size: int = 49408
    layer: str = "last"  # last | penultimate
    act: str = "gelu"  # gelu | quick_gelu
    pretrained: str | None = None
    openclip_model: str = "ViT-H-14"

    def __post_init__(self):
        _check_choice("text_encoder.type", self.type, ("trainable", "clip", "openclip"))
        _check_choice("text_encoder.layer", self.layer, ("last", "penultimate"))
        _check_choice("text_encoder.act", self.act, ("gelu", "quick_gelu"))
        for name in ("width", "layers", "heads", "context_length", "vocab_size"):
            _check_positive(f"text_encoder.{name}", getattr(self, name))
        _check(self.width % self.heads == 0,
               f"text_encoder.width={self.width} is not divisible by text_encoder.heads={self.heads}")


@dataclass
class LatentDiffusionConfig:
    """A whole continuous (Stable-Diffusion-family) model: autoencoder + text encoder + U-Net + schedule."""

    type: str = "latent_diffusion"
    image_size: int = 512  # default sampling size in pixels
    guidance_scale: float = 7.5  # default classifier-free guidance scale for sampling
    unet: UNetConfig = field(default_factory=UNetConfig)
    autoencoder: AutoencoderKLConfig = field(default_factory=AutoencoderKLConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self):
        _check(self.type == "latent_diffusion", f"type={self.type!r} must be 'latent_diffusion'")
        _check(self.unet.in_channels == self.autoencoder.embed_dim,
               f"unet.in_channels={self.unet.in_channels} must equal "
               f"autoencoder.embed_dim={self.autoencoder.embed_dim}")
        _check(self.unet.context_dim == self.text_encoder.width,
               f"unet.context_dim={self.unet.context_dim} must equal text_encoder.width={self.text_encoder.width}")
        factor = self.autoencoder.downsample_factor * self.unet.downsample_factor
        _check(self.image_size % factor == 0,
               f"image_size={self.image_size} must be a multiple of {factor} (autoencoder x U-Net downsampling)")


# --------------------------------------------------------------------------------------------------------------
# Registry, dict/YAML conversion, overrides
# --------------------------------------------------------------------------------------------------------------

MODEL_CONFIGS: dict[str, type] = {"latent_diffusion": LatentDiffusionConfig}


def register_model_config(name: str, cls: type) -> None:
    """Add a top-level model config class (used by the VQ-Diffusion path)."""
    MODEL_CONFIGS[name] = cls


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(tp, value, where: str):
    """Convert a YAML value to the annotated type, or raise ValueError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict, where: str = ""):
    """Build dataclass ``cls`` from a plain dict; unknown keys are errors."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; "
                         f"valid keys: {sorted(types_)}")
    kwargs = {k: _coerce(types_[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def model_config_from_dict(data: dict):
    """Pick the model config class by ``type`` and build it."""
    if not isinstance(data, dict):
        raise ValueError(f"a model config must be a mapping, got {type(data).__name__}")
    kind = data.get("type", "latent_diffusion")
    if kind not in MODEL_CONFIGS:
        raise ValueError(f"type={kind!r} is not one of {sorted(MODEL_CONFIGS)}")
    return from_dict(MODEL_CONFIGS[kind], data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place.

    The dotted path must already exist in ``data`` (after defaults are filled in); unknown keys are errors.
    """
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        node = data
        for i, key in enumerate(keys):
            if not isinstance(node, dict) or key not in node:
                raise ValueError(f"override {item!r}: unknown key {'.'.join(keys[: i + 1])!r}")
            if i == len(keys) - 1:
                node[key] = yaml.safe_load(raw)
            else:
                node = node[key]
    return data


def _full_dict(data: dict) -> dict:
    """Fill in defaults so that dotted overrides can address every field."""
    return to_dict(model_config_from_dict(data))


def load_config(path: str | Path, overrides: list[str] | None = None):
    """Read a model config from YAML, apply dotted overrides, validate."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config {path} is not valid YAML: {e}") from None
    data = data or {}
    if overrides:
        data = apply_overrides(_full_dict(data), overrides)
    return model_config_from_dict(data)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_to_json(cfg) -> str:
    return json.dumps(to_dict(cfg), sort_keys=True)


def config_from_json(text: str):
    return model_config_from_dict(json.loads(text))
