"""Stage 0: self-supervised (SimCLR) training of the CNN that the detector freezes.

UP-DETR freezes a self-supervised ResNet-50 (SwAV) loaded from a torchvision-layout
state dict. Where no such weights exist (the miniature benchmark, a new domain), this
task trains a ResNet of ``models/resnet.py`` (any ``RESNET_VARIANTS`` name) with
SimCLR on a folder of unlabeled images, under ``train.run`` (checkpoints, preemption,
progress, TensorBoard), and writes it in the torchvision / SwAV layout as
``workdir/backbone.npz``:

  conv1.weight [O, I, 7, 7], bn1.{weight,bias,running_mean,running_var},
  layer1.0.conv1.weight, ..., layer4.0.downsample.{0.weight,1.*},
  projection_head.{0,1,3}.*   (SwAV's head layout; the importer drops it)

so ``config.init.backbone_checkpoint=workdir/backbone.npz`` loads it exactly as SwAV
weights, with or without ``model.dilation``.

Method (SimCLR, Chen et al. 2020): two random views of each image: a random resized
crop (``data.crop_scale`` of the area, aspect ratio in ``data.crop_ratio``, as
torchvision's RandomResizedCrop) to ``data.view_size``, a horizontal flip (p 0.5),
colour jitter and grayscale (and blur, ``data.blur_prob``), ImageNet normalisation;
the ResNet's pooled C5 -> projection head Linear-BN-ReLU-Linear -> NT-Xent loss
(``loss.temperature``) over the 2B views. The network trains with real BatchNorm
(``ResNet(norm='batch')``: batch statistics, running averages with torch's momentum
0.1, learnable affine terms); the exported running statistics and affine terms become
the detector's frozen BatchNorm, so the detector's backbone computes the trained
network's evaluation-mode function.

Input: the host keeps the images as uint8 (each shrunk to fit ``data.max_size``) and
draws, seeded by (seed, step), the B images of a step, their crop boxes and flips; the
crops, flips and colour operations run on the device in the train step, with the
query patches' operations (``device_augment``). Deterministic given the seed, on any
mesh and after a restart.

Evaluation (no labels): top-1 retrieval accuracy of each view's partner among the
2N - 1 other views of a fixed set (two seeded views, never trained on, of each of the
first N = min(``eval.num_images``, #images) images), by cosine similarity of the
pooled C5 features in evaluation mode (what the detector gets); at step 0 the random
CNN. Chance is 1 / (2N - 1).
"""

from __future__ import annotations

import itertools
import math

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from updetr_jax import device_augment, files
from updetr_jax.data import planning, sources
from updetr_jax.models.resnet import ResNet, norm_layer, resnet_spec
from updetr_jax.tasks.base import TaskBase, format_metrics
from updetr_jax.torch_import import export_state_dict

BACKBONE_FILE = 'backbone.npz'


class SimCLRNet(nn.Module):
  """ResNet(norm='batch') (submodule ``backbone``) + SwAV-layout projection head
  (``projection_head_0`` Linear, ``_1`` BatchNorm, ReLU, ``_3`` Linear).

  Args (call, as the detectors): images [N, H, W, 3] normalised; padding_mask and
    patches ignored; train: batch statistics in the BatchNorms.
  Returns: {'features': pooled C5 [N, C], 'projections': [N, projection_dim]}, float32.
  """

  backbone: str = 'resnet_small'
  projection_dim: int = 128

  @nn.compact
  def __call__(self, images, padding_mask=None, patches=None, train: bool = False):
    del padding_mask, patches
    blocks, width = resnet_spec(self.backbone)
    body = ResNet(blocks=blocks, width=width, norm='batch', name='backbone')
    feat = body(images, train).mean(axis=(1, 2))
    h = nn.Dense(body.num_channels, name='projection_head_0')(feat)
    h = nn.relu(norm_layer('batch', train, 'projection_head_1')(h))
    return {
      'features': feat,
      'projections': nn.Dense(self.projection_dim, name='projection_head_3')(h),
    }


def export_torchvision(variables) -> dict[str, np.ndarray]:
  """SimCLRNet variables -> torchvision / SwAV-layout state dict (numpy float32)."""
  flat = {}
  for c in ('params', 'batch_stats'):
    tree = dict(variables[c])
    flat[c] = {**dict(tree.pop('backbone')), **tree}
  return export_state_dict(flat)


def contrastive_stats(z, temperature: float):
  """NT-Xent over 2B embeddings whose rows i and i + B are the two views of image i.

  Args: z [2B, D] float. Returns (loss scalar, {'top1': retrieval accuracy of the
  positive by cosine among the 2B - 1 others, 'pos_cos', 'neg_cos': mean cosines}).
  """
  z = z.astype(jnp.float32)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-8)
  n = z.shape[0]
  cos = jnp.matmul(z, z.T, precision=jax.lax.Precision.HIGHEST)
  eye = jnp.eye(n, dtype=bool)
  pos_idx = (jnp.arange(n) + n // 2) % n
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


def load_pool(folder: str, max_size: int, stats: planning.DataStats):
  """The usable images of ``folder`` (``data.sources``' index: corrupt, truncated and
  too small files are skipped and counted in ``stats``), each shrunk to fit
  ``max_size`` x ``max_size`` and zero-padded to it.

  Returns (images uint8 [N, S, S, 3], sizes int32 [N, 2] (valid h, w)).
  """
  source = sources.FolderSource(folder)
  stats.add_epoch(source.index.status)
  keep = np.flatnonzero(source.index.usable)
  if len(keep) < 2:
    raise ValueError(f'data.folder={folder!r}: need at least 2 readable images, found {len(keep)}')
  images = np.zeros((len(keep), max_size, max_size, 3), np.uint8)
  sizes = np.zeros((len(keep), 2), np.int32)
  for row, i in enumerate(keep):
    im = Image.fromarray(source.python_load(i))
    f = min(1.0, max_size / max(im.size))
    if f < 1:
      im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.BILINEAR)
    images[row, : im.height, : im.width] = np.asarray(im)
    sizes[row] = im.height, im.width
  return images, sizes


def crop_box(rng: np.random.Generator, h: int, w: int, scale, ratio) -> tuple[float, ...]:
  """torchvision's RandomResizedCrop box (x, y, w, h) in an h x w image."""
  for _ in range(10):
    target = h * w * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    cw, ch = np.sqrt(target * aspect), np.sqrt(target / aspect)
    if 0 < cw <= w and 0 < ch <= h:
      return rng.uniform(0, w - cw), rng.uniform(0, h - ch), cw, ch
  s = min(h, w)  # fallback: the central square
  return (w - s) / 2, (h - s) / 2, s, s


def view_batch(images, sizes, rows, rng: np.random.Generator, cfg) -> dict:
  """Images ``rows`` with two views each: images uint8 [B, S, S, 3], image_size
  [B, 2], patch_boxes float32 [B, 2, 4] (x, y, w, h), view_flips bool [B, 2],
  patch_seeds uint32 [B, 2]; every draw from ``rng``."""
  boxes = np.zeros((len(rows), 2, 4), np.float32)
  for v in range(2):
    for k, i in enumerate(rows):
      boxes[k, v] = crop_box(rng, *sizes[i], cfg.crop_scale, cfg.crop_ratio)
  return dict(
    images=images[rows],
    image_size=sizes[rows],
    patch_boxes=boxes,
    view_flips=rng.random((len(rows), 2)) < cfg.flip_prob,
    patch_seeds=rng.integers(0, 2**32, (len(rows), 2), dtype=np.uint32),
  )


def view_preparer(cfg, sharding=None, chunk: int = 1) -> device_augment.Preparer:
  """Host views (``view_batch``) -> the model's batch: images [2B, V, V, 3] normalised,
  rows i and i + B the two views of image i, padding_mask (none), targets {}. Crops,
  flips and colour augmentation on the device, each example with its own key
  (``device_augment.map_examples``)."""
  aug = device_augment.augment_kwargs({**cfg.to_dict(), 'patch_size': cfg.view_size})

  def one(image, boxes, flips, seed):
    x = device_augment.crop_patches(image[None], boxes[None], cfg.view_size)[0]
    x = jnp.where(flips[:, None, None, None], x[:, :, ::-1], x)
    x = device_augment.augment_patches(x, device_augment.patch_keys(seed[None])[0], **aug)
    return device_augment.normalize(x)

  def prepare(batch, sh, c):
    args = (batch['images'], batch['patch_boxes'], batch['view_flips'], batch['patch_seeds'])
    views = device_augment.map_examples(one, args, sharding=sh, chunk=c)
    views = jnp.concatenate([views[:, 0], views[:, 1]])
    return dict(images=views, padding_mask=jnp.zeros(views.shape[:3], bool), targets={})

  return device_augment.Preparer(prepare, sharding, chunk)


# ------------------------------------------------------------------------------ task


class SimCLRTask(TaskBase):
  """``config.task='simclr'`` (configs/ssl_backbone.py); see the module docstring."""

  evaluate_at_start = True  # the random CNN's retrieval figure
  trains_batch_stats = True

  def __init__(self, config, data_sharding):
    super().__init__(config, data_sharding)
    c = config
    if not c.data.folder:
      raise ValueError('config.data.folder is empty: --config.data.folder=DIR of unlabeled images')
    self.stats = planning.DataStats(f'folder:{c.data.folder}')
    self.images, self.sizes = load_pool(c.data.folder, c.data.max_size, self.stats)
    if c.batch_size > len(self.images):
      raise ValueError(
        f'config.batch_size={c.batch_size} > the {len(self.images)} readable images of '
        f'data.folder={c.data.folder!r} (a step draws distinct images)'
      )
    logging.info(
      'simclr: %d images from %s; %s, %d views of %d px per step',
      len(self.images),
      c.data.folder,
      c.model.backbone,
      2 * c.batch_size,
      c.data.view_size,
    )
    self._before = self._variables = self._eval = None

  def model(self):
    return SimCLRNet(self.config.model.backbone, self.config.model.projection_dim)

  def optimizer(self, trainable, steps_per_epoch: int):
    """AdamW, linear warm-up (``optim.warmup_fraction`` of the steps), cosine decay to
    ``optim.end_lr_fraction`` x lr; weight decay on kernels only."""
    del steps_per_epoch
    o, steps = self.config.optim, self.config.num_train_steps
    warmup = max(1, int(steps * o.warmup_fraction))
    schedule = optax.warmup_cosine_decay_schedule(
      0.0, o.lr, warmup, max(steps, warmup + 1), end_value=o.lr * o.end_lr_fraction
    )
    kernels = lambda p: jax.tree_util.tree_map(lambda x: x.ndim > 1, p)
    return optax.adamw(schedule, weight_decay=o.weight_decay, mask=kernels), {'lr': schedule}

  def criterion(self):
    temperature = self.config.loss.temperature
    return lambda out, targets: contrastive_stats(out['projections'], temperature)

  def examples_per_epoch(self) -> int:
    return len(self.images)

  def train_data(self, start: int):
    """Batch ``step``: ``batch_size`` distinct images drawn without replacement, seeded
    by (seed, step), and their views' draws (``view_batch``); this process's rows."""
    c, n = self.config, jax.process_count()
    rows = slice(
      jax.process_index() * c.batch_size // n, (jax.process_index() + 1) * c.batch_size // n
    )

    def batches():
      for step in itertools.count(start):
        rng = np.random.default_rng((c.seed, 1, step))
        chosen = rng.choice(len(self.images), size=c.batch_size, replace=False)
        batch = view_batch(self.images, self.sizes, chosen, rng, c.data)
        self.stats._add(batches=1, examples=c.batch_size // n)
        yield {k: v[rows] for k, v in batch.items()}

    return batches(), self.stats

  def device_inputs(self, train: bool):
    del train  # evaluation views are augmented too (evaluate)
    return view_preparer(self.config.data, self.sharding, self.config.data.patch_chunk)

  def evaluate(self, model, variables, step: int, workdir: str) -> dict:
    c = self.config
    n = min(c.eval.num_images, len(self.images))
    if self._eval is None:  # the fixed held-out views and their jitted statistics, once
      rng = np.random.default_rng((c.seed, 2))
      batch = view_batch(self.images, self.sizes, np.arange(n), rng, c.data)
      prepare = view_preparer(c.data, None, math.gcd(n, c.data.patch_chunk))

      @jax.jit
      def stats(variables, batch):
        feat = model.apply(variables, prepare(batch)['images'], train=False)['features']
        return contrastive_stats(feat, c.loss.temperature)[1]

      self._eval = (stats, batch)
    stats, batch = self._eval
    metrics = {k: float(v) for k, v in jax.device_get(stats(variables, batch)).items()}
    metrics = {'retrieval_top1': metrics.pop('top1'), **metrics}
    logging.info('simclr step %d: held-out %s', step, format_metrics(metrics, 3))
    if self._before is None:
      self._before = metrics
    self._variables = variables
    return metrics

  def finish(self, metrics: dict, step: int, workdir: str) -> dict:
    """Writes ``workdir/backbone.npz``; the retrieval figures before and after."""
    path = files.join(workdir, BACKBONE_FILE)
    if jax.process_index() == 0:
      files.write_npz(path, export_torchvision(jax.device_get(self._variables)))
    n = min(self.config.eval.num_images, len(self.images))
    out = {'backbone': path, 'num_images': len(self.images), 'retrieval_chance': 1 / (2 * n - 1)}
    for when, m in (('before', self._before), ('after', metrics)):
      out.update({f'{k}_{when}': v for k, v in m.items()})
    before, after = out['retrieval_top1_before'], out['retrieval_top1_after']
    logging.info('simclr: wrote %s; held-out retrieval %.3f -> %.3f', path, before, after)
    return out
