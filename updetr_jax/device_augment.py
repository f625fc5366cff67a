"""Query patches on the accelerator: crop + resize, colour augmentation, normalisation.

The host sends each pre-training example as uint8 pixels (the detection image,
resized and zero-padded to its bucket), its valid size, the M patch rectangles in
those pixels and a per-example seed; everything per pixel happens here, in jitted
JAX at the start of the train / evaluation step (the pattern of BYOL's JAX input
pipeline; docs/design.md on device augmentation). Nothing is float32 on the host.

Crop (``crop_patches``): each rectangle (x, y, w, h) of the resized image becomes
P x P by a separable resize whose weights are dense [P, H] and [P, W] matrices
(two matmuls per patch, no gather, so cheap on TPU). Semantics as TensorFlow's
``tf.image.resize(crop, (P, P), 'bilinear', antialias=True)`` of the cropped
rectangle (``data.patches.crop_patch``): half-pixel centres, a triangle filter
widened by the shrink factor when shrinking, weights renormalised over the pixels
inside the rectangle (so nothing outside it, padding included, leaks in).
Rectangles may be fractional (a patch drawn in original pixels, mapped to the
resized image: pixels partly inside weigh by their covered fraction).

Augmentation (``augment_patches``, training): the release's query-patch augmentation
(docs/method.md, 'UP-DETR pre-training'), each patch independently, in this order:
  1. ColorJitter(brightness 0.4, contrast 0.4, saturation 0.4, hue 0.1) with p=0.8.
     Factors as torchvision: brightness/contrast/saturation ~ U[1-0.4, 1+0.4], hue
     shift ~ U[-0.1, 0.1] (fraction of the HSV hue circle); contrast and saturation
     blend with the luma mean / luma image; results clipped to [0, 1] after each op.
  2. Grayscale with p=0.2 (0.299 R + 0.587 G + 0.114 B, copied to 3 channels).
  3. Gaussian blur with p=0.5, sigma ~ U[0.1, 2.0], separable kernel of odd size
     ``blur_kernel_size`` (0 = automatic: the odd number nearest 10% of P, 13 for
     P=128, like SimCLR's 23 for 224), reflect padding, as banded [P, P] matmuls.
  4. ImageNet normalisation. No flip; evaluation crops and normalises only.
Every op is computed for every patch and selected by its draw (no gathers; the
blur's and jitter's FLOPs are small next to the crop's). The jitter
order is fixed (brightness, contrast, saturation, hue) unless ``random_order``:
then each patch draws its own order, as torchvision does (all four orders' ops
are computed and selected, which costs 4x the jitter's few FLOPs). The draws
use ``jax.random`` keyed by the example's seed (``patch_keys``), and each device
maps its own examples ``data.patch_chunk`` at a time (``map_examples``): the same
(seed, epoch, example) gives bit-identical patches on any mesh and after a restart.

Public API (no TensorFlow; each function's docstring gives its shapes):
  crop_patches, augment_patches, normalize, padding_mask, patch_keys: the steps;
  prepare_batch, map_examples: the host's uint8 batch -> the model's batch, per device;
  batch_preparer / patch_preparer (pre-training), query_preparer (one-shot): a
    ``Preparer``, prepare_batch bound to a config; augment_kwargs, blur_kernel_size:
    the config fields; MEAN, STD, GRAY_WEIGHTS (``updetr_jax.normalization``'s).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from updetr_jax.normalization import GRAY_WEIGHTS, MEAN, STD

# Uniform draws per patch (fixed layout): brightness, contrast, saturation, hue,
# jitter?, grayscale?, blur sigma, blur?, and four for the random jitter order.
_DRAWS = 12


def normalize(x):
  """[..., 3] float in [0, 1] -> ImageNet-normalised float32."""
  return (x.astype(jnp.float32) - jnp.asarray(MEAN, jnp.float32)) / jnp.asarray(STD, jnp.float32)


def padding_mask(image_size, shape):
  """image_size int [B, 2] (valid h, w) -> bool [B, H, W], True outside (bottom/right pad)."""
  h, w = shape
  rows = jnp.arange(h)[None, :, None] < image_size[:, 0, None, None]
  cols = jnp.arange(w)[None, None, :] < image_size[:, 1, None, None]
  return ~(rows & cols)


def patch_keys(seeds):
  """seeds uint32 [B, 2] (key0, example) -> one PRNG key per example [B]."""
  seeds = jnp.asarray(seeds, jnp.uint32)
  return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s[0]), s[1]))(seeds)


def resize_weights(start, length, out_size: int, in_size: int):
  """Weights [out_size, in_size] resizing the span [start, start + length) of an axis.

  TensorFlow's bilinear ``antialias=True`` resize of the cropped span: output pixel
  i samples at start + (i + 0.5) * length / out_size; a triangle of half-width
  max(1, length / out_size) input pixels; input pixels weigh by the part of them
  inside the span; rows normalised to 1.
  """
  scale = length / out_size  # input pixels per output pixel
  support = jnp.maximum(scale, 1.0)
  centre = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  # Sample positions are measured in crop-relative pixel units, as TF does on the
  # cropped image: input pixel j has its centre at j + 0.5.
  pix = jnp.arange(in_size, dtype=jnp.float32) + 0.5
  tri = jnp.maximum(0.0, 1.0 - jnp.abs(pix[None, :] - centre[:, None]) / support)
  inside = jnp.clip(
    jnp.minimum(pix + 0.5, start + length) - jnp.maximum(pix - 0.5, start), 0.0, 1.0
  )
  w = tri * inside[None, :]
  return w / jnp.maximum(w.sum(axis=1, keepdims=True), 1e-12)


def crop_patches(images, boxes, patch_size: int):
  """images [B, H, W, 3] (uint8 0..255 or float), boxes float32 [B, M, 4] (x, y, w, h)
  in pixels -> float32 [B, M, P, P, 3] in [0, 1] (uint8) or the input's scale."""
  scale = 1.0 / 255.0 if images.dtype == jnp.uint8 else 1.0
  _, h, w, _ = images.shape
  p = int(patch_size)

  def one_image(img, bxs):
    img = img.astype(jnp.float32) * scale

    def one_patch(b):
      wy = resize_weights(b[1], b[3], p, h)  # [P, H]
      wx = resize_weights(b[0], b[2], p, w)  # [P, W]
      rows = jnp.einsum('ph,hwc->pwc', wy, img, precision=jax.lax.Precision.HIGHEST)
      return jnp.einsum('qw,pwc->pqc', wx, rows, precision=jax.lax.Precision.HIGHEST)

    return jax.vmap(one_patch)(bxs)

  return jax.vmap(one_image)(images, boxes.astype(jnp.float32))


# --- colour augmentation (per patch: x [P, P, 3] in [0, 1]) ----------------------------


def grayscale(x):
  """[..., 3] -> [..., 1] luma."""
  return jnp.tensordot(x, jnp.asarray(GRAY_WEIGHTS, x.dtype), 1)[..., None]


def adjust_brightness(x, f):
  return jnp.clip(x * f, 0.0, 1.0)


def adjust_contrast(x, f):
  """Blend with the patch's mean gray level (torchvision adjust_contrast)."""
  return jnp.clip(f * x + (1.0 - f) * jnp.mean(grayscale(x)), 0.0, 1.0)


def adjust_saturation(x, f):
  """Blend with the gray patch (torchvision adjust_saturation)."""
  return jnp.clip(f * x + (1.0 - f) * grayscale(x), 0.0, 1.0)


def rgb_to_hsv(x):
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  v = jnp.max(x, axis=-1)
  c = v - jnp.min(x, axis=-1)
  s = jnp.where(v > 0, c / jnp.where(v > 0, v, 1.0), 0.0)
  safe = jnp.where(c > 0, c, 1.0)
  h = jnp.where(
    v == r, (g - b) / safe, jnp.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe)
  )
  h = jnp.where(c > 0, (h / 6.0) % 1.0, 0.0)
  return h, s, v


def hsv_to_rgb(h, s, v):
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  p, q, t = v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f))
  i = i.astype(jnp.int32) % 6
  r = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [v, q, p, p, t], v)
  g = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [t, v, v, q, p], p)
  b = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [p, p, t, v, v], q)
  return jnp.stack([r, g, b], axis=-1)


def adjust_hue(x, delta):
  """Rotate the HSV hue by delta (fraction of the circle)."""
  h, s, v = rgb_to_hsv(x)
  return hsv_to_rgb((h + delta) % 1.0, s, v)


def _reflect_taps(n: int, size: int) -> np.ndarray:
  """0/1 [size, n, n]: tap t of output i reads input reflect(i + t - size // 2)."""
  if size // 2 >= n:
    raise ValueError(f'blur kernel size {size} too large for {n} px patches')
  i = np.abs(np.arange(n)[:, None] + np.arange(size)[None, :] - size // 2)
  i = np.where(i > n - 1, 2 * (n - 1) - i, i)
  taps = np.zeros((size, n, n), np.float32)
  taps[np.arange(size)[None, :], np.arange(n)[:, None], i] = 1.0
  return taps


def gaussian_blur(x, sigma, size: int):
  """Separable Gaussian blur of a square patch x [P, P, C] (``size`` taps, reflect)."""
  p = x.shape[0]
  r = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2.0
  k = jnp.exp(-0.5 * jnp.square(r / sigma))
  k = k / k.sum()
  band = jnp.tensordot(k, jnp.asarray(_reflect_taps(p, size)), 1)  # [P, P]
  hi = jax.lax.Precision.HIGHEST
  y = jnp.einsum('ij,jwc->iwc', band, x, precision=hi)
  return jnp.einsum('ij,hjc->hic', band, y, precision=hi)


def augment_patches(
  x,
  key,
  *,
  jitter=(0.4, 0.4, 0.4, 0.1),
  jitter_prob=0.8,
  grayscale_prob=0.2,
  blur_prob=0.5,
  blur_sigma=(0.1, 2.0),
  kernel_size=13,
  random_order=False,
):
  """x float32 [M, P, P, 3] in [0, 1], key: one PRNG key -> augmented [M, P, P, 3]."""
  m = x.shape[0]
  u = jax.random.uniform(key, (m, _DRAWS))
  bri, con, sat, hue = jitter
  lo, hi = blur_sigma

  def factor(v, amount):
    return 1.0 - amount + 2.0 * amount * v

  def one(p, d):
    ops = (
      lambda y: adjust_brightness(y, factor(d[0], bri)),
      lambda y: adjust_contrast(y, factor(d[1], con)),
      lambda y: adjust_saturation(y, factor(d[2], sat)),
      lambda y: adjust_hue(y, hue * (2.0 * d[3] - 1.0)),
    )
    y = p
    if random_order:  # torchvision: a random order per patch
      order = jnp.argsort(d[8:12])
      for i in range(4):
        y = jax.lax.switch(order[i], ops, y)
    else:
      for op in ops:
        y = op(y)
    p = jnp.where(d[4] < jitter_prob, y, p)
    p = jnp.where(d[5] < grayscale_prob, jnp.broadcast_to(grayscale(p), p.shape), p)
    blurred = gaussian_blur(p, lo + (hi - lo) * d[6], kernel_size)
    return jnp.where(d[7] < blur_prob, blurred, p)

  return jax.vmap(one)(x, u)


def blur_kernel_size(patch_size: int, configured: int = 0) -> int:
  """Odd blur kernel size: ``configured`` if > 0, else the odd number nearest P / 10."""
  if configured:
    if configured % 2 == 0:
      raise ValueError(f'data.blur_kernel_size={configured} must be odd')
    return configured
  return max(3, 2 * (int(patch_size) // 20) + 1)  # 2k + 1 is nearest for P / 10 in [2k, 2k + 2)


def augment_kwargs(cfg) -> dict:
  """Keyword arguments of ``augment_patches`` from the data config's fields."""
  return dict(
    jitter=tuple(float(v) for v in cfg['color_jitter']),
    jitter_prob=float(cfg['color_jitter_prob']),
    grayscale_prob=float(cfg['grayscale_prob']),
    blur_prob=float(cfg['blur_prob']),
    blur_sigma=tuple(float(v) for v in cfg['blur_sigma']),
    kernel_size=blur_kernel_size(int(cfg['patch_size']), int(cfg['blur_kernel_size'])),
    random_order=bool(cfg['color_jitter_random_order']),
  )


class Preparer:
  """A jittable host batch -> model batch function (``batch_preparer`` /
  ``query_preparer``), ``fn(batch, sharding, chunk)`` bound to a mesh and a chunk.

  ``uncounted_flops(batch)``: XLA's cost analysis counts a loop's body once, so a
  step that maps its examples ``chunk`` at a time (``map_examples``) is undercounted
  by (iterations - 1) bodies; this is the difference (lowering only), to add to the
  step's count (``mfu.step_cost``). The whole batch in one pass does the same
  arithmetic.
  """

  def __init__(self, fn, sharding, chunk: int):
    self.fn, self.sharding, self.chunk = fn, sharding, int(chunk)

  def __call__(self, batch):
    return self.fn(batch, self.sharding, self.chunk)

  def uncounted_flops(self, batch) -> float:
    from updetr_jax import mfu  # noqa: PLC0415

    n = int(jax.tree_util.tree_leaves(batch)[0].shape[0])
    counted = mfu.step_flops(jax.jit(self).lower(batch))
    whole = mfu.step_flops(jax.jit(lambda b: self.fn(b, None, n)).lower(batch))
    return (whole - counted) if counted is not None and whole is not None else 0.0


def batch_preparer(cfg, train: bool, sharding=None) -> Preparer:
  """``prepare_batch`` for the data config ``cfg``: augmented when training and
  ``data.augment_patches`` (evaluation never is), ``data.patch_chunk`` examples at a
  time on each device of ``sharding`` (the batch's ``NamedSharding``; None: arrays
  on one device). Pure JAX: call it inside jit."""
  aug = augment_kwargs(cfg) if train and cfg['augment_patches'] else None
  return patch_preparer(int(cfg['patch_size']), aug, sharding, cfg['patch_chunk'])


def patch_preparer(patch_size: int, augment: dict | None, sharding=None, chunk: int = 1):
  """``prepare_batch`` with these arguments, as a ``Preparer`` (config-free)."""
  return Preparer(
    lambda batch, sh, c: prepare_batch(
      batch, patch_size=patch_size, augment=augment, sharding=sh, chunk=c
    ),
    sharding,
    chunk,
  )


def map_examples(fn, args: tuple, *, sharding=None, chunk: int = 1):
  """fn(*one example's args) -> its output, over the batch (leading) axis of args.

  Each device maps its own examples (``jax.shard_map`` over ``sharding``'s batch
  axis; None: one device), ``chunk`` at a time (``jax.lax.map``): every chunk runs
  the same program whatever the mesh, so the result is bit-identical on 1 or 8
  devices as long as ``chunk`` divides every per-device batch. (A vmap over the
  whole batch would not be: XLA orders a batched matmul's sums by the batch.)
  """
  chunk = int(chunk)

  def local(*a):
    n = a[0].shape[0]
    if chunk < 1 or n % chunk:
      raise ValueError(f'data.patch_chunk={chunk} must divide the per-device batch ({n} examples)')
    return jax.lax.map(lambda e: fn(*e), a, batch_size=chunk)

  if sharding is None:
    return local(*args)
  spec = jax.sharding.PartitionSpec(sharding.spec[0])
  return jax.shard_map(local, mesh=sharding.mesh, in_specs=(spec,) * len(args), out_specs=spec)(
    *args
  )


def prepare_batch(
  batch: dict, *, patch_size: int, augment: dict | None, sharding=None, chunk: int = 1
) -> dict:
  """The host's uint8 batch -> the model's batch (jit it; see the module docstring).

  batch: images uint8 [B, H, W, 3] (resized, zero-padded), image_size int32 [B, 2],
  patch_boxes float32 [B, M, 4] (x, y, w, h in those pixels), patch_seeds uint32
  [B, 2], targets. augment: ``augment_patches`` keyword arguments, or None (no
  augmentation: evaluation). sharding / chunk: how the patches are mapped over the
  examples (``map_examples``). Returns {images float32 normalised, padding_mask bool
  [B, H, W], patches float32 [B, M, P, P, 3] normalised, targets}.
  """
  images = batch['images']
  mask = padding_mask(batch['image_size'], images.shape[1:3])

  def one(image, boxes, seed):
    x = crop_patches(image[None], boxes[None], patch_size)[0]
    if augment is not None:
      x = augment_patches(x, patch_keys(seed[None])[0], **augment)
    return normalize(x)

  patches = map_examples(
    one,
    (images, batch['patch_boxes'], jnp.asarray(batch['patch_seeds'], jnp.uint32)),
    sharding=sharding,
    chunk=chunk,
  )
  pixels = images.astype(jnp.float32) * (1.0 / 255.0)
  return dict(
    images=jnp.where(mask[..., None], 0.0, normalize(pixels)),
    padding_mask=mask,
    patches=patches,
    targets=batch['targets'],
  )


def query_preparer(cfg, train: bool, sharding=None) -> Preparer:
  """One-shot detection: the host cuts each trial's query crop (from another image)
  and sends it as uint8 [B, K, P, P, 3] under ``patches`` with ``patch_seeds``; this
  augments it (training with ``data.augment_patches``) and normalises it, on the
  device (``data.patch_chunk`` examples at a time on each device of ``sharding``, as
  ``batch_preparer``). Returns batch -> batch (other entries unchanged). Pure JAX."""
  aug = augment_kwargs(cfg) if train and cfg['augment_patches'] else None

  def one(crops, seed):
    x = crops.astype(jnp.float32) * (1.0 / 255.0)
    if aug is not None:
      x = augment_patches(x, patch_keys(seed[None])[0], **aug)
    return normalize(x)

  def prepare(batch, sh, chunk):
    seeds = jnp.asarray(batch['patch_seeds'], jnp.uint32)
    x = map_examples(one, (batch['patches'], seeds), sharding=sh, chunk=chunk)
    return dict(batch, patches=x)

  return Preparer(prepare, sharding, cfg['patch_chunk'])
