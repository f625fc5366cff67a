"""Test settings: fast compiles (tests use tiny models) and exact float32 matmuls;
optional test dependencies.

Optional dependencies (``OPTIONAL_DEPS``): tests import them with ``importorskip``
below. Locally a missing one skips its tests (``pytest.ini`` prints the reasons);
under ``CI=true`` (set by the CI) it fails the run instead: pytest stops before
collecting if one is not installed, and a test module whose import of one fails is a
collection error.
"""

import importlib
import importlib.util
import os
import sys
import tempfile

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')  # for subprocesses too
jax.config.update('jax_disable_most_optimizations', True)
jax.config.update('jax_default_matmul_precision', 'highest')

# Compiled programs are shared across a pytest run's tests and subprocesses (reruns of
# the same step after a kill, the two-run comparisons): a fresh directory per run.
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='updetr_jax_test_xla_cache_')
)
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])


# Module -> the requirements file that installs it (`make install` installs both).
OPTIONAL_DEPS = {
  'torch': 'requirements-dev.txt',
  'tensorflow': 'requirements.txt',
  'tensorflow_datasets': 'requirements.txt',
  'array_record': 'requirements.txt',  # TFDS' random-access format
}


def on_ci() -> bool:
  """True when the CI runs the tests (CI=true): optional dependencies are required."""
  return os.environ.get('CI') == 'true'


def _hint(modname: str) -> str:
  return f'pip install -r {OPTIONAL_DEPS.get(modname, "requirements-dev.txt")}'


def importorskip(modname: str, reason: str | None = None):
  """Imports and returns ``modname``; if that fails, skips the calling test module
  (or test) with ``reason`` (default: names the module, the error and how to install
  it), or fails it under CI=true.
  """
  __tracebackhide__ = True  # report the caller's line
  try:
    return importlib.import_module(modname)
  except ImportError as e:
    error = e
  message = f'could not import optional test dependency {modname!r} ({_hint(modname)}): {error}'
  if on_ci():
    pytest.fail(f'CI=true: {message}', pytrace=False)
  pytest.skip(reason or message, allow_module_level=True)


def _installed(modname: str) -> bool:
  try:
    return importlib.util.find_spec(modname) is not None
  except (ImportError, ValueError):  # e.g. blocked, or sys.modules[modname] is None
    return False


def pytest_configure(config):
  """Under CI=true, stops the run (usage error) if an optional dependency is missing."""
  del config
  if on_ci():
    missing = [m for m in OPTIONAL_DEPS if not _installed(m)]
    if missing:
      raise pytest.UsageError(
        '\n'.join(
          f'CI=true: optional test dependency {m!r} is not installed ({_hint(m)})' for m in missing
        )
      )


# Exit without interpreter teardown once pytest has reported. TensorFlow can deadlock
# while Python tears down: seen once here, a full-suite run that had printed "221
# passed" hung in tf.data's ~IteratorResource (waiting for its thread pool while the
# main thread held the GIL, under updetr_jax.data.batching._close_iterators) until
# killed. Every test has finished and been reported by then; only the exit is cut.
_EXIT_STATUS = {}


def pytest_sessionfinish(session, exitstatus):
  _EXIT_STATUS['status'] = int(exitstatus)


def pytest_unconfigure(config):
  if 'status' in _EXIT_STATUS and os.environ.get('UPDETR_TEST_TEARDOWN') != '1':
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT_STATUS['status'])
