#!/bin/bash
# For a session that is lent a GPU by this workplace's `device` tool (15 device-minutes; not used by CI or tests).
# On the GPU machine: train default models (tools/train_default_models.sh with the GPU configs), generate the
# evaluation images (the embedded default model's sampler sweep, tools/eval_t2i.py and tools/sampler_sweep.py per
# trained model; FID is computed back here, because the 87 MB Inception weights do not fit the 64 MiB that
# travels), benchmark against diffusers if time is left, then pack everything into <=15 MB parts and send the
# first batch to $OUT (.device/ship.py).
#
# Prepared here (no GPU needed), from the repository root:
#   echo /.whl/ >> .git/info/exclude
#   tar czf .device/cifar10-train-shards.tar.gz -C data cifar10-train-shards          # 19 MB (shards: 172 MB)
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl open_clip_torch==3.3.0 \
#       webdataset==1.0.2 braceexpand ftfy wcwidth pytorch-fid==0.3.0 diffusers==0.42.1 importlib_metadata
# The checkout is ~52 MB since both embedded models ship; with the ~28 MB carried below a call would exceed the
# 64 MiB it may send, so move latentdiff/assets/default_vq.safetensors out of the checkout for the call (nothing
# here needs it) and back afterwards (about 50 MB then travels).
# Then one `run` with carry [".device", ".whl"], command `bash .device/device.sh`, timeout_s 590, and right after
# it (the machine stays warm 30 s) `python3 .device/ship.py send /root/keep` until the printed "left:" list is
# empty. Rejoin the parts with `cat NAME.part* > NAME` (manifest.json has their sha256).
# Tested end to end on the CPU: SKIP_PIP=1 DEV=cpu N=20 NS=10 BS=10 BTRAIN=8 KEEP=/tmp/k OUT=/tmp/o bash .device/device.sh
# Run once on an H200 (2026-11-28, both streams, AE=1.7 DIFF=3.8 N=10000 NS=1000): setup 9 s, training done at
# 377 s, the evaluations cut at 516 s (6.5k of 10k images each), no time left for the benches (run in a follow-up
# call); the VQ-Diffusion model shipped, the 3.8-minute latent-diffusion model was worse than the CPU-trained v1.1 (and v1.2).
# Hence the defaults now: the continuous stream only, with longer diffusion training and fewer evaluation images.
T0=$(date +%s)
BUDGET=${BUDGET:-560}
AE=${AE:-1.5}
DIFF=${DIFF:-5.5}
STREAMS=${STREAMS:-continuous}
DEV=${DEV:-cuda}
N=${N:-5000}
NS=${NS:-500}
BS=${BS:-1000}
left() { echo $(( $1 - ($(date +%s) - T0) )); }
KEEP=${KEEP:-/root/keep}
RUNS=${RUNS:-runs}
rm -rf "$KEEP"; mkdir -p "$KEEP"
exec > >(tee "$KEEP/device.log") 2>&1
export PYTHONUNBUFFERED=1
if [ -z "$SKIP_PIP" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site || exit 3
fi
command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name(), torch.cuda.is_bf16_supported())"
df -h /dev/shm | tail -1; nproc
SHM=$(df -m /dev/shm | awk 'NR==2{print $2}')
[ "${SHM:-0}" -lt 4096 ] && mount -o remount,size=16G /dev/shm 2>/dev/null; df -h /dev/shm | tail -1
if [ -z "$SKIP_TRAIN" ]; then mkdir -p data && tar xzf .device/cifar10-train-shards.tar.gz -C data || exit 3; fi
command -v nvidia-smi >/dev/null && nvidia-smi dmon -s u -d 5 > "$KEEP/gpu_util.log" 2>&1 &
echo "setup done at $(( $(date +%s) - T0 )) s"

[ -n "$SKIP_TRAIN" ] || STREAMS=$STREAMS RUNS=$RUNS AE_MINUTES=$AE DIFFUSION_MINUTES=$DIFF timeout "$(left $((BUDGET - 110)))" bash tools/train_default_models.sh
echo "training done at $(( $(date +%s) - T0 )) s"
for f in $RUNS/*.log; do echo "== $f"; grep -v "^\s*$" "$f" | tail -4; done

PIDS=()
EV=(--reference none --no-clip --device $DEV --precision fp32 --quiet)
# the embedded default model's sampler sweep (BENCHMARKS.md, issue 6): 12 x $NS images, about a minute on an H200
timeout "$(left $((BUDGET - 45)))" python tools/sampler_sweep.py --ckpt default --steps 10 25 50 --num-samples $NS \
    --batch-size $BS --reference none --device $DEV --precision fp32 --quiet --outdir "$KEEP/sweep_default" \
    > "$KEEP/sweep_default.log" 2>&1 &
PIDS+=($!)
if [ -f $RUNS/cifar10_ldm/model-fp16.safetensors ]; then
    timeout "$(left $((BUDGET - 45)))" python tools/eval_t2i.py --ckpt $RUNS/cifar10_ldm/model-fp16.safetensors \
        --num-samples $N --batch-size $BS "${EV[@]}" --outdir "$KEEP/eval_ldm" > "$KEEP/eval_ldm.log" 2>&1 &
    PIDS+=($!)
    timeout "$(left $((BUDGET - 45)))" python tools/sampler_sweep.py --ckpt $RUNS/cifar10_ldm/model-fp16.safetensors \
        --steps 10 25 50 --num-samples $NS --batch-size $BS --reference none --device $DEV --precision fp32 \
        --quiet --outdir "$KEEP/sweep" > "$KEEP/sweep.log" 2>&1 &
    PIDS+=($!)
fi
if [ -f $RUNS/cifar10_vq_diffusion/model-fp16.safetensors ]; then
    timeout "$(left $((BUDGET - 45)))" python tools/eval_t2i.py --ckpt $RUNS/cifar10_vq_diffusion/model-fp16.safetensors \
        --steps 25 --num-samples $N --batch-size $BS "${EV[@]}" --outdir "$KEEP/eval_vq" > "$KEEP/eval_vq.log" 2>&1 &
    PIDS+=($!)
fi
wait "${PIDS[@]}"
echo "eval done at $(( $(date +%s) - T0 )) s"
tail -n 3 "$KEEP"/eval_*.log "$KEEP"/sweep.log

if [ "$(left $((BUDGET - 25)))" -gt 20 ]; then
    timeout "$(left $((BUDGET - 25)))" python tools/bench_train.py --config configs/cifar10_ldm_gpu.yaml --device $DEV \
        --batch ${BTRAIN:-256} --repeats 20 --warmup 5 --json "$KEEP/bench_train_cifar10.json" > "$KEEP/bench_train.txt" 2>&1
fi
if [ "$(left $((BUDGET - 12)))" -gt 15 ]; then
    timeout "$(left $((BUDGET - 12)))" python tools/bench_vq.py --preset small --device $DEV --dtype fp32 bf16 \
        > "$KEEP/bench_vq.txt" 2>&1
fi
echo "benchmarks done at $(( $(date +%s) - T0 )) s"
cat "$KEEP"/bench_*.txt 2>/dev/null | tail -30
pkill -f "nvidia-smi dmon"
cp -r $RUNS/*.log "$KEEP/" 2>/dev/null
python3 .device/ship.py prepare "$KEEP" "$RUNS" && python3 .device/ship.py send "$KEEP" "$OUT"
echo "all done at $(( $(date +%s) - T0 )) s"
