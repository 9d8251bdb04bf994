"""Latent-shape ablation of the KL autoencoder: rFID and PSNR against diffusion cost, one row per shape.

    python benchmarks/ae_ablation.py --shards data/cifar10-train-shards --images PATH/TO/cifar10-test.tar.gz \\
        --reference data/cifar10-test-inception.npz --steps 600 --candidates f4c8,f4c16,f2c4 runs/ae_ablation
    python benchmarks/ae_ablation.py --shards data/cifar10-train-shards --images PATH/TO/cifar10-test.tar.gz \\
        --config configs/cifar10_autoencoder_gpu.yaml --minutes 1.5 --num-samples 10000 \\
        --reference data/cifar10-test-inception.npz runs/ae_ablation_gpu        # on a GPU, the recipe's budget

Each candidate "f<F>c<C>" is the --config autoencoder with downsampling factor F (its ``ch_mult`` cut or extended,
repeating the last entry, to log2(F) + 1 levels) and C latent channels (``z_channels`` = ``embed_dim`` = C), trained
by tools/train.py with everything else equal (--steps: the same number of steps, the fair choice on a shared
machine; --minutes: the same wall-clock budget, the recipe's own terms on a GPU), then scored by tools/rfid.py on
the test images (PSNR; rFID against --reference, or against the selected real images themselves). The cost side:
the FLOPs of one forward of the --ldm-config U-Net (torch.utils.flop_counter, batch 1, its context length) on that
latent shape, and the latent values per image. A latent diffusion model cannot beat its autoencoder's rFID, and
its sampling cost grows with the U-Net's FLOPs: the row to pick is the cheapest one whose rFID leaves room under
the target FID.

OUTDIR/<candidate>/ holds the training run (model.safetensors, train.log) and rfid.json/.md; a candidate whose
model and rfid.json already exist is not run again (rerun with the same OUTDIR after an interruption; training
itself resumes from its checkpoints). OUTDIR/summary.md and summary.json hold the table and the commands.
Exit status 1 when a candidate failed (the others still run), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CANDIDATE = re.compile(r"f(\d+)c(\d+)")


def parse_candidate(text: str) -> tuple[int, int]:
    """"f4c16" -> (4, 16): downsampling factor (a power of two) and latent channels."""
    m = CANDIDATE.fullmatch(text.strip())
    if not m or int(m.group(1)) < 1 or int(m.group(1)) & (int(m.group(1)) - 1) or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(f"candidate {text!r} must look like f4c16 (factor a power of two, "
                                         "channels >= 1)")
    return int(m.group(1)), int(m.group(2))


def shape_overrides(ch_mult: list[int], factor: int, channels: int) -> list[str]:
    """tools/train.py --set values that give the autoencoder (and the config's U-Net, which must match it) the
    latent shape: ``ch_mult`` cut or extended (repeating its last entry) to log2(factor) + 1 levels."""
    levels = int(math.log2(factor)) + 1
    mult = list(ch_mult[:levels]) + [ch_mult[-1]] * max(0, levels - len(ch_mult))
    return [f"model.autoencoder.ch_mult=[{','.join(map(str, mult))}]", f"model.autoencoder.z_channels={channels}",
            f"model.autoencoder.embed_dim={channels}", f"model.unet.in_channels={channels}",
            f"model.unet.out_channels={channels}"]


def unet_forward_flops(ldm_config: Path, channels: int, size: int) -> int:
    """FLOPs of one forward of ``ldm_config``'s U-Net on a (1, channels, size, size) latent and a full context."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from latentdiff.config import load_train_config
    from latentdiff.models.unet import UNetModel

    cfg = load_train_config(ldm_config, [f"model.unet.in_channels={channels}", f"model.unet.out_channels={channels}",
                                         f"model.autoencoder.embed_dim={channels}",
                                         f"model.autoencoder.z_channels={channels}"])
    unet = UNetModel(cfg.model.unet).eval()
    length = cfg.model.text_encoder.context_length
    x, t = torch.zeros(1, channels, size, size), torch.full((1,), 500)
    context = torch.zeros(1, length, cfg.model.unet.context_dim)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, t, context)
    return counter.get_total_flops()


def add_training_budget(p: argparse.ArgumentParser) -> None:
    """--steps | --minutes (one of them: :func:`check_training_budget`) and --set, shared by the ablation scripts."""
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="training steps of every candidate (sets the config's steps)")
    budget.add_argument("--minutes", type=float, help="wall-clock training budget of every candidate")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="more tools/train.py overrides for every candidate (repeatable)")


def check_training_budget(parser: argparse.ArgumentParser, args) -> None:
    """Exit 2 unless exactly one positive budget was given."""
    if args.steps is None and args.minutes is None:
        parser.error("give the training budget: --steps N or --minutes M")
    if (args.steps is not None and args.steps < 1) or (args.minutes is not None and args.minutes <= 0):
        parser.error("--steps / --minutes must be positive")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", type=Path, help="output folder (one subfolder per candidate, summary.md)")
    p.add_argument("--shards", required=True, help="training shards (tools/make_shards.py)")
    p.add_argument("--images", required=True, help="real test images for rFID/PSNR: folder, archive or shards")
    p.add_argument("--candidates", default="f4c8,f4c16,f2c4",
                   help="comma-separated f<factor>c<channels> (default: f4c8,f4c16,f2c4)")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "cifar10_autoencoder.yaml",
                   help="autoencoder training config all candidates share (default: the CPU one)")
    p.add_argument("--ldm-config", type=Path, default=ROOT / "configs" / "cifar10_ldm_gpu.yaml",
                   help="the latent diffusion config whose U-Net's FLOPs are the cost column")
    add_training_budget(p)
    p.add_argument("--num-samples", type=int, default=2000, help="test images reconstructed (PSNR over all)")
    p.add_argument("--fid-samples", type=int, default=None, help="of those, scored by rFID (default: all)")
    p.add_argument("--reference", default=None, help="rFID reference (.npz from tools/fid.py --save-stats)")
    p.add_argument("--no-fid", action="store_true", help="PSNR only (no Inception network)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of each step (OMP_NUM_THREADS)")
    p.add_argument("--device", default="auto", help="device of training and rFID (auto: cuda if available)")
    return p


def run_step(cmd: list[str], log: Path, env: dict) -> tuple[int, float]:
    """Run ``cmd`` from the repository root, appending its output to ``log``; (exit status, seconds)."""
    start = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        code = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    return code, time.time() - start


def last_record(log: Path) -> dict:
    """The training log's (log.jsonl) last record with a step ({} when there is none)."""
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    return next((r for r in reversed(records) if r.get("step") is not None), {})


def write_summary(outdir: Path, heading: str, table: str, rows: list[dict]) -> None:
    """OUTDIR/summary.md (``heading``, the table, every row's commands) and summary.json (the rows), each written
    atomically; prints the table."""
    from latentdiff.atomic import atomic_write

    commands = "\n".join(c for r in rows for c in r["commands"])
    text = f"{heading}\n\n{table}\n```\n{commands}\n```\n"
    for path, content in (("summary.md", text), ("summary.json", json.dumps(rows, indent=2) + "\n")):
        with atomic_write(outdir / path, "w") as f:
            f.write(content)
    print(table + f"wrote {outdir / 'summary.md'}")


def markdown(rows: list[dict], args) -> str:
    base = next((r["unet_gflops"] for r in rows if r.get("unet_gflops")), None)
    n = None if args.no_fid else (args.fid_samples or args.num_samples)
    head = ["candidate", "latent", "values", "AE parameters", "train steps", "train s", f"PSNR ({args.num_samples})"]
    head += [] if n is None else [f"rFID-{n}"]
    head += ["U-Net GFLOP/forward", "× first row"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["candidate"], r["latent"], str(r["values"]), r.get("parameters", "-"), str(r.get("steps", "-")),
                 f"{r['train_seconds']:.0f}" if r.get("train_seconds") is not None else "-",
                 f"{r['psnr']:.2f}" if r.get("psnr") is not None else "-"]
        cells += [] if n is None else [f"{r['rfid']:.2f}" if r.get("rfid") is not None else "-"]
        cells += [f"{r['unet_gflops']:.3f}", f"{r['unet_gflops'] / base:.2f}" if base else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.get("error") for r in rows):
        lines += [""] + [f"- {r['candidate']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        candidates = [parse_candidate(c) for c in args.candidates.split(",") if c.strip()]
    except argparse.ArgumentTypeError as e:
        build_parser().error(str(e))
    from latentdiff.config import load_train_config

    for path in (args.config, args.ldm_config):
        if not path.is_file():
            build_parser().error(f"no config file {path}")
    check_training_budget(build_parser(), args)
    if args.no_fid and (args.reference or args.fid_samples):
        build_parser().error("--no-fid computes no rFID: drop --reference and --fid-samples")
    try:
        cfg = load_train_config(args.config, list(args.set))
    except (ValueError, TypeError) as e:
        build_parser().error(f"{args.config}: {e}")
    size = cfg.data.image_size
    args.outdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    python, code, rows = sys.executable, 0, []
    for factor, channels in candidates:
        name = f"f{factor}c{channels}"
        folder = args.outdir / name
        folder.mkdir(exist_ok=True)
        latent = size // factor
        row = {"candidate": name, "latent": f"{latent}×{latent}×{channels}", "values": latent * latent * channels}
        try:
            row["unet_gflops"] = unet_forward_flops(args.ldm_config, channels, latent) / 1e9
        except (ValueError, RuntimeError) as e:
            row["unet_gflops"], row["error"] = float("nan"), f"U-Net FLOPs: {e}"
        model, rfid, timing = folder / "model.safetensors", folder / "rfid.json", folder / "timing.json"
        train = [python, "tools/train.py", "--config", str(args.config), "--outdir", str(folder), "--no-progress",
                 "--set", f"data.shards={args.shards}", "--set", f"device={args.device}"]
        for item in shape_overrides(cfg.model.autoencoder.ch_mult, factor, channels) + list(args.set):
            train += ["--set", item]
        train += ["--set", f"steps={args.steps}"] if args.steps else ["--max-minutes", str(args.minutes)]
        score = [python, "tools/rfid.py", str(model), "--images", args.images, "--num-samples",
                 str(args.num_samples), "--out", str(rfid), "--overwrite", "--no-progress", "--device", args.device]
        score += ["--no-fid"] if args.no_fid else []
        score += ["--reference", args.reference] if args.reference else []
        score += ["--fid-samples", str(args.fid_samples)] if args.fid_samples else []
        row["commands"] = [" ".join(train), " ".join(score)]
        if not (model.is_file() and rfid.is_file()):
            print(f"-- {name}: training", flush=True)
            status, row["train_seconds"] = run_step(train, folder / "train.log", env)
            if status == 0:
                print(f"-- {name}: rFID / PSNR", flush=True)
                status, row["rfid_seconds"] = run_step(score, folder / "rfid.log", env)
            if status != 0:
                row["error"] = f"a step exited {status} (see {folder}/train.log, rfid.log)"
                code = 1
            else:
                timing.write_text(json.dumps({k: row[k] for k in ("train_seconds", "rfid_seconds")}) + "\n")
        elif timing.is_file():  # done by an earlier call
            row.update(json.loads(timing.read_text()))
        if rfid.is_file() and model.is_file():
            scored = json.loads(rfid.read_text())["models"][0]
            row.update(psnr=scored["psnr"], rfid=scored.get("rfid"), parameters=f"{scored['parameters'] / 1e6:.2f} M")
            row["steps"] = last_record(folder / "log.jsonl").get("step")
        rows.append(row)
        print(markdown(rows, args), flush=True)  # the table so far
    write_summary(args.outdir, f"# Autoencoder latent-shape ablation\n\nConfig {args.config}, "
                  f"{f'{args.steps} steps' if args.steps else f'{args.minutes:g} minutes'} each; U-Net: "
                  f"{args.ldm_config}.", markdown(rows, args), rows)
    return code


if __name__ == "__main__":
    sys.exit(main())
