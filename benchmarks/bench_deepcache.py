"""DeepCache (step caching, latentdiff/pipelines/fast.py) against the plain U-Net: speed and quality.

    python benchmarks/bench_deepcache.py speed --steps 25 50 --intervals 1 2 3 --branches 0 1 --batch-size 1 --threads 1
    python benchmarks/bench_deepcache.py sd --side 16 --branches 0 1 3 --threads 1 --cpu-time
    python benchmarks/bench_deepcache.py quality --steps 25 --intervals 1 2 3 --branch 1 \\
        --num-samples 1000 --reference PATH/TO/cifar10-test.tar.gz --device cuda --outdir eval/deepcache

speed:   whole generations of the embedded default model (``latentdiff.load_pipeline()``, class captions, DDIM,
         guidance 5) per image, every setting run once per repeat in turn (interleaved), median of the repeats;
         speed-up against interval 1 (the plain U-Net) in the same run.
sd:      the Stable Diffusion 1.5 U-Net config (random weights) at a small latent side on the CPU, classifier-free
         guidance batch 2: one full call against one shallow call per branch (interleaved, median), and the
         per-step time of intervals 2 and 3 that follows: (full + (N - 1) · shallow) / N.
quality: FID and class accuracy (latentdiff.metrics.t2i, as ``latentdiff eval-t2i``) of the class captions at
         equal steps for each interval; images i of every setting share caption and seed.
pairs:   over the PNGs quality wrote to --outdir (all its runs, merged by image index): PSNR and mean |difference|
         of each interval's image i against the plain run's image i (same caption, seed and steps).

    python benchmarks/bench_deepcache.py pairs --steps 25 --intervals 2 3 --branch 1 --outdir eval/deepcache
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=("speed", "sd", "quality", "pairs"))
    p.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    p.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--branches", type=int, nargs="+", default=[1], help="speed/sd: skip branches to time")
    p.add_argument("--branch", type=int, default=1, help="quality: the skip branch")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--scale", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=50, help="images per generate call")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--cpu-time", action="store_true", help="sd: report process CPU time instead of wall time")
    p.add_argument("--side", type=int, default=16, help="sd: latent side (16 = 128x128 pixels)")
    p.add_argument("--num-samples", type=int, default=1000, help="quality: images per setting")
    p.add_argument("--start", type=int, default=0,
                   help="quality: index of the first image (a run split in parts whose image folders merge)")
    p.add_argument("--reference", default=None,
                   help="quality: FID reference (image folder, archive, shards, .npz; default none: no FID, the images "
                        "stay in --outdir for `latentdiff fid` later)")
    p.add_argument("--reference-samples", type=int, default=None, help="quality: seeded subset of the reference")
    p.add_argument("--outdir", default="eval/deepcache", help="quality: one folder per setting below it")
    p.add_argument("--device", default="cpu", help="quality: device of generation and FID (cpu, cuda)")
    p.add_argument("--json", default=None, help="write the results here too")
    return p.parse_args(argv)


def setting_name(interval: int, branch: int) -> str:
    return "plain" if interval == 1 else f"N={interval}, branch {branch}"


def speed(args) -> dict:
    import latentdiff
    from latentdiff.metrics.t2i import CIFAR10_CLASSES, class_prompts

    pipe = latentdiff.load_pipeline()
    prompts = class_prompts(CIFAR10_CLASSES, args.batch_size).captions
    settings = [(1, 0)] + [(n, b) for b in args.branches for n in args.intervals if n > 1]
    out = {"batch_size": args.batch_size, "sampler": args.sampler, "scale": args.scale, "threads":
           torch.get_num_threads(), "rows": []}
    for steps in args.steps:
        times = {s: [] for s in settings}
        cpu = {s: [] for s in settings}
        for r in range(args.repeats):
            for interval, branch in settings:
                if interval == 1:
                    pipe.disable_deepcache()
                else:
                    pipe.enable_deepcache(interval, branch)
                start, start_cpu = time.perf_counter(), time.process_time()
                pipe.generate(prompts, steps=steps, sampler=args.sampler, scale=args.scale, seed=0)
                times[(interval, branch)].append((time.perf_counter() - start) / len(prompts))
                cpu[(interval, branch)].append((time.process_time() - start_cpu) / len(prompts))
                print(f"steps {steps} repeat {r + 1}: {setting_name(interval, branch)} "
                      f"{times[(interval, branch)][-1]:.4f} s/image wall, {cpu[(interval, branch)][-1]:.4f} CPU",
                      file=sys.stderr, flush=True)
        base, base_cpu = statistics.median(times[(1, 0)]), statistics.median(cpu[(1, 0)])
        for (interval, branch), ts in times.items():
            med, med_cpu = statistics.median(ts), statistics.median(cpu[(interval, branch)])
            out["rows"].append({"steps": steps, "interval": interval, "branch": None if interval == 1 else branch,
                                "s_per_image": med, "speedup": base / med, "cpu_s_per_image": med_cpu,
                                "speedup_cpu": base_cpu / med_cpu, "all": ts, "all_cpu": cpu[(interval, branch)]})
    pipe.disable_deepcache()
    print(f"{out['threads']} threads, batch {args.batch_size}, medians of {args.repeats}")
    print("| steps | setting | wall s / image | speed-up | CPU s / image | speed-up (CPU time) |\n"
          "|---:|---|---:|---:|---:|---:|")
    for row in out["rows"]:
        print(f"| {row['steps']} | {setting_name(row['interval'], row['branch'] or 0)} | {row['s_per_image']:.4f} "
              f"| {row['speedup']:.2f}x | {row['cpu_s_per_image']:.4f} | {row['speedup_cpu']:.2f}x |")
    return out


@torch.inference_mode()
def sd(args) -> dict:
    from latentdiff.config import UNetConfig
    from latentdiff.models.unet import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(UNetConfig()).eval()  # Stable Diffusion 1.5, random weights
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)  # zero-initialised output layers would make the blocks trivial
    x = torch.randn(2, 4, args.side, args.side)
    t = torch.tensor([500, 500])
    context = torch.randn(2, 77, 768)
    deep = {b: unet.forward_deepcache(x, t, context, b)[1] for b in args.branches}
    fns = {"full": lambda: unet(x, t, context)}
    fns.update({f"shallow {b}": (lambda b=b: unet.forward_deepcache(x, t, context, b, deep[b])) for b in args.branches})
    times = {k: [] for k in fns}
    cpu = {k: [] for k in fns}  # process CPU time: steadier than wall time on a shared machine
    for r in range(args.repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            print(f"sd repeat {r + 1}: {name} {times[name][-1]:.3f} s wall, {cpu[name][-1]:.3f} s CPU",
                  file=sys.stderr, flush=True)
    clock = cpu if args.cpu_time else times
    full = statistics.median(clock["full"])
    out = {"side": args.side, "threads": torch.get_num_threads(), "clock": "cpu" if args.cpu_time else "wall",
           "full_s": full, "rows": [], "wall": times, "cpu": cpu}
    print(f"SD 1.5 U-Net, latent {args.side}x{args.side}, batch 2, {out['threads']} threads, "
          f"{out['clock']} time, medians of {args.repeats}: full call {full:.3f} s")
    print("| branch | shallow call | per step, N=2 | per step, N=3 |\n|---:|---:|---:|---:|")
    for b in args.branches:
        shallow = statistics.median(clock[f"shallow {b}"])
        n2, n3 = (full + shallow) / 2, (full + 2 * shallow) / 3
        out["rows"].append({"branch": b, "shallow_s": shallow, "step_s_n2": n2, "step_s_n3": n3})
        print(f"| {b} | {shallow:.3f} s ({full / shallow:.1f}x) | {n2:.3f} s ({full / n2:.2f}x) "
              f"| {n3:.3f} s ({full / n3:.2f}x) |")
    return out


def quality(args) -> dict:
    import latentdiff
    from latentdiff.metrics.fid import DEFAULT_CACHE_DIR
    from latentdiff.metrics.t2i import (
        CIFAR10_CLASSES,
        BenchmarkSettings,
        class_prompts,
        load_judges,
        run_benchmark,
        write_results,
    )

    pipe = latentdiff.load_pipeline(device=args.device)
    prompts = class_prompts(CIFAR10_CLASSES, args.num_samples, start=args.start)
    judges = load_judges(args.reference, None, None, reference_samples=args.reference_samples,
                         cache_dir=DEFAULT_CACHE_DIR, device=args.device)
    out = {"branch": args.branch, "reference": args.reference, "reference_samples": args.reference_samples,
           "rows": []}
    for steps in args.steps:
        for interval in args.intervals:
            if interval == 1:
                pipe.disable_deepcache()
            else:
                pipe.enable_deepcache(interval, args.branch)
            folder = Path(args.outdir) / f"{args.sampler}{steps}_n{interval}_b{args.branch}_from{args.start}"
            settings = BenchmarkSettings(sampler=args.sampler, steps=steps, scale=args.scale,
                                         batch_size=args.batch_size, start=args.start)
            result = run_benchmark(pipe, prompts, settings, folder, judges, device=args.device, progress=False)
            result.update(deepcache={"interval": interval, "branch": args.branch})
            write_results(folder, result)
            row = {"steps": steps, "interval": interval, "fid": result["fid"].get("value"),
                   "class_accuracy": result["class_accuracy"].get("accuracy"),
                   "generation_s_per_image": result["generation_seconds"] / args.num_samples}
            out["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print("| steps | setting | FID | class accuracy | generation s / image |\n|---:|---|---:|---:|---:|")
    for row in out["rows"]:
        fid = "not measured" if row["fid"] is None else f"{row['fid']:.1f}"
        print(f"| {row['steps']} | {setting_name(row['interval'], args.branch)} | {fid} | "
              f"{100 * row['class_accuracy']:.1f} % | {row['generation_s_per_image']:.4f} |")
    return out


def pairs(args) -> dict:
    import numpy as np
    from PIL import Image

    def images(steps: int, interval: int) -> dict[str, np.ndarray]:
        folders = sorted(Path(args.outdir).glob(f"{args.sampler}{steps}_n{interval}_b{args.branch}_from*"))
        return {p.name: np.asarray(Image.open(p).convert("RGB"), dtype=np.float64)
                for f in folders for p in sorted((f / "images").glob("*.png"))}

    out = {"branch": args.branch, "rows": []}
    print("| steps | setting | pairs | PSNR vs plain, median (10th percentile) | mean abs. difference |\n"
          "|---:|---|---:|---:|---:|")
    for steps in args.steps:
        plain = images(steps, 1)
        for interval in [n for n in args.intervals if n > 1]:
            other = images(steps, interval)
            keys = sorted(set(plain) & set(other))
            mse = np.array([((plain[k] - other[k]) ** 2).mean() for k in keys])
            mad = float(np.mean([np.abs(plain[k] - other[k]).mean() for k in keys]))
            psnr = 10 * np.log10(255**2 / np.maximum(mse, 1e-12))
            row = {"steps": steps, "interval": interval, "pairs": len(keys), "psnr_median": float(np.median(psnr)),
                   "psnr_p10": float(np.percentile(psnr, 10)), "mean_abs_diff": mad}
            out["rows"].append(row)
            print(f"| {steps} | {setting_name(interval, args.branch)} | {len(keys)} | {row['psnr_median']:.1f} dB "
                  f"({row['psnr_p10']:.1f} dB) | {mad:.2f} / 255 |")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"speed": speed, "sd": sd, "quality": quality, "pairs": pairs}[args.mode](args)
    out.update(mode=args.mode, torch=torch.__version__)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
