#!/usr/bin/env bash
# Multi-node dtrain with torchrun's c10d rendezvous. Run the same command on every node:
#
#   launchers/torchrun_multinode.sh --nnodes 2 --nproc 4 --endpoint node0.example:29400 --run-id exp1 \
#       -- configs/noloco.yaml steps=2000
#
# --nnodes may be a range (MIN:MAX) for elastic membership; --max-restarts N restarts failed
# workers, which resume from the last checkpoint (add resume=true after --).
set -euo pipefail
nnodes=1 nproc=1 endpoint="" run_id="dtrain" max_restarts=0
usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nnodes) nnodes="$2"; shift 2 ;;
    --nproc) nproc="$2"; shift 2 ;;
    --endpoint) endpoint="$2"; shift 2 ;;
    --run-id) run_id="$2"; shift 2 ;;
    --max-restarts) max_restarts="$2"; shift 2 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) echo "torchrun_multinode.sh: unknown option $1 (put dtrain arguments after --)" >&2; exit 2 ;;
  esac
done
[[ -n "$endpoint" ]] || { echo "torchrun_multinode.sh: --endpoint HOST:PORT of the rendezvous node is required" >&2; exit 2; }
exec torchrun --nnodes "$nnodes" --nproc-per-node "$nproc" --rdzv-backend c10d --rdzv-endpoint "$endpoint" \
  --rdzv-id "$run_id" --max-restarts "$max_restarts" -m dtrain.cli train "$@"
