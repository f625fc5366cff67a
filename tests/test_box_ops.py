import jax
import jax.numpy as jnp
import numpy as np

from updetr_jax import box_ops


def _np_xyxy(b):
  cx, cy, w, h = np.moveaxis(b, -1, 0)
  return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def _np_pairwise(a, b):
  """Plain per-pair formulas (PyTorch release semantics, valid boxes)."""
  iou = np.zeros((len(a), len(b)))
  union = np.zeros_like(iou)
  giou = np.zeros_like(iou)
  for i, p in enumerate(a):
    for j, q in enumerate(b):
      area_p = (p[2] - p[0]) * (p[3] - p[1])
      area_q = (q[2] - q[0]) * (q[3] - q[1])
      iw = max(min(p[2], q[2]) - max(p[0], q[0]), 0)
      ih = max(min(p[3], q[3]) - max(p[1], q[1]), 0)
      inter = iw * ih
      u = area_p + area_q - inter
      cw = max(p[2], q[2]) - min(p[0], q[0])
      ch = max(p[3], q[3]) - min(p[1], q[1])
      c = cw * ch
      union[i, j] = u
      iou[i, j] = inter / u
      giou[i, j] = inter / u - (c - u) / c
  return iou, union, giou


def _random_cxcywh(rng, n):
  ctr = rng.uniform(0.1, 0.9, (n, 2))
  wh = rng.uniform(0.01, 0.6, (n, 2))
  return np.concatenate([ctr, wh], -1).astype(np.float32)


def test_conversions_roundtrip_and_area():
  rng = np.random.default_rng(0)
  b = _random_cxcywh(rng, 64).reshape(4, 16, 4)
  xyxy = box_ops.box_cxcywh_to_xyxy(b)
  np.testing.assert_allclose(xyxy, _np_xyxy(b), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(box_ops.box_xyxy_to_cxcywh(xyxy), b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(box_ops.box_area(xyxy), b[..., 2] * b[..., 3], rtol=1e-5, atol=1e-7)
  assert xyxy.dtype == jnp.float32 and xyxy.shape == (4, 16, 4)


def test_pairwise_iou_giou_match_plain_formulas():
  rng = np.random.default_rng(1)
  a = _np_xyxy(_random_cxcywh(rng, 13))
  b = _np_xyxy(_random_cxcywh(rng, 7))
  b[0] = a[0]  # identical boxes
  b[1] = [0.0, 0.0, 0.05, 0.05]  # likely disjoint
  iou_ref, union_ref, giou_ref = _np_pairwise(a.astype(np.float64), b.astype(np.float64))
  iou, union, giou = jax.jit(
    lambda x, y: box_ops.box_iou(x, y) + (box_ops.generalized_box_iou(x, y),)
  )(a[:, None, :], b[None, :, :])
  assert iou.shape == (13, 7) and giou.shape == (13, 7)
  np.testing.assert_allclose(iou, iou_ref, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(union, union_ref, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(giou, giou_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(giou[0, 0], 1.0, rtol=1e-6)
  assert np.all(giou <= 1 + 1e-6) and np.all(giou >= -1 - 1e-6)
  # Elementwise with broadcasting over extra leading dims.
  g2 = box_ops.generalized_box_iou(a[None, :7], b[None])
  np.testing.assert_allclose(g2[0], np.diag(giou_ref[:7, :7]), rtol=1e-5, atol=1e-6)


DEGENERATE = np.array(
  [
    [0.3, 0.3, 0.3, 0.3],  # a point
    [0.3, 0.3, 0.3, 0.3],  # the same point
    [0.2, 0.2, 0.2, 0.6],  # zero width
    [0.6, 0.6, 0.2, 0.2],  # inverted
    [0.1, 0.1, 0.5, 0.5],  # a normal box
    [0.0, 0.0, 0.0, 0.0],  # all zeros
  ],
  np.float32,
)


def test_degenerate_boxes_finite_values():
  @jax.jit
  def f(a, b):
    return box_ops.box_iou(a, b) + (box_ops.generalized_box_iou(a, b),)

  iou, union, giou = f(DEGENERATE[:, None, :], DEGENERATE[None, :, :])
  for x in (iou, union, giou, box_ops.box_area(DEGENERATE)):
    assert np.all(np.isfinite(x))
  assert np.all(box_ops.box_area(DEGENERATE) >= 0)
  assert np.all((giou >= -1 - 1e-6) & (giou <= 1 + 1e-6))
  # inverted box has zero area, and the normal box still behaves normally
  assert float(box_ops.box_area(DEGENERATE[3])) == 0.0
  np.testing.assert_allclose(giou[4, 4], 1.0)


def test_degenerate_boxes_finite_gradients():
  cxcywh = np.array(
    [
      [0.3, 0.3, 0.0, 0.0],
      [0.5, 0.5, 0.0, 0.2],
      [0.5, 0.5, -0.1, -0.1],
      [0.0, 0.0, 0.0, 0.0],
      [0.4, 0.4, 0.2, 0.2],
      [0.4, 0.4, 0.2, 0.2],
    ],
    np.float32,
  )

  def f(xyxy, cxcy):
    boxes = jnp.concatenate([xyxy, box_ops.box_cxcywh_to_xyxy(cxcy)])
    giou = box_ops.generalized_box_iou(boxes[:, None], boxes[None])  # every pair
    _, union = box_ops.box_iou(boxes[:, None], boxes[None])
    return jnp.sum(giou) + 0.1 * jnp.sum(union)

  grads = jax.jit(jax.grad(f, argnums=(0, 1)))(DEGENERATE, cxcywh)
  for x in grads:
    assert np.all(np.isfinite(x))
