#!/usr/bin/env bash
# The device benchmark suite in one command (see benchmarks/device_suite.py's docstring):
#   bash benchmarks/device_suite.sh [--tiny] [--cases a,b] [--budget-s 450] [--out FILE]
# Python: $PYTHON, else the repository's .venv when there is one, else python3.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
# GPU: room for the fine-tuning step's activations (batch 32 at 800x1088, float32).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export PYTHONUNBUFFERED=1
exec "$PYTHON" "$root/benchmarks/device_suite.py" "$@"
