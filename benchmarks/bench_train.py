r"""Training throughput: latentdiff's trainer step against a plain diffusers training step, side by side.

Both sides train the same U-Net config from the same weights (diffusers' random init converted into latentdiff's
layout), with the same precision, attention (PyTorch SDPA on both), fused AdamW, clipping and EMA:

- latentdiff: ``Trainer.train_step`` itself (latentdiff/training/trainer.py: autocast, the on-device non-finite
  guard, clipping, fused AdamW, LR schedule, EMA), fed by the real shard reader from latent shards written to a
  temporary folder (``--workers`` loader processes). The time it waits for the reader is reported (data wait).
- diffusers: the loop of diffusers' ``train_text_to_image.py`` example on a batch already on the device:
  ``DDPMScheduler.add_noise``, ``UNet2DConditionModel``, MSE to the noise, backward, clipping,
  ``torch.optim.AdamW(fused=True)`` with the same settings, ``diffusers.training_utils.EMAModel`` (its default,
  per-tensor update). Unlike the example it reads no loss back per step (no ``.item()``), the stronger baseline.

Conditioning: a frozen text encoder (the SD presets) is run once and its context (B, 77, 768) cached for both sides
(``--text cached``; ``--text encode`` runs it every step under no_grad on both); a trained one (the CIFAR-10
recipes) runs with gradients on both sides. Every sample carries the same caption (``CAPTION``). The frozen
autoencoder is left out of both (latent shards), min-SNR
weighting and latent rescaling are off. Before timing, one forward of each side on the same latents, timesteps
and noise must give the same loss (fp32: equal to rounding; bf16: close).

Timing: blocks of ``--steps-per-repeat`` consecutive steps, latentdiff then diffusers, ``--repeats`` times (both
sides see the same machine load); the device is synchronised only at block edges, so steps that never wait for
the GPU run ahead as in training. Reported per side: median ms/step and the range over blocks, samples/s, the
ratio latentdiff/diffusers samples/s (> 1: latentdiff is faster), model FLOPs (``FlopCounterMode`` on one U-Net
forward; a training step counts 3x that, forward + backward, also with gradient checkpointing, which recomputes
a forward that MFU does not count), TFLOP/s and MFU against the card's dense bf16 peak (n/a off CUDA or on an
unknown card), memory (CUDA: the peak allocated during a block above the memory held before it; both: the
trained state, parameters + AdamW moments + EMA copy) and latentdiff's data wait.

    python benchmarks/bench_train.py --preset tiny                       # CPU, seconds
    OMP_NUM_THREADS=2 python benchmarks/bench_train.py --preset mid --batch 2 --repeats 5
    python benchmarks/bench_train.py --preset sd15 --device cuda --precision bf16 --batch 16 --json sd15.json
    python benchmarks/bench_train.py --preset sd15 --device cuda --precision bf16 --batch 8 --compile modules \
        --channels-last --gradient-checkpointing
    python benchmarks/bench_train.py --config configs/cifar10_ldm_gpu.yaml --device cuda --batch 256

Presets (U-Net params): ``tiny`` (configs/train_tiny_ldm.yaml, 4x8x8 latents), ``mid`` (an SD-1.x-style U-Net,
192 channels, 3 levels, 32x32x4 latents, 77x768 context), ``sd15`` (latentdiff/assets/configs/sd15.yaml: 860 M,
64x64x4 latents = 512 px, 77x768 context). ``--compile modules`` compiles each side's U-Net (the trainer's
``compile: true``); ``--compile step`` compiles each side's whole forward + loss (latentdiff: the objective).

diffusers is a benchmark/test-only dependency (``pip install -e .[dev]``); it is imported here, never by the
package.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MID_MODEL = {  # an SD-1.x-style model at 256 px (32x32x4 latents); its autoencoder is never run
    "type": "latent_diffusion", "image_size": 256,
    "unet": {"in_channels": 4, "out_channels": 4, "model_channels": 192, "channel_mult": [1, 2, 4],
             "num_res_blocks": 2, "attention_resolutions": [4, 2], "num_heads": 8, "num_head_channels": None,
             "transformer_depth": 1, "context_dim": 768},
    "autoencoder": {"z_channels": 4, "embed_dim": 4, "ch": 32, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1},
    "text_encoder": {"type": "clip", "width": 768, "layers": 12, "heads": 12, "context_length": 77,
                     "act": "quick_gelu", "layer": "last", "pretrained": None},
    "schedule": {"beta_schedule": "scaled_linear", "num_timesteps": 1000, "beta_start": 0.00085,
                 "beta_end": 0.012, "prediction_type": "epsilon"},
}
PRESETS = {  # name -> (base training config, model dict replacing its model or None, default batch)
    "tiny": ("configs/train_tiny_ldm.yaml", None, 4),
    "mid": ("configs/train_tiny_ldm.yaml", MID_MODEL, 4),
    "sd15": ("configs/train_tiny_ldm.yaml", "latentdiff/assets/configs/sd15.yaml", 8),
}
PEAK_BF16_TFLOPS = [("H100 NVL", None), ("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0)]
CAPTION = "a photo of a cat"  # every sample's: a compiled step (--compile step) that sees captions would recompile
# for each new list of them; what a caption says costs nothing (the encoders pad to their context length)
SIDES = ("latentdiff", "diffusers")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, the module docstring kept verbatim."""


def fail(message: str) -> None:
    """One message on stderr, exit status 2 (bad input), no traceback."""
    print(f"bench_train: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def peak_tflops(device) -> float | None:
    """Dense bf16 peak of the card (TFLOP/s), None off CUDA or for a card not in ``PEAK_BF16_TFLOPS``."""
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def train_config(args, shards: Path, batch: int | None):
    """The training config of the latentdiff side: the preset's (or ``--config``'s) model and optimiser, the
    benchmark's data (``batch`` None: the config's batch size), precision and options, then ``--set`` overrides."""
    from latentdiff.config import apply_overrides, read_yaml, to_dict, train_config_from_dict

    if args.preset:
        base, model, _ = PRESETS[args.preset]
        data = read_yaml(ROOT / base)
        if model is not None:
            data["model"] = dict(model) if isinstance(model, dict) else read_yaml(ROOT / model)
            data["model"]["text_encoder"]["pretrained"] = None  # random weights: nothing to download
            data["objective"]["train_text_encoder"] = False  # frozen, as in Stable Diffusion training
            data["optim"] = {"lr": 1e-5, "warmup_steps": 0, "grad_clip": 1.0, "weight_decay": 1e-2}
            data["ema"] = {"enabled": True, "decay": 0.9999}
    else:
        data = read_yaml(args.config)
    image_size = data["model"]["image_size"]
    fixed = [f"data.shards={shards}", *([f"data.batch_size={batch}"] if batch else []),
             f"data.num_workers={args.workers}", f"data.image_size={image_size}", "data.caption_dropout=0",
             "data.random_flip=false", "data.shuffle_buffer=0", "objective.autoencoder_checkpoint=null",
             "objective.min_snr_gamma=null", "objective.scale_latents_by_std=false", "init_from=null",
             f"precision={args.precision}", f"device={args.device.type}",
             f"compile={str(args.compile == 'modules').lower()}",
             f"gradient_checkpointing={str(args.gradient_checkpointing).lower()}", "grad_accum=1",
             "steps=1000000", "log_every=1000000", "sample_every=0", "checkpoint_every=1000000", f"seed={args.seed}"]
    return train_config_from_dict(apply_overrides(to_dict(train_config_from_dict(data)), fixed + args.set))


def write_latent_shards(folder: Path, n: int, shape: tuple[int, int, int], seed: int) -> None:
    """``n`` random float16 latents with captions, in the layout of ``latentdiff.data.latents.cache_latents``."""
    import io

    import numpy as np

    from latentdiff.data.manifest import Manifest
    from latentdiff.data.writer import ShardWriter

    rng = np.random.default_rng(seed)
    with ShardWriter(folder, "latents", samples_per_shard=256) as writer:
        for i in range(n):
            buf = io.BytesIO()
            np.save(buf, rng.standard_normal(shape).astype("float16"), allow_pickle=False)
            writer.write(f"{i:06d}", {"npy": buf.getvalue(), "txt": CAPTION.encode(),
                                      "json": json.dumps({"latent_shape": list(shape)}).encode()})
    Manifest(kind="latent", source="bench_train", shards=writer.records,
             extra={"latent_dtype": "float16"}).save(folder)


def cached_text(context):
    """A frozen text encoder's output computed once: ``encode`` returns it for any prompts (``--text cached``)."""
    import torch

    class CachedText(torch.nn.Module):
        def encode(self, prompts, clip_skip: int = 1):
            return context

    return CachedText()


def state_bytes(params, optimizer, ema_tensors) -> int:
    """Bytes of the trained state: parameters, the optimizer's per-parameter tensors, the EMA copies."""
    import torch

    total = sum(p.numel() * p.element_size() for p in params)
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total + sum(t.numel() * t.element_size() for t in ema_tensors)


def build(args, workdir: Path) -> dict:
    """Both sides, their inputs and the checks: a dict of everything :func:`measure` needs."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from diffusers.utils import logging as diffusers_logging

    from latentdiff.io.convert_unet import unet_config_to_diffusers, unet_state_dict_from_diffusers
    from latentdiff.training.distributed import DistContext
    from latentdiff.training.trainer import Trainer

    diffusers_logging.set_verbosity_error()
    device = args.device
    probe = train_config(args, workdir / "shards", None)
    B = args.batch or (PRESETS[args.preset][2] if args.preset else probe.data.batch_size)
    ae = probe.model.autoencoder
    side = probe.model.image_size // ae.downsample_factor
    shape = (ae.embed_dim, side, side)
    steps_needed = 2 + args.warmup + args.repeats * args.steps_per_repeat
    write_latent_shards(workdir / "shards", B * (steps_needed + 1), shape, args.seed)
    cfg = train_config(args, workdir / "shards", B)
    trainer = Trainer(cfg, workdir / "run", DistContext(device=device), resume="none", progress=False)
    objective = trainer.objective
    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel(**unet_config_to_diffusers(cfg.model.unet))
    objective.unet.load_state_dict(unet_state_dict_from_diffusers(unet.state_dict(), cfg.model.unet), strict=True)
    unet.to(device).train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trained_text = "text_encoder" in objective.trainable
    text_mode = args.text if args.text != "auto" else ("encode" if trained_text else "cached")
    if text_mode == "cached" and trained_text:
        fail("--text cached needs a frozen text encoder (objective.train_text_encoder=false)")
    text_encoder = copy.deepcopy(objective.text_encoder)  # a same-weights copy for diffusers
    text_encoder.requires_grad_(trained_text)
    g = torch.Generator().manual_seed(args.seed + 1)
    z0 = torch.randn(B, *shape, generator=g).to(device)
    captions = [CAPTION] * B
    with torch.no_grad():
        context = text_encoder.encode(captions)  # (B, L, D)
    text_params = sum(p.numel() for p in text_encoder.parameters())
    if text_mode == "cached":
        objective.text_encoder = cached_text(context)
        text_encoder = None
    if args.channels_last:
        objective.unet.to(memory_format=torch.channels_last)
        unet.to(memory_format=torch.channels_last)
        z0 = z0.contiguous(memory_format=torch.channels_last)
    if args.compile == "modules":
        unet.compile()  # as the trainer's compile: true does with the trained networks
    theirs_params = list(unet.parameters()) + (list(text_encoder.parameters()) if trained_text else [])
    optimizer = torch.optim.AdamW([{"params": [p for p in theirs_params if p.ndim >= 2],
                                    "weight_decay": cfg.optim.weight_decay},
                                   {"params": [p for p in theirs_params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  fused=trainer.optimizers["main"].defaults["fused"])
    their_ema = EMAModel(theirs_params, decay=cfg.ema.decay, use_ema_warmup=False) if cfg.ema.enabled else None
    s = cfg.model.schedule
    scheduler = DDPMScheduler(num_train_timesteps=s.num_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
                              beta_schedule=s.beta_schedule.replace("cosine", "squaredcos_cap_v2"),
                              prediction_type=s.prediction_type)
    if s.prediction_type != "epsilon":
        fail(f"the diffusers side trains epsilon prediction only, not {s.prediction_type!r}")
    T, clip = s.num_timesteps, cfg.optim.grad_clip or float("inf")
    bf16 = args.precision == "bf16"

    def their_loss(t, noise):
        x_t = scheduler.add_noise(z0, noise, t)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):  # as accelerate's bf16 does
            ctx = context if text_mode == "cached" else text_encoder.encode(captions)
            pred = unet(x_t, t, ctx, return_dict=False)[0]
        return F.mse_loss(pred.float(), noise.float())

    compiled = {"loss": their_loss}

    def compile_step() -> None:
        """``--compile step``, after the eager first-loss check (a compiled graph draws other random numbers)."""
        compiled["loss"] = torch.compile(their_loss)
        objective.compile()  # the whole forward + loss of the latentdiff side

    def theirs_step() -> None:
        t = torch.randint(0, T, (B,), device=device)
        loss = compiled["loss"](t, torch.randn_like(z0))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs_params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if their_ema is not None:
            their_ema.step(theirs_params)

    def first_losses() -> dict:
        """One forward per side on the same latents, timesteps and noise (no update)."""
        torch.manual_seed(args.seed)  # the objective draws t, then noise, from the global RNG
        with torch.no_grad(), trainer._autocast():
            ours, _ = objective({"latent": z0, "caption": captions}, step=0)
        torch.manual_seed(args.seed)
        t = torch.randint(0, T, (B,), device=device)
        with torch.no_grad():
            theirs = compiled["loss"](t, torch.randn_like(z0))
        return {"latentdiff": ours.item(), "diffusers": theirs.item()}

    trainer._begin_loop()
    ours_params = [p for m in objective.trainable.values() for p in m.parameters()]
    ema_ours = list(trainer.ema.shadow.values()) if trainer.ema is not None else []
    ema_theirs = list(their_ema.shadow_params) if their_ema is not None else []
    return {"cfg": cfg, "B": B, "shape": shape, "text": text_mode, "trainer": trainer, "unet": unet,
            "steps": {"latentdiff": trainer.train_step, "diffusers": theirs_step}, "first_losses": first_losses,
            "compile_step": compile_step,
            "flops_inputs": (z0, context),
            "state": {"latentdiff": lambda: state_bytes(ours_params, trainer.optimizers["main"], ema_ours),
                      "diffusers": lambda: state_bytes(theirs_params, optimizer, ema_theirs)},
            "zero_grad": {"latentdiff": lambda: [o.zero_grad(set_to_none=True) for o in trainer.optimizers.values()],
                          "diffusers": lambda: optimizer.zero_grad(set_to_none=True)},
            "params": {"unet": sum(p.numel() for p in unet.parameters()),
                       "text_encoder": text_params}}


def forward_flops(sides: dict, args) -> dict:
    """FLOPs of one U-Net forward per side (torch.utils.flop_counter) on the benchmark's batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    z0, context = sides["flops_inputs"]
    t = torch.full((z0.shape[0],), 500, device=z0.device, dtype=torch.long)
    nets = {"latentdiff": lambda: sides["trainer"].objective.unet.forward(z0, t, context),  # .forward: not compiled
            "diffusers": lambda: sides["unet"].forward(z0, t, context, return_dict=False)[0]}
    out = {}
    for name, fn in nets.items():
        with torch.no_grad(), sides["trainer"]._autocast(), FlopCounterMode(display=False) as counter:
            fn()
        out[name] = counter.get_total_flops()
    return out


def measure(args, sides: dict) -> dict:
    """Alternating blocks of ``--steps-per-repeat`` steps; per-block seconds per step, CUDA peaks, data wait."""
    import torch

    device, K = args.device, args.steps_per_repeat
    trainer = sides["trainer"]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        for name in SIDES:
            sides["steps"][name]()
    sync()
    times = {name: [] for name in SIDES}
    cpu = {name: [] for name in SIDES}  # process CPU seconds: steadier than wall time on a shared CPU
    peaks = {name: 0 for name in SIDES}
    trainer._data_wait, waited_steps = 0.0, 0
    for i in range(args.repeats):
        print(f"bench_train: repeat {i + 1}/{args.repeats}", file=sys.stderr, flush=True)
        for name in SIDES:
            for other in SIDES:  # a block starts with no gradients held, its own or the other side's
                sides["zero_grad"][other]()
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(K):
                sides["steps"][name]()
            sync()
            times[name].append((time.perf_counter() - start) / K)
            cpu[name].append((time.process_time() - start_cpu) / K)
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) - base)
        waited_steps += K
    trainer.guard.check()  # a non-finite step would make the timing meaningless
    return {"times": times, "cpu": cpu, "peaks": peaks if device.type == "cuda" else None,
            "data_wait_s_per_step": trainer._data_wait / waited_steps}


def run(args) -> dict:
    import torch

    from latentdiff.models.attention import get_attention_backend

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        sides = build(args, Path(tmp))
        try:
            first = sides["first_losses"]()
            if args.compile == "step":
                sides["compile_step"]()
            flops = forward_flops(sides, args)
            m = measure(args, sides)
            state = {name: fn() for name, fn in sides["state"].items()}
        finally:
            sides["trainer"].close()
    B, peak = sides["B"], peak_tflops(args.device)
    median = {n: statistics.median(ts) for n, ts in m["times"].items()}
    train_flops = {n: 3 * f for n, f in flops.items()}  # forward + backward (2x forward)
    tflops = {n: train_flops[n] / median[n] / 1e12 for n in SIDES}
    cfg = sides["cfg"]
    return {"preset": args.preset, "config": None if args.preset else str(args.config), "overrides": args.set,
            "device": str(args.device), "device_name": torch.cuda.get_device_name(args.device)
            if args.device.type == "cuda" else "cpu", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "precision": args.precision, "compile": args.compile,
            "channels_last": args.channels_last, "gradient_checkpointing": args.gradient_checkpointing,
            "attention": {"latentdiff": get_attention_backend(), "diffusers": type(
                next(iter(sides["unet"].attn_processors.values()))).__name__},
            "fused_adamw": bool(sides["trainer"].optimizers["main"].defaults["fused"]), "text": sides["text"],
            "ema": cfg.ema.enabled, "batch": B, "latent": list(sides["shape"]), "workers": args.workers,
            "repeats": args.repeats, "steps_per_repeat": args.steps_per_repeat, "warmup": args.warmup,
            "params": sides["params"], "first_step_loss": first, "step_s": median,
            "step_s_range": {n: [min(ts), max(ts)] for n, ts in m["times"].items()}, "raw_step_s": m["times"],
            "cpu_step_s": {n: statistics.median(ts) for n, ts in m["cpu"].items()}, "raw_cpu_step_s": m["cpu"],
            "samples_per_s": {n: B / median[n] for n in SIDES},
            "ratio": median["diffusers"] / median["latentdiff"],  # = latentdiff samples/s / diffusers samples/s
            "forward_flops": flops, "train_flops_per_step": train_flops, "tflops": tflops,
            "peak_bf16_tflops": peak, "mfu": {n: tflops[n] / peak for n in SIDES} if peak else None,
            "step_peak_bytes": m["peaks"], "state_bytes": state,
            "data_wait_s_per_step": m["data_wait_s_per_step"],
            "data_wait_share": m["data_wait_s_per_step"] / median["latentdiff"]}


def markdown(r: dict) -> str:
    """The result as a Markdown table (one row per side) and the ratio line."""
    gb = 1024**3
    what = f"preset {r['preset']}" if r["preset"] else f"config {r['config']}"
    lines = [f"{what}, batch {r['batch']}, latent {'x'.join(map(str, r['latent']))}, {r['precision']}, compile "
             f"{r['compile']}, channels_last {r['channels_last']}, gradient checkpointing "
             f"{r['gradient_checkpointing']}, text {r['text']}, U-Net {r['params']['unet'] / 1e6:.1f} M params; "
             f"{r['device_name']}, {r['threads']} threads, torch {r['torch']}; {r['repeats']} x "
             f"{r['steps_per_repeat']} steps per side", "",
             "| side | ms/step (median) | range | samples/s | TFLOP/s | MFU | step peak GB | state GB | data wait |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in SIDES:
        lo, hi = r["step_s_range"][n]
        mfu = f"{100 * r['mfu'][n]:.1f} %" if r["mfu"] else "n/a"
        peak = f"{r['step_peak_bytes'][n] / gb:.2f}" if r["step_peak_bytes"] else "n/a"
        wait = (f"{1e3 * r['data_wait_s_per_step']:.1f} ms ({100 * r['data_wait_share']:.1f} %)"
                if n == "latentdiff" else "(in memory)")
        lines.append(f"| {n} | {1e3 * r['step_s'][n]:.1f} | {1e3 * lo:.1f}-{1e3 * hi:.1f} | "
                     f"{r['samples_per_s'][n]:.3g} | {r['tflops'][n]:.3g} | {mfu} | {peak} | "
                     f"{r['state_bytes'][n] / gb:.2f} | {wait} |")
    first = r["first_step_loss"]
    cpu = r["cpu_step_s"]
    lines += ["", f"ratio latentdiff/diffusers samples/s: {r['ratio']:.3f} (process CPU time per step "
              f"{1e3 * cpu['latentdiff']:.1f} vs {1e3 * cpu['diffusers']:.1f} ms: ratio "
              f"{cpu['diffusers'] / cpu['latentdiff']:.3f}); forward GFLOP per batch "
              f"{r['forward_flops']['latentdiff'] / 1e9:.4g} (diffusers {r['forward_flops']['diffusers'] / 1e9:.4g}),"
              f" a step counts 3x; first loss {first['latentdiff']:.6f} vs {first['diffusers']:.6f}"]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="model preset (replaces --config): tiny, mid or sd15 (see above)")
    parser.add_argument("--config", default="configs/cifar10_ldm.yaml", help="training config (model, optim, ema)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted key (repeatable), e.g. optim.lr=1e-4")
    parser.add_argument("--batch", type=int, default=None, help="samples per step (default: the preset's or "
                        "data.batch_size)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="autocast dtype, both sides")
    parser.add_argument("--compile", choices=["none", "modules", "step"], default="none",
                        help="torch.compile: none, each side's U-Net (modules), or its whole forward + loss (step)")
    parser.add_argument("--channels-last", action="store_true", help="U-Nets and latents in channels_last")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--text", choices=["auto", "cached", "encode"], default="auto",
                        help="frozen text encoder: context computed once (cached) or every step (encode); auto: "
                             "cached when frozen, and a trained encoder always encodes")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per side (median reported)")
    parser.add_argument("--steps-per-repeat", type=int, default=1, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side before timing")
    parser.add_argument("--workers", type=int, default=1, help="loader processes of latentdiff's shard reader")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to this file")
    parser.add_argument("--markdown", metavar="OUT", help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps_per_repeat < 1 or args.warmup < 0 or args.workers < 0 or (
            args.batch is not None and args.batch < 1):
        fail("--repeats, --steps-per-repeat and --batch must be >= 1, --warmup and --workers >= 0")
    import torch

    try:
        args.device = torch.device(args.device)
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:
        fail(f"--device {args.device}: {e}")
    if args.device.type == "cuda" and args.device.index is None:
        args.device = torch.device("cuda", torch.cuda.current_device())
    if args.device.type == "cpu" and args.precision == "bf16":
        print("bench_train: note: bf16 autocast on the CPU is slow; meaningful numbers need a GPU", file=sys.stderr)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        r = run(args)
    except (ValueError, ImportError) as e:
        fail(str(e))
    table = markdown(r)
    print(table)
    from latentdiff.atomic import atomic_write

    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump(r, f, indent=2)
    if args.markdown:
        with atomic_write(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
