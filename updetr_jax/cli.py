"""Command-line plumbing shared by the entry points (``updetr_jax.main``, ``compare``,
``predict``, ``torch_import``, ``export``, ``ssl_backbone``).

Every entry point has the same shape, so that its console script (pyproject.toml) and
its ``python -m`` form are one thing::

  def _define_flags(): ...        # absl flags, defined only when run as a program
  def main(argv): ...
  def cli_main():                 # the console script
    cli.run(main, _define_flags)
  if __name__ == '__main__':
    cli_main()

``run`` resolves ``--config=configs/<file>.py[:variant]`` against the installed
package when the path does not exist (so the configs work from any directory after
``pip install``), then hands over to ``absl.app.run``.

Logging: every module logs through absl (``from absl import logging``); progress
(steps/s, ETA, evaluations, checkpoints) is INFO, problems are WARNING or ERROR.
``setup_logging`` makes this package's INFO lines visible by default on the command
line, while other libraries (Orbax, JAX, TensorFlow) stay at WARNING. An explicit
``--verbosity`` (absl: 0 = INFO, -1 = WARNING, 1 = DEBUG ...) turns this off and
applies to every library, as absl users expect; ``--logtostderr`` / ``--log_dir``
behave as usual.

``tune_malloc``: the glibc malloc settings the entry points that run an input pipeline
(``main``, ``compare``) apply at start-up when the config's ``data.tune_malloc`` asks.
"""

from __future__ import annotations

import ctypes
import logging as std_logging
import os
import sys
from typing import Callable, Sequence

from absl import app, flags, logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
CONFIG_DIR = os.path.join(_PACKAGE_DIR, 'configs')


def resolve_config_args(argv: Sequence[str]) -> list[str]:
  """``--config=configs/x.py[:variant]`` (or ``x.py``) -> the packaged config file when
  the given path does not exist; other arguments unchanged."""
  out = []
  for arg in argv:
    if arg.startswith('--config='):
      path, sep, variant = arg[len('--config=') :].partition(':')
      if path and not os.path.exists(path):
        rel = path[len('configs/') :] if path.startswith('configs/') else path
        packaged = os.path.join(CONFIG_DIR, rel)
        if os.path.exists(packaged):
          arg = f'--config={packaged}{sep}{variant}'
    out.append(arg)
  return out


def run(main: Callable, define_flags: Callable | None = None) -> None:
  """A console script / ``python -m`` entry: flags, config paths, ``app.run(main)``."""
  if define_flags is not None:
    define_flags()
  module = sys.modules[main.__module__]
  if module.__name__ != '__main__':  # a console script: --help shows the module's own
    fv = flags.FLAGS  # docstring and flags, as `python -m` does
    for flag in fv.get_key_flags_for_module(module.__name__):
      fv.register_key_flag_for_module(sys.argv[0], flag)
    sys.modules['__main__'].__doc__ = module.__doc__
  app.run(main, argv=resolve_config_args(sys.argv))


class _OwnInfo(std_logging.Filter):
  """Lets WARNING and above through, and INFO of this package's modules."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or os.path.abspath(record.pathname).startswith(
      _PACKAGE_DIR
    )


def setup_logging() -> None:
  """Call at the start of a CLI ``main`` (after absl parsed the flags)."""
  if flags.FLAGS['verbosity'].present:
    return
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OwnInfo) for f in handler.filters):
    handler.addFilter(_OwnInfo())


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MALLOC_SETTINGS = (
  ('M_MMAP_THRESHOLD', _M_MMAP_THRESHOLD, 32 << 20),
  ('M_TRIM_THRESHOLD', _M_TRIM_THRESHOLD, 1 << 30),
  ('M_TOP_PAD', _M_TOP_PAD, 512 << 20),
)
_malloc_tuned = False


def tune_malloc(enabled: bool = True) -> bool:
  """glibc malloc settings for the input pipeline's large short-lived buffers.

  Process-wide (XLA's allocations included). By default glibc returns freed memory
  to the OS and maps big blocks afresh, so every batch pays page faults (kernel
  zeroing): about half the CPU time of the pipeline. Sets M_MMAP_THRESHOLD 32 MiB,
  M_TRIM_THRESHOLD 1 GiB, M_TOP_PAD 512 MiB and logs them. Linux/glibc only; does
  nothing when ``enabled`` is False (the config's ``data.tune_malloc``). Returns
  whether the settings are in effect.
  """
  global _malloc_tuned
  if not enabled or _malloc_tuned:
    return _malloc_tuned
  if not sys.platform.startswith('linux'):
    logging.info('malloc: not tuned (glibc only, platform %s)', sys.platform)
    return False
  try:
    mallopt = ctypes.CDLL('libc.so.6').mallopt
  except (OSError, AttributeError):
    logging.info('malloc: not tuned (no glibc mallopt)')
    return False
  _malloc_tuned = all(mallopt(param, value) for _, param, value in _MALLOC_SETTINGS)
  if _malloc_tuned:
    logging.info(
      'malloc: set %s (glibc mallopt, process-wide)',
      ', '.join(f'{name} {value >> 20} MiB' for name, _, value in _MALLOC_SETTINGS),
    )
  else:
    logging.warning('malloc: mallopt refused the settings; glibc defaults kept')
  return _malloc_tuned
