"""Test settings: fast compiles (tests use tiny models) and exact float32 matmuls."""
import os
import sys
import tempfile

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')  # for subprocesses too
jax.config.update('jax_disable_most_optimizations', True)
jax.config.update('jax_default_matmul_precision', 'highest')

# Compiled programs are shared across the session's tests and subprocesses (reruns of
# the same step after a kill, the two-run comparisons): a fresh directory per session.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      tempfile.mkdtemp(prefix='updetr_jax_test_xla_cache_'))
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
