#!/usr/bin/env bash
# Train on the GPUs of this machine: one process sees every visible GPU, and the
# data-parallel mesh spans them all. Several machines: run it once per machine with
# the three multi-node flags (same --coordinator and --num-processes everywhere,
# --process-id 0..N-1; process 0's machine hosts the coordinator).
#
# Usage: launch/gpu_run.sh --config configs/pretrain.py[:variant] --workdir DIR
#            [--gpus 0,1,2,3] [--mem-fraction 0.9] [--tfds-data-dir DIR]
#            [--num-processes N --coordinator HOST:PORT --process-id I]
#            [--python PATH] [--dry-run] [--config.FIELD=VALUE ...] [-- EXTRA_FLAGS...]
#
#   --gpus           sets CUDA_VISIBLE_DEVICES (default: all GPUs)
#   --mem-fraction   sets XLA_PYTHON_CLIENT_MEM_FRACTION (JAX preallocates 0.75)
#   --tfds-data-dir  sets TFDS_DATA_DIR
#   --num-processes, --coordinator, --process-id
#                    forwarded as --num_processes, --coordinator_address and
#                    --process_id to updetr_jax.main (jax.distributed.initialize)
#   --python         interpreter (default: .venv/bin/python of the checkout, else python3)
#   --config.X=Y     config overrides, passed to updetr_jax.main as they are
# The workdir must be shared by all machines in a multi-node run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG='' WORKDIR='' GPUS='' MEM='' TFDS_DIR='' NPROC='' COORD='' PID='' ARGS=()
PYTHON=python3
if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; fi
while (($#)); do
  case $1 in
    --config | --config=*) optval "$@"; CONFIG=$VAL ;;
    --config.*) ARGS+=("$1"); NSHIFT=1 ;;
    --workdir | --workdir=*) optval "$@"; WORKDIR=$VAL ;;
    --gpus | --gpus=*) optval "$@"; GPUS=$VAL ;;
    --mem-fraction | --mem-fraction=*) optval "$@"; MEM=$VAL ;;
    --tfds-data-dir | --tfds-data-dir=*) optval "$@"; TFDS_DIR=$VAL ;;
    --num-processes | --num-processes=*) optval "$@"; NPROC=$VAL ;;
    --coordinator | --coordinator=*) optval "$@"; COORD=$VAL ;;
    --process-id | --process-id=*) optval "$@"; PID=$VAL ;;
    --python | --python=*) optval "$@"; PYTHON=$VAL ;;
    --) shift; ARGS+=("$@"); break ;;
    *) common_opt "$@" ;;
  esac
  shift "$NSHIFT"
done
require "$CONFIG" --config 'e.g. configs/pretrain.py'
require "$WORKDIR" --workdir

ENV=("PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}")
if [[ -n $GPUS ]]; then ENV+=("CUDA_VISIBLE_DEVICES=$GPUS"); fi
if [[ -n $MEM ]]; then ENV+=("XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM"); fi
if [[ -n $TFDS_DIR ]]; then ENV+=("TFDS_DATA_DIR=$TFDS_DIR"); fi
MAIN=("$PYTHON" -m updetr_jax.main "--config=$CONFIG" "--workdir=$WORKDIR")
if [[ -n $NPROC$COORD$PID ]]; then
  hint='multi-node runs need --num-processes, --coordinator and --process-id'
  require "$NPROC" --num-processes "$hint"
  require "$COORD" --coordinator "$hint"
  require "$PID" --process-id "$hint"
  if ! [[ $NPROC =~ ^[1-9][0-9]*$ && $PID =~ ^[0-9]+$ ]] || ((10#$PID >= 10#$NPROC)); then
    die "--process-id must be in 0..--num-processes-1 (got $PID of $NPROC)"
  fi
  [[ $COORD == *:[0-9]* ]] || die "--coordinator must be HOST:PORT (got $COORD)"
  MAIN+=("--coordinator_address=$COORD" "--num_processes=$NPROC" "--process_id=$PID")
fi
run env "${ENV[@]}" "${MAIN[@]}" ${ARGS[@]+"${ARGS[@]}"}
