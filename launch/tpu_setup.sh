#!/usr/bin/env bash
# Install the code and its Python environment on every worker of a TPU slice.
#
# Usage: launch/tpu_setup.sh --name NAME --zone ZONE (--repo URL [--branch REF] | --copy)
#            [--python python3.11] [--jax-version X.Y.Z] [--project PROJECT] [--dry-run]
#
#   --repo URL     git clone URL on each worker (a rerun pulls instead)
#   --branch REF   branch or tag to check out with --repo
#   --copy         send this working tree instead: the files git tracks or would
#                  track (ignored paths such as .venv/ and workdir/ left out), packed
#                  into one tarball and copied with `gcloud compute tpus tpu-vm scp`
#   --python       interpreter for the venv (default python3.11, apt-installed when
#                  missing)
#   --jax-version  jax[tpu] version (default: the jax== pin of requirements.txt)
#
# On each worker: ~/updetr-jax holds the code and ~/updetr-jax/.venv the venv with
# requirements.txt and jax[tpu] (libtpu) at the same version as the jax pin.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO='' BRANCH='' COPY=0 PYTHON=python3.11 JAX_VERSION=''
while (($#)); do
  case $1 in
    --repo | --repo=*) optval "$@"; REPO=$VAL ;;
    --branch | --branch=*) optval "$@"; BRANCH=$VAL ;;
    --copy) COPY=1; NSHIFT=1 ;;
    --python | --python=*) optval "$@"; PYTHON=$VAL ;;
    --jax-version | --jax-version=*) optval "$@"; JAX_VERSION=$VAL ;;
    *) tpu_opt "$@" ;;
  esac
  shift "$NSHIFT"
done
require_tpu
[[ -n $REPO || $COPY == 1 ]] || die 'missing required argument --repo URL (or --copy)'
[[ -z $REPO || $COPY == 0 ]] || die '--repo and --copy are exclusive'
if [[ -z $JAX_VERSION ]]; then
  JAX_VERSION=$(sed -n 's/^jax==\([^[:space:]#;]*\).*/\1/p' "$ROOT/requirements.txt")
  [[ -n $JAX_VERSION ]] || die "no jax== pin in $ROOT/requirements.txt (pass --jax-version)"
fi

DIR=$(quote "$REMOTE_DIR")
if ((COPY)); then
  TARBALL=${TMPDIR:-/tmp}/updetr-jax-$NAME.tar.gz
  run bash -c "cd $(quote "$ROOT") && git ls-files -z --cached --others --exclude-standard | tar -czf $(quote "$TARBALL") --null -T -"
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$NAME:updetr-jax.tar.gz" \
    "${GCLOUD_FLAGS[@]}" --worker=all
  FETCH="mkdir -p $DIR && tar -xzf updetr-jax.tar.gz -C $DIR"
else
  CLONE=(git clone)
  if [[ -n $BRANCH ]]; then CLONE+=(--branch "$BRANCH"); fi
  FETCH="if [ -d $DIR/.git ]; then git -C $DIR pull --ff-only; else $(quote_all "${CLONE[@]}" "$REPO" "$REMOTE_DIR"); fi"
fi
PY=$(quote "$PYTHON")
INSTALL_PY="command -v $PY >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q $PY $PY-venv; }"
VENV="cd $DIR && $PY -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -r requirements.txt $(quote "jax[tpu]==$JAX_VERSION")"
CHECK=".venv/bin/python -c $(quote 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)')"
tpu_ssh all "set -e; $INSTALL_PY; $FETCH; $VENV; $CHECK"
