#!/usr/bin/env bash
# Train on one GPU node (all its GPUs in one process; jax sees them as one mesh):
#
#   launch/gpu_node.sh setup                        # venv + pip install (CUDA 12 jax)
#   launch/gpu_node.sh train [--config.FIELD=VALUE ...]
#
# Re-running `train` with the same WORKDIR resumes from its latest checkpoint.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
CONFIG=${CONFIG:-configs/train/stage1.py}
WORKDIR=${WORKDIR:-$REPO/runs/$(basename "${CONFIG%.py}")}

case "${1:-}" in
  setup)
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -U pip
    "$VENV/bin/pip" install -q -e "$REPO" 'jax[cuda12]'
    ;;
  train)
    shift
    mkdir -p "$WORKDIR"
    # XLA may take most of the GPU memory up front; the trainer is the only user of the node.
    export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
    cd "$REPO"
    "$VENV/bin/helios-jax" train --config "$CONFIG" --workdir "$WORKDIR" "$@" 2>&1 | tee -a "$WORKDIR/train.log"
    ;;
  *)
    sed -n '2,8p' "$0"
    exit 2
    ;;
esac
