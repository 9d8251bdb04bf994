"""VQ autoencoder training: reconstruction + vector-quantisation loss (VQ-VAE, van den Oord et al., 2017, Eq. 3),
optionally with LPIPS and a patch-GAN (the VQGAN recipe of Esser et al., 2021, "Taming Transformers", Eq. 4-7).

| symbol      | code          | meaning                                                              |
|-------------|---------------|----------------------------------------------------------------------|
| x, x̂        | x, recon      | images (B, 3, H, W) in [-1, 1] and their reconstructions             |
| z_e, e      | (in vqvae)    | encoder output and its nearest codebook vector (straight-through)    |
| β           | vqvae.beta    | commitment weight (0.25)                                             |
| D           | discriminator | optional patch discriminator, one logit per patch                    |
| λ           | d_weight      | adaptive adversarial weight (Taming, Eq. 7) × ``disc_weight``        |

1. x̂ = Dec(e); the quantizer returns L_VQ = ‖sg[z_e] − e‖² + β ‖z_e − sg[e]‖² (codebook + commitment), or the
   commitment term alone with an EMA codebook (``model.vqvae.ema``, VQ-VAE App. A.1), whose k-means update and
   dead-code restarts (``model.vqvae.restart_dead_codes``) run inside the quantizer in training mode, all-reduced
   under DDP (latentdiff/models/vqvae.py).
2. L_rec = mean |x − x̂| (``l1``) or mean (x − x̂)² (``l2``) over pixels, + w_p · LPIPS(x, x̂) (taming's per-pixel
   means, so L_rec and L_VQ share one scale).
3. From ``disc_start`` on: L_G = −E[D(x̂)] and the discriminator's hinge loss L_D on (x, sg(x̂)).
4. Loss = L_rec + ``vq_weight`` · L_VQ + λ · L_G + L_D (L_D alone in the first ``disc_warmup`` steps from
   ``disc_start``); separate optimizers step the autoencoder and D.

Logged besides the losses: codebook ``usage`` (share of the codes used by the batch) and ``perplexity``
(exp of the entropy of the batch's code histogram; K for a uniformly used codebook of K codes).
"""

from __future__ import annotations

import copy

import torch

from latentdiff.config import VQDiffusionConfig
from latentdiff.models.vqvae import VQAutoencoder
from latentdiff.training.objectives import check_model_config, register_objective
from latentdiff.training.objectives.autoencoder_base import AutoencoderObjective


class VQVAEObjective(AutoencoderObjective):
    def __init__(self, train_cfg):
        check_model_config(train_cfg, VQDiffusionConfig)
        model_cfg = copy.deepcopy(train_cfg.model)
        super().__init__(train_cfg, model_cfg, "vqvae", VQAutoencoder(model_cfg.vqvae))

    def forward(self, batch: dict, step: int):
        cfg = self.cfg
        x = batch["image"]  # (B, 3, H, W)
        recon, vq_loss, stats = self.vqvae(x)  # step 1
        recon, vq_loss = recon.float(), vq_loss.float()
        err = (x - recon).abs() if cfg.reconstruction == "l1" else (x - recon).pow(2)  # (B, 3, H, W), step 2
        rec_loss = err.mean()
        logs = {"l_rec": rec_loss.detach(), "vq_loss": vq_loss.detach(), "usage": stats["usage"],
                "perplexity": stats["perplexity"]}
        if cfg.perceptual_weight > 0:
            p = self.lpips(x, recon).mean()
            rec_loss = rec_loss + cfg.perceptual_weight * p
            logs["lpips"] = p.detach()
        loss = rec_loss + cfg.vq_weight * vq_loss
        return self.total_loss(loss, x, recon, rec_loss, step, logs), logs  # steps 3-4

    @torch.no_grad()
    def sample_images(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Originals (top row) over their reconstructions through the codes (bottom row)."""
        x = batch["image"][: self.cfg.sample_images]
        was_training = self.vqvae.training
        self.vqvae.eval()  # no EMA-codebook update or dead-code restart while drawing
        try:
            recon = self.vqvae.decode_codes(self.vqvae.encode_to_codes(x)).float()
        finally:
            self.vqvae.train(was_training)
        return torch.cat([x, recon.clamp(-1, 1)]), x.shape[0]


register_objective("vqvae", VQVAEObjective)
