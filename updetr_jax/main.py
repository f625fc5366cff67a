r"""Entry point: ``python -m updetr_jax.main --config=configs/pretrain.py[:variant] --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.batch_size=64``. Rerunning the
same command resumes from the latest checkpoint in ``DIR/checkpoints``.
"""
import logging

from absl import app, flags
from ml_collections import config_flags

from updetr_jax import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file[:variant]')
_WORKDIR = flags.DEFINE_string('workdir', None, 'output directory (checkpoints, logs)')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.getLogger().setLevel(logging.WARNING)
  summary = train.run(_CONFIG.value, _WORKDIR.value)
  print({k: v for k, v in summary.items() if k != 'data_stats'})


if __name__ == '__main__':
  app.run(main)
