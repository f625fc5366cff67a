"""Shape buckets, statistics and epoch planning (numpy, identical on every host).

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
"""

from __future__ import annotations

import math
import threading

import numpy as np

from updetr_jax.data import augment, config, sources


# --- shape buckets ---------------------------------------------------------------------


def bucket_caps(cfg) -> list[tuple[int, int]]:
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
    raise ValueError(
      f'data.buckets={caps}: some cap must reach short side {need_s} '
      f'and some cap long side max_size={cfg["max_size"]}'
    )
  return caps


def bucket_shapes(data_config) -> list[tuple[int, int]]:
  """The fixed (H, W) shapes of all batches: landscape caps, then portrait caps."""
  return shapes_of_caps(bucket_caps(config.resolve_config(data_config)))


def shapes_of_caps(caps) -> list[tuple[int, int]]:
  """[(short, long)] caps -> [(H, W)]: landscape caps, then portrait caps."""
  return [(s, l) for s, l in caps] + [(l, s) for s, l in caps]


def assign_buckets(rh, rw, data_config):
  """Resized sizes int [n] -> (bucket id [n] into bucket_shapes, clamped rh, rw)."""
  return assign_to_caps(rh, rw, bucket_caps(config.resolve_config(data_config)))


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
    self._add(epochs=1, **{n: counts[i] for i, n in enumerate(sources.STATUS_NAMES) if n != 'ok'})

  def as_dict(self) -> dict[str, int]:
    with self._lock:
      return dict(self._counts)

  def report(self) -> str:
    d = self.as_dict()
    skip = ', '.join(f'{k} {d[k]}' for k in self.SKIPS)
    conv = ', '.join(f'{k} {d[k]}' for k in self.CONVERSIONS)
    return (
      f'data[{self.source}]: {d["batches"]} batches, {d["examples"]} examples, '
      f'{d["epochs"]} epoch(s) planned; skipped: {skip}; converted: {conv}; '
      f'decode_failed {d["decode_failed"]}'
    )

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


def plan_epoch(
  index: sources.ImageIndex,
  cfg: dict,
  *,
  seed: int,
  epoch: int,
  train: bool,
  global_batch: int,
  repeats: int = 1,
) -> EpochPlan:
  """Plan one epoch (see module docstring). ``cfg``: resolved data config."""
  n_img = len(index)
  n = n_img * repeats
  image = np.arange(n, dtype=np.int64) % n_img
  order = epoch_order(index.usable[image], seed=seed, epoch=epoch, shuffle=train and cfg['shuffle'])
  if train:
    scale = philox_choice(np.asarray(cfg['scales'], np.int64), seed, epoch, 2, n)
  else:
    scale = np.full(n, cfg['eval_scale'], np.int64)
  h = np.maximum(index.height[image], 1)
  w = np.maximum(index.width[image], 1)
  rh, rw = augment.resize_rule(h, w, scale, cfg['max_size'])
  return batch_plan(order, image, rh, rw, bucket_caps(cfg), global_batch, train)


def batch_plan(order, image, rh, rw, caps, global_batch: int, train: bool, extra=None):
  """The EpochPlan of the examples in ``order`` (showing ``image`` [n], resized to
  rh, rw [n]): their buckets among ``caps`` (``assign_to_caps``), then the batches."""
  bucket, rh, rw = assign_to_caps(rh, rw, caps)
  examples, valid, bucket_of = group_batches(order, bucket, global_batch, train)
  return EpochPlan(
    examples, valid, bucket_of, image, rh.astype(np.int32), rw.astype(np.int32), extra
  )


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
      sel = pos[j * global_batch : (j + 1) * global_batch]
      batches.append((order[sel], k, global_batch))
      done.append(sel[-1])
    rest = len(pos) - full * global_batch
    if rest and not train:
      sel = pos[full * global_batch :]
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
