"""Shape buckets, epoch planning, per-host sharding and batching of the patch pipeline.

Shape buckets. ``data.buckets`` lists (short, long) caps; ``bucket_shapes(cfg)``
returns the fixed (H, W) set: every cap as landscape (H=short, W=long) and then as
portrait (H=long, W=short). The release caps (384, 512), (448, 576), (480, 608)
(multiples of 32) give 6 shapes; the 4:3 ImageNet photo resized to 320..368 /
400..432 / 448..480 lands in the first / second / third cap. An image goes to the
bucket of its orientation (landscape if W >= H) with the smallest area that holds its
resized (h, w). Nothing is resized to fit a bucket, except in the rare case that no
cap holds the image (aspect ratio beyond ~16:1 at max_size 600, where the rule's
rounding may exceed max_size by a few pixels): its sides are then clamped to the
largest cap. Every batch holds one bucket; images are zero-padded bottom/right.

Epoch plan (numpy, identical on every host; depends on (seed, epoch) only):
  1. order: a permutation of the examples (argsort of a Philox stream keyed by
     (seed, epoch)); identity when ``shuffle`` is False or in evaluation.
     Examples are images x ``demo_repeats`` (demo only); example e shows image
     e % num_images. Skipped images (corrupt, truncated, too small) are dropped.
  2. scale: one of ``scales`` per example, uniform (Philox stream (seed, epoch));
     ``eval_scale`` in evaluation. Resized size by ``augment.resize_rule``.
  3. walking the order, each example joins its bucket's queue; a queue that reaches
     the global batch size becomes the next global batch. Training drops what is
     left in the queues at the end of the epoch (at most G-1 examples per bucket);
     evaluation emits the partial batches last, padded with rows whose ``valid``
     is False.
A resumed run (``start_step`` = global batches already consumed) re-plans the
epochs and skips batches without reading any image, so it yields exactly the
batches of an uninterrupted run. Host p (of process_count) loads rows
[p*b, (p+1)*b) of every global batch, b = global_batch_size // process_count, so
concatenating the hosts' batches gives the process_count=1 batch.

Per-example randomness (patch rectangles, augmentation) uses stateless TF ops keyed
by (k(seed, epoch), example): the same whatever the thread count or host layout.

Bad images never stop the pipeline. The index (see sources.py) skips corrupt,
truncated and too-small images and marks conversions; DataStats counts each such
image once per epoch that is planned (a resumed epoch counts whole). An image that
passed the index but fails to load or decode in the pipeline (e.g. changed on disk)
is found when TF raises, marked bad, and the pipeline is rebuilt at the same step
with that row replaced by a gray image whose ``valid`` and ``targets.mask`` are
False; it is counted as ``decode_failed`` once per batch it appears in.
"""
from __future__ import annotations

import atexit
import ctypes
import math
import sys
import threading
import weakref
from typing import Any

import numpy as np
import tensorflow as tf

from updetr_jax.data import augment, patches, sources

# Execution fields shared by the pre-training and detection pipelines.
PIPELINE_DEFAULTS: dict[str, Any] = dict(
    shuffle=True,
    cache_decoded=False,
    num_parallel_calls=-1,
    prefetch=2,
    threads=0,
    index_cache_dir='~/.cache/updetr_jax',
    index_threads=0,
    tune_malloc=True,
)

DEFAULTS: dict[str, Any] = dict(
    source='tfds',
    tfds_name='imagenet2012',
    tfds_split='train',
    tfds_data_dir=None,
    tfds_image_key='image',
    folder='',
    demo_images=sources.DEMO_IMAGES,
    demo_repeats=1,
    # Pre-training evaluation images, never trained on (see eval_data_config):
    eval_tfds_split='validation',  # tfds: ImageNet's validation split
    eval_folder='',  # folder: a second folder ('' = new patches of the training images)
    eval_demo_images=(),  # demo: photos kept out of demo_images
    scales=(320, 336, 352, 368, 400, 416, 432, 448, 464, 480),
    max_size=600,
    eval_scale=480,
    buckets=((384, 512), (448, 576), (480, 608)),
    patch_size=128,
    augment_patches=True,
    color_jitter=(0.4, 0.4, 0.4, 0.1),
    color_jitter_prob=0.8,
    color_jitter_random_order=False,
    grayscale_prob=0.2,
    blur_prob=0.5,
    blur_sigma=(0.1, 2.0),
    blur_kernel_size=0,
    **PIPELINE_DEFAULTS,
)

DEMO_OVERRIDES: dict[str, Any] = dict(
    source='demo',
    demo_images=sources.DEMO_TRAIN_IMAGES,
    eval_demo_images=sources.DEMO_EVAL_IMAGES,
    demo_repeats=16,
    scales=(96, 112, 128),
    max_size=160,
    eval_scale=128,
    buckets=((128, 160),),
    patch_size=32,
    cache_decoded=True,
    index_cache_dir=None,
)


def _as_config(d):
  try:
    import ml_collections  # noqa: PLC0415
    return ml_collections.ConfigDict(d)
  except ImportError:  # pragma: no cover
    return dict(d)


def default_data_config():
  """Release data config (ImageNet via TFDS, see the package docstring)."""
  return _as_config(dict(DEFAULTS))


def demo_data_config():
  """Small config on the scikit-image photos: trains a tiny model on CPU in minutes."""
  return _as_config({**DEFAULTS, **DEMO_OVERRIDES})


def resolve_config(data_config, defaults=None) -> dict:
  """ConfigDict / dict (partial) -> plain dict with every field; rejects unknown ones.

  ``defaults``: the field set and default values (pre-training's DEFAULTS if None).
  """
  defaults = DEFAULTS if defaults is None else defaults
  if data_config is None:
    data_config = {}
  if hasattr(data_config, 'to_dict'):
    data_config = data_config.to_dict()
  unknown = sorted(set(data_config) - set(defaults))
  if unknown:
    raise ValueError(f'unknown data config field(s) {unknown}; known: {sorted(defaults)}')
  cfg = {**defaults, **dict(data_config)}
  cfg['scales'] = tuple(int(s) for s in cfg['scales'])
  cfg['buckets'] = tuple((int(s), int(l)) for s, l in cfg['buckets'])
  if not cfg['scales']:
    raise ValueError('data.scales must not be empty')
  if not cfg['max_size']:
    raise ValueError('data.max_size must be set (it bounds the bucket shapes)')
  return cfg


def eval_data_config(data_config) -> tuple[dict, bool]:
  """The pre-training evaluation's data: (resolved config, held_out).

  held_out is True when the evaluation images are never trained on: TFDS
  ``eval_tfds_split`` (ImageNet validation) when it differs from ``tfds_split``, a
  folder ``eval_folder``, or the demo's ``eval_demo_images``. Otherwise (a folder run
  without ``eval_folder``, a TFDS run with ``eval_tfds_split=''``) the evaluation
  draws new patches from the training images, and held_out is False.
  """
  cfg = resolve_config(data_config)
  kind = cfg['source']
  if kind == 'tfds' and cfg['eval_tfds_split'] and cfg['eval_tfds_split'] != cfg['tfds_split']:
    return dict(cfg, tfds_split=cfg['eval_tfds_split']), True
  if kind == 'folder' and cfg['eval_folder']:
    return dict(cfg, folder=cfg['eval_folder']), True
  if kind == 'demo' and cfg['eval_demo_images']:
    overlap = set(cfg['eval_demo_images']) & set(cfg['demo_images'])
    if overlap:
      raise ValueError(f'data.eval_demo_images and data.demo_images share {sorted(overlap)}')
    return dict(cfg, demo_images=tuple(cfg['eval_demo_images'])), True
  return cfg, False


_MALLOC_TUNED = False


def tune_malloc() -> bool:
  """glibc malloc settings for the pipeline's large short-lived buffers (process-wide).

  By default glibc returns freed memory to the OS and maps big blocks afresh, so
  every batch pays page faults (kernel zeroing): about half the CPU time of this
  pipeline. Sets M_MMAP_THRESHOLD 32 MiB, M_TRIM_THRESHOLD 1 GiB, M_TOP_PAD
  512 MiB. Linux/glibc only; returns whether it applied.
  """
  global _MALLOC_TUNED
  if _MALLOC_TUNED or not sys.platform.startswith('linux'):
    return _MALLOC_TUNED
  try:
    mallopt = ctypes.CDLL('libc.so.6').mallopt
  except (OSError, AttributeError):
    return False
  m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
  _MALLOC_TUNED = bool(mallopt(m_mmap_threshold, 32 << 20)
                       and mallopt(m_trim_threshold, 1 << 30)
                       and mallopt(m_top_pad, 512 << 20))
  return _MALLOC_TUNED


# --- shape buckets ---------------------------------------------------------------------

def _caps(cfg) -> list[tuple[int, int]]:
  """Bucket caps [(short, long)] of a RESOLVED config (validated)."""
  caps = list(cfg['buckets'])
  if not caps:
    r32 = lambda v: 32 * math.ceil(v / 32)  # noqa: E731
    caps = [(r32(max(cfg['scales'] + (cfg['eval_scale'],))), r32(cfg['max_size']))]
  for s, l in caps:
    if not 0 < s <= l:
      raise ValueError(f'data.buckets: cap {(s, l)} needs 0 < short <= long')
  need_s = max(cfg['scales'] + (cfg['eval_scale'],))
  if max(s for s, _ in caps) < need_s or max(l for _, l in caps) < cfg['max_size']:
    raise ValueError(f'data.buckets={caps}: some cap must reach short side {need_s} '
                     f'and some cap long side max_size={cfg["max_size"]}')
  return caps


def bucket_shapes(data_config) -> list[tuple[int, int]]:
  """The fixed (H, W) shapes of all batches: landscape caps, then portrait caps."""
  return shapes_of_caps(_caps(resolve_config(data_config)))


def shapes_of_caps(caps) -> list[tuple[int, int]]:
  """[(short, long)] caps -> [(H, W)]: landscape caps, then portrait caps."""
  return [(s, l) for s, l in caps] + [(l, s) for s, l in caps]


def assign_buckets(rh, rw, data_config):
  """Resized sizes int [n] -> (bucket id [n] into bucket_shapes, clamped rh, rw)."""
  return assign_to_caps(rh, rw, _caps(resolve_config(data_config)))


def assign_to_caps(rh, rw, caps):
  """assign_buckets with explicit [(short, long)] caps (see assign_buckets)."""
  rh, rw = np.asarray(rh, np.int64), np.asarray(rw, np.int64)
  k = len(caps)
  portrait = rh > rw
  short, long_ = np.minimum(rh, rw), np.maximum(rh, rw)
  area = np.array([s * l for s, l in caps], np.int64)
  s_cap = np.array([s for s, _ in caps])[None]
  l_cap = np.array([l for _, l in caps])[None]
  fits = (short[:, None] <= s_cap) & (long_[:, None] <= l_cap)
  cost = np.where(fits, area[None], np.iinfo(np.int64).max)
  best = np.argmin(cost, 1)
  largest = int(np.argmax(area))
  best = np.where(fits.any(1), best, largest)
  short = np.minimum(short, s_cap[0, best])
  long_ = np.minimum(long_, l_cap[0, best])
  bucket = best + k * portrait
  return bucket, np.where(portrait, long_, short), np.where(portrait, short, long_)


# --- statistics ------------------------------------------------------------------------

class DataStats:
  """Counts of skipped / converted images, readable at any time (thread-safe).

  Skips: corrupt, truncated, too_small (each image once per planned epoch).
  Conversions to RGB: grayscale, cmyk, alpha (alpha dropped); same counting.
  decode_failed: rows replaced at load time (this host, once per batch).
  Also: epochs planned, batches and valid examples yielded by this host.
  """
  SKIPS = ('corrupt', 'truncated', 'too_small')
  CONVERSIONS = ('grayscale', 'cmyk', 'alpha')

  EXTRA: tuple[str, ...] = ()  # more counters of subclasses

  def __init__(self, source_name: str = ''):
    self.source = source_name
    self._lock = threading.Lock()
    self._counts = {k: 0 for k in self.SKIPS + self.CONVERSIONS + ('decode_failed',)}
    self._counts.update(epochs=0, batches=0, examples=0)
    self._counts.update({k: 0 for k in self.EXTRA})

  def _add(self, **kw):
    with self._lock:
      for k, v in kw.items():
        self._counts[k] += int(v)

  def add_epoch(self, status):
    counts = np.bincount(np.asarray(status, np.int64), minlength=len(sources.STATUS_NAMES))
    self._add(epochs=1, **{n: counts[i] for i, n in enumerate(sources.STATUS_NAMES)
                           if n != 'ok'})

  def as_dict(self) -> dict[str, int]:
    with self._lock:
      return dict(self._counts)

  def report(self) -> str:
    d = self.as_dict()
    skip = ', '.join(f'{k} {d[k]}' for k in self.SKIPS)
    conv = ', '.join(f'{k} {d[k]}' for k in self.CONVERSIONS)
    return (f'data[{self.source}]: {d["batches"]} batches, {d["examples"]} examples, '
            f'{d["epochs"]} epoch(s) planned; skipped: {skip}; converted: {conv}; '
            f'decode_failed {d["decode_failed"]}')

  def __repr__(self):
    return self.report()


# --- epoch planning --------------------------------------------------------------------

def _philox_u64(seed: int, epoch: int, tag: int, n: int) -> np.ndarray:
  """n uint64 from a Philox stream keyed by (seed, epoch, tag) (platform-stable)."""
  ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), tag])
  return np.random.Philox(ss).random_raw(n).astype(np.uint64)


def example_key(seed: int, epoch: int) -> int:
  """First word of the per-example stateless TF seed [k(seed, epoch), example]."""
  ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), 7])
  return int(ss.generate_state(1, np.uint32)[0])


class EpochPlan:
  """Global batches of one epoch.

  examples int64 [nb, G] (example ids), valid bool [nb, G], bucket int [nb];
  per example (all n): image int64, rh, rw int32 (resized, clamped to the bucket);
  extra: more per-example arrays [n, ...] (e.g. detection geometry).
  """

  def __init__(self, examples, valid, bucket, image, rh, rw, extra=None):
    self.examples, self.valid, self.bucket = examples, valid, bucket
    self.image, self.rh, self.rw = image, rh, rw
    self.extra = extra or {}

  def __len__(self):
    return len(self.bucket)


def philox_uniform(seed: int, epoch: int, tag: int, n: int) -> np.ndarray:
  """float64 [n] in [0, 1): entry e depends only on (seed, epoch, tag, e)."""
  return (_philox_u64(seed, epoch, tag, n) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def philox_choice(values, seed: int, epoch: int, tag: int, n: int) -> np.ndarray:
  """[n] uniform picks from ``values`` (entry e depends on (seed, epoch, tag, e))."""
  values = np.asarray(values)
  i = (philox_uniform(seed, epoch, tag, n) * len(values)).astype(np.int64)
  return values[np.minimum(i, len(values) - 1)]


def epoch_order(usable, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
  """Example order int64 [<= n]: a (seed, epoch) permutation (or identity), with the
  examples whose ``usable`` [n] is False removed."""
  n = len(usable)
  if shuffle:
    order = np.argsort(_philox_u64(seed, epoch, 1, n), kind='stable')
  else:
    order = np.arange(n, dtype=np.int64)
  return order[np.asarray(usable, bool)[order]]


def plan_epoch(index: sources.ImageIndex, cfg: dict, *, seed: int, epoch: int,
               train: bool, global_batch: int, repeats: int = 1) -> EpochPlan:
  """Plan one epoch (see module docstring). ``cfg``: resolved data config."""
  n_img = len(index)
  n = n_img * repeats
  image = np.arange(n, dtype=np.int64) % n_img
  order = epoch_order(index.usable[image], seed=seed, epoch=epoch,
                      shuffle=train and cfg['shuffle'])
  if train:
    scale = philox_choice(np.asarray(cfg['scales'], np.int64), seed, epoch, 2, n)
  else:
    scale = np.full(n, cfg['eval_scale'], np.int64)
  h = np.maximum(index.height[image], 1)
  w = np.maximum(index.width[image], 1)
  rh, rw = augment.resize_rule(h, w, scale, cfg['max_size'])
  bucket, rh, rw = assign_to_caps(rh, rw, _caps(cfg))
  examples, valid, bucket_of = group_batches(order, bucket, global_batch, train)
  return EpochPlan(examples, valid, bucket_of, image, rh.astype(np.int32),
                   rw.astype(np.int32))


def group_batches(order, bucket, global_batch: int, train: bool):
  """Bucket queues -> (examples int64 [nb, G], valid bool [nb, G], bucket [nb]).

  Walking ``order``, each example joins the queue of ``bucket[example]``; a full
  queue is the next batch. Training drops the remainders; evaluation appends them
  (bucket order), padded with copies of their first example (valid False).
  """
  b_ord = bucket[order]
  batches, done = [], []  # (members, bucket), completion position
  for k in np.unique(b_ord):
    pos = np.flatnonzero(b_ord == k)
    full = len(pos) // global_batch
    for j in range(full):
      sel = pos[j * global_batch:(j + 1) * global_batch]
      batches.append((order[sel], k, global_batch))
      done.append(sel[-1])
    rest = len(pos) - full * global_batch
    if rest and not train:
      sel = pos[full * global_batch:]
      members = np.concatenate([order[sel], np.full(global_batch - rest, order[sel[0]])])
      batches.append((members, k, rest))
      done.append(len(order) + k)  # partial batches last, in bucket order
  ranked = [batches[i] for i in np.argsort(np.asarray(done, np.int64), kind='stable')]
  nb = len(ranked)
  examples = np.zeros((nb, global_batch), np.int64)
  valid = np.zeros((nb, global_batch), bool)
  bucket_of = np.zeros(nb, np.int64)
  for i, (members, k, count) in enumerate(ranked):
    examples[i] = members
    valid[i, :count] = True
    bucket_of[i] = k
  return examples, valid, bucket_of


# --- the tf.data pipeline --------------------------------------------------------------

def _row_signature(b):
  i64, i32 = tf.int64, tf.int32
  spec = lambda dt: tf.TensorSpec([b], dt)  # noqa: E731
  return dict(example=spec(i64), image=spec(i64), key0=spec(i64), height=spec(i32),
              width=spec(i32), rh=spec(i32), rw=spec(i32), bh=spec(i32), bw=spec(i32),
              decoder=spec(i32), valid=spec(tf.bool), fallback=spec(tf.bool),
              path=spec(tf.string))


def augment_kwargs(cfg) -> dict:
  """Keyword arguments of ``augment.augment_patches`` from a resolved config."""
  return dict(jitter=tuple(cfg['color_jitter']), jitter_prob=cfg['color_jitter_prob'],
              grayscale_prob=cfg['grayscale_prob'], blur_prob=cfg['blur_prob'],
              blur_sigma=tuple(cfg['blur_sigma']),
              kernel_size=augment.blur_kernel_size(cfg['patch_size'],
                                                   cfg['blur_kernel_size']),
              random_order=bool(cfg['color_jitter_random_order']))


def load_row_image(source: sources.Source, r):
  """The row's image, uint8 [h, w, 3]: decoded, or gray if the row is a fallback."""
  def load():
    return source.tf_load(r['image'], r['path'], r['decoder'])

  def blank():
    return tf.fill(tf.stack([r['height'], r['width'], 3]), tf.constant(124, tf.uint8))

  return tf.cond(r['fallback'], blank, load)


def resize_and_pad(image, r):
  """image [h, w, 3] (0..255) -> (normalised float32 [bh, bw, 3] resized to (rh, rw)
  and zero-padded bottom/right, padding_mask bool [bh, bw] True on padding)."""
  det = augment.resize_image(image, tf.stack([r['rh'], r['rw']]))
  det = augment.normalize(det, 255.0)
  det = tf.pad(det, [[0, r['bh'] - r['rh']], [0, r['bw'] - r['rw']], [0, 0]])
  inside = ((tf.range(r['bh'])[:, None] < r['rh'])
            & (tf.range(r['bw'])[None, :] < r['rw']))
  return det, ~inside


def make_row_fn(source: sources.Source, cfg: dict, *, num_patches: int, train: bool):
  """Row record (see _row_signature, scalars) -> one example (unbatched tensors)."""
  aug = augment_kwargs(cfg) if train and cfg['augment_patches'] else None
  p = cfg['patch_size']

  @tf.autograph.experimental.do_not_convert
  def row_fn(r):
    image = load_row_image(source, r)  # uint8 [h, w, 3]
    seed = tf.stack([r['key0'], r['example']])
    q, boxes, _ = patches.query_patches(image, seed, num_patches=num_patches,
                                        patch_size=p, augment_cfg=aug)
    det, padding_mask = resize_and_pad(image, r)
    valid = r['valid'] & ~r['fallback']
    return dict(images=det, padding_mask=padding_mask, patches=q, boxes=boxes,
                labels=tf.ones([num_patches], tf.int32),
                mask=tf.fill([num_patches], valid), valid=valid,
                index=tf.cast(r['example'], tf.int32), decode_failed=r['fallback'])
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

  def __init__(self, source, cfg, *, global_batch_size, train, seed, start_step,
               process_index, process_count, stats, shapes):
    self.source, self.cfg = source, cfg
    self.global_batch = global_batch_size
    self.local_batch = global_batch_size // process_count
    self.train, self.seed = train, seed
    self.process_index = process_index
    self.step = start_step
    self.stats = stats
    self.repeats = cfg['demo_repeats'] if cfg['source'] == 'demo' else 1
    self.bad_images: set[int] = set()  # found at load time
    self._plans: dict[int, EpochPlan] = {}
    self._counted_epochs: set[int] = set()
    self._epoch_batches: dict[int, int] = {}  # batches per planned epoch
    self._lock = threading.RLock()
    self._stop = threading.Event()  # set by close(): the row generator returns
    self._shapes = np.asarray(shapes, np.int32)
    self._row_fn = None
    self._it = None
    _LIVE_ITERATORS.add(self)

  def make_plan(self, epoch: int) -> EpochPlan:
    """Plan one epoch (uncached)."""
    return plan_epoch(self.source.index, self.cfg, seed=self.seed, epoch=epoch,
                      train=self.train, global_batch=self.global_batch,
                      repeats=self.repeats)

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
  def plan(self, epoch: int) -> EpochPlan:
    """The epoch's plan (the last two are cached)."""
    with self._lock:
      return self._plan_locked(epoch)

  def _plan_locked(self, epoch: int) -> EpochPlan:
    if epoch not in self._plans:
      plan = self.make_plan(epoch)
      if self.train and len(plan) == 0:
        raise ValueError(
            f'data: epoch {epoch} of {self.source.name} gives no full global batch of '
            f'{self.global_batch} ({int(self.source.index.usable.sum())} usable images x '
            f'{self.repeats} repeats over {len(self._shapes)} buckets); lower the batch '
            'size, use fewer data.buckets or raise data.demo_repeats')
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
        example=ex, image=img,
        key0=np.full(b, example_key(self.seed, epoch), np.int64),
        height=idx.height[img], width=idx.width[img],
        rh=plan.rh[ex], rw=plan.rw[ex],
        bh=np.full(b, bh, np.int32), bw=np.full(b, bw, np.int32),
        decoder=idx.decoder[img].astype(np.int32), valid=plan.valid[j, sl],
        fallback=np.array([int(i) in self.bad_images for i in img], bool),
        path=np.array([paths[i] for i in img] if paths else [''] * b, dtype=object))

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
        lambda: self._row_batches(start_step),
        output_signature=self.row_signature())
    ds = ds.unbatch()
    par = cfg['num_parallel_calls']
    ds = ds.map(self._row_fn, num_parallel_calls=tf.data.AUTOTUNE if par < 0 else par,
                deterministic=True)
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

  def _find_bad_rows(self) -> list[int]:
    loc = self.locate(self.step)
    if loc is None:
      return []
    rows = self.host_rows(*loc)
    bad = []
    for i, fb in zip(rows['image'], rows['fallback']):
      if fb or int(i) in bad:
        continue
      try:
        self.source.python_load(int(i))
      except Exception:  # noqa: BLE001
        bad.append(int(i))
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
    self.stats._add(batches=1, examples=int(b['valid'].sum()),
                    decode_failed=int(failed.sum()))
    return self.format(b)


class PretrainIterator(BatchIterator):
  """Iterator of host-local pre-training batches (see ``make_pretrain_dataset``)."""

  def __init__(self, source, cfg, *, num_patches, **kw):
    super().__init__(source, cfg, shapes=bucket_shapes(cfg), **kw)
    self.num_patches = num_patches
    self._row_fn = make_row_fn(source, cfg, num_patches=num_patches, train=self.train)

  def format(self, b):
    return dict(images=b['images'], padding_mask=b['padding_mask'], patches=b['patches'],
                targets=dict(boxes=b['boxes'], labels=b['labels'], mask=b['mask']),
                valid=b['valid'], index=b['index'])


def check_batch_args(global_batch_size, start_step, process_index, process_count):
  """Validate the batch / resume / host arguments of the dataset factories."""
  if global_batch_size <= 0 or process_count <= 0:
    raise ValueError('global_batch_size and process_count must be positive')
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} is not divisible by '
                     f'process_count={process_count}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, {process_count})')
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0')


def make_pretrain_dataset(data_config, *, global_batch_size: int, num_patches: int,
                          train: bool = True, seed: int = 0, start_step: int = 0,
                          process_index: int = 0, process_count: int = 1):
  """Host-local batches for UP-DETR pre-training -> (iterator, DataStats).

  Each batch (b = global_batch_size // process_count, M = num_patches,
  P = patch_size, (H, W) one of ``bucket_shapes(data_config)``):
    images        float32 [b, H, W, 3]  ImageNet-normalised, zero-padded bottom/right
    padding_mask  bool [b, H, W]         True on padding
    patches       float32 [b, M, P, P, 3] normalised query patches
    targets       boxes float32 [b, M, 4] cxcywh / unpadded resized size,
                  labels int32 [b, M] (1), mask bool [b, M] (= valid)
    valid         bool [b]   False on evaluation padding rows and replaced rows
    index         int32 [b]  example id (image = index % num_images)
  Training iterates epochs forever; evaluation (train=False) makes one
  deterministic pass without augmentation and pads the last batch of each bucket.
  """
  cfg = resolve_config(data_config)
  check_batch_args(global_batch_size, start_step, process_index, process_count)
  if num_patches < 1:
    raise ValueError(f'num_patches={num_patches} must be >= 1')
  if cfg['tune_malloc']:
    tune_malloc()
  source = sources.make_source(cfg)
  stats = DataStats(source.name)
  it = PretrainIterator(source, cfg, global_batch_size=global_batch_size,
                        num_patches=num_patches, train=train, seed=seed,
                        start_step=start_step, process_index=process_index,
                        process_count=process_count, stats=stats)
  it.locate(start_step)  # plans the first epoch now: configuration errors surface here
  return it, stats
