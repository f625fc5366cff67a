r"""Entry point: ``python -m updetr_jax.main --config=configs/pretrain.py[:variant] --workdir=DIR``.

Any config field can be overridden, e.g. ``--config.batch_size=64``. Rerunning the
same command resumes from the latest checkpoint in ``DIR/checkpoints``.

Multi-host: run the same command in every process with ``--coordinator_address=
HOST:PORT --num_processes=N --process_id=I`` (or under SLURM / on a TPU pod slice,
where they are detected; see ``updetr_jax.distributed``).
"""
from absl import app, flags
from ml_collections import config_flags

from updetr_jax import cli, distributed, train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file[:variant]')
_WORKDIR = flags.DEFINE_string('workdir', None, 'output directory (checkpoints, logs)')
flags.mark_flags_as_required(['config', 'workdir'])
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'multi-host: HOST:PORT of process 0 (with --num_processes, '
    '--process_id)')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'multi-host: number of processes')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'multi-host: index of this process')
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    'local_device_ids', None, 'multi-host: local devices this process uses (default all)')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.setup_logging()
  distributed.maybe_initialize(  # before anything touches the JAX backend
      _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _LOCAL_DEVICE_IDS.value)
  summary = train.run(_CONFIG.value, _WORKDIR.value)
  print({k: v for k, v in summary.items() if k != 'data_stats'})


if __name__ == '__main__':
  app.run(main)
