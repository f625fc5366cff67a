"""Input pipeline of DETR / UP-DETR fine-tuning on labelled detection data.

The method: docs/method.md, 'DETR, the detector' and 'Fine-tuning'.

Public API:
  make_detection_dataset(data_config, *, global_batch_size, train=True, seed=0,
      start_step=0, process_index=0, process_count=1) -> (iterator, DataStats, DatasetInfo)
  detection_data_config(**overrides) / voc_data_config(**overrides)

It reuses the pre-training machinery (planning.py, batching.py, sources.py): the per-image index
and its bad-file handling, epoch planning with Philox streams keyed by (seed, epoch,
example), shape buckets, per-host row sharding, rebuild-on-decode-failure, DataStats.

One file: config, annotation sources (COCO json, TFDS COCO / VOC), the epoch plan of
DETR's augmentation and the tf.data row function form one chain whose shapes and
fields are checked against each other.

Sources (``source``):
  coco_json  ``ann_file`` (COCO format) + ``image_dir``; in evaluation
             ``eval_ann_file`` / ``eval_image_dir`` when set. Images ordered by id.
  tfds_coco  TFDS ``tfds_coco_train`` / ``tfds_coco_eval`` ('coco/2017:train' /
             'coco/2017:validation'); labels 0..79 -> COCO category ids.
  tfds_voc   TFDS ``tfds_voc_train`` (voc/2007 + voc/2012 trainval) / ``tfds_voc_eval``
             (voc/2007 test); labels 0..19. Difficult objects are dropped unless
             ``voc_keep_difficult``. image_id = the digits of the file name.
  Each entry 'name:split' may join splits with '+' (one source per part, concatenated).

Labels. coco_json: ``label_mapping`` 'category_id' uses the category ids as labels
(COCO: ids up to 90 -> num_classes 91, 92 logits with no-object, as the release);
'contiguous' maps the sorted ids to 0..K-1; 'auto' (default) uses the ids when
0 <= id <= max(2 K, K + 16), else contiguous. tfds_coco: category ids (91 classes);
tfds_voc: 0..19 (20 classes; category id = label + 1 for COCO-style results).

Annotations. Crowd boxes (iscrowd=1) are dropped (training and evaluation targets;
COCO evaluation uses pycocotools on the json anyway). Boxes xywh -> xyxy, clipped to
the decoded image, empty ones (w <= 0 or h <= 0) removed; counted in DataStats
(crowd_boxes, empty_boxes, difficult_boxes; once per dataset). Images without boxes
are kept (as the release).

Training geometry (DETR's transforms), drawn on the HOST per example from Philox
streams keyed by (seed, epoch, example), so every final size is known when the epoch
is planned and each batch holds one shape bucket; the image ops run in tf.data:
  1. hflip with p = ``hflip_prob`` (0.5);
  2. with p = ``crop_prob`` (0.5): resize (shorter side one of ``crop_resize_scales``
     {400, 500, 600}, no cap), random crop with sides U{lo..hi}, lo/hi =
     ``crop_size`` (384, 600) clipped to the image, position uniform; boxes mapped,
     clipped to the crop, emptied ones dropped;
  3. resize: shorter side from ``scales`` (480..800 step 32), long side <= ``max_size``
     (1333), by ``augment.resize_rule``; ImageNet normalisation; zero padding.
Evaluation: shorter side ``eval_scale`` (800), max 1333, no flip/crop; one pass in
image order, every usable image exactly once (bucket remainders padded last with
``valid`` False). Corrupt / truncated / tiny images are skipped (listed in
``DatasetInfo.skipped_image_ids``).

Targets: at most T = ``max_targets`` (100) per image. An image with more keeps, in
training, a random subset of T (per (seed, epoch, example), annotation order kept),
in evaluation its first T; DataStats counts such rows as ``targets_truncated``.

Batch (b = global_batch_size // process_count, (H, W) one of ``DatasetInfo.shapes``):
  images        float32 [b, H, W, 3]   normalised, zero-padded bottom/right
  padding_mask  bool [b, H, W]          True on padding
  targets       labels int32 [b, T], boxes float32 [b, T, 4] (cxcywh / UNPADDED
                resized size, in [0, 1]), mask bool [b, T] (False on invalid rows)
  image_id      int64 [b];  orig_size int32 [b, 2] (h, w of the decoded original)
  valid         bool [b]    False on evaluation padding rows and replaced rows
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
from typing import Any

import numpy as np
import tensorflow as tf

from updetr_jax.class_names import COCO_CATEGORIES, VOC_CLASSES
from updetr_jax.data import augment, batching, config, planning, sources

DETECTION_DEFAULTS: dict[str, Any] = dict(
  source='coco_json',
  ann_file='coco/annotations/instances_train2017.json',  # DETR's --coco_path layout
  image_dir='coco/train2017',
  eval_ann_file='coco/annotations/instances_val2017.json',
  eval_image_dir='coco/val2017',
  label_mapping='auto',
  tfds_coco_train=('coco/2017:train',),
  tfds_coco_eval=('coco/2017:validation',),
  tfds_voc_train=('voc/2007:train+validation', 'voc/2012:train+validation'),
  tfds_voc_eval=('voc/2007:test',),
  tfds_data_dir='',  # '': $TFDS_DATA_DIR or TFDS' default
  voc_keep_difficult=False,
  scales=tuple(range(480, 801, 32)),
  max_size=1333,
  eval_scale=800,
  hflip_prob=0.5,
  crop_prob=0.5,
  crop_resize_scales=(400, 500, 600),
  crop_size=(384, 600),
  max_targets=100,
  buckets=((608, 832), (800, 1088), (800, 1344)),
  repeats=1,
  **config.PIPELINE_DEFAULTS,
)

# The per-example geometry fields of ``plan_geometry`` (without rh, rw).
_GEOMETRY = ('flip', 'crop', 'h1', 'w1', 'y0', 'x0', 'ch', 'cw')
_BOOLEAN_GEOMETRY = ('flip', 'crop')  # the boolean ones
# Philox stream tags of the per-example training geometry (1, 2: see batching).
_T_FLIP, _T_CROP, _T_S1, _T_CH, _T_CW, _T_Y, _T_X, _T_S2, _T_KEEP = range(10, 19)


def detection_data_config(**overrides):
  """COCO 2017 fine-tuning config (json layout of the release; see module docstring)."""
  return config.as_config({**DETECTION_DEFAULTS, **overrides})


def voc_data_config(**overrides):
  """VOC07+12 trainval / VOC07 test through TFDS (20 classes)."""
  return detection_data_config(**{'source': 'tfds_voc', **overrides})


def resolve_detection_config(data_config) -> dict:
  """ConfigDict / dict (partial) -> plain dict with every field (unknown ones rejected)."""
  cfg = config.resolve_config(data_config, DETECTION_DEFAULTS)
  cfg['crop_resize_scales'] = tuple(int(s) for s in cfg['crop_resize_scales'])
  lo, hi = (int(v) for v in cfg['crop_size'])
  if not 0 < lo <= hi:
    raise ValueError(f'data.crop_size={cfg["crop_size"]} needs 0 < min <= max')
  cfg['crop_size'] = (lo, hi)
  if cfg['max_targets'] < 1:
    raise ValueError('data.max_targets must be >= 1')
  if cfg['label_mapping'] not in ('auto', 'category_id', 'contiguous'):
    raise ValueError(f'data.label_mapping={cfg["label_mapping"]!r}')
  return cfg


def detection_fields(data_config) -> dict:
  """The detection fields of a detection-style data config (one-shot adds its own)."""
  if hasattr(data_config, 'to_dict'):
    data_config = data_config.to_dict()
  return {k: v for k, v in dict(data_config).items() if k in DETECTION_DEFAULTS}


def detection_bucket_shapes(data_config) -> list[tuple[int, int]]:
  """The fixed (H, W) batch shapes of a detection config."""
  return planning.shapes_of_caps(planning.bucket_caps(resolve_detection_config(data_config)))


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model / evaluator needs to know about a detection dataset.

  num_classes: real classes C (the class head has C + 1 logits);
  class_names {label: name}; label_to_category_id {label: id} (COCO results);
  num_examples: examples per epoch (usable images x repeats; evaluation: usable
  images); shapes: batch shapes [(H, W)]; skipped_image_ids: images never yielded.
  """

  num_classes: int
  class_names: dict
  label_to_category_id: dict
  num_examples: int
  shapes: tuple
  skipped_image_ids: tuple
  source: str


class DetectionStats(planning.DataStats):
  """DataStats plus dropped boxes (once per dataset) and truncated target rows."""

  EXTRA = ('crowd_boxes', 'empty_boxes', 'difficult_boxes', 'targets_truncated')

  def report(self) -> str:
    d = self.as_dict()
    return (
      super().report()
      + '; boxes dropped: '
      + ', '.join(f'{k[:-6]} {d[k]}' for k in self.EXTRA[:3])
      + f'; targets_truncated {d["targets_truncated"]}'
    )


# --- annotations -----------------------------------------------------------------------


@dataclasses.dataclass
class Annotations:
  """Boxes of every image: xyxy float32 [m, 4] (original pixels, clipped, non-empty),
  labels int32 [m]; image i owns rows offsets[i]:offsets[i + 1]; image_ids int64 [n]."""

  boxes: np.ndarray
  labels: np.ndarray
  offsets: np.ndarray
  image_ids: np.ndarray
  dropped: dict

  def of(self, i):
    lo, hi = self.offsets[i], self.offsets[i + 1]
    return self.boxes[lo:hi], self.labels[lo:hi]


def build_annotations(per_image, height, width) -> Annotations:
  """per_image: list of (image_id, xywh [k, 4], labels [k], crowd bool [k], difficult
  bool [k] or None); height/width [n]: decoded sizes (0: unknown -> no clipping).
  Drops crowd and difficult boxes, clips to the image, drops empty boxes."""
  boxes, labels, counts = [], [], []
  dropped = dict(crowd_boxes=0, empty_boxes=0, difficult_boxes=0)
  for (_, xywh, lab, crowd, difficult), h, w in zip(per_image, height, width):
    xywh = np.asarray(xywh, np.float64).reshape(-1, 4)
    keep = ~np.asarray(crowd, bool).reshape(-1)
    dropped['crowd_boxes'] += int((~keep).sum())
    if difficult is not None:
      d = np.asarray(difficult, bool).reshape(-1) & keep
      dropped['difficult_boxes'] += int(d.sum())
      keep &= ~d
    b = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)[keep]
    if h > 0 and w > 0:
      b = np.clip(b, 0, [w, h, w, h])
    ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    dropped['empty_boxes'] += int((~ok).sum())
    boxes.append(b[ok].astype(np.float32))
    labels.append(np.asarray(lab, np.int32).reshape(-1)[keep][ok])
    counts.append(int(ok.sum()))
  return Annotations(
    boxes=np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
    labels=np.concatenate(labels) if labels else np.zeros(0, np.int32),
    offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
    image_ids=np.asarray([p[0] for p in per_image], np.int64),
    dropped=dropped,
  )


def label_map(category_ids, mode: str = 'auto') -> dict[int, int]:
  """Category ids -> {category_id: label} (see module docstring: label_mapping)."""
  ids = sorted(int(c) for c in category_ids)
  k = len(ids)
  if mode == 'auto':
    small = bool(ids) and ids[0] >= 0 and ids[-1] <= max(2 * k, k + 16)
    mode = 'category_id' if small else 'contiguous'
  if mode == 'category_id':
    return {c: c for c in ids}
  return {c: i for i, c in enumerate(ids)}


def load_coco_json(ann_file: str, image_dir: str, mode: str = 'auto'):
  """COCO json -> (paths, per_image (see build_annotations), class_names,
  label_to_category_id, num_classes). Images sorted by id."""
  with tf.io.gfile.GFile(ann_file, 'r') as f:
    coco = json.load(f)
  cats = {int(c['id']): c.get('name', str(c['id'])) for c in coco.get('categories', [])}
  cat_to_label = label_map(cats, mode)
  images = sorted(coco['images'], key=lambda im: int(im['id']))
  by_image: dict[int, list] = {int(im['id']): [] for im in images}
  for a in coco.get('annotations', []):
    c = int(a['category_id'])
    if c not in cat_to_label:
      raise ValueError(f'{ann_file}: annotation {a.get("id")} has category {c} not in categories')
    by_image.setdefault(int(a['image_id']), []).append(a)
  per_image = []
  for im in images:
    anns = by_image[int(im['id'])]
    per_image.append(
      (
        int(im['id']),
        np.asarray([a['bbox'] for a in anns], np.float64).reshape(-1, 4),
        np.asarray([cat_to_label[int(a['category_id'])] for a in anns], np.int32),
        np.asarray([bool(a.get('iscrowd', 0)) for a in anns], bool),
        None,
      )
    )
  paths = [os.path.join(image_dir, im['file_name']) for im in images]
  names = {cat_to_label[c]: n for c, n in cats.items()}
  to_cat = {l: c for c, l in cat_to_label.items()}
  num_classes = (max(cat_to_label.values()) + 1) if cat_to_label else 0
  return paths, per_image, names, to_cat, num_classes


def voc_image_id(filename) -> int:
  """VOC file name -> int id from its digits ('2008_000008.jpg' -> 2008000008)."""
  if isinstance(filename, bytes):
    filename = filename.decode()
  return int(re.sub(r'\D', '', os.path.splitext(os.path.basename(filename))[0]) or 0)


def tfds_per_image(example: dict, kind: str, height: int, width: int):
  """One TFDS coco / voc example (numpy features) -> a per_image entry in pixels."""
  objs = example['objects']
  yxyx = np.asarray(objs['bbox'], np.float64).reshape(-1, 4)
  xywh = np.stack(
    [
      yxyx[:, 1] * width,
      yxyx[:, 0] * height,
      (yxyx[:, 3] - yxyx[:, 1]) * width,
      (yxyx[:, 2] - yxyx[:, 0]) * height,
    ],
    1,
  )
  label = np.asarray(objs['label'], np.int64).reshape(-1)
  if kind == 'coco':
    ids = np.array(sorted(COCO_CATEGORIES), np.int32)
    return (
      int(example['image/id']),
      xywh,
      ids[label],
      np.asarray(objs['is_crowd'], bool).reshape(-1),
      None,
    )
  return (
    voc_image_id(example['image/filename']),
    xywh,
    label.astype(np.int32),
    np.zeros(len(label), bool),
    np.asarray(objs['is_difficult'], bool).reshape(-1),
  )


def _tfds_part_annotations(part, kind: str, cfg) -> list:
  """per_image entries of one TFDSSource (read once, cached like the image index)."""
  idx = part.index

  def build():
    def one(i):
      try:
        e = tfds_per_image(part.read_example(i), kind, idx.height[i], idx.width[i])
      except Exception:  # noqa: BLE001  (an unreadable record has no boxes)
        e = (0, np.zeros((0, 4)), np.zeros(0, np.int32), np.zeros(0, bool), None)
      diff = e[4] if e[4] is not None else np.zeros(len(e[2]), bool)
      return e[0], e[1], e[2], e[3], diff

    with concurrent.futures.ThreadPoolExecutor(
      max(1, cfg['index_threads'] or os.cpu_count() or 1)
    ) as pool:
      rows = list(pool.map(one, range(part.num_images)))
    counts = np.array([len(r[2]) for r in rows], np.int64)
    cat = lambda j, d: (
      np.concatenate([r[j] for r in rows]).astype(d)  # noqa: E731
      if rows
      else np.zeros(0, d)
    )
    return dict(
      ids=np.array([r[0] for r in rows], np.int64),
      counts=counts,
      xywh=cat(1, np.float64).reshape(-1, 4),
      labels=cat(2, np.int32),
      crowd=cat(3, bool),
      difficult=cat(4, bool),
    )

  b = part.builder
  fields = ('tfds-annotations', part.name, b.data_dir, b.info.version, part.num_images, kind)
  key = '\n'.join(map(str, fields))
  z = sources.cached_npz(cfg['index_cache_dir'], 'ann', key, build)
  ends = np.cumsum(z['counts'])
  starts = ends - z['counts']
  keep_diff = kind == 'voc' and not cfg['voc_keep_difficult']
  return [
    (
      int(z['ids'][i]),
      z['xywh'][s:e],
      z['labels'][s:e],
      z['crowd'][s:e],
      z['difficult'][s:e] if keep_diff else None,
    )
    for i, (s, e) in enumerate(zip(starts, ends))
  ]


def _tfds_source(specs, cfg):
  parts = []
  for spec in specs:
    name, sep, splits = spec.rpartition(':')  # 'name[:version]:split[+split]'
    if not sep:
      name, splits = spec, 'train'
    for split in splits.split('+'):
      parts.append(
        sources.TFDSSource(
          name,
          split,
          data_dir=cfg['tfds_data_dir'] or None,
          index_cache_dir=cfg['index_cache_dir'],
          index_threads=cfg['index_threads'],
        )
      )
  return parts


def make_detection_source(cfg: dict, train: bool):
  """-> (Source, Annotations, class_names, label_to_category_id, num_classes)."""
  kind = cfg['source']
  if kind == 'coco_json':
    ann_file, image_dir = cfg['ann_file'], cfg['image_dir']
    if not train and cfg['eval_ann_file']:
      ann_file, image_dir = cfg['eval_ann_file'], cfg['eval_image_dir']
    if not ann_file or not tf.io.gfile.exists(ann_file):
      raise FileNotFoundError(f'data.ann_file={ann_file!r} not found')
    paths, per_image, names, to_cat, num_classes = load_coco_json(
      ann_file, image_dir, cfg['label_mapping']
    )
    if not paths:
      raise ValueError(f'{ann_file} lists no images')
    source = sources.FileListSource(
      paths,
      f'coco_json:{ann_file}',
      index_cache_dir=cfg['index_cache_dir'],
      index_threads=cfg['index_threads'],
      cache_key='coco_json',
    )
  elif kind in ('tfds_coco', 'tfds_voc'):
    short = kind[5:]
    specs = cfg[f'tfds_{short}_{"train" if train else "eval"}']
    parts = _tfds_source(specs, cfg)
    per_image = [e for p in parts for e in _tfds_part_annotations(p, short, cfg)]
    source = parts[0] if len(parts) == 1 else sources.ConcatSource(parts)
    if short == 'coco':
      names = dict(COCO_CATEGORIES)
      to_cat, num_classes = {c: c for c in COCO_CATEGORIES}, 91
    else:
      names = dict(enumerate(VOC_CLASSES))
      to_cat, num_classes = {i: i + 1 for i in range(20)}, 20
  else:
    raise ValueError(f"data.source={kind!r}: choose 'coco_json', 'tfds_coco' or 'tfds_voc'")
  if cfg['cache_decoded']:
    source = sources.cache_decoded(source, cfg['index_threads'])
  ann = build_annotations(per_image, source.index.height, source.index.width)
  return source, ann, names, to_cat, num_classes


# --- geometry and targets --------------------------------------------------------------


def _randint(u, lo, hi):
  """Inclusive U{lo..hi} per entry from u in [0, 1) (int64 arrays)."""
  n = hi - lo + 1
  return lo + np.minimum((u * n).astype(np.int64), n - 1)


def plan_geometry(h, w, cfg: dict, *, seed: int, epoch: int, train: bool) -> dict:
  """Per-example geometry for images of size h, w int [n] -> dict of int32 [n]:
  flip, crop (0/1), h1, w1 (size before the crop), y0, x0, ch, cw (crop window in
  that size; the whole image when not cropping), rh, rw (final size)."""
  h = np.maximum(np.asarray(h, np.int64), 1)
  w = np.maximum(np.asarray(w, np.int64), 1)
  n = len(h)
  if not train:
    rh, rw = augment.resize_rule(h, w, np.full(n, cfg['eval_scale']), cfg['max_size'])
    z = np.zeros(n, np.int64)
    g = dict(flip=z, crop=z, h1=h, w1=w, y0=z, x0=z, ch=h, cw=w, rh=rh, rw=rw)
    return {k: np.asarray(v, np.int32) for k, v in g.items()}
  u = lambda tag: planning.philox_uniform(seed, epoch, tag, n)  # noqa: E731
  flip = u(_T_FLIP) < cfg['hflip_prob']
  crop = u(_T_CROP) < cfg['crop_prob']
  s1 = planning.philox_choice(cfg['crop_resize_scales'], seed, epoch, _T_S1, n)
  h1, w1 = augment.resize_rule(h, w, s1, None)
  h1, w1 = np.maximum(h1, 1), np.maximum(w1, 1)
  lo, hi = cfg['crop_size']
  ch = _randint(u(_T_CH), np.minimum(lo, h1), np.minimum(hi, h1))
  cw = _randint(u(_T_CW), np.minimum(lo, w1), np.minimum(hi, w1))
  y0 = _randint(u(_T_Y), 0, h1 - ch)
  x0 = _randint(u(_T_X), 0, w1 - cw)
  h1, w1 = np.where(crop, h1, h), np.where(crop, w1, w)
  y0, x0 = np.where(crop, y0, 0), np.where(crop, x0, 0)
  ch, cw = np.where(crop, ch, h), np.where(crop, cw, w)
  s2 = planning.philox_choice(cfg['scales'], seed, epoch, _T_S2, n)
  rh, rw = augment.resize_rule(ch, cw, s2, cfg['max_size'])
  g = dict(flip=flip, crop=crop, h1=h1, w1=w1, y0=y0, x0=x0, ch=ch, cw=cw, rh=rh, rw=rw)
  return {k: np.asarray(v, np.int32) for k, v in g.items()}


def transform_boxes(xyxy, h, w, g) -> tuple[np.ndarray, np.ndarray]:
  """Original-pixel boxes xyxy [k, 4] of an h x w image through geometry ``g``
  (scalars: flip, h1, w1, y0, x0, ch, cw) -> (cxcywh normalised by the crop [k', 4],
  indices [k'] of the kept boxes)."""
  b = np.asarray(xyxy, np.float64).reshape(-1, 4).copy()
  if g['flip']:
    b = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)
  b *= [g['w1'] / w, g['h1'] / h, g['w1'] / w, g['h1'] / h]
  b -= [g['x0'], g['y0'], g['x0'], g['y0']]
  b = np.clip(b, 0, [g['cw'], g['ch'], g['cw'], g['ch']])
  keep = np.flatnonzero((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]))
  b = b[keep] / [g['cw'], g['ch'], g['cw'], g['ch']]
  cxcywh = np.concatenate([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1)
  return cxcywh.astype(np.float32), keep


# --- the iterator ----------------------------------------------------------------------


class DetectionIterator(batching.BatchIterator):
  """Iterator of host-local detection batches (see ``make_detection_dataset``)."""

  def __init__(self, source, cfg, ann: Annotations, **kw):
    super().__init__(source, cfg, shapes=planning.shapes_of_caps(planning.bucket_caps(cfg)), **kw)
    self.ann = ann
    self.repeats = int(cfg['repeats']) if self.train else 1
    self.max_targets = int(cfg['max_targets'])
    self._row_fn = self._make_row_fn()

  def make_plan(self, epoch):
    index = self.source.index
    n = len(index) * self.repeats
    image = np.arange(n, dtype=np.int64) % len(index)
    return self.plan_examples(epoch, image, index.usable[image])

  def plan_examples(self, epoch, image, usable, extra=None) -> planning.EpochPlan:
    """The epoch's plan of examples showing ``image`` int64 [n] (those with ``usable``
    [n] True): order, geometry, buckets; ``extra`` {name: [n]} joins the geometry in
    ``plan.extra``."""
    index, cfg = self.source.index, self.cfg
    order = planning.epoch_order(
      usable, seed=self.seed, epoch=epoch, shuffle=self.train and cfg['shuffle']
    )
    g = plan_geometry(
      index.height[image], index.width[image], cfg, seed=self.seed, epoch=epoch, train=self.train
    )
    rh, rw = g.pop('rh'), g.pop('rw')
    caps = planning.bucket_caps(cfg)
    return planning.batch_plan(
      order, image, rh, rw, caps, self.global_batch, self.train, {**g, **(extra or {})}
    )

  def example_targets(self, plan, example: int, image: int):
    """Boxes xyxy [k, 4] (original pixels) and labels [k] of one example."""
    del plan, example
    return self.ann.of(image)

  def row_signature(self):
    b, t = self.local_batch, self.max_targets
    sig = super().row_signature()
    sig.update(
      {k: tf.TensorSpec([b], tf.bool if k in _BOOLEAN_GEOMETRY else tf.int32) for k in _GEOMETRY}
    )
    sig.update(
      labels=tf.TensorSpec([b, t], tf.int32),
      boxes=tf.TensorSpec([b, t, 4], tf.float32),
      tmask=tf.TensorSpec([b, t], tf.bool),
      image_id=tf.TensorSpec([b], tf.int64),
      truncated=tf.TensorSpec([b], tf.bool),
    )
    return sig

  def host_rows(self, epoch, j):
    rows = super().host_rows(epoch, j)
    plan = self.plan(epoch)
    ex = rows['example']
    g = {k: v[ex] for k, v in plan.extra.items()}
    b, t = self.local_batch, self.max_targets
    labels = np.zeros((b, t), np.int32)
    boxes = np.zeros((b, t, 4), np.float32)
    tmask = np.zeros((b, t), bool)
    truncated = np.zeros(b, bool)
    for r in range(b):
      img = int(rows['image'][r])
      xyxy, lab = self.example_targets(plan, int(ex[r]), img)
      gr = {k: int(v[r]) for k, v in g.items() if k in _GEOMETRY}
      cxcywh, keep = transform_boxes(xyxy, int(rows['height'][r]), int(rows['width'][r]), gr)
      lab = lab[keep]
      if len(keep) > t:
        truncated[r] = True
        if self.train:
          key = np.random.SeedSequence([int(self.seed) & 0xFFFFFFFF, epoch, _T_KEEP, int(ex[r])])
          sel = np.sort(np.random.Generator(np.random.Philox(key)).permutation(len(keep))[:t])
        else:
          sel = np.arange(t)
        cxcywh, lab = cxcywh[sel], lab[sel]
      k = len(lab)
      labels[r, :k], boxes[r, :k], tmask[r, :k] = lab, cxcywh, True
    rows.update(
      **{k: g[k].astype(bool) if k in _BOOLEAN_GEOMETRY else g[k] for k in _GEOMETRY},
      labels=labels,
      boxes=boxes,
      tmask=tmask,
      truncated=truncated,
      image_id=self.ann.image_ids[rows['image']],
    )
    return rows

  def _make_row_fn(self):
    source = self.source

    @tf.autograph.experimental.do_not_convert
    def row_fn(r):
      image = batching.load_row_image(source, r)  # uint8 [h, w, 3]
      image = tf.cond(r['flip'], lambda: tf.reverse(image, [1]), lambda: image)

      def cropped():
        x = augment.resize_image(image, tf.stack([r['h1'], r['w1']]))
        return x[r['y0'] : r['y0'] + r['ch'], r['x0'] : r['x0'] + r['cw']]

      x = tf.cond(r['crop'], cropped, lambda: tf.cast(image, tf.float32))
      det, padding_mask = batching.resize_and_pad(tf.ensure_shape(x, [None, None, 3]), r)
      valid = r['valid'] & ~r['fallback']
      mask = r['tmask'] & valid  # no targets on padding / replaced rows
      return dict(
        images=det,
        padding_mask=padding_mask,
        labels=tf.where(mask, r['labels'], 0),
        boxes=tf.where(mask[:, None], r['boxes'], 0.0),
        mask=mask,
        valid=valid,
        image_id=r['image_id'],
        orig_size=tf.stack([r['height'], r['width']]),
        truncated=r['truncated'] & valid,
        decode_failed=r['fallback'],
      )

    return row_fn

  def format(self, b):
    self.stats._add(targets_truncated=int(b.pop('truncated').sum()))
    return dict(
      images=b['images'],
      padding_mask=b['padding_mask'],
      targets=dict(labels=b['labels'], boxes=b['boxes'], mask=b['mask']),
      image_id=b['image_id'],
      orig_size=b['orig_size'],
      valid=b['valid'],
    )


def make_detection_dataset(
  data_config,
  *,
  global_batch_size: int,
  train: bool = True,
  seed: int = 0,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
):
  """Host-local detection batches -> (iterator, DataStats, DatasetInfo).

  Batch layout, augmentation and label mapping: see the module docstring. Training
  iterates epochs forever (``start_step`` = global batches already consumed resumes
  exactly); evaluation makes one pass.
  """
  cfg = resolve_detection_config(data_config)
  kw = batching.check_batch_args(
    global_batch_size, start_step, process_index, process_count, train=train, seed=seed
  )
  source, ann, names, to_cat, num_classes = make_detection_source(cfg, train)
  stats = DetectionStats(source.name)
  stats._add(**ann.dropped)
  it = DetectionIterator(source, cfg, ann, stats=stats, **kw)
  usable = source.index.usable
  info = DatasetInfo(
    num_classes=num_classes,
    class_names=names,
    label_to_category_id=to_cat,
    num_examples=int(usable.sum()) * it.repeats,
    shapes=tuple(tuple(int(v) for v in s) for s in it._shapes),
    skipped_image_ids=tuple(int(i) for i in ann.image_ids[~usable]),
    source=source.name,
  )
  it.locate(start_step)  # plans the first epoch now: configuration errors surface here
  return it, stats, info
