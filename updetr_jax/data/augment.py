"""Resize rule, resize and ImageNet normalisation of the host pipelines (TensorFlow).

The query-patch augmentation (docs/method.md, 'UP-DETR pre-training': ColorJitter
0.4/0.4/0.4/0.1 with p=0.8, grayscale p=0.2, Gaussian blur p=0.5 with sigma in
[0.1, 2]) runs on the accelerator, in the jitted step: ``updetr_jax/device_augment.py``
(its docstring gives the semantics). The host only decodes, resizes and pads. Images are
float32 in [0, 255] or [0, 1] as said.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from updetr_jax.normalization import MEAN, STD


def resize_rule(height, width, scale, max_size):
  """DETR's resize: shorter side -> scale, longer side capped at max_size.

  If long / short * scale > max_size then scale = round(max_size * short / long);
  the short side becomes scale and the long side int(scale * long / short).
  Works on Python ints or numpy arrays (vectorised); returns (new_h, new_w) ints.
  """
  new_h, new_w = resized_size(
    np.asarray(height, np.float64),
    np.asarray(width, np.float64),
    np.asarray(scale, np.float64),
    max_size,
    np,
  )
  new_h, new_w = new_h.astype(np.int64), new_w.astype(np.int64)
  if np.ndim(new_h) == 0:
    return int(new_h), int(new_w)
  return new_h, new_w


def resized_size(h, w, s, max_size, xp):
  """``resize_rule``'s arithmetic, written once for numpy and TensorFlow.

  Args: h, w, s: float64 arrays (or tensors) of the image height, width and target
    shorter side; max_size: a Python number (0 or None: no cap); xp: ``numpy`` or
    ``tensorflow``, whose minimum, maximum, where, round and floor are used (the same
    float64 operations in the same order; both round halves to even).
  Returns (new_h, new_w) float64, whole numbers.
  """
  short, long_ = xp.minimum(h, w), xp.maximum(h, w)
  if max_size:
    over = long_ / short * s > max_size
    s = xp.where(over, xp.round(max_size * short / long_), s)
  new_long = xp.floor(s * long_ / short)
  portrait = w < h  # DETR: w < h -> w is the short side
  return xp.where(portrait, new_long, s), xp.where(portrait, s, new_long)


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
