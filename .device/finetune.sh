#!/bin/bash
# Device call 2 of 2 (after .device/vq_rest.sh, at once, while the machine is warm). Fine-tunes the embedded default
# model on the GPU for a wall-clock budget, three runs side by side (a 6.7M-parameter U-Net is launch-bound, the
# GPU has room): the U-Net + text encoder (configs/cifar10_ldm_finetune_gpu.yaml) and two decoder fine-tunes of its
# autoencoder, encoder frozen (configs/cifar10_decoder_finetune_gpu.yaml, with the patch GAN and L1 alone); plus an
# fp16 + GradScaler smoke run of the trainer. Then packs the exports (float16) and copies them, the logs, sample
# grids and call 1's VQ-Diffusion images to $OUT (<= 8 files of <= 15 MiB). Evaluation happens back on the CPU.
#   prepare: latentdiff/assets/default_vq.safetensors moved out of the checkout (see .device/vq_rest.sh)
#   run: carry [".device", ".whlmin"], command "bash .device/finetune.sh", timeout_s 590
# CPU rehearsal: DEV=cpu BUDGET=150 KEEP=/tmp/k RUNS=/tmp/r OUT=/tmp/o TINY=1 bash .device/finetune.sh
# Run once on an H200 (2026-11-28, second lease): setup 16 s, 7.9 min of training, all done at 549 s; 42 MB back.
# Call 1 had needed pytorch_fid among the wheels (eval_t2i imports it) and was run twice; 236 s of the lease were left.
T0=$(date +%s)
BUDGET=${BUDGET:-545}
DEV=${DEV:-cuda}
KEEP=${KEEP:-/root/keep}
RUNS=${RUNS:-/root/runs}
left() { echo $(( $1 - ($(date +%s) - T0) )); }
mkdir -p "$KEEP" "$OUT" && rm -rf "$RUNS"
exec > >(tee "$KEEP/finetune.log") 2>&1
export PYTHONUNBUFFERED=1
if ! PYTHONPATH=/tmp/site python3 -c "import open_clip, webdataset" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whlmin/*.whl || exit 3
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python
[ "$DEV" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
[ -f data/cifar10-train-shards/manifest.json ] || { mkdir -p data && tar xzf .device/cifar10-train-shards.tar.gz -C data; } || exit 3
command -v nvidia-smi >/dev/null && nvidia-smi dmon -s um -d 5 > "$KEEP/gpu_util.log" 2>&1 &
SMALL=()  # the CPU rehearsal: tiny batches, no workers
[ -n "${TINY:-}" ] && SMALL=(--set data.batch_size=8 --set data.num_workers=0 --set log_every=2 --set sample_every=4
                             --set checkpoint_every=4 --set device=cpu)
MIN=$(python3 -c "print(round(max($(left "$BUDGET") - 55, 30) / 60, 2))")
echo "setup done at $(( $(date +%s) - T0 )) s; training for $MIN min"

train() {  # train NAME CONFIG [overrides...]
    local name=$1 config=$2
    shift 2
    python tools/train.py --config "$config" --outdir "$RUNS/$name" --max-minutes "$MIN" --no-progress \
        "${SMALL[@]}" "$@" > "$KEEP/$name.log" 2>&1
}
train ldm_ft configs/cifar10_ldm_finetune_gpu.yaml &
P1=$!
train dec_gan configs/cifar10_decoder_finetune_gpu.yaml &
P2=$!
train dec_l1 configs/cifar10_decoder_finetune_gpu.yaml --set objective.disc_weight=0 &
P3=$!
if [ "$DEV" = cuda ]; then  # fp16 autocast + GradScaler on the tiny config, 60 steps
    python tools/train.py --config configs/train_tiny_ldm.yaml --outdir "$RUNS/smoke_fp16" --no-progress \
        --set data.shards=data/cifar10-train-shards --set device=cuda --set precision=fp16 --set steps=60 \
        --set log_every=10 --set sample_every=60 --set checkpoint_every=60 > "$KEEP/smoke_fp16.log" 2>&1
    echo "fp16 smoke exit $?"; tail -n 2 "$RUNS/smoke_fp16/log.jsonl"
fi
wait $P1; echo "ldm_ft exit $?"
wait $P2; echo "dec_gan exit $?"
wait $P3; echo "dec_l1 exit $?"
echo "training done at $(( $(date +%s) - T0 )) s"
for n in ldm_ft dec_gan dec_l1; do echo "== $n"; tail -n 2 "$KEEP/$n.log"; tail -n 1 "$RUNS/$n/log.jsonl"; done

python tools/pack_model.py "$RUNS/ldm_ft/model.safetensors" "$KEEP/ldm_ft-fp16.safetensors" --half \
    --vocabulary data/cifar10-train-shards --overwrite
for n in dec_gan dec_l1; do
    python tools/pack_model.py "$RUNS/$n/model.safetensors" "$OUT/$n-fp16.safetensors" --half --overwrite
done
split -b 15M -d "$KEEP/ldm_ft-fp16.safetensors" "$OUT/ldm_ft-fp16.safetensors.part"
sha256sum "$KEEP/ldm_ft-fp16.safetensors" "$OUT"/dec_*-fp16.safetensors
pkill -f "nvidia-smi dmon"
V=$KEEP/eval_vq_rest
if [ -f "$V/results.json" ]; then
    tar cf "$OUT/vq_rest.tar" -C "$KEEP" eval_vq_rest eval_vq_rest.log
else
    echo "VQ images not complete: $(ls "$V/images" 2>/dev/null | wc -l) files"; tail -n 3 "$KEEP/eval_vq_rest.log"
fi
(cd "$RUNS" && tar cf "$OUT/logs.tar" --exclude=checkpoints --exclude=model.safetensors . -C "$KEEP" \
    $(cd "$KEEP" && ls ./*.log gpu_util.log 2>/dev/null))
ls -la "$OUT"
echo "all done at $(( $(date +%s) - T0 )) s"
