#!/usr/bin/env bash
# FSDP2 inside a hierarchical worker, bf16 compute, on CUDA with nccl: one process per GPU.
# UNVERIFIED: written without a GPU (the CPU/gloo form of every step below is tested in
# tests/test_hierarchy.py). benchmarks/gpu_check.sh calls it.
#
#   bash benchmarks/gpu_check_fsdp.sh [OUT_DIR]
#
# With G GPUs: 2 workers of G/2 processes when G >= 2 is even (DiLoCo across the workers on shards),
# else 1 worker of G processes. Trains a few steps with a checkpoint, resumes from it, and checks
# that the run finished with a finite loss, counted inner (FSDP2) traffic and resumed where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-$(mktemp -d /tmp/dtrain-gpu-fsdp.XXXXXX)}
PY=${PYTHON:-python}
G=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$G" -lt 1 ]; then echo "gpu_check_fsdp: no CUDA device; nothing to check" >&2; exit 2; fi
if [ "$G" -ge 2 ] && [ $((G % 2)) -eq 0 ]; then K=$((G / 2)); else K=$G; fi
ARGS=(configs/diloco.yaml comm.backend=nccl comm.inner_size=$K parallel.inner=fsdp parallel.mixed_precision=bf16
      algo.sync_every=10 steps=40 ckpt_every=20 eval_every=20 progress=false plot=false
      workload.n_layer=4 workload.d_model=256 workload.n_head=8 workload.batch_size=$((16 * K)))
run() { $PY -m torch.distributed.run --nproc-per-node "$G" --master-addr 127.0.0.1 --master-port $((29500 + RANDOM % 1000)) \
          -m dtrain.cli train "${ARGS[@]}" "$@"; }
echo "gpu_check_fsdp: $G GPU(s): $((G / K)) worker(s) x $K process(es), out_dir $OUT/run" >&2
run out_dir="$OUT/run" steps=20
run out_dir="$OUT/run" resume=true
$PY - "$OUT/run/summary.json" <<'PYEOF'
import json, math, sys
s = json.load(open(sys.argv[1]))
assert s["resumed_from"] == 20, s["resumed_from"]
assert s["final_loss"] is not None and math.isfinite(s["final_loss"]), s["final_loss"]
assert s["comm_inner"]["max"]["bytes_sent"] > 0 or s["hierarchy"]["inner_size"] == 1
print(f"gpu_check_fsdp: ok: {s['hierarchy']}, final loss {s['final_loss']:.4f}, "
      f"outer bytes/process {s['comm']['max']['bytes_sent']:,}, inner bytes/process {s['comm_inner']['max']['bytes_sent']:,}")
PYEOF
