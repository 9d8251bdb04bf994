#!/usr/bin/env bash
# Train the CIFAR-10 default models with the project's own tools, on one machine (a CUDA GPU by default).
# Run from a clone with the package installed (pip install -e .); works from any current folder.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: tools/train_default_models.sh [options] OUTDIR

Train the CIFAR-10 default models with tools/train.py, the streams side by side, each stage under a wall-clock
budget (tools/train.py --max-minutes; a config's `steps` is only a cap), and pack each final model as the embedded
ones are packed (tools/pack_model.py --half --vocabulary SHARDS). Streams:

  continuous  KL autoencoder (--ae-config), then latent diffusion on its latents (--ldm-config) and, at the same
              time, that autoencoder's decoder alone with the patch GAN (--decoder-minutes)
              -> OUTDIR/cifar10_autoencoder/, OUTDIR/cifar10_decoder/, OUTDIR/cifar10_ldm/ (model.safetensors,
              model-fp16.safetensors: the diffusion model with the fine-tuned decoder, sampling by default as
              v1.3 of the embedded model did: Euler ancestral, 10 steps, guidance scale 5 at every step)
  discrete    VQ autoencoder (--vqvae-config), then VQ-Diffusion on its codes (--vqd-config) and, at the same
              time, the VQ decoder alone (--decoder-minutes)
              -> OUTDIR/cifar10_vqvae/, OUTDIR/cifar10_vq_decoder/, OUTDIR/cifar10_vq_diffusion/ (likewise)
  finetune    fine-tune a model file (--init) as v1.3 of the default model was made: its U-Net and text encoder
              (configs/cifar10_ldm_finetune_gpu.yaml) and, at the same time, its autoencoder's decoder with the
              patch GAN (configs/cifar10_decoder_finetune_gpu.yaml), both for --diffusion-minutes
              -> OUTDIR/finetune_ldm/, OUTDIR/finetune_decoder/, OUTDIR/finetune/model-fp16.safetensors (the new
              U-Net and text encoder with the new decoder, packed)

Also written: OUTDIR/<stream>.log (the stream's tools/train.py and tools/pack_model.py output), OUTDIR/env.txt.
Every run folder holds tools/train.py's log.jsonl, loss plot, sample grids and checkpoints; a killed run
continues from its newest checkpoint when the same command runs again. The exit status is 1 when a stream fails.

options:
  --streams LIST          comma-separated: continuous, discrete, finetune (default: continuous,discrete)
  --shards DIR            CIFAR-10 training shards (default: data/cifar10-train-shards in the repository);
                          made with tools/make_shards.py from --source when DIR has no manifest.json
  --source PATH           the CIFAR-10 training images (cifar10-train.tar.gz, or a folder train/<class>/*.jpg);
                          needed only when --shards does not exist yet
  --ae-minutes M          budget of each autoencoder stage (default: 1.8)
  --diffusion-minutes M   budget of each diffusion stage and of the fine-tunes (default: 4)
  --decoder-minutes M     budget of the continuous and discrete streams' decoder fine-tunes, which run beside the
                          diffusion stage: the autoencoder's config with objective.train_decoder_only=true (encoder
                          and codebook frozen: the diffusion model's latents and codes stay valid), init_from the
                          new autoencoder, the patch GAN from step 0, lr 1e-4; the packed model takes that decoder
                          (tools/pack_model.py --decoder), as v1.3 of the default model did (default: the
                          --diffusion-minutes; 0: no fine-tune, the autoencoder's own decoder)
  --perceptual-classifier FILE
                          the discrete stream's decoder fine-tune adds a perceptual term on this classifier's
                          features (tools/train_classifier.py; objective.perceptual_weight=0.1,
                          objective.perceptual_classifier=FILE), as v1.4 of the embedded VQ model was made (default:
                          none; use a classifier other than the judge that scores class accuracy). Not the KL
                          decoders: there the term improved reconstructions but worsened the generated images' FID
                          (BENCHMARKS.md, "A perceptual loss does")
  --ae-config FILE        default: configs/cifar10_autoencoder_gpu.yaml (8x8x8 latents; the 16x16x8 alternative,
                          which learned far less at equal compute on the CPU: configs/cifar10_autoencoder_f2_gpu.yaml)
  --ldm-config FILE       default: configs/cifar10_ldm_gpu.yaml (with the f2 one: configs/cifar10_ldm_f2_gpu.yaml)
  --vqvae-config FILE     default: configs/cifar10_vqvae.yaml
  --vqd-config FILE       default: configs/cifar10_vq_diffusion.yaml
  --init FILE             the finetune stream's starting model (default: latentdiff/assets/default.safetensors,
                          the shipped v1.5, whose weights are v1.3's; v1.3 was made from v1.2, see BENCHMARKS.md)
  --set KEY=VALUE         passed to every tools/train.py call (repeatable), e.g. --set device=cpu; a path in
                          VALUE is read from the repository root (the other options' paths from the current folder)
  --smoke                 a check of this script in minutes, e.g. on a CPU: the configs/train_tiny_*.yaml
                          configs (6 steps) for continuous/discrete, 2 steps at batch 4 for finetune, on the CPU
  -h, --help              show this help and exit

Environment: PYTHON (default: python, else python3).
Examples:
  tools/train_default_models.sh --source PATH/TO/cifar10-train.tar.gz runs/gpu
  tools/train_default_models.sh --streams continuous --ae-minutes 2 --diffusion-minutes 9 runs/continuous
  tools/train_default_models.sh --ae-config configs/cifar10_autoencoder.yaml --ldm-config configs/cifar10_ldm.yaml \
      --streams continuous runs/cpu-recipe
EOF
}

SCRIPT=tools/train_default_models.sh
# shellcheck source=tools/script_common.sh disable=SC2034  # SCRIPT is read by the sourced file
source "$(dirname "${BASH_SOURCE[0]}")/script_common.sh"
STREAMS=continuous,discrete
SHARDS=$ROOT/data/cifar10-train-shards
SOURCE=
AE_MINUTES=1.8
DIFFUSION_MINUTES=4
DECODER_MINUTES=
AE_CONFIG=$ROOT/configs/cifar10_autoencoder_gpu.yaml
LDM_CONFIG=$ROOT/configs/cifar10_ldm_gpu.yaml
VQVAE_CONFIG=$ROOT/configs/cifar10_vqvae.yaml
VQD_CONFIG=$ROOT/configs/cifar10_vq_diffusion.yaml
INIT=$ROOT/latentdiff/assets/default.safetensors
PERCEPTUAL=()  # --perceptual-classifier: the VQ decoder fine-tune's perceptual term
SETS=()
SMOKE=0
OUTDIR=
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --streams) need "$1" $#; STREAMS=$2; shift 2 ;;
        --shards) need "$1" $#; SHARDS=$(abspath "$2"); shift 2 ;;
        --source) need "$1" $#; SOURCE=$(abspath "$2"); shift 2 ;;
        --ae-minutes) need "$1" $#; AE_MINUTES=$2; shift 2 ;;
        --diffusion-minutes) need "$1" $#; DIFFUSION_MINUTES=$2; shift 2 ;;
        --decoder-minutes) need "$1" $#; DECODER_MINUTES=$2; shift 2 ;;
        --ae-config) need "$1" $#; AE_CONFIG=$(abspath "$2"); shift 2 ;;
        --ldm-config) need "$1" $#; LDM_CONFIG=$(abspath "$2"); shift 2 ;;
        --vqvae-config) need "$1" $#; VQVAE_CONFIG=$(abspath "$2"); shift 2 ;;
        --vqd-config) need "$1" $#; VQD_CONFIG=$(abspath "$2"); shift 2 ;;
        --init) need "$1" $#; INIT=$(abspath "$2"); shift 2 ;;
        --perceptual-classifier) need "$1" $#; [ -f "$2" ] || die "$1: no classifier file $2"
            PERCEPTUAL=(--set objective.perceptual_weight=0.1 --set "objective.perceptual_classifier=$(abspath "$2")")
            shift 2 ;;
        --set) need "$1" $#; SETS+=(--set "$2"); shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        --) shift; [ $# -eq 1 ] || die "expected exactly one OUTDIR after --"; OUTDIR=$1; shift ;;
        -*) die "unknown option $1" ;;
        *) [ -z "$OUTDIR" ] || die "more than one OUTDIR: '$OUTDIR' and '$1'"; OUTDIR=$1; shift ;;
    esac
done
[ -n "$OUTDIR" ] || die "missing OUTDIR (the folder the runs go to)"
STREAMS=${STREAMS//,/ }
[ -n "${STREAMS// /}" ] || die "--streams is empty"
for stream in $STREAMS; do
    case $stream in
        continuous|discrete|finetune) ;;
        *) die "--streams: unknown stream '$stream' (continuous, discrete, finetune)" ;;
    esac
done
DECODER_MINUTES=${DECODER_MINUTES:-$DIFFUSION_MINUTES}
for m in "$AE_MINUTES" "$DIFFUSION_MINUTES" "$DECODER_MINUTES"; do
    [[ $m =~ ^[0-9]+([.][0-9]+)?$ ]] || die "minutes must be a positive number, got '$m'"
done
for f in "$AE_CONFIG" "$LDM_CONFIG" "$VQVAE_CONFIG" "$VQD_CONFIG"; do [ -f "$f" ] || die "no config file $f"; done
if [[ " $STREAMS " == *" finetune "* ]] && [ ! -f "$INIT" ]; then die "--init: no model file $INIT"; fi
if [ ! -f "$SHARDS/manifest.json" ]; then
    [ -n "$SOURCE" ] || die "no shards in $SHARDS (no manifest.json): give --source PATH/TO/cifar10-train.tar.gz \
to make them, or --shards DIR (CIFAR-10: see BENCHMARKS.md, 'Data')"
    [ -e "$SOURCE" ] || die "--source: $SOURCE does not exist"
fi


SMALL=()  # --smoke: the finetune configs at a CPU's size
if [ "$SMOKE" = 1 ]; then
    AE_CONFIG=$ROOT/configs/train_tiny_autoencoder.yaml
    LDM_CONFIG=$ROOT/configs/train_tiny_ldm.yaml
    VQVAE_CONFIG=$ROOT/configs/train_tiny_vqvae.yaml
    VQD_CONFIG=$ROOT/configs/train_tiny_vq_diffusion.yaml
    SMALL=(--max-steps 2 --set data.batch_size=4 --set data.num_workers=0 --set log_every=1 --set sample_every=2
           --set checkpoint_every=2 --set device=cpu --set precision=fp32)
fi

ENV_LINES="command: tools/train_default_models.sh --streams ${STREAMS// /,} --ae-minutes $AE_MINUTES \
--diffusion-minutes $DIFFUSION_MINUTES --decoder-minutes $DECODER_MINUTES${PERCEPTUAL[*]:+ ${PERCEPTUAL[*]}}\
${SETS[*]:+ ${SETS[*]}}$([ "$SMOKE" = 1 ] && echo ' --smoke' || true)"
prepare_run cpu

if [ ! -f "$SHARDS/manifest.json" ]; then
    echo "making $SHARDS from $SOURCE"
    "$PYTHON" tools/make_shards.py "$SOURCE" "$SHARDS" --quiet
fi

train() {  # train CONFIG RUN_DIR MINUTES [more tools/train.py arguments]
    local config=$1 outdir=$2 minutes=$3
    shift 3
    "$PYTHON" tools/train.py --config "$config" --outdir "$outdir" --max-minutes "$minutes" --no-progress \
        --set "data.shards=$SHARDS" "$@" ${SETS[@]+"${SETS[@]}"}
}

pack() {  # pack MODEL_FILE OUT_FILE [more tools/pack_model.py arguments]: float16, the captions' vocabulary
    local src=$1 dst=$2
    shift 2
    "$PYTHON" tools/pack_model.py "$src" "$dst" --half --vocabulary "$SHARDS" --overwrite "$@"
}

# second_stage AE_CONFIG AE_RUN DIFFUSION_CONFIG DIFFUSION_RUN DECODER_RUN_NAME CHECKPOINT_KEY DECODER_LOSS: the
# diffusion model on the new autoencoder's latents (or codes; objective.CHECKPOINT_KEY names that autoencoder) and,
# beside it (--decoder-minutes > 0), that autoencoder's decoder alone in OUTDIR/DECODER_RUN_NAME, its loss with
# --perceptual-classifier's term when DECODER_LOSS is "perceptual" (else "plain"); then the packed model, with the
# fine-tuned decoder swapped in (and any further tools/pack_model.py arguments)
second_stage() {
    local ae_config=$1 ae=$2/model.safetensors diffusion=$4 decoder_run=${2%/*}/$5 key=$6
    local pack_args=("${@:8}")
    local decoder_args=() perceptual=() status=0 trainer decoder_pid=
    [ "$7" != perceptual ] || perceptual=(${PERCEPTUAL[@]+"${PERCEPTUAL[@]}"})
    train "$3" "$diffusion" "$DIFFUSION_MINUTES" --set "objective.$key=$ae" &
    trainer=$!
    if [[ $DECODER_MINUTES =~ [1-9] ]]; then  # not 0 (nor 0.0)
        train "$ae_config" "$decoder_run" "$DECODER_MINUTES" --set "init_from=$ae" \
            --set objective.train_decoder_only=true --set objective.disc_start=0 --set optim.lr=1.0e-4 \
            ${perceptual[@]+"${perceptual[@]}"} &
        decoder_pid=$!
        decoder_args=(--decoder "$decoder_run/model.safetensors")
    fi
    wait "$trainer" || status=1
    [ -z "$decoder_pid" ] || wait "$decoder_pid" || status=1
    [ "$status" -eq 0 ] || return 1
    pack "$diffusion/model.safetensors" "$diffusion/model-fp16.safetensors" ${decoder_args[@]+"${decoder_args[@]}"} \
        ${pack_args[@]+"${pack_args[@]}"}
}

continuous() {
    train "$AE_CONFIG" "$OUTDIR/cifar10_autoencoder" "$AE_MINUTES"
    # v1.3's sampling defaults (tools/quality_run.sh also scores the embedded model's guidance interval on the new
    # model): an epsilon model trained for minutes fails with DDIM, the config's default sampler, and does best with
    # Euler ancestral (BENCHMARKS.md, "Diffusion objective")
    second_stage "$AE_CONFIG" "$OUTDIR/cifar10_autoencoder" "$LDM_CONFIG" "$OUTDIR/cifar10_ldm" cifar10_decoder \
        autoencoder_checkpoint plain --set sampler=euler_a --set steps=10 --set guidance_scale=5.0
}

discrete() {
    train "$VQVAE_CONFIG" "$OUTDIR/cifar10_vqvae" "$AE_MINUTES"
    second_stage "$VQVAE_CONFIG" "$OUTDIR/cifar10_vqvae" "$VQD_CONFIG" "$OUTDIR/cifar10_vq_diffusion" \
        cifar10_vq_decoder vqvae_checkpoint perceptual  # the KL decoder without it: --perceptual-classifier in --help
}

finetune() {  # the U-Net + text encoder and the decoder side by side, then one packed file of both
    train configs/cifar10_ldm_finetune_gpu.yaml "$OUTDIR/finetune_ldm" "$DIFFUSION_MINUTES" \
        --set "init_from=$INIT" ${SMALL[@]+"${SMALL[@]}"} &
    local unet=$!
    train configs/cifar10_decoder_finetune_gpu.yaml "$OUTDIR/finetune_decoder" "$DIFFUSION_MINUTES" \
        --set "init_from=$INIT" ${SMALL[@]+"${SMALL[@]}"} &
    local decoder=$!
    local status=0
    wait "$unet" || status=1
    wait "$decoder" || status=1
    [ "$status" -eq 0 ] || return 1
    mkdir -p "$OUTDIR/finetune"
    pack "$OUTDIR/finetune_ldm/model.safetensors" "$OUTDIR/finetune/model-fp16.safetensors" \
        --decoder "$OUTDIR/finetune_decoder/model.safetensors"
}

run_stream() {
    case $1 in
        continuous) continuous ;;
        discrete) discrete ;;
        finetune) finetune ;;
    esac
}

declare -A pids
for stream in $STREAMS; do
    echo "starting $stream (log: $OUTDIR/$stream.log)"
    # each stream in a subshell with errexit on: its first failing command ends it with that status
    (set -e; run_stream "$stream") > "$OUTDIR/$stream.log" 2>&1 &
    pids[$stream]=$!
done
status=0
for stream in $STREAMS; do
    code=0
    wait "${pids[$stream]}" || code=$?
    echo "$stream: exit $code ($OUTDIR/$stream.log)"
    [ $code -eq 0 ] || { status=1; tail -n 15 "$OUTDIR/$stream.log"; }
done
exit $status
