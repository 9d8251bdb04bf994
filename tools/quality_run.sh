#!/usr/bin/env bash
# One GPU run for issue #17 (image quality): the CIFAR-10 test statistics, a stronger judge, the autoencoders'
# reconstruction floor, new default models from scratch, and FID-10k / class accuracy of the old and new models.
# Run from a clone with the package installed (pip install -e .); works from any current folder.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: tools/quality_run.sh [options] OUTDIR

Make and judge new CIFAR-10 default models in one run (a CUDA GPU by default), stage after stage; a failed stage
is reported and the stages that do not need its output still run. Stages (--skip any of them):

  stats     tools/fid.py --save-stats TEST OUTDIR/cifar10-test-inception.npz (the FID reference; not run when
            --reference gives one)
  judge     tools/train_classifier.py --preset airbench94 --half on the training shards, scored on the test
            shards -> OUTDIR/judge/cifar10_classifier.safetensors (its test accuracy and the embedded judge's in
            summary.md)
  percept   the VQ decoder fine-tune's perceptual network: tools/train_classifier.py --preset airbench94 --seed 1
            (not the judge's seed 0) on the training shards -> OUTDIR/percept/classifier.safetensors, given to the
            train stage as tools/train_default_models.sh --perceptual-classifier (as v1.4 of the embedded VQ model
            was made; sized as the judge by --judge-epochs and --smoke); without it (--skip percept and no such
            file from an earlier run) no perceptual term; run only with the train stage and the discrete stream
  rfid-old  tools/rfid.py default default-vq: rFID, PSNR and codebook use of the embedded autoencoders on TEST
            (those of --streams: continuous -> default, discrete -> default-vq) -> OUTDIR/rfid/embedded.json, .md
  train     tools/train_default_models.sh --streams STREAMS (side by side) -> OUTDIR/runs/ (model-fp16.safetensors
            of each stream; the training checkpoints are deleted once it succeeded, unless --keep-checkpoints)
  rfid-new  tools/rfid.py on the new autoencoders (OUTDIR/runs/cifar10_autoencoder, cifar10_vqvae)
            -> OUTDIR/rfid/new.json and .md
  eval      tools/eval_t2i.py on the class captions for the old (default, default-vq) and new models of --streams,
            --num-samples images each, judged by the new classifier when OUTDIR/judge has one (then also re-scored by
            the embedded one) -> OUTDIR/eval_<model>/; latent-diffusion models with Euler ancestral (the embedded
            model's sampler; DDIM fails an epsilon model trained for minutes: BENCHMARKS.md, "Diffusion
            objective"; the new one also with the embedded model's guidance scale and interval when it has one,
            eval_new_default_guided/), VQ-Diffusion models with both samplers, the reverse chain (vq) and purity
            sampling (vq_purity, eval_<model>_purity/)

Before the stages, missing shards are made with tools/make_shards.py (--shards from --train-source, --test-shards
from --test-source; outside OUTDIR, so that OUTDIR stays small enough to copy back). OUTDIR/summary.md holds
every stage's status and wall time, the judge's accuracy, the rFID tables and the old-vs-new table (FID-10k,
class accuracy by the new and the old judge, file size) with the shipping rule of issue #17 applied: a new model
ships only when it beats the old one on both FID and class accuracy (by the new judge when there is one) and its
packed file is at most 40 MB (a new model with each of its settings against the old one with its own; one that
wins with purity sampling or the embedded model's guidance ships repacked with them as its defaults, and the old
VQ-Diffusion model is repacked with purity sampling when that beats its own sampler). Nothing is copied into
latentdiff/assets: summary.md prints the commands that would.
Also written: OUTDIR/<stage>.log (each stage's output), OUTDIR/env.txt. Run the same command again with --skip
for the stages done (their outputs in OUTDIR are reused): e.g. a second call on a machine with a time limit.
The exit status is 1 when a stage failed (the others still ran), 2 for bad arguments (before any work).

options:
  --train-source PATH     cifar10-train.tar.gz (or a folder train/<class>/*.jpg); needed only when --shards
                          has no manifest.json yet
  --test-source PATH      cifar10-test.tar.gz (or a folder); the real images of stats and rfid (else the test
                          shards), and the source of --test-shards when they have no manifest.json yet
  --shards DIR            CIFAR-10 training shards (default: data/cifar10-train-shards in the repository)
  --test-shards DIR       CIFAR-10 test shards (default: data/cifar10-test-shards in the repository)
  --reference NPZ         the test set's Inception statistics (from tools/fid.py --save-stats); skips stats
  --no-fid                no Inception network at all (for a machine without its weights): no stats, rfid
                          with --no-fid (PSNR, codebook use), eval without FID; summary.md then lists the
                          commands that compute every FID afterwards on another machine
  --inception-weights F   Inception weights file for FID (default: tools/fid.py's own search)
  --streams LIST          the models made and compared: continuous, discrete (default: continuous,discrete)
  --ae-minutes M          each autoencoder's training budget (default: 1.5)
  --diffusion-minutes M   each diffusion model's training budget (default: 4)
  --decoder-minutes M     each decoder fine-tune's budget, beside the diffusion model (tools/train_default_models.sh;
                          default: the --diffusion-minutes; 0: none)
  --ae-config FILE        passed to tools/train_default_models.sh (default: its own)
  --ldm-config FILE       likewise, e.g. an ablation's config
  --vqvae-config FILE     likewise
  --vqd-config FILE       likewise
  --set KEY=VALUE         passed to every tools/train.py call of the train stage (repeatable)
  --keep-checkpoints      keep the training checkpoints (default: deleted after a successful train stage)
  --slim                  also delete the diffusion runs' float32 model.safetensors once packed (model-fp16 and the
                          autoencoders' files stay): a smaller OUTDIR to copy back from a remote machine
  --judge-epochs E        the judge's epochs (default: airbench94's own, 9.9)
  --num-samples N         images per model in eval (default: 10000; FID-10k needs 10000)
  --steps N               eval's sampling steps, all models (default: a latent-diffusion model's own, 10 for the
                          embedded one; 25 for VQ-Diffusion models, as BENCHMARKS.md's tables)
  --batch-size N          eval's images per generation batch (default: 1000)
  --precision P           eval's precision: fp32, bf16 or fp16 (default: fp32, as BENCHMARKS.md's tables)
  --skip LIST             comma-separated stages not to run: stats, judge, percept, rfid-old, train, rfid-new,
                          eval
  --device DEV            default: cuda (must be available unless DEV is cpu)
  --smoke                 a check of this script in minutes (with --device cpu): tiny training configs
                          (tools/train_default_models.sh --smoke), a tiny judge on 200 images, rfid and eval
                          on 20 images, 5 steps
  -h, --help              show this help and exit

Environment: PYTHON (default: python, else python3).
Examples:
  tools/quality_run.sh --train-source PATH/cifar10-train.tar.gz --test-source PATH/cifar10-test.tar.gz runs/quality
  tools/quality_run.sh --test-source PATH/cifar10-test.tar.gz --skip stats,judge,rfid-old,train runs/quality
  tools/quality_run.sh --smoke --device cpu --train-source PATH/cifar10-train.tar.gz \
      --test-source PATH/cifar10-test.tar.gz runs/quality-check
EOF
}

SCRIPT=tools/quality_run.sh
# shellcheck source=tools/script_common.sh disable=SC2034  # SCRIPT is read by the sourced file
source "$(dirname "${BASH_SOURCE[0]}")/script_common.sh"
whole() { [[ $2 =~ ^0*[1-9][0-9]*$ ]] || die "$1 must be a positive whole number, got '$2'"; }
minutes() { [[ $2 =~ ^[0-9]+([.][0-9]+)?$ && $2 =~ [1-9] ]] || die "$1 must be a positive number, got '$2'"; }

STAGES="stats judge percept rfid-old train rfid-new eval"
TRAIN_SOURCE=
TEST_SOURCE=
SHARDS=$ROOT/data/cifar10-train-shards
TEST_SHARDS=$ROOT/data/cifar10-test-shards
REFERENCE=
NO_FID=0
INCEPTION=
STREAMS=continuous,discrete
AE_MINUTES=1.5
DIFFUSION_MINUTES=4
DECODER_MINUTES=
TRAIN_ARGS=()  # config choices and --set overrides for tools/train_default_models.sh
KEEP_CHECKPOINTS=0
SLIM=0
JUDGE_EPOCHS=
NUM=10000
STEPS=  # empty: each model's own (latent diffusion), 25 (VQ-Diffusion)
BATCH=1000
PRECISION=fp32
SKIP=
DEVICE=cuda
SMOKE=0
OUTDIR=
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --train-source) need "$1" $#; TRAIN_SOURCE=$(abspath "$2"); shift 2 ;;
        --test-source) need "$1" $#; TEST_SOURCE=$(abspath "$2"); shift 2 ;;
        --shards) need "$1" $#; SHARDS=$(abspath "$2"); shift 2 ;;
        --test-shards) need "$1" $#; TEST_SHARDS=$(abspath "$2"); shift 2 ;;
        --reference) need "$1" $#; REFERENCE=$(abspath "$2"); shift 2 ;;
        --no-fid) NO_FID=1; shift ;;
        --inception-weights) need "$1" $#; INCEPTION=$(abspath "$2"); shift 2 ;;
        --streams) need "$1" $#; STREAMS=$2; shift 2 ;;
        --ae-minutes) need "$1" $#; minutes "$1" "$2"; AE_MINUTES=$2; shift 2 ;;
        --diffusion-minutes) need "$1" $#; minutes "$1" "$2"; DIFFUSION_MINUTES=$2; shift 2 ;;
        --decoder-minutes) need "$1" $#; [[ $2 =~ ^[0-9]+([.][0-9]+)?$ ]] || die "$1 must be a number (0: no \
fine-tune), got '$2'"; DECODER_MINUTES=$2; shift 2 ;;
        --ae-config|--ldm-config|--vqvae-config|--vqd-config)
            need "$1" $#; [ -f "$2" ] || die "$1: no config file $2"; TRAIN_ARGS+=("$1" "$(abspath "$2")"); shift 2 ;;
        --set) need "$1" $#; [[ $2 == ?*=* ]] || die "--set takes KEY=VALUE, got '$2'"; TRAIN_ARGS+=(--set "$2")
               shift 2 ;;
        --keep-checkpoints) KEEP_CHECKPOINTS=1; shift ;;
        --slim) SLIM=1; shift ;;
        --judge-epochs) need "$1" $#; minutes "$1" "$2"; JUDGE_EPOCHS=$2; shift 2 ;;
        --num-samples) need "$1" $#; whole "$1" "$2"; NUM=$2; shift 2 ;;
        --steps) need "$1" $#; whole "$1" "$2"; STEPS=$2; shift 2 ;;
        --batch-size) need "$1" $#; whole "$1" "$2"; BATCH=$2; shift 2 ;;
        --precision) need "$1" $#; PRECISION=$2; shift 2 ;;
        --skip) need "$1" $#; SKIP=$2; shift 2 ;;
        --device) need "$1" $#; DEVICE=$2; shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        --) shift; [ $# -eq 1 ] || die "expected exactly one OUTDIR after --"; OUTDIR=$1; shift ;;
        -*) die "unknown option $1" ;;
        *) [ -z "$OUTDIR" ] || die "more than one OUTDIR: '$OUTDIR' and '$1'"; OUTDIR=$1; shift ;;
    esac
done

# ---- every check before any work -------------------------------------------------------------------------------
[ -n "$OUTDIR" ] || die "missing OUTDIR (the folder the results go to)"
case $PRECISION in fp32|bf16|fp16) ;; *) die "--precision must be fp32, bf16 or fp16, got '$PRECISION'" ;; esac
case $DEVICE in cpu|cuda|cuda:[0-9]*) ;; *) die "--device must be cuda, cuda:N or cpu, got '$DEVICE'" ;; esac
SKIP=${SKIP//,/ }
for s in $SKIP; do [[ " $STAGES " == *" $s "* ]] || die "--skip: unknown stage '$s' (${STAGES// /, })"; done
RUN=()
for s in $STAGES; do [[ " $SKIP " == *" $s "* ]] || RUN+=("$s"); done
runs() { [[ " ${RUN[*]} " == *" $1 "* ]]; }
if ! runs train || [[ " ${STREAMS//,/ } " != *" discrete "* ]]; then  # it serves the VQ decoder's training only
    kept=(); for s in "${RUN[@]}"; do [ "$s" = percept ] || kept+=("$s"); done; RUN=(${kept[@]+"${kept[@]}"})
fi
STREAMS=${STREAMS//,/ }
[ -n "${STREAMS// /}" ] || die "--streams is empty"
for s in $STREAMS; do
    case $s in continuous|discrete) ;; *) die "--streams: unknown stream '$s' (continuous, discrete)" ;; esac
done
[ "$NO_FID" = 0 ] || [ -z "$REFERENCE" ] || die "--no-fid and --reference exclude each other"
[ -z "$REFERENCE" ] || [ -f "$REFERENCE" ] || die "--reference: no file $REFERENCE"
[ -z "$INCEPTION" ] || [ -f "$INCEPTION" ] || die "--inception-weights: no file $INCEPTION"
[ -z "$TRAIN_SOURCE" ] || [ -e "$TRAIN_SOURCE" ] || die "--train-source: $TRAIN_SOURCE does not exist"
[ -z "$TEST_SOURCE" ] || [ -e "$TEST_SOURCE" ] || die "--test-source: $TEST_SOURCE does not exist"
if { runs judge || runs percept || runs train; } && [ ! -f "$SHARDS/manifest.json" ] && [ -z "$TRAIN_SOURCE" ]; then
    die "no training shards in $SHARDS (no manifest.json): give --train-source PATH/cifar10-train.tar.gz to make \
them, or --shards DIR (CIFAR-10: see BENCHMARKS.md, 'Data')"
fi
if [ -n "$REFERENCE" ] || [ "$NO_FID" = 1 ]; then  # no statistics to compute
    kept=(); for s in "${RUN[@]}"; do [ "$s" = stats ] || kept+=("$s"); done; RUN=(${kept[@]+"${kept[@]}"})
fi
[ ${#RUN[@]} -gt 0 ] || die "nothing to run: --skip names every stage (stats is not run with --reference or \
--no-fid, percept not without train and the discrete stream)"
TEST_IMAGES=${TEST_SOURCE:-$TEST_SHARDS}  # the real test images of stats and rfid
if runs judge && [ ! -f "$TEST_SHARDS/manifest.json" ] && [ -z "$TEST_SOURCE" ]; then
    die "no test shards in $TEST_SHARDS (no manifest.json): give --test-source PATH/cifar10-test.tar.gz or \
--test-shards DIR"
fi
if { runs stats || runs rfid-old || runs rfid-new; } && [ -z "$TEST_SOURCE" ] \
        && [ ! -f "$TEST_SHARDS/manifest.json" ]; then
    die "stats and rfid need the test images: give --test-source PATH/cifar10-test.tar.gz or --test-shards DIR"
fi
OUTDIR_ABS=$(abspath "$OUTDIR")
STATS=${REFERENCE:-$OUTDIR_ABS/cifar10-test-inception.npz}
if [ "$NO_FID" = 0 ] && ! runs stats && { runs rfid-old || runs rfid-new || runs eval; } && [ ! -f "$STATS" ]; then
    die "stats is skipped but there are no test statistics $STATS: give --reference NPZ, or --no-fid"
fi
if ! runs train; then  # later stages read what an earlier run of the train stage wrote
    for s in $STREAMS; do
        case $s in
            continuous) ae=cifar10_autoencoder; model=cifar10_ldm ;;
            discrete) ae=cifar10_vqvae; model=cifar10_vq_diffusion ;;
        esac
        if runs rfid-new && [ ! -f "$OUTDIR_ABS/runs/$ae/model.safetensors" ]; then
            die "train is skipped but $OUTDIR_ABS/runs/$ae/model.safetensors does not exist (rfid-new needs it; \
run train, or --skip rfid-new, or --streams without $s)"
        fi
        if runs eval && [ ! -f "$OUTDIR_ABS/runs/$model/model-fp16.safetensors" ]; then
            die "train is skipped but $OUTDIR_ABS/runs/$model/model-fp16.safetensors does not exist (eval needs it)"
        fi
    done
fi

if [ "$NO_FID" = 0 ]; then  # FID's Inception weights: found (or obtained, as tools/fid.py would) before any work
    PYTHON=${PYTHON:-$(command -v python || command -v python3 || true)}
    [ -n "$PYTHON" ] || die "no python found (set PYTHON)"
    why=$("$PYTHON" -c "import sys
from latentdiff.metrics.inception import InceptionWeightsError
from latentdiff.metrics.inception_weights import resolve_inception_weights
try:
    resolve_inception_weights(sys.argv[1] or None)
except InceptionWeightsError as e:
    sys.exit(str(e).splitlines()[0])" "$INCEPTION" 2>&1) || die "no Inception weights for FID (${why##*$'\n'}): give \
--inception-weights FILE, or --no-fid (FID computed afterwards, summary.md lists the commands)"
fi
[ "$SMOKE" = 0 ] || { NUM=20; STEPS=5; BATCH=10; }
flags=
[ "$NO_FID" = 0 ] || flags+=" --no-fid"
[ "$SLIM" = 0 ] || flags+=" --slim"
[ "$SMOKE" = 0 ] || flags+=" --smoke"
DECODER_MINUTES=${DECODER_MINUTES:-$DIFFUSION_MINUTES}
# shellcheck disable=SC2034  # read by prepare_run
ENV_LINES="command: $SCRIPT --streams ${STREAMS// /,} --ae-minutes $AE_MINUTES --diffusion-minutes $DIFFUSION_MINUTES \
--decoder-minutes $DECODER_MINUTES \
--num-samples $NUM${STEPS:+ --steps $STEPS} --precision $PRECISION --device $DEVICE${SKIP:+ --skip ${SKIP// /,}}$flags\
${TRAIN_ARGS[*]:+ ${TRAIN_ARGS[*]}}"
prepare_run "$DEVICE"
mkdir -p "$OUTDIR/rfid"

# ---- settings of the stages -----------------------------------------------------------------------------------
FID_ARGS=()
[ -z "$INCEPTION" ] || FID_ARGS+=(--inception-weights "$INCEPTION")
SUBSET=()        # --smoke: a few images per stage
JUDGE_SIZE=()    # the judge's recipe changes (--smoke: small and quick)
TRAIN_SMOKE=()
TRAIN_DEVICE=()
[ "$DEVICE" != cpu ] || TRAIN_DEVICE=(--set device=cpu)
[ -z "$JUDGE_EPOCHS" ] || JUDGE_SIZE+=(--epochs "$JUDGE_EPOCHS")
if [ "$SMOKE" = 1 ]; then
    SUBSET=(--num-samples 20 --subset first)
    JUDGE_SIZE=(--epochs 1 --limit 200 --batch-size 50 --widths 8 16 16)
    TRAIN_SMOKE=(--smoke)
    TRAIN_DEVICE=()  # the tiny configs run on the CPU
fi
QUIET=(--no-progress)

# ---- stage bookkeeping ----------------------------------------------------------------------------------------
TIMES=$OUTDIR/timings.tsv
: > "$TIMES"
FAILED=()
stage() {  # stage NAME COMMAND...: runs COMMAND (a shell function or program), output -> OUTDIR/NAME.log
    local name=$1 start=$SECONDS
    shift
    echo "== $name: $*" | tee "$OUTDIR/$name.log"
    if "$@" >> "$OUTDIR/$name.log" 2>&1; then
        echo "== $name: done in $((SECONDS - start)) s"
        printf '%s\tdone\t%s\n' "$name" "$((SECONDS - start))" >> "$TIMES"
    else
        tail -n 20 "$OUTDIR/$name.log"
        echo "== $name: FAILED after $((SECONDS - start)) s (see $OUTDIR/$name.log)"
        printf '%s\tFAILED\t%s\n' "$name" "$((SECONDS - start))" >> "$TIMES"
        FAILED+=("$name")
    fi
}
not_run() { printf '%s\t%s\t\n' "$1" "$2" >> "$TIMES"; echo "== $1: $2"; }
failed() { [[ " ${FAILED[*]} " == *" $1 "* ]]; }

make_shards() {  # both splits side by side, those missing
    local pids=() code=0
    if { runs judge || runs percept || runs train; } && [ ! -f "$SHARDS/manifest.json" ]; then
        "$PYTHON" tools/make_shards.py "$TRAIN_SOURCE" "$SHARDS" --quiet --overwrite & pids+=($!)
    fi
    if [ -n "$TEST_SOURCE" ] && [ ! -f "$TEST_SHARDS/manifest.json" ] && runs judge; then
        "$PYTHON" tools/make_shards.py "$TEST_SOURCE" "$TEST_SHARDS" --quiet --overwrite & pids+=($!)
    fi
    for p in ${pids[@]+"${pids[@]}"}; do wait "$p" || code=1; done
    return $code
}

judge() {
    mkdir -p "$OUTDIR/judge"
    "$PYTHON" tools/train_classifier.py --preset airbench94 --device "$DEVICE" --shards "$SHARDS" \
        --test-shards "$TEST_SHARDS" --out "$OUTDIR/judge/cifar10_classifier.safetensors" --overwrite --quiet --half \
        ${JUDGE_SIZE[@]+"${JUDGE_SIZE[@]}"}
}

PERCEPT=$OUTDIR/percept/classifier.safetensors
percept() {  # a second airbench94, another seed: the judge stays independent of what the decoders were trained on
    mkdir -p "$OUTDIR/percept"
    "$PYTHON" tools/train_classifier.py --preset airbench94 --seed 1 --device "$DEVICE" --shards "$SHARDS" \
        --out "$PERCEPT" --overwrite --quiet --half ${JUDGE_SIZE[@]+"${JUDGE_SIZE[@]}"}
}

rfid() {  # rfid OUT_NAME MODEL...
    local out=$OUTDIR/rfid/$1.json
    shift
    local fid=(--reference "$STATS" ${FID_ARGS[@]+"${FID_ARGS[@]}"})
    [ "$NO_FID" = 0 ] || fid=(--no-fid)
    "$PYTHON" tools/rfid.py "$@" --images "$TEST_IMAGES" "${fid[@]}" --out "$out" --overwrite --device "$DEVICE" \
        "${QUIET[@]}" ${SUBSET[@]+"${SUBSET[@]}"}
}

train() {
    local perceptual=()
    if [ -f "$PERCEPT" ] && ! failed percept; then perceptual=(--perceptual-classifier "$PERCEPT"); fi
    PYTHON=$PYTHON bash tools/train_default_models.sh --streams "${STREAMS// /,}" --shards "$SHARDS" \
        ${perceptual[@]+"${perceptual[@]}"} \
        --ae-minutes "$AE_MINUTES" --diffusion-minutes "$DIFFUSION_MINUTES" --decoder-minutes "$DECODER_MINUTES" \
        ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"} ${TRAIN_DEVICE[@]+"${TRAIN_DEVICE[@]}"} \
        ${TRAIN_SMOKE[@]+"${TRAIN_SMOKE[@]}"} "$OUTDIR/runs" || return 1
    if [ "$KEEP_CHECKPOINTS" = 0 ]; then  # the exported model.safetensors is what the later stages read
        for d in "$OUTDIR"/runs/*/checkpoints; do [ -d "$d" ] && rm -rf "$d" && echo "deleted $d"; done
    fi
    if [ "$SLIM" = 1 ]; then  # eval reads the packed model-fp16.safetensors
        for f in "$OUTDIR"/runs/{cifar10_ldm,cifar10_vq_diffusion}/model.safetensors; do
            [ -f "$f" ] && [ -f "${f%.safetensors}-fp16.safetensors" ] && rm -f "$f" && echo "deleted $f"
        done
    fi
    return 0
}

old_autoencoders() { for s in $STREAMS; do [ "$s" = continuous ] && echo default || echo default-vq; done; }

new_autoencoders() {
    for s in $STREAMS; do
        case $s in
            continuous) echo "$OUTDIR/runs/cifar10_autoencoder/model.safetensors" ;;
            discrete) echo "$OUTDIR/runs/cifar10_vqvae/model.safetensors" ;;
        esac
    done
}

sampling_options() {  # sampling_options FILE [guided]: eval_t2i.py options for FILE's own number of steps (none
    # when its config has none or it cannot be read: eval then reports the file); with "guided", also the embedded
    # continuous model's guidance scale and interval, and nothing at all when that model has no interval
    "$PYTHON" - "$1" "${2:-}" "$ROOT/latentdiff/assets/default.safetensors" <<'PY'
import json, sys
from safetensors import safe_open

def config(path):
    try:
        with safe_open(path, "pt") as f:
            return json.loads(f.metadata()["config"])
    except Exception:  # a missing or broken file: eval_t2i.py says what is wrong with it
        return {}

own, embedded = config(sys.argv[1]), config(sys.argv[3])
options = f"--steps {own['steps']}" if own.get("steps") else ""
if sys.argv[2] == "guided":
    interval = embedded.get("guidance_interval")
    options = (f"{options} --scale {embedded['guidance_scale']} --guidance-interval {interval[0]} {interval[1]}"
               if interval else "")
print(options.strip())
PY
}

eval_models() {  # "label model sampler [eval_t2i options]" per evaluation: per stream, the embedded (old) model and
    # the new one, latent-diffusion models at their own number of steps; a new latent-diffusion model also with the
    # embedded model's guidance (scale and interval; label suffix _guided) and VQ-Diffusion models also with purity
    # sampling (suffix _purity), either of which may ship as the new model's defaults
    local old_ldm=$ROOT/latentdiff/assets/default.safetensors new_ldm=$OUTDIR/runs/cifar10_ldm/model-fp16.safetensors
    local new_vq=$OUTDIR/runs/cifar10_vq_diffusion/model-fp16.safetensors guided
    for s in $STREAMS; do
        case $s in
            continuous) echo "old_default default euler_a $(sampling_options "$old_ldm")"
                        echo "new_default $new_ldm euler_a $(sampling_options "$new_ldm")"
                        guided=$(sampling_options "$new_ldm" guided)
                        [ -z "$guided" ] || echo "new_default_guided $new_ldm euler_a $guided" ;;
            discrete) echo "old_default-vq default-vq vq --steps 25"
                      echo "old_default-vq_purity default-vq vq_purity --steps 25"
                      echo "new_default-vq $new_vq vq --steps 25"
                      echo "new_default-vq_purity $new_vq vq_purity --steps 25" ;;
        esac
    done
}

rescore() {  # rescore CLASSIFIER EVAL_DIR...: class accuracy of EVAL_DIR/images by CLASSIFIER -> judge_embedded.json
    local classifier=$1 folder code=0
    shift
    for folder in "$@"; do
        "$PYTHON" tools/judge.py "$folder" --classifier "$classifier" --out "$folder/judge_embedded.json" \
            --overwrite --quiet --device "$DEVICE" || code=1
    done
    return $code
}

evaluate() {  # the old and new models with the new judge when there is one, then the embedded judge on the same images
    local judge=$OUTDIR/judge/cifar10_classifier.safetensors code=0 label model sampler options extra done=()
    local common=(--captions cifar10 --num-samples "$NUM" --batch-size "$BATCH" --no-clip --device "$DEVICE"
                  --precision "$PRECISION" --quiet)
    [ -z "$STEPS" ] || common+=(--steps "$STEPS")  # after a model's own options: --steps N overrides them
    if [ "$NO_FID" = 1 ]; then
        common+=(--reference none)
    else
        common+=(--reference "$STATS" ${FID_ARGS[@]+"${FID_ARGS[@]}"})
    fi
    if [ -f "$judge" ] && ! failed judge; then common+=(--classifier "$judge"); fi
    while read -r label model sampler options; do
        read -r -a extra <<< "$options"
        rm -rf "${OUTDIR:?}/eval_$label"  # eval_t2i.py refuses an images/ folder that already holds images
        echo "-- eval_$label: $model ($sampler${options:+ $options})"
        if "$PYTHON" tools/eval_t2i.py --ckpt "$model" --sampler "$sampler" ${extra[@]+"${extra[@]}"} "${common[@]}" \
                --outdir "$OUTDIR/eval_$label"; then
            done+=("$OUTDIR/eval_$label")
        else
            echo "-- eval_$label: FAILED"; code=1
        fi
    done < <(eval_models)
    if [[ " ${common[*]} " == *" --classifier "* ]] && [ ${#done[@]} -gt 0 ]; then
        rescore "$ROOT/latentdiff/assets/cifar10_classifier.safetensors" "${done[@]}" || code=1
    fi
    return $code
}

# ---- the stages -----------------------------------------------------------------------------------------------
need_shards=0
if { runs judge || runs percept || runs train; } && [ ! -f "$SHARDS/manifest.json" ]; then need_shards=1; fi
if runs judge && [ ! -f "$TEST_SHARDS/manifest.json" ]; then need_shards=1; fi
if [ $need_shards = 1 ]; then stage shards make_shards; fi
failed shards && echo "the stages that need the shards will fail too"

for s in $STAGES; do
    if ! runs "$s"; then
        if [ "$s" = stats ] && [ -n "$REFERENCE" ]; then not_run stats "reused --reference $REFERENCE"
        elif [ "$s" = stats ] && [ "$NO_FID" = 1 ]; then not_run stats "not run (--no-fid)"
        elif [ "$s" = percept ] && [[ " $SKIP " != *" percept "* ]]; then
            not_run percept "not run (no train stage or no discrete stream)"
        else not_run "$s" "skipped (--skip)"; fi
        continue
    fi
    case $s in
        stats) stage stats "$PYTHON" tools/fid.py --save-stats "$TEST_IMAGES" "$STATS" --overwrite --device "$DEVICE" \
                   --batch-size 200 "${QUIET[@]}" ${FID_ARGS[@]+"${FID_ARGS[@]}"} ${SUBSET[@]+"${SUBSET[@]}"} ;;
        judge) stage judge judge ;;
        percept) stage percept percept ;;
        rfid-old) mapfile -t aes < <(old_autoencoders); stage rfid-old rfid embedded "${aes[@]}" ;;
        train) stage train train ;;
        rfid-new) mapfile -t aes < <(new_autoencoders); stage rfid-new rfid new "${aes[@]}" ;;
        eval) stage eval evaluate ;;
    esac
done

# ---- summary.md -----------------------------------------------------------------------------------------------
"$PYTHON" - "$OUTDIR" "$NO_FID" "$TEST_IMAGES" "$STATS" "$NUM" <<'PY' || echo "summary.md: could not be written" >&2
import json, sys
from pathlib import Path
from latentdiff.assets import CIFAR10_CLASSIFIER as EMBEDDED_JUDGE
from latentdiff.atomic import atomic_write
from latentdiff.metrics.classifier import classifier_metadata

out, no_fid, test_images, stats, num = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], sys.argv[4], sys.argv[5]
env = dict(line.split(": ", 1) for line in (out / "env.txt").read_text().splitlines()[:4] if ": " in line)
gpu = next((line for line in (out / "env.txt").read_text().splitlines() if line.startswith("gpu ")), "gpu unknown")
lines = [f"# Quality run (issue #17), {env.get('date', '')}, {gpu}", "", f"`{env.get('command', '')}`", "",
         "| stage | status | wall time (s) |", "| --- | --- | --- |"]
for row in (out / "timings.tsv").read_text().splitlines():
    name, status, seconds = (row.split("\t") + ["", ""])[:3]
    lines.append(f"| {name} | {status} | {seconds} |")
judge = out / "judge" / "cifar10_classifier.safetensors"
if judge.is_file():
    meta = classifier_metadata(judge)
    acc = meta.get("test", {}).get("accuracy")
    embedded = classifier_metadata(EMBEDDED_JUDGE).get("test", {}).get("accuracy") if EMBEDDED_JUDGE.is_file() else None
    better = acc is not None and (embedded is None or acc > embedded)
    lines += ["", f"Judge ({judge.relative_to(out)}): test accuracy "
              f"{'-' if acc is None else f'{100 * acc:.2f} %'} after {meta.get('train_seconds', '?')} s "
              f"({'meets' if acc is not None and acc >= 0.9 else 'misses'} the issue's 90 %; the embedded judge: "
              f"{'-' if embedded is None else f'{100 * embedded:.2f} %'})."]
for name in ("embedded", "new"):
    md = out / "rfid" / f"{name}.md"
    if md.is_file():
        lines += ["", f"## rFID, {name} autoencoders ({md.relative_to(out)})", "", md.read_text().strip()]


def load(path):
    return json.loads(path.read_text()) if path.is_file() else None


rows = {}
for d in sorted(out.glob("eval_*")):
    r = load(d / "results.json")
    if r is None:
        continue
    acc, second = r.get("class_accuracy", {}), load(d / "judge_embedded.json")  # latentdiff judge's report
    second = second["folders"][0] if second else None
    new_judge = second is not None  # eval_t2i ran with the new judge, the embedded one re-scored the images
    rows[d.name[5:]] = {"fid": r.get("fid", {}).get("value"), "images": r.get("num_samples"),
                        "acc_new": acc.get("accuracy") if new_judge else None,
                        "acc_old": second["accuracy"] if new_judge else acc.get("accuracy"),
                        "file": r.get("checkpoint", ""), "scale": r.get("scale"),
                        "interval": r.get("guidance_interval")}


def pct(v):
    return "-" if v is None else f"{100 * v:.1f} %"


def num_fmt(v):
    return "-" if v is None else f"{v:.2f}"


if rows:
    lines += ["", f"## Old and new models (FID against {stats if not no_fid else 'none yet'}; this run: {num} images "
              "each, eval folders of earlier runs in OUTDIR included)", "",
              "| model | images | FID | class accuracy (new judge) | class accuracy (embedded judge) | file |",
              "| --- | --- | --- | --- | --- | --- |"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['images']} | {num_fmt(r['fid'])} | {pct(r['acc_new'])} | {pct(r['acc_old'])} "
                     f"| {r['file']} |")
    lines += ["", "Shipping rule (issue #17): better FID and better class accuracy (the new judge's when there is "
              "one) than the old model, and a packed file of at most 40 MB.", ""]
    assets = {"default": "latentdiff/assets/default.safetensors",
              "default-vq": "latentdiff/assets/default_vq.safetensors"}

    def verdict(old, new, size=None, words=("SHIPS", "does not ship")):
        """(text, better) of a new model's row against the old model's row; ``size`` (MB) None: no size limit."""
        key = "acc_new" if new["acc_new"] is not None and old["acc_new"] is not None else "acc_old"
        if new["images"] != old["images"]:
            return f"undecided: {new['images']} new images against {old['images']} old ones (run eval again)", False
        if new["fid"] is None or old["fid"] is None:
            return "undecided: no FID yet (compute it with the commands below, then compare)", False
        if new["acc_old"] is None and new["acc_new"] is None:
            return "undecided: no class accuracy", False
        better = new["fid"] < old["fid"] and (new[key] or 0) > (old[key] or 0) and (size is None or size <= 40)
        return (words[0] if better else words[1]) + (
            f" (FID {new['fid']:.2f} vs {old['fid']:.2f}, accuracy {pct(new[key])} vs {pct(old[key])} by the "
            f"{'new' if key == 'acc_new' else 'embedded'} judge" + ("" if size is None else f", {size:.1f} MB")
            + ")"), better

    def install(row, how, asset):
        """The command that puts ``row``'s model file in place of ``asset``: as it is (``how`` ""), repacked with
        purity sampling as its default ("_purity") or with the guidance scale and interval it was evaluated with
        ("_guided")."""
        if how == "_purity":
            return f"`python tools/pack_model.py {row['file']} {asset} --set sampler=vq_purity --overwrite`"
        if how == "_guided":
            lo, hi = row["interval"]
            return (f"`python tools/pack_model.py {row['file']} {asset} --set guidance_scale={row['scale']} "
                    f"--set \"guidance_interval=[{lo}, {hi}]\" --overwrite`")
        return f"`cp {row['file']} {asset}`"

    def described(row, how):
        if how == "_purity":
            return " with purity sampling"
        if how == "_guided":
            return (f" with the embedded model's guidance (scale {row['scale']:g} in σ ∈ ({row['interval'][0]:g}, "
                    f"{row['interval'][1]:g}])")
        return ""

    for kind, asset in assets.items():
        old = rows.get(f"old_{kind}")
        candidates = [(f"new_{kind}{how}", how) for how in ("", "_purity", "_guided") if rows.get(f"new_{kind}{how}")]
        if not (old and candidates):
            continue
        results = []
        for label, how in candidates:
            new = rows[label]
            size = Path(new["file"]).stat().st_size / 1e6 if Path(new["file"]).is_file() else float("nan")
            text, ships = verdict(old, new, size)
            results.append((label, how, new, text, ships))
            lines.append(f"- {kind}{described(new, how)}: {text}")
        shipping = [r for r in results if r[4]]
        if shipping:  # the lower FID of those that ship
            label, how, new, _, _ = min(shipping, key=lambda r: r[2]["fid"])
            lines.append(f"  ships: {label}: {install(new, how, asset)}  (then the model card and BENCHMARKS.md)")
        elif any(r[3].startswith("undecided: no FID") for r in results):
            for label, how, new, _, _ in results:
                lines.append(f"  if {label} wins: {install(new, how, asset)}  (then the model card and BENCHMARKS.md)")
        old_purity = rows.get(f"old_{kind}_purity")
        if old_purity and not shipping:
            text, ships = verdict(old, old_purity, words=("better", "not better"))
            lines.append(f"- {kind}, the embedded model with purity sampling against its own sampler: {text}")
            if ships:
                lines.append(f"  repack it so: `python tools/pack_model.py {asset} {asset} --set sampler=vq_purity "
                             "--overwrite`  (then the model card and BENCHMARKS.md)")
    if judge.is_file() and better:
        lines.append(f"- judge: more accurate than the embedded one: `cp {judge} latentdiff/assets/{EMBEDDED_JUDGE.name}`"
                     " (then re-score the tables of BENCHMARKS.md with `python tools/judge.py`)")
if no_fid:
    lines += ["", "## FID afterwards (this run had --no-fid)", "", "```bash",
              f"python tools/fid.py --save-stats {test_images} cifar10-test-inception.npz"]
    lines += [f"python tools/fid.py {d}/images cifar10-test-inception.npz" for d in sorted(out.glob("eval_*"))]
    for name in ("embedded", "new"):
        r = load(out / "rfid" / f"{name}.json")
        models = " ".join(str(row.get("file", "")) for row in (r or {}).get("models", []))
        if models:
            lines.append(f"python tools/rfid.py {models} --images {test_images} --reference "
                         f"cifar10-test-inception.npz --out rfid_{name}.json")
    lines.append("```")
with atomic_write(out / "summary.md", "w") as f:
    f.write("\n".join(lines) + "\n")
print((out / "summary.md").read_text())
PY

if [ ${#FAILED[@]} -gt 0 ]; then
    echo "quality_run.sh: failed: ${FAILED[*]} (the others' results in $OUTDIR, summary.md)" >&2
    exit 1
fi
echo "quality_run.sh: all done; results in $OUTDIR (summary.md)"
