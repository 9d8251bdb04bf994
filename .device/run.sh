#!/usr/bin/env bash
# Mechanics of this project's remote GPU lending, not for users. Users run the GPU scripts directly on their own
# machine (BENCHMARKS.md, "GPU scripts"); this wraps one of them for a lent machine, which starts bare, reaches no
# network and returns at most 8 files of <= 16 MiB per call:
#   1. installs the wheels carried in .whl/ (if any) into /tmp/site  (the package's requirements are not there)
#   2. unpacks the training shards carried as .device/cifar10-train-shards.tar.gz into data/ (if present)
#   3. runs SCRIPT with its ARGS and the results folder RESULTS (default: .device/results, relative to the checkout)
#   4. cuts RESULTS into 15 MiB parts and copies the first batch to $OUT (.device/ship.py); later calls, while the
#      machine is warm, fetch the rest with `python3 .device/ship.py send RESULTS.parts "$OUT"`
#
# Prepared here, from the repository root (the ignored paths then travel with `carry`):
#   tar czf .device/cifar10-train-shards.tar.gz -C data cifar10-train-shards     # ~19 MB (the shards: 172 MB)
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 \
#       webdataset==1.0.2 braceexpand ftfy wcwidth pytorch-fid==0.3.0 diffusers==0.42.1 importlib_metadata
# The checkout plus what is carried must stay under 64 MiB: leave a model file out of the checkout if needed.
# A device call:  carry [".whl", ".device/cifar10-train-shards.tar.gz"],
#   command "bash .device/run.sh benchmarks/gpu_bench.sh"   (or tools/train_default_models.sh --streams finetune,
#   tools/evaluate_default_models.sh --num-samples 5000, ...), then back here:
#   python3 .device/ship.py join FETCHED_FOLDER device-results
# CPU rehearsal: OUT=$(mktemp -d) RESULTS=$(mktemp -d)/r bash .device/run.sh benchmarks/gpu_bench.sh --smoke --device cpu
set -euo pipefail

USAGE="usage: [OUT=DIR] [RESULTS=DIR] bash .device/run.sh SCRIPT [ARGS...]"
if [ $# -lt 1 ]; then echo "$USAGE" >&2; exit 2; fi
if [ "$1" = -h ] || [ "$1" = --help ]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    echo "$USAGE"
    exit 0
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${OUT:?OUT must name the folder whose files come back}"
RESULTS=${RESULTS:-.device/results}
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the package, from this checkout (not pip-installed there)
command -v python >/dev/null || export PYTHON=python3
if [ -f .device/cifar10-train-shards.tar.gz ] && [ ! -f data/cifar10-train-shards/manifest.json ]; then
    mkdir -p data && tar xzf .device/cifar10-train-shards.tar.gz -C data
fi

status=0
bash "$@" "$RESULTS" || status=$?
echo "$1: exit $status"
python3 .device/ship.py prepare "$RESULTS" "$RESULTS.parts"
python3 .device/ship.py send "$RESULTS.parts" "$OUT"
exit $status
