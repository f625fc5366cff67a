#!/usr/bin/env bash
# Start a training run on every worker of a TPU slice (in the background, under
# nohup; follow it with launch/tpu_logs.sh, stop it with launch/tpu_stop.sh).
#
# Usage: launch/tpu_run.sh --name NAME --zone ZONE --config configs/pretrain.py[:variant]
#            --workdir gs://BUCKET/PATH [--tfds-data-dir gs://BUCKET/tfds]
#            [--log logs/train.log] [--project PROJECT] [--dry-run]
#            [--config.FIELD=VALUE ...] [-- EXTRA_MAIN_FLAGS...]
#
#   --config         config file[:variant], relative to the checkout
#   --workdir        checkpoints and metrics; must be shared by all workers (GCS)
#   --tfds-data-dir  exported as TFDS_DATA_DIR on the workers
#   --log            log file on each worker, relative to the checkout
#   --config.X=Y     config overrides, passed to updetr_jax.main as they are
#
# Each worker runs the same `python -m updetr_jax.main`; jax.distributed.initialize()
# finds the other workers of the slice by itself, so no coordinator flags are needed.
# Rerunning the command resumes from the latest checkpoint in the workdir. A worker
# where the previous run is still alive refuses to start a second one.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG='' WORKDIR='' TFDS_DIR='' LOG=logs/train.log ARGS=()
while (($#)); do
  case $1 in
    --config | --config=*) optval "$@"; CONFIG=$VAL ;;
    --config.*) ARGS+=("$1"); NSHIFT=1 ;;
    --workdir | --workdir=*) optval "$@"; WORKDIR=$VAL ;;
    --tfds-data-dir | --tfds-data-dir=*) optval "$@"; TFDS_DIR=$VAL ;;
    --log | --log=*) optval "$@"; LOG=$VAL ;;
    --) shift; ARGS+=("$@"); break ;;
    *) tpu_opt "$@" ;;
  esac
  shift "$NSHIFT"
done
require_tpu
require "$CONFIG" --config 'e.g. configs/pretrain.py'
require "$WORKDIR" --workdir 'e.g. gs://BUCKET/updetr/run1'
[[ $WORKDIR == gs://* ]] || echo "warning: --workdir $WORKDIR is not on GCS;" \
  'every worker then writes its own local copy' >&2

MAIN=(.venv/bin/python -m updetr_jax.main "--config=$CONFIG" "--workdir=$WORKDIR")
MAIN+=(${ARGS[@]+"${ARGS[@]}"})
ENV=''
if [[ -n $TFDS_DIR ]]; then ENV="export TFDS_DATA_DIR=$(quote "$TFDS_DIR"); "; fi
PID=$(quote "$PID_FILE")
DIRS=("$(dirname "$PID_FILE")")
if [[ $(dirname "$LOG") != "${DIRS[0]}" ]]; then DIRS+=("$(dirname "$LOG")"); fi
tpu_ssh all "cd $(quote "$REMOTE_DIR") && mkdir -p $(quote_all "${DIRS[@]}") && \
if [ -f $PID ] && kill -0 \$(cat $PID) 2>/dev/null; then \
echo \"\$(hostname): a run is still alive (pid \$(cat $PID))\" >&2; exit 1; fi; \
${ENV}nohup $(quote_all "${MAIN[@]}") > $(quote "$LOG") 2>&1 < /dev/null & echo \$! > $PID"
