#!/usr/bin/env bash
# CUDA checks that this project's CPU-only machines cannot run (UNVERIFIED until run on a GPU).
#   bash benchmarks/gpu_check.sh [OUT_JSON]     (GPU_CHECK_TIMEOUT_S bounds the whole script, default 540;
#                                               GPU_CHECK_DEVICE_ONLY=1 stops after the device checks)
# Issue 17 item 3 (device=cuda) first, as pass/fail lines; then issue 16 (outer_device=cpu memory) and 18 (FSDP2).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${DTRAIN_GPU_CHECK_INNER:-}" ]; then  # one global timeout over everything below
  DTRAIN_GPU_CHECK_INNER=1 exec timeout --kill-after=10 "${GPU_CHECK_TIMEOUT_S:-540}" bash "$0" "$@"
fi
PY=${PYTHON:-python}
$PY -c "import torch; assert torch.cuda.is_available(), 'needs CUDA'" || exit 2
G=$($PY -c 'import torch; print(torch.cuda.device_count())')
OUT=$(mktemp -d /tmp/dtrain-gpu-device.XXXXXX)
FAILED=0
TINY=(workload.n_layer=2 workload.d_model=64 workload.n_head=4 workload.seq_len=64 workload.batch_size=16
      workload.eval_batches=2 progress=false plot=false eval_every=10 ckpt_every=10 optim.warmup_steps=0)
trun() { local n=$1; shift; timeout 150 $PY -m torch.distributed.run --nproc-per-node "$n" --master-addr 127.0.0.1 \
           --master-port $((29500 + RANDOM % 1000)) -m dtrain.cli train "$@" > "$OUT/last.log" 2>&1; }
# check NAME SUMMARY DEVICE RESUMED: the run's summary says it finished finite on DEVICE (cuda/cpu), resumed from RESUMED
check() {
  if $PY - "$2" "$3" "$4" <<'PYEOF'
import json, math, sys
s = json.load(open(sys.argv[1]))
assert s["final_loss"] is not None and math.isfinite(s["final_loss"]), s["final_loss"]
assert all(w["device"].startswith(sys.argv[2]) for w in s["workers"]), [w["device"] for w in s["workers"]]
assert str(s["resumed_from"]) == sys.argv[3], s["resumed_from"]
print(f"  {s['algorithm']} x{s['world_size']} on {[w['device'] for w in s['workers']]}: loss {s['final_loss']:.4f}", file=sys.stderr)
PYEOF
  then echo "gpu_check: PASS $1"; else echo "gpu_check: FAIL $1 (log: $OUT/last.log)"; tail -5 "$OUT/last.log"; FAILED=1; fi
}
# 1. DDP, bf16, nccl, one GPU per process (2 processes when there are 2 GPUs, else 1)
N=$(( G >= 2 ? 2 : 1 ))
trun $N configs/ddp.yaml "${TINY[@]}" device=cuda precision=bf16 comm.backend=nccl steps=20 out_dir=$OUT/ddp_nccl
check "ddp bf16 nccl device=cuda x$N" $OUT/ddp_nccl/summary.json cuda None
# 2. two processes sharing one GPU: gloo (nccl refuses two ranks on one GPU), device=cuda, bf16
trun 2 configs/ddp.yaml "${TINY[@]}" device=cuda precision=bf16 comm.backend=gloo steps=20 out_dir=$OUT/ddp_gloo
check "ddp bf16 gloo device=cuda x2 on one GPU" $OUT/ddp_gloo/summary.json cuda None
# 3. ... and nccl asked for the same is refused with one line (not a hang); only where there is one GPU
if [ "$G" -lt 2 ]; then
  if trun 2 configs/ddp.yaml "${TINY[@]}" device=cuda comm.backend=nccl steps=2 out_dir=$OUT/refused; then
    echo "gpu_check: FAIL nccl with 2 processes on 1 GPU was not refused"; FAILED=1
  elif grep -q "nccl needs one GPU per process" "$OUT/last.log"; then echo "gpu_check: PASS nccl sharing one GPU refused in one line"
  else echo "gpu_check: FAIL nccl sharing one GPU: no one-line refusal"; tail -5 "$OUT/last.log"; FAILED=1; fi
fi
# 4. DiLoCo on cuda (nccl), checkpoint at step 10, resumed on the CPU (gloo) to step 20: checkpoints cross devices
trun $N configs/diloco.yaml "${TINY[@]}" device=cuda algo.sync_every=5 steps=10 out_dir=$OUT/diloco
check "diloco device=cuda x$N" $OUT/diloco/summary.json cuda None
trun $N configs/diloco.yaml "${TINY[@]}" device=cpu comm.backend=gloo algo.sync_every=5 steps=20 resume=true out_dir=$OUT/diloco
check "diloco cuda checkpoint resumed with device=cpu" $OUT/diloco/summary.json cpu 10
# 5. ... and the other way: written on the CPU, resumed on cuda, outer state in host memory (algo.outer_device=cpu)
trun $N configs/diloco.yaml "${TINY[@]}" device=cpu algo.sync_every=5 algo.outer_device=cpu steps=10 out_dir=$OUT/diloco_back
trun $N configs/diloco.yaml "${TINY[@]}" device=cuda algo.sync_every=5 algo.outer_device=cpu steps=20 resume=true out_dir=$OUT/diloco_back
check "diloco cpu checkpoint resumed with device=cuda, outer_device=cpu" $OUT/diloco_back/summary.json cuda 10
# 6. comm=local: worker threads of one process, all on cuda:0
timeout 150 $PY -m dtrain.cli train configs/diloco.yaml "${TINY[@]}" comm.name=local comm.workers=2 device=cuda \
  algo.sync_every=5 steps=10 out_dir=$OUT/local > "$OUT/last.log" 2>&1
check "diloco comm=local x2 threads on cuda:0" $OUT/local/summary.json cuda:0 None
[ "$FAILED" = 0 ] && echo "gpu_check: device checks passed" || echo "gpu_check: device checks FAILED"
[ -n "${GPU_CHECK_DEVICE_ONLY:-}" ] && exit $FAILED  # the device checks alone (about 3 minutes on one GPU)

# issue 16: outer_device=cpu keeps DiLoCo's/NoLoCo's/Streaming's phi, Delta and outer momentum in pinned host memory,
# so the accelerator's peak allocation over an outer step must fall by about that state's size.
$PY benchmarks/streaming.py --part memory --out "${1:-/tmp/streaming_memory_gpu.json}" || FAILED=1
# and a real nccl run (one process per GPU, two GPUs at least) of Streaming DiLoCo, int4 + error feedback, host-side outer state
if [ "$G" -ge 2 ]; then
  $PY -m torch.distributed.run --nproc-per-node "$G" -m dtrain.cli train configs/streaming_diloco.yaml out_dir=/tmp/streaming_gpu steps=60 \
    algo.sync_every=20 algo.fragments=4 algo.overlap_steps=2 algo.compression=int4 algo.error_feedback=true \
    algo.outer_device=cpu if_exists=move_aside || FAILED=1
fi
# issue 18: FSDP2 inside hierarchical workers, bf16 compute, nccl, one process per GPU (unverified)
bash benchmarks/gpu_check_fsdp.sh || FAILED=1
exit $FAILED
