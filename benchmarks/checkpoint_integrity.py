"""Checkpoint integrity overhead on the release model's training state.

The state of UP-DETR pre-training (ResNet-50 frozen, 6+6 transformer layers, AdamW
moments of the trainable weights; ``configs/pretrain.py``) with random values, saved
and restored to a local directory, synchronously so the whole save is timed:

  save_plain_s:     Orbax ``StandardSave`` alone (what a save cost before the records)
  save_verified_s:  ``checkpoints.TrainCheckpoints.save`` + its file record
  record_s:         the array record alone (checksums on device, ``integrity.make_record``)
  restore_plain_s:  Orbax ``StandardRestore`` alone
  restore_verified_s: ``TrainCheckpoints.restore`` (file record, array record, checksums)

Medians over ``--repeats`` after one warm-up (checksum compilation excluded: it is
paid once per process); every number is measured here, none quoted. One JSON object
on stdout.

    python benchmarks/checkpoint_integrity.py [--repeats 3] [--dir /tmp/ckpt_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from updetr_jax.configs import pretrain  # noqa: E402
from updetr_jax import checkpoints, integrity, train_step  # noqa: E402
from updetr_jax.models import build_model  # noqa: E402


def release_state():
  """{'state', 'constants'} of the release pre-training config, random values."""
  config = pretrain.get_config()
  model = build_model(config.model)
  abstract = jax.eval_shape(
    lambda: train_step.init_train_state(config, model, jax.random.PRNGKey(0), 100)[1:3]
  )
  leaves, tree = jax.tree_util.tree_flatten(abstract)
  rng = np.random.default_rng(0)
  values = [
    jax.numpy.asarray(rng.standard_normal(x.shape).astype(x.dtype))
    if np.issubdtype(x.dtype, np.floating)
    else jax.numpy.zeros(x.shape, x.dtype)
    for x in leaves
  ]
  state, constants = jax.tree_util.tree_unflatten(tree, values)
  return config, {'state': state, 'constants': constants}


def timed(fn) -> float:
  t = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--dir', default=None, help='where to write (default: a temp dir)')
  args = parser.parse_args()
  root = args.dir or tempfile.mkdtemp(prefix='ckpt_bench_')
  config, tree = release_state()
  n = sum(x.size for x in jax.tree_util.tree_leaves(tree))
  nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
  integrity.make_record(tree)  # compile the checksums (once per process)

  results = {
    k: []
    for k in (
      'save_plain_s',
      'save_verified_s',
      'record_s',
      'restore_plain_s',
      'restore_verified_s',
    )
  }
  for r in range(args.repeats + 1):
    shutil.rmtree(root, ignore_errors=True)
    plain = checkpoints.train_manager(
      os.path.join(root, 'plain'), save_every_steps=1, keep=1, async_save=False
    )
    ours = checkpoints.TrainCheckpoints(
      os.path.join(root, 'verified'), config=config, async_save=False
    )
    t = {
      'save_plain_s': timed(
        lambda: plain.save(1, args=checkpoints.ocp.args.StandardSave(tree), force=True)
      ),
      'save_verified_s': timed(
        lambda: (ours.save(1, tree, force=True), ours.wait_until_finished())
      ),
      'record_s': timed(lambda: integrity.make_record(tree)),
      'restore_plain_s': timed(
        lambda: plain.restore(1, args=checkpoints.ocp.args.StandardRestore(tree))
      ),
      'restore_verified_s': timed(lambda: ours.restore(1, tree)),
    }
    if r:  # the first round warms Orbax and the file cache
      for k, v in t.items():
        results[k].append(v)
  shutil.rmtree(root, ignore_errors=True)
  out = {
    'model': 'UP-DETR pre-training (ResNet-50, 6+6 layers), state with AdamW moments',
    'arrays': len(jax.tree_util.tree_leaves(tree)),
    'values': n,
    'megabytes': round(nbytes / 2**20, 1),
    'backend': jax.default_backend(),
    'repeats': args.repeats,
  }
  out.update({k: round(statistics.median(v), 3) for k, v in results.items()})
  out['save_overhead'] = round(out['save_verified_s'] / out['save_plain_s'] - 1, 3)
  out['restore_overhead'] = round(out['restore_verified_s'] / out['restore_plain_s'] - 1, 3)
  print(json.dumps(out))


if __name__ == '__main__':
  main()
