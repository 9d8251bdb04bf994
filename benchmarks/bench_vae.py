"""Benchmark latentdiff's KL autoencoder against diffusers' AutoencoderKL: encode and decode, side by side in one run.

Both models are built from the same config (Stable Diffusion's VAE by default: 4 levels of 128/256/512/512
channels, 2 res blocks each, mid-block attention, 4 latent channels, 8x downsampling) with the same weights
(diffusers' random init converted into latentdiff's layout) and fed the same images and latents. Timed: encode
(image -> posterior mean: ``encode_posterior`` against diffusers' ``encode(x).latent_dist``) and decode (latent ->
image: ``decode`` against diffusers' ``decode(z).sample``, the same unscaled latent on both sides). Each repeat
runs latentdiff then diffusers, so both see the same machine load; the table reports medians after warmup of wall
time and (on the CPU) process CPU time, the ratio diffusers/latentdiff (> 1: latentdiff is faster) and the max
|difference| of the outputs.

    python benchmarks/bench_vae.py                                # SD VAE, one 128x128 image, CPU, fp32
    OMP_NUM_THREADS=1 python benchmarks/bench_vae.py --size 128 --repeats 5
    python benchmarks/bench_vae.py --device cuda --dtype bf16 --size 512 --batch 4 --json bench_vae.json
    python benchmarks/bench_vae.py --config tiny --repeats 1      # a seconds-long check of the script

diffusers is a benchmark/test-only dependency (``pip install -e .[dev]``); it is imported here, never by the
package.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

DTYPES = ("fp32", "bf16", "fp16")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, the module docstring kept verbatim."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", choices=("sd", "tiny"), default="sd",
                   help="Stable Diffusion's VAE, or a 2-level one of 32/64 channels (a quick check)")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (a multiple of the downsampling)")
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="parameter and activation dtype")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each before timing")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0 or args.size < 8:
        p.error("--batch and --repeats must be >= 1, --warmup >= 0, --size >= 8")
    return args


def build(config: str, seed: int):
    """(config, latentdiff AutoencoderKL, diffusers AutoencoderKL) with identical weights, in eval mode."""
    import torch
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    from latentdiff.config import AutoencoderKLConfig
    from latentdiff.io.convert_vae import autoencoder_config_to_diffusers, vae_state_dict_from_diffusers
    from latentdiff.models.autoencoder_kl import AutoencoderKL

    diffusers_logging.set_verbosity_error()
    cfg = AutoencoderKLConfig() if config == "sd" else AutoencoderKLConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1)
    torch.manual_seed(seed)
    theirs = DiffusersAutoencoderKL(**autoencoder_config_to_diffusers(cfg))
    ours = AutoencoderKL(cfg)
    ours.load_state_dict(vae_state_dict_from_diffusers(theirs.state_dict()), strict=True)
    return cfg, ours.eval().requires_grad_(False), theirs.eval().requires_grad_(False)


def run(args) -> dict:
    import torch
    from timing import time_pair

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cfg, ours, theirs = build(args.config, args.seed)
    ours.to(device, dtype)
    theirs.to(device, dtype)
    f = 2 ** (len(cfg.ch_mult) - 1)
    if args.size % f:
        raise ValueError(f"--size must be a multiple of {f}, got {args.size}")
    g = torch.Generator().manual_seed(args.seed)
    x = (torch.rand(args.batch, 3, args.size, args.size, generator=g) * 2 - 1).to(device, dtype)
    z = torch.randn(args.batch, cfg.embed_dim, args.size // f, args.size // f, generator=g).to(device, dtype)
    rows = {
        "encode": {"latentdiff": lambda: ours.encode_posterior(x).mean,
                   "diffusers": lambda: theirs.encode(x).latent_dist.mean},
        "decode": {"latentdiff": lambda: ours.decode((z - cfg.shift_factor) * cfg.scaling_factor),
                   "diffusers": lambda: theirs.decode(z).sample},
    }
    result = {"config": args.config, "autoencoder": vars(cfg), "device": str(device), "dtype": args.dtype,
              "batch": args.batch, "size": args.size, "latent": [cfg.embed_dim, args.size // f, args.size // f],
              "threads": torch.get_num_threads(), "repeats": args.repeats,
              "params": sum(p.numel() for p in ours.parameters()), "timings_s": {}, "cpu_timings_s": {},
              "raw_timings_s": {}, "max_abs_diff": {}}
    with torch.inference_mode():
        for row, fns in rows.items():
            for _ in range(args.warmup):
                for fn in fns.values():
                    fn()
            wall, cpu, diff = time_pair(row, fns, args.repeats, device)
            result["timings_s"][row] = {name: statistics.median(ts) for name, ts in wall.items()}
            result["cpu_timings_s"][row] = {name: statistics.median(ts) for name, ts in cpu.items()}
            result["raw_timings_s"][row] = wall
            result["max_abs_diff"][row] = diff
    return result


def print_table(r: dict) -> None:
    print(f"config={r['config']} device={r['device']} dtype={r['dtype']} batch={r['batch']} "
          f"image={r['size']}x{r['size']} latent={r['latent']} threads={r['threads']} repeats={r['repeats']} "
          f"params={r['params'] / 1e6:.2f}M")
    print(f"{'':<10}{'latentdiff ms':>15}{'diffusers ms':>15}{'ratio d/l':>11}{'max|diff|':>11}")
    for row, t in r["timings_s"].items():
        ours, theirs = t["latentdiff"], t["diffusers"]
        print(f"{row:<10}{ours * 1e3:>15.1f}{theirs * 1e3:>15.1f}{theirs / ours:>11.3f}{r['max_abs_diff'][row]:>11.2e}")
    if r["device"] == "cpu":
        print("process CPU time")
        for row, t in r["cpu_timings_s"].items():
            ours, theirs = t["latentdiff"], t["diffusers"]
            print(f"{row:<10}{ours * 1e3:>15.1f}{theirs * 1e3:>15.1f}{theirs / ours:>11.3f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (RuntimeError, ValueError, ImportError) as e:  # e.g. a dtype the device has no kernels for
        print(f"bench_vae: error: {e}", file=sys.stderr)
        return 2
    print_table(result)
    if args.json:
        from latentdiff.atomic import atomic_write

        with atomic_write(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
