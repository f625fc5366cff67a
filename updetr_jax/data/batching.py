"""The patch pipeline: tf.data over the epoch plan, per-host batches, resumption.

Shapes and epoch plans come from ``planning``; configs from ``config``.

Per-example randomness (patch rectangles, augmentation) uses stateless TF ops keyed
by (k(seed, epoch), example): the same whatever the thread count or host layout.

Bad images never stop the pipeline. The index (see sources.py) skips corrupt,
truncated and too-small images and marks conversions; ``planning.DataStats`` counts each such
image once per epoch that is planned (a resumed epoch counts whole). An image that
passed the index but fails to load or decode in the pipeline (e.g. changed on disk)
is found when TF raises, marked bad, and the pipeline is rebuilt at the same step
with that row replaced by a gray image whose ``valid`` and ``targets.mask`` are
False; it is counted as ``decode_failed`` once per batch it appears in.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from typing import Any

import numpy as np
import tensorflow as tf

from updetr_jax.data import augment, config, patches, planning, sources

# --- the tf.data pipeline --------------------------------------------------------------


def _row_signature(b):
  i64, i32 = tf.int64, tf.int32
  spec = lambda dt: tf.TensorSpec([b], dt)  # noqa: E731
  return dict(
    example=spec(i64),
    image=spec(i64),
    key0=spec(i64),
    height=spec(i32),
    width=spec(i32),
    rh=spec(i32),
    rw=spec(i32),
    bh=spec(i32),
    bw=spec(i32),
    decoder=spec(i32),
    valid=spec(tf.bool),
    fallback=spec(tf.bool),
    path=spec(tf.string),
  )


def load_row_image(source: sources.Source, r, prefix: str = ''):
  """The row's image, uint8 [h, w, 3]: decoded, or gray if the row is a fallback
  (``prefix``: of the fields ``image``, ``path``, ``decoder``, ``height``, ``width``)."""

  def load():
    return source.tf_load(r[prefix + 'image'], r[prefix + 'path'], r[prefix + 'decoder'])

  def blank():
    size = tf.stack([r[prefix + 'height'], r[prefix + 'width'], 3])
    return tf.fill(size, tf.constant(124, tf.uint8))

  return tf.cond(r['fallback'], blank, load)


def _resize_and_pad(image, r, convert):
  """image [h, w, 3] (0..255) resized to (rh, rw), ``convert``ed, zero-padded
  bottom/right to [bh, bw, 3]."""
  det = convert(augment.resize_image(image, tf.stack([r['rh'], r['rw']])))
  return tf.pad(det, [[0, r['bh'] - r['rh']], [0, r['bw'] - r['rw']], [0, 0]])


def resize_and_pad(image, r):
  """image [h, w, 3] (0..255) -> (normalised float32 [bh, bw, 3] resized to (rh, rw)
  and zero-padded bottom/right, padding_mask bool [bh, bw] True on padding)."""
  det = _resize_and_pad(image, r, lambda x: augment.normalize(x, 255.0))
  inside = (tf.range(r['bh'])[:, None] < r['rh']) & (tf.range(r['bw'])[None, :] < r['rw'])
  return det, ~inside


def make_row_fn(source: sources.Source, cfg: dict, *, num_patches: int):
  """Row record (see _row_signature, scalars) -> one example (unbatched tensors).

  The host part of the patch pipeline: decode, resize and pad (uint8, rounded), draw
  the patch rectangles; the crops, their augmentation and every float conversion
  happen on the accelerator (``device_augment.prepare_batch``). Training only changes
  the plan (scales, shuffling), not this function.
  """
  to_uint8 = lambda x: tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)  # noqa: E731

  @tf.autograph.experimental.do_not_convert
  def row_fn(r):
    image = load_row_image(source, r)  # uint8 [h, w, 3]
    keys = tf.random.experimental.stateless_split(tf.stack([r['key0'], r['example']]), 2)
    shape = tf.shape(image)
    boxes_px = patches.sample_patch_boxes(keys[0], shape[0], shape[1], num_patches)
    # The rectangles in the resized image's pixels (x, y, w, h; fractional).
    sx = tf.cast(r['rw'], tf.float32) / tf.cast(shape[1], tf.float32)
    sy = tf.cast(r['rh'], tf.float32) / tf.cast(shape[0], tf.float32)
    patch_boxes = tf.cast(boxes_px, tf.float32) * tf.stack([sx, sy, sx, sy])
    valid = r['valid'] & ~r['fallback']
    return dict(
      images=_resize_and_pad(image, r, to_uint8),
      image_size=tf.stack([r['rh'], r['rw']]),
      patch_boxes=patch_boxes,
      patch_seeds=tf.stack(
        [tf.cast(r['key0'], tf.uint32), tf.cast(r['example'] % (1 << 32), tf.uint32)]
      ),
      boxes=patches.boxes_to_cxcywh(boxes_px, shape[0], shape[1]),
      labels=tf.ones([num_patches], tf.int32),
      mask=tf.fill([num_patches], valid),
      valid=valid,
      index=tf.cast(r['example'], tf.int32),
      decode_failed=r['fallback'],
    )

  return row_fn


_LIVE_ITERATORS = weakref.WeakSet()


@atexit.register
def _close_iterators():
  """Drop tf.data iterators while Python is alive (their generator needs it)."""
  for it in list(_LIVE_ITERATORS):
    it.close()


class BatchIterator:
  """Host-local numpy batches planned by epoch (base of the pre-training and the
  detection iterators).

  Subclasses set ``_row_fn`` (row record -> example tensors) and may override
  ``make_plan``, ``host_rows`` / ``row_signature`` (extra row fields) and ``format``
  (numpy batch -> output dict). Attributes: step (global batches yielded so far,
  counting start_step), stats.
  """

  def __init__(
    self,
    source,
    cfg,
    *,
    global_batch_size,
    train,
    seed,
    start_step,
    process_index,
    process_count,
    stats,
    shapes,
  ):
    self.source, self.cfg = source, cfg
    self.global_batch = global_batch_size
    self.local_batch = global_batch_size // process_count
    self.train, self.seed = train, seed
    self.process_index = process_index
    self.step = start_step
    self.stats = stats
    self.repeats = cfg['demo_repeats'] if cfg['source'] == 'demo' else 1
    self.bad_images: set[int] = set()  # found at load time
    self._plans: dict[int, planning.EpochPlan] = {}
    self._counted_epochs: set[int] = set()
    self._epoch_batches: dict[int, int] = {}  # batches per planned epoch
    self._lock = threading.RLock()
    self._stop = threading.Event()  # set by close(): the row generator returns
    self._shapes = np.asarray(shapes, np.int32)
    self._row_fn = None
    self._it = None
    _LIVE_ITERATORS.add(self)

  def make_plan(self, epoch: int) -> planning.EpochPlan:
    """Plan one epoch (uncached)."""
    return planning.plan_epoch(
      self.source.index,
      self.cfg,
      seed=self.seed,
      epoch=epoch,
      train=self.train,
      global_batch=self.global_batch,
      repeats=self.repeats,
    )

  def row_signature(self):
    """tf.TensorSpec dict of the row records of ``host_rows``."""
    return _row_signature(self.local_batch)

  def format(self, b: dict[str, np.ndarray]) -> dict[str, Any]:
    """Numpy batch of the row fn (minus decode_failed) -> the yielded dict."""
    raise NotImplementedError

  def close(self):
    """Release the tf.data iterator (a later ``next`` rebuilds it at ``step``).

    The pipeline is first run dry (the generator stops at its next row; the few
    batches in flight are decoded and dropped): deleting a tf.data iterator while its
    parallel map threads wait in ``numpy_function`` for the GIL can deadlock.
    """
    it, self._it = self._it, None
    if it is None:
      return
    self._stop.set()
    try:
      for _ in it:
        pass
    except Exception:  # noqa: BLE001  (a broken pipeline is dropped as it is)
      pass
    finally:
      self._stop.clear()

  def seek(self, step: int) -> None:
    """Continue from global batch ``step`` (a resumed run's, or 0 for another pass
    of an evaluation set); the source, its index and plans are kept."""
    self.close()
    self.step = step

  # planning --------------------------------------------------------------------------
  def plan(self, epoch: int) -> planning.EpochPlan:
    """The epoch's plan (the last two are cached)."""
    with self._lock:
      if epoch not in self._plans:
        plan = self.make_plan(epoch)
        if self.train and len(plan) == 0:
          raise ValueError(
            f'data: epoch {epoch} of {self.source.name} gives no full global batch of '
            f'{self.global_batch} ({int(self.source.index.usable.sum())} usable images x '
            f'{self.repeats} repeats over {len(self._shapes)} buckets); lower the batch '
            'size, use fewer data.buckets or raise data.demo_repeats'
          )
        self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
        self._plans[epoch] = plan
        self._epoch_batches[epoch] = len(plan)
      return self._plans[epoch]

  def locate(self, step: int) -> tuple[int, int] | None:
    """Global step -> (epoch, batch in epoch), or None past the end (evaluation)."""
    epoch = 0
    while True:
      nb = self._epoch_batches.get(epoch)
      if nb is None:
        nb = len(self.plan(epoch))
      if step < nb:
        return epoch, step
      if not self.train:
        return None
      step -= nb
      epoch += 1

  def host_rows(self, epoch: int, j: int) -> dict[str, np.ndarray]:
    """This host's row records of global batch j of ``epoch``."""
    plan = self.plan(epoch)
    lo = self.process_index * self.local_batch
    sl = slice(lo, lo + self.local_batch)
    ex = plan.examples[j, sl]
    img = plan.image[ex]
    bh, bw = self._shapes[plan.bucket[j]]
    idx = self.source.index
    b = self.local_batch
    paths = self.source.paths
    return dict(
      example=ex,
      image=img,
      key0=np.full(b, planning.example_key(self.seed, epoch), np.int64),
      height=idx.height[img],
      width=idx.width[img],
      rh=plan.rh[ex],
      rw=plan.rw[ex],
      bh=np.full(b, bh, np.int32),
      bw=np.full(b, bw, np.int32),
      decoder=idx.decoder[img].astype(np.int32),
      valid=plan.valid[j, sl],
      fallback=np.array([int(i) in self.bad_images for i in img], bool),
      path=np.array([paths[i] for i in img] if paths else [''] * b, dtype=object),
    )

  def _row_batches(self, start_step: int):
    loc = self.locate(start_step)
    if loc is None:
      return
    epoch, j = loc
    while True:
      plan = self.plan(epoch)
      with self._lock:  # once per epoch, also across pipeline rebuilds
        first = epoch not in self._counted_epochs
        self._counted_epochs.add(epoch)
      if first:
        self.stats.add_epoch(self.source.index.status)
      for jj in range(j, len(plan)):
        if self._stop.is_set():
          return
        yield self.host_rows(epoch, jj)
      if not self.train:
        return
      epoch, j = epoch + 1, 0

  # tf.data ---------------------------------------------------------------------------
  def dataset(self, start_step: int) -> tf.data.Dataset:
    """The tf.data pipeline of this host from ``start_step`` on."""
    cfg = self.cfg
    ds = tf.data.Dataset.from_generator(
      lambda: self._row_batches(start_step), output_signature=self.row_signature()
    )
    ds = ds.unbatch()
    par = cfg['num_parallel_calls']
    ds = ds.map(
      self._row_fn, num_parallel_calls=tf.data.AUTOTUNE if par < 0 else par, deterministic=True
    )
    ds = ds.batch(self.local_batch, drop_remainder=True)
    if cfg['prefetch']:
      ds = ds.prefetch(cfg['prefetch'])
    opts = tf.data.Options()
    opts.deterministic = True
    if cfg['threads']:
      opts.threading.private_threadpool_size = int(cfg['threads'])
    return ds.with_options(opts)

  def __iter__(self):
    return self

  def row_images(self, rows) -> np.ndarray:
    """The images a batch of host rows loads (not yet replaced): int64 [k]."""
    return rows['image'][~rows['fallback']]

  def _find_bad_rows(self) -> list[int]:
    loc = self.locate(self.step)
    if loc is None:
      return []
    bad = []
    for i in sorted({int(i) for i in self.row_images(self.host_rows(*loc))}):
      try:
        self.source.python_load(i)
      except Exception:  # noqa: BLE001
        bad.append(i)
    return bad

  def __next__(self) -> dict[str, Any]:
    for _ in range(self.local_batch + 1):
      if self._it is None:
        self._it = self.dataset(self.step).as_numpy_iterator()
      try:
        b = next(self._it)
        break
      except StopIteration:
        raise
      except tf.errors.OpError as e:
        if isinstance(e, tf.errors.OutOfRangeError):
          raise StopIteration from e
        bad = self._find_bad_rows()
        if not bad:
          raise
        self.bad_images.update(bad)
        self.close()  # rebuild at the same step with the bad rows replaced
    else:
      raise RuntimeError('data: could not recover from load errors')
    self.step += 1
    failed = b.pop('decode_failed')
    self.stats._add(batches=1, examples=int(b['valid'].sum()), decode_failed=int(failed.sum()))
    return self.format(b)


class PretrainIterator(BatchIterator):
  """Iterator of host-local pre-training batches (see ``make_pretrain_dataset``)."""

  def __init__(self, source, cfg, *, num_patches, **kw):
    super().__init__(source, cfg, shapes=planning.bucket_shapes(cfg), **kw)
    self.num_patches = num_patches
    self._row_fn = make_row_fn(source, cfg, num_patches=num_patches)

  def format(self, b):
    return dict(
      images=b['images'],
      image_size=b['image_size'],
      patch_boxes=b['patch_boxes'],
      patch_seeds=b['patch_seeds'],
      targets=dict(boxes=b['boxes'], labels=b['labels'], mask=b['mask']),
      valid=b['valid'],
      index=b['index'],
    )


def check_batch_args(global_batch_size, start_step, process_index, process_count, **kw) -> dict:
  """Validate the batch / resume / host arguments of the dataset factories; returns
  them with ``kw`` as the iterator's keyword arguments."""
  if global_batch_size <= 0 or process_count <= 0:
    raise ValueError('global_batch_size and process_count must be positive')
  if global_batch_size % process_count:
    raise ValueError(
      f'global_batch_size={global_batch_size} is not divisible by process_count={process_count}'
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count})')
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0')
  return dict(
    global_batch_size=global_batch_size,
    start_step=start_step,
    process_index=process_index,
    process_count=process_count,
    **kw,
  )


def make_pretrain_dataset(
  data_config,
  *,
  global_batch_size: int,
  num_patches: int,
  train: bool = True,
  seed: int = 0,
  start_step: int = 0,
  process_index: int = 0,
  process_count: int = 1,
):
  """Host-local batches for UP-DETR pre-training -> (iterator, planning.DataStats).

  Each batch (b = global_batch_size // process_count, M = num_patches,
  (H, W) one of ``planning.bucket_shapes(data_config)``) is what the host sends;
  ``device_augment.batch_preparer(data_config, train)`` turns it, on the device,
  into the model's images, padding_mask and patches [b, M, P, P, 3]:
    images        uint8 [b, H, W, 3]    resized, zero-padded bottom/right
    image_size    int32 [b, 2]          (h, w) of the resized image (the rest is padding)
    patch_boxes   float32 [b, M, 4]     patch rectangles (x, y, w, h), resized pixels
    patch_seeds   uint32 [b, 2]         (k(seed, epoch), example): the augmentation key
    targets       boxes float32 [b, M, 4] cxcywh / unpadded resized size,
                  labels int32 [b, M] (1), mask bool [b, M] (= valid)
    valid         bool [b]   False on evaluation padding rows and replaced rows
    index         int32 [b]  example id (image = index % num_images)
  Training iterates epochs forever; evaluation (train=False) makes one
  deterministic pass without augmentation and pads the last batch of each bucket.
  """
  cfg = config.resolve_config(data_config)
  kw = check_batch_args(
    global_batch_size, start_step, process_index, process_count, train=train, seed=seed
  )
  if num_patches < 1:
    raise ValueError(f'num_patches={num_patches} must be >= 1')
  source = sources.make_source(cfg)
  stats = planning.DataStats(source.name)
  it = PretrainIterator(source, cfg, num_patches=num_patches, stats=stats, **kw)
  it.locate(start_step)  # plans the first epoch now: configuration errors surface here
  return it, stats
