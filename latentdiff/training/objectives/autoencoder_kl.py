"""KL autoencoder training: reconstruction + KL + optional LPIPS + optional patch-GAN (Rombach et al., 2022,
Sec. 3 and App. G; the ``LPIPSWithDiscriminator`` loss of CompVis LDM / taming-transformers, with a fixed
output log-variance of 0).

| symbol   | code          | meaning                                                        |
|----------|---------------|----------------------------------------------------------------|
| x, x̂     | x, recon      | images (B, 3, H, W) in [-1, 1] and their reconstructions       |
| q(z|x)   | posterior     | the encoder's diagonal Gaussian                                |
| D        | discriminator | patch discriminator, one logit per patch                       |
| λ        | d_weight      | adaptive adversarial weight (Taming, Eq. 7) × ``disc_weight``  |

1. L_rec = Σ_pixels (|x − x̂| or (x − x̂)²) + w_p · LPIPS(x, x̂), averaged over the batch (a per-image sum,
   as in LDM, so ``kl_weight`` keeps its usual scale 1e-6).
2. L_KL = KL(q(z|x) ‖ N(0, I)) summed per image, averaged over the batch.
3. From ``disc_start`` on: L_G = −E[D(x̂)], and the discriminator's hinge loss L_D on (x, sg(x̂)).
4. Loss = L_rec + w_KL · L_KL + λ · L_G + L_D. The discriminator is frozen while L_G is computed, and x̂ is
   detached for L_D, so each gradient reaches only its own network; separate optimizers step them.
"""

from __future__ import annotations

import copy

import torch

from latentdiff.config import LatentDiffusionConfig
from latentdiff.models.autoencoder_kl import AutoencoderKL
from latentdiff.training.objectives import Objective, check_model_config, register_objective
from latentdiff.training.objectives.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss
from latentdiff.training.objectives.perceptual import LPIPS


class AutoencoderKLObjective(Objective):
    def __init__(self, train_cfg):
        super().__init__()
        check_model_config(train_cfg, LatentDiffusionConfig)
        self.model_cfg = copy.deepcopy(train_cfg.model)
        self.cfg = cfg = train_cfg.objective
        if train_cfg.gradient_checkpointing:
            raise ValueError("gradient_checkpointing is not supported by the autoencoder_kl objective; "
                             "set gradient_checkpointing=false")
        ae_cfg = self.model_cfg.autoencoder
        self.autoencoder = AutoencoderKL(ae_cfg)
        self.trainable = {"autoencoder": self.autoencoder}
        self.ema_names = ("autoencoder",)
        if cfg.perceptual_weight > 0:
            self.lpips = LPIPS.from_files(cfg.lpips_weights, cfg.vgg_weights)
            self.frozen["lpips"] = self.lpips
        if cfg.disc_weight > 0:
            self.discriminator = PatchDiscriminator(ae_cfg.out_channels, cfg.disc_channels, cfg.disc_layers)
            self.trainable["discriminator"] = self.discriminator
            self.find_unused_parameters = cfg.disc_start > 0  # D is idle before disc_start
            size = self.model_cfg.image_size
            if size < self.discriminator.min_input_size():
                raise ValueError(f"objective.disc_layers={cfg.disc_layers} needs images of at least "
                                 f"{self.discriminator.min_input_size()} px, model image_size is {size}")

    def optimizer_params(self):
        groups = {"main": (list(self.autoencoder.parameters()), {})}
        if self.cfg.disc_weight > 0:
            overrides = {"betas": tuple(self.cfg.disc_betas)}
            if self.cfg.disc_lr is not None:
                overrides["lr"] = self.cfg.disc_lr
            groups["discriminator"] = (list(self.discriminator.parameters()), overrides)
        return groups

    def forward(self, batch: dict, step: int):
        cfg = self.cfg
        if "image" not in batch:
            raise ValueError("the autoencoder_kl objective trains on image shards; data.shards holds latents")
        x = batch["image"]  # (B, 3, H, W)
        recon, posterior = self.autoencoder(x)  # (B, 3, H, W)
        recon = recon.float()
        # 1. reconstruction (+ perceptual) per image
        err = (x - recon).abs() if cfg.reconstruction == "l1" else (x - recon).pow(2)  # (B, 3, H, W)
        rec_loss = err.sum(dim=(1, 2, 3))  # (B,)
        logs = {"l_rec": err.mean().detach()}
        if cfg.perceptual_weight > 0:
            p = self.lpips(x, recon)  # (B,)
            rec_loss = rec_loss + cfg.perceptual_weight * p * err[0].numel()  # per pixel, summed like err
            logs["lpips"] = p.mean().detach()
        rec_loss = rec_loss.mean()
        # 2. KL to the prior
        kl = posterior.kl().float().mean()
        loss = rec_loss + cfg.kl_weight * kl
        logs["kl"] = kl.detach()
        # 3.-4. adversarial terms
        if cfg.disc_weight > 0 and step >= cfg.disc_start:
            self.discriminator.requires_grad_(False)
            g_loss = -self.discriminator(recon).float().mean()
            self.discriminator.requires_grad_(True)
            if cfg.adaptive_weight and self.training and torch.is_grad_enabled():
                last = self.autoencoder.decoder.conv_out.weight
                d_weight = adaptive_weight(rec_loss, g_loss, last) * cfg.disc_weight
            else:
                d_weight = torch.tensor(cfg.disc_weight, device=x.device)
            logits_real = self.discriminator(x.detach()).float()
            logits_fake = self.discriminator(recon.detach()).float()
            d_loss = hinge_d_loss(logits_real, logits_fake)
            loss = loss + d_weight * g_loss + d_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight, d_loss=d_loss.detach())
        return loss, logs

    @torch.no_grad()
    def sample_images(self, batch: dict):
        """Originals (top row) over their reconstructions (bottom row), from the posterior mode."""
        x = batch["image"][: self.cfg.sample_images]
        recon, _ = self.autoencoder(x, sample_posterior=False)
        return torch.cat([x, recon.float().clamp(-1, 1)]), x.shape[0]

    def export(self):
        return self.model_cfg, {"autoencoder": self.autoencoder}


register_objective("autoencoder_kl", AutoencoderKLObjective)
