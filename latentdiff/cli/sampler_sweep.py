"""FID and CIFAR-10 class accuracy of one model for several samplers and step counts (for BENCHMARKS.md).

Examples (from the repository root)::

    latentdiff sampler-sweep --outdir eval/sweep                       # the embedded default model
    latentdiff sampler-sweep --ckpt model.safetensors --samplers ddim dpmpp_2m --steps 10 25 50 \\
        --num-samples 2000 --batch-size 250 --reference data/cifar10-test-shards --device cuda --outdir eval/sweep

Each (sampler, steps) pair runs the benchmark of ``latentdiff eval-t2i`` (same captions, seeds and judges; no CLIP
score) into OUTDIR/<sampler>-<steps>/ (images/, results.json, results.md). The sweep writes OUTDIR/sweep.json (every
result), OUTDIR/sweep.md (a Markdown table) and OUTDIR/sweep.png (FID vs steps and accuracy vs steps, one line per
sampler). Bad input prints one message and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from latentdiff.cli.common import POSITIVE, ArgumentParser, fail, lock_outdir
from latentdiff.cli.eval_t2i import add_common_arguments, check_common, load_everything

SWEEP_SAMPLERS = ["ddpm", "ddim", "dpmpp_2m", "euler_a"]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from latentdiff.diffusion.samplers import SAMPLERS

    p = ArgumentParser(description=__doc__, prog=prog)
    p.add_argument("--samplers", nargs="+", default=SWEEP_SAMPLERS, choices=sorted(SAMPLERS), help="samplers to run")
    p.add_argument("--steps", type=POSITIVE, nargs="+", default=[10, 25, 50, 100], help="step counts to run")
    add_common_arguments(p)
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    check_common(args)
    if any(s <= 0 for s in args.steps):
        fail(f"--steps must be positive integers, got {args.steps}")
    with lock_outdir(args.outdir, "sampler-sweep"):  # one writer per --outdir
        return _sweep(args)


def _sweep(args) -> int:
    outdir = Path(args.outdir)
    for sampler in args.samplers:
        for steps in args.steps:
            images = outdir / f"{sampler}-{steps}" / "images"
            if images.is_dir() and any(images.glob("*.png")):
                fail(f"{images} already holds images; choose a new --outdir")

    from latentdiff.atomic import atomic_write
    from latentdiff.metrics.t2i import BenchmarkSettings, plot_sweep, run_benchmark, sweep_markdown, write_results

    pipe, prompts, judges, device = load_everything(args, clip=None)
    too_many = [s for s in args.steps if s > pipe.schedule.num_timesteps]
    if too_many:
        fail(f"--steps {too_many} exceed the model's {pipe.schedule.num_timesteps} diffusion timesteps")
    results = []
    for sampler in args.samplers:
        for steps in sorted(set(args.steps)):
            settings = BenchmarkSettings(sampler=sampler, steps=steps, scale=args.scale, seed=args.seed,
                                         batch_size=args.batch_size)
            run_dir = outdir / f"{sampler}-{steps}"
            try:
                result = run_benchmark(pipe, prompts, settings, run_dir, judges, device=device,
                                       checkpoint=args.ckpt, progress=not args.quiet)
            except (ValueError, FileExistsError) as e:
                fail(str(e))
            result.update(reference=args.reference, reference_samples=args.reference_samples, device=str(device),
                          precision=args.precision)
            write_results(run_dir, result)
            results.append(result)
            acc = result["class_accuracy"].get("accuracy")
            print(f"{sampler:>9s} {steps:4d} steps: FID {result['fid'].get('value', float('nan')):.2f}, "
                  f"class accuracy {'-' if acc is None else f'{acc:.3f}'}")
    summary = {"checkpoint": args.ckpt, "model": pipe.name, "num_samples": args.num_samples, "seed": args.seed,
               "scale": results[0]["scale"], "captions": prompts.source, "reference": args.reference,
               "notes": judges.notes,
               "command": " ".join(sys.argv), "results": results}
    with atomic_write(outdir / "sweep.json", "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    table = sweep_markdown(results)
    with atomic_write(outdir / "sweep.md", "w") as f:
        f.write(f"Model {args.ckpt}, {args.num_samples} images per row, guidance scale {summary['scale']:g}, "
                f"seed {args.seed}.\n\n{table}")
    plot_sweep(results, outdir / "sweep.png", title=f"{pipe.name or args.ckpt}: {args.num_samples} images per point")
    print(table)
    print(f"wrote {outdir / 'sweep.json'}, {outdir / 'sweep.md'}, {outdir / 'sweep.png'}")
    return 0

