#!/usr/bin/env bash
# Delete a Cloud TPU VM slice (no confirmation prompt).
#
# Usage: launch/tpu_delete.sh --name NAME --zone ZONE [--project PROJECT] [--dry-run]
#
# The workdir on GCS (checkpoints, logs) is kept; the worker disks are not.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_tpu_only_args "$@"
run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
