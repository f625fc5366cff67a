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
    "match_cost",
    "linear_sum_assignment",
    "scipy_linear_sum_assignment",
    "hungarian_match",
]

# Magnitude used to keep cost matrices finite (and the solver terminating).
_COST_CLIP = 1e7
_SOLVER_CLIP = 1e30
_DEBUG = False


# --------------------------------------------------------------------------- #
# Cost matrix
# --------------------------------------------------------------------------- #
def match_cost(pred_logits, pred_boxes, tgt_labels, tgt_boxes, tgt_mask,
               cost_class=1.0, cost_bbox=5.0, cost_giou=2.0):
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
      predictions) are replaced by large finite values so the solver stays sane.
    """
    pred_logits = jnp.asarray(pred_logits, jnp.float32)
    pred_boxes = jnp.asarray(pred_boxes, jnp.float32)
    tgt_boxes = jnp.asarray(tgt_boxes, jnp.float32)
    tgt_labels = jnp.asarray(tgt_labels, jnp.int32)
    tgt_mask = jnp.asarray(tgt_mask, bool)
    n, m = pred_logits.shape[-2], tgt_labels.shape[-1]
    num_logits = pred_logits.shape[-1]

    # softmax(logits)[label] = exp(logit[label] - logsumexp(logits)): gather the
    # M needed logits instead of normalising all C+1.
    lse = jax.nn.logsumexp(pred_logits, axis=-1)  # [..., N]
    lead = jnp.broadcast_shapes(pred_logits.shape[:-2], tgt_labels.shape[:-1])
    labels = jnp.clip(tgt_labels, 0, num_logits - 1)
    labels = jnp.broadcast_to(labels[..., None, :], lead + (n, m))
    logits = jnp.broadcast_to(pred_logits, lead + (n, num_logits))
    picked = jnp.take_along_axis(logits, labels, axis=-1)  # [..., N, M]
    c_class = -jnp.exp(picked - lse[..., None])

    # Pairwise terms on [..., N, M] planes (coordinates split first).
    pb = pred_boxes[..., :, None, :]
    tb = tgt_boxes[..., None, :, :]
    c_bbox = sum(jnp.abs(pb[..., k] - tb[..., k]) for k in range(4))
    c_giou = -box_ops.generalized_box_iou(box_ops.box_cxcywh_to_xyxy(pb),
                                          box_ops.box_cxcywh_to_xyxy(tb))
    cost = cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou
    cost = jnp.nan_to_num(cost, nan=_COST_CLIP, posinf=_COST_CLIP, neginf=-_COST_CLIP)
    cost = jnp.clip(cost, -_COST_CLIP, _COST_CLIP)
    return jnp.where(tgt_mask[..., None, :], cost, 0.0).astype(jnp.float32)


# --------------------------------------------------------------------------- #
# Exact solver
# --------------------------------------------------------------------------- #
def _take(x, idx):
    """``x[p, idx[p]]`` for ``x [P, K]``, ``idx [P]`` (0 if out of range).

    A masked reduction rather than a gather: it fuses with its producers and is
    cheaper than XLA's gather on CPU for these small rows."""
    hit = jnp.arange(x.shape[1], dtype=jnp.int32)[None, :] == idx[:, None]
    return jnp.sum(jnp.where(hit, x, jnp.zeros((), x.dtype)), axis=1)


def _solve_rows(cost, row_valid):
    """Batched shortest-augmenting-path assignment of rows to columns.

    Args:
      cost: ``[P, R, K]`` float32, finite, ``R <= K``.
      row_valid: ``[P, R]`` bool; invalid rows are not assigned.
    Returns:
      ``col4row [P, R]`` int32, the column of every valid row (distinct within a
      problem) minimising the total cost of the valid rows; -1 on invalid rows.

    One ``lax.while_loop`` drives all problems; every problem runs its own state
    machine (mode 0: one Dijkstra step of the current row's shortest-path
    search, mode 1: one step of augmentation along the found path, mode 2: done)
    so the number of sequential iterations is the maximum over problems of the
    total work, not the sum over rows of the maximum. Row duals are not stored:
    for an assigned row ``u[i] = cost[i, col4row[i]] - v[col4row[i]]`` (its
    assigned edge is tight), and the row being inserted starts with ``u = 0``.
    """
    p_dim, r_dim, k_dim = cost.shape
    inf = jnp.float32(jnp.inf)
    pidx = jnp.arange(p_dim)
    kiota = jnp.arange(k_dim, dtype=jnp.int32)[None, :]

    # Valid rows first, in their original order.
    order = jnp.argsort(~row_valid, axis=1, stable=True).astype(jnp.int32)
    n_real = jnp.sum(row_valid, axis=1, dtype=jnp.int32)

    def crow(i):
        return cost[pidx, jnp.clip(i, 0, r_dim - 1)]  # [P, K]

    init = dict(
        v=jnp.zeros((p_dim, k_dim), jnp.float32),
        row4col=jnp.full((p_dim, k_dim), -1, jnp.int32),
        col4row=jnp.full((p_dim, r_dim), -1, jnp.int32),
        path=jnp.zeros((p_dim, k_dim), jnp.int32),
        spc=jnp.full((p_dim, k_dim), inf),
        sc=jnp.zeros((p_dim, k_dim), bool),
        min_val=jnp.zeros((p_dim,), jnp.float32),
        i=order[:, 0],
        ui=jnp.zeros((p_dim,), jnp.float32),
        k=jnp.zeros((p_dim,), jnp.int32),
        mode=jnp.where(n_real > 0, 0, 2).astype(jnp.int32),
        aj=jnp.zeros((p_dim,), jnp.int32),
        it=jnp.zeros((), jnp.int32),
    )
    max_iters = r_dim * r_dim + 1  # sum over rows of (2 * row_index + 1)

    def cond(s):
        return jnp.any(s["mode"] != 2) & (s["it"] < max_iters)

    def body(s):
        v, row4col, col4row = s["v"], s["row4col"], s["col4row"]
        spc, sc, path = s["spc"], s["sc"], s["path"]
        i, ui, min_val, mode, aj, k = s["i"], s["ui"], s["min_val"], s["mode"], s["aj"], s["k"]

        # ---- Dijkstra step (mode 0) ------------------------------------------
        dmode = mode == 0
        r = (min_val - ui)[:, None] + crow(i) - v
        upd = dmode[:, None] & ~sc & (r < spc)
        spc = jnp.where(upd, r, spc)
        path = jnp.where(upd, i[:, None], path)
        masked = jnp.where(sc, inf, spc)
        lowest = jnp.min(masked, axis=1)
        free = row4col < 0
        # First minimal unscanned column, unassigned ones preferred on ties.
        key = jnp.where(masked == lowest[:, None], jnp.where(free, kiota, kiota + k_dim), 2 * k_dim)
        j = jnp.min(key, axis=1)
        j = jnp.where(j >= k_dim, j - k_dim, j)
        jrow = _take(row4col, j)
        sc = sc | (dmode[:, None] & (kiota == j[:, None]))
        min_val = jnp.where(dmode, lowest, min_val)
        found = dmode & (jrow < 0)
        cont = dmode & (jrow >= 0)
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
        col4row = jnp.where(amode[:, None] & (jnp.arange(r_dim)[None, :] == ai[:, None]),
                            aj[:, None], col4row)
        aj = jnp.where(amode, old, aj)
        cur = _take(order, k)
        finished = amode & (ai == cur)

        # ---- next row --------------------------------------------------------
        k = jnp.where(finished, k + 1, k)
        more = k < n_real
        mode = jnp.where(finished, jnp.where(more, 0, 2), mode)
        start = finished & more
        nxt = _take(order, k)
        i = jnp.where(start, nxt, i)
        ui = jnp.where(start, 0.0, ui)
        min_val = jnp.where(start, 0.0, min_val)
        sc = sc & ~start[:, None]
        spc = jnp.where(start[:, None], inf, spc)
        return dict(v=v, row4col=row4col, col4row=col4row, path=path, spc=spc, sc=sc,
                    min_val=min_val, i=i, ui=ui, k=k, mode=mode, aj=aj, it=s["it"] + 1)

    out = lax.while_loop(cond, body, init)
    if _DEBUG: jax.debug.print("iters {}", out["it"])
    return jnp.where(row_valid, out["col4row"], -1)


def _sanitize(cost):
    cost = jnp.asarray(cost, jnp.float32)
    cost = jnp.nan_to_num(cost, nan=_SOLVER_CLIP, posinf=_SOLVER_CLIP, neginf=-_SOLVER_CLIP)
    return jnp.clip(cost, -_SOLVER_CLIP, _SOLVER_CLIP)


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
    cost = _sanitize(cost)
    tgt_mask = jnp.asarray(tgt_mask, bool)
    n, m = cost.shape[-2], cost.shape[-1]
    lead = jnp.broadcast_shapes(cost.shape[:-2], tgt_mask.shape[:-1])
    cost = jnp.broadcast_to(cost, lead + (n, m))
    tgt_mask = jnp.broadcast_to(tgt_mask, lead + (m,))
    if m == 0:
        return jnp.zeros(lead + (0,), jnp.int32)
    if n == 0:
        return jnp.full(lead + (m,), -1, jnp.int32)
    p_dim = math.prod(lead)
    cost = cost.reshape(p_dim, n, m)
    mask = tgt_mask.reshape(p_dim, m)
    if m <= n:
        col4row = _solve_rows(jnp.swapaxes(cost, 1, 2), mask)  # targets as rows
        return col4row.reshape(lead + (m,))
    # M > N: queries as rows, padded target columns priced above every real cost.
    real_max = jnp.max(jnp.where(mask[:, None, :], cost, -jnp.inf), axis=(1, 2))
    real_min = jnp.min(jnp.where(mask[:, None, :], cost, jnp.inf), axis=(1, 2))
    real_max = jnp.where(jnp.isfinite(real_max), real_max, 0.0)
    real_min = jnp.where(jnp.isfinite(real_min), real_min, 0.0)
    big = real_max + jnp.maximum(real_max - real_min, 1.0)
    cost = jnp.where(mask[:, None, :], cost, big[:, None, None])
    col4query = _solve_rows(cost, jnp.ones((p_dim, n), bool))  # [P, N] target per query
    qid = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (p_dim, n))
    out = jnp.full((p_dim, m), -1, jnp.int32)
    out = out.at[jnp.arange(p_dim)[:, None], col4query].set(qid)
    out = jnp.where(mask, out, -1)
    return out.reshape(lead + (m,))


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
    return jax.pure_callback(_scipy_host, out_type, cost, tgt_mask,
                             vmap_method="broadcast_all")


# --------------------------------------------------------------------------- #
# Matcher
# --------------------------------------------------------------------------- #
_SOLVERS = {"exact": linear_sum_assignment, "scipy": scipy_linear_sum_assignment}


def hungarian_match(outputs, targets, solver="exact", cost_class=1.0, cost_bbox=5.0,
                    cost_giou=2.0):
    """DETR Hungarian matcher.

    Args:
      outputs: dict with ``pred_logits [..., B, N, C+1]`` and
        ``pred_boxes [..., B, N, 4]`` (extra leading dims, e.g. decoder layers,
        are matched independently).
      targets: dict with ``labels [B, M]`` int32, ``boxes [B, M, 4]`` (normalized
        cxcywh) and ``mask [B, M]`` bool (True = real target).
      solver: ``'exact'`` (pure-JAX solver) or ``'scipy'`` (host callback).
    Returns:
      ``query_idx [..., B, M]`` int32 (-1 for padded targets), gradient-stopped.
    """
    if solver not in _SOLVERS:
        raise ValueError(f"unknown matching solver {solver!r}; expected one of {sorted(_SOLVERS)}")
    cost = match_cost(outputs["pred_logits"], outputs["pred_boxes"], targets["labels"],
                      targets["boxes"], targets["mask"], cost_class=cost_class,
                      cost_bbox=cost_bbox, cost_giou=cost_giou)
    cost = lax.stop_gradient(cost)
    return lax.stop_gradient(_SOLVERS[solver](cost, targets["mask"]))
