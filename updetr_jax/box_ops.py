"""Bounding-box utilities (float32, jittable, broadcasting over leading dims).

Boxes are ``[..., 4]`` arrays, either ``(cx, cy, w, h)`` or ``(x0, y0, x1, y1)``.
Pairwise quantities follow the broadcasting convention: to compare every box of
``a [..., N, 4]`` with every box of ``b [..., M, 4]`` call
``box_iou(a[..., :, None, :], b[..., None, :, :])`` to get ``[..., N, M]``.

Unlike the PyTorch release (which asserts ``x1 >= x0`` and crashes on degenerate
predictions), these functions accept any finite boxes: widths and heights are
clamped at zero when computing areas and intersections, and the only divisions
whose denominator can be zero (union, enclosing area) are guarded so that values
and gradients stay finite. For boxes with positive area the results equal the
plain formulas.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = [
  'box_cxcywh_to_xyxy',
  'box_xyxy_to_cxcywh',
  'box_area',
  'box_iou',
  'generalized_box_iou',
]


def _unstack(b):
  b = jnp.asarray(b, jnp.float32)
  return b[..., 0], b[..., 1], b[..., 2], b[..., 3]


def box_cxcywh_to_xyxy(b):
  """``(cx, cy, w, h) -> (x0, y0, x1, y1)``."""
  cx, cy, w, h = _unstack(b)
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(b):
  """``(x0, y0, x1, y1) -> (cx, cy, w, h)``."""
  x0, y0, x1, y1 = _unstack(b)
  return jnp.stack([0.5 * (x0 + x1), 0.5 * (y0 + y1), x1 - x0, y1 - y0], axis=-1)


def _rect_area(x0, y0, x1, y1):
  """Area of a rectangle from its corners, 0 when inverted."""
  return jnp.maximum(x1 - x0, 0.0) * jnp.maximum(y1 - y0, 0.0)


def box_area(b):
  """Area of xyxy boxes; inverted boxes (x1 < x0 or y1 < y0) have area 0."""
  return _rect_area(*_unstack(b))


def _safe_div(num, den):
  """``num / den`` where ``den >= 0``; 0 where ``den == 0`` (finite gradients)."""
  pos = den > 0
  return jnp.where(pos, num / jnp.where(pos, den, 1.0), 0.0)


def _iou_parts(a, b):
  # Coordinates are split before broadcasting so that pairwise calls
  # ([..., N, 1, 4] vs [..., 1, M, 4]) work on [..., N, M] planes.
  ax0, ay0, ax1, ay1 = _unstack(a)
  bx0, by0, bx1, by1 = _unstack(b)
  inter = _rect_area(
    jnp.maximum(ax0, bx0), jnp.maximum(ay0, by0), jnp.minimum(ax1, bx1), jnp.minimum(ay1, by1)
  )
  union = _rect_area(ax0, ay0, ax1, ay1) + _rect_area(bx0, by0, bx1, by1) - inter
  return inter, union


def box_iou(a, b):
  """Elementwise (broadcasting) IoU of xyxy boxes.

  Returns ``(iou, union)``, both with the broadcast leading shape. ``iou`` is 0
  when the union is empty (both boxes of zero area).
  """
  inter, union = _iou_parts(a, b)
  return _safe_div(inter, union), union


def generalized_box_iou(a, b):
  """Elementwise (broadcasting) generalized IoU of xyxy boxes.

  ``giou = iou - (area_c - union) / area_c`` with ``area_c`` the area of the
  smallest enclosing box. In ``[-1, 1]`` for valid boxes; finite for any finite
  boxes (the enclosing-area term is 0 when ``area_c == 0``).
  """
  inter, union = _iou_parts(a, b)
  iou = _safe_div(inter, union)
  ax0, ay0, ax1, ay1 = _unstack(a)
  bx0, by0, bx1, by1 = _unstack(b)
  area_c = _rect_area(
    jnp.minimum(ax0, bx0), jnp.minimum(ay0, by0), jnp.maximum(ax1, bx1), jnp.maximum(ay1, by1)
  )
  return iou - _safe_div(area_c - union, area_c)
