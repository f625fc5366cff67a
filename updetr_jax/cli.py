"""Command-line plumbing shared by the entry points (``updetr_jax.main``, ``compare``,
``predict``, ``torch_import``, ``ssl_backbone``).

Logging: every module logs through absl (``from absl import logging``); progress
(steps/s, ETA, evaluations, checkpoints) is INFO, problems are WARNING or ERROR.
``setup_logging`` makes this package's INFO lines visible by default on the command
line, while other libraries (Orbax, JAX, TensorFlow) stay at WARNING. An explicit
``--verbosity`` (absl: 0 = INFO, -1 = WARNING, 1 = DEBUG ...) turns this off and
applies to every library, as absl users expect; ``--logtostderr`` / ``--log_dir``
behave as usual.
"""
from __future__ import annotations

import logging as std_logging
import os

from absl import flags, logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _OwnInfo(std_logging.Filter):
  """Lets WARNING and above through, and INFO of this package's modules."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return (record.levelno >= std_logging.WARNING
            or os.path.abspath(record.pathname).startswith(_PACKAGE_DIR))


def setup_logging() -> None:
  """Call at the start of a CLI ``main`` (after absl parsed the flags)."""
  if flags.FLAGS['verbosity'].present:
    return
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OwnInfo) for f in handler.filters):
    handler.addFilter(_OwnInfo())
