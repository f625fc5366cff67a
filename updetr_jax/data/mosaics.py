"""The learnability benchmark's images: random mosaics whose pixels say where a patch is.

Random query patch detection can only be learned when a patch's content tells where in
the image it came from. On these images it does, by construction: each image is a
Voronoi mosaic of 6..10 cells (``data.mosaic_cells``), every cell a flat random colour
(uniform in RGB, at least ``colour_distance(n)`` apart within an image: 0.25 up to 10
cells) with a linear shading across it
(a random direction, +-``SHADING`` of the colour), plus mild Gaussian noise. The cells,
their colours and the shading make every region of an image distinct, so the crop
alone decides its box: a detector that uses its query patch can find it, one that
ignores it cannot do better than a box prior. ``benchmarks/pretext_learnability.py``
trains on them and reports the patch diagnostics against steps.

A second style, ``'ramp'``, is the positive control: the colour codes the absolute
position (red = x / W, green = y / H, blue a random wave of the image), so a patch's
colours alone give its box, with no need to find it in the image. A model that
learns 'ramp' but not 'cells' can read a patch's box from the patch but cannot yet
match a patch against the image (docs/results/pretext_learnability.md).

The third, ``'rotated_ramp'``, needs the image: the ramp's frame is drawn per image (a
random rotation, reflection and shift of the red/green axes), so a colour codes a
position only within its own image. Every position of an image has its own colour, so
a patch's box is in the pixels, but it must be looked up in the image it came from;
another image's patch points to wherever its colours sit in this one.

Public API:
  render_mosaic(rng, height, width, style='cells', cells=CELLS) -> uint8 [H, W, 3]
  mosaic_arrays(split, count, *, seed=0, image_size=(128, 160), style='cells',
      cells=CELLS)
      -> [uint8 [H, W, 3]]
      (in memory: the pre-training source ``data.source='mosaics'``)
  write_mosaics(directory, *, seed=0, num_train=400, num_eval=64,
      image_size=(128, 160)) -> {'train': dir, 'eval': dir, 'manifest': path, ...}
  CLI: python -m updetr_jax.data.mosaics --output=DIR [--seed=0 ...]

Layout: ``train/*.png`` (pre-training, ``data.source=folder``), ``eval/*.png``
(held-out, ``data.eval_folder``), ``manifest.json`` written last (parameters and the
sha256 of every file). PNG is lossless, so the pixels the pipeline reads are the ones
rendered. Determinism: every image has its own generator keyed by (seed, split,
index); the same arguments give byte-identical files, and the splits never share an
image.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil

import numpy as np
from PIL import Image

from updetr_jax import files

GENERATOR_VERSION = 1
CELLS = (6, 10)  # inclusive
MIN_COLOUR_DISTANCE = 0.25  # RGB in [0, 1]; redrawn until every pair is this far apart
SHADING = 0.15  # the linear shading of a cell spans +- this much across the image
NOISE = 0.02  # std of the Gaussian pixel noise
# 'rotated_ramp': the frame's shift (each axis, image fractions) and the colour per unit.
ROTATED_SHIFT = 0.2
ROTATED_SCALE = 0.5
_SPLIT_CODE = {'train': 1, 'eval': 2}
STYLES = ('cells', 'ramp', 'rotated_ramp')


def colour_distance(n: int) -> float:
  """The least RGB distance between the n colours of one image: MIN_COLOUR_DISTANCE up
  to CELLS[1] cells, then shrinking as n^(-1/3) (the same packing density of the
  colour cube, so the redraws stay few)."""
  return MIN_COLOUR_DISTANCE * min(1.0, (CELLS[1] / n) ** (1.0 / 3.0))


def _colours(rng: np.random.Generator, n: int) -> np.ndarray:
  """n RGB colours in [0, 1], pairwise at least colour_distance(n) apart: [n, 3]."""
  out = []
  least = colour_distance(n)
  while len(out) < n:
    c = rng.uniform(0.0, 1.0, 3)
    if all(np.linalg.norm(c - o) >= least for o in out):
      out.append(c)
  return np.stack(out)


def render_mosaic(
  rng: np.random.Generator,
  height: int,
  width: int,
  style: str = 'cells',
  cells: tuple[int, int] = CELLS,
) -> np.ndarray:
  """One image of ``style`` (STYLES): uint8 [height, width, 3] (module docstring).

  cells: (least, most) Voronoi cells of a 'cells' image, inclusive.
  """
  if style not in STYLES:
    raise ValueError(f'data.mosaic_style={style!r}: choose one of {STYLES}')
  lo, hi = (int(c) for c in cells)
  if not 2 <= lo <= hi:
    raise ValueError(f'data.mosaic_cells={tuple(cells)}: need 2 <= least <= most')
  if style != 'cells':
    return _render_ramp(rng, height, width, rotated=style == 'rotated_ramp')
  n = int(rng.integers(lo, hi + 1))
  sites = rng.uniform(0.0, 1.0, (n, 2)) * (height, width)  # (y, x)
  yy, xx = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing='ij')
  d = (yy[..., None] - sites[:, 0]) ** 2 + (xx[..., None] - sites[:, 1]) ** 2
  cell = np.argmin(d, axis=-1)  # [H, W]
  colours = _colours(rng, n)
  angle = rng.uniform(0.0, 2.0 * np.pi, n)
  # Shading in [-1, 1] across the image along each cell's direction.
  t = (np.cos(angle)[cell] * (xx / width - 0.5) + np.sin(angle)[cell] * (yy / height - 0.5)) * 2
  img = colours[cell] * (1.0 + SHADING * t[..., None])
  img = img + rng.normal(0.0, NOISE, img.shape)
  return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _render_ramp(rng: np.random.Generator, height: int, width: int, rotated=False) -> np.ndarray:
  yy, xx = np.meshgrid(
    (np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing='ij'
  )
  if rotated:
    # The ramp's frame, drawn per image: a rotation, a reflection and a shift, so
    # one colour sits at a different place in every image.
    angle = rng.uniform(0.0, 2.0 * np.pi)
    flip = rng.choice((-1.0, 1.0))
    shift = rng.uniform(-ROTATED_SHIFT, ROTATED_SHIFT, 2)
    dx, dy = xx - 0.5 - shift[0], yy - 0.5 - shift[1]
    u = np.cos(angle) * dx + np.sin(angle) * dy
    v = flip * (-np.sin(angle) * dx + np.cos(angle) * dy)
    xx, yy = 0.5 + ROTATED_SCALE * u, 0.5 + ROTATED_SCALE * v
  phase, freq = rng.uniform(0.0, 2.0 * np.pi), rng.uniform(3.0, 9.0)
  img = np.stack([xx, yy, 0.5 + 0.4 * np.sin(freq * (xx + yy) + phase)], axis=-1)
  img = img + rng.normal(0.0, NOISE, img.shape)
  return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([GENERATOR_VERSION, seed, _SPLIT_CODE[split], index])


def mosaic_arrays(
  split: str,
  count: int,
  *,
  seed: int = 0,
  image_size: tuple[int, int] = (128, 160),
  style: str = 'cells',
  cells: tuple[int, int] = CELLS,
) -> list[np.ndarray]:
  """The first ``count`` images of ``split`` ('train' or 'eval') and ``style``, as
  written by ``write_mosaics`` with the same seed, size, style and cells."""
  if split not in _SPLIT_CODE:
    raise ValueError(f'mosaic split {split!r}: choose one of {sorted(_SPLIT_CODE)}')
  h, w = (int(s) for s in image_size)
  return [render_mosaic(_image_rng(seed, split, i), h, w, style, cells) for i in range(int(count))]


def _png(img: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format='PNG', optimize=False)
  return buf.getvalue()


def mosaic_paths(directory: str) -> dict:
  names = {'train': 'train', 'eval': 'eval', 'manifest': 'manifest.json'}
  return {k: os.path.join(directory, v) for k, v in names.items()}


def write_mosaics(
  directory: str,
  *,
  seed: int = 0,
  num_train: int = 400,
  num_eval: int = 64,
  image_size: tuple[int, int] = (128, 160),
  style: str = 'cells',
) -> dict:
  """Writes the train and held-out eval mosaics (H, W = image_size) under directory.

  Returns mosaic_paths(directory) plus the counts. An existing manifest with the same
  parameters is reused (nothing rewritten); otherwise train/ and eval/ are replaced.
  """
  h, w = (int(s) for s in image_size)
  params = dict(
    generator_version=GENERATOR_VERSION,
    seed=int(seed),
    num_train=int(num_train),
    num_eval=int(num_eval),
    image_size=[h, w],
    style=style,
  )
  paths = mosaic_paths(directory)
  result = {**paths, 'num_train': int(num_train), 'num_eval': int(num_eval)}
  if os.path.exists(paths['manifest']):
    if files.read_json(paths['manifest']).get('params') == params:
      return result
    os.remove(paths['manifest'])
  written = {}
  for split, count in (('train', num_train), ('eval', num_eval)):
    shutil.rmtree(paths[split], ignore_errors=True)
    os.makedirs(paths[split])
    for i, img in enumerate(mosaic_arrays(split, count, seed=seed, image_size=(h, w), style=style)):
      data = _png(img)
      name = f'{split}/{i:05d}_{h}x{w}.png'
      with open(os.path.join(directory, name), 'wb') as f:
        f.write(data)
      written[name] = hashlib.sha256(data).hexdigest()
  manifest = {'params': params, 'files': written}
  files.write_file(paths['manifest'], json.dumps(manifest, indent=1, sort_keys=True))
  return result


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--output', required=True)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--num_train', type=int, default=400)
  p.add_argument('--num_eval', type=int, default=64)
  p.add_argument('--height', type=int, default=128)
  p.add_argument('--width', type=int, default=160)
  p.add_argument('--style', choices=STYLES, default='cells')
  a = p.parse_args(argv)
  out = write_mosaics(
    a.output,
    seed=a.seed,
    num_train=a.num_train,
    num_eval=a.num_eval,
    image_size=(a.height, a.width),
    style=a.style,
  )
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  main()
