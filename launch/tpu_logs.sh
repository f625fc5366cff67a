#!/usr/bin/env bash
# Follow the training log written by launch/tpu_run.sh (tail -f; Ctrl-C to stop).
#
# Usage: launch/tpu_logs.sh --name NAME --zone ZONE [--worker 0|all|1,3]
#            [--lines N] [--log logs/train.log] [--project PROJECT] [--dry-run]
#
#   --worker  which worker's log (default 0, the one that writes checkpoints and
#             metrics); `all` interleaves every worker's log
#   --lines   lines of history shown first (default 100)
#   --log     log path in the checkout on the workers (default logs/train.log)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER=0 LINES=100 LOG=logs/train.log
while (($#)); do
  case $1 in
    --worker | --worker=*) optval "$@"; WORKER=$VAL ;;
    --lines | --lines=*) optval "$@"; LINES=$VAL ;;
    --log | --log=*) optval "$@"; LOG=$VAL ;;
    *) tpu_opt "$@" ;;
  esac
  shift "$NSHIFT"
done
require_tpu
tpu_ssh "$WORKER" "tail -n $(quote "$LINES") -F $(quote "$REMOTE_DIR/$LOG")"
