"""VQ-Diffusion training (Gu et al., 2022, Eq. 5 and 12): the transformer learns p_θ(x0 | x_t, y) over the codes
of a frozen VQ autoencoder, conditioned on text through cross-attention.

| symbol | code                  | meaning                                                                   |
|--------|-----------------------|---------------------------------------------------------------------------|
| E      | vqvae                 | frozen VQ encoder: image -> codes x0 (B, h·w)                             |
| τ_θ    | text_encoder          | caption -> context (B, L, D), L2-normalised per token if the config says  |
| ∅      | transformer.null_context | learned null condition (Improved VQ-Diffusion, Tang et al. 2022, 3.2) |
| p_drop | data.caption_dropout  | share of captions the reader replaced by ""                               |
| p(t)   | timestep_sampler      | importance sampling of t (Nichol & Dhariwal 2021, Sec. 3.3)               |

1. x0 = E(x), nearest-code indices, no gradient.
2. Captions are encoded; a caption the reader dropped ("") is replaced by the learned ∅ (or stays the encoded
   empty prompt when the transformer has none), so the model learns the unconditional p_θ(x0 | x_t, ∅) that
   classifier-free guidance needs (deterministic per sample position, so resumes repeat it).
3. t ~ p(t): uniform until every t was seen 10 times, then ∝ sqrt(E[L_t²]); the loss
   L = Σ_t-terms / p(t) + λ (2 − t/T) L_aux / p(t) is :func:`latentdiff.diffusion.discrete.vq_diffusion_loss`.
   The sampler's ``Lt_history``/``Lt_count`` are checkpointed (``extra_state``) and, under DDP, updated with the
   losses of every rank (all-gathered), so p(t) is identical on all ranks.
"""

from __future__ import annotations

import copy
import dataclasses
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from latentdiff.config import VQDiffusionConfig
from latentdiff.diffusion.discrete import DiscreteSchedule, ImportanceTimestepSampler, vq_diffusion_loss
from latentdiff.io.checkpoint import CheckpointError, load_into, load_model_file
from latentdiff.models.text_encoders import build_text_encoder
from latentdiff.models.transformer import VQDiffusionTransformer
from latentdiff.models.vqvae import VQAutoencoder
from latentdiff.training.objectives import Objective, check_model_config, freeze, register_objective


class SyncedTimestepSampler(ImportanceTimestepSampler):
    """:class:`ImportanceTimestepSampler` whose statistics every DDP rank updates with the losses of all ranks."""

    @torch.no_grad()
    def update(self, t: torch.Tensor, vlb: torch.Tensor) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return super().update(t, vlb)
        super().update(_all_gather(t), _all_gather(vlb.float()))
        dist.broadcast(self.Lt_history, src=0)  # repeated t within a batch: keep rank 0's pick of scatter_

    def state(self) -> dict:
        return {"Lt_history": self.Lt_history.tolist(), "Lt_count": self.Lt_count.tolist()}

    def load_state(self, state: dict) -> None:
        for name in ("Lt_history", "Lt_count"):
            getattr(self, name).copy_(torch.tensor(state[name], dtype=torch.float32))


def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate the 1-D tensors of all ranks (their lengths may differ)."""
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(sizes))
    padded = torch.zeros(longest, dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s)] for o, s in zip(out, sizes)])


class VQDiffusionObjective(Objective):
    def __init__(self, train_cfg):
        super().__init__()
        self.cfg = cfg = train_cfg.objective
        check_model_config(train_cfg, VQDiffusionConfig)
        model_cfg = copy.deepcopy(train_cfg.model)
        vq_state = None
        if cfg.vqvae_checkpoint:
            vq_cfg, vq_state = _read_vqvae(cfg.vqvae_checkpoint)
            if vq_cfg != model_cfg.vqvae:
                print(f"note: using the VQ autoencoder config stored in {cfg.vqvae_checkpoint} instead of "
                      f"model.vqvae", file=sys.stderr)
            try:
                model_cfg = dataclasses.replace(model_cfg, vqvae=vq_cfg)  # re-validates the whole model
            except ValueError as e:
                raise ValueError(f"objective.vqvae_checkpoint={cfg.vqvae_checkpoint!r} does not fit the model "
                                 f"config: {e}") from None
        else:
            print("warning: objective.vqvae_checkpoint is not set: the frozen VQ autoencoder has random weights "
                  "(only useful for tests)", file=sys.stderr)
        self.model_cfg = model_cfg
        tf_cfg = dataclasses.replace(model_cfg.transformer, gradient_checkpointing=train_cfg.gradient_checkpointing)
        self.transformer = VQDiffusionTransformer(tf_cfg)
        self.text_encoder = build_text_encoder(model_cfg.text_encoder)
        self.vqvae = freeze(VQAutoencoder(model_cfg.vqvae))
        if vq_state is not None:
            load_into(self.vqvae, vq_state, f"vqvae of {cfg.vqvae_checkpoint}")
        self.frozen["vqvae"] = self.vqvae
        self.trainable = {"transformer": self.transformer}
        self.add_text_encoder(self.text_encoder, cfg.train_text_encoder, model_cfg.text_encoder.layer)
        self.schedule = DiscreteSchedule.from_config(model_cfg.schedule, model_cfg.vqvae.num_codes)
        self.timestep_sampler = SyncedTimestepSampler(model_cfg.schedule.num_timesteps)

    def _schedule_on(self, device: torch.device) -> DiscreteSchedule:
        if self.schedule.device != device:
            self.schedule = self.schedule.to(device)
        return self.schedule

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """Step 2: captions -> context (B, L, D); dropped ("") captions -> the learned null condition."""
        context = self.text_encoder.encode(captions)  # (B, L, D)
        if self.model_cfg.normalize_context:
            context = F.normalize(context, dim=-1)
        null = self.transformer.null_context
        if null is None:
            return context
        dropped = torch.tensor([c == "" for c in captions], device=context.device)  # (B,)
        # where() keeps ∅ in the graph when no caption is dropped: DDP then sees its (zero) gradient
        return torch.where(dropped[:, None, None], null.to(context.dtype)[None], context)

    def forward(self, batch: dict, step: int):
        cfg = self.cfg
        x = batch["image"]  # (B, 3, H, W)
        with torch.no_grad():
            x0 = self.vqvae.encode_to_codes(x).flatten(1)  # (B, h*w), step 1
        with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.train_text_encoder):
            context = self.encode_captions(list(batch["caption"]))  # (B, L, D)
        out = vq_diffusion_loss(  # step 3
            self._schedule_on(x.device), self.transformer, x0, model_kwargs={"context": context},
            timestep_sampler=self.timestep_sampler if cfg.importance_sampling else None,
            auxiliary_loss_weight=cfg.auxiliary_loss_weight, adaptive_auxiliary_loss=cfg.adaptive_auxiliary_loss,
            mask_weight=tuple(cfg.mask_weight))
        return out["loss"], {"vlb": out["vlb"], "aux": out["aux"]}

    @torch.no_grad()
    def sample_images(self, batch: dict) -> tuple[torch.Tensor, int]:
        """A grid generated from ``objective.sample_prompts`` with a fixed seed (the trainer swaps in EMA weights)."""
        from latentdiff.pipelines import VQDiffusionPipeline

        cfg = self.cfg
        modes = {name: m.training for name, m in self.trainable.items()}
        pipe = VQDiffusionPipeline(self.export_config(), self.vqvae, self.transformer, self.text_encoder)
        try:
            steps = min(cfg.sample_steps, pipe.schedule.num_timesteps)
            images, _ = pipe.generate(list(cfg.sample_prompts), steps=steps, scale=cfg.sample_scale,
                                      truncation=cfg.sample_truncation, seed=cfg.sample_seed)
        finally:
            for name, m in self.trainable.items():
                m.train(modes[name])
        return images.clamp(-1, 1), None

    def export_config(self):
        tf_cfg = dataclasses.replace(self.model_cfg.transformer, gradient_checkpointing=False)
        return dataclasses.replace(self.model_cfg, transformer=tf_cfg)

    def export(self):
        return self.export_config(), {"vqvae": self.vqvae, "transformer": self.transformer,
                                      "text_encoder": self.text_encoder}

    def extra_state(self) -> dict:
        return {"timestep_sampler": self.timestep_sampler.state()}

    def load_extra_state(self, state: dict) -> None:
        if "timestep_sampler" in state:
            self.timestep_sampler.load_state(state["timestep_sampler"])


def _read_vqvae(path: str):
    """(VQ autoencoder config, state dict) from a model file written by a vqvae run (or a whole VQ model)."""
    try:
        cfg, parts, _ = load_model_file(path)
    except CheckpointError as e:
        raise ValueError(f"objective.vqvae_checkpoint: {e}") from None
    if "vqvae" not in parts or not hasattr(cfg, "vqvae"):
        raise ValueError(f"objective.vqvae_checkpoint={path!r} holds no 'vqvae' weights (components: {sorted(parts)})")
    return cfg.vqvae, parts["vqvae"]


register_objective("vq_diffusion", VQDiffusionObjective)
