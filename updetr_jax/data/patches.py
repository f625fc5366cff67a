"""Random query patches: sampling in original pixels, boxes, crops.

Sampling (UP-DETR; docs/method.md, 'UP-DETR pre-training'), per patch and
independently, in ORIGINAL pixels of an
image of size (H, W) (both >= 17, smaller images are skipped upstream):
  w ~ U{8, ..., W - 8}, h ~ U{8, ..., H - 8}          (both ends inclusive)
  x ~ U{0, ..., W - w - 1}, y ~ U{0, ..., H - h - 1}  (both ends inclusive)
so the patch [x, x + w) x [y, y + h) lies inside the image and, as in the release
(``np.random.randint(W - w)``, exclusive), never touches the right or bottom edge;
patches may overlap.
The box is that rectangle, normalised cxcywh: ((x + w/2) / W, (y + h/2) / H, w / W,
h / H). Resizing the detection image maps boxes proportionally, so this equals the
rectangle mapped to the resized image and normalised by the UNPADDED resized size.
Integers are drawn as floor(u * n) from ``tf.random.stateless_uniform`` floats.
"""

from __future__ import annotations

import tensorflow as tf


MIN_PATCH = 8  # smallest patch side and the margin in U{8 .. W-8}


def _randint(u, lo, hi):
  """Inclusive U{lo..hi} from u in [0, 1) (int32, broadcasting)."""
  n = hi - lo + 1
  i = tf.cast(tf.floor(u * tf.cast(n, tf.float32)), tf.int32)
  return lo + tf.minimum(i, n - 1)


def sample_patch_boxes(seed, height, width, num_patches: int):
  """Patch rectangles in original pixels.

  seed: stateless seed [2]; height, width: int32 scalars (>= 17).
  Returns int32 [M, 4] as (x, y, w, h).
  """
  u = tf.random.stateless_uniform([4, num_patches], seed=seed)
  height = tf.cast(height, tf.int32)
  width = tf.cast(width, tf.int32)
  pw = _randint(u[0], MIN_PATCH, width - MIN_PATCH)
  ph = _randint(u[1], MIN_PATCH, height - MIN_PATCH)
  x = _randint(u[2], 0, width - pw - 1)  # the release's randint(W - w): exclusive
  y = _randint(u[3], 0, height - ph - 1)
  return tf.stack([x, y, pw, ph], -1)


def boxes_to_cxcywh(boxes_px, height, width):
  """(x, y, w, h) pixels [M, 4] -> float32 cxcywh [M, 4] normalised by (W, H)."""
  b = tf.cast(boxes_px, tf.float32)
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  return tf.stack(
    [(b[:, 0] + 0.5 * b[:, 2]) / w, (b[:, 1] + 0.5 * b[:, 3]) / h, b[:, 2] / w, b[:, 3] / h], -1
  )


def crop_patch(image, box_px, patch_size: int):
  """Crop image [H, W, 3] at (x, y, w, h), resize to float32 [P, P, 3] (aspect not kept).

  Bilinear, antialiased (TF's triangle-filter resize, close to PIL's bilinear, which
  torchvision's Resize uses; the same as plain bilinear when enlarging). Values stay
  in the input range (non-negative weights summing to 1).
  """
  x, y, w, h = box_px[0], box_px[1], box_px[2], box_px[3]
  crop = tf.slice(image, tf.stack([y, x, 0]), tf.stack([h, w, 3]))
  return tf.image.resize(crop, [patch_size, patch_size], 'bilinear', antialias=True)


def crop_patches(image, boxes_px, patch_size: int):
  """Image [H, W, 3], boxes int32 [M, 4] (static M) -> float32 [M, P, P, 3]."""
  m = boxes_px.shape[0]
  return tf.stack([crop_patch(image, boxes_px[i], patch_size) for i in range(m)])
