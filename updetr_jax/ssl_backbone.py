"""Stage 0: self-supervised (SimCLR) pre-training of the frozen CNN, on unlabeled images.

UP-DETR freezes a self-supervised (SwAV) ResNet-50 loaded from a torchvision-layout
state dict. For a miniature benchmark no such weights can be downloaded, so this
module trains a small ResNet of ``updetr_jax/models/resnet.py`` (any name in
``RESNET_VARIANTS``, ``resnet_small`` by default) with SimCLR in a few CPU minutes
and writes it in the same layout, as ``.npz``:

  conv1.weight [O, I, 7, 7], bn1.{weight,bias,running_mean,running_var},
  layer1.0.conv1.weight, ..., layer4.0.downsample.{0.weight,1.*},
  projection_head.{0,1,3}.*   (SwAV's head layout; the importer drops it)

so ``config.init.backbone_checkpoint=FILE.npz`` loads it exactly as SwAV weights
(``torch_import.import_torch_checkpoint``), with or without ``model.dilation`` (the
same kernels; dilation only changes how the last stage applies them).

Method (SimCLR, Chen et al. 2020): two random views of each image (random resized
crop, scale (0.2, 1), ratio (3/4, 4/3); horizontal flip; colour jitter (0.4, 0.4,
0.4, 0.1) with p 0.8; grayscale p 0.2; ImageNet normalisation, as the detector's
input), the ResNet's globally pooled C5 -> projection head Linear-BN-ReLU-Linear ->
NT-Xent loss (temperature 0.2) over the 2B views. During SSL the network uses real
training-mode BatchNorm (batch statistics, running averages with torch's momentum
0.1, learnable affine): a twin of the detector's backbone with the same module names
(``TrainResNet``). The exported BN running statistics and affine terms become the
detector's frozen BatchNorm, so the detector's backbone computes exactly the twin's
eval-mode function.

Sanity number (no labels): top-1 retrieval accuracy of each view's partner among the
2N - 1 other views of a fixed batch (two seeded, never-trained-on views of each of
the first N = min(256, #images) images), by cosine similarity of the pooled C5
features in eval mode (what the detector gets); before training = the random CNN
with identity BatchNorm statistics (the demo's frozen random CNN). Chance is
1 / (2N - 1).

Defaults (resnet_small, 500 steps of 64 images x 2 views of 64 px, AdamW lr 2e-3,
weight decay 1e-4 on kernels, 5% warm-up then cosine): about 3.5 min on 2 CPU cores.

Augmentation is numpy + PIL on the host, seeded by (seed, step): the run is
deterministic given the seed.

API: train_ssl_backbone(image_folder, output_path, ...) -> summary dict.
CLI:
  python -m updetr_jax.ssl_backbone --images=DIR --output=FILE.npz [--steps=N ...]

One file: SimCLR's augmentation, projection head, loss, loop and the export to the
torchvision layout are used only together, by stage 0.
"""

from __future__ import annotations

import functools
import hashlib
import io
from absl import logging
import os
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from updetr_jax import files, normalization
from updetr_jax.models.resnet import _conv, _conv_init, block_layout, resnet_spec
from updetr_jax.torch_import import export_state_dict

MEAN = np.array(normalization.MEAN, np.float32)  # float32, as the crops they normalise
STD = np.array(normalization.STD, np.float32)

DEFAULTS = dict(
  backbone='resnet_small',
  steps=500,
  batch_size=64,
  image_size=64,
  seed=0,
  lr=2e-3,
  temperature=0.2,
  weight_decay=1e-4,
)
EVAL_IMAGES = 256  # images (2 views each) of the retrieval sanity number
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
COLOR_JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
COLOR_JITTER_PROB = 0.8
GRAYSCALE_PROB = 0.2
PROJECTION_DIM = 128
BN_MOMENTUM = 0.9  # flax convention: torch's momentum 0.1
SUMMARY_NAME = 'summary.json'
CURVE_NAME = 'loss_curve.png'


# ----------------------------------------------------------------------------- model


def _bn(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=1e-5, name=name)


class TrainBottleneck(nn.Module):
  """``models.resnet.Bottleneck`` with training-mode BatchNorm (same module names)."""

  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    out = nn.relu(_bn(train, 'bn1')(_conv(self.planes, 1, name='conv1')(x)))
    out = _conv(self.planes, 3, self.stride, self.dilation, name='conv2')(out)
    out = nn.relu(_bn(train, 'bn2')(out))
    out = _bn(train, 'bn3')(_conv(self.planes * 4, 1, name='conv3')(out))
    if self.downsample:
      x = _bn(train, 'downsample_1')(_conv(self.planes * 4, 1, self.stride, name='downsample_0')(x))
    return nn.relu(out + x)


class TrainResNet(nn.Module):
  """Training-time twin of ``models.resnet.ResNet``: same convolutions and names, real
  BatchNorm (``params``: scale, bias; ``batch_stats``: mean, var).

  Args (call): x [B, H, W, 3] float; train: batch statistics (and running-average
    updates, with ``mutable=['batch_stats']``) if True, running averages if False.
  Returns: C5 [B, ceil(H/32), ceil(W/32), 32 * width] (stride 16 with ``dilation``).
  """

  blocks: Sequence[int]
  width: int = 64
  dilation: bool = False

  @property
  def num_channels(self) -> int:
    return self.width * 8 * 4

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(
      self.width,
      (7, 7),
      strides=(2, 2),
      padding=((3, 3), (3, 3)),
      use_bias=False,
      kernel_init=_conv_init(),
      name='conv1',
    )(x.astype(jnp.float32))
    x = nn.relu(_bn(train, 'bn1')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for name, kw in block_layout(self.blocks, self.width, self.dilation):
      x = TrainBottleneck(name=name, **kw)(x, train)
    return x


def build_train_resnet(name: str, dilation: bool = False) -> TrainResNet:
  blocks, width = resnet_spec(name)
  return TrainResNet(blocks=blocks, width=width, dilation=dilation)


class SimCLRNet(nn.Module):
  """TrainResNet (submodule ``backbone``) + SwAV-layout projection head
  (``projection_head_0`` Linear, ``_1`` BatchNorm, ReLU, ``_3`` Linear).

  Args (call): x [B, H, W, 3] normalised; train as TrainResNet.
  Returns: (pooled C5 features [B, C], projections [B, PROJECTION_DIM]), float32.
  """

  backbone_name: str = 'resnet_small'
  projection_dim: int = PROJECTION_DIM

  @nn.compact
  def __call__(self, x, train: bool):
    blocks, width = resnet_spec(self.backbone_name)
    backbone = TrainResNet(blocks=blocks, width=width, name='backbone')
    feat = backbone(x, train).mean(axis=(1, 2))
    h = nn.Dense(backbone.num_channels, name='projection_head_0')(feat)
    h = nn.relu(_bn(train, 'projection_head_1')(h))
    return feat, nn.Dense(self.projection_dim, name='projection_head_3')(h)


def backbone_variables(variables) -> dict:
  """The ``TrainResNet`` variables inside SimCLRNet variables."""
  return {c: variables[c]['backbone'] for c in ('params', 'batch_stats')}


def export_torchvision(variables) -> dict[str, np.ndarray]:
  """SimCLRNet variables -> torchvision/SwAV-layout state dict (numpy float32)."""
  flat = {}
  for c in ('params', 'batch_stats'):
    tree = dict(variables[c])
    flat[c] = {**dict(tree.pop('backbone')), **tree}
  return export_state_dict(flat)


# ------------------------------------------------------------------------------ loss


def contrastive_stats(z, temperature: float):
  """NT-Xent over 2B embeddings whose rows i and i + B are the two views of image i.

  Args: z [2B, D] float. Returns (loss scalar, {'top1': retrieval accuracy of the
  positive by cosine among the 2B - 1 others, 'pos_cos', 'neg_cos': mean cosines}).
  """
  z = z.astype(jnp.float32)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-8)
  n = z.shape[0]
  b = n // 2
  cos = jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST)
  eye = jnp.eye(n, dtype=bool)
  pos_idx = (jnp.arange(n) + b) % n
  logits = jnp.where(eye, -jnp.inf, cos / temperature)
  pos_logit = jnp.take_along_axis(logits, pos_idx[:, None], axis=1)[:, 0]
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - pos_logit)
  pos_cos = jnp.take_along_axis(cos, pos_idx[:, None], axis=1)[:, 0]
  neg = ~eye & (jnp.arange(n)[None, :] != pos_idx[:, None])
  stats = {
    'top1': jnp.mean(jnp.argmax(logits, axis=1) == pos_idx),
    'pos_cos': jnp.mean(pos_cos),
    'neg_cos': jnp.sum(jnp.where(neg, cos, 0.0)) / jnp.sum(neg),
  }
  return loss, stats


# ------------------------------------------------------------------------------ data


def load_images(paths: Sequence[str], image_size: int) -> tuple[list[Image.Image], list[str]]:
  """The readable images of ``paths``, decoded to RGB and shrunk to a short side of at
  most 2 * image_size (enough for the crops). Returns (PIL images, their paths)."""
  images, used = [], []
  max_short = 2 * image_size
  for p in paths:
    try:
      with files.open_file(p, 'rb') as f:
        im = Image.open(io.BytesIO(f.read()))
        im = im.convert('RGB')
    except Exception as e:  # noqa: BLE001 (unreadable files are skipped, as the data API)
      logging.warning('ssl: skipping unreadable image %s: %s', p, e)
      continue
    w, h = im.size
    if min(w, h) < 8:
      logging.warning('ssl: skipping tiny image %s (%dx%d)', p, w, h)
      continue
    if min(w, h) > max_short:
      f = max_short / min(w, h)
      im = im.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR)
    im.load()
    images.append(im)
    used.append(p)
  return images, used


def _crop_box(rng: np.random.Generator, h: int, w: int) -> tuple[float, float, float, float]:
  """torchvision RandomResizedCrop box (x0, y0, x1, y1) for an h x w image."""
  area = h * w
  for _ in range(10):
    target = area * rng.uniform(*CROP_SCALE)
    ratio = np.exp(rng.uniform(np.log(CROP_RATIO[0]), np.log(CROP_RATIO[1])))
    cw = np.sqrt(target * ratio)
    ch = np.sqrt(target / ratio)
    if 0 < cw <= w and 0 < ch <= h:
      x0 = rng.uniform(0, w - cw)
      y0 = rng.uniform(0, h - ch)
      return x0, y0, x0 + cw, y0 + ch
  s = min(h, w)  # fallback: central square
  return (w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2


_LUMA = np.asarray(normalization.GRAY_WEIGHTS, np.float32)
_RGB2YIQ = np.array(
  [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32
)
_YIQ2RGB = np.linalg.inv(_RGB2YIQ).astype(np.float32)


def _color_jitter(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
  """Brightness, contrast, saturation, hue (YIQ rotation), fixed order, each clipped to
  [0, 1]; applied to a random COLOR_JITTER_PROB of the views. x [N, S, S, 3] in [0, 1]."""
  n = x.shape[0]
  bri, con, sat, hue = COLOR_JITTER
  on = rng.random(n) < COLOR_JITTER_PROB
  fb = np.where(on, rng.uniform(1 - bri, 1 + bri, n), 1.0).astype(np.float32)
  fc = np.where(on, rng.uniform(1 - con, 1 + con, n), 1.0).astype(np.float32)
  fs = np.where(on, rng.uniform(1 - sat, 1 + sat, n), 1.0).astype(np.float32)
  fh = np.where(on, rng.uniform(-hue, hue, n), 0.0).astype(np.float32)
  x = np.clip(x * fb[:, None, None, None], 0, 1)
  m = (x @ _LUMA).mean(axis=(1, 2))[:, None, None, None]
  x = np.clip((x - m) * fc[:, None, None, None] + m, 0, 1)
  g = (x @ _LUMA)[..., None]
  x = np.clip((x - g) * fs[:, None, None, None] + g, 0, 1)
  theta = 2 * np.pi * fh
  c, s = np.cos(theta), np.sin(theta)
  rot = np.zeros((n, 3, 3), np.float32)
  rot[:, 0, 0] = 1
  rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
  mat = np.einsum('ij,njk,kl->nil', _YIQ2RGB, rot, _RGB2YIQ).astype(np.float32)
  x = np.matmul(x.reshape(n, -1, 3), mat.transpose(0, 2, 1)).reshape(x.shape)
  return np.clip(x, 0, 1)


def augment_views(
  rng: np.random.Generator, images: Sequence[Image.Image], indices, image_size: int
) -> np.ndarray:
  """Two SimCLR views of each RGB ``images[i]``, i in ``indices`` (B of them).

  Returns float32 [2B, S, S, 3], ImageNet-normalised; rows k and k + B are the views
  of image ``indices[k]``.
  """
  s = image_size
  crops = np.empty((2 * len(indices), s, s, 3), np.uint8)
  for v in range(2):
    for k, i in enumerate(indices):
      im = images[i]
      box = _crop_box(rng, im.height, im.width)
      crop = np.asarray(im.resize((s, s), Image.BILINEAR, box=box))
      if rng.random() < 0.5:
        crop = crop[:, ::-1]
      crops[v * len(indices) + k] = crop
  x = _color_jitter(rng, crops.astype(np.float32) / 255.0)
  gray = rng.random(len(x)) < GRAYSCALE_PROB
  x[gray] = (x[gray] @ _LUMA)[..., None]
  return ((x - MEAN) / STD).astype(np.float32)


def make_batch(images, batch_size: int, image_size: int, seed: int, step: int) -> np.ndarray:
  """Training batch ``step``: B distinct images (without replacement), two views each.

  Deterministic in (seed, step). Returns float32 [2B, S, S, 3]."""
  rng = np.random.default_rng((seed, 1, step))
  idx = rng.choice(len(images), size=batch_size, replace=False)
  return augment_views(rng, images, idx, image_size)


def eval_batch(images, image_size: int, seed: int, max_images: int = 256) -> np.ndarray:
  """The fixed batch of the sanity number: two seeded views of each of the first
  ``max_images`` images (views never used in training). Returns [2N, S, S, 3]."""
  rng = np.random.default_rng((seed, 2))
  return augment_views(rng, images, np.arange(min(max_images, len(images))), image_size)


# -------------------------------------------------------------------------- training


def _params_for_summary(image_folder, output_path, paths, **kw) -> dict:
  digest = hashlib.sha1('\n'.join(os.path.relpath(p, image_folder) for p in paths).encode())
  return dict(
    image_folder=files.abspath(image_folder),
    num_images=len(paths),
    images_sha1=digest.hexdigest(),
    output=os.path.basename(output_path),
    **kw,
  )


def _make_optimizer(lr: float, steps: int, weight_decay: float):
  warmup = max(1, steps // 20)
  schedule = optax.warmup_cosine_decay_schedule(
    0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * 0.01
  )
  decay_mask = lambda p: jax.tree_util.tree_map(lambda x: x.ndim > 1, p)  # kernels only
  return optax.adamw(schedule, weight_decay=weight_decay, mask=decay_mask), schedule


def _fmt_eta(seconds: float) -> str:
  return time.strftime('%H:%M:%S', time.gmtime(max(0.0, seconds)))


def train_ssl_backbone(
  image_folder: str,
  output_path: str,
  *,
  backbone: str = DEFAULTS['backbone'],
  steps: int = DEFAULTS['steps'],
  batch_size: int = DEFAULTS['batch_size'],
  image_size: int = DEFAULTS['image_size'],
  seed: int = DEFAULTS['seed'],
  lr: float = DEFAULTS['lr'],
  temperature: float = DEFAULTS['temperature'],
  weight_decay: float = DEFAULTS['weight_decay'],
  log_every: int = 0,
  overwrite: bool = False,
) -> dict:
  """SimCLR pre-training of ``backbone`` on the images of ``image_folder``.

  Writes ``output_path`` (.npz, atomically: a torchvision-layout state dict for
  ``config.init.backbone_checkpoint``) and, beside it, ``summary.json`` (the returned
  dict) and ``loss_curve.png``. Skips the training when ``output_path`` exists and the
  summary's ``params`` match these arguments (and the folder's file list), unless
  ``overwrite``.

  Args: image_folder: root of the unlabeled images (any tree of .jpg/.png/...);
    output_path: the ``.npz`` to write; backbone: a RESNET_VARIANTS name; steps;
    batch_size: images per step (B; 2B views), capped at the number of images;
    image_size: side of the square views; seed; lr: peak AdamW learning rate
    (5% linear warm-up, cosine decay to 1%); temperature: NT-Xent temperature;
    weight_decay: AdamW decay of the kernels; log_every: steps between progress
    lines (0: about 20 lines).
  Returns: summary dict: final_loss (mean of the last 10 steps), first_loss,
    loss_history, steps, seconds (training loop, compile included), compile_seconds,
    steps_per_second (after the first step), total_seconds, retrieval_top1_before /
    _after and retrieval_chance, pos_cos / neg_cos _before / _after (see the module
    doc), params (what a rerun must match to be skipped); 'skipped': True if skipped.
  """
  from updetr_jax.data import list_image_files  # noqa: PLC0415 (imports TensorFlow)

  resnet_spec(backbone)  # validates the name
  if not str(output_path).endswith('.npz'):
    raise ValueError(f'output_path must end with .npz, got {output_path!r}')
  if steps < 1 or batch_size < 2 or image_size < 8:
    raise ValueError(
      f'need steps >= 1, batch_size >= 2, image_size >= 8; got {steps}, {batch_size}, {image_size}'
    )
  t_start = time.time()
  out_dir = os.path.dirname(files.abspath(output_path))
  summary_path = files.join(out_dir, SUMMARY_NAME)
  all_paths = list_image_files(image_folder)
  params_desc = _params_for_summary(
    image_folder,
    output_path,
    all_paths,
    backbone=backbone,
    steps=steps,
    batch_size=batch_size,
    image_size=image_size,
    seed=seed,
    lr=lr,
    temperature=temperature,
    weight_decay=weight_decay,
    method='simclr',
  )
  if not overwrite and files.exists(output_path) and files.exists(summary_path):
    old = files.read_json(summary_path)
    if old.get('params') == params_desc:
      logging.info('ssl: %s exists with the same parameters: skipped', output_path)
      return dict(old, skipped=True)
  t_load = time.time()
  images, paths = load_images(all_paths, image_size)
  if len(images) < 2:
    raise ValueError(f'{image_folder}: need at least 2 readable images, found {len(images)}')
  if batch_size > len(images):
    logging.warning(
      'ssl: batch_size %d > %d images: using %d', batch_size, len(images), len(images)
    )
    batch_size = len(images)
  logging.info(
    'ssl: %d images from %s (%.1fs); SimCLR %s, %d steps x %d images (%d views of %dpx)',
    len(images),
    image_folder,
    time.time() - t_load,
    backbone,
    steps,
    batch_size,
    2 * batch_size,
    image_size,
  )

  model = SimCLRNet(backbone_name=backbone)
  x0 = make_batch(images, batch_size, image_size, seed, 0)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(seed), x0[:2])
  variables = jax.tree_util.tree_map(jnp.asarray, dict(variables))
  tx, schedule = _make_optimizer(lr, steps, weight_decay)
  state = {
    'params': variables['params'],
    'batch_stats': variables['batch_stats'],
    'opt_state': tx.init(variables['params']),
  }

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state, views):
    def loss_fn(params):
      (_, z), new = model.apply(
        {'params': params, 'batch_stats': state['batch_stats']},
        views,
        train=True,
        mutable=['batch_stats'],
      )
      loss, stats = contrastive_stats(z, temperature)
      return loss, (new['batch_stats'], stats)

    (loss, (batch_stats, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    return (
      {'params': params, 'batch_stats': batch_stats, 'opt_state': opt_state},
      dict(stats, loss=loss),
    )

  @jax.jit
  def eval_stats(params, batch_stats, views):
    feat, _ = model.apply({'params': params, 'batch_stats': batch_stats}, views, train=False)
    return contrastive_stats(feat, temperature)[1]

  held_out = eval_batch(images, image_size, seed, EVAL_IMAGES)
  before = jax.device_get(eval_stats(state['params'], state['batch_stats'], held_out))

  log_every = log_every or max(1, steps // 20)
  history: list[dict] = []
  pending = []
  t0 = time.time()
  t_first = t_mark = None
  s_mark = 0
  batch = x0
  for step in range(steps):
    state, metrics = train_step(state, batch)
    pending.append(metrics)
    if step + 1 < steps:  # host augmentation overlaps the (asynchronous) step
      batch = make_batch(images, batch_size, image_size, seed, step + 1)
    if step == 0:
      jax.block_until_ready(metrics)
      t_first = t_mark = time.time()
      s_mark = 1
      logging.info('ssl: first step (compile) %.1fs', t_first - t0)
    if (step + 1) % log_every == 0 or step + 1 == steps:
      history += jax.device_get(pending)
      pending = []
      now = time.time()
      rate = (step + 1 - s_mark) / max(now - t_mark, 1e-9) if step + 1 > s_mark else 0.0
      m = history[-1]
      logging.info(
        'ssl step %d/%d  loss %.4f  top1 %.2f  lr %.2e  %.2f steps/s  ETA %s',
        step + 1,
        steps,
        m['loss'],
        m['top1'],
        float(schedule(step)),
        rate,
        _fmt_eta((steps - step - 1) / rate) if rate else '?',
      )
      t_mark, s_mark = now, step + 1
  t_end = time.time()  # the last progress line fetched the last step's metrics
  seconds = t_end - t0
  after = jax.device_get(eval_stats(state['params'], state['batch_stats'], held_out))
  final = {'params': state['params'], 'batch_stats': state['batch_stats']}

  files.makedirs(out_dir)
  files.write_npz(output_path, export_torchvision(jax.device_get(final)))
  losses = [float(h['loss']) for h in history]
  curve_path = files.join(out_dir, CURVE_NAME)
  try:
    from updetr_jax import visualize  # noqa: PLC0415 (matplotlib)

    visualize.plot_curves(
      curve_path,
      {'NT-Xent loss': (list(range(1, steps + 1)), losses)},
      title=f'SimCLR {backbone}, {len(images)} images',
    )
  except Exception as e:  # noqa: BLE001 (a plot is never worth failing the run)
    logging.warning('ssl: no loss curve: %s', e)
  n_eval = held_out.shape[0]
  timed = steps - 1
  summary = dict(
    params=params_desc,
    method='simclr',
    output=files.abspath(output_path),
    loss_curve=curve_path,
    num_images=len(images),
    batch_size=batch_size,
    steps=steps,
    seconds=round(seconds, 2),
    total_seconds=round(time.time() - t_start, 2),
    compile_seconds=round(t_first - t0, 2) if t_first else None,
    steps_per_second=round(timed / max(t_end - t_first, 1e-9), 3) if timed > 0 else None,
    first_loss=losses[0] if losses else None,
    final_loss=float(np.mean(losses[-min(10, len(losses)) :])) if losses else None,
    last_loss=losses[-1] if losses else None,
    retrieval_top1_before=float(before['top1']),
    retrieval_top1_after=float(after['top1']),
    retrieval_chance=1.0 / (n_eval - 1),
    pos_cos_before=float(before['pos_cos']),
    pos_cos_after=float(after['pos_cos']),
    neg_cos_before=float(before['neg_cos']),
    neg_cos_after=float(after['neg_cos']),
    loss_history=losses,
  )
  files.write_json(summary_path, summary)
  logging.info(
    'ssl: wrote %s in %.0fs: loss %.3f -> %.3f; held-out retrieval top-1 '
    '%.3f -> %.3f (chance %.3f)',
    output_path,
    seconds,
    summary['first_loss'],
    summary['final_loss'],
    summary['retrieval_top1_before'],
    summary['retrieval_top1_after'],
    summary['retrieval_chance'],
  )
  return summary


def main(argv):
  del argv
  from updetr_jax import cli  # noqa: PLC0415

  cli.setup_logging()
  from absl import flags  # noqa: PLC0415

  f = flags.FLAGS
  kw = {k: getattr(f, k) for k in DEFAULTS}
  summary = train_ssl_backbone(f.images, f.output, overwrite=f.overwrite, **kw)
  print({k: v for k, v in summary.items() if k not in ('loss_history', 'params')})


def _define_flags():
  from absl import flags  # noqa: PLC0415

  flags.DEFINE_string('images', None, 'folder of unlabeled images (searched recursively)')
  flags.DEFINE_string('output', None, '.npz to write (torchvision-layout state dict)')
  flags.DEFINE_string('backbone', DEFAULTS['backbone'], 'a RESNET_VARIANTS name')
  flags.DEFINE_integer('steps', DEFAULTS['steps'], 'training steps')
  flags.DEFINE_integer('batch_size', DEFAULTS['batch_size'], 'images per step (2 views each)')
  flags.DEFINE_integer('image_size', DEFAULTS['image_size'], 'side of the views (px)')
  flags.DEFINE_integer('seed', DEFAULTS['seed'], 'seed of the init and the augmentation')
  flags.DEFINE_float('lr', DEFAULTS['lr'], 'peak AdamW learning rate')
  flags.DEFINE_float('temperature', DEFAULTS['temperature'], 'NT-Xent temperature')
  flags.DEFINE_float('weight_decay', DEFAULTS['weight_decay'], 'AdamW weight decay (kernels)')
  flags.DEFINE_bool('overwrite', False, 'train even if the output exists with these params')
  flags.mark_flags_as_required(['images', 'output'])


def cli_main():
  """Console script ``updetr-ssl-backbone``."""
  from updetr_jax import cli  # noqa: PLC0415

  cli.run(main, _define_flags)


if __name__ == '__main__':
  cli_main()
