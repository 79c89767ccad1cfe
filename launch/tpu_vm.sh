#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it, copy this repository to every worker, install,
# and start `helios-jax train` on all workers at once (jax joins the hosts by itself on a slice).
#
#   launch/tpu_vm.sh create           # make the TPU VM / slice (spot unless SPOT=0)
#   launch/tpu_vm.sh setup            # copy the repo to every worker and pip install it
#   launch/tpu_vm.sh train [--config.FIELD=VALUE ...]   # start (or resume) training on every worker
#   launch/tpu_vm.sh logs             # follow worker 0's log
#   launch/tpu_vm.sh delete
#
# After a preemption: `create`, `setup`, `train` again with the same WORKDIR: the trainer picks the
# latest checkpoint in WORKDIR/checkpoints and goes on from there (same loss sequence as without
# the interruption). WORKDIR must be shared by all workers: a gs:// bucket path.
set -euo pipefail

NAME=${NAME:-helios-train}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-32}            # e.g. v4-8 (one host), v4-32, v5p-64, v6e-16
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
SPOT=${SPOT:-1}
CONFIG=${CONFIG:-configs/train/stage1.py}
WORKDIR=${WORKDIR:?set WORKDIR to a gs://bucket/path shared by all workers}
REPO=$(cd "$(dirname "$0")/.." && pwd)
REMOTE_DIR=helios-jax

tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE"; }
on_all() { tpu ssh "$NAME" --worker=all --command="$1"; }

case "${1:-}" in
  create)
    extra=()
    [[ "$SPOT" == 1 ]] && extra+=(--spot)
    tpu create "$NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME" "${extra[@]}"
    ;;
  setup)
    archive=$(mktemp -d)/helios-jax.tar.gz
    git -C "$REPO" archive --format=tar.gz --prefix="$REMOTE_DIR/" -o "$archive" HEAD
    tpu scp "$archive" "$NAME":~/helios-jax.tar.gz --worker=all
    on_all "rm -rf ~/$REMOTE_DIR && tar xzf ~/helios-jax.tar.gz -C ~ && cd ~/$REMOTE_DIR &&
            python3 -m venv ~/venv && ~/venv/bin/pip install -q -U pip &&
            ~/venv/bin/pip install -q -e '.' 'jax[tpu]' gcsfs"
    ;;
  train)
    shift
    overrides=$(printf ' %q' "$@")
    # Every worker runs the same command; on a multi-host slice TPU_WORKER_HOSTNAMES lets
    # helios_jax.distributed join them (jax.distributed.initialize) before any device is used.
    on_all "cd ~/$REMOTE_DIR && nohup ~/venv/bin/helios-jax train --config $CONFIG --workdir $WORKDIR$overrides \
            > ~/train.log 2>&1 < /dev/null &"
    echo "started on every worker of $NAME; follow with: $0 logs"
    ;;
  logs)
    tpu ssh "$NAME" --worker=0 --command="tail -f ~/train.log"
    ;;
  delete)
    tpu delete "$NAME" --quiet
    ;;
  *)
    sed -n '2,14p' "$0"
    exit 2
    ;;
esac
