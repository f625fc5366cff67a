"""Input pipeline of one-shot detection: the CoAE protocol (docs/method.md, 'One-shot
detection') on any detection source (TFDS VOC, COCO json, TFDS COCO).

Public API:
  make_oneshot_dataset(data_config, *, global_batch_size, train=True, seed=0,
      start_step=0, process_index=0, process_count=1, query_seed=0)
      -> (iterator, OneShotStats, OneShotInfo)
  oneshot_data_config(**overrides)
  class_split(unseen_classes, class_names, label_to_category_id) -> (seen, unseen)
  OneShotProtocol: the choices below, in numpy (tested on their own)

Classes. ``unseen_classes`` names the held-out classes, by name ('cow') or by COCO
category id (an int); every other class of the source is seen. VOC (CoAE): cow,
sheep, cat, aeroplane unseen, the other 16 seen.

Training (``train=True``, the training split):
  * every box of an unseen class is removed (it becomes background; counted as
    ``unseen_boxes``); images left without a box are not trained on (counted as
    ``images_without_seen_class``);
  * one example per remaining image (x ``repeats``); per (seed, epoch, example) a
    class c is drawn uniformly among the seen classes of the image that have a query
    in another image, and the query uniformly among the pool boxes of c of the other
    images (images with no such class: ``images_without_query``);
  * targets: every box of c in the image, label 0 ("is the query's class"); the
    image takes DETR's training geometry (flip, crop, multi-scale, detection.py).
Evaluation (``train=False``, the evaluation split): every (image, class present)
pair is one trial, ordered by image then class label; its query is the first box of
a permutation of the class's pool whose image is not the trial's, the permutation
seeded by (``query_seed``, image id, class): deterministic per seed, different
across seeds. A trial whose class occurs in no other image has no query and is not
run (``trials_without_query``). Five seeds give the literature's five runs. A control
run (``other_class``) gives every trial a query of another class instead.
Query pool: the boxes of a class in the split (crowd / difficult / empty boxes are
already gone, detection.py) whose sides are both >= ``query_min_size`` pixels.

Query crop: the box rounded outward to whole pixels, cropped from its (original)
image, resized to ``patch_size`` x ``patch_size`` (aspect not kept, bilinear,
antialiased: ``patches.crop_patch``), rounded to uint8; on the device
(``device_augment.query_preparer``, in the jitted step) the pre-training's
query-patch augmentation applies in training (same fields) and it is
ImageNet-normalised.

Batch: the detection batch (detection.py; ``targets.labels`` all 0) plus
  patches         uint8 [b, 1, P, P, 3]     the query crop (UP-DETR's patch input)
  patch_seeds     uint32 [b, 2]   (k(seed, epoch), example): its augmentation's key
  label           int32 [b]     the trial's class (evaluation: the AP class)
  query_image_id  int64 [b]     the image the query was cropped from
  query_box       float32 [b, 4]  xyxy of the query in that image's pixels
A row whose target or query image fails to decode at load time is blanked with
``valid`` False (``decode_failed``), as in the other pipelines.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tensorflow as tf

from updetr_jax.data import batching, config, detection, patches, planning

# CoAE's VOC split.
VOC_UNSEEN_CLASSES = ('cow', 'sheep', 'cat', 'aeroplane')

ONESHOT_DEFAULTS: dict[str, Any] = dict(
  detection.DETECTION_DEFAULTS,
  source='tfds_voc',
  unseen_classes=VOC_UNSEEN_CLASSES,
  query_min_size=8,
  **config.PATCH_DEFAULTS,
)

# Philox stream tags of the training choices (detection.py uses 10..18).
_T_CLASS, _T_QUERY = 20, 21


def oneshot_data_config(**overrides):
  """One-shot data config: VOC07+12 trainval / VOC07 test through TFDS, CoAE's split."""
  return config.as_config({**ONESHOT_DEFAULTS, **overrides})


def resolve_oneshot_config(data_config) -> dict:
  """ConfigDict / dict (partial) -> plain dict with every field (unknown ones rejected)."""
  cfg = config.resolve_config(data_config, ONESHOT_DEFAULTS)
  cfg.update(detection.resolve_detection_config(detection.detection_fields(cfg)))
  cfg['unseen_classes'] = tuple(cfg['unseen_classes'])
  if cfg['patch_size'] < 1:
    raise ValueError(f'data.patch_size={cfg["patch_size"]} must be >= 1')
  if cfg['query_min_size'] < 1:
    raise ValueError(f'data.query_min_size={cfg["query_min_size"]} must be >= 1')
  return cfg


def class_split(unseen_classes, class_names: dict, label_to_category_id: dict):
  """-> (seen labels, unseen labels), sorted tuples of the source's labels.

  unseen_classes: names (str) or COCO category ids (int) of the held-out classes.
  Raises ValueError naming the entries that are not classes of the source.
  """
  by_name = {str(n): int(l) for l, n in class_names.items()}
  by_id = {int(c): int(l) for l, c in label_to_category_id.items()}
  unseen, unknown = set(), []
  for u in unseen_classes:
    table = by_name if isinstance(u, str) else by_id
    key = u if isinstance(u, str) else int(u)
    if key in table:
      unseen.add(table[key])
    else:
      unknown.append(u)
  if unknown:
    raise ValueError(
      f'data.unseen_classes: {unknown} are not classes of this data '
      f'(names: {sorted(by_name)}; category ids: {sorted(by_id)})'
    )
  labels = sorted(int(l) for l in class_names)
  return tuple(l for l in labels if l not in unseen), tuple(sorted(unseen))


def drop_classes(ann: detection.Annotations, labels) -> tuple[detection.Annotations, int]:
  """Annotations without the boxes of ``labels``; returns (them, boxes dropped)."""
  keep = ~np.isin(ann.labels, np.asarray(list(labels), np.int32))
  counts = np.diff(ann.offsets)
  image_of = np.repeat(np.arange(len(counts)), counts)
  new_counts = np.bincount(image_of[keep], minlength=len(counts))
  out = detection.Annotations(
    boxes=ann.boxes[keep],
    labels=ann.labels[keep],
    offsets=np.concatenate([[0], np.cumsum(new_counts)]).astype(np.int64),
    image_ids=ann.image_ids,
    dropped=dict(ann.dropped),
  )
  return out, int((~keep).sum())


class OneShotProtocol:
  """The protocol's choices over one split's annotations (see the module docstring).

  ann: annotations (training: unseen classes already dropped); usable bool [n]
  images the index keeps; min_size: smallest query side in pixels.
  Attributes: row_image int64 [m] (image of each box row of ``ann``);
  pool {label: box rows int64 [k], sorted by image}.
  """

  def __init__(self, ann: detection.Annotations, usable, min_size: int):
    self.ann = ann
    self.usable = np.asarray(usable, bool)
    counts = np.diff(ann.offsets)
    self.row_image = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    wh = ann.boxes[:, 2:] - ann.boxes[:, :2]
    ok = (wh >= min_size).all(1) & self.usable[self.row_image]
    self.pool = {
      int(c): np.flatnonzero(ok & (ann.labels == c)).astype(np.int64) for c in np.unique(ann.labels)
    }
    self._pool_images = {c: self.row_image[r] for c, r in self.pool.items()}

  def _other_images(self, c: int, image: int) -> tuple[int, int, int]:
    """(pool size, start, end) of ``image``'s own entries in class c's pool."""
    imgs = self._pool_images.get(c, np.zeros(0, np.int64))
    lo, hi = np.searchsorted(imgs, image, 'left'), np.searchsorted(imgs, image, 'right')
    return len(imgs), int(lo), int(hi)

  def has_query(self, c: int, image: int) -> bool:
    """Does class c have a pool box in an image other than ``image``?"""
    n, lo, hi = self._other_images(c, image)
    return n - (hi - lo) > 0

  def classes_of(self, image: int) -> np.ndarray:
    """Sorted labels present in ``image``."""
    _, lab = self.ann.of(image)
    return np.unique(lab).astype(np.int64)

  # training ------------------------------------------------------------------------
  def training_images(self) -> tuple[np.ndarray, dict]:
    """Images to train on (usable, with a class that has a query elsewhere) int64 [n],
    and counts {'images_without_seen_class', 'images_without_query'}."""
    keep, no_class, no_query = [], 0, 0
    for i in np.flatnonzero(self.usable):
      cs = self.classes_of(i)
      if not len(cs):
        no_class += 1
      elif not any(self.has_query(int(c), i) for c in cs):
        no_query += 1
      else:
        keep.append(i)
    counts = dict(images_without_seen_class=no_class, images_without_query=no_query)
    return np.asarray(keep, np.int64), counts

  def training_choices(self, image, *, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per example e showing ``image[e]``: (class int32 [n], query box row int64 [n]),
    drawn from Philox streams keyed by (seed, epoch, e)."""
    n = len(image)
    u_class = planning.philox_uniform(seed, epoch, _T_CLASS, n)
    u_query = planning.philox_uniform(seed, epoch, _T_QUERY, n)
    label = np.zeros(n, np.int32)
    row = np.zeros(n, np.int64)
    for e, i in enumerate(np.asarray(image, np.int64)):
      cs = [int(c) for c in self.classes_of(i) if self.has_query(int(c), i)]
      c = cs[min(int(u_class[e] * len(cs)), len(cs) - 1)]
      size, lo, hi = self._other_images(c, i)
      k = min(int(u_query[e] * (size - (hi - lo))), size - (hi - lo) - 1)
      label[e], row[e] = c, self.pool[c][k if k < lo else k + (hi - lo)]
    return label, row

  # evaluation ----------------------------------------------------------------------
  def evaluation_trials(self) -> tuple[np.ndarray, np.ndarray]:
    """Every (usable image, class present) pair: (image int64 [T], class int32 [T]),
    ordered by image then class."""
    image, label = [], []
    for i in np.flatnonzero(self.usable):
      for c in self.classes_of(i):
        image.append(i)
        label.append(c)
    return np.asarray(image, np.int64), np.asarray(label, np.int32)

  def evaluation_queries(self, image, label, query_seed: int, other_class: bool = False):
    """Query box row per trial, int64 [T] (-1: its class occurs in no other image):
    the first entry of the class pool's permutation, seeded by (query_seed, image id,
    class), that lies in another image. other_class: the control run, a query of
    ANOTHER class instead (from the pooled boxes of every other class; a detector
    that ignores its query scores the same with these)."""
    out = np.full(len(image), -1, np.int64)
    everything = np.sort(np.concatenate([np.zeros(0, np.int64), *self.pool.values()]))
    for t, (i, c) in enumerate(zip(np.asarray(image), np.asarray(label))):
      if other_class:
        pool = everything[self.ann.labels[everything] != c]
      else:
        pool = self.pool.get(int(c), np.zeros(0, np.int64))
      key = [int(query_seed), int(self.ann.image_ids[i]) & 0xFFFFFFFFFFFF, int(c)]
      key += [1] if other_class else []
      rng = np.random.Generator(np.random.Philox(np.random.SeedSequence(key)))
      perm = rng.permutation(len(pool))
      other = perm[self.row_image[pool[perm]] != i]
      if len(other):
        out[t] = pool[other[0]]
    return out


@dataclasses.dataclass(frozen=True)
class OneShotInfo(detection.DatasetInfo):
  """DatasetInfo plus the class split: seen / unseen labels (tuples); num_trials:
  training, the images trained on; evaluation, the trials that have a query."""

  seen: tuple = ()
  unseen: tuple = ()
  num_trials: int = 0


class OneShotStats(detection.DetectionStats):
  """DetectionStats plus the protocol's exclusions (once per dataset)."""

  EXTRA = detection.DetectionStats.EXTRA + (
    'unseen_boxes',
    'images_without_seen_class',
    'images_without_query',
    'trials_without_query',
  )

  def report(self) -> str:
    d = self.as_dict()
    return super().report() + '; one-shot: ' + ', '.join(f'{k} {d[k]}' for k in self.EXTRA[4:])


class OneShotIterator(detection.DetectionIterator):
  """Iterator of host-local one-shot batches (see ``make_oneshot_dataset``)."""

  def __init__(self, source, cfg, ann, protocol: OneShotProtocol, *, query_seed: int = 0, **kw):
    self.protocol = protocol
    self.query_seed = int(query_seed)
    self.other_class = False
    if kw['train']:
      self.images, self.counts = protocol.training_images()
    else:
      self.trial_image, self.trial_label = protocol.evaluation_trials()
      # The trials of every run, the control run's too: a same-class query exists.
      self.trial_has_query = np.array(
        [protocol.has_query(int(c), int(i)) for i, c in zip(self.trial_image, self.trial_label)],
        bool,
      )
      self.counts = {}
    super().__init__(source, cfg, ann, **kw)

  def use_query_seed(self, query_seed: int, other_class: bool = False) -> None:
    """Evaluation: the next pass draws its queries with ``query_seed`` (from batch 0);
    ``other_class``: the control run (``OneShotProtocol.evaluation_queries``)."""
    with self._lock:
      self.query_seed = int(query_seed)
      self.other_class = bool(other_class)
      self._plans.clear()
      self._epoch_batches.clear()
    self.seek(0)

  def make_plan(self, epoch):
    index = self.source.index
    if self.train:
      image = np.tile(self.images, self.repeats)
      label, q_row = self.protocol.training_choices(image, seed=self.seed, epoch=epoch)
      usable = index.usable[image]
    else:
      image, label = self.trial_image, self.trial_label
      q_row = self.protocol.evaluation_queries(image, label, self.query_seed, self.other_class)
      usable = index.usable[image] & self.trial_has_query & (q_row >= 0)
    return self.plan_examples(epoch, image, usable, extra=dict(label=label, q_row=q_row))

  def example_targets(self, plan, example: int, image: int):
    xyxy, lab = self.ann.of(image)
    sel = lab == plan.extra['label'][example]
    return xyxy[sel], np.zeros(int(sel.sum()), np.int32)

  def row_signature(self):
    b = self.local_batch
    sig = super().row_signature()
    sig.update(
      label=tf.TensorSpec([b], tf.int32),
      q_image=tf.TensorSpec([b], tf.int64),
      q_image_id=tf.TensorSpec([b], tf.int64),
      q_path=tf.TensorSpec([b], tf.string),
      q_decoder=tf.TensorSpec([b], tf.int32),
      q_height=tf.TensorSpec([b], tf.int32),
      q_width=tf.TensorSpec([b], tf.int32),
      q_box=tf.TensorSpec([b, 4], tf.float32),
    )
    return sig

  def host_rows(self, epoch, j):
    rows = super().host_rows(epoch, j)
    plan = self.plan(epoch)
    ex = rows['example']
    q_row = plan.extra['q_row'][ex]
    q_img = self.protocol.row_image[q_row]
    idx = self.source.index
    paths = self.source.paths
    rows.update(
      label=plan.extra['label'][ex].astype(np.int32),
      q_image=q_img,
      q_image_id=self.ann.image_ids[q_img],
      q_path=np.array([paths[i] for i in q_img] if paths else [''] * len(ex), dtype=object),
      q_decoder=idx.decoder[q_img].astype(np.int32),
      q_height=idx.height[q_img],
      q_width=idx.width[q_img],
      q_box=self.ann.boxes[q_row].astype(np.float32),
      fallback=rows['fallback'] | np.array([int(i) in self.bad_images for i in q_img], bool),
    )
    return rows

  def row_images(self, rows) -> np.ndarray:
    ok = ~rows['fallback']  # each row loads its target and its query image
    return np.concatenate([rows['image'][ok], rows['q_image'][ok]])

  def _make_row_fn(self):
    detect_row = super()._make_row_fn()
    source, cfg = self.source, self.cfg
    p = int(cfg['patch_size'])

    @tf.autograph.experimental.do_not_convert
    def row_fn(r):
      out = detect_row(r)
      image = batching.load_row_image(source, r, 'q_')
      shape = tf.shape(image)
      box = r['q_box']
      x0 = tf.clip_by_value(tf.cast(tf.floor(box[0]), tf.int32), 0, shape[1] - 1)
      y0 = tf.clip_by_value(tf.cast(tf.floor(box[1]), tf.int32), 0, shape[0] - 1)
      x1 = tf.clip_by_value(tf.cast(tf.math.ceil(box[2]), tf.int32), x0 + 1, shape[1])
      y1 = tf.clip_by_value(tf.cast(tf.math.ceil(box[3]), tf.int32), y0 + 1, shape[0])
      crop = patches.crop_patch(image, tf.stack([x0, y0, x1 - x0, y1 - y0]), p)[None]
      # uint8 to the device, which augments (training) and normalises it
      # (device_augment.query_preparer).
      crop = tf.cast(tf.clip_by_value(tf.round(crop), 0.0, 255.0), tf.uint8)
      out.update(
        patches=crop,
        patch_seeds=tf.stack(
          [tf.cast(r['key0'], tf.uint32), tf.cast(r['example'] % (1 << 32), tf.uint32)]
        ),
        label=r['label'],
        query_image_id=r['q_image_id'],
        query_box=r['q_box'],
      )
      return out

    return row_fn

  def format(self, b):
    out = super().format(b)
    out.update(
      patches=b['patches'],
      patch_seeds=b['patch_seeds'],
      label=b['label'],
      query_image_id=b['query_image_id'],
      query_box=b['query_box'],
    )
    return out


def make_oneshot_dataset(
  data_config,
  *,
  global_batch_size: int,
  train: bool = True,
  seed: int = 0,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  query_seed: int = 0,
):
  """Host-local one-shot batches -> (iterator, OneShotStats, OneShotInfo).

  Protocol, batch layout: see the module docstring. Training iterates epochs forever
  (``start_step`` resumes exactly); evaluation makes one pass over the trials with the
  queries of ``query_seed`` (``iterator.use_query_seed`` switches to another run).
  """
  cfg = resolve_oneshot_config(data_config)
  kw = batching.check_batch_args(
    global_batch_size, start_step, process_index, process_count, train=train, seed=seed
  )
  source, ann, names, to_cat, num_classes = detection.make_detection_source(cfg, train)
  seen, unseen = class_split(cfg['unseen_classes'], names, to_cat)
  stats = OneShotStats(source.name)
  stats._add(**ann.dropped)
  if train:
    ann, n_unseen = drop_classes(ann, unseen)
    stats._add(unseen_boxes=n_unseen)
  protocol = OneShotProtocol(ann, source.index.usable, cfg['query_min_size'])
  it = OneShotIterator(source, cfg, ann, protocol, query_seed=query_seed, stats=stats, **kw)
  stats._add(**it.counts)
  if train:
    num_trials = len(it.images)
    if not num_trials:
      raise ValueError(
        f'data: {source.name} has no image with a seen class whose query can come '
        f'from another image (seen labels {seen}); check data.unseen_classes'
      )
  else:
    plan = it.plan(0)
    num_trials = int(plan.valid.sum())
    stats._add(trials_without_query=int((plan.extra['q_row'] < 0).sum()))
  usable = source.index.usable
  info = OneShotInfo(
    num_classes=num_classes,
    class_names=names,
    label_to_category_id=to_cat,
    num_examples=num_trials * (it.repeats if train else 1),
    shapes=tuple(tuple(int(v) for v in s) for s in it._shapes),
    skipped_image_ids=tuple(int(i) for i in ann.image_ids[~usable]),
    source=source.name,
    seen=seen,
    unseen=unseen,
    num_trials=num_trials,
  )
  it.locate(start_step)  # plans the first epoch now: configuration errors surface here
  return it, stats, info
