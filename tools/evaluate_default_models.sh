#!/usr/bin/env bash
# Evaluate text-to-image models on CIFAR-10 class captions with the project's own tools (a CUDA GPU by default).
# Run from a clone with the package installed (pip install -e .); works from any current folder.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: tools/evaluate_default_models.sh [options] OUTDIR

Generate and score images of text-to-image models from the CIFAR-10 class captions ("a photo of a {class}";
image i: class i mod 10, seed i), as BENCHMARKS.md's quality tables were made:

  eval_<model>/    tools/eval_t2i.py per --ckpt model: images/, results.json, results.md (class accuracy of the
                   embedded CIFAR-10 classifier; FID when --reference is given and Inception weights are found)
  sweep_<model>/   tools/sampler_sweep.py per --sweep-ckpt model (latent diffusion only): every sampler (ddpm,
                   ddim, dpmpp_2m, euler_a) at each of --sweep-steps, --sweep-samples images each; table and plot
  <name>.log       each command's output;  env.txt  GPU, versions, commit;  summary.md  every results.md row

<model> is a name made from the model argument (default, default-vq, or the file's last two path parts); an
eval_<model>/ or sweep_<model>/ folder already in OUTDIR is replaced.
Without --reference no FID is computed; compute it afterwards, on any machine with the Inception weights:
  python tools/fid.py OUTDIR/eval_default/images data/cifar10-test-inception.npz
The exit status is 1 when an evaluation fails (the others still run).

options:
  --ckpt MODEL           evaluate MODEL with tools/eval_t2i.py (repeatable): default, default-vq (the embedded
                         models) or a model file; default: default and default-vq
  --sweep-ckpt MODEL     run tools/sampler_sweep.py on MODEL (repeatable; latent-diffusion models only);
                         default: default
  --runs DIR             also evaluate what tools/train_default_models.sh wrote to DIR: DIR/cifar10_ldm,
                         DIR/cifar10_vq_diffusion and DIR/finetune's model-fp16.safetensors, those present
                         (the latent-diffusion ones are swept too)
  --num-samples N        images per eval_t2i model (default: 10000; 0: no eval_t2i, the sweeps only)
  --sweep-samples N      images per sampler and step count (default: 1000; 0: no sweep)
  --sweep-steps "S ..."  step counts of the sweep (default: "10 25 50")
  --steps N              eval_t2i's sampling steps (default: 25)
  --batch-size N         images per generation batch (default: 1000)
  --reference REF        FID reference: the CIFAR-10 test statistics (.npz from tools/fid.py --save-stats), an
                         image folder or shards (default: none: no FID)
  --inception-weights F  Inception weights file for FID (default: tools/fid.py's own search)
  --classifier F         the CIFAR-10 classifier that scores class accuracy (tools/train_classifier.py's output;
                         default: the embedded judge), e.g. an older judge to compare with old tables
  --clip                 also compute the CLIP score (needs local open_clip weights; default: off)
  --device DEV           default: cuda (must be available unless DEV is cpu)
  --precision P          fp32, bf16 or fp16 (default: fp32)
  --smoke                a check of this script in minutes (with --device cpu): 20 images per model, a sweep of 2
                         samplers x 1 step count with 10 images, 5 steps
  -h, --help             show this help and exit

Environment: PYTHON (default: python, else python3).
Examples:
  tools/evaluate_default_models.sh results/eval
  tools/evaluate_default_models.sh --runs runs/gpu --ckpt default --reference data/cifar10-test-inception.npz results/eval
EOF
}

SCRIPT=tools/evaluate_default_models.sh
# shellcheck source=tools/script_common.sh disable=SC2034  # SCRIPT is read by the sourced file
source "$(dirname "${BASH_SOURCE[0]}")/script_common.sh"
model_path() { case $1 in default|default-vq) echo "$1" ;; *) abspath "$1" ;; esac; }
positive() { [[ $2 =~ ^[0-9]+$ ]] || die "$1 must be a whole number, got '$2'"; }

CKPTS=()
SWEEPS=()
CKPT_SET=0
SWEEP_SET=0
RUNS=
NUM=10000
SWEEP_NUM=1000
SWEEP_STEPS="10 25 50"
STEPS=25
BATCH=1000
REFERENCE=none
INCEPTION=
CLASSIFIER=
CLIP=0
DEVICE=cuda
PRECISION=fp32
SMOKE=0
OUTDIR=
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --ckpt) need "$1" $#; CKPTS+=("$(model_path "$2")"); CKPT_SET=1; shift 2 ;;
        --sweep-ckpt) need "$1" $#; SWEEPS+=("$(model_path "$2")"); SWEEP_SET=1; shift 2 ;;
        --runs) need "$1" $#; RUNS=$(model_path "$2"); shift 2 ;;
        --num-samples) need "$1" $#; positive "$1" "$2"; NUM=$2; shift 2 ;;
        --sweep-samples) need "$1" $#; positive "$1" "$2"; SWEEP_NUM=$2; shift 2 ;;
        --sweep-steps) need "$1" $#; SWEEP_STEPS=$2; shift 2 ;;
        --steps) need "$1" $#; positive "$1" "$2"; STEPS=$2; shift 2 ;;
        --batch-size) need "$1" $#; positive "$1" "$2"; BATCH=$2; shift 2 ;;
        --reference) need "$1" $#; REFERENCE=$2; shift 2 ;;
        --inception-weights) need "$1" $#; INCEPTION=$(model_path "$2"); shift 2 ;;
        --classifier) need "$1" $#; CLASSIFIER=$(abspath "$2"); shift 2 ;;
        --clip) CLIP=1; shift ;;
        --device) need "$1" $#; DEVICE=$2; shift 2 ;;
        --precision) need "$1" $#; PRECISION=$2; shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        --) shift; [ $# -eq 1 ] || die "expected exactly one OUTDIR after --"; OUTDIR=$1; shift ;;
        -*) die "unknown option $1" ;;
        *) [ -z "$OUTDIR" ] || die "more than one OUTDIR: '$OUTDIR' and '$1'"; OUTDIR=$1; shift ;;
    esac
done
[ -n "$OUTDIR" ] || die "missing OUTDIR (the folder the results go to)"
case $PRECISION in fp32|bf16|fp16) ;; *) die "--precision must be fp32, bf16 or fp16, got '$PRECISION'" ;; esac
for s in $SWEEP_STEPS; do positive --sweep-steps "$s"; done
[ "$REFERENCE" = none ] || REFERENCE=$(model_path "$REFERENCE")
[ "$REFERENCE" = none ] || [ -e "$REFERENCE" ] || die "--reference: $REFERENCE does not exist"
[ -z "$INCEPTION" ] || [ -f "$INCEPTION" ] || die "--inception-weights: no file $INCEPTION"
[ -z "$CLASSIFIER" ] || [ -f "$CLASSIFIER" ] || die "--classifier: no file $CLASSIFIER"
[ "$CKPT_SET" = 1 ] || CKPTS=(default default-vq)
[ "$SWEEP_SET" = 1 ] || SWEEPS=(default)
if [ -n "$RUNS" ]; then
    [ -d "$RUNS" ] || die "--runs: no folder $RUNS"
    found=0
    for run in cifar10_ldm finetune cifar10_vq_diffusion; do
        f=$RUNS/$run/model-fp16.safetensors
        [ -f "$f" ] || continue
        found=1
        CKPTS+=("$f")
        [ "$run" = cifar10_vq_diffusion ] || SWEEPS+=("$f")
    done
    [ $found = 1 ] || die "--runs: no $RUNS/{cifar10_ldm,finetune,cifar10_vq_diffusion}/model-fp16.safetensors"
fi
for m in ${CKPTS[@]+"${CKPTS[@]}"} ${SWEEPS[@]+"${SWEEPS[@]}"}; do
    case $m in default|default-vq) ;; *) [ -e "$m" ] || die "no model $m" ;; esac
done
if [ "$SMOKE" = 1 ]; then
    NUM=20; SWEEP_NUM=10; SWEEP_STEPS=5; STEPS=5; BATCH=10
fi
[ "$SWEEP_NUM" -gt 0 ] || SWEEPS=()
[ "$NUM" -gt 0 ] || CKPTS=()
[ $(( ${#CKPTS[@]} + ${#SWEEPS[@]} )) -gt 0 ] || die "nothing to run (--num-samples 0 and no sweep)"

prepare_run "$DEVICE"

label() {  # a folder name for a model argument
    case $1 in
        default|default-vq) echo "$1" ;;
        *) local d b
           d=$(basename "$(dirname "$1")")
           b=$(basename "$1")
           echo "${d}_${b%.safetensors}" ;;
    esac
}

COMMON=(--captions cifar10 --batch-size "$BATCH" --reference "$REFERENCE" --device "$DEVICE" --precision "$PRECISION"
        --quiet)
[ -z "$INCEPTION" ] || COMMON+=(--inception-weights "$INCEPTION")
[ -z "$CLASSIFIER" ] || COMMON+=(--classifier "$CLASSIFIER")
SMOKE_SAMPLERS=()
[ "$SMOKE" = 0 ] || SMOKE_SAMPLERS=(--samplers ddim euler_a)
CLIP_ARGS=(--no-clip)
[ "$CLIP" = 0 ] || CLIP_ARGS=()
FAILED=()
evaluate() {  # evaluate NAME COMMAND...: output -> NAME.log
    local name=$1
    shift
    echo "== $name: $*" | tee "$OUTDIR/$name.log"
    local start=$SECONDS
    if "$@" >> "$OUTDIR/$name.log" 2>&1; then
        echo "== $name: done in $((SECONDS - start)) s"
    else
        tail -n 20 "$OUTDIR/$name.log"
        echo "== $name: FAILED after $((SECONDS - start)) s (see $OUTDIR/$name.log)"
        FAILED+=("$name")
    fi
}

for m in ${SWEEPS[@]+"${SWEEPS[@]}"}; do
    name=sweep_$(label "$m")
    rm -rf "${OUTDIR:?}/$name"  # sampler_sweep.py needs empty image folders
    # shellcheck disable=SC2086  # SWEEP_STEPS is a list of numbers
    evaluate "$name" "$PYTHON" tools/sampler_sweep.py --ckpt "$m" --steps $SWEEP_STEPS --num-samples "$SWEEP_NUM" \
        ${SMOKE_SAMPLERS[@]+"${SMOKE_SAMPLERS[@]}"} "${COMMON[@]}" --outdir "$OUTDIR/$name"
done
for m in ${CKPTS[@]+"${CKPTS[@]}"}; do
    name=eval_$(label "$m")
    rm -rf "${OUTDIR:?}/$name"  # eval_t2i.py refuses an images/ folder that already holds images
    evaluate "$name" "$PYTHON" tools/eval_t2i.py --ckpt "$m" --steps "$STEPS" --num-samples "$NUM" "${COMMON[@]}" \
        "${CLIP_ARGS[@]}" --outdir "$OUTDIR/$name"
done

{
    echo "# Evaluation ($(date -u +%Y-%m-%d), $(grep '^gpu' "$OUTDIR/env.txt" || echo "gpu unknown"))"
    for f in "$OUTDIR"/eval_*/results.md "$OUTDIR"/sweep_*/*.md; do
        [ -f "$f" ] || continue
        echo
        echo "## ${f#"$OUTDIR"/}"
        cat "$f"
    done
} > "$OUTDIR/summary.md"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "evaluate_default_models.sh: failed: ${FAILED[*]} (results of the others in $OUTDIR)" >&2
    exit 1
fi
echo "evaluate_default_models.sh: all done; results in $OUTDIR (summary.md)"
