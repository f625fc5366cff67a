"""DETR set criterion with the UP-DETR feature-reconstruction term.

All layers (final + auxiliary decoder outputs) are stacked and matched in one
batched call of the solver; every layer is still matched independently, exactly
as the PyTorch release re-runs its matcher per auxiliary output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from updetr_jax import box_ops
from updetr_jax.matching import hungarian_match

__all__ = ['set_criterion', 'l2_normalize']


def l2_normalize(x, axis=-1, eps=1e-12):
  """``x / max(||x||, eps)`` like ``torch.nn.functional.normalize``.

  Written as ``x / sqrt(max(||x||^2, eps^2))`` so that the gradient is finite
  (``1/eps``) at ``x = 0`` as in torch."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * lax.rsqrt(jnp.maximum(sq, eps * eps))


def _gather_queries(x, idx):
  """``x [L, B, N, ...]`` at ``idx [L, B, M]`` (clipped) -> ``[L, B, M, ...]``."""
  idx = jnp.clip(idx, 0, x.shape[2] - 1)
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 3))
  return jnp.take_along_axis(x, idx, axis=2)


def set_criterion(
  outputs,
  targets,
  *,
  num_classes,
  eos_coef=0.1,
  weight_ce=1.0,
  weight_bbox=5.0,
  weight_giou=2.0,
  weight_feature=1.0,
  feature_recon=False,
  solver='exact',
  num_replicas=1,
  cost_class=1.0,
  cost_bbox=5.0,
  cost_giou=2.0,
  match_groups=0,
):
  """DETR / UP-DETR training loss.

  Args:
    outputs: dict with ``pred_logits [B, N, C+1]`` (last index = no object),
      ``pred_boxes [B, N, 4]`` (normalized cxcywh), optionally
      ``pred_feature [B, N, D]`` and ``gt_feature [B, M, D]`` (UP-DETR: target
      ``j`` is patch ``j``), and optionally ``aux_outputs``: a list of dicts with
      the same per-layer keys for the intermediate decoder layers.
    targets: dict with ``labels [B, M]`` int32, ``boxes [B, M, 4]`` (normalized
      cxcywh) and ``mask [B, M]`` bool (True = real target).
    num_classes: C; the no-object class is index C.
    eos_coef: class weight of no-object in the cross-entropy.
    weight_*: loss weights of the terms (applied to every layer).
    feature_recon: add the UP-DETR feature-reconstruction loss (needs
      ``pred_feature`` and ``gt_feature``).
    solver: matching solver, ``'exact'`` (pure JAX) or ``'scipy'``.
    num_replicas: emulate PyTorch data parallelism over this many devices.
    cost_*: matcher cost weights (DETR's ``set_cost_*``).
    match_groups: 0 = DETR's matching over all N queries (the release); G > 0 =
      target j only matched within query group j (``hungarian_match(num_groups)``).

  Returns:
    ``(loss, terms)``: the total weighted loss (scalar) and a dict of
    unweighted terms: ``loss_ce``, ``loss_bbox``, ``loss_giou`` (and
    ``loss_feature``) for the final layer, the same with suffix ``_i`` for
    auxiliary layer ``i``, and ``class_error`` (100 - accuracy of the matched
    queries' argmax class on the final layer; logged only, not in the loss).

  Definitions (per layer; each layer gets its own Hungarian matching):
    * ``loss_ce``: softmax cross-entropy over the C+1 classes, unmatched queries
      labelled no-object; class weight ``eos_coef`` for no-object and 1
      otherwise; weighted mean ``sum(w * nll) / sum(w)`` (torch
      ``F.cross_entropy(weight=...)``), not divided by the number of boxes.
    * ``num_boxes = max(G / num_replicas, 1)`` with ``G`` the number of real
      targets in the whole batch.
    * ``loss_bbox = sum |pred - tgt|`` (cxcywh, matched pairs) / num_boxes.
    * ``loss_giou = sum (1 - GIoU)`` / num_boxes.
    * ``loss_feature = sum ||n(pred_feature_i) - n(gt_feature_j)||^2`` over
      matched pairs ``(i, j)`` / num_boxes, ``n`` = L2 normalisation (eps
      1e-12); the gradient reaches ``gt_feature`` too, as in the release (it
      trains the CNN when the CNN is not frozen).

  Data parallelism (``num_replicas = R > 1``) reproduces the PyTorch release
  run on R devices, each holding ``B / R`` consecutive images (B must be
  divisible by R), whose gradients are averaged: the cross-entropy weighted
  mean is taken per chunk and the chunk values are averaged; the box and
  feature losses divide each chunk's sum by the global ``num_boxes`` and are
  averaged over chunks, i.e. ``total_sum / (R * num_boxes)``; ``class_error``
  is averaged over chunks too. With R = 1 this is the single-device loss.
  """
  if num_replicas < 1:
    raise ValueError(f'num_replicas must be >= 1, got {num_replicas}')
  if solver not in ('exact', 'scipy'):
    raise ValueError(f"unknown matching solver {solver!r}; expected 'exact' or 'scipy'")
  layers = [outputs] + list(outputs.get('aux_outputs', ()))
  if feature_recon and (
    any('pred_feature' not in o for o in layers) or 'gt_feature' not in outputs
  ):
    raise ValueError(
      "feature_recon=True needs 'pred_feature' in every layer's outputs and 'gt_feature' in outputs"
    )
  names = [''] + [f'_{i}' for i in range(len(layers) - 1)]
  logits = jnp.stack([jnp.asarray(o['pred_logits'], jnp.float32) for o in layers])
  boxes = jnp.stack([jnp.asarray(o['pred_boxes'], jnp.float32) for o in layers])
  n_layers, batch, n_queries, n_logits = logits.shape
  if n_logits != num_classes + 1:
    raise ValueError(
      f'pred_logits has {n_logits} logits, expected num_classes + 1 = {num_classes + 1}'
    )
  if batch % num_replicas:
    raise ValueError(f'batch size {batch} is not divisible by num_replicas={num_replicas}')
  labels = jnp.asarray(targets['labels'], jnp.int32)
  tgt_boxes = jnp.asarray(targets['boxes'], jnp.float32)
  mask = jnp.asarray(targets['mask'], bool)

  # ---- matching: all layers in one batched solve ------------------------------
  query_idx = hungarian_match(
    {'pred_logits': logits, 'pred_boxes': boxes},
    {'labels': labels, 'boxes': tgt_boxes, 'mask': mask},
    solver=solver,
    cost_class=cost_class,
    cost_bbox=cost_bbox,
    cost_giou=cost_giou,
    num_groups=match_groups,
  )  # [L, B, M]
  matched = mask[None] & (query_idx >= 0)  # [L, B, M]

  num_boxes = jnp.maximum(jnp.sum(mask).astype(jnp.float32) / num_replicas, 1.0)
  chunk = batch // num_replicas

  def per_chunk_sum(x):  # [l, B, ...] -> [l, R]
    x = x.reshape((x.shape[0], num_replicas, chunk, -1))
    return jnp.sum(x, axis=(2, 3))

  def box_loss(per_target):  # [L, B, M] -> [L]; sum / (R * num_boxes)
    total = jnp.sum(jnp.where(matched, per_target, 0.0), axis=(1, 2))
    return total / (num_replicas * num_boxes)

  # ---- classification -----------------------------------------------------------
  # Target class of every query: the matched target's label, else no-object.
  hit = matched[..., None, :] & (query_idx[..., None, :] == jnp.arange(n_queries)[:, None])
  is_matched = jnp.any(hit, axis=-1)  # [L, B, N]
  q_label = jnp.sum(jnp.where(hit, labels[None, :, None, :], 0), axis=-1)
  tgt_cls = jnp.where(is_matched, q_label, num_classes)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, tgt_cls[..., None], axis=-1)[..., 0]  # [L, B, N]
  w = jnp.where(tgt_cls == num_classes, eos_coef, 1.0)
  loss_ce = jnp.mean(per_chunk_sum(w * nll) / per_chunk_sum(w), axis=1)  # [L]

  # ---- boxes ----------------------------------------------------------------------
  src = _gather_queries(boxes, query_idx)  # [L, B, M, 4]
  safe = jnp.array([0.5, 0.5, 1.0, 1.0], jnp.float32)
  tgt = jnp.where(matched[..., None], tgt_boxes[None], safe)
  src = jnp.where(matched[..., None], src, safe)
  loss_bbox = box_loss(jnp.sum(jnp.abs(src - tgt), axis=-1))
  giou = box_ops.generalized_box_iou(
    box_ops.box_cxcywh_to_xyxy(src), box_ops.box_cxcywh_to_xyxy(tgt)
  )
  loss_giou = box_loss(1.0 - giou)

  terms = {}
  per_layer = {'loss_ce': loss_ce, 'loss_bbox': loss_bbox, 'loss_giou': loss_giou}
  weights = {'loss_ce': weight_ce, 'loss_bbox': weight_bbox, 'loss_giou': weight_giou}

  # ---- UP-DETR feature reconstruction ---------------------------------------------
  if feature_recon:
    feats = jnp.stack([jnp.asarray(o['pred_feature'], jnp.float32) for o in layers])
    # No stop-gradient on the target (the release's behaviour): it matters only when
    # the CNN trains (a frozen CNN's weights are not differentiated).
    gt = jnp.asarray(outputs['gt_feature'], jnp.float32)  # [B, M, D]
    src_f = l2_normalize(_gather_queries(feats, query_idx))  # [L, B, M, D]
    diff = src_f - l2_normalize(gt)[None]
    per_layer['loss_feature'] = box_loss(jnp.sum(jnp.square(diff), axis=-1))
    weights['loss_feature'] = weight_feature

  loss = jnp.zeros((), jnp.float32)
  for key, value in per_layer.items():
    loss = loss + weights[key] * jnp.sum(value)
    for li, suffix in enumerate(names):
      terms[key + suffix] = value[li]

  # ---- class error (final layer, logged only) -------------------------------------
  final_logits = lax.stop_gradient(logits[0])  # [B, N, C+1]
  pred_cls = jnp.argmax(_gather_queries(final_logits[None], query_idx[:1])[0], axis=-1)
  correct = matched[0] & (pred_cls == labels)  # [B, M]
  n_correct = per_chunk_sum(correct[None].astype(jnp.float32))[0]
  n_matched = per_chunk_sum(matched[:1].astype(jnp.float32))[0]
  acc = jnp.where(n_matched > 0, 100.0 * n_correct / jnp.maximum(n_matched, 1.0), 0.0)
  terms['class_error'] = jnp.mean(100.0 - acc)
  return loss, terms
