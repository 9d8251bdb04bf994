"""Fused attention projections (``unet.fuse_qkv()``) against the separate to_q/to_k/to_v, one U-Net call each.

    python benchmarks/bench_fused_qkv.py --config default --batch 100 --repeats 7
    python benchmarks/bench_fused_qkv.py --config sd15 --side 16 --batch 2 --repeats 5 --json fused_sd15.json

``default``: the embedded default model's U-Net (``latentdiff.load_pipeline()``); ``sd15``: the Stable Diffusion 1.5
config with random weights. Two copies of the same weights, one fused, are called in turn (interleaved) on the same
inputs; the medians and the largest output difference are printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=("default", "sd15"), default="default")
    p.add_argument("--side", type=int, default=None, help="latent side (default: the model's own; sd15: 16)")
    p.add_argument("--batch", type=int, default=100, help="U-Net batch (a guided batch of B images is 2B)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.config == "default":
        import latentdiff

        pipe = latentdiff.load_pipeline()
        unet = pipe.unet
        side = args.side or pipe.config.image_size // pipe.config.autoencoder.downsample_factor
        length = pipe.text_encoder.cfg.context_length
    else:
        from latentdiff.config import UNetConfig
        from latentdiff.models.unet import UNetModel

        unet = UNetModel(UNetConfig()).eval()
        side, length = args.side or 16, 77
    cfg = unet.cfg
    fused = copy.deepcopy(unet)
    n = fused.fuse_qkv()
    x = torch.randn(args.batch, cfg.in_channels, side, side)
    t = torch.randint(0, 1000, (args.batch,))
    context = torch.randn(args.batch, length, cfg.context_dim)
    times = {"separate": [], "fused": []}
    cpu = {"separate": [], "fused": []}  # process CPU time: steadier than wall time on a shared machine
    outs = {}
    with torch.inference_mode():
        for m in (unet, fused):
            m(x, t, context)  # warm-up
        for r in range(args.repeats):
            for name, m in (("separate", unet), ("fused", fused)):
                start, start_cpu = time.perf_counter(), time.process_time()
                outs[name] = m(x, t, context)
                times[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
            print(f"repeat {r + 1}: separate {times['separate'][-1]:.4f} s, fused {times['fused'][-1]:.4f} s",
                  file=sys.stderr, flush=True)
    sep, fus = statistics.median(times["separate"]), statistics.median(times["fused"])
    sep_cpu, fus_cpu = statistics.median(cpu["separate"]), statistics.median(cpu["fused"])
    diff = (outs["separate"] - outs["fused"]).abs().max().item()
    print(f"{args.config} U-Net, latent {side}x{side}, batch {args.batch}, {n} attention layers fused, "
          f"{torch.get_num_threads()} threads: separate {sep * 1e3:.1f} ms, fused {fus * 1e3:.1f} ms "
          f"({sep / fus:.3f}x); CPU time {sep_cpu * 1e3:.1f} ms, {fus_cpu * 1e3:.1f} ms ({sep_cpu / fus_cpu:.3f}x); "
          f"max |difference| {diff:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({**vars(args), "side": side, "separate_s": sep, "fused_s": fus,
                                               "speedup": sep / fus, "separate_cpu_s": sep_cpu,
                                               "fused_cpu_s": fus_cpu, "speedup_cpu": sep_cpu / fus_cpu,
                                               "max_abs_diff": diff, "times": times, "cpu": cpu}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
