"""Benchmark loading a Stable-Diffusion-1.5-sized single file: peak resident memory and time of load_pipeline.

Writes a random SD 1.5 checkpoint in the original layout (860M-parameter U-Net, 84M VAE, 123M CLIP ViT-L/14 text
tower; float16 by default: about 2.1 GB) to a temporary folder, then loads it with ``latentdiff.load_pipeline`` in
a fresh Python process that reports its peak resident set size (``VmHWM`` of /proc/self/status, or
``ru_maxrss``) and the load time. Imports are done before the clock starts; the RSS they take is reported as the
baseline. Needs about twice the file size in free RAM (the writer holds the random weights while writing).

    python tools/bench_load.py
    python tools/bench_load.py --dtype fp32 --ema --format ckpt --json bench_load.json
    python tools/bench_load.py --keep /tmp/sd15-random.safetensors   # keep the file (reused when it exists)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentdiff.cli import ArgumentParser, fail  # noqa: E402

DTYPES = ("fp16", "fp32", "bf16")


def build_parser():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--dtype", default="fp16", choices=DTYPES, help="precision of the random checkpoint")
    p.add_argument("--format", default="safetensors", choices=("safetensors", "ckpt"), help="file type")
    p.add_argument("--ema", action="store_true", help="also store an EMA copy of the U-Net (model_ema.*)")
    p.add_argument("--keep", default=None, help="write the checkpoint here and keep it (reused if it exists)")
    p.add_argument("--repeats", type=int, default=1, help="load this many times, each in a fresh process")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: the measured process
    return p


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def sd15_state(dtype, ema: bool):
    """Random weights of SD 1.5 in the original single-file layout (shapes from latentdiff's own modules)."""
    import torch

    from latentdiff.config import load_config
    from latentdiff.io.export import sd_state_dict
    from latentdiff.models.autoencoder_kl import AutoencoderKL
    from latentdiff.models.text_encoders import build_text_encoder
    from latentdiff.models.unet import UNetModel

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "sd15.yaml")
    cfg.text_encoder.pretrained = None
    with torch.device("meta"):
        modules = {"unet": UNetModel(cfg.unet), "autoencoder": AutoencoderKL(cfg.autoencoder),
                   "text_encoder": build_text_encoder(cfg.text_encoder)}
    shapes = sd_state_dict(cfg, {k: m.state_dict() for k, m in modules.items()})
    g = torch.Generator().manual_seed(0)
    state = {}
    for key, t in shapes.items():
        if t.is_floating_point():
            state[key] = (torch.randn(t.shape, generator=g) * 0.02).to(dtype)
        else:
            state[key] = torch.arange(t.shape[-1])[None]  # position_ids
    if ema:
        for key, value in list(state.items()):
            if key.startswith("model.diffusion_model."):
                state["model_ema." + key[len("model."):].replace(".", "")] = value.clone()
    return state


def write_checkpoint(path: Path, dtype_name: str, ema: bool) -> None:
    import torch

    from latentdiff.atomic import atomic_write
    from latentdiff.io.safetensors_stream import write_safetensors

    dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    state = sd15_state(dtype, ema)
    with atomic_write(path, "wb") as f:
        if path.suffix == ".safetensors":
            write_safetensors(f, state, {"format": "pt"})
        else:
            torch.save({"state_dict": state}, f)


def child(path: str) -> None:
    """Runs in a fresh process: import everything, then time load_pipeline and report memory as JSON."""
    import open_clip.tokenizer  # noqa: F401
    import torch  # noqa: F401
    import transformers.models.clip.modeling_clip  # noqa: F401

    import latentdiff
    from latentdiff.io import stable_diffusion  # noqa: F401

    baseline = current_rss_bytes()
    t0 = time.perf_counter()
    pipe = latentdiff.load_pipeline(path, prediction_type="epsilon")
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for m in pipe.modules().values() for p in m.parameters())
    print(json.dumps({"baseline_rss": baseline, "peak_rss": peak_rss_bytes(), "final_rss": current_rss_bytes(),
                      "load_s": seconds, "params": params, "dtype": str(pipe.dtype)}))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    if args.repeats < 1:
        fail(f"--repeats must be >= 1, got {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / f"sd15-random.{args.format}"
        if args.keep and path.suffix != f".{args.format}":
            fail(f"--keep {path} must end in .{args.format}")
        if not path.is_file():
            t0 = time.perf_counter()
            write_checkpoint(path, args.dtype, args.ema)
            print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
        size = path.stat().st_size
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True)
            if out.returncode:
                fail(f"the loading process failed:\n{out.stderr[-4000:]}")
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["load_s"])
    peak = max(r["peak_rss"] for r in runs)
    result = {"file": path.name, "file_bytes": size, "dtype": args.dtype, "ema": args.ema, "params": best["params"],
              "baseline_rss_bytes": best["baseline_rss"], "peak_rss_bytes": peak,
              "peak_over_file": peak / size, "added_peak_over_file": (peak - best["baseline_rss"]) / size,
              "load_s": best["load_s"], "runs": runs}
    gib = 1024**3
    print(f"file:          {size / gib:.2f} GiB ({args.format}, {args.dtype}{', with EMA' if args.ema else ''}, "
          f"{best['params'] / 1e6:.0f}M parameters loaded)")
    print(f"baseline RSS:  {best['baseline_rss'] / gib:.2f} GiB (python, torch, transformers, open_clip, latentdiff)")
    print(f"peak RSS:      {peak / gib:.2f} GiB = {peak / size:.2f} x file "
          f"(load itself adds {(peak - best['baseline_rss']) / gib:.2f} GiB = {result['added_peak_over_file']:.2f} x)")
    print(f"load time:     {best['load_s']:.2f} s (best of {args.repeats})")
    if args.json:
        from latentdiff.atomic import atomic_write

        with atomic_write(args.json, "w") as f:
            f.write(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
