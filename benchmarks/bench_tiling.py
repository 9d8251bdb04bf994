"""Peak memory and time of tiled against untiled VAE decoding (latentdiff/models/tiling.py), side by side.

Each measurement runs in its own Python process, so that its peak is its own: the process builds the autoencoder
(Stable Diffusion's VAE config, latentdiff/assets/configs/sd15.yaml, random weights), decodes one random latent of
the requested image size untiled (``autoencoder.decode``) or tiled (``tiled_decode``), and reports its time and
its peak memory above what it held before the decode. On the CPU the peak is the process's resident high-water
mark (VmHWM in /proc/self/status, Linux; torch's allocations are invisible to tracemalloc); on CUDA it is
``torch.cuda.max_memory_allocated``. The table adds diffusers' tiled_decode on the same weights when
``--diffusers`` is given (same tile and overlap).

    python benchmarks/bench_tiling.py                                   # 1024x1024, CPU, fp32, tile 512
    python benchmarks/bench_tiling.py --size 2048 --device cuda --dtype bf16 --json tiling.json
    python benchmarks/bench_tiling.py --config tiny --size 128 --tile 64   # a seconds-long check of the script
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

DTYPES = ("fp32", "bf16", "fp16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=type(
        "F", (argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter), {}))
    p.add_argument("--config", choices=("sd", "tiny"), default="sd",
                   help="Stable Diffusion's VAE, or a 2-level one of 32/64 channels (a quick check)")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels")
    p.add_argument("--tile", type=int, default=512, help="tile side in pixels")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in pixels (default: a quarter)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--diffusers", action="store_true", help="also measure diffusers' tiled_decode")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to this file")
    p.add_argument("--child", choices=("untiled", "tiled", "diffusers"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.size < 8 or args.tile < 8:
        p.error("--size and --tile must be >= 8")
    return args


def vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def reset_hwm() -> None:
    """Writing 5 to /proc/self/clear_refs resets VmHWM to the current resident size (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def child(args) -> dict:
    import torch

    from latentdiff.assets import SD_CONFIGS_DIR
    from latentdiff.config import AutoencoderKLConfig
    from latentdiff.config.files import load_config
    from latentdiff.models.autoencoder_kl import AutoencoderKL
    from latentdiff.models.tiling import tiled_decode

    torch.manual_seed(0)
    cfg = (load_config(SD_CONFIGS_DIR / "sd15.yaml").autoencoder if args.config == "sd" else
           AutoencoderKLConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.device(args.device)
    ours = AutoencoderKL(cfg).eval().requires_grad_(False)
    f = ours.downsample_factor
    z = torch.randn(1, cfg.embed_dim, args.size // f, args.size // f).to(device, dtype)
    if args.child == "diffusers":
        from diffusers import AutoencoderKL as DiffusersAutoencoderKL

        from latentdiff.io.convert_vae import autoencoder_config_to_diffusers

        model = DiffusersAutoencoderKL(**autoencoder_config_to_diffusers(cfg)).eval().requires_grad_(False)
        model.tile_sample_min_size, model.tile_latent_min_size = args.tile, args.tile // f
        overlap = args.tile // 4 // f * f if args.overlap is None else args.overlap
        model.tile_overlap_factor = overlap / args.tile
        z = z / cfg.scaling_factor

        def run():
            return model.tiled_decode(z).sample
    else:
        model = ours

        def run():
            if args.child == "tiled":
                return tiled_decode(ours, z, tile=args.tile, overlap=args.overlap)
            return ours.decode(z)
    model.to(device, dtype)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        reset_hwm()
        before = vm_hwm_mib()
    start = time.perf_counter()
    with torch.inference_mode():
        out = run()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else vm_hwm_mib()
    return {"mode": args.child, "seconds": seconds, "peak_mib": peak - before, "shape": list(out.shape)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    common = ["--config", args.config, "--size", str(args.size), "--tile", str(args.tile), "--device", args.device,
              "--dtype", args.dtype] + ([] if args.overlap is None else ["--overlap", str(args.overlap)])
    modes = ["untiled", "tiled"] + (["diffusers"] if args.diffusers else [])
    rows = []
    for mode in modes:
        out = subprocess.run([sys.executable, __file__, *common, "--child", mode], capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{mode}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            rows.append({"mode": mode, "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "?"})
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    overlap = args.tile // 4 if args.overlap is None else args.overlap
    print(f"VAE decode, {args.config} config, {args.size}x{args.size}, {args.device} {args.dtype}, "
          f"tile {args.tile} px, overlap {overlap} px (peak: memory above the loaded model)")
    print(f"{'mode':<10} {'seconds':>9} {'peak MiB':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<10} failed: {r['error']}")
        else:
            print(f"{r['mode']:<10} {r['seconds']:>9.2f} {r['peak_mib']:>10.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "child"}, "results": rows}, f, indent=1)
    # an untiled decode that runs out of memory is a finding (the point of tiling), not a failure of the script
    return 1 if any("error" in r for r in rows if r["mode"] != "untiled") else 0


if __name__ == "__main__":
    sys.exit(main())
