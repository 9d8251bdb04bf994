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
4. Loss = L_rec + w_KL · L_KL + λ · L_G + L_D (L_D alone in the first ``disc_warmup`` steps from
   ``disc_start``). The discriminator is frozen while L_G is computed, and x̂ is detached for L_D, so each
   gradient reaches only its own network; separate optimizers step them.
"""

from __future__ import annotations

import copy

import torch

from latentdiff.config import LatentDiffusionConfig
from latentdiff.models.autoencoder_kl import AutoencoderKL
from latentdiff.training.objectives import check_model_config, register_objective
from latentdiff.training.objectives.autoencoder_base import AutoencoderObjective


class AutoencoderKLObjective(AutoencoderObjective):
    def __init__(self, train_cfg):
        check_model_config(train_cfg, LatentDiffusionConfig)
        model_cfg = copy.deepcopy(train_cfg.model)
        super().__init__(train_cfg, model_cfg, "autoencoder", AutoencoderKL(model_cfg.autoencoder))

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
        return self.total_loss(loss, x, recon, rec_loss, step, logs), logs  # 3.-4.

    @torch.no_grad()
    def sample_images(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Originals (top row) over their reconstructions (bottom row), from the posterior mode."""
        x = batch["image"][: self.cfg.sample_images]
        recon, _ = self.autoencoder(x, sample_posterior=False)
        return torch.cat([x, recon.float().clamp(-1, 1)]), x.shape[0]


register_objective("autoencoder_kl", AutoencoderKLObjective)
