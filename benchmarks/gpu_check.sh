#!/usr/bin/env bash
# CUDA checks of issue 16 that this project's CPU-only machines cannot run (unverified until run on a GPU):
# outer_device=cpu keeps DiLoCo's/NoLoCo's/Streaming's phi, Delta and outer momentum in pinned host memory,
# so the accelerator's peak allocation over an outer step must fall by about that state's size.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'needs CUDA'"
python benchmarks/streaming.py --part memory --out "${1:-/tmp/streaming_memory_gpu.json}"
# and a real nccl run (one process per GPU, two GPUs at least) of Streaming DiLoCo, int4 + error feedback, host-side outer state
gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -ge 2 ]; then
  torchrun --nproc-per-node "$gpus" -m dtrain.cli train configs/streaming_diloco.yaml out_dir=/tmp/streaming_gpu steps=60 \
    algo.sync_every=20 algo.fragments=4 algo.overlap_steps=2 algo.compression=int4 algo.error_feedback=true \
    algo.outer_device=cpu if_exists=move_aside
fi
# issue 18: FSDP2 inside hierarchical workers, bf16 compute, nccl, one process per GPU (unverified)
bash benchmarks/gpu_check_fsdp.sh
