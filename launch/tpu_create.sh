#!/usr/bin/env bash
# Create a Cloud TPU VM slice.
#
# Usage: launch/tpu_create.sh --name NAME --zone ZONE --accelerator-type TYPE
#            [--version RUNTIME] [--spot | --preemptible] [--project PROJECT]
#            [--dry-run] [-- EXTRA_GCLOUD_FLAGS...]
#
#   --name              TPU name (default: $TPU_NAME)
#   --zone              e.g. us-central2-b (default: $TPU_ZONE)
#   --project           GCP project (default: $TPU_PROJECT, else gcloud's config)
#   --accelerator-type  e.g. v4-32, v5litepod-16, v5p-32, v6e-16
#   --version           TPU software version; default from the accelerator type:
#                       v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5,
#                       v5e (v5litepod) -> v2-alpha-tpuv5-lite, else tpu-ubuntu2204-base
#   --spot              Spot VMs (cheaper, can be reclaimed at any time)
#   --preemptible       legacy preemptible VMs
#   --dry-run           print the commands instead of running them
# Words after `--` are appended to the gcloud command (e.g. --reserved, --network=N).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCEL='' VERSION='' SPOT=0 PREEMPTIBLE=0 EXTRA=()
while (($#)); do
  case $1 in
    --accelerator-type | --accelerator-type=*) optval "$@"; ACCEL=$VAL ;;
    --version | --version=*) optval "$@"; VERSION=$VAL ;;
    --spot) SPOT=1; NSHIFT=1 ;;
    --preemptible) PREEMPTIBLE=1; NSHIFT=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) tpu_opt "$@" ;;
  esac
  shift "$NSHIFT"
done
require_tpu
require "$ACCEL" --accelerator-type 'e.g. v4-32'
((SPOT + PREEMPTIBLE < 2)) || die '--spot and --preemptible are exclusive'
if [[ -z $VERSION ]]; then
  case $ACCEL in
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi

CMD=(gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}"
  "--accelerator-type=$ACCEL" "--version=$VERSION")
if ((SPOT)); then CMD+=(--spot); fi
if ((PREEMPTIBLE)); then CMD+=(--preemptible); fi
run "${CMD[@]}" ${EXTRA[@]+"${EXTRA[@]}"}
