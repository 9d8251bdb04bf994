r"""Training throughput: latentdiff's latent-diffusion training step against a plain diffusers training step.

Both sides train the same U-Net config from the same weights (diffusers' random init converted into latentdiff's
layout) with a copy of the same text encoder, on the same latents, captions, timesteps and noise:

- latentdiff: :class:`~latentdiff.training.objectives.latent_diffusion.LatentDiffusionObjective` on a batch of
  latents (text encoder -> U-Net -> ε loss), backward, gradient clipping, the trainer's AdamW, the trainer's EMA.
- diffusers: the loop of diffusers' ``train_text_to_image.py`` example: ``DDPMScheduler.add_noise``,
  ``UNet2DConditionModel``, MSE to the noise, backward, clipping, ``torch.optim.AdamW`` with the same settings,
  ``diffusers.training_utils.EMAModel``.

The frozen autoencoder is left out of both (a latent cache), min-SNR weighting is off on both. Steps alternate
(latentdiff, diffusers) so both see the same machine load; the table gives medians after warmup in samples/s and
the ratio latentdiff/diffusers (> 1: latentdiff is faster), and the two first-step losses (same math: equal to
float32 rounding).

    python benchmarks/bench_train.py                                   # configs/cifar10_ldm.yaml, its batch
    OMP_NUM_THREADS=2 python benchmarks/bench_train.py --batch 32 --repeats 7
    python benchmarks/bench_train.py --config configs/train_tiny_ldm.yaml --device cuda --json bench_train.json

The same U-Net on 4x8x8 latents instead of the recipe's 8x8x8 (the autoencoder's latent channels and the U-Net's
input and output channels, all set to 4):

    python benchmarks/bench_train.py --batch 64 --set model.unet.in_channels=4 --set model.unet.out_channels=4 \
        --set model.autoencoder.z_channels=4 --set model.autoencoder.embed_dim=4

diffusers is a benchmark/test-only dependency (``pip install -e .[dev]``); it is imported here, never by the
package.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, the module docstring kept verbatim."""


def fail(message: str) -> None:
    """One message on stderr, exit status 2 (bad input), no traceback."""
    print(f"bench_train: error: {message}", file=sys.stderr)
    raise SystemExit(2)


CAPTIONS = ["a photo of an airplane", "a photo of an automobile", "a photo of a bird", "a photo of a cat",
            "a photo of a deer", "a photo of a dog", "a photo of a frog", "a photo of a horse", "a photo of a ship",
            "a photo of a truck"]


def build(cfg, device):
    """(our objective, our optimizer, our EMA), (their U-Net, text encoder, optimizer, EMA, scheduler)."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from diffusers.utils import logging as diffusers_logging

    from latentdiff.io.convert_unet import unet_config_to_diffusers, unet_state_dict_from_diffusers
    from latentdiff.training.ema import EMA
    from latentdiff.training.objectives.latent_diffusion import LatentDiffusionObjective
    from latentdiff.training.optim import build_optimizer

    diffusers_logging.set_verbosity_error()
    torch.manual_seed(cfg.seed)
    unet = UNet2DConditionModel(**unet_config_to_diffusers(cfg.model.unet))
    objective = LatentDiffusionObjective(cfg)
    objective.unet.load_state_dict(unet_state_dict_from_diffusers(unet.state_dict(), cfg.model.unet), strict=True)
    text_encoder = copy.deepcopy(objective.text_encoder)
    objective.to(device).train()
    unet.to(device).train()
    text_encoder.to(device).train()
    ours_params = [p for m in objective.trainable.values() for p in m.parameters()]
    theirs_params = list(unet.parameters()) + list(text_encoder.parameters())
    ours = (objective, build_optimizer(ours_params, cfg.optim),
            EMA({n: objective.trainable[n] for n in objective.ema_names}, cfg.ema.decay, cfg.ema.warmup))
    s = cfg.model.schedule
    scheduler = DDPMScheduler(num_train_timesteps=s.num_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
                              beta_schedule=s.beta_schedule.replace("cosine", "squaredcos_cap_v2"),
                              prediction_type=s.prediction_type)
    optimizer = torch.optim.AdamW([{"params": [p for p in theirs_params if p.ndim >= 2],
                                    "weight_decay": cfg.optim.weight_decay},
                                   {"params": [p for p in theirs_params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  fused=ours[1].defaults["fused"])
    ema = EMAModel(theirs_params, decay=cfg.ema.decay, use_ema_warmup=False)
    return ours, (unet, text_encoder, optimizer, ema, scheduler, theirs_params)


def run(args) -> dict:
    import torch
    import torch.nn.functional as F

    from latentdiff.config import load_train_config

    cfg = load_train_config(args.config, ["objective.autoencoder_checkpoint=null", "objective.min_snr_gamma=null",
                                          *args.set])
    device = torch.device(args.device)
    B = args.batch or cfg.data.batch_size
    (objective, opt, ema), (unet, text_encoder, optimizer, their_ema, scheduler, theirs_params) = build(cfg, device)
    ae = cfg.model.autoencoder
    side = cfg.model.image_size // ae.downsample_factor
    g = torch.Generator().manual_seed(args.seed)
    z0 = torch.randn(B, ae.embed_dim, side, side, generator=g).to(device)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(B)]
    clip = cfg.optim.grad_clip or float("inf")
    ours_params = [p for group in opt.param_groups for p in group["params"]]
    T = cfg.model.schedule.num_timesteps

    def ours_step(seed: int) -> float:
        torch.manual_seed(seed)  # t, then noise, as in the objective
        loss, _ = objective({"latent": z0, "caption": captions}, step=0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours_params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update()
        return loss.item()

    def theirs_step(seed: int) -> float:
        torch.manual_seed(seed)
        t = torch.randint(0, T, (B,)).to(device)
        noise = torch.randn_like(z0)
        x_t = scheduler.add_noise(z0, noise, t)
        context = text_encoder.encode(captions)
        pred = unet(x_t, t, context, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs_params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        their_ema.step(theirs_params)
        return loss.item()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    steps = {"latentdiff": ours_step, "diffusers": theirs_step}
    first = {name: fn(args.seed) for name, fn in steps.items()}  # same weights, same inputs: same loss
    for i in range(args.warmup):
        for fn in steps.values():
            fn(args.seed + 1 + i)
    times = {name: [] for name in steps}
    for i in range(args.repeats):
        for name, fn in steps.items():
            sync()
            start = time.perf_counter()
            fn(args.seed + 100 + i)
            sync()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    return {"config": str(args.config), "overrides": args.set, "device": str(device),
            "threads": torch.get_num_threads(), "batch": B, "latent": [ae.embed_dim, side, side],
            "repeats": args.repeats,
            "unet_params": sum(p.numel() for p in unet.parameters()),
            "text_encoder_params": sum(p.numel() for p in text_encoder.parameters()),
            "first_step_loss": first, "step_s": median, "raw_step_s": times,
            "samples_per_s": {name: B / s for name, s in median.items()},
            "ratio": median["diffusers"] / median["latentdiff"]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--config", default="configs/cifar10_ldm.yaml", help="training config (model, optim, ema)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted key (repeatable), e.g. model.unet.in_channels=4")
    parser.add_argument("--batch", type=int, default=None, help="samples per step (default: data.batch_size)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per side (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side before timing")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1):
        fail("--repeats and --batch must be >= 1, --warmup >= 0")
    try:
        r = run(args)
    except (ValueError, RuntimeError, ImportError) as e:
        fail(str(e))
    sets = "".join(f" --set {o}" for o in r["overrides"])
    print(f"config={r['config']}{sets} device={r['device']} threads={r['threads']} batch={r['batch']} "
          f"latent={r['latent']} U-Net {r['unet_params'] / 1e6:.2f}M + text encoder "
          f"{r['text_encoder_params'] / 1e6:.2f}M params, repeats={r['repeats']}")
    print(f"first-step loss: latentdiff {r['first_step_loss']['latentdiff']:.6f}, "
          f"diffusers {r['first_step_loss']['diffusers']:.6f}")
    print(f"{'':<14}{'ms/step':>10}{'samples/s':>12}")
    for name in ("latentdiff", "diffusers"):
        print(f"{name:<14}{r['step_s'][name] * 1e3:>10.1f}{r['samples_per_s'][name]:>12.1f}")
    print(f"ratio (diffusers time / latentdiff time): {r['ratio']:.3f}")
    if args.json:
        from latentdiff.atomic import atomic_write

        with atomic_write(args.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
