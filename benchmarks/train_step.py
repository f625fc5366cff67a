"""Times the UP-DETR pre-training step (release model: R50 frozen, pre-norm, N=100, M=10).

  python benchmarks/train_step.py --batch 2 --image-size 320 [--repeats 5] [--dtype bfloat16]
      [--remat transformer|backbone|all] [--attention einsum|dot_product|cudnn]

Prints one JSON line: images_per_s, step_s (median), batch, image_size, device, ...
Synthetic inputs (random uint8 images, patch rectangles and seeds, as the host
sends them); the whole jitted step is timed: the device-side patch crops and
their augmentation (``augment_flops_per_step``, ``augment_share_of_step``), the
forward of the frozen backbone on images and patches, transformer forward/backward,
on-device matching for all decoder layers, AdamW update.

FLOPs and MFU (updetr_jax/mfu.py): flops_per_step is XLA's count for the lowered
(unpartitioned, whole-mesh) step, recomputation included when --remat is on;
achieved_flops_per_s = flops_per_step / step_s. model_flops_per_step counts the
same step lowered without remat (what the model needs), and mfu = model FLOP/s
over the peak of all devices (hfu uses flops_per_step instead). The peak is
looked up for peak_dtype: bfloat16 for --dtype bfloat16; for float32, 'tf32' on
GPUs at JAX's default matmul precision (float32 matmuls run on the tensor
cores), else 'float32'. mfu/hfu are null where the peak is unknown (CPU).

TensorFlow-free: the release config, the synthetic batch and the timing come from
benchmarks/device_suite.py (the suite of every step case on one GPU), which also
measures fine-tuning, bfloat16, fused attention and the matching share.
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

from benchmarks.device_suite import (  # noqa: E402
  peak_info,
  release_preparer,
  step_config,
  synthetic_batch,
  time_calls,
)
from updetr_jax import mfu, train_step  # noqa: E402
from updetr_jax.models import ATTENTION_CHOICES, REMAT_CHOICES, build_model  # noqa: E402
from updetr_jax.sharding import make_mesh, to_global  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--image-size', type=int, default=320)
  p.add_argument('--patch-size', type=int, default=128)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--backbone', default='resnet50')
  p.add_argument(
    '--remat',
    default='',
    choices=REMAT_CHOICES,
    help="rematerialise 'transformer' layers, 'backbone' blocks or 'all'",
  )
  p.add_argument(
    '--attention',
    default='einsum',
    choices=ATTENTION_CHOICES,
    help="model.attention: 'einsum' (release) or jax.nn.dot_product_attention",
  )
  args = p.parse_args()

  config = step_config(
    'pretrain',
    batch_size=args.batch,
    backbone=args.backbone,
    dtype=args.dtype,
    remat=args.remat,
    attention=args.attention,
  )
  model = build_model(config.model)
  _, state, constants, tx, _ = train_step.init_train_state(
    config, model, jax.random.PRNGKey(0), steps_per_epoch=1000
  )
  mesh = make_mesh()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state, constants = jax.device_put((state, constants), repl)
  batch = to_global(
    synthetic_batch(args.batch, args.image_size, config.model.num_patches, args.patch_size),
    sharding,
  )
  loss_fn = train_step.criterion(config)
  # The step starts with the device-side patch pipeline (crop, augmentation,
  # normalisation: updetr_jax/device_augment.py), as in training.
  prepare = release_preparer(args.patch_size, sharding)
  # XLA counts the patch loop's body once: add the other iterations (uncounted_flops).
  uncounted = prepare.uncounted_flops(batch)
  augment_flops = mfu.step_flops(jax.jit(prepare).lower(batch))
  augment_flops = augment_flops + uncounted if augment_flops else None
  step = jax.jit(
    train_step.make_train_step(model, tx, loss_fn, prepare),
    donate_argnums=(0,),
    out_shardings=(repl, repl),
  )
  rng = jax.random.PRNGKey(1)
  t0 = time.perf_counter()
  lowered = step.lower(state, constants, batch, rng)
  flops = mfu.step_flops(lowered)
  flops = flops + uncounted if flops else None
  compiled = lowered.compile()
  state, metrics = compiled(state, constants, batch, rng)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  model_flops = flops
  if args.remat:  # count the step without recomputation (lowering only, no compile)
    plain = build_model(dict(config.model, remat=''))
    model_flops = mfu.step_flops(
      jax.jit(train_step.make_train_step(plain, tx, loss_fn, prepare)).lower(
        state, constants, batch, rng
      )
    )
    model_flops = model_flops + uncounted if model_flops else None
  holder = {'state': state}

  def call():
    holder['state'], m = compiled(holder['state'], constants, batch, rng)
    return m

  metrics, times = time_calls(call, 0, args.repeats)
  step_s = statistics.median(times)
  device = jax.devices()[0]
  peak_name, peak = peak_info(args.dtype, device)
  n = jax.device_count()
  util = mfu.mfu(model_flops, step_s, n, peak)
  hw_util = mfu.mfu(flops, step_s, n, peak)
  print(
    json.dumps(
      {
        'images_per_s': round(args.batch / step_s, 3),
        'step_s': round(step_s, 4),
        'batch': args.batch,
        'image_size': args.image_size,
        'device': str(device),
        'device_kind': device.device_kind,
        'num_devices': n,
        'dtype': args.dtype,
        'remat': args.remat,
        'backbone': args.backbone,
        'attention': args.attention,
        'compile_s': round(compile_s, 1),
        'times_s': [round(t, 4) for t in times],
        'loss': float(metrics['loss']),
        'flops_per_step': flops,
        # The device-side patch pipeline alone (XLA cost analysis) and its share
        # of the step (it is inside flops_per_step).
        'augment_flops_per_step': augment_flops,
        'augment_share_of_step': augment_flops / flops if augment_flops and flops else None,
        'model_flops_per_step': model_flops,
        'achieved_flops_per_s': flops / step_s if flops else None,
        'peak_dtype': peak_name,
        'peak_flops_per_device': peak,
        'mfu': None if util is None else round(util, 4),
        'hfu': None if hw_util is None else round(hw_util, 4),
      }
    )
  )


if __name__ == '__main__':
  main()
