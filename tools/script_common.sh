# shellcheck shell=bash
# Shared plumbing of the GPU scripts (tools/train_default_models.sh, tools/evaluate_default_models.sh,
# benchmarks/gpu_bench.sh); sourced, not run. The sourcing script sets SCRIPT (its path from the repository root)
# before sourcing, and calls prepare_run once its arguments are checked.

die() { echo "$(basename "$SCRIPT"): error: $1" >&2; echo "run '$SCRIPT --help' for usage" >&2; exit 2; }
need() { [ "$2" -ge 2 ] || die "$1 needs a value"; }  # need FLAG $#: FLAG must be followed by a value
abspath() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)  # the repository root

# prepare_run DEVICE: find python (PYTHON, else python, else python3), refuse a cuda DEVICE without CUDA, create
# OUTDIR and make it absolute, cd to the repository root, and write OUTDIR/env.txt (date, commit, CPUs, versions,
# GPU; plus any lines given in ENV_LINES) and show it.
prepare_run() {
    PYTHON=${PYTHON:-$(command -v python || command -v python3 || true)}
    [ -n "$PYTHON" ] || die "no python found (set PYTHON)"
    if [ "${1%%:*}" = cuda ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        die "--device $1: CUDA is not available here (for a check of this script: --smoke --device cpu)"
    fi
    mkdir -p "$OUTDIR"
    OUTDIR=$(cd "$OUTDIR" && pwd)
    cd "$ROOT" || exit 2
    export PYTHONUNBUFFERED=1
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
        echo "cpus: $(nproc 2>/dev/null || echo unknown)"
        [ -z "${ENV_LINES:-}" ] || echo "$ENV_LINES"
        "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0]); \
print('torch', torch.__version__, 'cuda', torch.version.cuda); \
print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
        "$PYTHON" -c "import diffusers; print('diffusers', diffusers.__version__)" 2>/dev/null || true
        if command -v nvidia-smi >/dev/null; then nvidia-smi; fi
    } > "$OUTDIR/env.txt" 2>&1 || true
    cat "$OUTDIR/env.txt"
}
