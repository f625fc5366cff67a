"""Hungarian matching for DETR-style set prediction, in pure JAX.

The matcher builds the DETR cost matrix (``match_cost``) and solves the linear
assignment problem exactly (``linear_sum_assignment``) with a batched
shortest-augmenting-path solver -- the Jonker-Volgenant / Crouse (2016) scheme
that ``scipy.optimize.linear_sum_assignment`` uses -- written with ``lax``
control flow so that it jits, vmaps and runs on any backend.
``scipy_linear_sum_assignment`` is a host (``jax.pure_callback``) oracle with the
same signature.

Conventions: ``cost[..., N, M]`` has queries (predictions) as rows and targets as
columns; ``tgt_mask[..., M]`` marks the real (non-padded) targets. The result
``query_idx[..., M]`` gives, for every real target, the query matched to it and
``-1`` for padded targets.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from updetr_jax import box_ops

__all__ = [
  'match_cost',
  'linear_sum_assignment',
  'scipy_linear_sum_assignment',
  'hungarian_match',
]

# Magnitude used to keep cost matrices finite (and the solver terminating).
_COST_CLIP = 1e7
_SOLVER_CLIP = 1e30


# --------------------------------------------------------------------------- #
# Cost matrix
# --------------------------------------------------------------------------- #
def match_cost(
  pred_logits,
  pred_boxes,
  tgt_labels,
  tgt_boxes,
  tgt_mask,
  cost_class=1.0,
  cost_bbox=5.0,
  cost_giou=2.0,
):
  """DETR matching cost ``[..., N, M]`` (float32, always finite).

  ``cost = cost_bbox * L1(cxcywh) - cost_class * softmax(logits)[label]
  - cost_giou * GIoU(xyxy)``; the softmax includes the no-object logit.

  Args:
    pred_logits: ``[..., N, C+1]``.
    pred_boxes: ``[..., N, 4]`` normalized cxcywh.
    tgt_labels: ``[..., M]`` int class ids (values of padded targets ignored).
    tgt_boxes: ``[..., M, 4]`` normalized cxcywh.
    tgt_mask: ``[..., M]`` bool, True for real targets.
    Leading dims broadcast (e.g. predictions ``[L, B]`` vs targets ``[B]``).
  Returns:
    ``[..., N, M]`` float32; padded columns are 0. NaN/inf entries (diverged
    predictions) are replaced by +-1e7 so the solver stays well defined.
  """
  # Built targets-major ``[..., M, N]``: the layout the solver works in (targets as
  # rows), and on CPU the faster one to build (the long query axis is the minor one).
  pred_logits = jnp.asarray(pred_logits, jnp.float32)
  pred_boxes = jnp.asarray(pred_boxes, jnp.float32)
  tgt_boxes = jnp.asarray(tgt_boxes, jnp.float32)
  tgt_labels = jnp.asarray(tgt_labels, jnp.int32)
  tgt_mask = jnp.asarray(tgt_mask, bool)
  n, num_logits = pred_logits.shape[-2:]
  m = tgt_labels.shape[-1]
  lead = jnp.broadcast_shapes(
    pred_logits.shape[:-2],
    pred_boxes.shape[:-2],
    tgt_labels.shape[:-1],
    tgt_boxes.shape[:-2],
    tgt_mask.shape[:-1],
  )

  # softmax(logits)[label] = exp(logit[label] - logsumexp(logits)): gather the
  # M needed logit rows instead of normalising all C+1 probabilities.
  lse = jax.nn.logsumexp(pred_logits, axis=-1)  # [..., N]
  logits_t = jnp.broadcast_to(jnp.swapaxes(pred_logits, -1, -2), lead + (num_logits, n))
  labels = jnp.clip(tgt_labels, 0, num_logits - 1)
  labels = jnp.broadcast_to(labels[..., :, None], lead + (m, n))
  picked = jnp.take_along_axis(logits_t, labels, axis=-2)  # [..., M, N]
  c_class = -jnp.exp(picked - lse[..., None, :])

  # Pairwise box terms on [..., M, N] planes.
  tb = tgt_boxes[..., :, None, :]
  pb = pred_boxes[..., None, :, :]
  c_bbox = sum(jnp.abs(pb[..., k] - tb[..., k]) for k in range(4))
  c_giou = -box_ops.generalized_box_iou(
    box_ops.box_cxcywh_to_xyxy(pb), box_ops.box_cxcywh_to_xyxy(tb)
  )
  cost = cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou
  cost = jnp.nan_to_num(cost, nan=_COST_CLIP, posinf=_COST_CLIP, neginf=-_COST_CLIP)
  cost = jnp.clip(cost, -_COST_CLIP, _COST_CLIP)
  cost = jnp.where(tgt_mask[..., :, None], cost, 0.0).astype(jnp.float32)
  return jnp.swapaxes(cost, -1, -2)


# --------------------------------------------------------------------------- #
# Exact solver
# --------------------------------------------------------------------------- #
def _take(x, idx):
  """``x[p, idx[p]]`` for ``x [P, K]``, ``idx [P]`` (indices clipped)."""
  return jnp.take_along_axis(x, jnp.clip(idx, 0, x.shape[1] - 1)[:, None], axis=1)[:, 0]


def _solve_rows(cost, row_valid):
  """Batched shortest-augmenting-path assignment of rows to columns.

  Args:
    cost: ``[P, R, K]`` float32, finite, ``R <= K``.
    row_valid: ``[P, R]`` bool; invalid rows are not assigned.
  Returns:
    ``col4row [P, R]`` int32, the column of every valid row (distinct within a
    problem) minimising the total cost of the valid rows; -1 on invalid rows.

  This is the Jonker-Volgenant / Crouse (2016) scheme scipy uses: rows are
  inserted one at a time by a Dijkstra search for the shortest augmenting
  path in reduced costs ``c[i, j] - u[i] - v[j]`` (vectorised over the K
  columns; the minimal unscanned column is taken, preferring unassigned
  columns on ties), followed by a dual update and augmentation along the path.
  Implementation notes:

  * Row-reduction start: with ``v = 0`` and ``u`` = row minima, every column
    that is the (first) row minimum of some valid rows goes to the first of
    them. Those edges are tight, the duals feasible and ``v = 0`` on the free
    columns, so this partial assignment is optimal for its rows and only the
    remaining (conflicting) rows need augmenting paths.
  * Row duals are not stored: an assigned row's edge is tight, so
    ``u[i] = c[i, col4row[i]] - v[col4row[i]]``; the row being inserted starts
    with ``u = 0`` (a constant shift of its path lengths).
  * One ``lax.while_loop`` drives all P problems, each running its own state
    machine (mode 0: one Dijkstra step, mode 1: one augmentation step, mode
    2: done; the first augmentation step shares the iteration that finds the
    sink), so the sequential iteration count is the maximum over problems of
    their own work, not a sum over rows of per-row maxima.
  """
  p_dim, r_dim, k_dim = cost.shape
  inf = jnp.float32(jnp.inf)
  pidx = jnp.arange(p_dim)
  kiota = jnp.arange(k_dim, dtype=jnp.int32)[None, :]
  riota = jnp.arange(r_dim, dtype=jnp.int32)[None, :]

  # Row-reduction start.
  rmin = jnp.min(cost, axis=2)
  best = jnp.min(jnp.where(cost == rmin[:, :, None], kiota[:, None, :], k_dim), axis=2)
  clash = (
    (best[:, :, None] == best[:, None, :])
    & row_valid[:, None, :]
    & (riota[:, None, :] < riota[:, :, None])
  )
  win = row_valid & ~jnp.any(clash, axis=2)
  col4row0 = jnp.where(win, best, -1)
  hit = win[:, :, None] & (best[:, :, None] == kiota[:, None, :])
  row4col0 = jnp.max(jnp.where(hit, riota[:, :, None], -1), axis=1)
  todo = row_valid & ~win

  def next_row(col4row):
    """First valid row not assigned yet (R if none)."""
    return jnp.min(jnp.where(todo & (col4row < 0), riota, r_dim), axis=1)

  first = next_row(col4row0)
  init = dict(
    v=jnp.zeros((p_dim, k_dim), jnp.float32),
    row4col=row4col0,
    col4row=col4row0,
    path=jnp.zeros((p_dim, k_dim), jnp.int32),
    spc=jnp.full((p_dim, k_dim), inf),
    sc=jnp.zeros((p_dim, k_dim), bool),
    min_val=jnp.zeros((p_dim,), jnp.float32),
    cur=first,  # row being inserted
    i=first,  # row being scanned
    ui=jnp.zeros((p_dim,), jnp.float32),
    mode=jnp.where(first < r_dim, 0, 2).astype(jnp.int32),
    aj=jnp.zeros((p_dim,), jnp.int32),
    it=jnp.zeros((), jnp.int32),
  )
  # Safety net only: inserting a row takes at most (#assigned + 1) Dijkstra
  # steps and as many augmentation steps, one shared.
  max_iters = 2 * r_dim * r_dim + 1

  def cond(s):
    return jnp.any(s['mode'] != 2) & (s['it'] < max_iters)

  def body(s):
    v, row4col, col4row = s['v'], s['row4col'], s['col4row']
    spc, sc, path = s['spc'], s['sc'], s['path']
    i, ui, min_val, mode, aj, cur = s['i'], s['ui'], s['min_val'], s['mode'], s['aj'], s['cur']

    # ---- Dijkstra step (mode 0) ------------------------------------------
    dmode = mode == 0
    r = (min_val - ui)[:, None] + cost[pidx, jnp.clip(i, 0, r_dim - 1)] - v
    upd = dmode[:, None] & ~sc & (r < spc)
    spc = jnp.where(upd, r, spc)
    path = jnp.where(upd, i[:, None], path)
    masked = jnp.where(sc, inf, spc)
    lowest = jnp.min(masked, axis=1)
    # First minimal unscanned column, unassigned ones preferred on ties.
    key = jnp.where(
      masked == lowest[:, None], jnp.where(row4col < 0, kiota, kiota + k_dim), 2 * k_dim
    )
    j = jnp.min(key, axis=1)
    found = dmode & (j < k_dim)  # j is unassigned: the sink
    j = jnp.where(j >= k_dim, j - k_dim, j)
    cont = dmode & ~found
    jrow = _take(row4col, j)
    sc = sc | (dmode[:, None] & (kiota == j[:, None]))
    min_val = jnp.where(dmode, lowest, min_val)
    ui = jnp.where(cont, cost[pidx, jnp.clip(jrow, 0, r_dim - 1), j] - _take(v, j), ui)
    i = jnp.where(cont, jrow, i)
    # Sink reached: dual update of the scanned columns, switch to augmenting.
    v = jnp.where(found[:, None] & sc, v - (min_val[:, None] - spc), v)
    aj = jnp.where(found, j, aj)
    mode = jnp.where(found, 1, mode)

    # ---- augmentation step (mode 1) --------------------------------------
    amode = mode == 1
    ai = _take(path, aj)
    row4col = jnp.where(amode[:, None] & (kiota == aj[:, None]), ai[:, None], row4col)
    old = _take(col4row, ai)
    col4row = jnp.where(amode[:, None] & (riota == ai[:, None]), aj[:, None], col4row)
    aj = jnp.where(amode, old, aj)
    finished = amode & (ai == cur)

    # ---- next row --------------------------------------------------------
    nxt = next_row(col4row)
    start = finished & (nxt < r_dim)
    mode = jnp.where(finished, jnp.where(start, 0, 2), mode)
    cur = jnp.where(start, nxt, cur)
    i = jnp.where(start, nxt, i)
    ui = jnp.where(start, 0.0, ui)
    min_val = jnp.where(start, 0.0, min_val)
    sc = sc & ~start[:, None]
    spc = jnp.where(start[:, None], inf, spc)
    return dict(
      v=v,
      row4col=row4col,
      col4row=col4row,
      path=path,
      spc=spc,
      sc=sc,
      min_val=min_val,
      cur=cur,
      i=i,
      ui=ui,
      mode=mode,
      aj=aj,
      it=s['it'] + 1,
    )

  out = lax.while_loop(cond, body, init)
  return jnp.where(row_valid, out['col4row'], -1)


def _sanitize(cost):
  cost = jnp.asarray(cost, jnp.float32)
  cost = jnp.nan_to_num(cost, nan=_SOLVER_CLIP, posinf=_SOLVER_CLIP, neginf=-_SOLVER_CLIP)
  return jnp.clip(cost, -_SOLVER_CLIP, _SOLVER_CLIP)


def _assign_t(cost_t, tgt_mask):
  """:func:`linear_sum_assignment` on a targets-major cost ``[..., M, N]``."""
  cost_t = _sanitize(cost_t)
  tgt_mask = jnp.asarray(tgt_mask, bool)
  m, n = cost_t.shape[-2:]
  lead = jnp.broadcast_shapes(cost_t.shape[:-2], tgt_mask.shape[:-1])
  if m == 0:
    return jnp.zeros(lead + (0,), jnp.int32)
  if n == 0:
    return jnp.full(lead + (m,), -1, jnp.int32)
  p_dim = math.prod(lead)
  cost_t = jnp.broadcast_to(cost_t, lead + (m, n)).reshape(p_dim, m, n)
  mask = jnp.broadcast_to(tgt_mask, lead + (m,)).reshape(p_dim, m)
  if m <= n:
    return _solve_rows(cost_t, mask).reshape(lead + (m,))  # targets as rows
  # M > N: queries as rows; padded target columns priced above every real cost.
  real = mask[:, :, None]
  real_max = jnp.max(jnp.where(real, cost_t, -jnp.inf), axis=(1, 2))
  real_min = jnp.min(jnp.where(real, cost_t, jnp.inf), axis=(1, 2))
  real_max = jnp.where(jnp.isfinite(real_max), real_max, 0.0)
  real_min = jnp.where(jnp.isfinite(real_min), real_min, 0.0)
  big = real_max + jnp.maximum(real_max - real_min, 1.0)
  cost = jnp.where(real, cost_t, big[:, None, None]).swapaxes(1, 2)  # [P, N, M]
  tgt4query = _solve_rows(cost, jnp.ones((p_dim, n), bool))  # [P, N]
  qid = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (p_dim, n))
  out = jnp.full((p_dim, m), -1, jnp.int32)
  out = out.at[jnp.arange(p_dim)[:, None], tgt4query].set(qid)
  return jnp.where(mask, out, -1).reshape(lead + (m,))


def linear_sum_assignment(cost, tgt_mask):
  """Exact min-cost assignment of real targets to distinct queries (pure JAX).

  Args:
    cost: ``[..., N, M]`` (queries x targets); NaN/inf are clipped to +-1e30.
    tgt_mask: ``[..., M]`` bool, True for real targets (broadcasts against the
      leading dims of ``cost``).
  Returns:
    ``query_idx [..., M]`` int32: the query matched to each real target, -1 for
    padded targets. The total cost equals that of
    ``scipy.optimize.linear_sum_assignment(cost[..., real_cols])``.

  When ``M <= N`` (the DETR case) every real target is matched. When ``M > N``
  (static shapes; more target slots than queries) the transposed problem is
  solved (queries as rows) with every padded column set to a cost above all
  real costs, so that ``min(N, #real)`` real targets are matched at minimum
  cost, as scipy does on the real columns; real targets left without a query
  also get -1. Padded targets never influence which real targets are matched
  or to which queries. Jittable and vmappable; leading dims are flattened and
  solved together in one batched loop.
  """
  return _assign_t(jnp.swapaxes(jnp.asarray(cost), -1, -2), tgt_mask)


# --------------------------------------------------------------------------- #
# scipy oracle / fallback
# --------------------------------------------------------------------------- #
def _scipy_host(cost, mask):
  from scipy.optimize import linear_sum_assignment as _lsa

  cost = np.asarray(cost, np.float64)
  mask = np.asarray(mask, bool)
  n, m = cost.shape[-2:]
  lead = np.broadcast_shapes(cost.shape[:-2], mask.shape[:-1])
  cost = np.broadcast_to(cost, lead + (n, m)).reshape(-1, n, m)
  mask = np.broadcast_to(mask, lead + (m,)).reshape(-1, m)
  out = np.full((cost.shape[0], m), -1, np.int32)
  for p in range(cost.shape[0]):
    cols = np.nonzero(mask[p])[0]
    if cols.size == 0 or n == 0:
      continue
    rows, sel = _lsa(cost[p][:, cols])
    out[p, cols[sel]] = rows
  return out.reshape(lead + (m,))


def scipy_linear_sum_assignment(cost, tgt_mask):
  """Same contract as :func:`linear_sum_assignment`, solved on the host by
  ``scipy.optimize.linear_sum_assignment`` (on the real columns of every
  problem) through ``jax.pure_callback``. Works under jit and vmap."""
  cost = _sanitize(cost)
  tgt_mask = jnp.asarray(tgt_mask, bool)
  n, m = cost.shape[-2], cost.shape[-1]
  lead = jnp.broadcast_shapes(cost.shape[:-2], tgt_mask.shape[:-1])
  cost = jnp.broadcast_to(cost, lead + (n, m))
  tgt_mask = jnp.broadcast_to(tgt_mask, lead + (m,))
  if m == 0:
    return jnp.zeros(lead + (0,), jnp.int32)
  out_type = jax.ShapeDtypeStruct(lead + (m,), jnp.int32)
  return jax.pure_callback(_scipy_host, out_type, cost, tgt_mask, vmap_method='broadcast_all')


# --------------------------------------------------------------------------- #
# Matcher
# --------------------------------------------------------------------------- #
_SOLVERS = ('exact', 'scipy')


# Added to the cost of a (query, patch) pair outside the patch's group when the
# matching is restricted to groups: above any real cost, small enough for float32.
_GROUP_PENALTY = 1e6


def group_cost_penalty(num_queries: int, num_targets: int, num_groups: int):
  """[M, N] float32: 0 where query n is in target m's group, _GROUP_PENALTY elsewhere.

  The N queries form ``num_groups`` groups of N / num_groups consecutive queries and
  target m belongs to group m (UP-DETR: patch m's features go to group m)."""
  if num_queries % num_groups or num_targets > num_groups:
    raise ValueError(
      f'group matching needs N={num_queries} divisible by the {num_groups} groups and '
      f'at most one target per group (M={num_targets})'
    )
  group = np.arange(num_queries) // (num_queries // num_groups)
  own = group[None, :] == np.arange(num_targets)[:, None]
  return jnp.asarray(np.where(own, 0.0, _GROUP_PENALTY), jnp.float32)


def hungarian_match(
  outputs,
  targets,
  solver='exact',
  cost_class=1.0,
  cost_bbox=5.0,
  cost_giou=2.0,
  num_groups=0,
):
  """DETR Hungarian matcher.

  Args:
    outputs: dict with ``pred_logits [..., B, N, C+1]`` and
      ``pred_boxes [..., B, N, 4]`` (extra leading dims, e.g. decoder layers,
      are matched independently).
    targets: dict with ``labels [B, M]`` int32, ``boxes [B, M, 4]`` (normalized
      cxcywh) and ``mask [B, M]`` bool (True = real target).
    solver: ``'exact'`` (pure-JAX solver) or ``'scipy'`` (host callback).
    num_groups: 0 (DETR, the release's pre-training): any query may take any
      target. G > 0: the N queries form G groups of N / G consecutive queries and
      target j may only be matched to a query of group j (UP-DETR with
      ``matcher.group_matching``: patch j is found by the queries that carry it).
  Returns:
    ``query_idx [..., B, M]`` int32 (-1 for padded targets), gradient-stopped.
  """
  if solver not in _SOLVERS:
    raise ValueError(f'unknown matching solver {solver!r}; expected one of {sorted(_SOLVERS)}')
  cost = match_cost(
    lax.stop_gradient(outputs['pred_logits']),
    lax.stop_gradient(outputs['pred_boxes']),
    targets['labels'],
    targets['boxes'],
    targets['mask'],
    cost_class=cost_class,
    cost_bbox=cost_bbox,
    cost_giou=cost_giou,
  )
  cost_t = jnp.swapaxes(cost, -1, -2)  # targets-major, the solver's layout
  if num_groups:
    m, n = cost_t.shape[-2:]
    cost_t = cost_t + jnp.where(
      jnp.asarray(targets['mask'], bool)[..., :, None], group_cost_penalty(n, m, num_groups), 0.0
    )
  if solver == 'exact':
    idx = _assign_t(cost_t, targets['mask'])
  else:
    idx = scipy_linear_sum_assignment(jnp.swapaxes(cost_t, -1, -2), targets['mask'])
  return lax.stop_gradient(idx)
