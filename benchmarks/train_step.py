"""Times the UP-DETR pre-training step (release model: R50 frozen, pre-norm, N=100, M=10).

  python benchmarks/train_step.py --batch 2 --image-size 320 [--repeats 5] [--dtype bfloat16]

Prints one JSON line: images_per_s, step_s (median), batch, image_size, device, ...
Synthetic inputs (random images and patch boxes); the whole jitted step is timed:
forward of the frozen backbone on images and patches, transformer forward/backward,
on-device matching for all decoder layers, AdamW update.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import pretrain  # noqa: E402
from updetr_jax import train  # noqa: E402
from updetr_jax.models import build_model  # noqa: E402


def synthetic_batch(batch, size, num_patches, patch_size, seed=0):
  rng = np.random.default_rng(seed)
  wh = rng.uniform(0.1, 0.5, (batch, num_patches, 2))
  c = rng.uniform(wh / 2, 1 - wh / 2)
  return {
      'images': rng.standard_normal((batch, size, size, 3)).astype(np.float32),
      'padding_mask': np.zeros((batch, size, size), bool),
      'patches': rng.standard_normal((batch, num_patches, patch_size, patch_size, 3)
                                     ).astype(np.float32),
      'targets': {'boxes': np.concatenate([c, wh], -1).astype(np.float32),
                  'labels': np.ones((batch, num_patches), np.int32),
                  'mask': np.ones((batch, num_patches), bool)},
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--image-size', type=int, default=320)
  p.add_argument('--patch-size', type=int, default=128)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--dtype', default='float32')
  p.add_argument('--backbone', default='resnet50')
  args = p.parse_args()

  config = pretrain.get_config()
  config.model.backbone = args.backbone
  config.model.dtype = args.dtype
  config.batch_size = args.batch
  config.loss_replicas = 1
  model = build_model(config.model)
  _, state, constants, tx, _ = train.init_train_state(
      config, model, jax.random.PRNGKey(0), steps_per_epoch=1000)
  mesh = train.make_mesh()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state, constants = jax.device_put((state, constants), repl)
  batch = train.to_global(synthetic_batch(args.batch, args.image_size,
                                          config.model.num_patches, args.patch_size),
                          sharding)
  step = jax.jit(train.make_train_step(model, tx, train.criterion(config)),
                 donate_argnums=(0,), out_shardings=(repl, repl))
  rng = jax.random.PRNGKey(1)
  t0 = time.perf_counter()
  state, metrics = step(state, constants, batch, rng)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    state, metrics = step(state, constants, batch, rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  print(json.dumps({
      'images_per_s': round(args.batch / step_s, 3), 'step_s': round(step_s, 4),
      'batch': args.batch, 'image_size': args.image_size, 'device': str(jax.devices()[0]),
      'device_kind': jax.devices()[0].device_kind, 'num_devices': jax.device_count(),
      'dtype': args.dtype, 'backbone': args.backbone, 'compile_s': round(compile_s, 1),
      'times_s': [round(t, 4) for t in times], 'loss': float(metrics['loss']),
  }))


if __name__ == '__main__':
  main()
