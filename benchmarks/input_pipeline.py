"""Input-pipeline benchmark: the release patch pipeline on ImageNet-sized JPEGs.

Writes ``--images`` synthetic photo-like JPEGs (500x375, 375x500, 500x333, 400x500,
quality 90) to a temporary folder (or uses ``--folder``), then times
``make_pretrain_dataset`` with the release data config (scales 320..480, max 600,
M=10 patches of 128 px, full query-patch augmentation, 6 shape buckets, glibc
malloc tuning on; ``--no_tune_malloc`` turns it off) in training mode, batch
``--batch`` on one host:

  per-core: a child process pinned to one CPU (sched_setaffinity), TF intra/inter-op
            threads 1, tf.data private thread pool 1, num_parallel_calls 1;
  all cores: a child process with every CPU, thread pool = num_parallel_calls = cores.

Each run warms up for ``--warmup`` batches and times ``--batches`` batches; the
medians over ``--runs`` runs are reported. One JSON line on stdout.

    python benchmarks/input_pipeline.py [--images 512] [--batch 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ((375, 500), (500, 375), (333, 500), (500, 400))


def write_images(folder: str, n: int) -> None:
  import numpy as np  # noqa: PLC0415
  from PIL import Image  # noqa: PLC0415

  rng = np.random.default_rng(0)
  for i in range(n):
    h, w = SIZES[i % len(SIZES)]
    yy, xx = np.mgrid[0:h, 0:w] / 9.0
    ch = [
      np.sin(xx * rng.uniform(0.2, 1) + rng.uniform(0, 6))
      * np.cos(yy * rng.uniform(0.2, 1) + rng.uniform(0, 6))
      for _ in range(3)
    ]
    img = np.stack(ch, -1) * 90 + 128 + rng.normal(0, 12, (h, w, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    Image.fromarray(img).save(os.path.join(folder, f'{i:05d}.jpg'), quality=90)


def child(args) -> None:
  """Time the pipeline in this process; prints one JSON line."""
  threads = args.threads
  if threads == 1:
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  import tensorflow as tf  # noqa: PLC0415

  tf.config.threading.set_intra_op_parallelism_threads(threads)
  tf.config.threading.set_inter_op_parallelism_threads(threads)
  sys.path.insert(0, ROOT)
  from updetr_jax import data  # noqa: PLC0415

  cfg = data.default_data_config()
  cfg.update(
    dict(
      source='folder',
      folder=args.folder,
      index_cache_dir=None,
      threads=threads,
      num_parallel_calls=threads,
      prefetch=2,
      tune_malloc=not args.no_tune_malloc,
    )
  )
  t0 = time.perf_counter()
  it, stats = data.make_pretrain_dataset(
    cfg, global_batch_size=args.batch, num_patches=args.num_patches, seed=0
  )
  index_s = time.perf_counter() - t0
  rates = []
  for _ in range(args.runs):
    for _ in range(args.warmup):
      next(it)
    t0 = time.perf_counter()
    for _ in range(args.batches):
      b = next(it)
    dt = time.perf_counter() - t0
    rates.append(args.batches * args.batch / dt)
  print(
    json.dumps(
      dict(
        threads=threads,
        rates=rates,
        index_s=index_s,
        shapes=sorted({tuple(b['images'].shape[1:3])}),
      )
    ),
    flush=True,
  )


def run_child(args, threads: int) -> dict:
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    '--child',
    '--threads',
    str(threads),
    '--folder',
    args.folder,
    '--batch',
    str(args.batch),
    '--runs',
    str(args.runs),
    '--batches',
    str(args.batches),
    '--warmup',
    str(args.warmup),
    '--num_patches',
    str(args.num_patches),
  ] + (['--no_tune_malloc'] if args.no_tune_malloc else [])
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument('--images', type=int, default=512)
  p.add_argument('--folder', default='')
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--num_patches', type=int, default=10)
  p.add_argument('--batches', type=int, default=4)
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--runs', type=int, default=3)
  p.add_argument('--threads', type=int, default=0)
  p.add_argument('--child', action='store_true')
  p.add_argument('--skip_all_cores', action='store_true')
  p.add_argument('--no_tune_malloc', action='store_true')
  args = p.parse_args()
  if args.child:
    child(args)
    return
  with tempfile.TemporaryDirectory() as tmp:
    if not args.folder:
      args.folder = tmp
      write_images(tmp, args.images)
    one = run_child(args, 1)
    cores = len(os.sched_getaffinity(0))
    allc = None if args.skip_all_cores else run_child(args, cores)
  result = dict(
    images_per_s_per_core=round(statistics.median(one['rates']), 2),
    images_per_s=round(statistics.median(allc['rates']), 2) if allc else None,
    threads=cores,
    batch=args.batch,
    num_patches=args.num_patches,
    patch_size=128,
    image_sizes=[f'{w}x{h}' for h, w in SIZES],
    runs=args.runs,
    batches_per_run=args.batches,
    per_core_runs=[round(r, 2) for r in one['rates']],
    all_core_runs=[round(r, 2) for r in allc['rates']] if allc else None,
    index_s_per_core=round(one['index_s'], 2),
    tune_malloc=not args.no_tune_malloc,
  )
  print(json.dumps(result))


if __name__ == '__main__':
  main()
