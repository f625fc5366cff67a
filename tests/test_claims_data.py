"""Tests that decide what the pre-training data claims.

Each test checks one documented behaviour from its outside, on tiny hand-made inputs:
the epoch shuffle (new per epoch, repeated per seed), new patches and augmentation
for the same example in a new epoch, and the augmentation's random choices (blur
sigma over the whole configured range; jitter, grayscale and blur at their
probabilities and independent of each other and across patches).
"""

import os

import numpy as np
import pytest

from conftest import importorskip  # fails instead of skipping under CI=true

tf = importorskip('tensorflow')

import jax  # noqa: E402

from updetr_jax import data, device_augment  # noqa: E402
from updetr_jax.data import augment  # noqa: E402
from data_helpers import model_batch, take  # noqa: E402
from test_data import _save, cfg_for  # noqa: E402

N_IMAGES = 16  # 48 x 64 (one landscape bucket of cfg_for): 4 batches of 4 per epoch
BATCH = 4
NUM_PATCHES = 4
EPOCH_BATCHES = N_IMAGES // BATCH
MEAN, STD = np.asarray(augment.MEAN), np.asarray(augment.STD)


def _colour(i):
  """The flat colour of image i, uint8 [3]: distinct, every channel in 80..170."""
  return np.array([80 + 5 * i, 170 - 4 * i, 110 + 3 * (i % 5)], np.uint8)


@pytest.fixture(scope='module')
def flat_folder(tmp_path_factory):
  """N_IMAGES flat-colour 48 x 64 PNGs: every crop of an image is its colour, whatever
  the box, so a patch's colour shows the augmentation alone; the detection image's
  colour names the image."""
  root = str(tmp_path_factory.mktemp('flat'))
  for i in range(N_IMAGES):
    _save(os.path.join(root, f'img{i:02d}.png'), np.tile(_colour(i), (48, 64, 1)))
  return root


def _unnormalise(x):
  return np.asarray(x, np.float64) * STD + MEAN


def _epoch_rows(batches, cfg):
  """Batches of whole epochs -> per epoch, the yielded example order and per example
  (image colour uint8 [3], boxes [M, 4], patch colours [M, 3] in [0, 1])."""
  epochs = []
  for e in range(len(batches) // EPOCH_BATCHES):
    order, rows = [], {}
    for host in batches[e * EPOCH_BATCHES : (e + 1) * EPOCH_BATCHES]:
      b = model_batch(host, cfg, train=True)
      assert b['valid'].all()
      for i, ex in enumerate(b['index'].tolist()):
        order.append(ex)
        colour = np.round(_unnormalise(b['images'][i, 0, 0]) * 255).astype(np.uint8)
        patch_colours = _unnormalise(b['patches'][i]).mean((1, 2))
        rows[ex] = (colour, b['targets']['boxes'][i], patch_colours)
    epochs.append((order, rows))
  return epochs


# ---------------------------------------------------------------- 1. epoch shuffle


def test_shuffle_order_changes_every_epoch_and_repeats_per_seed(flat_folder):
  cfg = cfg_for(flat_folder, shuffle=True, augment_patches=False)
  kw = dict(global_batch_size=BATCH, num_patches=1)

  def orders(seed, epochs):
    it, _ = data.make_pretrain_dataset(cfg, seed=seed, **kw)
    out = [order for order, _ in _epoch_rows(take(it, epochs * EPOCH_BATCHES), cfg)]
    it.close()
    return out

  first = orders(5, 3)
  for order in first:  # every epoch shows every image once
    assert sorted(order) == list(range(N_IMAGES))
  assert first[0] != list(range(N_IMAGES))  # shuffled at all
  assert len({tuple(o) for o in first}) == 3, first  # each epoch its own order
  assert orders(5, 3) == first  # a fresh iterator, same seed: the same orders
  assert orders(6, 1)[0] != first[0]  # another seed: another order


# ---------------------------------------------------------------- 2. new patches per epoch


def test_same_example_gets_new_patches_and_new_augmentation_each_epoch(flat_folder):
  kw = dict(global_batch_size=BATCH, num_patches=NUM_PATCHES, seed=3)
  # Control: without augmentation every patch is exactly its image's flat colour, so
  # a patch colour that changes between epochs can only come from the augmentation.
  plain = cfg_for(flat_folder, augment_patches=False)
  it, _ = data.make_pretrain_dataset(plain, **kw)
  for _, rows in _epoch_rows(take(it, EPOCH_BATCHES), plain):
    for colour, _, patch_colours in rows.values():
      np.testing.assert_allclose(patch_colours, np.broadcast_to(colour / 255.0, (4, 3)), atol=1e-4)
  it.close()

  cfg = cfg_for(flat_folder, shuffle=False, augment_patches=True)
  it, _ = data.make_pretrain_dataset(cfg, **kw)
  (order0, rows0), (order1, rows1) = _epoch_rows(take(it, 2 * EPOCH_BATCHES), cfg)
  it.close()
  assert sorted(order0) == sorted(order1) == list(range(N_IMAGES))
  box_changed, colour_changed = [], []
  for ex in order0:
    (colour0, boxes0, patches0), (colour1, boxes1, patches1) = rows0[ex], rows1[ex]
    np.testing.assert_array_equal(colour0, colour1)  # the same example: the same image
    assert not np.array_equal(boxes0, boxes1), f'example {ex}: the same boxes again'
    box_changed += np.any(boxes0 != boxes1, -1).tolist()
    colour_changed += (np.abs(patches0 - patches1).max(-1) > 2e-3).tolist()
  # Boxes: each side is redrawn from tens of values, so nearly every patch moves.
  assert np.mean(box_changed) >= 0.9, np.mean(box_changed)
  # Augmentation: a patch keeps its colour in both epochs only if neither epoch
  # jittered it nor made it gray: (0.2 x 0.8)^2 ~ 2.6%.
  assert np.mean(colour_changed) >= 0.8, np.mean(colour_changed)


# ---------------------------------------------------------------- 3. augmentation draws


def _assert_rate(count, n, p, what, z=4.5):
  """count of n Bernoulli(p) events is within z binomial standard deviations."""
  sd = (n * p * (1 - p)) ** 0.5
  assert abs(count - n * p) <= z * sd, f'{what}: {count} of {n}, expected {n * p:.0f} +- {sd:.1f}'


def _augment_many(patch, calls, m, **kw):
  """``calls`` x the device's augment_patches (device_augment.py, jitted) of m copies
  of ``patch`` [P, P, 3] -> [calls, m, P, P, 3]."""
  fn = jax.jit(lambda x, key: device_augment.augment_patches(x, key, **kw))
  x = np.broadcast_to(patch, (m, *patch.shape)).astype(np.float32)
  base = jax.random.key(11)
  return np.stack([np.asarray(fn(x, jax.random.fold_in(base, c))) for c in range(calls)])


def test_blurred_patches_draw_sigma_over_the_whole_range():
  """Blur an impulse: the output is the kernel, and k(1) / k(0) = exp(-1 / (2 sigma^2))
  gives sigma exactly (whatever the truncation and normalisation of the kernel)."""
  p, c, lo, hi = 16, 8, 0.1, 2.0
  impulse = np.zeros((p, p, 3), np.float32)
  impulse[c, c] = 1.0
  out = _augment_many(
    impulse,
    40,
    50,
    jitter_prob=0.0,
    grayscale_prob=0.0,
    blur_prob=0.5,
    blur_sigma=(lo, hi),
    kernel_size=5,
  ).reshape(-1, p, p, 3)
  n = len(out)
  blurred = np.any(out != impulse, (1, 2, 3))
  np.testing.assert_array_equal(out[~blurred], np.broadcast_to(impulse, out[~blurred].shape))
  _assert_rate(int(blurred.sum()), n, 0.5, 'blurred')
  k = out[blurred, c, :, 0].astype(np.float64)  # the centre row: k(0) k(d) / S^2
  sigma = np.sqrt(-0.5 / np.log(k[:, c + 1] / k[:, c]))
  assert sigma.min() >= lo - 1e-3 and sigma.max() <= hi + 1e-3, (sigma.min(), sigma.max())
  assert sigma.min() < 0.2 and sigma.max() > 1.9, (sigma.min(), sigma.max())
  # Uniform over [lo, hi]: each quarter of the range holds about a quarter.
  quarter = np.minimum(((sigma - lo) / (hi - lo) * 4).astype(int), 3)
  for q in range(4):
    _assert_rate(int((quarter == q).sum()), len(sigma), 0.25, f'sigma quarter {q}')


def _probe_patch(p=32):
  """Left half a flat colour (shows jitter and grayscale), right half a gray
  checkerboard of period 2 (shows blur: a sigma >= 1 wipes it out)."""
  x = np.empty((p, p, 3), np.float32)
  x[:, : p // 2] = (0.55, 0.40, 0.30)
  checker = (np.add.outer(np.arange(p), np.arange(p // 2)) % 2).astype(np.float32)
  x[:, p // 2 :] = (0.35 + 0.2 * checker)[..., None]
  return x


def test_jitter_grayscale_and_blur_occur_at_their_probability_independently():
  probs = dict(jitter=0.8, gray=0.2, blur=0.5)
  p, m, calls = 32, 50, 80
  x = _probe_patch(p)
  out = _augment_many(
    x,
    calls,
    m,
    jitter_prob=probs['jitter'],
    grayscale_prob=probs['gray'],
    blur_prob=probs['blur'],
    blur_sigma=(1.0, 2.0),  # every blur detectable (the range: the test above)
    kernel_size=5,
  ).astype(np.float64)  # [calls, m, P, P, 3]
  luma_w = np.asarray(device_augment.GRAY_WEIGHTS)
  # Grayscale: R = G = B everywhere (jitter alone keeps the flat half coloured).
  gray = np.abs(np.diff(out, axis=-1)).max((2, 3, 4)) < 1e-5
  # Jitter: the flat half (away from the checkerboard by more than the kernel radius;
  # blur leaves it as it is) changes colour; grayscale keeps its luma.
  flat_in, flat_out = x[:, :11].mean((0, 1)), out[:, :, :, :11].mean((2, 3))
  luma_changed = np.abs(flat_out @ luma_w - flat_in @ luma_w) > 1e-4
  rgb_changed = np.abs(flat_out - flat_in).max(-1) > 1e-4
  jitter = luma_changed | (~gray & rgb_changed)
  # Blur: the checkerboard's pixel-to-pixel steps (jitter scales them by >= 0.36, a
  # blur of sigma >= 1 by <= 0.013).
  inner = out[:, :, 3:-3, p // 2 + 3 : -3] @ luma_w
  step = np.abs(np.diff(inner, axis=-1)).mean((2, 3))
  blur = step < 0.02
  assert ((step > 0.05) | blur).all()  # the two cases are well apart
  events = dict(jitter=jitter, gray=gray, blur=blur)
  n = calls * m
  for name, e in events.items():
    _assert_rate(int(e.sum()), n, probs[name], name)
  # Jointly: every combination at the product of the probabilities.
  for j in (False, True):
    for g in (False, True):
      for b in (False, True):
        cell = (jitter == j) & (gray == g) & (blur == b)
        want = (
          (probs['jitter'] if j else 1 - probs['jitter'])
          * (probs['gray'] if g else 1 - probs['gray'])
          * (probs['blur'] if b else 1 - probs['blur'])
        )
        _assert_rate(int(cell.sum()), n, want, f'jitter={j} gray={g} blur={b}')
  # Each patch draws its own: neighbouring patches of one call are independent.
  for name, e in events.items():
    both = e[:, 0::2] & e[:, 1::2]
    _assert_rate(int(both.sum()), n // 2, probs[name] ** 2, f'{name} in two patches')
