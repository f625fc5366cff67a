import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment as scipy_lsa

from updetr_jax.matching import (
  hungarian_match,
  linear_sum_assignment,
  match_cost,
  scipy_linear_sum_assignment,
)

lsa_jit = jax.jit(linear_sum_assignment)
match_cost_jit = jax.jit(match_cost)


def _check(cost, mask, q, rtol=1e-5):
  """Validity + optimality of ``q [P, M]`` against scipy on every problem."""
  cost = np.asarray(cost, np.float64)
  mask = np.broadcast_to(np.asarray(mask, bool), cost.shape[:-2] + cost.shape[-1:])
  q = np.asarray(q)
  n, m = cost.shape[-2:]
  cost, mask, q = cost.reshape(-1, n, m), mask.reshape(-1, m), q.reshape(-1, m)
  for p in range(cost.shape[0]):
    cols = np.nonzero(mask[p])[0]
    assert np.all(q[p][~mask[p]] == -1), 'padded target got a query'
    got_q = q[p][cols]
    ok = got_q >= 0
    assert ok.sum() == min(n, cols.size), 'wrong number of matched targets'
    assert len(set(got_q[ok].tolist())) == ok.sum(), 'query used twice'
    assert np.all(got_q < n)
    if cols.size == 0:
      continue
    r, c = scipy_lsa(cost[p][:, cols])
    ref = cost[p][:, cols][r, c].sum()
    got = cost[p][got_q[ok], cols[ok]].sum()
    scale = max(1.0, np.abs(cost[p][:, cols]).max() * cols.size)
    assert abs(got - ref) <= rtol * scale, (p, got, ref)


# Few distinct shapes: every new shape costs a compilation of the solver.
L_A, P_A, N_A, M_A = 3, 300, 12, 8


def _random_costs(rng, shape):
  """Continuous costs at several scales, integer costs with ties, 0/1 costs."""
  p = shape[0]
  kind = rng.integers(0, 3, size=(p,) + (1,) * (len(shape) - 1))
  scale = rng.choice([0.01, 1.0, 100.0], size=kind.shape)
  cost = np.where(
    kind == 0,
    rng.normal(size=shape) * scale,
    np.where(kind == 1, rng.integers(-3, 4, size=shape), rng.integers(0, 2, size=shape)),
  )
  return cost.astype(np.float32)


def _random_masks(rng, p, m):
  mask = rng.random((p, m)) < rng.uniform(0, 1, size=(p, 1))  # densities 0..1
  mask[0] = True
  mask[1] = False  # all padded
  return mask


@pytest.fixture(scope='module')
def problems_a():
  rng = np.random.default_rng(0)
  cost = _random_costs(rng, (L_A * P_A, N_A, M_A)).reshape(L_A, P_A, N_A, M_A)
  mask = _random_masks(rng, P_A, M_A)
  return cost, mask, lsa_jit(cost, mask)


def test_matches_scipy_with_ties_and_padding(problems_a):
  """900 problems (N=12, M=8): random masks, ties, all-padded, all-real."""
  cost, mask, q = problems_a
  assert q.shape == (L_A, P_A, M_A) and q.dtype == jnp.int32
  _check(cost, mask, q)


@pytest.mark.parametrize('n,m', [(9, 9), (6, 11)])  # M == N; M > N
def test_matches_scipy_square_and_wide(n, m):
  rng = np.random.default_rng(n * 100 + m)
  cost = _random_costs(rng, (P_A, n, m))
  mask = _random_masks(rng, P_A, m)
  q = lsa_jit(cost, mask)
  assert q.shape == (P_A, m)
  _check(cost, mask, q)


def test_zero_targets_and_degenerate_shapes():
  cost = np.zeros((3, 4, 0), np.float32)
  assert linear_sum_assignment(cost, np.zeros((3, 0), bool)).shape == (3, 0)
  q = linear_sum_assignment(np.zeros((2, 0, 3), np.float32), np.ones((2, 3), bool))
  np.testing.assert_array_equal(q, -1)


def test_extra_leading_dims_and_vmap_equal_per_layer(problems_a):
  cost, mask, full = problems_a
  per_layer = np.stack([np.asarray(lsa_jit(cost[l], mask)) for l in range(L_A)])
  np.testing.assert_array_equal(full, per_layer)
  # vmap down to single problems (no leading dims inside)
  vm = jax.jit(jax.vmap(jax.vmap(linear_sum_assignment), in_axes=(0, None)))(cost, mask)
  np.testing.assert_array_equal(vm, full)


def test_scipy_callback_equals_exact():
  rng = np.random.default_rng(4)
  cost = rng.normal(size=(L_A, P_A, N_A, M_A)).astype(np.float32)
  mask = _random_masks(rng, P_A, M_A)
  q_exact = lsa_jit(cost, mask)
  q_scipy = jax.jit(scipy_linear_sum_assignment)(cost, mask)
  # continuous random costs: the optimum is unique
  np.testing.assert_array_equal(q_scipy, q_exact)
  vm = jax.jit(jax.vmap(scipy_linear_sum_assignment, in_axes=(0, None)))(cost, mask)
  np.testing.assert_array_equal(vm, q_exact)
  # M > N
  cost = rng.normal(size=(7, 4, 9)).astype(np.float32)
  mask = rng.random((7, 9)) < 0.7
  q_scipy = scipy_linear_sum_assignment(cost, mask)
  _check(cost, mask, q_scipy)


@pytest.mark.parametrize('n,m_real,m_pad', [(N_A, 5, M_A - 5), (6, 7, 11 - 7)])
def test_padding_never_displaces_real_targets(n, m_real, m_pad):
  rng = np.random.default_rng(5)
  p = P_A
  real = rng.normal(size=(p, n, m_real)).astype(np.float32)
  ref_cost = None
  for fill in (-1e6, -5.0, 0.0, 1e6, 'random', 'nan'):
    if fill == 'random':
      pad = rng.normal(size=(p, n, m_pad)) * 100
    elif fill == 'nan':
      pad = np.full((p, n, m_pad), np.nan)
    else:
      pad = np.full((p, n, m_pad), fill)
    pad = pad.astype(np.float32)
    cost = np.concatenate([pad[..., :2], real, pad[..., 2:]], -1)  # pads on both sides
    mask = np.concatenate(
      [np.zeros((p, 2), bool), np.ones((p, m_real), bool), np.zeros((p, m_pad - 2), bool)], -1
    )
    q = np.asarray(lsa_jit(cost, mask))
    assert np.all(q[:, :2] == -1) and np.all(q[:, 2 + m_real :] == -1)
    qr = q[:, 2 : 2 + m_real]
    assert np.all((qr >= 0).sum(-1) == min(n, m_real))
    got = np.where(
      qr >= 0, np.take_along_axis(real, np.maximum(qr, 0)[:, None, :], 1)[:, 0], 0
    ).sum(-1)
    if ref_cost is None:
      ref_cost = np.array([real[k][scipy_lsa(real[k])].sum() for k in range(p)])
    np.testing.assert_allclose(got, ref_cost, rtol=1e-5, atol=1e-5)


def test_non_finite_costs_do_not_break_the_solver():
  rng = np.random.default_rng(6)
  cost = rng.normal(size=(P_A, N_A, M_A)).astype(np.float32)
  cost[rng.random(cost.shape) < 0.1] = np.nan
  cost[rng.random(cost.shape) < 0.1] = np.inf
  cost[rng.random(cost.shape) < 0.1] = -np.inf
  mask = _random_masks(rng, P_A, M_A)
  q = np.asarray(lsa_jit(cost, mask))
  clean = np.clip(np.nan_to_num(cost, nan=1e30, posinf=1e30, neginf=-1e30), -1e30, 1e30)
  _check(clean, mask, q)


def _np_match_cost(logits, boxes, labels, tboxes):
  prob = np.exp(logits - logits.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  out = np.zeros((len(boxes), len(tboxes)))
  for i, (pb, pp) in enumerate(zip(boxes, prob)):
    for j, (tb, lab) in enumerate(zip(tboxes, labels)):
      a = [pb[0] - pb[2] / 2, pb[1] - pb[3] / 2, pb[0] + pb[2] / 2, pb[1] + pb[3] / 2]
      b = [tb[0] - tb[2] / 2, tb[1] - tb[3] / 2, tb[0] + tb[2] / 2, tb[1] + tb[3] / 2]
      inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
      union = pb[2] * pb[3] + tb[2] * tb[3] - inter
      encl = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
      giou = inter / union - (encl - union) / encl
      out[i, j] = 5 * np.abs(pb - tb).sum() - pp[lab] - 2 * giou
  return out


def _random_detections(rng, lead, n, m, num_classes):
  logits = rng.normal(size=lead + (n, num_classes + 1)).astype(np.float32) * 2
  boxes = np.concatenate(
    [rng.uniform(0.2, 0.8, lead + (n, 2)), rng.uniform(0.05, 0.5, lead + (n, 2))], -1
  ).astype(np.float32)
  return logits, boxes


def _random_targets(rng, b, m, num_classes):
  labels = rng.integers(0, num_classes, (b, m)).astype(np.int32)
  boxes = np.concatenate(
    [rng.uniform(0.2, 0.8, (b, m, 2)), rng.uniform(0.05, 0.5, (b, m, 2))], -1
  ).astype(np.float32)
  mask = rng.random((b, m)) < 0.7
  return labels, boxes, mask


def test_match_cost_matches_numpy_and_broadcasts():
  rng = np.random.default_rng(7)
  L, B, N, M, C = 2, 4, N_A, M_A, 4
  logits, boxes = _random_detections(rng, (L, B), N, M, C)
  labels, tboxes, mask = _random_targets(rng, B, M, C)
  cost = match_cost_jit(logits, boxes, labels, tboxes, mask)
  assert cost.shape == (L, B, N, M) and cost.dtype == jnp.float32
  for l in range(L):
    for b in range(B):
      ref = _np_match_cost(
        logits[l, b].astype(np.float64),
        boxes[l, b].astype(np.float64),
        labels[b],
        tboxes[b].astype(np.float64),
      )
      cols = mask[b]
      np.testing.assert_allclose(
        np.asarray(cost[l, b])[:, cols], ref[:, cols], rtol=1e-5, atol=1e-5
      )
  # diverged predictions stay finite
  bad = logits.copy()
  bad[0, 0, 0] = np.nan
  bad_boxes = boxes.copy()
  bad_boxes[0, 0, 1] = np.inf
  assert np.all(np.isfinite(match_cost_jit(bad, bad_boxes, labels, tboxes, mask)))


def test_hungarian_match_realistic_batch():
  """DETR-like problems over [L, B] = [6, 32] (N=100, M=20, 92 logits): exact
  solver vs the scipy callback and vs scipy on the unpadded costs."""
  rng = np.random.default_rng(9)
  L, B, N, M, C = 6, 32, 100, 20, 91
  logits, boxes = _random_detections(rng, (L, B), N, M, C)
  # early-training regime: many queries predict almost the same box
  boxes[:3] = boxes[:3, :, :1] + 0.01 * rng.normal(size=boxes[:3].shape).astype(np.float32)
  labels, tboxes, mask = _random_targets(rng, B, M, C)
  outputs = {'pred_logits': logits, 'pred_boxes': boxes}
  targets = {'labels': labels, 'boxes': tboxes, 'mask': mask}
  exact = jax.jit(lambda o, t: hungarian_match(o, t))(outputs, targets)
  assert exact.shape == (L, B, M) and exact.dtype == jnp.int32
  via_scipy = jax.jit(lambda o, t: hungarian_match(o, t, solver='scipy'))(outputs, targets)
  np.testing.assert_array_equal(exact, via_scipy)
  _check(match_cost_jit(logits, boxes, labels, tboxes, mask), mask, exact)
  with pytest.raises(ValueError, match='hungarian'):
    hungarian_match(outputs, targets, solver='hungarian')


def test_solver_is_pure_jax():
  jaxpr = jax.make_jaxpr(linear_sum_assignment)(
    np.zeros((2, 5, 3), np.float32), np.ones((2, 3), bool)
  )
  assert 'callback' not in str(jaxpr)
