#!/bin/bash
# Device call 1 of 2 (session of 2026-11-28, second GPU lease; .device/finetune.sh is call 2). The checkout cannot
# carry both embedded models and the training shards at once (64 MiB), so this short call carries the VQ-Diffusion
# model (moved out of the checkout into the ignored .vqcarry/, so that neither call sends it unasked) and the
# wheels, installs the wheels into /tmp/site, copies the checkout to /root/repo and starts there,
# detached (setsid: it outlives the call while the machine stays warm), the generation of the 3,478 evaluation images
# that the first lease's 10k FID run of that model lacked (indices 6,522-9,999, same settings: 25 steps, its own
# guidance scale 3 and truncation 0.9, fp32, batch 1000). Call 2, started at once with default_vq.safetensors moved
# out of the checkout and the shards carried, collects them from /root/keep/eval_vq_rest.
#   prepare: mkdir .vqcarry; mv latentdiff/assets/default_vq.safetensors .vqcarry/   (back after both calls)
#            .whlmin/ (ignored): the wheels of .device/device.sh's list without diffusers, pytorch_fid included
#            (tools/eval_t2i.py imports it); /.whlmin/ and /.vqcarry/ in .git/info/exclude
#   run: carry [".whlmin", ".vqcarry"], command "bash .device/vq_rest.sh", timeout_s 120
T0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whlmin/*.whl \
    || exit 3
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"
nproc
rm -rf /root/repo /root/keep && mkdir -p /root/keep && cp -r . /root/repo && cd /root/repo || exit 3
setsid nohup python tools/eval_t2i.py --ckpt .vqcarry/default_vq.safetensors --steps 25 --start 6522 \
    --num-samples 3478 --batch-size 1000 --reference none --no-clip --device cuda --precision fp32 --quiet \
    --outdir /root/keep/eval_vq_rest > /root/keep/eval_vq_rest.log 2>&1 < /dev/null &
sleep 20
cat /root/keep/eval_vq_rest.log
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
echo "call 1 done at $(( $(date +%s) - T0 )) s"
