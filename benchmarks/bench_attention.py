"""Time latentdiff's attention op per backend on the attention shapes of the SD 1.5 U-Net, and one whole U-Net call
per backend, in one run; say which backend ``set_attention_backend("auto")`` should pick on this device.

The op is :func:`latentdiff.models.attention.attention` (the reshapes around the kernel included) with the backend
set by ``set_attention_backend``: ``sdpa`` (PyTorch's scaled_dot_product_attention, which picks flash,
memory-efficient or cuDNN kernels itself), ``xformers`` (xformers' memory_efficient_attention, CUDA only) and
``math`` (plain softmax in fp32, the reference). The shapes are recorded from the U-Net of the model config
(default: Stable Diffusion 1.5, latentdiff/assets/configs/sd15.yaml, 512x512 pixels = 64x64 latents): the
self-attention of each transformer (64², 32², 16² and the middle block's 8² tokens, 8 heads of 40, 80, 160, 160)
and its cross-attention over the 77 text tokens (keys and values projected from the 768-wide text features), with
the number of such calls in one U-Net call. Random q, k, v; batch = the U-Net batch (2 = one image with
classifier-free guidance). Then one whole U-Net call (random weights; the zero-initialised output layers get
N(0, 0.02²) weights so that every layer reaches the output) per backend.

Timing: backends interleaved within each repeat (their order rotated from repeat to repeat), after ``--warmup``
calls each; on CUDA with CUDA events around a loop of calls (enough calls that one sample lasts ``--min-sample-ms``,
the same count for every backend of a shape), on the CPU with wall-clock time. Reported: the median per call and
the spread (± half the interquartile range of the samples, relative to the median), the fastest backend per shape,
per run (dtype, batch: by the whole U-Net call) and overall (geometric mean over the runs), the max |difference| of
each backend's output from the first backend's, and the recommendation for ``auto`` (which chooses between xformers
and SDPA). A backend that cannot run here (xformers not importable, or not on CUDA) is reported as not available,
with the reason; a backend that fails on a shape is reported as failed there, with the error. On CUDA the kernels
each backend launched are listed (torch.profiler, the first batch of each dtype).

    python benchmarks/bench_attention.py                        # CUDA: fp16 and bf16, batch 2 and 16
    python benchmarks/bench_attention.py --dtype bf16 --batch 2 --json attention.json --markdown attention.md
    python benchmarks/bench_attention.py --device cpu --side 16 --batch 2 --set unet.model_channels=64  # CPU smoke

Apply the result with ``LATENTDIFF_ATTENTION=sdpa`` (or ``xformers``) in the environment, or
``set_attention_backend(...)`` in a program.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from timing import sync

import latentdiff.models.attention as attn_module
from latentdiff.assets import SD_CONFIGS_DIR
from latentdiff.models.attention import attention, attention_kernel, get_attention_backend, set_attention_backend

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ("sdpa", "xformers", "math")
TIE = 0.02  # relative difference below which two backends are called equally fast


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu", help="torch device (default: cuda when available)")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=None,
                   help="dtypes to time (default: fp16 bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--batch", nargs="+", type=int, default=[2, 16],
                   help="U-Net batches to time (2 = one image with classifier-free guidance)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=None,
                   help="backends to time, the first is the reference of the differences "
                        "(default: sdpa xformers on CUDA, sdpa xformers math on the CPU)")
    p.add_argument("--config", default=str(SD_CONFIGS_DIR / "sd15.yaml"),
                   help="latent-diffusion model config whose U-Net gives the shapes (default: Stable Diffusion 1.5)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (e.g. unet.model_channels=64 for a quick CPU run); repeatable")
    p.add_argument("--side", type=int, default=None,
                   help="latent side (default: the config's image_size / autoencoder downsampling, 64 for SD 1.5)")
    p.add_argument("--no-unet", action="store_true", help="skip the whole U-Net call (attention shapes only)")
    p.add_argument("--no-kernels", action="store_true", help="skip listing the CUDA kernels (torch.profiler)")
    p.add_argument("--repeats", type=int, default=None, help="timed samples per backend (default: 15 CUDA, 5 CPU)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per backend before timing")
    p.add_argument("--min-sample-ms", type=float, default=5.0,
                   help="calls per sample are chosen so that one sample lasts at least this long")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to this file")
    p.add_argument("--markdown", metavar="OUT", help="also write the Markdown tables to this file")
    args = p.parse_args(argv)
    try:
        args.device = torch.device(args.device)
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:
        p.error(f"--device {args.device}: {e}")
    on_cuda = args.device.type == "cuda"
    args.dtype = args.dtype or (["fp16", "bf16"] if on_cuda else ["fp32"])
    args.backends = list(dict.fromkeys(args.backends or (["sdpa", "xformers"] if on_cuda else list(BACKENDS))))
    args.repeats = args.repeats if args.repeats is not None else (15 if on_cuda else 5)
    if min(args.batch) < 1 or args.repeats < 1 or args.warmup < 0:
        p.error(f"--batch and --repeats must be >= 1 and --warmup >= 0, got {args.batch}, {args.repeats}, "
                f"{args.warmup}")
    if not (math.isfinite(args.min_sample_ms) and args.min_sample_ms >= 0):
        p.error(f"--min-sample-ms must be a finite number >= 0, got {args.min_sample_ms}")
    try:
        args.unet_cfg, default_side, args.context_length, args.factor = read_config(args.config, args.set)
    except (ValueError, OSError) as e:
        p.error(f"--config {args.config}: {e}")
    args.side = default_side if args.side is None else args.side
    factor = 2 ** (len(args.unet_cfg.channel_mult) - 1)
    if args.side < 1 or args.side % factor:
        p.error(f"--side must be a positive multiple of {factor} (the U-Net downsamples {factor}x), got {args.side}")
    return args


def read_config(path: str, overrides: list[str]):
    """(U-Net config, latent side of its image size, text context length, autoencoder downsampling) of a
    latent-diffusion config."""
    from latentdiff.config import load_config

    cfg = load_config(path, overrides)
    if not hasattr(cfg, "unet"):
        raise ValueError(f"not a latent-diffusion config (type {getattr(cfg, 'type', '?')!r}): it has no U-Net")
    factor = cfg.autoencoder.downsample_factor
    return cfg.unet, cfg.image_size // factor, cfg.text_encoder.context_length, factor


def attention_shapes(unet_cfg, side: int, context_length: int) -> list[dict]:
    """The attention calls of one U-Net call at a latent ``side``, recorded from the U-Net itself (built and run on
    the meta device: no memory, no arithmetic): per distinct shape, in order of appearance, ``kind`` (self or
    cross), ``tokens`` (queries N), ``keys`` (M), ``heads``, ``dim`` (per head) and ``count`` (calls per U-Net
    call). q: (B, N, heads*dim), k and v: (B, M, heads*dim)."""
    from latentdiff.models.unet import UNetModel

    calls = []

    def record(q, k, v, heads, mask=None):
        calls.append((q.shape[1], k.shape[1], heads, q.shape[2] // heads))
        return real(q, k, v, heads, mask)

    real = attn_module.attention
    attn_module.attention = record  # CrossAttention.forward looks the op up in the module at each call
    try:
        with torch.device("meta"):
            unet = UNetModel(unet_cfg)
            x = torch.empty(1, unet_cfg.in_channels, side, side)
            context = torch.empty(1, context_length, unet_cfg.context_dim)
            with torch.no_grad():
                unet(x, torch.zeros(1), context)
    finally:
        attn_module.attention = real
    counts = Counter(calls)
    shapes = []
    for (n, m, heads, dim), count in counts.items():
        kind = "self" if m == n else "cross"
        r = math.isqrt(n)
        grid = f"{r}x{r}" if r * r == n else f"{n} tokens"
        shapes.append({"name": f"{kind} {grid}", "kind": kind, "tokens": n, "keys": m, "heads": heads, "dim": dim,
                       "count": count})
    return shapes


def config_name(path: str) -> str:
    """``path`` as the results show it: package configs by their place in the repository (no machine's paths)."""
    resolved = Path(path).resolve()
    if resolved.parent == SD_CONFIGS_DIR:
        return f"latentdiff/assets/configs/{resolved.name}"
    return path


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why ``name`` cannot run on ``device`` here, or None."""
    if name != "xformers":
        return None
    if attn_module._xops is None:
        return f"xformers is not importable ({attn_module.XFORMERS_ERROR})"
    if device.type != "cuda":
        return f"xformers runs on CUDA tensors only (device {device})"
    return None


def xformers_info() -> dict | None:
    """Version of the importable xformers and whether its C++/CUDA library loaded (a wheel built for another
    torch imports, then falls back to what it can do without it)."""
    if attn_module._xops is None:
        return None
    import xformers

    info = {"version": getattr(xformers, "__version__", "?"),
            "cpp_library": getattr(xformers, "_has_cpp_library", None), "cpp_library_error": None}
    try:
        from xformers import _cpp_lib

        error = _cpp_lib._cpp_library_load_exception
        info["cpp_library_error"] = None if error is None else " ".join(str(error).split())[:300]
    except Exception:  # private API: informative only
        pass
    return info


def xformers_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> str | None:
    """The forward operator xformers dispatches these inputs to (private API: None when it cannot be asked)."""
    try:
        from xformers.ops import fmha

        B, N, _ = q.shape
        M = k.shape[1]
        inputs = fmha.Inputs(query=q.view(B, N, heads, -1), key=k.view(B, M, heads, -1),
                             value=v.view(B, M, heads, -1))
        op = fmha._dispatch_fw(inputs, False)
        return getattr(op, "NAME", str(op))
    except Exception:
        return None


def with_backend(name: str, fn):
    """``fn`` run under attention backend ``name`` (set at each call: the backends are interleaved)."""
    def call():
        set_attention_backend(name)
        return fn()
    return call


def sample_s(fn, inner: int, device: torch.device) -> float:
    """Seconds per call of ``fn``, over a loop of ``inner`` calls: CUDA events on CUDA, wall-clock elsewhere."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    start_s = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start_s) / inner


def time_interleaved(fns: dict, args, label: str, calibrate: bool = True) -> tuple[dict, dict, dict, int]:
    """(samples in s per call, outputs, failures, calls per sample) of each function: ``--warmup`` calls each, then
    ``--repeats`` samples, the functions interleaved in an order rotated each repeat. A function that raises is
    dropped and its error kept."""
    device, outputs, failed = args.device, {}, {}
    for name, fn in fns.items():
        try:
            for _ in range(max(args.warmup, 1)):
                outputs[name] = fn()
            sync(device)
        except Exception as e:  # e.g. xformers has no operator for these inputs, or out of memory: recorded
            failed[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
    live = [name for name in fns if name not in failed]
    inner = 1
    if calibrate and live and args.min_sample_ms > 0:  # the same loop length for every backend of this shape
        fastest = min(statistics.median(sample_s(fns[n], 1, device) for _ in range(3)) for n in live)
        inner = max(1, min(1000, math.ceil(args.min_sample_ms / 1e3 / max(fastest, 1e-7))))
    samples = {name: [] for name in live}
    for r in range(args.repeats):
        order = live[r % len(live):] + live[:r % len(live)] if live else []
        for name in order:
            samples[name].append(sample_s(fns[name], inner, device))
    print(f"{label}: {', '.join(f'{n} {statistics.median(s) * 1e3:.3f} ms' for n, s in samples.items())}"
          f"{''.join(f'; {n} failed' for n in failed)}", file=sys.stderr, flush=True)
    return samples, outputs, failed, inner


def summary(samples: list[float]) -> dict:
    q1, q2, q3 = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else samples * 3
    return {"median": q2, "q25": q1, "q75": q3, "min": min(samples), "max": max(samples), "samples": samples}


def fastest(times: dict) -> str | None:
    return min(times, key=times.get) if times else None


def diffs_from_reference(outputs: dict) -> dict:
    """max |output - first backend's output| of each other backend (float32)."""
    names = list(outputs)
    ref = outputs[names[0]].float() if names else None
    return {n: (outputs[n].float() - ref).abs().max().item() for n in names[1:]}


def run_shapes(shapes: list[dict], dtype: torch.dtype, batch: int, backends: list[str], args, g) -> list[dict]:
    rows = []
    for s in shapes:
        B, h, d = batch, s["heads"], s["dim"]
        q = torch.randn(B, s["tokens"], h * d, generator=g).to(args.device, dtype)
        k = torch.randn(B, s["keys"], h * d, generator=g).to(args.device, dtype)
        v = torch.randn(B, s["keys"], h * d, generator=g).to(args.device, dtype)
        fns = {n: with_backend(n, lambda q=q, k=k, v=v, h=h: attention(q, k, v, h)) for n in backends}
        label = f"{dtype_name(dtype)} batch {batch} {s['name']}"
        samples, outputs, failed, inner = time_interleaved(fns, args, label)
        times = {n: summary(ts) for n, ts in samples.items()}
        row = {**s, "inner": inner, "times_s": times, "failed": failed, "max_abs_diff": diffs_from_reference(outputs),
               "fastest": fastest({n: t["median"] for n, t in times.items()})}
        if "xformers" in backends:
            row["xformers_op"] = xformers_op(q, k, v, h)
        rows.append(row)
        del q, k, v, outputs
    return rows


def build_unet(cfg, device: torch.device, seed: int):
    """The U-Net of ``cfg`` with random weights, built on ``device`` (a GPU initialises SD 1.5 in seconds), fp32."""
    from latentdiff.models.unet import UNetModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNetModel(cfg)
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() > 1 and not p.any():  # zero-initialised outputs (transformers' proj_out, out conv, ...)
                p.normal_(0.0, 0.02)
    return unet.eval().requires_grad_(False)


def run_unet(unet, dtype: torch.dtype, batch: int, backends: list[str], args, g) -> dict:
    cfg = unet.cfg
    model = copy.deepcopy(unet).to(dtype)
    x = torch.randn(batch, cfg.in_channels, args.side, args.side, generator=g).to(args.device, dtype)
    t = torch.full((batch,), 500, device=args.device)
    context = torch.randn(batch, args.context_length, cfg.context_dim, generator=g).to(args.device, dtype)
    fns = {n: with_backend(n, lambda m=model: m(x, t, context)) for n in backends}
    samples, outputs, failed, _ = time_interleaved(fns, args, f"{dtype_name(dtype)} batch {batch} U-Net call",
                                                   calibrate=False)
    times = {n: summary(ts) for n, ts in samples.items()}
    finite = {n: bool(torch.isfinite(o).all()) for n, o in outputs.items()}
    result = {"times_s": times, "failed": failed, "max_abs_diff": diffs_from_reference(outputs),
              "finite": finite, "fastest": fastest({n: t["median"] for n, t in times.items()})}
    del model, outputs
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def cuda_kernels(shapes: list[dict], dtype: torch.dtype, batch: int, backends: list[str], args) -> dict:
    """Names of the attention kernels (flash, fmha, cudnn, efficient, softmax, ...) each backend launched over one
    call of every shape (torch.profiler; {} when profiling fails)."""
    from torch.profiler import ProfilerActivity, profile

    keys = ("flash", "fmha", "attn", "attention", "cudnn", "efficient", "cutlass", "softmax")
    found = {}
    for name in backends:
        tensors = [tuple(torch.randn(batch, n, s["heads"] * s["dim"], device=args.device, dtype=dtype)
                         for n in (s["tokens"], s["keys"], s["keys"])) for s in shapes]
        try:
            set_attention_backend(name)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for s, (q, k, v) in zip(shapes, tensors):
                    attention(q, k, v, s["heads"])
                torch.cuda.synchronize(args.device)
            events = prof.key_averages()
            names = sorted({e.key for e in events if any(w in e.key.lower() for w in keys)})
            found[name] = [n[:120] for n in names]
        except Exception as e:  # informative only
            found[name] = [f"(profiling failed: {type(e).__name__}: {e})"[:200]]
    return found


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def decide(runs: list[dict], backends: list[str], device: torch.device, unavailable: dict) -> dict:
    """The fastest backend overall (geometric mean over the runs of each run's deciding time: the whole U-Net call,
    else the attention time of one U-Net call) and the recommendation for ``auto``."""
    per_run = [r["unet"]["times_s"] if r.get("unet") else r["attention_total_s"] for r in runs]
    per_run = [{n: (t["median"] if isinstance(t, dict) else t) for n, t in times.items()} for times in per_run]
    everywhere = [n for n in backends if all(n in times for times in per_run)]
    overall = {n: geomean([times[n] for times in per_run]) for n in everywhere}
    best = fastest(overall)
    out = {"overall_s": overall, "fastest": best, "run_winners": [fastest(t) for t in per_run]}
    if device.type != "cuda":
        out["auto"] = "sdpa"
        out["text"] = (f"auto uses SDPA on {device.type} (xformers is CUDA only): nothing to choose here; "
                       f"fastest measured: {best}")
        return out
    measured = [n for n in ("sdpa", "xformers") if n in overall]
    if measured == ["sdpa", "xformers"]:
        ratio = overall["xformers"] / overall["sdpa"]  # > 1: SDPA is faster
        winners = ", ".join(f"{r['dtype']} batch {r['batch']}: {w}" for r, w in zip(runs, out["run_winners"]))
        if abs(ratio - 1) < TIE:
            out["auto"] = "xformers"
            out["text"] = (f"xformers and SDPA within {TIE:.0%} ({ratio:.3f}x, geometric mean over the runs; "
                           f"{winners}): keep auto as it is (xformers when importable)")
        elif ratio > 1:
            out["auto"] = "sdpa"
            out["text"] = (f"SDPA is faster than xformers by {ratio:.3f}x (geometric mean over the runs; {winners}): "
                           "auto should pick SDPA on this card: set LATENTDIFF_ATTENTION=sdpa")
        else:
            out["auto"] = "xformers"
            out["text"] = (f"xformers is faster than SDPA by {1 / ratio:.3f}x (geometric mean over the runs; "
                           f"{winners}): keep auto (xformers when importable)")
        return out
    failed = {n for r in runs for n in r["failed_backends"]}
    why = unavailable.get("xformers") or ("it failed here: see the failures" if "xformers" in failed else
                                          "it was not asked for (--backends)")
    out["auto"] = "sdpa"
    out["text"] = f"auto uses SDPA here: xformers is not measured ({why}); nothing to choose"
    return out


def run(args) -> dict:
    backends = args.backends
    unavailable = {n: reason for n in backends if (reason := unavailable_reason(n, args.device)) is not None}
    live = [n for n in backends if n not in unavailable]
    shapes = attention_shapes(args.unet_cfg, args.side, args.context_length)
    r = {"device": str(args.device), "device_name": torch.cuda.get_device_name(args.device)
         if args.device.type == "cuda" else "cpu", "torch": torch.__version__, "cuda": torch.version.cuda,
         "threads": torch.get_num_threads(), "xformers": xformers_info(), "config": config_name(args.config),
         "set": args.set,
         "unet": {k: v for k, v in vars(args.unet_cfg).items()}, "side": args.side,
         "image_side": args.side * args.factor, "context": [args.context_length, args.unet_cfg.context_dim],
         "backends": backends, "unavailable": unavailable, "repeats": args.repeats, "warmup": args.warmup,
         "min_sample_ms": args.min_sample_ms, "shapes": shapes, "runs": [], "kernels": {}}
    previous = r["backend_at_start"] = get_attention_backend()  # auto, or $LATENTDIFF_ATTENTION
    g = torch.Generator().manual_seed(args.seed)
    try:
        set_attention_backend("auto")
        r["auto_kernel"] = attention_kernel(args.device)  # what auto resolves to on this device
        unet = None if args.no_unet or not live else build_unet(args.unet_cfg, args.device, args.seed)
        with torch.inference_mode():
            for dtype_key in args.dtype if live else []:  # nothing to time when no backend can run here
                dtype = DTYPES[dtype_key]
                if args.device.type == "cuda" and not args.no_kernels:
                    r["kernels"][dtype_key] = cuda_kernels(shapes, dtype, args.batch[0], live, args)
                for batch in args.batch:
                    rows = run_shapes(shapes, dtype, batch, live, args, g)
                    measured = [n for n in live if all(n in row["times_s"] for row in rows)]
                    total = {n: sum(row["count"] * row["times_s"][n]["median"] for row in rows) for n in measured}
                    one = {"dtype": dtype_key, "batch": batch, "shapes": rows, "attention_total_s": total,
                           "attention_fastest": fastest(total),
                           "failed_backends": sorted({n for row in rows for n in row["failed"]})}
                    if unet is not None:
                        one["unet"] = run_unet(unet, dtype, batch, live, args, g)
                        one["failed_backends"] = sorted(set(one["failed_backends"]) | set(one["unet"]["failed"]))
                    r["runs"].append(one)
    finally:
        set_attention_backend(previous)
    r["decision"] = decide(r["runs"], live, args.device, unavailable) if r["runs"] else None
    return r


def cell(t: dict | None) -> str:
    if t is None:
        return "n/a"
    spread = (t["q75"] - t["q25"]) / 2 / t["median"] if t["median"] > 0 else 0.0
    return f"{t['median'] * 1e3:.3f} ±{spread:.1%}"


def winner_cell(times: dict) -> str:
    ranked = sorted(times, key=times.get)
    if not ranked:
        return "n/a"
    if len(ranked) == 1:
        return ranked[0]
    return f"{ranked[0]} ({times[ranked[1]] / times[ranked[0]]:.2f}x)"


def markdown(r: dict) -> str:
    backends = r["backends"]
    x = r["xformers"]
    xf = (f"xformers {x['version']} (C++/CUDA library loaded: {x['cpp_library']})" if x else
          "xformers: not importable")
    lines = [f"## Attention backends: latentdiff's attention op on the U-Net shapes of {Path(r['config']).name}", "",
             f"Device {r['device_name']} ({r['device']}), torch {r['torch']}, CUDA {r['cuda']}, {xf}; "
             f"auto picks {r['auto_kernel']} here" + (f" (backend at start: {r['backend_at_start']})"
                                                      if r["backend_at_start"] != "auto" else "")
             + f". Config {r['config']}{' ' + ' '.join(r['set']) if r['set'] else ''}"
             f", latent {r['side']}x{r['side']} ({r['image_side']}x{r['image_side']} pixels)"
             f", context {r['context'][0]} x {r['context'][1]}; {r['repeats']} samples per backend, interleaved.",
             "", "Times in ms per call: median ±half the interquartile range (relative). n/a: not available here."]
    for name, reason in r["unavailable"].items():
        lines.append(f"- {name}: not available: {reason}")
    for run_ in r["runs"]:
        lines += ["", f"### {run_['dtype']}, batch {run_['batch']}", "",
                  "| attention | queries | keys | heads x dim | calls per U-Net call | "
                  + " | ".join(f"{n} ms" for n in backends) + " | fastest | max abs diff vs " + backends[0] + " |",
                  "|" + " --- |" * (7 + len(backends))]
        for row in run_["shapes"]:
            medians = {n: t["median"] for n, t in row["times_s"].items()}
            diffs = ", ".join(f"{n} {d:.1e}" for n, d in row["max_abs_diff"].items()) or "-"
            lines.append(f"| {row['name']} | {row['tokens']} | {row['keys']} | {row['heads']} x {row['dim']} | "
                         f"{row['count']} | " + " | ".join(cell(row["times_s"].get(n)) for n in backends)
                         + f" | {winner_cell(medians)} | {diffs} |")
        total = run_["attention_total_s"]
        lines.append("| attention per U-Net call | | | | " + str(sum(row["count"] for row in run_["shapes"])) + " | "
                     + " | ".join(f"{total[n] * 1e3:.3f}" if n in total else "n/a" for n in backends)
                     + f" | {winner_cell(total)} | |")
        if run_.get("unet"):
            u = run_["unet"]
            medians = {n: t["median"] for n, t in u["times_s"].items()}
            diffs = ", ".join(f"{n} {d:.1e}" for n, d in u["max_abs_diff"].items()) or "-"
            lines.append("| whole U-Net call | | | | 1 | " + " | ".join(cell(u["times_s"].get(n)) for n in backends)
                         + f" | {winner_cell(medians)} | {diffs} |")
            if not all(u["finite"].values()):
                lines.append(f"\nNon-finite U-Net output (random weights): {u['finite']}")
        for row in run_["shapes"]:
            for n, err in row["failed"].items():
                lines.append(f"\n{n} failed on {row['name']}: {err}")
        for n, err in (run_.get("unet") or {}).get("failed", {}).items():
            lines.append(f"\n{n} failed on the U-Net call: {err}")
    ops = {row["name"]: row["xformers_op"] for run_ in r["runs"][:1] for row in run_["shapes"]
           if row.get("xformers_op")}
    if ops:
        lines += ["", "xformers operators (first run): " + "; ".join(f"{k}: {v}" for k, v in ops.items())]
    for dtype_key, by_backend in r["kernels"].items():
        lines += ["", f"CUDA kernels, {dtype_key}: " + "; ".join(f"{n}: {', '.join(ks) or '-'}"
                                                                 for n, ks in by_backend.items())]
    d = r["decision"]
    if d:
        lines += ["", "Fastest per run: " + ", ".join(f"{run_['dtype']} batch {run_['batch']}: {w}"
                                                     for run_, w in zip(r["runs"], d["run_winners"])) + "; overall "
                  f"(geometric mean over the runs): {d['fastest']}.", "", f"Recommendation for auto: {d['text']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    results = run(args)
    text = markdown(results)
    print(text, end="")
    from latentdiff.atomic import atomic_write

    if args.json:
        with atomic_write(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.markdown:
        with atomic_write(args.markdown, "w") as f:
            f.write(text)
    live = [n for n in args.backends if n not in results["unavailable"]]
    measured = any(row["times_s"] for run_ in results["runs"] for row in run_["shapes"])
    if live and not measured:
        print("bench_attention: error: no backend could be timed (see the failures above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
