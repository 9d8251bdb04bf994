"""Model configs: one dataclass per component, validated in ``__post_init__``, and the two whole-model configs.

A whole model is a :class:`LatentDiffusionConfig` (continuous path) or a :class:`VQDiffusionConfig` (discrete
path); :data:`MODEL_CONFIGS` maps the ``type`` field of a YAML/JSON config onto them (no import-path strings).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from latentdiff.config.checks import check, check_choice, check_positive
from latentdiff.config.coerce import from_dict

# -- continuous (latent diffusion, Stable Diffusion family) ---------------------------------------------------------

# The names of diffusion.samplers.SAMPLERS (config imports nothing above it; tests/test_config.py checks they agree).
SAMPLER_NAMES = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "euler_a")
# VQ-Diffusion's samplers (pipelines.vq.VQ_SAMPLERS): the reverse chain and purity sampling.
VQ_SAMPLER_NAMES = ("vq", "vq_purity")


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
    # Zero terminal SNR (Lin et al. 2024, Alg. 1): ᾱ_T = 0. Needs v_prediction (or sample) and a spacing whose first
    # sampling step is T-1 (trailing or linspace). Model files written before this field load as false.
    rescale_betas_zero_snr: bool = False

    def __post_init__(self):
        check_choice("schedule.timestep_spacing", self.timestep_spacing, ("leading", "trailing", "linspace"))
        check(not self.rescale_betas_zero_snr or self.prediction_type != "epsilon",
              "schedule.rescale_betas_zero_snr=true needs schedule.prediction_type 'v_prediction' (or 'sample'), "
              "not 'epsilon': at zero SNR the input is pure noise, so an epsilon prediction says nothing about x0 "
              "(Lin et al. 2024, Sec. 3.2)")
        check(not self.rescale_betas_zero_snr or self.timestep_spacing != "leading",
              "schedule.rescale_betas_zero_snr=true needs schedule.timestep_spacing 'trailing' (or 'linspace'): "
              "'leading' never samples the last timestep, so sampling would start from pure noise at a step whose "
              "SNR is not zero (Lin et al. 2024, Sec. 3.3)")
        check(self.steps_offset >= 0, f"schedule.steps_offset={self.steps_offset!r} must be >= 0")
        check_choice("schedule.beta_schedule", self.beta_schedule, ("linear", "scaled_linear", "cosine"))
        check_choice("schedule.prediction_type", self.prediction_type, ("epsilon", "v_prediction", "sample"))
        check_positive("schedule.num_timesteps", self.num_timesteps)
        check(0 < self.beta_start < self.beta_end < 1, f"need 0 < beta_start < beta_end < 1, got "
               f"beta_start={self.beta_start!r}, beta_end={self.beta_end!r}")


@dataclass
class UNetConfig:
    """Cross-attention U-Net, Stable Diffusion (CompVis ``openaimodel``) layout.

    ``attention_resolutions`` lists downsampling factors (1 = full latent resolution) at which spatial
    transformers are inserted, as in the original configs. Heads are given by count (``num_heads``) or by
    width (``num_head_channels``, SD 2.x uses 64); exactly one of them is set.

    ``patch_size`` p > 1 cuts the latent into p x p patches stacked along the channels before the first
    convolution and puts the output back after the last (pixel unshuffle / shuffle; the patchify of DiT, Peebles &
    Xie 2023): the U-Net then runs at 1/p of the latent's resolution, its cost that of a latent p times smaller with
    p² times the channels, and ``attention_resolutions`` count from the patched grid. Stable Diffusion's U-Nets have
    p = 1 (diffusers has no equivalent).
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
    patch_size: int = 1

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "context_dim",
                     "transformer_depth", "norm_num_groups", "patch_size"):
            check_positive(f"unet.{name}", getattr(self, name))
        check(len(self.channel_mult) > 0 and all(m > 0 for m in self.channel_mult),
               f"unet.channel_mult={self.channel_mult!r} must be a non-empty list of positive ints")
        check((self.num_heads is None) != (self.num_head_channels is None),
               f"set exactly one of unet.num_heads={self.num_heads!r} and "
               f"unet.num_head_channels={self.num_head_channels!r}")
        check(self.model_channels % self.norm_num_groups == 0,
               f"unet.model_channels={self.model_channels} is not divisible by "
               f"unet.norm_num_groups={self.norm_num_groups}")
        max_factor = 2 ** (len(self.channel_mult) - 1)
        for r in self.attention_resolutions:
            check(r >= 1 and (r & (r - 1)) == 0 and r <= max_factor,
                   f"unet.attention_resolutions entry {r!r} must be a power of two <= {max_factor}")
        check(0 <= self.dropout < 1, f"unet.dropout={self.dropout!r} must be in [0, 1)")

    @property
    def downsample_factor(self) -> int:
        """What the latent's height and width must be multiples of: the patch times the levels' downsampling."""
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)


class _EncoderDecoderChecks:
    """What the KL and VQ autoencoder configs share: the encoder/decoder blocks (models/autoencoder_blocks.py)."""

    def _check_blocks(self, prefix: str, more_positive: tuple[str, ...]) -> None:
        for name in ("in_channels", "out_channels", "ch", "num_res_blocks", "norm_num_groups", *more_positive):
            check_positive(f"{prefix}.{name}", getattr(self, name))
        check(len(self.ch_mult) > 0 and all(m > 0 for m in self.ch_mult),
               f"{prefix}.ch_mult={self.ch_mult!r} must be a non-empty list of positive ints")
        check(self.ch % self.norm_num_groups == 0,
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
        check_positive("autoencoder.scaling_factor", self.scaling_factor)


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
        check_choice("text_encoder.type", self.type, ("trainable", "clip", "openclip"))
        check_choice("text_encoder.layer", self.layer, ("last", "penultimate"))
        check_choice("text_encoder.act", self.act, ("gelu", "quick_gelu"))
        for name in ("width", "layers", "heads", "context_length", "vocab_size"):
            check_positive(f"text_encoder.{name}", getattr(self, name))
        check(self.width % self.heads == 0,
               f"text_encoder.width={self.width} is not divisible by text_encoder.heads={self.heads}")


@dataclass
class LatentDiffusionConfig:
    """A whole continuous (Stable-Diffusion-family) model: autoencoder + text encoder + U-Net + schedule."""

    type: str = "latent_diffusion"
    image_size: int = 512  # default sampling size in pixels
    guidance_scale: float = 7.5  # default classifier-free guidance scale for sampling
    sampler: str = "ddim"  # default sampler (a name of diffusion.samplers.SAMPLERS)
    steps: int = 25  # default number of sampling steps
    # default guidance interval [σ_lo, σ_hi]: guide only the steps whose noise level lies in (σ_lo, σ_hi]
    # (Kynkäänniemi et al. 2024; diffusion.guidance.classifier_free_guidance); None: every step
    guidance_interval: list[float] | None = None
    unet: UNetConfig = field(default_factory=UNetConfig)
    autoencoder: AutoencoderKLConfig = field(default_factory=AutoencoderKLConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self):
        check(self.type == "latent_diffusion", f"type={self.type!r} must be 'latent_diffusion'")
        check_choice("sampler", self.sampler, SAMPLER_NAMES)
        check(1 <= self.steps <= self.schedule.num_timesteps,
               f"steps={self.steps!r} must be between 1 and schedule.num_timesteps={self.schedule.num_timesteps}")
        if self.guidance_interval is not None:
            iv = self.guidance_interval
            check(len(iv) == 2 and 0 <= iv[0] < iv[1],
                  f"guidance_interval={iv!r} must be [sigma_lo, sigma_hi] with 0 <= sigma_lo < sigma_hi")
        C = self.autoencoder.embed_dim  # an inpainting U-Net also takes the mask and the masked image's latents
        check(self.unet.in_channels in (C, 2 * C + 1),
               f"unet.in_channels={self.unet.in_channels} must equal autoencoder.embed_dim={C} "
               f"(or 2 * {C} + 1 = {2 * C + 1} for an inpainting U-Net)")
        check(self.unet.context_dim == self.text_encoder.width,
               f"unet.context_dim={self.unet.context_dim} must equal text_encoder.width={self.text_encoder.width}")
        factor = self.autoencoder.downsample_factor * self.unet.downsample_factor
        check(self.image_size % factor == 0,
               f"image_size={self.image_size} must be a multiple of {factor} (autoencoder x U-Net downsampling)")


# -- discrete (VQ-Diffusion) ---------------------------------------------------------------------------------


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
        check(self.num_timesteps >= 2, f"schedule.num_timesteps={self.num_timesteps!r} must be >= 2")
        check(0 < self.alpha_cumprod_end <= self.alpha_cumprod_start <= 1,
               f"need 0 < alpha_cumprod_end <= alpha_cumprod_start <= 1, got alpha_cumprod_start="
               f"{self.alpha_cumprod_start!r}, alpha_cumprod_end={self.alpha_cumprod_end!r}")
        check(0 <= self.gamma_cumprod_start <= self.gamma_cumprod_end < 1,
               f"need 0 <= gamma_cumprod_start <= gamma_cumprod_end < 1, got gamma_cumprod_start="
               f"{self.gamma_cumprod_start!r}, gamma_cumprod_end={self.gamma_cumprod_end!r}")
        check(self.alpha_cumprod_start + self.gamma_cumprod_start <= 1
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
            check_positive(f"transformer.{name}", getattr(self, name))
        check(self.dim % self.heads == 0,
               f"transformer.dim={self.dim} is not divisible by transformer.heads={self.heads}")
        check_choice("transformer.ff_activation", self.ff_activation, ("gelu_sigmoid", "gelu", "gelu_tanh"))
        check(0 <= self.dropout < 1, f"transformer.dropout={self.dropout!r} must be in [0, 1)")


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
        check(self.beta >= 0, f"vqvae.beta={self.beta!r} must be >= 0")
        check(0 < self.decay < 1, f"vqvae.decay={self.decay!r} must be in (0, 1)")
        check(self.dead_code_threshold >= 0, f"vqvae.dead_code_threshold={self.dead_code_threshold!r} must be >= 0")
        check(0 <= self.dropout < 1, f"vqvae.dropout={self.dropout!r} must be in [0, 1)")


@dataclass
class VQDiffusionConfig:
    """A whole discrete (VQ-Diffusion) model: VQ autoencoder + text encoder + transformer + schedule.

    ``normalize_context``: the text encoder's hidden states are L2-normalised per token before the transformer
    sees them, as VQ-Diffusion was trained (the learned null context is used as is). ``guidance_scale`` and
    ``truncation_rate`` are the sampling defaults (Improved VQ-Diffusion; 1.0 disables either), and ``sampler``
    the default sampler: ``vq`` (the reverse chain) or ``vq_purity`` (purity sampling).
    """

    type: str = "vq_diffusion"
    image_size: int = 256
    guidance_scale: float = 5.0
    truncation_rate: float = 1.0
    sampler: str = "vq"
    normalize_context: bool = True
    vqvae: VQModelConfig = field(default_factory=VQModelConfig)
    transformer: VQTransformerConfig = field(default_factory=VQTransformerConfig)
    text_encoder: TextEncoderConfig = field(
        default_factory=lambda: TextEncoderConfig(type="clip", width=512, layers=12, heads=8, act="quick_gelu"))
    schedule: DiscreteScheduleConfig = field(default_factory=DiscreteScheduleConfig)

    def __post_init__(self):
        check(self.type == "vq_diffusion", f"type={self.type!r} must be 'vq_diffusion'")
        check(0 < self.truncation_rate <= 1, f"truncation_rate={self.truncation_rate!r} must be in (0, 1]")
        check_choice("sampler", self.sampler, VQ_SAMPLER_NAMES)
        check(self.transformer.num_codes == self.vqvae.num_codes,
               f"transformer.num_codes={self.transformer.num_codes} must equal vqvae.num_codes={self.vqvae.num_codes}")
        check(self.transformer.num_timesteps == self.schedule.num_timesteps,
               f"transformer.num_timesteps={self.transformer.num_timesteps} must equal "
               f"schedule.num_timesteps={self.schedule.num_timesteps}")
        check(self.transformer.context_dim == self.text_encoder.width,
               f"transformer.context_dim={self.transformer.context_dim} must equal "
               f"text_encoder.width={self.text_encoder.width}")
        check(self.transformer.context_length == self.text_encoder.context_length,
               f"transformer.context_length={self.transformer.context_length} must equal "
               f"text_encoder.context_length={self.text_encoder.context_length}")
        latent = self.transformer.latent_size * self.vqvae.downsample_factor
        check(self.image_size == latent,
               f"image_size={self.image_size} must equal transformer.latent_size x vqvae downsampling = {latent}")


MODEL_CONFIGS: dict[str, type] = {"latent_diffusion": LatentDiffusionConfig, "vq_diffusion": VQDiffusionConfig}


def model_config_from_dict(data: dict):
    """Pick the model config class by ``type`` and build it."""
    if not isinstance(data, dict):
        raise ValueError(f"a model config must be a mapping, got {type(data).__name__}")
    kind = data.get("type", "latent_diffusion")
    if kind not in MODEL_CONFIGS:
        raise ValueError(f"type={kind!r} is not one of {sorted(MODEL_CONFIGS)}")
    return from_dict(MODEL_CONFIGS[kind], data)
