"""The query patches made on the device (device_augment.py): the crop against the
host's crop, each augmentation op against an independent numpy reference, the jitter
factors' ranges, the luma weights, the random order, and determinism across restarts
and meshes. The probabilities and the sigma range: tests/test_claims_data.py."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import importorskip  # fails instead of skipping under CI=true

from updetr_jax import device_augment as da

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_crop_matches_the_host_crop_of_the_same_rectangle():
  tf = importorskip('tensorflow')
  from updetr_jax.data import patches

  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (60, 80, 3)).astype(np.uint8)
  # Shrinking, enlarging, the whole image, a thin strip.
  boxes = np.array([[3, 5, 40, 30], [10, 2, 9, 50], [0, 0, 79, 59], [20, 20, 8, 8], [5, 7, 70, 3]])
  ref = np.stack(
    [patches.crop_patch(tf.constant(img, tf.float32) / 255.0, tf.constant(b), 16) for b in boxes]
  )
  got = da.crop_patches(jnp.asarray(img)[None], jnp.asarray(boxes, jnp.float32)[None], 16)[0]
  np.testing.assert_allclose(np.asarray(got), ref, atol=2e-6)


def test_crop_never_reads_outside_its_rectangle():
  img = np.zeros((1, 20, 30, 3), np.uint8)
  img[0, 5:12, 8:20] = 200  # the rectangle; everything around it is black (padding)
  out = da.crop_patches(jnp.asarray(img), jnp.asarray([[[8.0, 5.0, 12.0, 7.0]]]), 16)
  np.testing.assert_allclose(np.asarray(out), 200 / 255.0, atol=1e-6)


def _luma(x):
  return x @ np.array([0.299, 0.587, 0.114])


def _np_hue(x, delta):
  """Hue rotation by colorsys, pixel by pixel (an independent reference)."""
  import colorsys

  out = np.empty_like(x)
  for idx in np.ndindex(x.shape[:-1]):
    h, s_, v = colorsys.rgb_to_hsv(*x[idx])
    out[idx] = colorsys.hsv_to_rgb((h + delta) % 1.0, s_, v)
  return out


def _np_blur(x, sigma, size):
  """Separable Gaussian, reflect padding (numpy's 'reflect' = torchvision's)."""
  r = np.arange(size) - (size - 1) / 2
  k = np.exp(-0.5 * (r / sigma) ** 2)
  k /= k.sum()
  pad = size // 2
  y = np.pad(x, ((pad, pad), (0, 0), (0, 0)), mode='reflect')
  y = sum(k[t] * y[t : t + x.shape[0]] for t in range(size))
  y = np.pad(y, ((0, 0), (pad, pad), (0, 0)), mode='reflect')
  return sum(k[t] * y[:, t : t + x.shape[1]] for t in range(size))


def test_each_op_matches_an_independent_reference():
  """torchvision's formulas, written in numpy: brightness f x, contrast and saturation
  blends with the luma mean / luma image (each clipped to [0, 1]), hue in HSV."""
  x = np.random.default_rng(1).uniform(0, 1, (3, 8, 8, 3))
  clip = lambda v: np.clip(v, 0, 1)  # noqa: E731
  refs = [
    (da.adjust_brightness, 1.3, lambda p, f: clip(f * p)),
    (da.adjust_contrast, 0.7, lambda p, f: clip(f * p + (1 - f) * _luma(p).mean())),
    (da.adjust_saturation, 1.4, lambda p, f: clip(f * p + (1 - f) * _luma(p)[..., None])),
    (da.adjust_hue, 0.07, _np_hue),
    (da.adjust_hue, -0.1, _np_hue),
  ]
  for op, f, ref in refs:
    for p in x:
      got = np.asarray(op(jnp.asarray(p, jnp.float32), f))
      np.testing.assert_allclose(got, ref(p, f), atol=2e-6, err_msg=op.__name__)
  for p, sigma in zip(x, [0.1, 0.7, 2.0]):
    got = np.asarray(da.gaussian_blur(jnp.asarray(p, jnp.float32), sigma, 5))
    np.testing.assert_allclose(got, _np_blur(p, sigma, 5), atol=2e-6)
  flat = jnp.full((8, 8, 3), 0.3)
  np.testing.assert_allclose(np.asarray(da.gaussian_blur(flat, 2.0, 5)), 0.3, atol=1e-6)


def test_no_draw_leaves_a_patch_as_it_is():
  x = np.random.default_rng(2).uniform(0, 1, (5, 8, 8, 3)).astype(np.float32)
  off = dict(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, kernel_size=3)
  out = da.augment_patches(jnp.asarray(x), jax.random.key(0), **off)
  np.testing.assert_array_equal(np.asarray(out), x)
  on = dict(jitter_prob=1.0, grayscale_prob=0.0, blur_prob=1.0, kernel_size=3)
  out = np.asarray(da.augment_patches(jnp.asarray(x), jax.random.key(0), **on))
  assert out.min() >= 0 and out.max() <= 1 and not np.allclose(out, x)


def _many(x, calls, **kw):
  """calls x augment_patches of x [M, P, P, 3] -> [calls, M, P, P, 3] (numpy)."""
  fn = jax.jit(lambda key: da.augment_patches(jnp.asarray(x), key, **kw))
  return np.stack([np.asarray(fn(jax.random.fold_in(jax.random.key(3), c))) for c in range(calls)])


ONLY_JITTER = dict(jitter_prob=1.0, grayscale_prob=0.0, blur_prob=0.0, kernel_size=3)


def _assert_uniform(values, lo, hi, what):
  assert values.min() >= lo - 1e-4 and values.max() <= hi + 1e-4, (what, values.min(), values.max())
  quarter = np.minimum(((values - lo) / (hi - lo) * 4).astype(int), 3)
  counts = np.bincount(quarter, minlength=4) / len(values)
  np.testing.assert_allclose(counts, 0.25, atol=0.06, err_msg=what)


def test_jitter_factors_are_uniform_over_their_stated_ranges():
  n = 600
  # Brightness alone on a flat 0.5 patch: out = 0.5 f, f ~ U[0.6, 1.4].
  flat = np.full((n, 4, 4, 3), 0.5, np.float32)
  out = _many(flat, 1, jitter=(0.4, 0.0, 0.0, 0.0), **ONLY_JITTER)[0]
  _assert_uniform(out[:, 0, 0, 0] / 0.5, 0.6, 1.4, 'brightness')
  # Contrast alone on a two-tone gray patch: out - mean = f (x - mean).
  two = np.full((n, 4, 4, 3), 0.3, np.float32)
  two[:, :, 2:] = 0.7
  out = _many(two, 1, jitter=(0.0, 0.4, 0.0, 0.0), **ONLY_JITTER)[0]
  _assert_uniform((out[:, 0, 3, 0] - out[:, 0, 0, 0]) / 0.4, 0.6, 1.4, 'contrast')
  # Saturation alone: out - gray = f (x - gray).
  colour = np.broadcast_to(np.float32([0.6, 0.4, 0.3]), (n, 4, 4, 3)).copy()
  gray = float(colour[0, 0, 0] @ np.asarray(da.GRAY_WEIGHTS))
  out = _many(colour, 1, jitter=(0.0, 0.0, 0.4, 0.0), **ONLY_JITTER)[0]
  _assert_uniform((out[:, 0, 0, 0] - gray) / (0.6 - gray), 0.6, 1.4, 'saturation')
  # Hue alone: the HSV hue moves by delta ~ U[-0.1, 0.1].
  out = _many(colour, 1, jitter=(0.0, 0.0, 0.0, 0.1), **ONLY_JITTER)[0]
  h0 = np.asarray(da.rgb_to_hsv(jnp.asarray(colour[:, 0, 0]))[0])
  h1 = np.asarray(da.rgb_to_hsv(jnp.asarray(out[:, 0, 0]))[0])
  _assert_uniform((h1 - h0 + 0.5) % 1.0 - 0.5, -0.1, 0.1, 'hue')


def test_grayscale_uses_the_luma_weights():
  colour = np.broadcast_to(np.float32([0.9, 0.2, 0.5]), (3, 4, 4, 3))
  out = _many(colour, 1, jitter_prob=0.0, grayscale_prob=1.0, blur_prob=0.0, kernel_size=3)[0]
  np.testing.assert_allclose(out, 0.299 * 0.9 + 0.587 * 0.2 + 0.114 * 0.5, atol=1e-6)


def test_random_order_draws_an_order_per_patch():
  """Brightness then contrast differs from contrast then brightness once a value
  clips; with a random order both occur among the patches of one call."""
  x = np.full((200, 4, 4, 3), 0.3, np.float32)
  x[:, :, 2:] = 0.95
  kw = dict(jitter=(0.4, 0.4, 0.0, 0.0), **ONLY_JITTER)
  fixed = _many(x, 1, **kw)[0]
  shuffled = _many(x, 1, random_order=True, **kw)[0]
  same = np.abs(fixed - shuffled).max((1, 2, 3)) < 1e-6
  assert 0.2 < same.mean() < 0.95, same.mean()


def _host_like_batch(seed=0, b=4, m=3):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (b, 40, 48, 3)).astype(np.uint8)
  size = np.array([[40, 48], [32, 48], [40, 30], [24, 36]], np.int32)[:b]
  outside = (np.arange(40)[None, :, None] >= size[:, 0, None, None]) | (
    np.arange(48)[None, None, :] >= size[:, 1, None, None]
  )
  images[outside] = 0
  boxes = np.stack(
    [[[2 + i, 3 + j, 10 + 2 * j, 8 + i] for j in range(m)] for i in range(b)]
  ).astype(np.float32)
  seeds = np.stack([np.full(b, 1234), np.arange(b) + 100], 1).astype(np.uint32)
  targets = dict(
    boxes=np.zeros((b, m, 4), np.float32),
    labels=np.ones((b, m), np.int32),
    mask=np.ones((b, m), bool),
  )
  return dict(images=images, image_size=size, patch_boxes=boxes, patch_seeds=seeds, targets=targets)


AUGMENT = dict(
  jitter=(0.4, 0.4, 0.4, 0.1),
  jitter_prob=0.8,
  grayscale_prob=0.2,
  blur_prob=0.5,
  blur_sigma=(0.1, 2.0),
  kernel_size=3,
)


def test_prepare_batch_is_a_function_of_the_seeds_only():
  batch = _host_like_batch()
  fn = jax.jit(lambda b: da.prepare_batch(b, patch_size=8, augment=AUGMENT))
  a, again = fn(batch), fn(batch)  # a restarted run gets the same host batch back
  np.testing.assert_array_equal(np.asarray(a['patches']), np.asarray(again['patches']))
  # An example's patches depend on its own seed, not on its place in the batch.
  perm = np.array([2, 0, 3, 1])
  moved = fn(jax.tree_util.tree_map(lambda x: x[perm], batch))
  np.testing.assert_array_equal(np.asarray(moved['patches']), np.asarray(a['patches'])[perm])
  other = dict(batch, patch_seeds=batch['patch_seeds'] + np.uint32(1))
  assert not np.allclose(np.asarray(fn(other)['patches']), np.asarray(a['patches']))
  # Padding: the valid size gives the mask; padded pixels are 0 after normalising.
  mask = np.asarray(a['padding_mask'])
  assert mask[1, 32:].all() and not mask[1, :32].any() and mask[2, :, 30:].all()
  assert (np.asarray(a['images'])[mask] == 0).all()
  # Evaluation: no augmentation, only crop and normalise.
  plain = jax.jit(lambda b: da.prepare_batch(b, patch_size=8, augment=None))(batch)
  crops = da.crop_patches(jnp.asarray(batch['images']), jnp.asarray(batch['patch_boxes']), 8)
  np.testing.assert_allclose(
    np.asarray(plain['patches']), np.asarray(da.normalize(crops)), atol=1e-5
  )  # the batched crop sums in another order


def test_the_step_cost_counts_every_chunk_of_the_patch_loop():
  """XLA's cost analysis counts the body of the per-example loop once; a preparer's
  uncounted_flops adds the other iterations, so chunks of 1, 2 and 4 examples count
  what one pass over the batch of 4 does."""
  from updetr_jax import mfu  # noqa: PLC0415
  from updetr_jax.data import resolve_config  # noqa: PLC0415

  batch = _host_like_batch()
  totals = {}
  for chunk in (1, 2, 4):
    cfg = resolve_config(dict(patch_size=8, blur_kernel_size=3, patch_chunk=chunk))
    prep = da.batch_preparer(cfg, train=True)
    counted = mfu.step_flops(jax.jit(prep).lower(batch))
    totals[chunk] = counted + prep.uncounted_flops(batch)
    if chunk < 4:
      assert prep.uncounted_flops(batch) > 0.5 * counted  # 3 (1) of 4 (2) bodies missed
  assert totals[1] == pytest.approx(totals[4], rel=1e-3)
  assert totals[2] == pytest.approx(totals[4], rel=1e-3)


def test_one_and_eight_devices_give_the_same_patches(tmp_path):
  """The batch sharded over 8 (fake CPU) devices gives bit for bit the patches of one
  device: every example's key is its own seed's, and each device maps its own
  examples one chunk at a time (a vmap over the batch would differ in the last bits:
  XLA orders a batched matmul's sums by the per-device batch). The one-shot query
  preparer too; a chunk that does not divide the per-device batch is refused."""
  script = textwrap.dedent(
    f"""
    import sys
    sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from updetr_jax import device_augment as da
    from updetr_jax.data import resolve_config
    from test_device_augment import AUGMENT, _host_like_batch
    assert jax.device_count() == 8
    parts = [_host_like_batch(seed=s) for s in range(2)]
    batch = jax.tree_util.tree_map(lambda *x: np.concatenate(x), *parts)
    batch['patch_seeds'][:, 1] = np.arange(8)
    def fn(b, sharding, chunk=1):
      draws = jax.vmap(lambda k: jax.random.uniform(k, (3, 12)))(da.patch_keys(b['patch_seeds']))
      out = da.prepare_batch(b, patch_size=8, augment=AUGMENT, sharding=sharding, chunk=chunk)
      return draws, out['patches']
    one = jax.jit(lambda b: fn(b, None))(jax.device_put(batch, jax.devices()[0]))
    mesh1 = Mesh(np.array(jax.devices()[:1]), ('data',))
    one_mesh = jax.jit(lambda b: fn(b, NamedSharding(mesh1, P('data')), chunk=4))(
        jax.device_put(batch, NamedSharding(mesh1, P('data'))))
    mesh = Mesh(np.array(jax.devices()), ('data',))
    sharding = NamedSharding(mesh, P('data'))
    eight = jax.jit(lambda b: fn(b, sharding))(jax.device_put(batch, sharding))
    assert len(eight[1].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(one[0]), np.asarray(eight[0]))
    np.testing.assert_array_equal(np.asarray(one[1]), np.asarray(eight[1]))
    # A chunk of 4 on one device differs from a chunk of 1 at most by rounding.
    np.testing.assert_allclose(np.asarray(one_mesh[1]), np.asarray(one[1]), atol=1e-5)
    # One-shot queries (uint8 crops from the host), augmented: the same on 1 and 8.
    cfg = dict(resolve_config(dict(patch_size=8, blur_kernel_size=3)))
    q = dict(patches=np.asarray(one[1]).clip(0, 1).__mul__(255).astype(np.uint8)[:, :1],
             patch_seeds=batch['patch_seeds'])
    q1 = jax.jit(da.query_preparer(cfg, True))(jax.device_put(q, jax.devices()[0]))
    q8 = jax.jit(da.query_preparer(cfg, True, sharding))(jax.device_put(q, sharding))
    np.testing.assert_array_equal(np.asarray(q1['patches']), np.asarray(q8['patches']))
    try:
      jax.jit(lambda b: fn(b, sharding, chunk=2))(jax.device_put(batch, sharding))
    except ValueError as e:
      assert 'data.patch_chunk=2 must divide the per-device batch (1 examples)' in str(e), e
    else:
      raise AssertionError('chunk 2 of a per-device batch of 1 was accepted')
    print('same')
    """
  )
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  out = subprocess.run(
    [sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0 and 'same' in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize('configured,expected', [(0, 13), (5, 5)])
def test_blur_kernel_size_rule(configured, expected):
  assert da.blur_kernel_size(128, configured) == expected
  with pytest.raises(ValueError, match='blur_kernel_size=4 must be odd'):
    da.blur_kernel_size(128, 4)
