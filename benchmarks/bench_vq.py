"""Benchmark VQ-Diffusion sampling: latentdiff against diffusers' VQDiffusionPipeline, side by side in one run.

Both pipelines get the same random weights (diffusers models converted into latentdiff's), the same prompt,
guidance scale, step count and seed; latentdiff also runs its fast mode (T/skip network calls). Times are whole
pipeline calls (text encoding, the reverse chain, VQ decoding), median of ``--repeats`` after one warm-up. The
``codes agree`` column is the share of latent codes latentdiff's full chain draws identically to diffusers'
(same Gumbel noise stream; float rounding may flip a few draws). TFLOP/s counts the transformer only
(torch.utils.flop_counter), the dominant cost.

    python benchmarks/bench_vq.py                                      # tiny preset on the CPU, a sanity run
    python benchmarks/bench_vq.py --preset small ithq --device cuda --dtype fp32 fp16 --repeats 3
    python benchmarks/bench_vq.py --preset tiny --folder               # also load through a saved diffusers folder

Presets: ``tiny`` (32 px, 8x8 codes, 2 layers), ``small`` (128 px, 16x16 codes of 1024, 12 layers of 512),
``ithq`` (the shape of microsoft/vq-diffusion-ithq: 256 px, 32x32 codes of 4096, 36 layers of 1408, CLIP B/32
text encoder; random weights, nothing is downloaded). diffusers is a benchmark-only dependency.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, the module docstring kept verbatim."""


def fail(message: str) -> None:
    """One message on stderr, exit status 2 (bad input), no traceback."""
    print(f"bench_vq: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def resolve_device_dtype(device: str, precision: str):
    """(torch device, torch dtype); ``auto`` is CUDA when available; fp16 is refused on the CPU."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        fail(f"--device {device!r} is not a device torch knows: {e}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device} was asked for but CUDA is not available on this machine")
    if dev.type == "cpu" and precision == "fp16":
        fail("--dtype fp16 is not supported on the CPU; use fp32 or bf16")
    return dev, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

PRESETS = {
    "tiny": dict(image=32, ch=[32, 64, 64], layers_per_block=1, latent_channels=32, embed=32, codes=256, heads=4,
                 head_dim=32, depth=2, text=(128, 2, 4)),
    "small": dict(image=128, ch=[64, 128, 128, 256], layers_per_block=1, latent_channels=64, embed=64, codes=1024,
                  heads=8, head_dim=64, depth=12, text=(512, 12, 8)),
    "ithq": dict(image=256, ch=[128, 256, 256, 512], layers_per_block=2, latent_channels=256, embed=128, codes=4096,
                 heads=16, head_dim=88, depth=36, text=(512, 12, 8)),
}
TIMESTEPS = 100
PROMPT = "a photo of a red boat on a lake"


def clip_tokenizer(folder: Path):
    """transformers' CLIPTokenizer built from the CLIP BPE merges shipped with open_clip (no download)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (folder / "vocab.json").write_text(json.dumps({names.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=77)


def build_diffusers(preset: dict, workdir: Path):
    """diffusers' VQDiffusionPipeline with random weights (a non-zero learned null condition)."""
    import torch
    from diffusers import Transformer2DModel, VQDiffusionPipeline, VQDiffusionScheduler, VQModel
    from diffusers.pipelines.deprecated.vq_diffusion.pipeline_vq_diffusion import (
        LearnedClassifierFreeSamplingEmbeddings,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    n, p = len(preset["ch"]), preset
    vqvae = VQModel(down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                    block_out_channels=p["ch"], layers_per_block=p["layers_per_block"],
                    latent_channels=p["latent_channels"], num_vq_embeddings=p["codes"], vq_embed_dim=p["embed"],
                    norm_num_groups=32, sample_size=p["image"])
    width, layers, heads = p["text"]
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=width, intermediate_size=4 * width,
                                                num_hidden_layers=layers, num_attention_heads=heads,
                                                max_position_embeddings=77, hidden_act="quick_gelu"))
    transformer = Transformer2DModel(num_attention_heads=p["heads"], attention_head_dim=p["head_dim"],
                                     num_layers=p["depth"], cross_attention_dim=width, attention_bias=True,
                                     sample_size=p["image"] // 2 ** (n - 1), num_vector_embeds=p["codes"] + 1,
                                     activation_fn="geglu-approximate", num_embeds_ada_norm=TIMESTEPS,
                                     norm_type="ada_norm")
    null = LearnedClassifierFreeSamplingEmbeddings(learnable=True, hidden_size=width, length=77)
    with torch.no_grad():
        null.embeddings.normal_(0.0, 0.05)
    scheduler = VQDiffusionScheduler(num_vec_classes=p["codes"] + 1, num_train_timesteps=TIMESTEPS)
    pipe = VQDiffusionPipeline(vqvae=vqvae, text_encoder=text_encoder, tokenizer=clip_tokenizer(workdir),
                               transformer=transformer, scheduler=scheduler,
                               learned_classifier_free_sampling_embeddings=null)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def convert(ref, workdir: Path | None):
    """The same weights as a latentdiff VQDiffusionPipeline: in memory, or through a saved diffusers folder."""
    from latentdiff.io.vq_diffusion import NULL_EMBEDDINGS, vq_diffusion_from_diffusers
    from latentdiff.pipelines import VQDiffusionPipeline, load_vq_diffusion_folder

    if workdir is not None:
        ref.save_pretrained(workdir / "diffusers")
        return load_vq_diffusion_folder(workdir / "diffusers")
    null = ref.learned_classifier_free_sampling_embeddings
    configs = {"vqvae": dict(ref.vqvae.config), "transformer": dict(ref.transformer.config),
               "text_encoder": ref.text_encoder.config.to_dict(), "scheduler": dict(ref.scheduler.config),
               NULL_EMBEDDINGS: dict(null.config)}
    weights = {"vqvae": ref.vqvae.state_dict(), "transformer": ref.transformer.state_dict(),
               "text_encoder": ref.text_encoder.state_dict(), NULL_EMBEDDINGS: null.state_dict()}
    cfg, parts = vq_diffusion_from_diffusers(configs, weights)
    return VQDiffusionPipeline.from_parts(cfg, {k: {n: t.clone() for n, t in sd.items()} for k, sd in parts.items()})


def timed(fn, device, repeats: int) -> tuple[float, float, object]:
    """(median seconds, peak GiB, last result) after one warm-up call."""
    import torch

    fn()
    times, out = [], None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak, out


def transformer_flops(pipe, batch: int) -> int:
    """FLOPs of one guided transformer call (conditional + null rows) of the latentdiff pipeline."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cfg = pipe.config.transformer
    x = torch.full((2 * batch, cfg.latent_size**2), cfg.num_codes, device=pipe.device)
    t = torch.full((2 * batch,), TIMESTEPS - 1, device=pipe.device)
    context = torch.zeros(2 * batch, cfg.context_length, cfg.context_dim, device=pipe.device, dtype=pipe.dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        pipe.transformer(x, t, context)
    return counter.get_total_flops()


def run_diffusers(ref, prompts: list[str], args, device, codes: list):
    import torch

    codes.clear()
    return ref(prompts, num_inference_steps=TIMESTEPS, guidance_scale=args.scale, output_type="np",
               generator=torch.Generator(device).manual_seed(args.seed), callback=lambda i, t, x: codes.append(x))


def run_latentdiff(ours, prompts: list[str], steps: int, args, codes: list):
    codes.clear()
    return ours.generate(prompts, steps=steps, scale=args.scale, seed=args.seed,
                         callback=lambda i, n, x: codes.append(x))


def bench_dtype(name: str, dtype_name: str, ref, ours, args, device, table: Table) -> None:
    """Rows of one preset and precision: diffusers, then latentdiff's full chain and its fast modes."""
    _, dtype = resolve_device_dtype(str(device), dtype_name)
    ref.to(device, dtype)
    ours.to(device=device, dtype=dtype)
    flops = transformer_flops(ours, args.batch)
    prompts = [PROMPT] * args.batch
    ref_codes, our_codes = [], []
    row = dict(preset=name, dtype=dtype_name, impl="diffusers", steps=TIMESTEPS, agree="")
    try:
        seconds, peak, _ = timed(lambda: run_diffusers(ref, prompts, args, device, ref_codes), device, args.repeats)
    except Exception as e:  # noqa: BLE001  a reference failure (e.g. in fp16) is reported, not fatal
        print(f"{name}/{dtype_name}: diffusers failed: {type(e).__name__}: {e}", file=sys.stderr)
        seconds = peak = float("nan")
    table.add(row | dict(seconds=seconds, peak_gib=peak, tflops=flops * TIMESTEPS / seconds / 1e12))
    for skip in (1, *args.skip):
        steps = TIMESTEPS // skip
        seconds, peak, _ = timed(lambda steps=steps: run_latentdiff(ours, prompts, steps, args, our_codes),
                                 device, args.repeats)
        agree = ""
        if skip == 1 and ref_codes:
            agree = f"{(ref_codes[-1] == our_codes[-1]).float().mean().item():.1%}"
        table.add(dict(preset=name, dtype=dtype_name, impl="latentdiff" + (f" skip {skip}" if skip > 1 else ""),
                       steps=steps, seconds=seconds, peak_gib=peak, tflops=flops * steps / seconds / 1e12,
                       agree=agree))


def bench_preset(name: str, args, device, table: Table) -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        ref = build_diffusers(PRESETS[name], Path(tmp))
        ours = convert(ref, Path(tmp) if args.folder else None)
        for dtype_name in args.dtype:
            bench_dtype(name, dtype_name, ref, ours, args, device, table)
        del ref, ours
        if device.type == "cuda":
            torch.cuda.empty_cache()


class Table:
    """Rows printed as they are measured; speedups against the diffusers row of the same preset and dtype."""

    def __init__(self):
        self.base: dict[tuple[str, str], float] = {}
        self.rows: list[dict] = []
        head = (f"{'preset':<7}{'dtype':<6}{'impl':<20}{'calls':>6}{'time s':>10}{'speedup':>10}{'peak GiB':>10}"
                f"{'TFLOP/s':>10}{'codes agree':>13}")
        print(head + "\n" + "-" * len(head), flush=True)

    def add(self, r: dict) -> None:
        if r["impl"] == "diffusers":
            self.base[(r["preset"], r["dtype"])] = r["seconds"]
        speedup = self.base[(r["preset"], r["dtype"])] / r["seconds"]
        self.rows.append({k: (None if isinstance(v, float) and math.isnan(v) else v)
                          for k, v in (r | {"speedup": speedup}).items()})
        print(f"{r['preset']:<7}{r['dtype']:<6}{r['impl']:<20}{r['steps']:>6}{r['seconds']:>10.3f}"
              f"{speedup:>9.2f}x{r['peak_gib']:>10.2f}{r['tflops']:>10.4f}{r['agree']:>13}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", nargs="+", default=["tiny"], choices=sorted(PRESETS), help="model sizes to run")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "fp16", "bf16"],
                   help="weights/compute precisions, each benchmarked")
    p.add_argument("--batch", type=int, default=1, help="prompts per call (each with its null-condition row)")
    p.add_argument("--scale", type=float, default=5.0, help="classifier-free guidance scale (> 1)")
    p.add_argument("--skip", type=int, nargs="*", default=[2, 4],
                   help="latentdiff fast-mode skips (T/skip network calls); 1 (the full chain) always runs")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per row (after one warm-up)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of both pipelines")
    p.add_argument("--folder", action="store_true",
                   help="convert through diffusers' save_pretrained folder and load_vq_diffusion_folder")
    p.add_argument("--json", metavar="OUT", help="also write the rows as JSON to this file")
    args = p.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        fail(f"--batch and --repeats must be >= 1, got {args.batch} and {args.repeats}")
    if args.scale <= 1:
        fail(f"--scale must be > 1 (diffusers disables guidance at 1), got {args.scale}")
    if any(s < 1 or TIMESTEPS % s for s in args.skip):
        fail(f"--skip values must divide {TIMESTEPS}, got {args.skip}")
    device, _ = resolve_device_dtype(args.device, args.dtype[0])
    for dtype_name in args.dtype:
        resolve_device_dtype(str(device), dtype_name)

    import diffusers
    import torch

    diffusers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {card}, torch {torch.__version__}, diffusers {diffusers.__version__}, threads "
          f"{torch.get_num_threads()}, batch {args.batch}, scale {args.scale}, T = {TIMESTEPS}")
    table = Table()
    for name in args.preset:
        bench_preset(name, args, device, table)
    if args.json:
        from latentdiff.atomic import atomic_write

        result = {"device": card, "torch": torch.__version__, "diffusers": diffusers.__version__,
                  "threads": torch.get_num_threads(), "batch": args.batch, "scale": args.scale,
                  "timesteps": TIMESTEPS, "repeats": args.repeats,
                  "presets": {n: {k: PRESETS[n][k] for k in ("image", "codes", "depth")} | {
                      "latent_side": PRESETS[n]["image"] // 2 ** (len(PRESETS[n]["ch"]) - 1)} for n in args.preset},
                  "rows": table.rows}
        with atomic_write(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
