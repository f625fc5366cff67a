#!/usr/bin/env bash
# Stop a run started by launch/tpu_run.sh on every worker: SIGTERM to the recorded
# process, so the train loop saves a checkpoint before it exits (rerun tpu_run.sh to
# resume).
#
# Usage: launch/tpu_stop.sh --name NAME --zone ZONE [--project PROJECT] [--dry-run]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_tpu_only_args "$@"
PID=$(quote "$PID_FILE")
tpu_ssh all "cd $(quote "$REMOTE_DIR") && if [ -f $PID ]; then kill -TERM \$(cat $PID) 2>/dev/null || true; fi"
