"""Test settings: fast compiles (tests use tiny models) and exact float32 matmuls."""
import os
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')  # for subprocesses too
jax.config.update('jax_disable_most_optimizations', True)
jax.config.update('jax_default_matmul_precision', 'highest')
