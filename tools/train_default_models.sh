#!/usr/bin/env bash
# Train both kinds of CIFAR-10 default model with the project's own tools, side by side on one machine (a GPU):
#   continuous: KL autoencoder ($AE_CONFIG), then latent diffusion on its latents ($LDM_CONFIG)
#   discrete:   VQ autoencoder ($VQVAE_CONFIG), then VQ-Diffusion on its codes ($VQD_CONFIG)
# Each stage runs for a wall-clock budget (tools/train.py --max-minutes); the configs' `steps` are only caps. Then
# each export is also packed as latentdiff/assets/ ships it (model-fp16.safetensors: tools/pack_model.py --half
# --vocabulary $SHARDS).
# The default configs are the GPU recipe (configs/*_gpu.yaml and configs/cifar10_vq*.yaml), not yet run at full
# length; the shipped continuous model came from configs/cifar10_{autoencoder,ldm}.yaml on a CPU (MODEL_CARD.md).
#
#   bash tools/train_default_models.sh                       # defaults below; runs/ and data/ under the repo
#   AE_MINUTES=1.8 DIFFUSION_MINUTES=4 RUNS=/tmp/runs bash tools/train_default_models.sh
#   AE_CONFIG=configs/cifar10_autoencoder.yaml LDM_CONFIG=configs/cifar10_ldm.yaml bash tools/train_default_models.sh
#   EXTRA="--set device=cpu" bash tools/train_default_models.sh        # any extra tools/train.py arguments
#   STREAMS=continuous AE_MINUTES=2 DIFFUSION_MINUTES=9 bash tools/train_default_models.sh   # one kind only
#
# The stages' logs go to $RUNS/continuous.log and $RUNS/discrete.log; the exit status is non-zero when a stream
# fails. STREAMS picks the streams (default: "continuous discrete").
set -uo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-runs}
SHARDS=${SHARDS:-data/cifar10-train-shards}
SOURCE=${SOURCE:-../shared/data/cifar10/cifar10-train.tar.gz}
AE_MINUTES=${AE_MINUTES:-1.8}
DIFFUSION_MINUTES=${DIFFUSION_MINUTES:-4}
EXTRA=${EXTRA:-}
STREAMS=${STREAMS:-continuous discrete}
AE_CONFIG=${AE_CONFIG:-configs/cifar10_autoencoder_gpu.yaml}
LDM_CONFIG=${LDM_CONFIG:-configs/cifar10_ldm_gpu.yaml}
VQVAE_CONFIG=${VQVAE_CONFIG:-configs/cifar10_vqvae.yaml}
VQD_CONFIG=${VQD_CONFIG:-configs/cifar10_vq_diffusion.yaml}
for stream in $STREAMS; do
    case $stream in
        continuous|discrete) ;;
        *) echo "STREAMS: unknown stream '$stream' (continuous, discrete)" >&2; exit 2 ;;
    esac
done
mkdir -p "$RUNS"

if [ ! -f "$SHARDS/manifest.json" ]; then
    python tools/make_shards.py "$SOURCE" "$SHARDS" --quiet || exit 2
fi

train() {  # train CONFIG OUTDIR MINUTES [more tools/train.py arguments]
    local config=$1 outdir=$2 minutes=$3
    shift 3
    # shellcheck disable=SC2086  # EXTRA is split into words on purpose
    python tools/train.py --config "$config" --outdir "$outdir" --max-minutes "$minutes" --no-progress \
        --set "data.shards=$SHARDS" "$@" $EXTRA
}

pack() {  # pack MODEL_FILE OUT_FILE: float16, token embedding cut to the captions' vocabulary (tools/pack_model.py)
    python tools/pack_model.py "$1" "$2" --half --vocabulary "$SHARDS" --overwrite
}

continuous() {
    train "$AE_CONFIG" "$RUNS/cifar10_autoencoder" "$AE_MINUTES" &&
    train "$LDM_CONFIG" "$RUNS/cifar10_ldm" "$DIFFUSION_MINUTES" \
        --set "objective.autoencoder_checkpoint=$RUNS/cifar10_autoencoder/model.safetensors" &&
    pack "$RUNS/cifar10_ldm/model.safetensors" "$RUNS/cifar10_ldm/model-fp16.safetensors"
}

discrete() {
    train "$VQVAE_CONFIG" "$RUNS/cifar10_vqvae" "$AE_MINUTES" &&
    train "$VQD_CONFIG" "$RUNS/cifar10_vq_diffusion" "$DIFFUSION_MINUTES" \
        --set "objective.vqvae_checkpoint=$RUNS/cifar10_vqvae/model.safetensors" &&
    pack "$RUNS/cifar10_vq_diffusion/model.safetensors" "$RUNS/cifar10_vq_diffusion/model-fp16.safetensors"
}

declare -A pids
for stream in $STREAMS; do
    "$stream" > "$RUNS/$stream.log" 2>&1 &
    pids[$stream]=$!
done
status=0
for stream in "${!pids[@]}"; do
    wait "${pids[$stream]}"; code=$?
    echo "$stream: exit $code ($RUNS/$stream.log)"
    [ $code -eq 0 ] || status=1
done
exit $status
