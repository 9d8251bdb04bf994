"""What the KL and VQ autoencoder objectives share (the VQGAN recipe of Esser et al., 2021, Eq. 4-7): the trained
network, optional LPIPS, an optional patch discriminator with its own optimizer, and the adversarial terms.

From ``disc_start`` on, L_G = −E[D(x̂)] with D frozen, weighted by λ = adaptive weight (Eq. 7) × ``disc_weight``,
and the discriminator's hinge loss L_D on (x, sg(x̂)); each gradient reaches only its own network. For the first
``disc_warmup`` of those steps L_D is the whole loss: a fresh discriminator learns to tell real images from the
reconstructions of a decoder that is resting (a fine-tune of a decoder already trained against another D, whose
new D otherwise gives no signal: BENCHMARKS.md, "Fine-tuning it further did not help").
``train_decoder_only`` freezes the encoder side (:func:`freeze_encoder_side`).
"""

from __future__ import annotations

import torch
from torch import nn

from latentdiff.models.autoencoder_blocks import DECODER_SIDE
from latentdiff.training.objectives import Objective, freeze
from latentdiff.training.objectives.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss
from latentdiff.training.objectives.perceptual import LPIPS, ClassifierFeatureDistance


class AutoencoderObjective(Objective):
    """Base of the autoencoder objectives: ``network`` is trained (and EMA'd, exported) under ``name``."""

    def __init__(self, train_cfg, model_cfg, name: str, network: nn.Module):
        super().__init__()
        self.model_cfg = model_cfg
        self.cfg = cfg = train_cfg.objective
        if train_cfg.gradient_checkpointing:
            raise ValueError(f"gradient_checkpointing is not supported by the {cfg.type} objective; "
                             "set gradient_checkpointing=false")
        self.name = name
        setattr(self, name, network)
        self.trainable = {name: network}
        self.ema_names = (name,)
        if cfg.train_decoder_only:
            self.frozen.update(freeze_encoder_side(network, name))
        if cfg.perceptual_weight > 0:
            self.lpips = (ClassifierFeatureDistance.from_file(cfg.perceptual_classifier) if cfg.perceptual_classifier
                          else LPIPS.from_files(cfg.lpips_weights, cfg.vgg_weights))
            self.frozen["lpips"] = self.lpips
        if cfg.disc_weight > 0:
            self.discriminator = PatchDiscriminator(network.decoder.conv_out.out_channels, cfg.disc_channels,
                                                    cfg.disc_layers)
            self.trainable["discriminator"] = self.discriminator
            # D is idle before disc_start, the autoencoder during the warm-up
            self.find_unused_parameters = cfg.disc_start > 0 or cfg.disc_warmup > 0
            size = model_cfg.image_size
            if size < self.discriminator.min_input_size():
                raise ValueError(f"objective.disc_layers={cfg.disc_layers} needs images of at least "
                                 f"{self.discriminator.min_input_size()} px, model image_size is {size}")

    @property
    def network(self) -> nn.Module:
        return self.trainable[self.name]

    def optimizer_params(self):
        # parameters without gradient (an EMA codebook) are not optimised
        groups = {"main": ([p for p in self.network.parameters() if p.requires_grad], {})}
        if self.cfg.disc_weight > 0:
            overrides = {"betas": tuple(self.cfg.disc_betas)}
            if self.cfg.disc_lr is not None:
                overrides["lr"] = self.cfg.disc_lr
            groups["discriminator"] = (list(self.discriminator.parameters()), overrides)
        return groups

    def total_loss(self, ae_loss: torch.Tensor, x: torch.Tensor, recon: torch.Tensor, rec_loss: torch.Tensor,
                   step: int, logs: dict) -> torch.Tensor:
        """The autoencoder's own loss ``ae_loss`` + λ · L_G + L_D from ``disc_start`` on (``ae_loss`` alone
        before), L_D alone in the discriminator's warm-up; adds the adversarial terms to ``logs``."""
        cfg = self.cfg
        if not (cfg.disc_weight > 0 and step >= cfg.disc_start):
            return ae_loss
        d_loss = hinge_d_loss(self.discriminator(x.detach()).float(), self.discriminator(recon.detach()).float())
        if step < cfg.disc_start + cfg.disc_warmup:
            logs["d_loss"] = d_loss.detach()
            return d_loss
        self.discriminator.requires_grad_(False)
        g_loss = -self.discriminator(recon).float().mean()
        self.discriminator.requires_grad_(True)
        if cfg.adaptive_weight and self.training and torch.is_grad_enabled():
            d_weight = adaptive_weight(rec_loss, g_loss, self.network.decoder.conv_out.weight) * cfg.disc_weight
        else:
            d_weight = torch.tensor(cfg.disc_weight, device=x.device)
        logs.update(g_loss=g_loss.detach(), d_weight=d_weight, d_loss=d_loss.detach())
        return ae_loss + d_weight * g_loss + d_loss

    def export(self):
        return self.model_cfg, {self.name: self.network}


def freeze_encoder_side(network: nn.Module, name: str) -> dict[str, nn.Module]:
    """``train_decoder_only``: everything but ``post_quant_conv`` and ``decoder`` stops learning (the encoder,
    ``quant_conv``, a VQ codebook, whose EMA updates and code restarts run only in training mode), so z = E(x)
    stays what a diffusion model was trained on while the decoder is fine-tuned (as Stable Diffusion's ft-EMA /
    ft-MSE VAE decoders were). The KL term is then a constant. Returns the frozen parts, to be kept in eval mode."""
    return {f"{name}.{child_name}": freeze(child) for child_name, child in network.named_children()
            if child_name not in DECODER_SIDE}
