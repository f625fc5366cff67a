r"""Console script ``updetr-ssl-backbone``: a CNN trained self-supervised (SimCLR) on
unlabeled images, written as a torchvision-layout ``WORKDIR/backbone.npz`` for
``config.init.backbone_checkpoint`` (the method: ``updetr_jax/tasks/simclr.py``).

  updetr-ssl-backbone --workdir=workdir/ssl --config.data.folder=/path/to/images \
      [--config.num_train_steps=500 --config.model.backbone=resnet_small ...]

The training loop is ``updetr-train``'s (``train.run``), with ``configs/ssl_backbone.py``
as the default config: rerunning the command resumes, a SIGTERM checkpoints the step.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from updetr_jax import cli, train

DEFAULT_CONFIG = os.path.join(cli.CONFIG_DIR, 'ssl_backbone.py')


def _define_flags():
  config_flags.DEFINE_config_file('config', DEFAULT_CONFIG, 'config file (task simclr)')
  flags.DEFINE_string('workdir', None, 'output directory (backbone.npz, checkpoints, logs)')
  flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.setup_logging()
  summary = train.run(flags.FLAGS.config, flags.FLAGS.workdir)
  print({k: v for k, v in summary.items() if k != 'data_stats'})


def cli_main():
  """Console script ``updetr-ssl-backbone``."""
  cli.run(main, _define_flags)


if __name__ == '__main__':
  cli_main()
