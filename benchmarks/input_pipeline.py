"""Input-pipeline benchmark: the pre-training host pipeline on ImageNet-sized JPEGs.

Writes ``--images`` synthetic photo-like JPEGs (500x375, 375x500, 500x333, 400x500,
quality 90) to a temporary folder (or uses ``--folder``), then times
``make_pretrain_dataset`` with the release data config (scales 320..480, max 600,
M=10 patch rectangles, 6 shape buckets, glibc malloc tuning on; ``--no_tune_malloc``
turns it off) in training mode, batch ``--batch`` on one host. The host decodes,
resizes and pads (uint8) and draws the rectangles; the crops and their
augmentation run on the accelerator (``updetr_jax/device_augment.py``; their cost
is ``augment_flops_per_step`` of ``benchmarks/train_step.py``). The figure is
``host_images_per_s_per_core``; ``release_images_per_s_per_core`` is the release's
pipeline (its SelfDet dataset and transforms, ``_reference_rate``) on the same
images and core, in the same run, and ``speedup_vs_release`` their ratio:

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
  if args.reference:
    print(json.dumps(dict(threads=threads, rates=_reference_rate(args))), flush=True)
    return
  import tensorflow as tf  # noqa: PLC0415

  tf.config.threading.set_intra_op_parallelism_threads(threads)
  tf.config.threading.set_inter_op_parallelism_threads(threads)
  sys.path.insert(0, ROOT)
  from updetr_jax import cli, data  # noqa: PLC0415

  cli.tune_malloc(not args.no_tune_malloc)

  cfg = data.default_data_config()
  cfg.update(
    dict(
      source='folder',
      folder=args.folder,
      index_cache_dir=None,
      threads=threads,
      num_parallel_calls=threads,
      prefetch=2,
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


# --- the release's data pipeline, for the ratio ------------------------------------------


def _reference_rate(args) -> list[float]:
  """Images/s of the release's SelfDet pipeline on this process's cores.

  Written here from the release's behaviour (its datasets/selfdet.py and
  transforms): PIL decode; M patch rectangles drawn in original pixels, each crop
  resized to P (PIL bilinear), then torchvision's ColorJitter(0.4, 0.4, 0.4, 0.1)
  p=0.8 (on PIL images torchvision calls PIL's ImageEnhance for brightness,
  contrast and saturation and shifts the hue in HSV with numpy), RandomGrayscale
  p=0.2, GaussianBlur p=0.5 (sigma U[0.1, 2]), ToTensor and Normalize; the image:
  RandomResize(scales, max_size=600) (PIL bilinear), ToTensor, Normalize; the
  batch padded to its largest image (its collate). torchvision itself is not
  installed here, so its PIL paths are written out; only the Gaussian blur differs
  (PIL's blur for torchvision's separable conv, about as costly).
  """
  import random  # noqa: PLC0415

  import numpy as np  # noqa: PLC0415
  import torch  # noqa: PLC0415
  from PIL import Image, ImageEnhance, ImageFilter  # noqa: PLC0415

  torch.set_num_threads(args.threads)
  sys.path.insert(0, ROOT)
  from updetr_jax.data.augment import resize_rule  # noqa: PLC0415
  from updetr_jax.normalization import MEAN, STD  # noqa: PLC0415

  files = sorted(os.path.join(args.folder, f) for f in os.listdir(args.folder))
  mean = torch.tensor(MEAN)[:, None, None]
  std = torch.tensor(STD)[:, None, None]
  scales = (320, 336, 352, 368, 400, 416, 432, 448, 464, 480)
  rnd = random.Random(0)

  def to_tensor(img):
    x = torch.from_numpy(np.asarray(img, np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return (x - mean) / std

  def hue(img, delta):
    h, s, v = img.convert('HSV').split()
    h = Image.fromarray(
      (np.asarray(h, np.uint8).astype(np.int16) + int(delta * 255)).astype(np.uint8)
    )
    return Image.merge('HSV', (h, s, v)).convert('RGB')

  def jitter(img):
    ops = [
      lambda x: ImageEnhance.Brightness(x).enhance(rnd.uniform(0.6, 1.4)),
      lambda x: ImageEnhance.Contrast(x).enhance(rnd.uniform(0.6, 1.4)),
      lambda x: ImageEnhance.Color(x).enhance(rnd.uniform(0.6, 1.4)),
      lambda x: hue(x, rnd.uniform(-0.1, 0.1)),
    ]
    rnd.shuffle(ops)
    for op in ops:
      img = op(img)
    return img

  def example(path):
    img = Image.open(path).convert('RGB')
    w, h = img.size
    out = []
    for _ in range(args.num_patches):
      pw, ph = rnd.randint(8, w - 8), rnd.randint(8, h - 8)
      x, y = rnd.randint(0, w - pw - 1), rnd.randint(0, h - ph - 1)
      q = img.crop((x, y, x + pw, y + ph)).resize((128, 128), Image.BILINEAR)
      if rnd.random() < 0.8:
        q = jitter(q)
      if rnd.random() < 0.2:
        q = q.convert('L').convert('RGB')
      if rnd.random() < 0.5:
        q = q.filter(ImageFilter.GaussianBlur(rnd.uniform(0.1, 2.0)))
      out.append(to_tensor(q))
    rh, rw = resize_rule(h, w, rnd.choice(scales), 600)
    return to_tensor(img.resize((rw, rh), Image.BILINEAR)), torch.stack(out)

  def batch(paths):
    items = [example(p) for p in paths]
    hh = max(i[0].shape[1] for i in items)
    ww = max(i[0].shape[2] for i in items)
    images = torch.zeros(len(items), 3, hh, ww)
    for k, (im, _) in enumerate(items):
      images[k, :, : im.shape[1], : im.shape[2]] = im
    return images, torch.stack([i[1] for i in items])

  rates, pos = [], 0
  for _ in range(args.runs):
    for _ in range(args.warmup + args.batches):
      if _ == args.warmup:
        t0 = time.perf_counter()
      batch([files[(pos + k) % len(files)] for k in range(args.batch)])
      pos += args.batch
    rates.append(args.batches * args.batch / (time.perf_counter() - t0))
  return rates


def run_child(args, threads: int, reference: bool = False) -> dict:
  cmd = (
    [
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
    ]
    + (['--no_tune_malloc'] if args.no_tune_malloc else [])
    + (['--reference'] if reference else [])
  )
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
  p.add_argument('--reference', action='store_true', help='child: the release pipeline')
  p.add_argument('--skip_reference', action='store_true')
  args = p.parse_args()
  if args.child:
    child(args)
    return
  with tempfile.TemporaryDirectory() as tmp:
    if not args.folder:
      args.folder = tmp
      write_images(tmp, args.images)
    one = run_child(args, 1)
    ref = None if args.skip_reference else run_child(args, 1, reference=True)
    cores = len(os.sched_getaffinity(0))
    allc = None if args.skip_all_cores else run_child(args, cores)
  per_core = statistics.median(one['rates'])
  ref_rate = statistics.median(ref['rates']) if ref else None
  result = dict(
    host_images_per_s_per_core=round(per_core, 2),
    # The release's pipeline (SelfDet + its transforms) on the same images and core.
    release_images_per_s_per_core=round(ref_rate, 2) if ref else None,
    speedup_vs_release=round(per_core / ref_rate, 2) if ref else None,
    release_runs=[round(r, 2) for r in ref['rates']] if ref else None,
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
