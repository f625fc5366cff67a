"""Matching benchmark: pure-JAX exact matcher vs a host scipy matcher.

Times the Hungarian matching of a DETR training step: cost matrices plus
assignment for every decoder layer (L=6) and image (B=32), N=100 queries.

  pretrain: UP-DETR pre-training, M=10 patches per image, 3 logits (num_classes=2)
  coco:     COCO fine-tuning, M=20 target slots (1..20 real per image), 92 logits

``ours_s``: one jitted call (match_cost + linear_sum_assignment over [L, B]),
``scipy_s``: numpy cost matrix + scipy.optimize.linear_sum_assignment per image
per layer, inputs already on the host.
``release_s``: the release's matcher algorithm, measured in the same run: for each
of the L layers one cross-batch cost matrix [B*N, sum of targets] (softmax over the
flattened batch, ``cdist`` L1, GIoU of every prediction against every target of
the batch), moved to the host, split per image, scipy per image. In PyTorch (CPU)
when torch is installed (``release_impl: torch``), else the same algorithm in numpy
(``release_impl: numpy``). Medians over ``--repeats`` runs after warm-up; one JSON
object per case on stdout; every number is measured here, none quoted.

    python benchmarks/matching.py [--repeats 20] [--cases pretrain,coco]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment as scipy_lsa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from updetr_jax.matching import hungarian_match, linear_sum_assignment, match_cost  # noqa: E402


def make_case(case, rng, L=6, B=32, N=100):
  if case == 'pretrain':
    M, num_classes = 10, 2
    n_real = np.full((B,), M)
  elif case == 'coco':
    M, num_classes = 20, 91
    n_real = rng.integers(1, M + 1, size=(B,))
  else:
    raise ValueError(case)
  logits = rng.normal(size=(L, B, N, num_classes + 1)).astype(np.float32)
  ctr = rng.uniform(0.2, 0.8, size=(L, B, N, 2))
  wh = rng.uniform(0.05, 0.4, size=(L, B, N, 2))
  pred_boxes = np.concatenate([ctr, wh], -1).astype(np.float32)
  mask = np.arange(M)[None, :] < n_real[:, None]
  labels = np.where(
    mask,
    rng.integers(
      1 if case == 'pretrain' else 0, 2 if case == 'pretrain' else num_classes, size=(B, M)
    ),
    0,
  ).astype(np.int32)
  tctr = rng.uniform(0.2, 0.8, size=(B, M, 2))
  twh = rng.uniform(0.05, 0.4, size=(B, M, 2))
  tgt_boxes = np.where(mask[..., None], np.concatenate([tctr, twh], -1), 0.0).astype(np.float32)
  return dict(
    logits=logits,
    pred_boxes=pred_boxes,
    labels=labels,
    tgt_boxes=tgt_boxes,
    mask=mask,
    L=L,
    B=B,
    N=N,
    M=M,
    num_classes=num_classes,
  )


@jax.jit
def ours(logits, pred_boxes, labels, tgt_boxes, mask):
  cost = match_cost(logits, pred_boxes, labels, tgt_boxes, mask)  # [L, B, N, M]
  return linear_sum_assignment(cost, mask)


@jax.jit
def ours_matcher(logits, pred_boxes, labels, tgt_boxes, mask):
  """The same through the public matcher entry point (used by the losses)."""
  return hungarian_match(
    {'pred_logits': logits, 'pred_boxes': pred_boxes},
    {'labels': labels, 'boxes': tgt_boxes, 'mask': mask},
  )


def _np_cxcywh_to_xyxy(b):
  cx, cy, w, h = np.moveaxis(b, -1, 0)
  return np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def _np_giou(a, b):
  area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
  area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  lt = np.maximum(a[:, None, :2], b[None, :, :2])
  rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = np.clip(rb - lt, 0, None)
  inter = wh[..., 0] * wh[..., 1]
  union = area_a[:, None] + area_b[None] - inter
  lt = np.minimum(a[:, None, :2], b[None, :, :2])
  rb = np.maximum(a[:, None, 2:], b[None, :, 2:])
  wh = np.clip(rb - lt, 0, None)
  area = wh[..., 0] * wh[..., 1]
  return inter / union - (area - union) / area


def host_scipy(logits, pred_boxes, labels, tgt_boxes, mask):
  """What a host matcher does: per layer, per image, numpy cost + scipy."""
  out = []
  L, B = logits.shape[:2]
  for layer in range(L):
    for b in range(B):
      n_real = int(mask[b].sum())
      lg = logits[layer, b]
      prob = np.exp(lg - lg.max(-1, keepdims=True))
      prob /= prob.sum(-1, keepdims=True)
      tb = tgt_boxes[b, :n_real]
      pb = pred_boxes[layer, b]
      c = (
        5.0 * np.abs(pb[:, None] - tb[None]).sum(-1)
        - prob[:, labels[b, :n_real]]
        - 2.0 * _np_giou(_np_cxcywh_to_xyxy(pb), _np_cxcywh_to_xyxy(tb))
      )
      out.append(scipy_lsa(c))
  return out


def release_matcher(logits, pred_boxes, labels, tgt_boxes, mask):
  """The release's HungarianMatcher, called once per decoder layer (as its
  SetCriterion does for the final and every auxiliary output)."""
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    torch = None
  L, B, N = logits.shape[:3]
  sizes = [int(m.sum()) for m in mask]
  tgt_ids = np.concatenate([labels[b, :n] for b, n in enumerate(sizes)])
  tgt = np.concatenate([tgt_boxes[b, :n] for b, n in enumerate(sizes)])
  out = []
  for layer in range(L):
    if torch is not None:
      with torch.no_grad():
        prob = torch.from_numpy(logits[layer]).flatten(0, 1).softmax(-1)
        ob = torch.from_numpy(pred_boxes[layer]).flatten(0, 1)
        tb = torch.from_numpy(tgt)
        cost_class = -prob[:, torch.from_numpy(tgt_ids).long()]
        cost_bbox = torch.cdist(ob, tb, p=1)
        giou = torch.from_numpy(_np_giou(_np_cxcywh_to_xyxy(ob.numpy()), _np_cxcywh_to_xyxy(tgt)))
        c = (5.0 * cost_bbox + cost_class - 2.0 * giou).view(B, N, -1).cpu().numpy()
    else:
      lg = logits[layer].reshape(B * N, -1)
      prob = np.exp(lg - lg.max(-1, keepdims=True))
      prob /= prob.sum(-1, keepdims=True)
      ob = pred_boxes[layer].reshape(B * N, 4)
      c = (
        5.0 * np.abs(ob[:, None] - tgt[None]).sum(-1)
        - prob[:, tgt_ids]
        - 2.0 * _np_giou(_np_cxcywh_to_xyxy(ob), _np_cxcywh_to_xyxy(tgt))
      )
      c = c.reshape(B, N, -1)
    splits = np.cumsum(sizes)[:-1]
    out.append([scipy_lsa(ci[b]) for b, ci in enumerate(np.split(c, splits, -1))])
  return out


def timeit(fn, repeats):
  fn()  # warm-up (compilation for ours)
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--cases', default='pretrain,coco')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  rng = np.random.default_rng(args.seed)
  for case in args.cases.split(','):
    d = make_case(case, rng)
    host = [d[k] for k in ('logits', 'pred_boxes', 'labels', 'tgt_boxes', 'mask')]
    dev = [jnp.asarray(x) for x in host]
    ours_s = timeit(lambda: ours(*dev).block_until_ready(), args.repeats)
    matcher_s = timeit(lambda: ours_matcher(*dev).block_until_ready(), args.repeats)
    scipy_s = timeit(lambda: host_scipy(*host), args.repeats)
    release_s = timeit(lambda: release_matcher(*host), args.repeats)
    try:
      import torch  # noqa: F401,PLC0415

      release_impl = 'torch'
    except ImportError:
      release_impl = 'numpy'
    # sanity: same total assignment cost as scipy
    cost = np.asarray(match_cost(*dev[:4], dev[4]), np.float64)
    q = np.asarray(ours(*dev))
    assert np.array_equal(q, np.asarray(ours_matcher(*dev)))
    n_img = d['L'] * d['B']
    got = ref = 0.0
    for li in range(d['L']):
      for b in range(d['B']):
        cols = np.nonzero(d['mask'][b])[0]
        got += cost[li, b][q[li, b, cols], cols].sum()
        r, c = scipy_lsa(cost[li, b][:, cols])
        ref += cost[li, b][r, c].sum()
    rel = 0.0  # the release algorithm's assignments cost the same
    for li, per_image in enumerate(release_matcher(*host)):
      for b, (r, c) in enumerate(per_image):
        cols = np.nonzero(d['mask'][b])[0]
        rel += cost[li, b][:, cols][r, c].sum()
    print(
      json.dumps(
        dict(
          case=case,
          ours_s=round(ours_s, 6),
          scipy_s=round(scipy_s, 6),
          ours_hungarian_match_s=round(matcher_s, 6),
          speedup_vs_scipy=round(scipy_s / ours_s, 2),
          release_s=round(release_s, 6),
          release_impl=release_impl,
          speedup_vs_release=round(release_s / ours_s, 1),
          ours_per_image_ms=round(1e3 * ours_s / n_img, 4),
          scipy_per_image_ms=round(1e3 * scipy_s / n_img, 4),
          total_cost_rel_diff=float(abs(got - ref) / max(abs(ref), 1e-9)),
          release_total_cost_rel_diff=float(abs(rel - ref) / max(abs(ref), 1e-9)),
          L=d['L'],
          B=d['B'],
          N=d['N'],
          M=d['M'],
          num_classes=d['num_classes'],
          backend=jax.default_backend(),
          cpus=os.cpu_count(),
        )
      ),
      flush=True,
    )


if __name__ == '__main__':
  main()
