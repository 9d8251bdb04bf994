"""Benchmark latentdiff's U-Net against diffusers' UNet2DConditionModel, side by side in one run.

Both models are built from the same config with the same weights (diffusers' random init converted into
latentdiff's layout) and fed the same inputs. Timed: one U-Net call with classifier-free guidance batching
(2 x --batch), and a full guided DDIM sample loop (eta = 0, --steps steps, latentdiff's sampler and guidance
wrapper driving either model). Each repeat runs latentdiff then diffusers, so both see the same machine load;
the table reports medians after warmup, the ratio diffusers/latentdiff (> 1: latentdiff is faster), FLOPs of
one call (torch.utils.flop_counter) and the achieved TFLOP/s; on CPU also the medians of process CPU time, which
a machine shared with other jobs disturbs less than wall-clock time.

    python benchmarks/bench.py
    OMP_NUM_THREADS=2 python benchmarks/bench.py --config small --repeats 7 --steps 50
    python benchmarks/bench.py --config sd15 --device cuda --dtype fp16 --json bench_sd15.json
    python benchmarks/bench.py --config tiny --compile --steps 50      # adds rows with both sides compiled

With ``--compile`` the rows are repeated with both U-Nets compiled: latentdiff through its fast path
(latentdiff/pipelines/fast.py, ``torch.compile(forward, mode=..., dynamic=False)``) and diffusers through
``torch.compile(unet)`` with the same mode, as diffusers documents; the first-call (compile) time of each is
reported. The compiled rows' ratio is compiled diffusers / compiled latentdiff; "fast/eager" is eager
latentdiff / compiled latentdiff.

diffusers is a benchmark/test-only dependency (``pip install -e .[dev]``); it is imported here, never by the
package.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from timing import sync, time_pair
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from latentdiff.atomic import atomic_write
from latentdiff.config import ScheduleConfig, UNetConfig
from latentdiff.diffusion.samplers import classifier_free_guidance, sample
from latentdiff.diffusion.schedule import DiffusionSchedule
from latentdiff.io.convert_unet import unet_config_to_diffusers, unet_state_dict_from_diffusers
from latentdiff.models.attention import get_attention_backend, set_attention_backend
from latentdiff.models.unet import UNetModel

# name -> (U-Net config, latent side, context length)
CONFIGS = {
    "tiny": (UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1, 2],
                        num_heads=4, context_dim=64), 16, 77),
    "small": (UNetConfig(model_channels=64, channel_mult=[1, 2, 2], num_res_blocks=2, attention_resolutions=[1, 2],
                         num_heads=4, context_dim=768), 32, 77),
    "sd15": (UNetConfig(), 64, 77),  # Stable Diffusion 1.5 at 512x512 pixels
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="small", help="U-Net size and latent resolution")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="parameter and activation dtype")
    p.add_argument("--batch", type=int, default=1, help="images per call (the U-Net sees 2x with guidance)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the sample loop (0 skips the loop)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed U-Net calls before timing")
    p.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to this file")
    p.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="also time both U-Nets under torch.compile (MODE: default, reduce-overhead, max-autotune)")
    args = p.parse_args(argv)
    for name in ("batch", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.steps <= 1000 or args.warmup < 0:
        p.error(f"--steps must be in [0, 1000] and --warmup >= 0, got {args.steps} and {args.warmup}")
    try:
        args.device = torch.device(args.device)
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:
        p.error(f"--device {args.device}: {e}")
    return args


def build_models(cfg: UNetConfig, device: torch.device, dtype: torch.dtype, seed: int):
    """(latentdiff U-Net, diffusers U-Net) with identical weights, in eval mode."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its note on casting with .to(dtype) does not apply to a U-Net
    torch.manual_seed(seed)
    theirs = UNet2DConditionModel(**unet_config_to_diffusers(cfg))
    ours = UNetModel(cfg)
    ours.load_state_dict(unet_state_dict_from_diffusers(theirs.state_dict(), cfg), strict=True)
    return (ours.to(device, dtype).eval().requires_grad_(False),
            theirs.to(device, dtype).eval().requires_grad_(False))


def count_flops(fn) -> int:
    """FLOPs of one call. Attention runs through SDPA's math kernel here: the fused CPU kernel (and xformers)
    would be invisible to the counter."""
    backend = get_attention_backend()
    set_attention_backend("sdpa")
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            fn()
    finally:
        set_attention_backend(backend)
    return counter.get_total_flops()


def run(args: argparse.Namespace) -> dict:
    cfg, side, length = CONFIGS[args.config]
    device, dtype = args.device, DTYPES[args.dtype]
    ours, theirs = build_models(cfg, device, dtype, args.seed)
    models = {"latentdiff": ours, "diffusers": lambda x, t, context: theirs(x, t, context, return_dict=False)[0]}

    g = torch.Generator().manual_seed(args.seed)
    B = args.batch
    x = torch.randn(2 * B, cfg.in_channels, side, side, generator=g).to(device, dtype)
    t = torch.full((2 * B,), 500, device=device)
    context = torch.randn(2 * B, length, cfg.context_dim, generator=g).to(device, dtype)  # [uncond; cond]
    calls = {name: (lambda m=m: m(x, t, context)) for name, m in models.items()}
    variants = [("", models, calls)]
    if args.compile:
        variants.append((" compiled", *compiled_models(ours, theirs, args.compile, x, t, context)))

    results = {"config": args.config, "unet": vars(cfg), "device": str(device), "dtype": args.dtype,
               "batch": B, "latent": [cfg.in_channels, side, side], "context_length": length,
               "threads": torch.get_num_threads(), "repeats": args.repeats, "steps": args.steps,
               "params": sum(p.numel() for p in ours.parameters())}
    rows, cpu_rows, diffs = {}, {}, {}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for fn in calls.values():
                fn()
        results["flops"] = {name: count_flops(fn) for name, fn in calls.items()}
        if args.compile:
            results["compile_s"] = {name: first_call_s(fn, device) for name, fn in variants[1][2].items()}
        schedule = DiffusionSchedule.from_config(ScheduleConfig())  # Stable Diffusion's scaled-linear betas
        x_T = torch.randn(B, cfg.in_channels, side, side, generator=g).to(device, dtype)
        cond = {"context": context[B:], "uncond_context": context[:B]}
        for suffix, variant_models, variant_calls in variants:
            for _ in range(args.warmup if suffix else 0):
                for fn in variant_calls.values():
                    fn()
            row = "unet call" + suffix
            rows[row], cpu_rows[row], diffs[row] = time_pair(row, variant_calls, args.repeats, device)
            if args.steps:
                loops = {name: (lambda m=m: sample(classifier_free_guidance(m, args.scale), schedule, x_T, "ddim",
                                                   args.steps, model_kwargs=cond, steps_offset=1))
                         for name, m in variant_models.items()}
                row = f"ddim {args.steps} steps" + suffix
                rows[row], cpu_rows[row], diffs[row] = time_pair(row, loops, args.repeats, device)
        if device.type == "cuda":
            results["peak_memory_gib"] = {}
            for name, fn in calls.items():
                torch.cuda.reset_peak_memory_stats(device)
                fn()
                results["peak_memory_gib"][name] = torch.cuda.max_memory_allocated(device) / 2**30
    results["timings_s"] = {row: {name: statistics.median(ts) for name, ts in by_model.items()}
                            for row, by_model in rows.items()}
    results["cpu_timings_s"] = {row: {name: statistics.median(ts) for name, ts in by_model.items()}
                                for row, by_model in cpu_rows.items()}
    results["raw_timings_s"] = rows
    results["raw_cpu_timings_s"] = cpu_rows
    results["max_abs_diff"] = diffs
    # U-Net calls per row: one, or one per step (on a batch of B instead of 2B when the scale is 1)
    results["calls_per_row"] = {row: 1.0 if row.startswith("unet call") else
                                args.steps * (0.5 if args.scale == 1 else 1.0) for row in rows}
    return results


def compiled_models(ours, theirs, mode: str, x, t, context) -> tuple[dict, dict]:
    """(models, calls) as in run(), with latentdiff's U-Net compiled by its fast path (on a copy: the eager one
    stays eager) and diffusers' by torch.compile, both with ``mode`` and static shapes."""
    import copy

    from latentdiff.pipelines.fast import CompiledForward

    fast = copy.deepcopy(ours)
    fast.forward = CompiledForward("latentdiff unet", fast, mode)
    theirs_compiled = torch.compile(theirs, mode=mode, dynamic=False)
    models = {"latentdiff": fast,
              "diffusers": lambda x, t, context: theirs_compiled(x, t, context, return_dict=False)[0]}
    return models, {name: (lambda m=m: m(x, t, context)) for name, m in models.items()}


def first_call_s(fn, device: torch.device) -> float:
    """Seconds of one call (for a compiled function: the compilation and its first run)."""
    import time

    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def print_table(r: dict) -> None:
    print(f"config={r['config']} device={r['device']} dtype={r['dtype']} batch={r['batch']} (U-Net batch "
          f"{2 * r['batch']}) latent={r['latent']} threads={r['threads']} repeats={r['repeats']} "
          f"params={r['params'] / 1e6:.2f}M")
    flops = r["flops"]["latentdiff"]
    print(f"FLOPs per U-Net call: latentdiff {flops / 1e9:.2f} G, diffusers {r['flops']['diffusers'] / 1e9:.2f} G")
    print(f"{'':<16}{'latentdiff ms':>15}{'diffusers ms':>15}{'ratio d/l':>11}{'TFLOP/s ours':>14}"
          f"{'TFLOP/s diff':>14}{'max|diff|':>11}")
    for row, t in r["timings_s"].items():
        calls = r["calls_per_row"][row]
        ours, theirs = t["latentdiff"], t["diffusers"]
        print(f"{row:<16}{ours * 1e3:>15.1f}{theirs * 1e3:>15.1f}{theirs / ours:>11.3f}"
              f"{calls * flops / ours / 1e12:>14.3f}{calls * r['flops']['diffusers'] / theirs / 1e12:>14.3f}"
              f"{r['max_abs_diff'][row]:>11.2e}")
    if r["device"] == "cpu":
        print(f"{'process CPU time':<16}{'latentdiff ms':>15}{'diffusers ms':>15}{'ratio d/l':>11}")
        for row, t in r["cpu_timings_s"].items():
            ours, theirs = t["latentdiff"], t["diffusers"]
            print(f"{row:<16}{ours * 1e3:>15.1f}{theirs * 1e3:>15.1f}{theirs / ours:>11.3f}")
    if "compile_s" in r:
        c = r["compile_s"]
        print(f"first compiled call (compile time): latentdiff {c['latentdiff']:.1f} s, "
              f"diffusers {c['diffusers']:.1f} s")
        for row in [row for row in r["timings_s"] if row.endswith(" compiled")]:
            eager, fast = r["timings_s"][row[:-len(" compiled")]]["latentdiff"], r["timings_s"][row]["latentdiff"]
            print(f"latentdiff fast/eager, {row[:-len(' compiled')]}: {eager / fast:.3f}")
    if "peak_memory_gib" in r:
        mem = r["peak_memory_gib"]
        print(f"peak memory of one call: latentdiff {mem['latentdiff']:.2f} GiB, diffusers {mem['diffusers']:.2f} GiB")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        results = run(args)
    except (RuntimeError, ValueError, ImportError) as e:  # e.g. a dtype the device has no kernels for
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    print_table(results)
    if args.json:
        with atomic_write(args.json, mode="w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
