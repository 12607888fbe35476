#!/usr/bin/env bash
# One device call's worth of GPU evidence (issue 4 and 5), for a session lent a GPU through the
# tool library's `device` (see its README): about 9 minutes in all, everything under $OUT.
#   run(command="bash benchmarks/gpu_session.sh", carry=["data/fashion-mnist"], timeout_s=600)
# Every step has its own time limit, so one slow step does not cost the others. Not yet run on a
# GPU: the first session with one should read its log before trusting its numbers.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/session.log"; }

log "device and versions"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/session.log" 2>&1
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name())" >> "$OUT/session.log" 2>&1

log "grid throughput: reference vs fast path vs concurrent grid (bf16)"
timeout 240 python3 benchmarks/grid_throughput.py --out "$OUT/grid_throughput_gpu.json" >> "$OUT/session.log" 2>&1
log "rc=$?"

log "ImageNet throughput: loader vs model, ResNet-18/34"
timeout 120 python3 benchmarks/imagenet_throughput.py --out "$OUT/imagenet_throughput_gpu.json" >> "$OUT/session.log" 2>&1
log "rc=$?"

log "end to end: ResNet-20, paper schedule (64k iterations), real Fashion-MNIST, --compile, bf16"
# SIGTERM at the limit: the run checkpoints and its metrics.parquet says how far it got and when.
timeout -s TERM 170 python3 -m study run --arch resnet --depth 20 --dataset fashion-mnist \
    --data-dir data/fashion-mnist --compile --precision bf16 --runs-dir "$OUT/runs" --no-progress \
    >> "$OUT/session.log" 2>&1
log "rc=$?"
python3 -m study status --runs-dir "$OUT/runs" >> "$OUT/session.log" 2>&1
log "done"
