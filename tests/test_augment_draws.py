"""What the device-side augmentation draws, seen in the pixels it makes (device_augment.py):
each example its own jitter, grayscale and blur; the jitter's random order from the data
config, drawn apart from the jitter's strengths; the automatic blur kernel size; the
one-shot training queries, on and off, per run seed and epoch. Every check goes through
the preparers that training builds from a data config, and the per-example seeds are
made as the host pipeline makes them (``planning.example_key``, then the example index).
"""

import itertools

import jax
import numpy as np
import pytest
from data_helpers import model_batch
from test_device_augment import _host_like_batch

from updetr_jax import device_augment as da
from updetr_jax.data import planning, resolve_config
from updetr_jax.data.oneshot import resolve_oneshot_config

RUN_SEED, EPOCH = 17, 3

# Only the named op runs, on every patch (grayscale: on about half of them).
ONLY = {
  'jitter': dict(color_jitter_prob=1.0, grayscale_prob=0.0, blur_prob=0.0),
  'grayscale': dict(color_jitter_prob=0.0, grayscale_prob=0.5, blur_prob=0.0),
  'blur': dict(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=1.0),
}


def _seeds(examples, seed=RUN_SEED, epoch=EPOCH):
  """uint32 [B, 2] as the host sends them: (k(seed, epoch), example index)."""
  key0 = np.full(len(examples), planning.example_key(seed, epoch))
  return np.stack([key0, np.asarray(examples)], 1).astype(np.uint32)


def _pixels(normalised):
  """ImageNet-normalised float -> [0, 1] pixels (numpy)."""
  return np.asarray(normalised) * np.asarray(da.STD) + np.asarray(da.MEAN)


def _one_image_batch(image, boxes, examples, seed=RUN_SEED, epoch=EPOCH):
  """The same uint8 image [H, W, 3] and patch rectangles [M, 4] for every example."""
  b, (h, w), m = len(examples), image.shape[:2], len(boxes)
  return dict(
    images=np.repeat(image[None], b, 0),
    image_size=np.tile(np.int32([h, w]), (b, 1)),
    patch_boxes=np.repeat(np.float32(boxes)[None], b, 0),
    patch_seeds=_seeds(examples, seed, epoch),
    targets=dict(
      boxes=np.zeros((b, m, 4), np.float32),
      labels=np.ones((b, m), np.int32),
      mask=np.ones((b, m), bool),
    ),
  )


# ----------------------------------------------------------------- one draw per example


@pytest.mark.parametrize('op', sorted(ONLY))
def test_each_example_draws_its_own_augmentation(op):
  """Run seed and epoch fixed, the same image and rectangles everywhere: examples with
  other indices get other patches, the same index the same ones."""
  one = _host_like_batch(b=1)
  examples = [5, 6, 7, 8, 9, 10, 5]
  batch = _one_image_batch(one['images'][0], one['patch_boxes'][0], examples)
  cfg = dict(patch_size=8, blur_kernel_size=3, **ONLY[op])
  x = _pixels(model_batch(batch, cfg, train=True)['patches'])  # [B, M, P, P, 3]
  np.testing.assert_array_equal(x[0], x[-1])  # the same example index
  distinct = x[:-1]
  if op == 'grayscale':
    gray = np.abs(distinct - distinct[..., :1]).max((2, 3, 4)) < 1e-6  # [B, M]
    assert gray.any() and not gray.all(), gray
    assert len({tuple(g) for g in gray}) > 1, gray  # not one pattern for all examples
  else:
    for i, j in itertools.combinations(range(len(distinct)), 2):
      assert np.abs(distinct[i] - distinct[j]).max() > 1e-3, (op, examples[i], examples[j])


# ------------------------------------------------------------ the jitter's random order

A, B = 77, 242  # two gray tones (uint8): brightness and contrast clip them
MILD = 102, 153  # two gray tones that no factor clips


def _two_tone(lo, hi, p=4):
  image = np.full((p, p, 3), lo, np.uint8)
  image[:, p // 2 :] = hi
  return image


def _brightness_then_contrast(x, f, g):
  y = np.clip(f * x, 0, 1)
  return np.clip(g * y + (1 - g) * y.mean(), 0, 1)


def _contrast_then_brightness(x, f, g):
  return np.clip(f * np.clip(g * x + (1 - g) * x.mean(), 0, 1), 0, 1)


def test_random_order_reaches_the_patches_and_is_drawn_apart_from_the_strengths():
  """Brightness and contrast on a gray two-tone patch (saturation and hue at strength 0
  leave gray pixels as they are): once a tone clips, the two orders give other pixels.
  The strengths f, g of each example are read from brightness-only and contrast-only
  runs on tones that never clip (same seeds: the same draws). With
  ``color_jitter_random_order`` every example's patch is one of the two orders with
  those strengths (drawn as without it), both orders occur, and which one comes first
  does not follow from f < g; without it, brightness always comes first."""
  examples, p = list(range(64)), 4
  whole = [[0, 0, p, p]]
  jitter_only = dict(patch_size=p, blur_kernel_size=3, **ONLY['jitter'])

  def run(lo, hi, strengths, random_order):
    batch = _one_image_batch(_two_tone(lo, hi, p), whole, examples)
    cfg = dict(jitter_only, color_jitter=strengths, color_jitter_random_order=random_order)
    return _pixels(model_batch(batch, cfg, train=True)['patches'])[:, 0, ..., 0]  # [B, P, P]

  mild = _two_tone(*MILD, p)[..., 0] / 255.0
  f = run(*MILD, (0.4, 0.0, 0.0, 0.0), False)[:, 0, 0] / mild[0, 0]
  spread = run(*MILD, (0.0, 0.4, 0.0, 0.0), False)
  g = (spread[:, 0, -1] - spread[:, 0, 0]) / (mild[0, -1] - mild[0, 0])
  assert 0.6 - 1e-4 < f.min() and f.max() < 1.4 + 1e-4 and np.ptp(f) > 0.4, f
  assert 0.6 - 1e-4 < g.min() and g.max() < 1.4 + 1e-4 and np.ptp(g) > 0.4, g

  x = _two_tone(A, B, p)[..., 0] / 255.0
  both = dict(lo=A, hi=B, strengths=(0.4, 0.4, 0.0, 0.0))
  fixed, shuffled = run(**both, random_order=False), run(**both, random_order=True)
  bc = np.stack([_brightness_then_contrast(x, fi, gi) for fi, gi in zip(f, g)])
  cb = np.stack([_contrast_then_brightness(x, fi, gi) for fi, gi in zip(f, g)])

  def close(a, b):
    return np.abs(a - b).max((1, 2)) < 1e-4

  np.testing.assert_allclose(fixed, bc, atol=1e-4)
  assert (close(shuffled, bc) | close(shuffled, cb)).all()  # the strengths as before
  assert np.abs(shuffled - fixed).max() > 1e-3  # the config field reaches the pixels
  told = np.abs(bc - cb).max((1, 2)) > 1e-3  # examples whose order shows
  brightness_first = close(shuffled, bc)[told]
  smaller_f = (f < g)[told]
  assert told.sum() >= 16, told.sum()
  for first, smaller in itertools.product([True, False], repeat=2):
    seen = (brightness_first == first) & (smaller_f == smaller)
    assert seen.any(), (first, smaller, brightness_first, smaller_f)


# -------------------------------------------------------------- automatic blur kernel


@pytest.mark.parametrize('patch_size,expected', [(224, 23), (128, 13), (64, 7), (96, 9), (256, 25)])
def test_automatic_blur_kernel_is_the_odd_size_nearest_a_tenth_of_the_patch(patch_size, expected):
  for cfg in (resolve_config, resolve_oneshot_config):
    resolved = cfg(dict(patch_size=patch_size, blur_kernel_size=0))
    assert da.augment_kwargs(resolved)['kernel_size'] == expected


def test_automatic_blur_kernel_rule_over_patch_sizes():
  for p in range(20, 400):
    k = da.augment_kwargs(resolve_config(dict(patch_size=p)))['kernel_size']
    assert k % 2 == 1 and abs(k - p / 10) <= 1, (p, k)  # no odd number is nearer


def test_automatic_blur_spreads_a_point_over_the_kernel():
  """P = 64: a white point blurred by the automatic kernel covers 7 x 7 pixels."""
  p = 64
  image = np.zeros((p, p, 3), np.uint8)
  image[30, 33] = 255
  batch = _one_image_batch(image, [[0, 0, p, p]], [0])
  cfg = dict(patch_size=p, blur_sigma=(2.0, 2.0), **ONLY['blur'])
  lit = _pixels(model_batch(batch, cfg, train=True)['patches'])[0, 0, ..., 0] > 1e-4
  rows, cols = np.nonzero(lit)
  assert (rows.min(), rows.max(), cols.min(), cols.max()) == (27, 33, 30, 36)


# ------------------------------------------------------------------ one-shot queries


@pytest.fixture(scope='module')
def query_prepare():
  """{augment_patches: jitted training query preparer} on the one-shot data config."""
  out = {}
  for on in (True, False):
    cfg = resolve_oneshot_config(dict(patch_size=8, color_jitter_prob=1.0, augment_patches=on))
    out[on] = jax.jit(da.query_preparer(cfg, train=True))
  return out


def _queries(rows):
  """The same uint8 query crop [1, 8, 8, 3] for each (run seed, epoch, example) row."""
  crop = np.random.default_rng(4).integers(0, 256, (1, 1, 8, 8, 3)).astype(np.uint8)
  seeds = np.concatenate([_seeds([i], seed, epoch) for seed, epoch, i in rows])
  return dict(patches=np.repeat(crop, len(rows), 0), patch_seeds=seeds)


def test_training_queries_without_augmentation_are_the_plain_crops(query_prepare):
  batch = _queries([(RUN_SEED, EPOCH, 4), (RUN_SEED + 1, EPOCH + 1, 5)])
  out = np.asarray(query_prepare[False](batch)['patches'])
  plain = (batch['patches'] / 255.0 - np.asarray(da.MEAN)) / np.asarray(da.STD)
  np.testing.assert_allclose(out, plain, atol=1e-5)
  augmented = np.asarray(query_prepare[True](batch)['patches'])
  assert np.abs(augmented - plain).max((1, 2, 3, 4)).min() > 1e-2


def test_a_training_query_changes_with_the_epoch_and_the_run_seed(query_prepare):
  rows = [(RUN_SEED, EPOCH, 4), (RUN_SEED, EPOCH + 1, 4), (RUN_SEED + 1, EPOCH, 4)]
  out = np.asarray(query_prepare[True](_queries(rows + rows[:1]))['patches'])
  np.testing.assert_array_equal(out[0], out[3])  # the same (seed, epoch, example)
  assert np.abs(out[1] - out[0]).max() > 1e-3, 'the epoch changes nothing'
  assert np.abs(out[2] - out[0]).max() > 1e-3, 'the run seed changes nothing'
  assert np.abs(out[2] - out[1]).max() > 1e-3
