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


def _define_flags():
  config_flags.DEFINE_config_file('config', None, 'config file[:variant]')
  flags.DEFINE_string('workdir', None, 'output directory (checkpoints, logs)')
  flags.mark_flags_as_required(['config', 'workdir'])
  flags.DEFINE_string(
    'coordinator_address',
    None,
    'multi-host: HOST:PORT of process 0 (with --num_processes, --process_id)',
  )
  flags.DEFINE_integer('num_processes', None, 'multi-host: number of processes')
  flags.DEFINE_integer('process_id', None, 'multi-host: index of this process')
  flags.DEFINE_list(
    'local_device_ids', None, 'multi-host: local devices this process uses (default all)'
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.setup_logging()
  f = flags.FLAGS
  distributed.maybe_initialize(  # before anything touches the JAX backend
    f.coordinator_address, f.num_processes, f.process_id, f.local_device_ids
  )
  cli.tune_malloc(f.config.data.get('tune_malloc', True))
  summary = train.run(f.config, f.workdir)
  print({k: v for k, v in summary.items() if k not in ('data_stats', 'reading')})
  for line in summary.get('reading', ()):  # what the run was and how to read it, last
    print(line)


def cli_main():
  """Console script ``updetr-train``."""
  cli.run(main, _define_flags)


if __name__ == '__main__':
  cli_main()
