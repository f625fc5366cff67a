# shellcheck shell=bash disable=SC2034  # (variables set here are read by the scripts)
# Helpers sourced by the launch/*.sh scripts (not meant to be run on its own).
#
# Every script runs its commands through `run`. Under --dry-run `run` prints the
# command on one line instead, each word shell-quoted the way Python's shlex.quote
# quotes it, so `shlex.split(line)` gives back the exact argv (tests rely on this).
#
# Option parsing: the scripts loop over "$@" with a `case`; an option that takes a
# value accepts both `--flag value` and `--flag=value` through `optval`, which sets
# VAL (the value) and NSHIFT (how many words it used). `common_opt` handles the
# options every script shares, `tpu_opt` adds --name/--zone/--project.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=0
NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
REMOTE_DIR=updetr-jax  # the checkout on each TPU worker, relative to the home dir
PID_FILE=logs/train.pid  # pid of the run started by tpu_run.sh, in the checkout
VAL=''
NSHIFT=1

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

usage() {
  # The script's leading comment block (after the shebang), without the '# '.
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

quote() {
  # One word, shell-quoted (plain words stay as they are).
  if [[ -n $1 && $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\"\'\"\'}"
  fi
}

quote_all() {
  # All arguments, shell-quoted, joined by spaces.
  local out=() word
  for word in "$@"; do out+=("$(quote "$word")"); done
  printf '%s' "${out[*]}"
}

run() {
  # Run a command, or print it on one line under --dry-run.
  if ((DRY_RUN)); then
    quote_all "$@"
    echo
  else
    "$@"
  fi
}

optval() {
  # "--flag=value" or "--flag value" -> VAL, NSHIFT.
  if [[ $1 == *=* ]]; then
    VAL=${1#*=}
    NSHIFT=1
  else
    [[ $# -ge 2 && $2 != --* ]] || die "$1 needs a value"
    VAL=$2
    NSHIFT=2
  fi
}

common_opt() {
  # Options shared by all scripts; anything else is an error.
  NSHIFT=1
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
}

tpu_opt() {
  # --name / --zone / --project (defaults: $TPU_NAME, $TPU_ZONE, $TPU_PROJECT).
  case $1 in
    --name | --name=*) optval "$@"; NAME=$VAL ;;
    --zone | --zone=*) optval "$@"; ZONE=$VAL ;;
    --project | --project=*) optval "$@"; PROJECT=$VAL ;;
    *) common_opt "$@" ;;
  esac
}

require() {
  # require VALUE FLAG [HINT]: exit with a message naming FLAG when VALUE is empty.
  [[ -n $1 ]] || die "missing required argument $2${3:+ ($3)}"
}

require_tpu() {
  # Checks --name/--zone and sets GCLOUD_FLAGS (the flags every gcloud call takes).
  require "$NAME" --name 'or set TPU_NAME'
  require "$ZONE" --zone 'or set TPU_ZONE'
  GCLOUD_FLAGS=("--zone=$ZONE")
  if [[ -n $PROJECT ]]; then GCLOUD_FLAGS+=("--project=$PROJECT"); fi
}

parse_tpu_only_args() {
  # For scripts that take only --name/--zone/--project and the common flags.
  while (($#)); do
    tpu_opt "$@"
    shift "$NSHIFT"
  done
  require_tpu
}

tpu_ssh() {
  # tpu_ssh WORKER REMOTE_COMMAND: run a shell command on TPU workers.
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" "--worker=$1" \
    "--command=$2"
}
