"""Objective ablation of latent diffusion: prediction target and min-SNR weighting, FID and class accuracy per row.

    python benchmarks/ldm_ablation.py runs/ldm_ablation --shards data/cifar10-train-shards --steps 1800 \\
        --reference data/cifar10-test-inception.npz --candidates eps,eps-snr5,v,v-snr5 --jobs 2 --threads 1
    python benchmarks/ldm_ablation.py runs/ldm_ablation_gpu --shards data/cifar10-train-shards \\
        --config configs/cifar10_ldm_gpu.yaml --minutes 2 --reference data/cifar10-test-inception.npz \\
        --device cuda --candidates eps,eps-snr5,v-snr5        # on a GPU, the recipe's own config and budget

Each candidate "<target>[-snr<γ>]" trains the --config U-Net and text encoder from scratch on the latents of one
frozen autoencoder (--autoencoder: a model file holding one; default: the embedded default model's) with the
prediction target eps (ε, ``schedule.prediction_type: epsilon``), v (``v_prediction``) or x0 (``sample``), and
min-SNR-γ loss weighting when "-snr<γ>" is given (Hang et al. 2023; none otherwise), everything else equal
(--steps: the same number of steps, the fair choice on a shared machine; --minutes: the same wall-clock budget).
Then tools/eval_t2i.py generates --num-samples class-caption images with each sampler of --samplers (image i:
class i mod 10, seed i; default DDIM 25, the protocol of BENCHMARKS.md's default-model tables, and Euler ancestral
10, the embedded model's own, both at scale 5: a short-trained epsilon model fails with the one and not the other)
and scores them: FID against --reference and class accuracy by the embedded CIFAR-10 judge.

OUTDIR/<candidate>/ holds the training run (model.safetensors, train.log) and eval_<sampler><steps>/results.json;
what already exists is not run again (rerun with the same OUTDIR after an interruption, or with more --samplers:
training resumes from its checkpoints, an unfinished evaluation starts over). Paths reach tools/train.py as
given, run from the repository root. --jobs N runs N candidates at once (on a CPU with --threads each).
OUTDIR/summary.md and summary.json hold the table and the commands. Exit status 1 when a candidate failed (the
others still run), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ae_ablation import add_training_budget, check_training_budget, last_record, run_step, write_summary  # noqa: E402

CANDIDATE = re.compile(r"(eps|v|x0)(?:-snr(\d+(?:\.\d+)?))?")
TARGETS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def parse_candidate(text: str) -> tuple[str, float | None]:
    """"v-snr5" -> ("v_prediction", 5.0): the schedule's prediction_type and the min-SNR γ (None: unweighted)."""
    m = CANDIDATE.fullmatch(text.strip())
    if not m or (m.group(2) is not None and float(m.group(2)) <= 0):
        raise argparse.ArgumentTypeError(f"candidate {text!r} must look like eps, v-snr5 or x0-snr2.5 (target eps, "
                                         "v or x0; min-SNR γ > 0)")
    return TARGETS[m.group(1)], None if m.group(2) is None else float(m.group(2))


def objective_overrides(target: str, gamma: float | None) -> list[str]:
    """tools/train.py --set values for one candidate."""
    return [f"model.schedule.prediction_type={target}",
            f"objective.min_snr_gamma={'null' if gamma is None else gamma}"]


def parse_samplers(text: str) -> list[tuple[str, int]]:
    """"ddim:25,euler_a:10" -> [("ddim", 25), ("euler_a", 10)]: each sampler of the evaluation and its steps."""
    from latentdiff.diffusion.samplers import SAMPLERS

    out = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        name, _, steps = item.partition(":")
        if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
            raise argparse.ArgumentTypeError(f"sampler {item!r} must be NAME:STEPS, NAME one of {sorted(SAMPLERS)}")
        out.append((name, int(steps)))
    if not out or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"--samplers {text!r}: give at least one, each once")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", type=Path, help="output folder (one subfolder per candidate, summary.md)")
    p.add_argument("--shards", required=True, help="training shards (tools/make_shards.py)")
    p.add_argument("--candidates", default="eps,eps-snr5,v,v-snr5",
                   help="comma-separated <target>[-snr<γ>], target eps, v or x0 (default: eps,eps-snr5,v,v-snr5)")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "cifar10_ldm.yaml",
                   help="latent diffusion training config all candidates share (default: the CPU one)")
    p.add_argument("--autoencoder", type=Path, default=ROOT / "latentdiff" / "assets" / "default.safetensors",
                   help="model file whose frozen autoencoder all candidates share (default: the embedded model's)")
    add_training_budget(p)
    p.add_argument("--num-samples", type=int, default=1000, help="class-caption images generated per evaluation")
    p.add_argument("--samplers", default="ddim:25,euler_a:10",
                   help="comma-separated NAME:STEPS, one evaluation of every candidate each (default: ddim:25,"
                        "euler_a:10: BENCHMARKS.md's DDIM tables and the embedded model's sampler)")
    p.add_argument("--scale", type=float, default=5.0, help="guidance scale")
    p.add_argument("--batch-size", type=int, default=250, help="images per generation batch")
    p.add_argument("--reference", default="none", help="FID reference (.npz from tools/fid.py --save-stats, or "
                   "an image folder or shards; 'none': class accuracy only)")
    p.add_argument("--jobs", type=int, default=1, help="candidates run at the same time")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of each job (OMP_NUM_THREADS)")
    p.add_argument("--device", default="auto", help="device of training and evaluation (auto: cuda if available)")
    return p


def run_candidate(name: str, args, env: dict) -> dict:
    """Train and score one candidate (skipping what an earlier call finished); its summary row."""
    target, gamma = parse_candidate(name)
    folder = args.outdir / name
    folder.mkdir(exist_ok=True)
    row = {"candidate": name, "prediction_type": target, "min_snr_gamma": gamma, "evals": {}}
    model, timing_file = folder / "model.safetensors", folder / "timing.json"
    python = sys.executable
    train = [python, "tools/train.py", "--config", str(args.config), "--outdir", str(folder), "--no-progress",
             "--set", f"data.shards={args.shards}", "--set", f"device={args.device}",
             "--set", f"objective.autoencoder_checkpoint={args.autoencoder}"]
    for item in objective_overrides(target, gamma) + list(args.set):
        train += ["--set", item]
    train += ["--set", f"steps={args.steps}"] if args.steps else ["--max-minutes", str(args.minutes)]
    row["commands"] = [" ".join(train)]
    timing = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    trained = False
    for sampler, steps in args.sampler_list:
        label, evaldir = f"{sampler}{steps}", folder / f"eval_{sampler}{steps}"
        score = [python, "tools/eval_t2i.py", "--ckpt", str(model), "--sampler", sampler, "--steps", str(steps),
                 "--scale", str(args.scale), "--num-samples", str(args.num_samples), "--batch-size",
                 str(args.batch_size), "--reference", args.reference, "--no-clip", "--device", args.device,
                 "--precision", "fp32", "--quiet", "--outdir", str(evaldir)]
        row["commands"].append(" ".join(score))
        if not (evaldir / "results.json").is_file():
            if not trained:  # once per call; a finished run resumes at its end and stops at once
                print(f"-- {name}: training", flush=True)
                status, _ = run_step(train, folder / "train.log", env)
                trained = status == 0
                if status != 0:
                    row["error"] = f"training exited {status} (see {folder}/train.log)"
                    return row
            print(f"-- {name}: generating and scoring with {label}", flush=True)
            shutil.rmtree(evaldir, ignore_errors=True)  # an interrupted evaluation starts over
            status, timing[label] = run_step(score, folder / f"eval_{label}.log", env)
            if status != 0:
                row["error"] = f"the {label} evaluation exited {status} (see {folder}/eval_{label}.log)"
                return row
            timing_file.write_text(json.dumps(timing) + "\n")
        scored = json.loads((evaldir / "results.json").read_text())
        row["evals"][label] = {"fid": scored.get("fid", {}).get("value"),
                               "class_accuracy": scored.get("class_accuracy", {}).get("accuracy"),
                               "seconds": timing.get(label)}
    last = last_record(folder / "log.jsonl")
    row["steps"] = last.get("step")
    row["train_seconds"] = last.get("elapsed_s")  # summed over resumes
    row["final_mse"] = last.get("mse")  # of the candidate's own target: not comparable across targets
    return row


def markdown(rows: list[dict], args) -> str:
    n, labels = args.num_samples, [f"{s}{k}" for s, k in args.sampler_list]
    head = ["candidate", "target", "min-SNR γ", "train steps", "train s"]
    for label in labels:
        head += [f"FID-{n} {label}", f"accuracy {label}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        gamma = r.get("min_snr_gamma")
        cells = [r["candidate"], r["prediction_type"], "–" if gamma is None else f"{gamma:g}",
                 str(r.get("steps", "-")),
                 f"{r['train_seconds']:.0f}" if r.get("train_seconds") is not None else "-"]
        for label in labels:
            e = r["evals"].get(label, {})
            cells += [f"{e['fid']:.1f}" if e.get("fid") is not None else "-",
                      f"{100 * e['class_accuracy']:.1f} %" if e.get("class_accuracy") is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.get("error") for r in rows):
        lines += [""] + [f"- {r['candidate']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [c.strip() for c in args.candidates.split(",") if c.strip()]
    try:
        for name in names:
            parse_candidate(name)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if not names or len(set(names)) != len(names):
        parser.error(f"--candidates {args.candidates!r}: give each candidate once")
    for path in (args.config, args.autoencoder):
        if not path.is_file():
            parser.error(f"no file {path}")
    check_training_budget(parser, args)
    if args.num_samples < 1 or args.jobs < 1 or args.batch_size < 1:
        parser.error("--num-samples, --jobs and --batch-size must be positive")
    try:
        args.sampler_list = parse_samplers(args.samplers)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    from latentdiff.config import load_train_config

    for name in names:  # each candidate's own config (a zero-terminal-SNR --set needs v or x0, say)
        try:
            load_train_config(args.config, objective_overrides(*parse_candidate(name)) + list(args.set))
        except (ValueError, TypeError) as e:
            parser.error(f"{args.config}, candidate {name}: {e}")
    args.outdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda name: run_candidate(name, args, env), names))
    budget = f"{args.steps} steps" if args.steps else f"{args.minutes:g} minutes"
    heading = (f"# Latent diffusion objective ablation\n\nConfig {args.config}, {budget} each, autoencoder "
               f"{args.autoencoder}; {args.num_samples} class-caption images per sampler ({args.samplers}) at "
               f"scale {args.scale:g}, FID against {args.reference}.")
    write_summary(args.outdir, heading, markdown(rows, args), rows)
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
