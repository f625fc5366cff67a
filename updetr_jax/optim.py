"""Optimizer: AdamW with global-norm clipping, step decay, frozen and backbone groups.

Parameters are split by path (``'body/layer1_0/conv1/kernel'``) into
  * frozen: regexes in ``optim.frozen`` -- no gradient, no optimizer state;
  * backbone: ``body/...`` (the CNN) and ``position/...`` (the learned position
    embedding's ``row_embed`` / ``col_embed``) not frozen -- learning rate
    ``optim.lr_backbone``. The release puts every parameter whose name contains
    ``backbone`` in this group, and its position embedding lives in the backbone
    (``backbone.1.row_embed``): frozen in pre-training, lr_backbone in fine-tuning;
  * the rest -- learning rate ``optim.lr``.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import optax
from flax import traverse_util


# Top-level parameter modules of the release's ``backbone`` (CNN + position embedding).
BACKBONE_MODULES = ('body', 'position')


def _path(p: tuple) -> str:
  return '/'.join(p)


def partition_params(params, frozen: Sequence[str]):
  """Splits params into (trainable, frozen) nested dicts by regex on the path."""
  flat = traverse_util.flatten_dict(params)
  pats = [re.compile(f) for f in frozen]
  is_frozen = {k: any(p.match(_path(k)) for p in pats) for k in flat}
  trainable = {k: v for k, v in flat.items() if not is_frozen[k]}
  fixed = {k: v for k, v in flat.items() if is_frozen[k]}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(fixed)


def merge_params(trainable, frozen):
  flat = traverse_util.flatten_dict(trainable)
  flat.update(traverse_util.flatten_dict(frozen))
  return traverse_util.unflatten_dict(flat)


def lr_schedule(
  base_lr: float, steps_per_epoch: int, lr_drop_epochs: Sequence[int], gamma: float = 0.1
):
  """Step decay: lr x gamma at each epoch in lr_drop_epochs (the release's StepLR)."""
  boundaries = {int(e * steps_per_epoch): gamma for e in lr_drop_epochs if e > 0}
  return optax.piecewise_constant_schedule(base_lr, boundaries)


def make_optimizer(optim_config, trainable_params, steps_per_epoch: int):
  """AdamW (torch defaults: b1 .9, b2 .999, eps 1e-8) on the trainable params.

  Weight decay applies to every trainable parameter, as torch.optim.AdamW does.
  Returns (optax transform, {'lr': schedule, 'lr_backbone': schedule}).
  """
  drops = list(optim_config.lr_drop_epochs)
  sched = {
    'lr': lr_schedule(optim_config.lr, steps_per_epoch, drops),
    'lr_backbone': lr_schedule(optim_config.lr_backbone, steps_per_epoch, drops),
  }
  labels = traverse_util.path_aware_map(
    lambda p, _: 'lr_backbone' if p[0] in BACKBONE_MODULES else 'lr', trainable_params
  )
  tx = optax.chain(
    optax.clip_by_global_norm(optim_config.clip_max_norm)
    if optim_config.clip_max_norm > 0
    else optax.identity(),
    optax.multi_transform(
      {name: optax.adamw(s, weight_decay=optim_config.weight_decay) for name, s in sched.items()},
      labels,
    ),
  )
  return tx, sched


def count_params(tree) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(tree))
