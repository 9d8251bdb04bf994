"""Training configs: data reader, optimizer, EMA, one objective config per model kind, and the whole run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from latentdiff.config.checks import check, check_choice, check_positive
from latentdiff.config.coerce import from_dict
from latentdiff.config.model import LatentDiffusionConfig, model_config_from_dict


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
        check_positive("data.image_size", self.image_size)
        check_positive("data.batch_size", self.batch_size)
        check(self.num_workers >= 0, f"data.num_workers={self.num_workers!r} must be >= 0")
        check(self.shuffle_buffer >= 0, f"data.shuffle_buffer={self.shuffle_buffer!r} must be >= 0")
        check(0 <= self.caption_dropout <= 1, f"data.caption_dropout={self.caption_dropout!r} must be in [0, 1]")
        check_choice("data.crop", self.crop, ("center", "random"))
        check(0 <= self.max_error_rate <= 1, f"data.max_error_rate={self.max_error_rate!r} must be in [0, 1]")


@dataclass
class OptimConfig:
    """AdamW with linear warmup, then a constant or cosine learning rate (see latentdiff/training/optim.py).

    ``optimizer``: adamw (torch) | adamw8bit (bitsandbytes' 8-bit AdamW: the two moments in 8 bits, block-wise
    quantised; needs the bitsandbytes package) | adafactor (torch.optim.Adafactor: factored second moment, no first
    moment; ``lr`` is then its largest relative step size and ``betas``/``eps`` are unused)."""

    optimizer: str = "adamw"  # adamw | adamw8bit | adafactor
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0  # applied to matrices and kernels only, not to biases and norm scales
    warmup_steps: int = 0
    decay: str = "constant"  # constant | cosine (to min_lr_ratio * lr at the last step)
    min_lr_ratio: float = 0.0
    decay_over: str = "steps"  # steps | time: the decay spans the --max-minutes budget (training/optim.py)
    grad_clip: float | None = 1.0  # max global gradient norm per optimizer; null disables clipping

    def __post_init__(self):
        check_choice("optim.optimizer", self.optimizer, ("adamw", "adamw8bit", "adafactor"))
        check_positive("optim.lr", self.lr)
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"optim.betas={self.betas!r} must be two numbers in [0, 1)")
        check_positive("optim.eps", self.eps)
        check(self.weight_decay >= 0, f"optim.weight_decay={self.weight_decay!r} must be >= 0")
        check(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps!r} must be >= 0")
        check_choice("optim.decay", self.decay, ("constant", "cosine"))
        check_choice("optim.decay_over", self.decay_over, ("steps", "time"))
        check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        check(self.grad_clip is None or self.grad_clip > 0, f"optim.grad_clip={self.grad_clip!r} must be > 0")


@dataclass
class EMAConfig:
    """Exponential moving average of the weights; the export uses the averaged weights when enabled."""

    enabled: bool = True
    decay: float = 0.9999
    warmup: bool = True  # decay_n = min(decay, (1 + n) / (10 + n))
    every: int = 1  # update after every N-th optimizer step

    def __post_init__(self):
        check(0 <= self.decay < 1, f"ema.decay={self.decay!r} must be in [0, 1)")
        check_positive("ema.every", self.every)


@dataclass
class _AutoencoderLossConfig:
    """What the KL and VQ autoencoder losses share: a pixel reconstruction term, optional LPIPS and an optional
    patch-GAN (``disc_weight`` 0 disables the discriminator, ``perceptual_weight`` 0 LPIPS)."""

    type: str = ""
    reconstruction: str = "l1"  # l1 | l2
    perceptual_weight: float = 0.0  # LPIPS; needs local weights (see training/objectives/perceptual.py)
    lpips_weights: str | None = None  # LPIPS linear layers (lpips' vgg.pth); null: the lpips package's copy
    vgg_weights: str | None = None  # torchvision VGG16; null: torch hub cache checkpoints/vgg16-397923af.pth
    # a latentdiff classifier file: the perceptual distance on its features instead of VGG16's (no weights needed
    # beyond it; LPIPS's baseline weighting, training/objectives/perceptual.py)
    perceptual_classifier: str | None = None
    disc_weight: float = 0.0
    disc_start: int = 0  # optimizer step at which the adversarial terms switch on
    # steps from disc_start on in which only the discriminator learns: the autoencoder gets no gradient (a VQ EMA
    # codebook still updates unless train_decoder_only freezes it)
    disc_warmup: int = 0
    disc_layers: int = 3
    disc_channels: int = 64
    disc_lr: float | None = None  # null: optim.lr
    disc_betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    adaptive_weight: bool = True  # Taming Eq. 7
    train_decoder_only: bool = False  # freeze the encoder side: the latents stay those a diffusion model knows
    sample_images: int = 8  # images in each reconstruction grid

    def _check_common(self, kind: str, weights: tuple[str, ...]) -> None:
        check(self.type == kind, f"objective.type={self.type!r} must be {kind!r}")
        check_choice("objective.reconstruction", self.reconstruction, ("l1", "l2"))
        for name in (*weights, "perceptual_weight", "disc_weight", "disc_start", "disc_warmup"):
            check(getattr(self, name) >= 0, f"objective.{name}={getattr(self, name)!r} must be >= 0")
        check(self.perceptual_classifier is None or self.perceptual_weight > 0,
              f"objective.perceptual_classifier={self.perceptual_classifier!r} needs objective.perceptual_weight > 0")
        check(self.disc_warmup == 0 or self.disc_weight > 0,
              f"objective.disc_warmup={self.disc_warmup} needs a discriminator (objective.disc_weight > 0)")
        check_positive("objective.disc_layers", self.disc_layers)
        check_positive("objective.disc_channels", self.disc_channels)
        check(self.disc_lr is None or self.disc_lr > 0, f"objective.disc_lr={self.disc_lr!r} must be > 0")
        check(len(self.disc_betas) == 2, f"objective.disc_betas={self.disc_betas!r} must be two numbers")
        check_positive("objective.sample_images", self.sample_images)


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
class LoRAConfig:
    """LoRA fine-tuning (Hu et al. 2021) of a loaded model (``init_from``): only the adapters train, the model's own
    weights stay as loaded. ``targets`` picks the layers: an ``nn.Linear``/``nn.Conv2d`` is adapted when one of them
    is a dotted part of its name (our names: ``to_q``, ``attn2``, ``ff``, ``proj_in``, ``in_layers``,
    ``skip_connection``; CLIP's ``self_attn``, ``q_proj``, ``mlp``, ``fc1``). The default is kohya's LoRA: the
    U-Net's transformers (attention, feed-forward, proj_in/out) and, with ``text_encoder``, CLIP's attention and
    MLPs. ``alpha`` null = ``rank`` (factor α / r = 1). The run also writes ``lora.safetensors`` (kohya format)."""

    rank: int = 4
    alpha: float | None = None
    targets: list[str] = field(default_factory=lambda: ["attn1", "attn2", "ff", "proj_in", "proj_out",
                                                        "self_attn", "mlp"])
    text_encoder: bool = False  # also adapt the text encoder (a CLIP one: its layers have kohya names)

    def __post_init__(self):
        check_positive("objective.lora.rank", self.rank)
        check(self.alpha is None or self.alpha > 0, f"objective.lora.alpha={self.alpha!r} must be > 0")
        check(len(self.targets) > 0, "objective.lora.targets must not be empty")


@dataclass
class LatentDiffusionObjectiveConfig:
    """Latent diffusion loss: ε/v/x0 MSE on the latents of a frozen autoencoder (caption dropout for
    classifier-free guidance is ``data.caption_dropout``)."""

    type: str = "latent_diffusion"
    autoencoder_checkpoint: str | None = None  # model file of an autoencoder_kl run; null: random (tests only)
    train_text_encoder: bool = True
    scale_latents_by_std: bool = True  # a fresh run sets autoencoder.scaling_factor = 1 / std(latents)
    min_snr_gamma: float | None = None  # min-SNR-γ loss weighting (Hang et al., 2023); 5.0 is usual
    # -- noise options (docs/diffusion.md, "Training options") --
    noise_offset: float = 0.0  # offset noise: ε += c·N(0, 1) of shape (B, C, 1, 1); 0.05-0.1 is usual
    input_perturbation: float = 0.0  # Ning et al. 2023: x_t from ε + γ·ξ, target from ε; 0.1 is usual
    # -- end noise options --
    text_cache: int = 0  # frozen text encoder: keep the hidden states of up to N distinct captions (0: off)
    sample_prompts: list[str] = field(default_factory=lambda: ["a photo of a cat", "a photo of a ship"])
    sample_steps: int = 25
    sample_sampler: str = "ddim"
    sample_scale: float = 3.0
    sample_seed: int = 0
    lora: LoRAConfig | None = None  # LoRA fine-tuning of init_from's model; train_text_encoder is then unused

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = from_dict(LoRAConfig, self.lora, "objective.lora")
        check(self.type == "latent_diffusion", f"objective.type={self.type!r} must be 'latent_diffusion'")
        check(self.min_snr_gamma is None or self.min_snr_gamma > 0,
               f"objective.min_snr_gamma={self.min_snr_gamma!r} must be > 0")
        for name in ("noise_offset", "input_perturbation"):  # noise options
            value = getattr(self, name)
            check(math.isfinite(value) and value >= 0, f"objective.{name}={value!r} must be a number >= 0")
        check(isinstance(self.text_cache, int) and self.text_cache >= 0,
              f"objective.text_cache={self.text_cache!r} must be a whole number >= 0")
        text_trained = self.train_text_encoder if self.lora is None else self.lora.text_encoder
        check(self.text_cache == 0 or not text_trained,
              "objective.text_cache needs a frozen text encoder (train_text_encoder: false, no LoRA on it): a "
              "trained one's hidden states change every step")
        check(len(self.sample_prompts) > 0, "objective.sample_prompts must not be empty")
        check_positive("objective.sample_steps", self.sample_steps)


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
        check(self.type == "vq_diffusion", f"objective.type={self.type!r} must be 'vq_diffusion'")
        check(self.auxiliary_loss_weight >= 0,
               f"objective.auxiliary_loss_weight={self.auxiliary_loss_weight!r} must be >= 0")
        check(len(self.mask_weight) == 2 and all(w >= 0 for w in self.mask_weight),
               f"objective.mask_weight={self.mask_weight!r} must be two numbers >= 0")
        check(len(self.sample_prompts) > 0, "objective.sample_prompts must not be empty")
        check_positive("objective.sample_steps", self.sample_steps)
        check(self.sample_truncation is None or 0 < self.sample_truncation <= 1,
               f"objective.sample_truncation={self.sample_truncation!r} must be in (0, 1]")


# -- distributed (issue #16 item 3, FSDP) --------------------------------------------------------------------------
@dataclass
class DistributedConfig:
    """How ``torchrun`` ranks share the model (see latentdiff/training/sharding.py). ``ddp``: every rank holds all
    weights and optimizer state, gradients are all-reduced. ``fsdp``: PyTorch FSDP2 (``fully_shard``) splits the
    trainable networks' weights, gradients and optimizer state across ranks (per U-Net / transformer block, then
    the network); checkpoints become sharded ``.dcp`` folders. ``cpu_offload`` keeps the parameter shards (and
    optimizer state) in CPU memory; ``reshard_after_forward`` frees the gathered weights after each block's
    forward (less memory, one more all-gather in backward)."""

    strategy: str = "ddp"  # ddp | fsdp
    cpu_offload: bool = False  # fsdp only: CPUOffloadPolicy of the parameter shards
    reshard_after_forward: bool = True  # fsdp only

    def __post_init__(self):
        check_choice("distributed.strategy", self.strategy, ("ddp", "fsdp"))
        check(not self.cpu_offload or self.strategy == "fsdp",
              "distributed.cpu_offload=true needs distributed.strategy=fsdp (DDP keeps every weight on the device)")
# -- end distributed ------------------------------------------------------------------------------------------------


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
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # ddp | fsdp under torchrun
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
            check(kind in OBJECTIVE_CONFIGS, f"objective.type={kind!r} is not one of {sorted(OBJECTIVE_CONFIGS)}")
            self.objective = from_dict(OBJECTIVE_CONFIGS[kind], self.objective, "objective")
        for name in ("steps", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints"):
            check_positive(name, getattr(self, name))
        check(self.sample_every >= 0, f"sample_every={self.sample_every!r} must be >= 0")
        check(self.init_from is None or isinstance(self.init_from, str),
               f"init_from={self.init_from!r} must be a model file path or null")
        check(getattr(self.objective, "lora", None) is None or self.init_from is not None,
              "objective.lora fine-tunes a trained model: set init_from to its model file")
        check_choice("precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        check(self.device in ("auto", "cpu", "cuda"), f"device={self.device!r} is not one of ['auto', 'cpu', 'cuda']")


def train_config_from_dict(data: dict) -> TrainConfig:
    if not isinstance(data, dict):
        raise ValueError(f"a training config must be a mapping, got {type(data).__name__}")
    return from_dict(TrainConfig, data)
