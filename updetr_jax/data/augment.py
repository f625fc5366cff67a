"""Resize rule, ImageNet normalisation and the query-patch colour augmentation.

Everything that runs per example is a TensorFlow op driven by a stateless seed
(``tf.random.stateless_*``), so the output depends only on (seed, epoch, example).
Images are float32 in [0, 1] unless said otherwise.

Query-patch augmentation (training), in this order, each patch independently:
  1. ColorJitter(brightness 0.4, contrast 0.4, saturation 0.4, hue 0.1) with p=0.8.
     Factors as torchvision: brightness/contrast/saturation ~ U[1-0.4, 1+0.4], hue
     shift ~ U[-0.1, 0.1] (fraction of the HSV hue circle); contrast and saturation
     blend with the luma mean / luma image; results clipped to [0, 1] after each op.
     Order: fixed brightness, contrast, saturation, hue by default (a documented
     deviation: torchvision draws a random order per patch; each op alone is the
     same). ``color_jitter_random_order`` draws a random order per image (shared by
     its M patches, so the ops stay vectorised) at ~5 ms more CPU per image.
  2. Grayscale with p=0.2 (0.299 R + 0.587 G + 0.114 B, copied to 3 channels).
  3. Gaussian blur with p=0.5, sigma ~ U[0.1, 2.0], separable kernel of odd size
     ``blur_kernel_size`` (0 = automatic: the odd number nearest 10% of P, 13 for
     P=128, like SimCLR's 23 for 224), reflect padding.
  Grayscale and blur are computed only for the patches that draw them.
  4. ImageNet normalisation (done by the caller).
No flip. Evaluation: resize + normalise only.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from updetr_jax.device_augment import blur_kernel_size  # noqa: F401  (one rule for both)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def resize_rule(height, width, scale, max_size):
  """DETR's resize: shorter side -> scale, longer side capped at max_size.

  If long / short * scale > max_size then scale = round(max_size * short / long);
  the short side becomes scale and the long side int(scale * long / short).
  Works on Python ints or numpy arrays (vectorised); returns (new_h, new_w) ints.
  """
  h = np.asarray(height, np.float64)
  w = np.asarray(width, np.float64)
  s = np.asarray(scale, np.float64)
  short, long_ = np.minimum(h, w), np.maximum(h, w)
  if max_size:
    over = long_ / short * s > max_size
    s = np.where(over, np.round(max_size * short / long_), s)
  new_long = np.floor(s * long_ / short)
  portrait = w < h  # DETR: w < h -> w is the short side
  new_h = np.where(portrait, new_long, s).astype(np.int64)
  new_w = np.where(portrait, s, new_long).astype(np.int64)
  if np.ndim(new_h) == 0:
    return int(new_h), int(new_w)
  return new_h, new_w


def normalize(x, max_value: float = 1.0):
  """[..., 3] float in [0, max_value] -> ImageNet-normalised float32."""
  scale = tf.constant(1.0 / (max_value * np.asarray(STD)), tf.float32)
  return tf.nn.bias_add(x * scale, tf.constant(-np.divide(MEAN, STD), tf.float32))


ANTIALIAS_BELOW = 0.8  # antialias when an axis shrinks below 80% of its size


def resize_image(image, size):
  """Bilinear resize of image [h, w, c] (or [n, h, w, c]) to float32 ``size`` (h, w).

  Antialiased (triangle filter over the source footprint, like PIL's bilinear) when
  an axis shrinks below ANTIALIAS_BELOW of its size; plain half-pixel bilinear
  otherwise (identical when enlarging, close for mild shrinking, 2-3x cheaper).
  """
  size = tf.convert_to_tensor(size, tf.int32)
  src = tf.shape(image)[-3:-1]
  shrinks = tf.reduce_any(tf.cast(size, tf.float32) < ANTIALIAS_BELOW * tf.cast(src, tf.float32))
  return tf.cond(
    shrinks,
    lambda: tf.image.resize(image, size, 'bilinear', antialias=True),
    lambda: tf.image.resize(image, size, 'bilinear'),
  )


def grayscale(x):
  """[..., 3] -> [..., 1] luma (0.299 R + 0.587 G + 0.114 B)."""
  return tf.tensordot(x, tf.constant(GRAY_WEIGHTS, x.dtype)[:, None], 1)


def adjust_brightness(x, f):
  """x [M, P, P, 3], f [M] -> clip(f * x)."""
  return tf.clip_by_value(x * f[:, None, None, None], 0.0, 1.0)


def adjust_contrast(x, f):
  """Blend with the mean gray level of each patch (torchvision adjust_contrast)."""
  mean = tf.tensordot(tf.reduce_mean(x, [1, 2]), tf.constant(GRAY_WEIGHTS, x.dtype), 1)
  f = f[:, None, None, None]
  return tf.clip_by_value(f * x + (1.0 - f) * mean[:, None, None, None], 0.0, 1.0)


def adjust_saturation(x, f):
  """Blend with the grayscale patch (torchvision adjust_saturation)."""
  f = f[:, None, None, None]
  return tf.clip_by_value(f * x + (1.0 - f) * grayscale(x), 0.0, 1.0)


def adjust_hue(x, delta):
  """Rotate the HSV hue of each patch by delta [M] (fraction of the circle)."""
  m = x.shape[0]
  return tf.stack([tf.image.adjust_hue(x[i], delta[i]) for i in range(m)])


def gaussian_kernel_1d(sigma, size: int):
  """sigma [k] -> normalised 1-D Gaussian kernels [k, size] (size odd)."""
  r = tf.range(size, dtype=tf.float32) - (size - 1) / 2.0
  k = tf.exp(-0.5 * tf.square(r[None, :] / sigma[:, None]))
  return k / tf.reduce_sum(k, -1, keepdims=True)


def _reflect_taps(n: int, size: int) -> np.ndarray:
  """0/1 tensor [size, n, n]: tap t of output i reads input reflect(i + t - size // 2)."""
  if size // 2 >= n:
    raise ValueError(f'blur kernel size {size} too large for {n} px patches')
  i = np.abs(np.arange(n)[:, None] + np.arange(size)[None, :] - size // 2)
  i = np.where(i > n - 1, 2 * (n - 1) - i, i)
  taps = np.zeros((size, n, n), np.float32)
  taps[np.arange(size)[None, :], np.arange(n)[:, None], i] = 1.0
  return taps


def blur_matrices(sigma, size: int, n: int):
  """sigma [k] -> [k, n, n] banded matrices: separable Gaussian with reflect padding."""
  taps = tf.constant(_reflect_taps(n, size).reshape(size, n * n))
  return tf.reshape(gaussian_kernel_1d(sigma, size) @ taps, [-1, n, n])


def gaussian_blur(x, sigma, size: int):
  """Separable Gaussian blur of square patches x [k, P, P, C], sigma [k]; reflect pad.

  Each 1-D pass is a batched matmul with a banded [P, P] matrix (torchvision's
  gaussian_blur semantics: kernel of ``size`` taps, reflect padding).
  """
  p, c = x.shape[1], x.shape[3]
  b = blur_matrices(sigma, size, p)  # [k, P, P]
  y = tf.reshape(b @ tf.reshape(x, [-1, p, p * c]), [-1, p, p, c])  # along rows
  y = tf.transpose(y, [0, 2, 1, 3])
  y = tf.reshape(b @ tf.reshape(y, [-1, p, p * c]), [-1, p, p, c])  # along columns
  return tf.transpose(y, [0, 2, 1, 3])


def augment_patches(
  x,
  seed,
  *,
  jitter=(0.4, 0.4, 0.4, 0.1),
  jitter_prob=0.8,
  grayscale_prob=0.2,
  blur_prob=0.5,
  blur_sigma=(0.1, 2.0),
  kernel_size=13,
  random_order=False,
):
  """Query-patch augmentation (see module docstring).

  x: float32 [M, P, P, 3] in [0, 1] (static shape); seed: stateless seed [2].
  Returns the same shape.
  """
  m = x.shape[0]
  keys = tf.random.experimental.stateless_split(seed, 2)
  u = tf.random.stateless_uniform([8, m], seed=keys[0])
  bri, con, sat, hue = jitter

  def factor(v, amount):
    return 1.0 - amount + 2.0 * amount * v

  ops = [
    lambda y: adjust_brightness(y, factor(u[0], bri)),
    lambda y: adjust_contrast(y, factor(u[1], con)),
    lambda y: adjust_saturation(y, factor(u[2], sat)),
    lambda y: adjust_hue(y, hue * (2.0 * u[3] - 1.0)),
  ]
  y = x
  if random_order:  # one permutation per image (costs ~1 ms per switch on CPU)
    order = tf.argsort(tf.random.stateless_uniform([4], seed=keys[1]))
    for i in range(4):
      y = tf.ensure_shape(
        tf.switch_case(order[i], [functools.partial(op, y) for op in ops]), x.shape
      )
  else:
    for op in ops:
      y = op(y)
  x = tf.gather(
    tf.concat([x, y], 0),  # per patch: jittered or not
    tf.range(m) + m * tf.cast(u[4] < jitter_prob, tf.int32),
  )
  # Grayscale and blur are computed only for the selected patches.
  sel = tf.where(u[5] < grayscale_prob)  # [k, 1]
  gray = grayscale(tf.gather_nd(x, sel))
  x = tf.tensor_scatter_nd_update(x, sel, tf.concat([gray, gray, gray], -1))
  lo, hi = blur_sigma
  sel = tf.where(u[7] < blur_prob)
  sigma = tf.gather_nd(lo + (hi - lo) * u[6], sel)
  blurred = gaussian_blur(tf.gather_nd(x, sel), sigma, kernel_size)
  return tf.tensor_scatter_nd_update(x, sel, blurred)
