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


class _EncoderDecoderChecks:
    """What the KL and VQ autoencoder configs share: the encoder/decoder blocks (models/autoencoder_blocks.py)."""

    def _check_blocks(self, prefix: str, more_positive: tuple[str, ...]) -> None:
        for name in ("in_channels", "out_channels", "ch", "num_res_blocks", "norm_num_groups", *more_positive):
            _check_positive(f"{prefix}.{name}", getattr(self, name))
        _check(len(self.ch_mult) > 0 and all(m > 0 for m in self.ch_mult),
               f"{prefix}.ch_mult={self.ch_mult!r} must be a non-empty list of positive ints")
        _check(self.ch % self.norm_num_groups == 0,
               f"{prefix}.ch={self.ch} is not divisible by {prefix}.norm_num_groups={self.norm_num_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class AutoencoderKLConfig(_EncoderDecoderChecks):
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
        self._check_blocks("autoencoder", ("z_channels", "embed_dim"))
        _check_positive("autoencoder.scaling_factor", self.scaling_factor)


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
        if isinstance(value, str):  # YAML 1.1 reads "4e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
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


# --------------------------------------------------------------------------------------------------------------
# VQ-Diffusion (discrete path)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class DiscreteScheduleConfig:
    """VQ-Diffusion mask-and-replace schedule (Gu et al. 2022, Sec. 4.1): the cumulative keep probability ᾱ
    falls and the cumulative mask probability γ̄ rises linearly over ``num_timesteps`` steps."""

    num_timesteps: int = 100
    alpha_cumprod_start: float = 0.99999
    alpha_cumprod_end: float = 0.000009
    gamma_cumprod_start: float = 0.000009
    gamma_cumprod_end: float = 0.99999

    def __post_init__(self):
        _check(self.num_timesteps >= 2, f"schedule.num_timesteps={self.num_timesteps!r} must be >= 2")
        _check(0 < self.alpha_cumprod_end <= self.alpha_cumprod_start <= 1,
               f"need 0 < alpha_cumprod_end <= alpha_cumprod_start <= 1, got alpha_cumprod_start="
               f"{self.alpha_cumprod_start!r}, alpha_cumprod_end={self.alpha_cumprod_end!r}")
        _check(0 <= self.gamma_cumprod_start <= self.gamma_cumprod_end < 1,
               f"need 0 <= gamma_cumprod_start <= gamma_cumprod_end < 1, got gamma_cumprod_start="
               f"{self.gamma_cumprod_start!r}, gamma_cumprod_end={self.gamma_cumprod_end!r}")
        _check(self.alpha_cumprod_start + self.gamma_cumprod_start <= 1
               and self.alpha_cumprod_end + self.gamma_cumprod_end <= 1,
               "schedule: alpha_cumprod + gamma_cumprod must be <= 1 at both ends")


@dataclass
class VQTransformerConfig:
    """VQ-Diffusion transformer (diffusers' discrete ``Transformer2DModel`` layout; defaults: the ITHQ model).

    Embeds ``num_codes + 1`` tokens ([MASK] last) on a ``latent_size`` x ``latent_size`` grid; ``depth`` blocks of
    AdaLN(t) self-attention, AdaLN(t) cross-attention over the text states and a feed-forward; predicts
    log p(x0|x_t) over the ``num_codes`` codes. ``ff_activation``: ``gelu_sigmoid`` (x·σ(1.702x), VQ-Diffusion's
    GELU2, diffusers' "geglu-approximate"), ``gelu`` or ``gelu_tanh``. ``learned_null_context`` adds the learned
    (context_length, context_dim) null condition of learnable classifier-free guidance (Tang et al. 2022).
    """

    num_codes: int = 4096
    latent_size: int = 32
    dim: int = 1408
    heads: int = 16
    depth: int = 36
    context_dim: int = 512
    context_length: int = 77
    num_timesteps: int = 100
    ff_mult: int = 4
    ff_activation: str = "gelu_sigmoid"  # gelu_sigmoid | gelu | gelu_tanh
    attention_bias: bool = True
    learned_null_context: bool = True
    dropout: float = 0.0
    gradient_checkpointing: bool = False

    def __post_init__(self):
        for name in ("num_codes", "latent_size", "dim", "heads", "depth", "context_dim", "context_length",
                     "num_timesteps", "ff_mult"):
            _check_positive(f"transformer.{name}", getattr(self, name))
        _check(self.dim % self.heads == 0,
               f"transformer.dim={self.dim} is not divisible by transformer.heads={self.heads}")
        _check_choice("transformer.ff_activation", self.ff_activation, ("gelu_sigmoid", "gelu", "gelu_tanh"))
        _check(0 <= self.dropout < 1, f"transformer.dropout={self.dropout!r} must be in [0, 1)")


@dataclass
class VQModelConfig(_EncoderDecoderChecks):
    """VQ autoencoder (VQ-VAE, van den Oord et al. 2017, with the Taming-Transformers encoder/decoder).

    ``z_channels`` leave the encoder, ``quant_conv`` maps them to ``embed_dim``-dimensional vectors quantised
    against ``num_codes`` codebook entries. ``beta`` weighs the commitment loss (Eq. 3); ``ema`` replaces the
    codebook loss with exponential-moving-average updates (App. A.1) of rate ``decay``; ``restart_dead_codes``
    re-seeds codes whose average assignments per step fall below ``dead_code_threshold`` with encoder outputs.
    """

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=list)
    mid_attention: bool = True
    z_channels: int = 256
    embed_dim: int = 128
    num_codes: int = 4096
    beta: float = 0.25
    ema: bool = False
    decay: float = 0.99
    restart_dead_codes: bool = False
    dead_code_threshold: float = 1.0
    norm_num_groups: int = 32
    dropout: float = 0.0

    def __post_init__(self):
        self._check_blocks("vqvae", ("z_channels", "embed_dim", "num_codes"))
        _check(self.beta >= 0, f"vqvae.beta={self.beta!r} must be >= 0")
        _check(0 < self.decay < 1, f"vqvae.decay={self.decay!r} must be in (0, 1)")
        _check(self.dead_code_threshold >= 0, f"vqvae.dead_code_threshold={self.dead_code_threshold!r} must be >= 0")
        _check(0 <= self.dropout < 1, f"vqvae.dropout={self.dropout!r} must be in [0, 1)")


@dataclass
class VQDiffusionConfig:
    """A whole discrete (VQ-Diffusion) model: VQ autoencoder + text encoder + transformer + schedule.

    ``normalize_context``: the text encoder's hidden states are L2-normalised per token before the transformer
    sees them, as VQ-Diffusion was trained (the learned null context is used as is). ``guidance_scale`` and
    ``truncation_rate`` are the sampling defaults (Improved VQ-Diffusion; 1.0 disables either).
    """

    type: str = "vq_diffusion"
    image_size: int = 256
    guidance_scale: float = 5.0
    truncation_rate: float = 1.0
    normalize_context: bool = True
    vqvae: VQModelConfig = field(default_factory=VQModelConfig)
    transformer: VQTransformerConfig = field(default_factory=VQTransformerConfig)
    text_encoder: TextEncoderConfig = field(
        default_factory=lambda: TextEncoderConfig(type="clip", width=512, layers=12, heads=8, act="quick_gelu"))
    schedule: DiscreteScheduleConfig = field(default_factory=DiscreteScheduleConfig)

    def __post_init__(self):
        _check(self.type == "vq_diffusion", f"type={self.type!r} must be 'vq_diffusion'")
        _check(0 < self.truncation_rate <= 1, f"truncation_rate={self.truncation_rate!r} must be in (0, 1]")
        _check(self.transformer.num_codes == self.vqvae.num_codes,
               f"transformer.num_codes={self.transformer.num_codes} must equal vqvae.num_codes={self.vqvae.num_codes}")
        _check(self.transformer.num_timesteps == self.schedule.num_timesteps,
               f"transformer.num_timesteps={self.transformer.num_timesteps} must equal "
               f"schedule.num_timesteps={self.schedule.num_timesteps}")
        _check(self.transformer.context_dim == self.text_encoder.width,
               f"transformer.context_dim={self.transformer.context_dim} must equal "
               f"text_encoder.width={self.text_encoder.width}")
        _check(self.transformer.context_length == self.text_encoder.context_length,
               f"transformer.context_length={self.transformer.context_length} must equal "
               f"text_encoder.context_length={self.text_encoder.context_length}")
        latent = self.transformer.latent_size * self.vqvae.downsample_factor
        _check(self.image_size == latent,
               f"image_size={self.image_size} must equal transformer.latent_size x vqvae downsampling = {latent}")


register_model_config("vq_diffusion", VQDiffusionConfig)


@dataclass
class DataConfig:
    """Training reader for tar shards (see latentdiff/data/reader.py for order, resume and error handling).

    ``shards`` is a folder (its manifest.json order), a brace pattern (``data/x-{000000..000049}.tar``), a glob or
    one file. Images are resized so the shorter side is ``image_size`` (bicubic), cropped square (``crop``:
    center | random) and flipped left-right with probability 1/2 when ``random_flip``. ``caption_dropout`` is the
    probability of replacing a caption by "" (classifier-free guidance). ``drop_last`` drops each rank's last
    partial batch. ``max_error_rate`` is the largest tolerated share of unusable samples. ``resampled`` draws
    shards with replacement per rank and worker (multi-node) instead of splitting them.
    """

    shards: str = ""
    image_size: int = 256
    batch_size: int = 32
    num_workers: int = 4
    shuffle: bool = True
    shuffle_buffer: int = 1000
    caption_dropout: float = 0.1
    random_flip: bool = True
    crop: str = "center"  # center | random
    drop_last: bool = True
    max_error_rate: float = 0.01
    resampled: bool = False
    seed: int = 0

    def __post_init__(self):
        _check_positive("data.image_size", self.image_size)
        _check_positive("data.batch_size", self.batch_size)
        _check(self.num_workers >= 0, f"data.num_workers={self.num_workers!r} must be >= 0")
        _check(self.shuffle_buffer >= 0, f"data.shuffle_buffer={self.shuffle_buffer!r} must be >= 0")
        _check(0 <= self.caption_dropout <= 1, f"data.caption_dropout={self.caption_dropout!r} must be in [0, 1]")
        _check_choice("data.crop", self.crop, ("center", "random"))
        _check(0 <= self.max_error_rate <= 1, f"data.max_error_rate={self.max_error_rate!r} must be in [0, 1]")


# --------------------------------------------------------------------------------------------------------------
# Training (latentdiff/training, tools/train.py)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    """AdamW with linear warmup, then a constant or cosine learning rate (see latentdiff/training/optim.py)."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0  # applied to matrices and kernels only, not to biases and norm scales
    warmup_steps: int = 0
    decay: str = "constant"  # constant | cosine (to min_lr_ratio * lr at the last step)
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0  # max global gradient norm per optimizer; null disables clipping

    def __post_init__(self):
        _check_positive("optim.lr", self.lr)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"optim.betas={self.betas!r} must be two numbers in [0, 1)")
        _check_positive("optim.eps", self.eps)
        _check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay!r} must be >= 0")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps!r} must be >= 0")
        _check_choice("optim.decay", self.decay, ("constant", "cosine"))
        _check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        _check(self.grad_clip is None or self.grad_clip > 0, f"optim.grad_clip={self.grad_clip!r} must be > 0")


@dataclass
class EMAConfig:
    """Exponential moving average of the weights; the export uses the averaged weights when enabled."""

    enabled: bool = True
    decay: float = 0.9999
    warmup: bool = True  # decay_n = min(decay, (1 + n) / (10 + n))
    every: int = 1  # update after every N-th optimizer step

    def __post_init__(self):
        _check(0 <= self.decay < 1, f"ema.decay={self.decay!r} must be in [0, 1)")
        _check_positive("ema.every", self.every)


@dataclass
class _AutoencoderLossConfig:
    """What the KL and VQ autoencoder losses share: a pixel reconstruction term, optional LPIPS and an optional
    patch-GAN (``disc_weight`` 0 disables the discriminator, ``perceptual_weight`` 0 LPIPS)."""

    type: str = ""
    reconstruction: str = "l1"  # l1 | l2
    perceptual_weight: float = 0.0  # LPIPS; needs local weights (see training/objectives/perceptual.py)
    lpips_weights: str | None = None  # LPIPS linear layers (lpips' vgg.pth); null: the lpips package's copy
    vgg_weights: str | None = None  # torchvision VGG16; null: torch hub cache checkpoints/vgg16-397923af.pth
    disc_weight: float = 0.0
    disc_start: int = 0  # optimizer step at which the adversarial terms switch on
    disc_layers: int = 3
    disc_channels: int = 64
    disc_lr: float | None = None  # null: optim.lr
    disc_betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    adaptive_weight: bool = True  # Taming Eq. 7
    train_decoder_only: bool = False  # freeze the encoder side: the latents stay those a diffusion model knows
    sample_images: int = 8  # images in each reconstruction grid

    def _check_common(self, kind: str, weights: tuple[str, ...]) -> None:
        _check(self.type == kind, f"objective.type={self.type!r} must be {kind!r}")
        _check_choice("objective.reconstruction", self.reconstruction, ("l1", "l2"))
        for name in (*weights, "perceptual_weight", "disc_weight", "disc_start"):
            _check(getattr(self, name) >= 0, f"objective.{name}={getattr(self, name)!r} must be >= 0")
        _check_positive("objective.disc_layers", self.disc_layers)
        _check_positive("objective.disc_channels", self.disc_channels)
        _check(self.disc_lr is None or self.disc_lr > 0, f"objective.disc_lr={self.disc_lr!r} must be > 0")
        _check(len(self.disc_betas) == 2, f"objective.disc_betas={self.disc_betas!r} must be two numbers")
        _check_positive("objective.sample_images", self.sample_images)


@dataclass
class AutoencoderKLObjectiveConfig(_AutoencoderLossConfig):
    """KL autoencoder loss (LDM's ``LPIPSWithDiscriminator``): per-image summed reconstruction error + KL,
    optional LPIPS and patch-GAN."""

    type: str = "autoencoder_kl"
    kl_weight: float = 1e-6

    def __post_init__(self):
        self._check_common("autoencoder_kl", ("kl_weight",))


@dataclass
class VQVAEObjectiveConfig(_AutoencoderLossConfig):
    """VQ autoencoder loss; ``model`` is a ``vq_diffusion`` model config whose ``vqvae`` part is trained
    (the rest only has to be valid)."""

    type: str = "vqvae"
    vq_weight: float = 1.0  # weight of the codebook + commitment loss (taming's codebook_weight)

    def __post_init__(self):
        self._check_common("vqvae", ("vq_weight",))


@dataclass
class LatentDiffusionObjectiveConfig:
    """Latent diffusion loss: ε/v/x0 MSE on the latents of a frozen autoencoder (caption dropout for
    classifier-free guidance is ``data.caption_dropout``)."""

    type: str = "latent_diffusion"
    autoencoder_checkpoint: str | None = None  # model file of an autoencoder_kl run; null: random (tests only)
    train_text_encoder: bool = True
    scale_latents_by_std: bool = True  # a fresh run sets autoencoder.scaling_factor = 1 / std(latents)
    min_snr_gamma: float | None = None  # min-SNR-γ loss weighting (Hang et al., 2023); 5.0 is usual
    sample_prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a photo of a ship"])
    sample_steps: int = 25
    sample_sampler: str = "ddim"
    sample_scale: float = 3.0
    sample_seed: int = 0

    def __post_init__(self):
        _check(self.type == "latent_diffusion", f"objective.type={self.type!r} must be 'latent_diffusion'")
        _check(self.min_snr_gamma is None or self.min_snr_gamma > 0,
               f"objective.min_snr_gamma={self.min_snr_gamma!r} must be > 0")
        _check(len(self.sample_prompts) > 0, "objective.sample_prompts must not be empty")
        _check_positive("objective.sample_steps", self.sample_steps)


@dataclass
class VQDiffusionObjectiveConfig:
    """VQ-Diffusion loss on the codes of a frozen VQ autoencoder (caption dropout: ``data.caption_dropout``)."""

    type: str = "vq_diffusion"
    vqvae_checkpoint: str | None = None  # model file of a vqvae run; null: random (tests only)
    train_text_encoder: bool = True
    importance_sampling: bool = True  # loss-aware sampling of t (official VQ-Diffusion)
    auxiliary_loss_weight: float = 5e-4  # λ of the x0 term (Gu et al. Eq. 12)
    adaptive_auxiliary_loss: bool = True  # weight the x0 term by 2 - t/T
    mask_weight: list[float] = field(default_factory=lambda: [1.0, 1.0])  # KL weights at [MASK] / other tokens
    sample_prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a photo of a ship"])
    sample_steps: int = 25
    sample_scale: float = 3.0
    sample_truncation: float | None = None  # null: model.truncation_rate
    sample_seed: int = 0

    def __post_init__(self):
        _check(self.type == "vq_diffusion", f"objective.type={self.type!r} must be 'vq_diffusion'")
        _check(self.auxiliary_loss_weight >= 0,
               f"objective.auxiliary_loss_weight={self.auxiliary_loss_weight!r} must be >= 0")
        _check(len(self.mask_weight) == 2 and all(w >= 0 for w in self.mask_weight),
               f"objective.mask_weight={self.mask_weight!r} must be two numbers >= 0")
        _check(len(self.sample_prompts) > 0, "objective.sample_prompts must not be empty")
        _check_positive("objective.sample_steps", self.sample_steps)
        _check(self.sample_truncation is None or 0 < self.sample_truncation <= 1,
               f"objective.sample_truncation={self.sample_truncation!r} must be in (0, 1]")


OBJECTIVE_CONFIGS: dict[str, type] = {"autoencoder_kl": AutoencoderKLObjectiveConfig,
                                      "latent_diffusion": LatentDiffusionObjectiveConfig,
                                      "vqvae": VQVAEObjectiveConfig,
                                      "vq_diffusion": VQDiffusionObjectiveConfig}


@dataclass
class TrainConfig:
    """A training run: model (any registered model config), objective (by ``type``), data, optimizer, loop.

    ``data.batch_size`` is per rank and micro-step: one optimizer step sees
    ``data.batch_size * grad_accum * world_size`` samples.
    """

    model: Any = field(default_factory=LatentDiffusionConfig)  # a MODEL_CONFIGS entry, chosen by its ``type``
    objective: Any = field(default_factory=LatentDiffusionObjectiveConfig)  # an OBJECTIVE_CONFIGS entry
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    steps: int = 1000  # optimizer steps of the whole run (the LR schedule spans them)
    grad_accum: int = 1
    precision: str = "auto"  # auto (bf16 on CUDA if supported, else fp16; fp32 on CPU) | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the trained networks
    gradient_checkpointing: bool = False  # recompute activations in backward (sets the network's config flag)
    init_from: str | None = None  # fine-tuning: a model file whose components (by name) start the networks
    seed: int = 0
    log_every: int = 10
    sample_every: int = 500  # 0: never
    checkpoint_every: int = 500
    keep_checkpoints: int = 3

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = model_config_from_dict(self.model)
        if isinstance(self.objective, dict):
            kind = self.objective.get("type", "latent_diffusion")
            _check(kind in OBJECTIVE_CONFIGS, f"objective.type={kind!r} is not one of {sorted(OBJECTIVE_CONFIGS)}")
            self.objective = from_dict(OBJECTIVE_CONFIGS[kind], self.objective, "objective")
        for name in ("steps", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints"):
            _check_positive(name, getattr(self, name))
        _check(self.sample_every >= 0, f"sample_every={self.sample_every!r} must be >= 0")
        _check(self.init_from is None or isinstance(self.init_from, str),
               f"init_from={self.init_from!r} must be a model file path or null")
        _check_choice("precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _check(self.device in ("auto", "cpu", "cuda"), f"device={self.device!r} is not one of ['auto', 'cpu', 'cuda']")


def train_config_from_dict(data: dict) -> TrainConfig:
    if not isinstance(data, dict):
        raise ValueError(f"a training config must be a mapping, got {type(data).__name__}")
    return from_dict(TrainConfig, data)


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a training config from YAML, fill in defaults, apply strict dotted overrides
    (``optim.lr=3e-4``, ``model.unet.model_channels=64``), validate."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config {path} is not valid YAML: {e}") from None
    data = data or {}
    if overrides:
        data = apply_overrides(to_dict(train_config_from_dict(data)), overrides)
    return train_config_from_dict(data)
