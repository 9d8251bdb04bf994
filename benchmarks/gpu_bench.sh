#!/usr/bin/env bash
# Side-by-side benchmarks of latentdiff against diffusers on one CUDA GPU (BENCHMARKS.md, "GPU scripts").
# Run from a clone with the package installed (pip install -e .[dev]); works from any current folder.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: benchmarks/gpu_bench.sh [--device DEV] [--only LIST] [--smoke] OUTDIR

Run latentdiff's benchmarks against diffusers (benchmarks/*.py) on one GPU and write every table, JSON result and
log into OUTDIR (created if missing; existing files of the same names are replaced):

  env.txt           GPU (nvidia-smi), driver, Python, torch and diffusers versions, CPU count, git commit
  unet_small.*      benchmarks/bench.py --config small --dtype fp32 --steps 50 --repeats 9
                    (U-Net call with guidance batching + 50-step guided DDIM loop)
  unet_sd15_bf16.*  benchmarks/bench.py --config sd15 --dtype bf16 --batch 1 --steps 50 --repeats 5
  unet_sd15_fp16.*  the same in fp16
  train.*           benchmarks/bench_train.py --config configs/cifar10_ldm_gpu.yaml --batch 256 --repeats 20
                    --warmup 5 (training step against diffusers' train_text_to_image loop)
  vq.*              benchmarks/bench_vq.py --preset small ithq --dtype fp32 fp16 --repeats 2 (VQ-Diffusion sampling)
  vae.*             benchmarks/bench_vae.py --size 512 --dtype fp32, then bf16 (KL autoencoder encode/decode)
  load.*            benchmarks/bench_load.py --repeats 2 (SD 1.5 single-file loading: CPU memory and time;
                    only with --only ... load: it writes a 2 GB file to the temporary folder)
  compile_sd15_bf16.*  benchmarks/bench.py --config sd15 --dtype bf16 --steps 50 --repeats 5 --compile (eager
                    and torch.compile rows, both sides; only with --only ... compile: minutes of compilation)
  tiling.*          benchmarks/bench_tiling.py --size 2048 --dtype bf16 --diffusers (tiled VAE decode: peak memory;
                    only with --only ... tiling)
  train_sd15.*      benchmarks/bench_train.py --preset sd15 --precision bf16 --batch 8, after train_sd15_b16_gc.*:
                    --batch 16 --gradient-checkpointing (the SD 1.5 U-Net's training step against diffusers':
                    samples/s, MFU, memory, data wait; only with --only ... train_sd15; about 4 minutes)
  train_mid.*       benchmarks/bench_train.py --preset mid --precision bf16 --batch 32 (a 223 M-parameter U-Net on
                    32x32x4 latents; only with --only ... train_mid; about 1 minute)
  train_compile_*   train_mid with --compile modules, then --compile step, both sides compiled (only with
                    --only ... train_compile: minutes of compilation)
  attention.*       benchmarks/bench_attention.py (latentdiff's attention op, SDPA against xformers where it is
                    importable, on the SD 1.5 U-Net's attention shapes and one whole U-Net call, fp16 and bf16, batch
                    2 and 16; says which backend auto should pick; only with --only ... attention; about 1 minute)
  gpu_util.log      nvidia-smi dmon samples (5 s) over the whole run, when nvidia-smi exists
  summary.txt       every table above, in order

For each benchmark NAME: NAME.txt (its table), NAME.json (its numbers), NAME.log (progress and errors).
A failing benchmark is reported and the others still run; the exit status is 1 if any failed.

options:
  --device DEV   torch device (default: cuda); cuda must be available unless DEV is cpu
  --only LIST    comma-separated subset of: unet,sd15,train,vq,vae,load,compile,tiling,train_sd15,train_mid,
                 train_compile,attention
                 (default: unet,sd15,train,vq,vae)
  --smoke        tiny models, one repeat, outputs named *_tiny.*: checks the script in minutes, e.g. on a
                 CPU: --smoke --device cpu
  -h, --help     show this help and exit

Environment: PYTHON (default: python, else python3).
Example: benchmarks/gpu_bench.sh results/gpu-bench
EOF
}

SCRIPT=benchmarks/gpu_bench.sh
# shellcheck source=tools/script_common.sh disable=SC2034  # SCRIPT is read by the sourced file
source "$(dirname "${BASH_SOURCE[0]}")/../tools/script_common.sh"

DEVICE=cuda
ONLY=unet,sd15,train,vq,vae
SMOKE=0
OUTDIR=
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --device) [ $# -ge 2 ] || die "--device needs a value"; DEVICE=$2; shift 2 ;;
        --device=*) DEVICE=${1#*=}; shift ;;
        --only) [ $# -ge 2 ] || die "--only needs a value"; ONLY=$2; shift 2 ;;
        --only=*) ONLY=${1#*=}; shift ;;
        --smoke) SMOKE=1; shift ;;
        --) shift; [ $# -eq 1 ] || die "expected exactly one OUTDIR after --"; OUTDIR=$1; shift ;;
        -*) die "unknown option $1" ;;
        *) [ -z "$OUTDIR" ] || die "more than one OUTDIR: '$OUTDIR' and '$1'"; OUTDIR=$1; shift ;;
    esac
done
[ -n "$OUTDIR" ] || die "missing OUTDIR (the folder the results go to)"
for name in ${ONLY//,/ }; do
    case $name in
        unet|sd15|train|vq|vae|load|compile|tiling|train_sd15|train_mid|train_compile|attention) ;;
        *) die "--only: unknown benchmark '$name' (unet, sd15, train, vq, vae, load, compile, tiling, train_sd15, train_mid, train_compile, attention)" ;;
    esac
done
want() { [[ ",$ONLY," == *",$1,"* ]]; }

prepare_run "$DEVICE"

MONITOR=
if command -v nvidia-smi >/dev/null && [ "$DEVICE" != cpu ]; then
    nvidia-smi dmon -s um -d 5 > "$OUTDIR/gpu_util.log" 2>&1 &
    MONITOR=$!
fi
cleanup() { if [ -n "$MONITOR" ]; then kill "$MONITOR" 2>/dev/null || true; fi; }
trap cleanup EXIT

FAILED=()
bench() {  # bench NAME SCRIPT [ARGS...]: stdout -> NAME.txt, stderr -> NAME.log, JSON -> NAME.json
    local name=$1
    shift
    echo "== $name: $PYTHON $*" | tee "$OUTDIR/$name.log"
    local start=$SECONDS
    if "$PYTHON" "$@" --json "$OUTDIR/$name.json" > "$OUTDIR/$name.txt" 2>> "$OUTDIR/$name.log"; then
        cat "$OUTDIR/$name.txt"
        echo "== $name: done in $((SECONDS - start)) s"
    else
        tail -n 20 "$OUTDIR/$name.log"
        echo "== $name: FAILED after $((SECONDS - start)) s (see $OUTDIR/$name.log)"
        FAILED+=("$name")
    fi
}

D=(--device "$DEVICE")
if [ "$SMOKE" = 1 ]; then
    want unet && bench unet_tiny benchmarks/bench.py --config tiny "${D[@]}" --dtype fp32 --steps 2 --repeats 1 --warmup 0
    want sd15 && bench unet_tiny_bf16 benchmarks/bench.py --config tiny "${D[@]}" --dtype bf16 --steps 0 --repeats 1 --warmup 0
    want train && bench train_tiny benchmarks/bench_train.py --config configs/train_tiny_ldm.yaml "${D[@]}" --batch 4 \
        --repeats 1 --warmup 0
    want vq && bench vq_tiny benchmarks/bench_vq.py --preset tiny "${D[@]}" --dtype fp32 --repeats 1 --skip 4
    want vae && bench vae_tiny benchmarks/bench_vae.py --config tiny --size 32 "${D[@]}" --dtype fp32 --repeats 1 --warmup 0
    want load && bench load_tiny benchmarks/bench_load.py --size tiny --repeats 1
    want compile && bench compile_tiny benchmarks/bench.py --config tiny "${D[@]}" --dtype fp32 --steps 2 --repeats 1 \
        --warmup 0 --compile
    want tiling && bench tiling_tiny benchmarks/bench_tiling.py --config tiny --size 64 --tile 32 "${D[@]}"
    T=(benchmarks/bench_train.py --preset tiny "${D[@]}" --repeats 1 --warmup 0 --workers 0)
    want train_sd15 && bench train_sd15_tiny "${T[@]}" --gradient-checkpointing
    want train_mid && bench train_mid_tiny "${T[@]}" --channels-last
    want train_compile && bench train_compile_tiny "${T[@]}" --compile modules
    want attention && bench attention_tiny benchmarks/bench_attention.py "${D[@]}" --side 8 --batch 2 \
        --set unet.model_channels=32 --repeats 2 --warmup 1
else
    want unet && bench unet_small benchmarks/bench.py --config small "${D[@]}" --dtype fp32 --steps 50 --repeats 9
    if want sd15; then
        bench unet_sd15_bf16 benchmarks/bench.py --config sd15 "${D[@]}" --dtype bf16 --batch 1 --steps 50 --repeats 5
        bench unet_sd15_fp16 benchmarks/bench.py --config sd15 "${D[@]}" --dtype fp16 --batch 1 --steps 50 --repeats 5
    fi
    want train && bench train benchmarks/bench_train.py --config configs/cifar10_ldm_gpu.yaml "${D[@]}" --batch 256 \
        --repeats 20 --warmup 5
    want vq && bench vq benchmarks/bench_vq.py --preset small ithq "${D[@]}" --dtype fp32 fp16 --repeats 2
    if want vae; then
        bench vae benchmarks/bench_vae.py --size 512 "${D[@]}" --dtype fp32 --repeats 5
        bench vae_bf16 benchmarks/bench_vae.py --size 512 "${D[@]}" --dtype bf16 --repeats 5
    fi
    want load && bench load benchmarks/bench_load.py --repeats 2
    want compile && bench compile_sd15_bf16 benchmarks/bench.py --config sd15 "${D[@]}" --dtype bf16 --batch 1 \
        --steps 50 --repeats 5 --compile
    want tiling && bench tiling benchmarks/bench_tiling.py --size 2048 "${D[@]}" --dtype bf16 --diffusers
    T=(benchmarks/bench_train.py "${D[@]}" --precision bf16 --repeats 5 --steps-per-repeat 4 --warmup 3 --workers 2)
    if want train_sd15; then
        bench train_sd15_b16_gc "${T[@]}" --preset sd15 --batch 16 --gradient-checkpointing
        bench train_sd15 "${T[@]}" --preset sd15 --batch 8  # both models resident: about 35 GB before activations
    fi
    want train_mid && bench train_mid "${T[@]}" --preset mid --batch 32
    if want train_compile; then
        bench train_compile_modules "${T[@]}" --preset mid --batch 32 --compile modules
        bench train_compile_step "${T[@]}" --preset mid --batch 32 --compile step
    fi
    want attention && bench attention benchmarks/bench_attention.py "${D[@]}"
fi

: > "$OUTDIR/summary.txt"
for f in "$OUTDIR"/*.txt; do
    case $f in */env.txt|*/summary.txt) continue ;; esac
    { echo "== $(basename "$f" .txt)"; cat "$f"; echo; } >> "$OUTDIR/summary.txt"
done
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu_bench.sh: failed: ${FAILED[*]} (results of the others in $OUTDIR)" >&2
    exit 1
fi
echo "gpu_bench.sh: all done; results in $OUTDIR"
