"""Train a latentdiff model (KL autoencoder, latent diffusion, ...) from a YAML training config.

One loop for every model kind; ``objective.type`` in the config picks what is trained. Outputs in ``--outdir``:
``config.yaml`` (resolved), ``log.jsonl`` + ``loss.png``, ``samples/step_*.png``, ``checkpoints/step_*.pt`` (the
last ``keep_checkpoints``) and, at the end, ``model.safetensors`` (EMA weights when enabled), readable by
``latentdiff.load_pipeline`` (latent diffusion) or usable as ``objective.autoencoder_checkpoint`` (autoencoder).

Examples (CIFAR-10 recipe: first the autoencoder, then the latent diffusion model on its latents):

    latentdiff make-shards PATH/TO/cifar10-train.tar.gz data/cifar10-train-shards
    latentdiff train --config configs/cifar10_autoencoder.yaml --outdir runs/cifar10_autoencoder
    latentdiff train --config configs/cifar10_ldm.yaml --outdir runs/cifar10_ldm \\
        --set objective.autoencoder_checkpoint=runs/cifar10_autoencoder/model.safetensors   # (the default)

    # override any config value with dotted keys; stop early (the LR schedule still spans `steps`)
    latentdiff train --config configs/cifar10_ldm.yaml --set optim.lr=2e-4 --set data.batch_size=64 --max-steps 100

    # stop cleanly after a wall-clock budget (a scheduler's time limit): checkpoint + export, exit 0
    latentdiff train --config configs/cifar10_ldm.yaml --max-minutes 50

    # resume: `auto` (default) continues from the newest complete checkpoint in --outdir after any kill
    latentdiff train --config configs/cifar10_ldm.yaml --outdir runs/cifar10_ldm --resume auto

Several processes (DistributedDataParallel; NCCL on GPUs, gloo on CPUs), per-rank batch ``data.batch_size``:

    torchrun --nproc_per_node 4 tools/train.py --config configs/cifar10_ldm.yaml --outdir runs/ldm4

    # sharded (FSDP2): weights, gradients and optimizer state split across the ranks; .dcp checkpoint folders
    torchrun --nproc_per_node 4 tools/train.py --config configs/cifar10_ldm.yaml --outdir runs/ldm4 \\
        --set distributed.strategy=fsdp

    # two machines, run on each (node_rank 0 and 1); --outdir must be on storage shared by both
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST0 --master_port 29500 \\
        tools/train.py --config configs/cifar10_ldm.yaml --outdir /shared/runs/ldm16

Exit status: 0 done, 1 training diverged (NaN/inf loss or gradients; nothing broken was saved), 2 bad input.
"""

import sys
from pathlib import Path

from latentdiff.cli.common import NON_NEGATIVE, POSITIVE_FLOAT, ArgumentParser, fail


def build_parser(prog: str | None = None) -> ArgumentParser:
    parser = ArgumentParser(__doc__, prog=prog)
    parser.add_argument("--config", required=True, help="training config YAML (configs/train_*.yaml, "
                                                         "configs/cifar10_*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted key, e.g. optim.lr=3e-4 (repeatable)")
    parser.add_argument("--outdir", default=None, help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", default="auto", help="'auto' (newest complete checkpoint in --outdir, if "
                                                        "any), 'none' (fresh run) or a checkpoint path")
    parser.add_argument("--max-steps", type=NON_NEGATIVE, default=None, help="stop after this optimizer step "
                                                                   "(default: the config's steps)")
    parser.add_argument("--max-minutes", type=POSITIVE_FLOAT, default=None, help="wall-clock budget of the training "
                        "loop: after the step that passes it, log, sample, checkpoint and export, then exit 0 "
                        "(the LR schedule still spans the config's steps; default: none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.max_steps is not None and args.max_steps < 0:
        fail(f"--max-steps {args.max_steps} must be >= 0")
    if args.max_minutes is not None and not args.max_minutes > 0:
        fail(f"--max-minutes {args.max_minutes} must be > 0")

    from latentdiff.config import load_train_config
    from latentdiff.data.stats import DataError
    from latentdiff.io.checkpoint import CheckpointError
    from latentdiff.training.distributed import init_distributed
    from latentdiff.training.trainer import NonFiniteError, Trainer

    try:
        cfg = load_train_config(args.config, args.overrides)
    except ValueError as e:
        fail(str(e))
    if not cfg.data.shards:
        fail("data.shards is empty: set it in the config or with --set data.shards=PATH")
    outdir = Path(args.outdir) if args.outdir else Path("runs") / Path(args.config).stem
    dist = None
    try:
        dist = init_distributed(cfg.device)
        trainer = Trainer(cfg, outdir, dist, resume=args.resume, max_steps=args.max_steps,
                          progress=not args.no_progress, max_minutes=args.max_minutes)
        if trainer.resumed_from is not None and dist.is_main:
            print(f"resumed from {trainer.resumed_from} (step {trainer.step})", file=sys.stderr)
        record = trainer.run()
    except (ValueError, CheckpointError) as e:
        fail(str(e))
    except DataError as e:
        fail(f"data: {e}", code=1)
    except NonFiniteError as e:
        fail(f"{e}. Training stopped before the update; the newest complete checkpoint in {outdir / 'checkpoints'} "
             f"is intact. Try a lower optim.lr, optim.grad_clip, more warmup or precision=fp32.", code=1)
    finally:
        if dist is not None:
            dist.close()
    if trainer.dist.is_main:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k.startswith("loss"))
        why = f" (--max-minutes {args.max_minutes:g} reached)" if trainer.stopped_by_time else ""
        print(f"done: step {trainer.step}{why}, {summary}; model: {outdir / 'model.safetensors'}", file=sys.stderr)
    return 0
