"""Evaluation metrics.

Pre-training: how well each query patch is found. For patch j the prediction is the
box of the query in patch j's group with the highest "is the patch" probability
(no matching needed), scored by IoU against the patch's true box.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from updetr_jax import box_ops


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


def patch_iou(outputs, targets, num_patches: int):
  """IoU [B, M] of each patch's best predicted box with its true box (0 where padded)."""
  boxes, _ = patch_predictions(outputs, num_patches)
  iou, _ = box_ops.box_iou(box_ops.box_cxcywh_to_xyxy(boxes),
                           box_ops.box_cxcywh_to_xyxy(targets['boxes']))
  return jnp.where(targets['mask'], iou, 0.0)
