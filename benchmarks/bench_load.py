"""Benchmark loading a Stable Diffusion 1.5 single file: latentdiff against diffusers, peak memory and time.

Writes a random SD 1.5 checkpoint in the original single-file layout (860M-parameter U-Net, 84M VAE, 123M CLIP
ViT-L/14 text tower; float16 by default: about 2.1 GB) to a temporary folder, then loads that same file with
``latentdiff.load_pipeline`` and with diffusers' ``StableDiffusionPipeline.from_single_file``, each load in a fresh
Python process that reports the load time, then touches every 4 KiB page of every weight and reports the time
again ("ready") and its peak resident set size (``VmHWM`` of /proc/self/status, or ``ru_maxrss``): a loader that
memory-maps the file returns before the weights are in memory, and they come in on first use. The two loaders
alternate repeat by repeat (latentdiff, diffusers, latentdiff, ...), so both see the same machine load. Imports
are done before the clock starts; the RSS they take is reported as each side's baseline, and "added" is the peak
minus that baseline. Needs about twice the file size in free RAM (the writer holds the random weights while
writing).

diffusers reads the file offline: the component configs it would otherwise fetch from the Hub
(``model_index.json``, ``unet/config.json``, ...) are written from the same latentdiff config into a local folder
passed as ``config=``; both sides keep the file's dtype (``torch_dtype`` for diffusers). With ``--ema`` latentdiff
loads the EMA U-Net (``model_ema.*``) and diffusers the raw one (its default, ``extract_ema=False``). diffusers
builds its modules with empty weights when accelerate is installed and with random weights otherwise (slower, and
more memory); the table names which.

    python benchmarks/bench_load.py
    python benchmarks/bench_load.py --dtype fp32 --ema --format ckpt --json bench_load.json
    python benchmarks/bench_load.py --keep sd15-random.safetensors   # keep the file (reused when it exists)
    python benchmarks/bench_load.py --size tiny --repeats 1          # a seconds-long check of the script

diffusers is a benchmark/test-only dependency (``pip install -e .[dev]``); it is imported here, never by the
package.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DTYPES = ("fp16", "fp32", "bf16")
LOADERS = ("latentdiff", "diffusers")
# Changes to the SD 1.5 config for --size tiny: a 3-level U-Net, a 2-level VAE, a 2-layer text tower of width 64
TINY = ["image_size=64", "unet.model_channels=32", "unet.channel_mult=[1,2,2]", "unet.attention_resolutions=[2,1]",
        "unet.context_dim=64", "autoencoder.ch=32", "autoencoder.ch_mult=[1,2]", "text_encoder.width=64",
        "text_encoder.layers=2", "text_encoder.heads=1"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, the module docstring kept verbatim."""


def fail(message: str) -> None:
    """One message on stderr, exit status 2 (bad input), no traceback."""
    print(f"bench_load: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--dtype", default="fp16", choices=DTYPES, help="precision of the random checkpoint")
    p.add_argument("--format", default="safetensors", choices=("safetensors", "ckpt"), help="file type")
    p.add_argument("--size", default="sd15", choices=("sd15", "tiny"),
                   help="SD 1.5's shapes, or a tiny model of the same layout (a quick check of the script)")
    p.add_argument("--ema", action="store_true", help="also store an EMA copy of the U-Net (model_ema.*)")
    p.add_argument("--keep", default=None,
                   help="write the checkpoint here and keep it (reused if it exists: give the same --dtype)")
    p.add_argument("--repeats", type=int, default=1, help="loads per loader, each in a fresh process")
    p.add_argument("--no-diffusers", action="store_true", help="time latentdiff's loader alone")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)  # internal: LOADER FILE CONFIGS DTYPE
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
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def sd_config(size: str):
    from latentdiff.assets import SD_CONFIGS_DIR
    from latentdiff.config import load_config

    cfg = load_config(SD_CONFIGS_DIR / "sd15.yaml", overrides=TINY if size == "tiny" else [])
    cfg.text_encoder.pretrained = None
    return cfg


def meta_parts(cfg) -> dict:
    """State dicts of the model's components on the meta device (shapes only, no memory)."""
    import torch

    from latentdiff.models.autoencoder_kl import AutoencoderKL
    from latentdiff.models.text_encoders import build_text_encoder
    from latentdiff.models.unet import UNetModel

    with torch.device("meta"):
        modules = {"unet": UNetModel(cfg.unet), "autoencoder": AutoencoderKL(cfg.autoencoder),
                   "text_encoder": build_text_encoder(cfg.text_encoder)}
    return {k: m.state_dict() for k, m in modules.items()}


def sd_state(cfg, dtype, ema: bool):
    """Random weights of the model in the original single-file layout (shapes from latentdiff's own modules)."""
    import torch

    from latentdiff.io.export import sd_state_dict

    shapes = sd_state_dict(cfg, meta_parts(cfg))
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


def write_checkpoint(path: Path, cfg, dtype_name: str, ema: bool) -> None:
    import torch

    from latentdiff.atomic import atomic_write
    from latentdiff.io.safetensors_stream import write_safetensors

    dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    state = sd_state(cfg, dtype, ema)
    with atomic_write(path, "wb") as f:
        if path.suffix == ".safetensors":
            write_safetensors(f, state, {"format": "pt"})
        else:
            torch.save({"state_dict": state}, f)


def write_diffusers_configs(folder: Path, cfg) -> None:
    """The JSON and tokenizer files of a diffusers folder of this model, without weights (from_single_file's
    ``config=``, so that diffusers needs no download)."""
    from latentdiff.io.export import diffusers_files

    for rel, content in diffusers_files(cfg, meta_parts(cfg)).items():
        if rel.endswith(".safetensors"):
            continue
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(content if isinstance(content, str) else json.dumps(content, indent=2))


def child(loader: str, path: str, config_dir: str, dtype_name: str) -> None:
    """Runs in a fresh process: import everything, then time one load and report memory as JSON. diffusers is
    given the file's dtype (``torch_dtype``; latentdiff keeps the weights' own dtype)."""
    import torch

    if loader == "latentdiff":
        import open_clip.tokenizer  # noqa: F401
        import transformers.models.clip.modeling_clip  # noqa: F401

        import latentdiff
        from latentdiff.io import stable_diffusion  # noqa: F401

        baseline = current_rss_bytes()
        t0 = time.perf_counter()
        pipe = latentdiff.load_pipeline(path, prediction_type="epsilon")
        seconds = time.perf_counter() - t0
        modules = pipe.modules().values()
        dtype = pipe.dtype
        extra = {}
    else:
        import diffusers
        from diffusers import StableDiffusionPipeline

        diffusers.utils.logging.set_verbosity_error()
        torch_dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
        baseline = current_rss_bytes()
        t0 = time.perf_counter()
        pipe = StableDiffusionPipeline.from_single_file(path, config=config_dir, local_files_only=True,
                                                        torch_dtype=torch_dtype, safety_checker=None,
                                                        requires_safety_checker=False)
        seconds = time.perf_counter() - t0
        modules = [pipe.unet, pipe.vae, pipe.text_encoder]
        dtype = pipe.unet.dtype
        try:  # with accelerate, diffusers builds the modules with empty weights; without, with random ones
            from importlib.metadata import version

            extra = {"diffusers": diffusers.__version__, "accelerate": version("accelerate")}
        except ImportError:
            extra = {"diffusers": diffusers.__version__, "accelerate": None}
    loaded_peak = peak_rss_bytes()
    with torch.no_grad():  # touch every 4 KiB page of every weight: memory-mapped ones come into memory now
        for m in modules:
            for p in m.parameters():
                p.detach().reshape(-1)[:: max(1, 4096 // p.element_size())].sum()
    ready = time.perf_counter() - t0
    params = sum(p.numel() for m in modules for p in m.parameters())
    print(json.dumps({"baseline_rss": baseline, "loaded_peak_rss": loaded_peak, "peak_rss": peak_rss_bytes(),
                      "final_rss": current_rss_bytes(), "load_s": seconds, "ready_s": ready, "params": params,
                      "dtype": str(dtype), **extra}))


def measure(loader: str, path: Path, config_dir: Path, dtype_name: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    out = subprocess.run([sys.executable, __file__, "--child", loader, str(path), str(config_dir), dtype_name],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        fail(f"the {loader} loading process failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    if args.repeats < 1:
        fail(f"--repeats must be >= 1, got {args.repeats}")
    loaders = LOADERS[:1] if args.no_diffusers else LOADERS
    cfg = sd_config(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep) if args.keep else Path(tmp) / f"sd15-random.{args.format}"
        if args.keep and path.suffix != f".{args.format}":
            fail(f"--keep {path} must end in .{args.format}")
        if not path.is_file():
            t0 = time.perf_counter()
            write_checkpoint(path, cfg, args.dtype, args.ema)
            print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
        config_dir = Path(tmp) / "diffusers-configs"
        write_diffusers_configs(config_dir, cfg)
        size = path.stat().st_size
        runs = {name: [] for name in loaders}
        for i in range(args.repeats):
            for name in loaders:
                print(f"bench_load: {name}, load {i + 1}/{args.repeats}", file=sys.stderr, flush=True)
                runs[name].append(measure(name, path, config_dir, args.dtype))
    gib = 1024**3
    result = {"file": path.name, "file_bytes": size, "size": args.size, "dtype": args.dtype, "ema": args.ema,
              "format": args.format, "repeats": args.repeats, "loaders": {}}
    print(f"file: {size / gib:.2f} GiB ({args.size}, {args.format}, {args.dtype}{', with EMA' if args.ema else ''})")
    print(f"{'loader':<38}{'params':>10}{'dtype':>16}{'RSS after imports':>19}{'peak RSS':>10}{'added':>9}"
          f"{'added/file':>12}{'load s':>9}{'ready s':>9}")
    for name, rs in runs.items():
        best = min(rs, key=lambda r: r["load_s"])
        peak = max(r["peak_rss"] for r in rs)
        added = peak - best["baseline_rss"]
        if name == "diffusers":
            name += f" {best['diffusers']}" + (f" + accelerate {best['accelerate']}" if best["accelerate"] else
                                                " (no accelerate)")
        result["loaders"][name] = {"params": best["params"], "dtype": best["dtype"],
                                   "baseline_rss_bytes": best["baseline_rss"], "peak_rss_bytes": peak,
                                   "added_peak_over_file": added / size, "load_s": best["load_s"],
                                   "ready_s": min(r["ready_s"] for r in rs), "runs": rs}
        print(f"{name:<38}{best['params'] / 1e6:>9.1f}M{best['dtype']:>16}{best['baseline_rss'] / gib:>17.2f} G"
              f"{peak / gib:>8.2f} G{added / gib:>7.2f} G{added / size:>11.2f}x{best['load_s']:>9.2f}"
              f"{min(r['ready_s'] for r in rs):>9.2f}")
    print(f"(peak: the largest of {args.repeats} load(s), after touching every weight; baseline and load time: the "
          f"fastest load; ready: load + touching every page of every weight, the fastest)")
    if args.json:
        from latentdiff.atomic import atomic_write

        with atomic_write(args.json, "w") as f:
            f.write(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
