"""Where the time of one whole generation goes: text encoder, U-Net calls, sampler arithmetic, decode.

Runs ``pipe.generate`` on a latent-diffusion model (the embedded default model unless ``--ckpt`` names another)
with timers around its stages, and prints their wall-clock seconds and shares of the total (of the run with the
median total among ``--repeats`` runs after one warm-up run):

    text encoder       pipe.encode_prompts (prompts and negative prompts; tokenizing included)
    U-Net              every U-Net call (guided batch of 2N, one per step)
    sampler arithmetic the sampler's own work: ``sample()`` minus its U-Net calls (guidance combination, update
                       rules, timestep tables, noise)
    decode             pipe.decode_latents (the VAE decoder, tiled or not)
    other              the rest of generate() (argument checks, x_T, parameters)

On CUDA every timer synchronises the device first, so the stages add up to the total.

    python benchmarks/profile_generation.py                                   # embedded model, 25 DDIM steps
    python benchmarks/profile_generation.py --ckpt v1-5-pruned-emaonly.safetensors --device cuda --precision bf16 \\
        --H 512 --W 512 --steps 50 --json profile.json
    python benchmarks/profile_generation.py --compile                          # the compiled fast path
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default=None, help="a model load_pipeline reads (default: the embedded model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=25, help="sampler steps")
    p.add_argument("--sampler", default="ddim", help="sampler name")
    p.add_argument("--scale", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--n", type=int, default=1, help="images per generate call")
    p.add_argument("--H", type=int, default=None, help="image height (default: the model's size)")
    p.add_argument("--W", type=int, default=None, help="image width (default: the model's size)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    p.add_argument("--compile", action="store_true", help="pipe.compile() first (the warm-up run compiles)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.n < 1:
        p.error("--steps, --repeats and --n must be >= 1")
    return args


class Timer:
    """Accumulated seconds of calls of ``fn`` (device synchronised before and after each)."""

    def __init__(self, fn, sync):
        self.fn, self.sync, self.seconds, self.calls = fn, sync, 0.0, 0

    def __call__(self, *args, **kwargs):
        self.sync()
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.sync()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def profile_once(pipe, latent_module, kwargs: dict, sync) -> dict:
    """One generate() call with timers around its stages -> {stage: seconds}, plus the U-Net call count."""
    timers = {"text encoder": Timer(pipe.encode_prompts, sync), "U-Net": Timer(pipe.unet.forward, sync),
              "decode": Timer(pipe.decode_latents, sync), "sample": Timer(latent_module.sample, sync)}
    pipe.encode_prompts, pipe.decode_latents = timers["text encoder"], timers["decode"]
    pipe.unet.forward = timers["U-Net"]
    latent_module.sample = timers["sample"]
    try:
        sync()
        start = time.perf_counter()
        pipe.generate(**kwargs)
        sync()
        total = time.perf_counter() - start
    finally:
        latent_module.sample = timers["sample"].fn
        for name in ("encode_prompts", "decode_latents"):
            del pipe.__dict__[name]
        pipe.unet.forward = timers["U-Net"].fn
        if pipe.unet.forward == type(pipe.unet).forward.__get__(pipe.unet):
            del pipe.unet.forward  # back to the class's method
    t = {name: timer.seconds for name, timer in timers.items()}
    stages = {"text encoder": t["text encoder"], "U-Net": t["U-Net"],
              "sampler arithmetic": t["sample"] - t["U-Net"], "decode": t["decode"]}
    stages["other"] = total - sum(stages.values())
    stages["total"] = total
    return {"seconds": stages, "unet_calls": timers["U-Net"].calls}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import latentdiff.pipelines.latent as latent_module
    from latentdiff import load_pipeline

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    pipe = load_pipeline(args.ckpt, device=args.device, dtype=dtype)
    if not hasattr(pipe, "decode_latents"):
        print("profile_generation: error: a latent-diffusion model is needed", file=sys.stderr)
        return 2
    if args.compile:
        pipe.compile(verbose=True)
    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    kwargs = dict(prompt=["a photo of a cat"] * args.n, steps=args.steps, sampler=args.sampler, scale=args.scale,
                  seed=0, height=args.H, width=args.W)
    profile_once(pipe, latent_module, kwargs, sync)  # warm-up (and compilation with --compile)
    runs = [profile_once(pipe, latent_module, kwargs, sync) for _ in range(args.repeats)]
    median_run = sorted(runs, key=lambda r: r["seconds"]["total"])[len(runs) // 2]  # its stages add up
    medians = median_run["seconds"]
    size = f"{args.H or pipe.config.image_size}x{args.W or pipe.config.image_size}"
    print(f"model {args.ckpt or 'default'}, {args.device} {args.precision}, {args.n} image(s) {size}, "
          f"{args.sampler} {args.steps} steps, {runs[0]['unet_calls']} U-Net calls, threads "
          f"{torch.get_num_threads()}, compile {args.compile}, the median run of {args.repeats}")
    print(f"{'stage':<20}{'ms':>10}{'share':>8}")
    for stage, seconds in medians.items():
        print(f"{stage:<20}{seconds * 1e3:>10.1f}{seconds / medians['total']:>8.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "median_run_s": medians, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
