"""Evaluation metrics.

Pre-training: how well each query patch is found, as IoU with the patch's true box,
for two choices of "the" prediction of patch j:
  * matched: the query the DETR Hungarian matcher assigns to patch j (the
    prediction the loss trains; uses the true boxes to choose, like DETR's
    training metrics);
  * group top: the query of patch j's group with the highest "is the patch"
    probability (no ground truth used; needs a class head that has learned to rank
    the queries of a group, which takes far longer than localisation).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from updetr_jax import box_ops, matching


def patch_predictions(outputs, num_patches: int):
  """Best query of each patch group.

  Args: outputs with pred_logits [B, N, C+1], pred_boxes [B, N, 4]; the N queries
    form num_patches groups of N / num_patches consecutive queries.
  Returns: boxes [B, M, 4] cxcywh, scores [B, M] (softmax prob of class 1).
  """
  logits, boxes = outputs['pred_logits'], outputs['pred_boxes']
  b, n, _ = logits.shape
  g = n // num_patches
  score = jax.nn.softmax(logits, axis=-1)[..., 1].reshape(b, num_patches, g)
  best = jnp.argmax(score, axis=-1)  # [B, M]
  boxes = boxes.reshape(b, num_patches, g, 4)
  picked = jnp.take_along_axis(boxes, best[..., None, None], axis=2)[:, :, 0]
  return picked, jnp.max(score, axis=-1)


def _iou_with_targets(boxes, targets):
  iou, _ = box_ops.box_iou(box_ops.box_cxcywh_to_xyxy(boxes),
                           box_ops.box_cxcywh_to_xyxy(targets['boxes']))
  return jnp.where(targets['mask'], iou, 0.0)


def patch_iou(outputs, targets, num_patches: int):
  """IoUs [B, M] with each patch's true box (0 where padded).

  Returns {'matched': ..., 'group_top': ...} (see the module docstring).
  """
  top, _ = patch_predictions(outputs, num_patches)
  idx = matching.hungarian_match(outputs, targets)  # [B, M]
  matched = jnp.take_along_axis(outputs['pred_boxes'], jnp.maximum(idx, 0)[..., None], axis=1)
  return {'matched': _iou_with_targets(matched, targets),
          'group_top': _iou_with_targets(top, targets)}
