"""A miniature detection benchmark of real pixels, generated offline (docs/miniature.md).

It measures whether UP-DETR pre-training beats training from scratch on a task a
small DETR can learn on one machine: unlabelled images for pre-training, labelled
images for fine-tuning, a held-out evaluation set, all written by numpy + PIL from
data bundled with installed packages (no network, no TensorFlow).

Public API:
  write_miniature(directory, *, seed=0, num_pool=2000, num_train=600, num_eval=450,
      image_size=(128, 128), verify=False) -> dict of paths and counts
  miniature_paths(directory) -> the same dict without writing (counts: manifest's)
  render_split(split, num_images, *, seed=0, image_size=(128, 128))
      -> iterator of (image uint8 [H, W, 3], annotations)
  contact_sheet(paths, out_png, split='eval', num_images=12, scale=2)
  CLI: python -m updetr_jax.data.miniature --output=DIR [--seed=0 ...]

One file: the generator's stages (object sources, layouts, rendering, COCO json,
manifest) share one seeding scheme that makes the benchmark deterministic and its
splits disjoint; they are read together, with docs/miniature.md.

Layout of ``directory`` (dedicated to the benchmark: a rewrite replaces these):
  pool/*.jpg             unlabelled pre-training scenes (data.source='folder')
  train/*.jpg, train.json  labelled fine-tuning scenes, COCO format
  eval/*.jpg, eval.json    held-out evaluation scenes, COCO format
  manifest.json          written last: parameters, generator version, classes,
                         counts, the source instances and background bands each
                         split used, size and sha256 of every file.
File names carry the image size ('000123_128x128.jpg') so that the pipeline's
per-image index cache (keyed by paths) never serves sizes of an older version.

Scenes. An H x W (default 128 x 128) window of a background photo or texture,
resized and tinted, with 3..8 objects pasted at random positions, their longer side
log-uniform in 12..60 px (scaled by min(H, W) / 128), placements rejected when
IoU > 0.3 with a placed box or when either box would be more than half covered.
Classes (category ids 1..6):
  1 face   LFW face crops (skimage.data.lfw_subset, the 100 faces), pasted as
           rectangles, warm tint; box = the pasted rectangle.
  2 coin   the 24 coins of skimage.data.coins (watershed segmentation), pasted
           through their masks, silver / gold / copper tint; box = tight mask box.
  3 zero, 4 one, 5 four, 6 seven   handwritten digits 0, 1, 4, 7 of scikit-learn's
           8 x 8 digits, upscaled (bicubic), strokes pasted through a threshold of
           their intensity in a colour contrasting the background; box = tight box.
Photometric variation: background contrast / brightness / tint, per-object
brightness, per-scene gamma and Gaussian noise; JPEG quality 90.

Disjointness. Each source's instances are split 40 / 30 / 30 % into pool / train /
eval by a fixed seed (``SPLIT_SEED``, independent of ``seed``; digits stratified by
class); each background photo is cut into three bands along its longer side (first
third pool, second train, last eval). Scenes draw from their split only, with
per-image generators keyed by (seed, split, index): no evaluation instance, band or
image occurs in the pool or the training set.

Determinism: same arguments and library versions -> byte-identical files; another
``seed`` gives other scenes (same instance split).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import time
from typing import Iterator

import numpy as np
from PIL import Image

from updetr_jax import files

GENERATOR_VERSION = 2
SPLITS = ('pool', 'train', 'eval')
CATEGORIES = ((1, 'face'), (2, 'coin'), (3, 'zero'), (4, 'one'), (5, 'four'), (6, 'seven'))
DIGIT_CATEGORIES = {3: 0, 4: 1, 5: 4, 6: 7}  # category id -> digit
DEFAULT_IMAGE_SIZE = (128, 128)
DEFAULT_COUNTS = dict(num_pool=2000, num_train=600, num_eval=450)
MIN_EVAL_IMAGES, MIN_EVAL_BOXES = 300, 1500  # checked at the default parameters
# Objects of 24-64 px (longer side) on 128-px scenes, 2-5 of them: a 64-d DETR on the
# stride-16 (DC5) map of a small CNN starts to detect them within a few thousand CPU
# steps; with 12-60 px objects, 3-8 per scene (version 1) its AP stayed near 0.
OBJECTS_PER_IMAGE = (2, 5)  # inclusive
OBJECT_SIZE = (24.0, 64.0)  # longer side in px at min(H, W) = 128
MAX_IOU, MAX_COVER = 0.3, 0.5
JPEG_QUALITY = 90
NOISE = 0.02  # max std of the per-scene Gaussian noise (of 1.0)
SPLIT_SEED = 20240611  # fixed: instance / background split, whatever ``seed``
SPLIT_FRACTIONS = (0.4, 0.3, 0.3)
_SPLIT_CODE = {'pool': 1, 'train': 2, 'eval': 3}
# (name, loader in skimage.data); gray textures are tinted. No source with faces,
# coins or digits (the classes) is used as a background.
BACKGROUNDS = (
  'brick',
  'grass',
  'gravel',
  'moon',
  'immunohistochemistry',
  'hubble_deep_field',
  'coffee',
  'chelsea',
  'rocket',
)
_METALS = np.array([[0.92, 0.94, 1.0], [1.0, 0.84, 0.45], [0.95, 0.62, 0.42]], np.float32)


@dataclasses.dataclass(frozen=True)
class Instance:
  """One object instance of a source: gray float32 [h, w] in [0, 1], mask float32
  [h, w] in [0, 1] or None (pasted as a rectangle); key 'source:index'."""

  key: str
  gray: np.ndarray
  mask: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class SplitAssets:
  """What one split draws from: backgrounds [(name, uint8 [h, w] or [h, w, 3])],
  instances {category id: [Instance]}."""

  backgrounds: tuple
  instances: dict


# --- sources ---------------------------------------------------------------------------


def _digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits -> (images float32 [1797, 8, 8] in [0, 1], labels [1797])."""
  spec = importlib.util.find_spec('sklearn')
  path = None
  if spec is not None and spec.submodule_search_locations:
    path = os.path.join(
      list(spec.submodule_search_locations)[0], 'datasets', 'data', 'digits.csv.gz'
    )
  if path and os.path.exists(path):  # the bundled file, without importing sklearn
    with gzip.open(path) as f:
      a = np.loadtxt(f, delimiter=',')
    images, labels = a[:, :-1], a[:, -1]
  else:
    try:
      from sklearn.datasets import load_digits  # noqa: PLC0415
    except ImportError as e:
      raise ImportError(
        'updetr_jax.data.miniature needs scikit-learn (its bundled '
        'digits): pip install scikit-learn'
      ) from e
    d = load_digits()
    images, labels = d.data, d.target
  return (np.asarray(images, np.float32).reshape(-1, 8, 8) / 16.0, np.asarray(labels, np.int64))


def _coins() -> list[tuple[np.ndarray, np.ndarray]]:
  """The coins of skimage.data.coins -> [(gray float32 [h, w], mask float32 [h, w])]
  in raster order of the segmentation labels (24 coins)."""
  import scipy.ndimage as ndi  # noqa: PLC0415
  import skimage.data  # noqa: PLC0415
  import skimage.filters  # noqa: PLC0415
  import skimage.segmentation  # noqa: PLC0415

  image = skimage.data.coins()
  markers = np.zeros(image.shape, np.int32)
  markers[image < 30], markers[image > 150] = 1, 2
  seg = skimage.segmentation.watershed(skimage.filters.sobel(image), markers)
  labels, _ = ndi.label(ndi.binary_fill_holes(seg == 2))
  out = []
  for k, sl in enumerate(ndi.find_objects(labels), 1):
    mask = labels[sl] == k
    if mask.sum() > 200:
      out.append((image[sl].astype(np.float32) / 255.0, mask.astype(np.float32)))
  return out


def _background_arrays() -> list[tuple[str, np.ndarray]]:
  import skimage.data  # noqa: PLC0415

  out = []
  for name in BACKGROUNDS:
    a = getattr(skimage.data, name)()
    out.append((name, np.ascontiguousarray(a[..., :3] if a.ndim == 3 else a)))
  return out


def _split_indices(n: int, code: int) -> dict[str, np.ndarray]:
  """Disjoint sorted index sets {split: int64 [k]} of range(n) (SPLIT_FRACTIONS)."""
  perm = np.random.default_rng([SPLIT_SEED, code]).permutation(n)
  a = int(round(SPLIT_FRACTIONS[0] * n))
  b = a + int(round(SPLIT_FRACTIONS[1] * n))
  return dict(pool=np.sort(perm[:a]), train=np.sort(perm[a:b]), eval=np.sort(perm[b:]))


def _band(a: np.ndarray, split: str) -> tuple[np.ndarray, tuple[int, int, int, int]]:
  """Third of ``a`` (along its longer side) of ``split`` -> (band, (y0, y1, x0, x1))."""
  h, w = a.shape[:2]
  j = SPLITS.index(split)
  if w >= h:
    x0, x1 = j * w // 3, (j + 1) * w // 3
    return a[:, x0:x1], (0, h, x0, x1)
  y0, y1 = j * h // 3, (j + 1) * h // 3
  return a[y0:y1], (y0, y1, 0, w)


@functools.lru_cache(maxsize=None)
def _all_sources():
  import skimage.data  # noqa: PLC0415

  faces = np.asarray(skimage.data.lfw_subset()[:100], np.float32)  # 100 faces first
  return faces, _coins(), _digits(), _background_arrays()


@functools.lru_cache(maxsize=None)
def split_assets(split: str) -> SplitAssets:
  """Backgrounds and instances of one split (see module docstring: Disjointness)."""
  if split not in SPLITS:
    raise ValueError(f'split={split!r}: choose one of {SPLITS}')
  faces, coins, (digits, digit_labels), backgrounds = _all_sources()
  instances = {
    1: [Instance(f'lfw:{i}', faces[i], None) for i in _split_indices(len(faces), 1)[split]],
    2: [Instance(f'coins:{i}', *coins[i]) for i in _split_indices(len(coins), 2)[split]],
  }
  for cat, digit in DIGIT_CATEGORIES.items():
    ids = np.flatnonzero(digit_labels == digit)
    instances[cat] = [
      Instance(f'digits:{ids[i]}', digits[ids[i]], None)
      for i in _split_indices(len(ids), 10 + digit)[split]
    ]
  bands = tuple(
    (f'{name}[{":".join(map(str, _band(a, split)[1]))}]', _band(a, split)[0])
    for name, a in backgrounds
  )
  return SplitAssets(backgrounds=bands, instances=instances)


# --- rendering -------------------------------------------------------------------------


def _resize(a: np.ndarray, h: int, w: int, resample=Image.BICUBIC) -> np.ndarray:
  """float32 [h0, w0] -> float32 [h, w] (PIL 'F' mode)."""
  return np.asarray(
    Image.fromarray(np.asarray(a, np.float32), 'F').resize((int(w), int(h)), resample), np.float32
  )


def _background(rng: np.random.Generator, assets: SplitAssets, h: int, w: int) -> np.ndarray:
  """A tinted, jittered window of one of the split's backgrounds: float32 [h, w, 3]."""
  _, band = assets.backgrounds[rng.integers(len(assets.backgrounds))]
  bh, bw = band.shape[:2]
  hi = min(bh, bw * h / w, 2.0 * h)  # window height (window aspect = h : w)
  lo = min(hi, 0.6 * h)
  wh = rng.uniform(lo, hi)
  ww = wh * w / h
  y0, x0 = rng.uniform(0, bh - wh), rng.uniform(0, bw - ww)
  img = Image.fromarray(band).resize((w, h), Image.BILINEAR, box=(x0, y0, x0 + ww, y0 + wh))
  a = np.asarray(img, np.float32) / 255.0
  if a.ndim == 2:
    tint = 0.55 + 0.45 * rng.random(3, dtype=np.float32)
    a = a[..., None] * (tint / tint.max())
  if rng.random() < 0.5:
    a = a[:, ::-1]
  if rng.random() < 0.5:
    a = a[::-1]
  mean = a.mean((0, 1), keepdims=True)
  contrast = rng.uniform(0.5, 1.0)
  shift = rng.uniform(-0.1, 0.1)
  return np.clip((a - mean) * contrast + mean + shift, 0.0, 1.0).astype(np.float32)


def _object_shape(inst: Instance, cat: int, side: float, aspect: float):
  """Gray float32 [ph, pw] and alpha float32 [ph, pw] of ``inst`` scaled so that its
  longer side is ``side`` px (times aspect jitter), cropped to the tight box of
  alpha > 0; None when nothing is left."""
  h0, w0 = inst.gray.shape
  s = side / max(h0, w0)
  oh = max(2, int(round(h0 * s * np.sqrt(aspect))))
  ow = max(2, int(round(w0 * s / np.sqrt(aspect))))
  gray = np.clip(_resize(inst.gray, oh, ow), 0.0, 1.0)
  if cat in DIGIT_CATEGORIES:
    alpha = np.clip((gray - 0.25) / 0.3, 0.0, 1.0)
  elif inst.mask is not None:
    alpha = np.clip(_resize(inst.mask, oh, ow, Image.BILINEAR), 0.0, 1.0)
  else:
    return gray, np.ones_like(gray)
  alpha[alpha < 0.2] = 0.0
  rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
  if not len(rows):
    return None
  sl = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
  return gray[sl], alpha[sl]


def _colorise(
  rng: np.random.Generator, cat: int, gray: np.ndarray, local_mean: float
) -> np.ndarray:
  """Gray [ph, pw] -> RGB float32 [ph, pw, 3] by class (see module docstring)."""
  if cat == 1:  # face: warm tint
    u = rng.random(2, dtype=np.float32)
    tint = np.array([1.0, 0.78 + 0.17 * u[0], 0.62 + 0.25 * u[1]], np.float32)
    rgb = gray[..., None] * tint
  elif cat == 2:  # coin: metal tint
    rgb = gray[..., None] * _METALS[rng.integers(len(_METALS))] * 1.15
  else:  # digit: saturated colour contrasting the local background
    hue = rng.random()
    sat = rng.uniform(0.6, 1.0)
    val = rng.uniform(0.1, 0.35) if local_mean > 0.5 else rng.uniform(0.75, 1.0)
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0  # HSV -> RGB
    color = val - val * sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    rgb = color.astype(np.float32) * (0.6 + 0.4 * gray[..., None])
  return rgb * np.float32(np.exp(rng.uniform(-0.2, 0.2)))


def _fits(box, boxes: list) -> bool:
  """xyxy box vs placed boxes: IoU <= MAX_IOU and neither covered > MAX_COVER."""
  if not boxes:
    return True
  b = np.asarray(boxes, np.float64)
  iw = np.clip(np.minimum(b[:, 2], box[2]) - np.maximum(b[:, 0], box[0]), 0, None)
  ih = np.clip(np.minimum(b[:, 3], box[3]) - np.maximum(b[:, 1], box[1]), 0, None)
  inter = iw * ih
  a_old = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  a_new = (box[2] - box[0]) * (box[3] - box[1])
  iou = inter / (a_old + a_new - inter)
  return bool(
    (iou <= MAX_IOU).all()
    and (inter <= MAX_COVER * a_old).all()
    and (inter <= MAX_COVER * a_new).all()
  )


def render_scene(rng: np.random.Generator, assets: SplitAssets, image_size=(128, 128)):
  """One scene -> (image uint8 [H, W, 3], annotations [dict(category_id, bbox (x, y, w,
  h) ints, instance 'source:index')]) in paste order (later ones on top)."""
  h, w = image_size
  img = _background(rng, assets, h, w)
  k = int(rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1))
  lo, hi = (s * min(h, w) / 128.0 for s in OBJECT_SIZE)
  boxes, anns = [], []
  for _ in range(k):
    cat = int(rng.integers(1, len(CATEGORIES) + 1))
    pool = assets.instances[cat]
    inst = pool[rng.integers(len(pool))]
    side = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    aspect = float(np.exp(rng.uniform(-0.15, 0.15)))
    placed = None
    while placed is None and side >= lo * 0.75:  # shrink until it fits
      shape = _object_shape(inst, cat, side, aspect)
      if shape is not None and shape[0].shape[0] <= h and shape[0].shape[1] <= w:
        ph, pw = shape[0].shape
        for _ in range(25):
          x, y = int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))
          if _fits((x, y, x + pw, y + ph), boxes):
            placed = (shape, x, y)
            break
      side *= 0.8
    if placed is None:
      continue
    (gray, alpha), x, y = placed
    ph, pw = gray.shape
    region = img[y : y + ph, x : x + pw]
    rgb = _colorise(rng, cat, gray, float(region.mean()))
    a = alpha[..., None]
    img[y : y + ph, x : x + pw] = region * (1.0 - a) + np.clip(rgb, 0.0, 1.0) * a
    boxes.append((x, y, x + pw, y + ph))
    anns.append(dict(category_id=cat, bbox=(x, y, pw, ph), instance=inst.key))
  gamma = rng.uniform(0.85, 1.15)
  noise = rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(0.0, NOISE)
  out = np.clip(img**gamma + noise, 0.0, 1.0)
  return (out * 255.0 + 0.5).astype(np.uint8), anns


def _image_size(image_size) -> tuple[int, int]:
  if np.ndim(image_size) == 0:
    image_size = (image_size, image_size)
  h, w = (int(v) for v in image_size)
  if min(h, w) < 32:
    raise ValueError(f'image_size={image_size}: sides must be >= 32')
  return h, w


def render_split(
  split: str, num_images: int, *, seed: int = 0, image_size=DEFAULT_IMAGE_SIZE
) -> Iterator[tuple[np.ndarray, list]]:
  """Scenes 0..num_images-1 of ``split`` (see ``render_scene``); scene i uses the
  generator keyed by (seed, split, i), so any prefix is the same."""
  if seed < 0:
    raise ValueError(f'seed={seed} must be >= 0')
  assets = split_assets(split)
  size = _image_size(image_size)
  for i in range(num_images):
    rng = np.random.default_rng([int(seed), _SPLIT_CODE[split], i])
    yield render_scene(rng, assets, size)


# --- files -----------------------------------------------------------------------------


def miniature_paths(directory: str) -> dict:
  """Paths of the benchmark in ``directory`` (nothing written) and the counts of its
  manifest ({} when there is no readable manifest)."""
  directory = os.path.abspath(os.path.expanduser(str(directory)))
  j = lambda *p: os.path.join(directory, *p)  # noqa: E731
  out = dict(
    pool_dir=j('pool'),
    train_dir=j('train'),
    train_ann=j('train.json'),
    eval_dir=j('eval'),
    eval_ann=j('eval.json'),
    manifest=j('manifest.json'),
  )
  out['counts'] = (_read_manifest(out['manifest']) or {}).get('counts', {})
  return out


def _read_manifest(path: str) -> dict | None:
  try:
    return files.read_json(path)
  except (OSError, ValueError):
    return None


def _params(seed, num_pool, num_train, num_eval, image_size) -> dict:
  for name, n in (('num_pool', num_pool), ('num_train', num_train), ('num_eval', num_eval)):
    if int(n) < 0:
      raise ValueError(f'{name}={n} must be >= 0')
  if seed < 0:
    raise ValueError(f'seed={seed} must be >= 0')
  return dict(
    seed=int(seed),
    num_pool=int(num_pool),
    num_train=int(num_train),
    num_eval=int(num_eval),
    image_size=list(_image_size(image_size)),
  )


def _is_complete(paths: dict, params: dict, verify: bool) -> bool:
  m = _read_manifest(paths['manifest'])
  if not m or m.get('generator_version') != GENERATOR_VERSION or m.get('params') != params:
    return False
  root = os.path.dirname(paths['manifest'])
  for rel, (size, digest) in m.get('files', {}).items():
    path = os.path.join(root, rel)
    if not os.path.exists(path) or os.path.getsize(path) != size:
      return False
    if verify and _sha256_file(path) != digest:
      return False
  return True


def _sha256_file(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _encode_jpeg(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='JPEG', quality=JPEG_QUALITY)
  return buf.getvalue()


def _coco(split: str) -> dict:
  return dict(
    info=dict(
      description=f'updetr_jax miniature benchmark, {split} split', version=str(GENERATOR_VERSION)
    ),
    licenses=[],
    images=[],
    annotations=[],
    categories=[dict(id=c, name=n, supercategory='miniature') for c, n in CATEGORIES],
  )


def write_miniature(
  directory: str,
  *,
  seed: int = 0,
  num_pool: int = DEFAULT_COUNTS['num_pool'],
  num_train: int = DEFAULT_COUNTS['num_train'],
  num_eval: int = DEFAULT_COUNTS['num_eval'],
  image_size=DEFAULT_IMAGE_SIZE,
  verify: bool = False,
) -> dict:
  """Write the benchmark under ``directory`` unless it is already complete.

  Complete: manifest.json exists with this generator version and these parameters,
  and every file it lists exists with its recorded size (``verify``: and sha256).
  Otherwise the outputs (pool/, train/, eval/, *.json) are removed and rewritten,
  the manifest last. Not safe against concurrent writers of the same directory.

  Args: seed: scene seed (>= 0); num_pool / num_train / num_eval: images per split;
    image_size: H or (H, W) in pixels.
  Returns: miniature_paths(directory): pool_dir, train_dir, train_ann, eval_dir,
    eval_ann, manifest (absolute paths) and counts {split: {images, boxes,
    boxes_per_class}} plus generation seconds of the write that made it.
  """
  params = _params(seed, num_pool, num_train, num_eval, image_size)
  paths = miniature_paths(directory)
  if _is_complete(paths, params, verify):
    return paths
  start = time.perf_counter()
  root = os.path.dirname(paths['manifest'])
  os.makedirs(root, exist_ok=True)
  for k in ('manifest', 'pool_dir', 'train_dir', 'train_ann', 'eval_dir', 'eval_ann'):
    if k.endswith('_dir'):
      shutil.rmtree(paths[k], ignore_errors=True)
    elif os.path.exists(paths[k]):
      os.remove(paths[k])
  h, w = params['image_size']
  names = dict(CATEGORIES)
  written, counts, used = {}, {}, {}

  def write(rel: str, data: bytes) -> None:
    files.write_file(os.path.join(root, rel), data)
    written[rel] = [len(data), hashlib.sha256(data).hexdigest()]

  for split in SPLITS:
    n = params[f'num_{split}']
    os.makedirs(paths[f'{split}_dir'])
    coco = _coco(split)
    keys = set()
    per_class = {name: 0 for _, name in CATEGORIES}
    for i, (image, anns) in enumerate(
      render_split(split, n, seed=params['seed'], image_size=(h, w))
    ):
      name = f'{i:06d}_{h}x{w}.jpg'
      write(f'{split}/{name}', _encode_jpeg(image))
      keys.update(a['instance'] for a in anns)
      coco['images'].append(dict(id=i + 1, file_name=name, height=h, width=w))
      for a in anns:
        x, y, bw, bh = a['bbox']
        coco['annotations'].append(
          dict(
            id=len(coco['annotations']) + 1,
            image_id=i + 1,
            category_id=a['category_id'],
            bbox=[x, y, bw, bh],
            area=bw * bh,
            iscrowd=0,
            instance=a['instance'],
          )
        )
        per_class[names[a['category_id']]] += 1
    counts[split] = dict(images=n, boxes=len(coco['annotations']), boxes_per_class=per_class)
    used[split] = sorted(keys, key=lambda k: (k.split(':')[0], int(k.split(':')[1])))
    if split != 'pool':
      write(f'{split}.json', json.dumps(coco).encode())
  ev = counts['eval']
  default_sizes = params == _params(params['seed'], **DEFAULT_COUNTS, image_size=DEFAULT_IMAGE_SIZE)
  if default_sizes and (ev['images'] < MIN_EVAL_IMAGES or ev['boxes'] < MIN_EVAL_BOXES):
    raise AssertionError(f'miniature eval split too small: {ev}')
  manifest = dict(
    generator_version=GENERATOR_VERSION,
    params=params,
    classes=[dict(id=c, name=n) for c, n in CATEGORIES],
    counts=counts,
    minimum=dict(
      eval_images=MIN_EVAL_IMAGES,
      eval_boxes=MIN_EVAL_BOXES,
      met=ev['images'] >= MIN_EVAL_IMAGES and ev['boxes'] >= MIN_EVAL_BOXES,
    ),
    split_seed=SPLIT_SEED,
    instances_used=used,
    backgrounds={s: [b for b, _ in split_assets(s).backgrounds] for s in SPLITS},
    files=written,
  )
  files.write_json(paths['manifest'], manifest, indent=1)
  out = miniature_paths(directory)
  out['seconds'] = time.perf_counter() - start
  return out


def contact_sheet(
  paths: dict,
  out_png: str,
  split: str = 'eval',
  num_images: int = 12,
  scale: int = 2,
  columns: int = 4,
) -> str:
  """PNG grid of the first ``num_images`` images of a labelled split with their boxes
  and class names (upscaled ``scale`` times, nearest); returns ``out_png``."""
  from PIL import ImageDraw  # noqa: PLC0415

  coco = files.read_json(paths[f'{split}_ann'])
  names = {c['id']: c['name'] for c in coco['categories']}
  colors = [
    (255, 60, 60),
    (60, 220, 60),
    (70, 140, 255),
    (255, 200, 0),
    (255, 0, 255),
    (0, 230, 230),
  ]
  images = coco['images'][:num_images]
  tiles = []
  for im in images:
    tile = Image.open(os.path.join(paths[f'{split}_dir'], im['file_name'])).convert('RGB')
    tile = tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(tile)
    for a in coco['annotations']:
      if a['image_id'] == im['id']:
        x, y, bw, bh = (v * scale for v in a['bbox'])
        color = colors[(a['category_id'] - 1) % len(colors)]
        draw.rectangle((x - 1, y - 1, x + bw, y + bh), outline=color)
        draw.text((x + 1, y + 1), names[a['category_id']], fill=color)
    tiles.append(tile)
  rows = -(-len(tiles) // columns)
  tw, th = max(t.width for t in tiles), max(t.height for t in tiles)
  sheet = Image.new('RGB', (columns * (tw + 4), rows * (th + 4)), (255, 255, 255))
  for i, t in enumerate(tiles):
    sheet.paste(t, ((i % columns) * (tw + 4), (i // columns) * (th + 4)))
  sheet.save(out_png)
  return out_png


def main(argv=None) -> dict:
  """CLI: write the benchmark to --output and print its counts (see module docstring)."""
  p = argparse.ArgumentParser(
    prog='python -m updetr_jax.data.miniature',
    description='Write the miniature detection benchmark.',
  )
  p.add_argument('--output', required=True, help='directory (created)')
  p.add_argument('--seed', type=int, default=0)
  for k, v in DEFAULT_COUNTS.items():
    p.add_argument(f'--{k}', type=int, default=v)
  p.add_argument(
    '--image_size', default=','.join(map(str, DEFAULT_IMAGE_SIZE)), help='H or H,W in pixels'
  )
  p.add_argument('--verify', action='store_true', help='re-hash existing files')
  p.add_argument('--preview', default='', help='also save a PNG contact sheet of eval')
  args = p.parse_args(argv)
  size = tuple(int(v) for v in args.image_size.split(','))
  out = write_miniature(
    args.output,
    seed=args.seed,
    num_pool=args.num_pool,
    num_train=args.num_train,
    num_eval=args.num_eval,
    image_size=size[0] if len(size) == 1 else size,
    verify=args.verify,
  )
  for split, c in out['counts'].items():
    line = f'{split:5s}: {c["images"]:5d} images'
    if split != 'pool':
      line += f', {c["boxes"]:6d} boxes ({c["boxes"] / max(c["images"], 1):.2f}/image): '
      line += ', '.join(f'{k} {v}' for k, v in c['boxes_per_class'].items())
    print(line)
  if 'seconds' in out:
    print(f'written in {out["seconds"]:.1f} s')
  else:
    print('already complete (manifest matches): nothing written')
  for k in ('pool_dir', 'train_ann', 'train_dir', 'eval_ann', 'eval_dir', 'manifest'):
    print(f'{k}: {out[k]}')
  if args.preview and out['counts'].get('eval', {}).get('images'):
    print('preview:', contact_sheet(out, args.preview))
  return out


if __name__ == '__main__':
  main(sys.argv[1:])
