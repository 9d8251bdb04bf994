"""Latent diffusion training (Rombach et al., 2022, Eq. 2): the U-Net learns the simple DDPM loss on the latents of
a frozen KL autoencoder, conditioned on text through cross-attention.

| symbol | code          | meaning                                                              |
|--------|---------------|----------------------------------------------------------------------|
| E      | autoencoder   | frozen encoder, ``encode`` gives scaled latents z0 = (z − shift)·s   |
| τ_θ    | text_encoder  | caption -> context (B, L, D); trainable or frozen                    |
| ε_θ    | unet          | predicts ε, v or x0 (``schedule.prediction_type``)                   |
| p_drop | data.caption_dropout | share of captions the reader replaced by "" (Ho & Salimans, 2022) |

1. z0 = E(x), a posterior sample (as CompVis LDM does), no gradient.
2. Captions are encoded; the reader has already replaced each by "" with probability p_drop (deterministically
   per sample position, so resumes repeat it), so the model also learns the unconditional prediction that
   classifier-free guidance needs (Ho & Salimans, 2022, Alg. 1); the pipeline's unconditional branch encodes ""
   the same way.
3. t ~ U{0, ..., T−1}, ε ~ N(0, I); loss = E[w(t) ‖ε_θ(x_t, t, τ_θ(y)) − target‖²] via
   :func:`latentdiff.diffusion.gaussian.training_losses` (w = 1, or min-SNR-γ, Hang et al., 2023, Eq. 9), with
   the optional ``noise_offset`` (offset noise) and ``input_perturbation`` (Ning et al., 2023) of that function.

The latent scale s: with ``scale_latents_by_std`` a fresh run sets s = 1 / std(z − shift) over its first batch
(all ranks), as CompVis ``scale_by_std`` does, so the diffusion model sees roughly unit-variance latents; s is
checkpointed and exported in the model config. A run fine-tuning an exported model (``init_from``) keeps its s.

Latent shards (:func:`latentdiff.data.latents.cache_latents` with ``encode_fn=vae.encode`` of the same
``autoencoder_checkpoint``) skip step 1: their latents were scaled by the checkpoint's s₀ and are rescaled by
s / s₀ (they hold the posterior mode, so no posterior noise is drawn).
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections import OrderedDict
from pathlib import Path

import torch

from latentdiff.config import LatentDiffusionConfig
from latentdiff.diffusion.gaussian import sample_timesteps, training_losses
from latentdiff.diffusion.samplers import SAMPLERS
from latentdiff.diffusion.schedule import DiffusionSchedule
from latentdiff.io.checkpoint import CheckpointError, load_into, load_model_file
from latentdiff.io.lora import kohya_state_dict, layer_names, save_kohya_lora
from latentdiff.models.autoencoder_kl import AutoencoderKL
from latentdiff.models.lora import add_lora, merged_state_dict, new_lora_weights, target_layers
from latentdiff.models.text_encoders import build_text_encoder
from latentdiff.models.unet import UNetModel
from latentdiff.training.objectives import Objective, check_model_config, freeze, register_objective

LORA_NAME = "trained"  # the adapter name of a LoRA run inside the LoRA layers


class LatentDiffusionObjective(Objective):
    def __init__(self, train_cfg):
        super().__init__()
        check_model_config(train_cfg, LatentDiffusionConfig)
        self.cfg = cfg = train_cfg.objective
        if cfg.sample_sampler not in SAMPLERS:
            raise ValueError(f"objective.sample_sampler={cfg.sample_sampler!r} is not one of {sorted(SAMPLERS)}")
        model_cfg = copy.deepcopy(train_cfg.model)
        ae_state = None
        ae_source = cfg.autoencoder_checkpoint or train_cfg.init_from  # a fine-tuned model brings its own
        if ae_source:
            ae_cfg, ae_state = _read_autoencoder(ae_source)
            if ae_cfg != model_cfg.autoencoder:
                print(f"note: using the autoencoder config stored in {ae_source} instead of model.autoencoder",
                      file=sys.stderr)
            model_cfg = dataclasses.replace(model_cfg, autoencoder=ae_cfg)  # re-validates the whole model
        else:
            print("warning: objective.autoencoder_checkpoint is not set: the frozen autoencoder has random "
                  "weights (only useful for tests)", file=sys.stderr)
        self.model_cfg = model_cfg
        self.cached_scale = model_cfg.autoencoder.scaling_factor  # s₀ of latent shards
        unet_cfg = dataclasses.replace(model_cfg.unet, gradient_checkpointing=train_cfg.gradient_checkpointing)
        self.unet = UNetModel(unet_cfg)
        self.text_encoder = build_text_encoder(model_cfg.text_encoder)
        self.autoencoder = freeze(AutoencoderKL(model_cfg.autoencoder))
        if ae_state is not None:
            load_into(self.autoencoder, ae_state, f"autoencoder of {ae_source}")
        self.frozen["autoencoder"] = self.autoencoder
        self.trainable = {"unet": self.unet}
        if cfg.lora is not None and cfg.lora.text_encoder and model_cfg.text_encoder.type != "clip":
            raise ValueError(f"objective.lora.text_encoder needs a CLIP text encoder (kohya names its layers), not "
                             f"{model_cfg.text_encoder.type!r}")
        self.text_grad = cfg.train_text_encoder if cfg.lora is None else cfg.lora.text_encoder
        self.add_text_encoder(self.text_encoder, cfg.train_text_encoder and cfg.lora is None,
                              model_cfg.text_encoder.layer)
        self.init_source = None  # the init_from file (a LoRA run's base model)
        self.schedule = DiffusionSchedule.from_config(model_cfg.schedule)
        self.scale_from_file = False  # set by init_from: keep that model's latent scale s
        self.text_cache = TextCache(self.text_encoder, cfg.text_cache) if cfg.text_cache else None

    def init_from_file(self, path: str) -> list[str]:
        """Load the model of ``path``; a LoRA run then adds its adapters, the only weights it trains."""
        loaded = super().init_from_file(path)
        self.init_source = path
        if self.cfg.lora is not None:
            self._add_lora(self.cfg.lora)
        return loaded

    def _add_lora(self, cfg) -> None:
        """Freeze the loaded networks and add a fresh adapter (B = 0, so the model starts as loaded) to every layer
        that ``cfg.targets`` names; the adapters become the one trainable module, ``lora``."""
        self.unet.requires_grad_(False)
        adapters = {}
        for component, module in self.lora_modules().items():
            chosen = {n: m for n, m in target_layers(module).items() if set(n.split(".")) & set(cfg.targets)}
            if not chosen:
                raise ValueError(f"objective.lora.targets={cfg.targets} name no layer of the {component}")
            for name, layer in chosen.items():
                down, up = new_lora_weights(layer, cfg.rank)
                adapters[f"{component}.{name}"] = add_lora(module, name, LORA_NAME, down, up, cfg.alpha)
        self.trainable = {"lora": LoRAParameters(adapters)}
        self.ema_names = ("lora",)
        self.find_unused_parameters = cfg.text_encoder and self.model_cfg.text_encoder.layer == "penultimate"

    def lora_modules(self) -> dict[str, torch.nn.Module]:
        """The networks a LoRA run adapts."""
        text = self.cfg.lora is not None and self.cfg.lora.text_encoder
        return {"unet": self.unet, **({"text_encoder": self.text_encoder} if text else {})}

    def adopt_file_config(self, file_cfg) -> None:
        """Fine-tuning keeps the latent scale s (and shift) the initialising model was trained with."""
        ae = self.autoencoder.cfg
        ae.scaling_factor, ae.shift_factor = file_cfg.autoencoder.scaling_factor, file_cfg.autoencoder.shift_factor
        self.scale_from_file = True

    def _schedule_on(self, device: torch.device) -> DiffusionSchedule:
        if self.schedule.device != device:
            self.schedule = self.schedule.to(device)
        return self.schedule

    @torch.no_grad()
    def prepare(self, batch: dict, dist) -> None:
        """Fresh run: s = 1 / std(z − shift) over the first batch of every rank (mode of q(z|x), no RNG used)."""
        if not self.cfg.scale_latents_by_std or self.scale_from_file:
            return
        ae_cfg = self.autoencoder.cfg
        if "latent" in batch:
            z = batch["latent"].float() / self.cached_scale  # z − shift
        else:
            z = self.autoencoder.encode_posterior(batch["image"]).mode().float() - ae_cfg.shift_factor
        stats = torch.stack([z.sum(), z.pow(2).sum(), torch.tensor(float(z.numel()), device=z.device)])
        total, total_sq, n = dist.all_reduce_sum(stats.double()).tolist()
        std = (total_sq / n - (total / n) ** 2) ** 0.5
        ae_cfg.scaling_factor = 1.0 / std

    def latents(self, batch: dict) -> torch.Tensor:
        """Step 1: scaled latents z0 (B, C, h, w) of an image batch, or rescaled cached latents."""
        if "latent" in batch:
            return batch["latent"].float() * (self.autoencoder.cfg.scaling_factor / self.cached_scale)
        with torch.no_grad():
            return self.autoencoder.encode(batch["image"], sample=True).float()

    def forward(self, batch: dict, step: int):
        z0 = self.latents(batch)  # (B, C, h, w)
        B = z0.shape[0]
        if self.text_cache is not None and not self.text_grad:
            context = self.text_cache(list(batch["caption"]))  # (B, L, D), step 2 from memory
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_grad):
                context = self.text_encoder.encode(list(batch["caption"]))  # (B, L, D), step 2
        schedule = self._schedule_on(z0.device)
        t = sample_timesteps(B, schedule.num_timesteps, device=z0.device)  # step 3
        out = training_losses(schedule, self.unet, z0, t, model_kwargs={"context": context},
                              min_snr_gamma=self.cfg.min_snr_gamma, noise_offset=self.cfg.noise_offset,
                              input_perturbation=self.cfg.input_perturbation)
        return out["loss"].mean(), {"mse": out["mse"].mean().detach()}

    @torch.no_grad()
    def sample_images(self, batch: dict) -> tuple[torch.Tensor, int]:
        """A grid generated from ``objective.sample_prompts`` with fixed seeds (the trainer swaps in EMA weights)."""
        from latentdiff.pipelines import LatentDiffusionPipeline

        cfg = self.cfg
        modes = {name: m.training for name, m in self.trainable.items()}
        pipe = LatentDiffusionPipeline(self.export_config(), self.unet, self.autoencoder, self.text_encoder)
        try:
            images, _ = pipe.generate(list(cfg.sample_prompts), steps=cfg.sample_steps, scale=cfg.sample_scale,
                                      sampler=cfg.sample_sampler, seed=cfg.sample_seed)
        finally:
            for name, m in self.trainable.items():
                m.train(modes[name])
        return images.clamp(-1, 1), None

    def export_config(self):
        unet_cfg = dataclasses.replace(self.model_cfg.unet, gradient_checkpointing=False)
        return dataclasses.replace(self.model_cfg, unet=unet_cfg,
                                   autoencoder=dataclasses.replace(self.autoencoder.cfg))

    def export(self):
        """The model; after a LoRA run, with the adapters merged into the weights (state dicts)."""
        modules = {"unet": self.unet, "autoencoder": self.autoencoder, "text_encoder": self.text_encoder}
        if "lora" in self.trainable:
            modules = {name: merged_state_dict(m) for name, m in modules.items()}
        return self.export_config(), modules

    def export_files(self, outdir: Path) -> list[Path]:
        """A LoRA run's adapters as ``lora.safetensors`` in kohya's format (diffusers' ``load_lora_weights``,
        AUTOMATIC1111 and ``pipe.load_lora`` read it)."""
        if "lora" not in self.trainable:
            return []
        cfg = self.cfg.lora
        tensors = kohya_state_dict(self.lora_modules(), LORA_NAME, layer_names(self.unet, self.text_encoder))
        meta = {"ss_sd_model_name": Path(self.init_source).name, "ss_network_args": {"targets": cfg.targets}}
        return [save_kohya_lora(Path(outdir) / "lora.safetensors", tensors, meta, overwrite=True)]

    def extra_state(self) -> dict:
        return {"scaling_factor": float(self.autoencoder.cfg.scaling_factor)}

    def load_extra_state(self, state: dict) -> None:
        if "scaling_factor" in state:
            self.autoencoder.cfg.scaling_factor = float(state["scaling_factor"])


class TextCache:
    """The hidden states of a frozen text encoder per caption, kept for up to ``size`` distinct captions (least
    recently used evicted): ``cache(captions) -> (B, L, D)``, as ``text_encoder.encode(captions)`` gives them.

    Each caption is encoded alone (a batch of one), so its hidden states are the same bits whichever batch first
    brought it and after an eviction or a resume (batched matrix products may round differently); exact resume
    holds. Worth it where captions repeat (class captions, the "" of caption dropout); on web captions that
    rarely repeat it only costs memory: leave ``objective.text_cache`` at 0 there.
    """

    def __init__(self, text_encoder: torch.nn.Module, size: int):
        self.text_encoder, self.size = text_encoder, size
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()  # caption -> (L, D)

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        rows = []
        for caption in captions:
            row = self.entries.pop(caption, None)
            if row is None:
                row = self.text_encoder.encode([caption])[0]  # (L, D)
            self.entries[caption] = row  # now the most recently used
            rows.append(row)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return torch.stack(rows)  # (B, L, D)


class LoRAParameters(torch.nn.Module):
    """The adapters of a LoRA run as one module (what is optimised, averaged and checkpointed): ``adapters`` maps
    ``{component}.{layer}`` (dots as ``/``) to the :class:`~latentdiff.models.lora.LoRA` inside that layer."""

    def __init__(self, adapters: dict[str, torch.nn.Module]):
        super().__init__()
        self.adapters = torch.nn.ModuleDict({k.replace(".", "/"): v for k, v in adapters.items()})


def _read_autoencoder(path: str):
    """(autoencoder config, state dict) from a model file written by an autoencoder_kl run (or a full model)."""
    try:
        cfg, parts, _ = load_model_file(path)
    except CheckpointError as e:
        raise ValueError(f"the autoencoder source: {e}") from None
    if "autoencoder" not in parts or not hasattr(cfg, "autoencoder"):
        raise ValueError(f"the autoencoder source {path!r} holds no 'autoencoder' weights "
                         f"(components: {sorted(parts)})")
    return cfg.autoencoder, parts["autoencoder"]


register_objective("latent_diffusion", LatentDiffusionObjective)
