"""set_criterion against a plain reference: per image, scipy on the unpadded
float64 cost matrix, explicit Python loops over layers / replicas / images."""

import functools

import jax
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment as scipy_lsa

from updetr_jax.losses import set_criterion

WEIGHTS = {'loss_ce': 1.0, 'loss_bbox': 5.0, 'loss_giou': 2.0, 'loss_feature': 1.0}


# --------------------------------------------------------------------------- #
# Reference
# --------------------------------------------------------------------------- #
def _np_xyxy(b):
  return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def _np_cost(logits, boxes, labels, tboxes):
  """DETR matcher cost of one image, float64, real targets only: [N, T]."""
  prob = np.exp(logits - logits.max(-1, keepdims=True))
  prob /= prob.sum(-1, keepdims=True)
  a, b = _np_xyxy(boxes)[:, None], _np_xyxy(tboxes)[None]
  iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
  ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
  inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
  union = boxes[:, None, 2] * boxes[:, None, 3] + tboxes[None, :, 2] * tboxes[None, :, 3] - inter
  encl = (np.maximum(a[..., 2], b[..., 2]) - np.minimum(a[..., 0], b[..., 0])) * (
    np.maximum(a[..., 3], b[..., 3]) - np.minimum(a[..., 1], b[..., 1])
  )
  giou = inter / union - (encl - union) / encl
  l1 = np.abs(boxes[:, None] - tboxes[None]).sum(-1)
  return 5 * l1 - prob[:, labels] - 2 * giou


def _giou_pairs(p, g):
  """GIoU of matched cxcywh pairs (plain formula, valid boxes)."""
  p0, p1 = p[:, :2] - p[:, 2:] / 2, p[:, :2] + p[:, 2:] / 2
  g0, g1 = g[:, :2] - g[:, 2:] / 2, g[:, :2] + g[:, 2:] / 2
  iwh = np.clip(np.minimum(p1, g1) - np.maximum(p0, g0), 0, None)
  inter = iwh[:, 0] * iwh[:, 1]
  union = p[:, 2] * p[:, 3] + g[:, 2] * g[:, 3] - inter
  cwh = np.maximum(p1, g1) - np.minimum(p0, g0)
  encl = cwh[:, 0] * cwh[:, 1]
  return inter / union - (encl - union) / encl


def _normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_assignments(logits, boxes, labels, tboxes, mask):
  """[L][B] -> (query indices, target indices into the padded M axis)."""
  out = []
  for l in range(logits.shape[0]):
    row = []
    for b in range(logits.shape[1]):
      cols = np.nonzero(mask[b])[0]
      if cols.size == 0:
        row.append((np.zeros(0, int), np.zeros(0, int)))
        continue
      c = _np_cost(
        logits[l, b].astype(np.float64),
        boxes[l, b].astype(np.float64),
        labels[b, cols],
        tboxes[b, cols].astype(np.float64),
      )
      q, t = scipy_lsa(c)
      row.append((q, cols[t]))
    out.append(row)
  return out


def reference_loss(
  params, data, assign, *, num_classes, eos_coef=0.1, num_replicas=1, feature_recon=False
):
  """float64 numpy, explicit loops over layers, replicas (device chunks), images."""
  logits, boxes = params['logits'], params['boxes']
  L, B, N, _ = logits.shape
  labels, tboxes, mask = data['labels'], data['boxes'].astype(np.float64), data['mask']
  chunk = B // num_replicas
  num_boxes = max(mask.sum() / num_replicas, 1.0)
  terms = {}
  for l in range(L):
    suffix = '' if l == 0 else f'_{l - 1}'
    ce_chunks, l1, giou, feat = [], 0.0, 0.0, 0.0
    for r in range(num_replicas):
      num, den = 0.0, 0.0
      for b in range(r * chunk, (r + 1) * chunk):
        q, t = assign[l][b]
        tgt = np.full(N, num_classes)
        tgt[q] = labels[b, t]
        w = np.where(tgt == num_classes, eos_coef, 1.0)
        logp = _log_softmax(logits[l, b])
        num -= np.sum(w * logp[np.arange(N), tgt])
        den += w.sum()
        if len(q) == 0:
          continue
        p, g = boxes[l, b, q], tboxes[b, t]
        l1 += np.abs(p - g).sum()
        giou += np.sum(1 - _giou_pairs(p, g))
        if feature_recon:
          d = _normalize(params['feats'][l, b, q]) - _normalize(data['gt_feature'][b, t])
          feat += np.sum(d * d)
      ce_chunks.append(num / den)
    terms['loss_ce' + suffix] = sum(ce_chunks) / num_replicas
    terms['loss_bbox' + suffix] = l1 / (num_replicas * num_boxes)
    terms['loss_giou' + suffix] = giou / (num_replicas * num_boxes)
    if feature_recon:
      terms['loss_feature' + suffix] = feat / (num_replicas * num_boxes)
  total = sum(WEIGHTS['_'.join(k.split('_')[:2])] * v for k, v in terms.items())
  return total, terms


# --------------------------------------------------------------------------- #
# Ours
# --------------------------------------------------------------------------- #
def _outputs(params, data, feature_recon):
  layers = [
    {'pred_logits': params['logits'][l], 'pred_boxes': params['boxes'][l]}
    for l in range(params['logits'].shape[0])
  ]
  if feature_recon:
    for l, d in enumerate(layers):
      d['pred_feature'] = params['feats'][l]
  out = dict(layers[0])
  out['aux_outputs'] = layers[1:]
  if feature_recon:
    out['gt_feature'] = data['gt_feature']
  return out


@functools.lru_cache(maxsize=None)
def _ours_fn(num_classes, num_replicas, feature_recon):
  def f(params, data):
    targets = {'labels': data['labels'], 'boxes': data['boxes'], 'mask': data['mask']}
    return set_criterion(
      _outputs(params, data, feature_recon),
      targets,
      num_classes=num_classes,
      num_replicas=num_replicas,
      feature_recon=feature_recon,
    )

  return jax.jit(jax.value_and_grad(f, has_aux=True))


def _problem(seed, *, L, B, N, M, num_classes, D=0, pretrain=False):
  rng = np.random.default_rng(seed)
  params = {
    'logits': rng.normal(size=(L, B, N, num_classes + 1)).astype(np.float32) * 2,
    'boxes': np.concatenate(
      [rng.uniform(0.25, 0.75, (L, B, N, 2)), rng.uniform(0.05, 0.4, (L, B, N, 2))], -1
    ).astype(np.float32),
  }
  n_real = rng.integers(0, M + 1, size=B)
  n_real[0] = M
  n_real[-1] = 0  # an image without targets
  mask = np.arange(M)[None] < n_real[:, None]
  if not pretrain:
    mask = np.stack([rng.permutation(m) for m in mask])  # padding anywhere
  labels = np.ones((B, M)) if pretrain else rng.integers(0, num_classes, (B, M))
  data = {
    'labels': np.where(mask, labels, 0).astype(np.int32),
    'boxes': np.concatenate(
      [rng.uniform(0.25, 0.75, (B, M, 2)), rng.uniform(0.05, 0.4, (B, M, 2))], -1
    ).astype(np.float32),
    'mask': mask,
  }
  if D:
    params['feats'] = rng.normal(size=(L, B, N, D)).astype(np.float32)
    data['gt_feature'] = rng.normal(size=(B, M, D)).astype(np.float32) * 3
  return params, data


def _compare(params, data, *, num_classes, num_replicas=1, feature_recon=False):
  (loss, terms), grads = _ours_fn(num_classes, num_replicas, feature_recon)(params, data)
  assign = reference_assignments(
    params['logits'], params['boxes'], data['labels'], data['boxes'], data['mask']
  )
  ref_fn = functools.partial(
    reference_loss,
    data=data,
    assign=assign,
    num_classes=num_classes,
    num_replicas=num_replicas,
    feature_recon=feature_recon,
  )
  p64 = {k: v.astype(np.float64) for k, v in params.items()}
  ref_loss, ref_terms = ref_fn(p64)
  assert set(terms) == set(ref_terms) | {'class_error'}
  for k, v in ref_terms.items():
    np.testing.assert_allclose(terms[k], v, rtol=2e-5, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(loss, ref_loss, rtol=2e-5)
  # Gradients: directional derivatives of the reference (central differences in
  # float64, same assignment) along random directions, one parameter group at
  # a time, against <grad, direction> of ours.
  rng = np.random.default_rng(0)
  for k in params:
    assert grads[k].shape == params[k].shape and np.all(np.isfinite(grads[k]))
    for _ in range(3):
      d = rng.normal(size=params[k].shape)
      eps = 1e-6
      fd = (ref_fn({**p64, k: p64[k] + eps * d})[0] - ref_fn({**p64, k: p64[k] - eps * d})[0]) / (
        2 * eps
      )
      ours = float(np.sum(np.asarray(grads[k], np.float64) * d))
      np.testing.assert_allclose(ours, fd, rtol=1e-4, atol=1e-5, err_msg=k)
    # and every coordinate of a few random single entries
    for flat in rng.choice(params[k].size, size=4, replace=False):
      e = np.zeros(params[k].size)
      e[flat] = 1.0
      e = e.reshape(params[k].shape)
      fd = (
        ref_fn({**p64, k: p64[k] + 1e-6 * e})[0] - ref_fn({**p64, k: p64[k] - 1e-6 * e})[0]
      ) / 2e-6
      np.testing.assert_allclose(
        np.asarray(grads[k]).reshape(-1)[flat], fd, rtol=1e-3, atol=1e-6, err_msg=f'{k}[{flat}]'
      )
  return loss, terms, grads


PRETRAIN = dict(L=3, B=4, N=10, M=5, num_classes=2, D=8, pretrain=True)
COCO = dict(L=2, B=4, N=9, M=6, num_classes=6)


def test_pretrain_loss_and_grads_match_reference_two_replicas():
  """UP-DETR pre-training (feature loss, aux layers) as on 2 data-parallel
  devices: checked against the reference's explicit per-chunk computation."""
  params, data = _problem(0, **PRETRAIN)
  loss, terms, _ = _compare(params, data, num_classes=2, num_replicas=2, feature_recon=True)
  for k in ('loss_ce', 'loss_bbox', 'loss_giou', 'loss_feature'):
    for s in ('', '_0', '_1'):
      assert k + s in terms
  assert 0.0 <= float(terms['class_error']) <= 100.0


def test_detection_loss_and_grads_match_reference():
  """COCO-like: many classes, padding anywhere, an image without targets."""
  params, data = _problem(1, **COCO)
  _, terms, _ = _compare(params, data, num_classes=6)
  assert 'loss_feature' not in terms


def test_no_targets_at_all():
  params, data = _problem(3, **PRETRAIN)
  data['mask'][:] = False
  (loss, terms), grads = _ours_fn(2, 2, True)(params, data)
  assert np.isfinite(loss)
  assert float(terms['loss_bbox']) == 0.0 and float(terms['loss_feature']) == 0.0
  assert float(terms['class_error']) == 100.0
  for g in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(g))


def test_degenerate_predictions_have_finite_gradients():
  params, data = _problem(4, **PRETRAIN)
  params['boxes'][:] = 0.5  # every box the same
  params['boxes'][..., 2:] = 0.0  # w = h = 0
  params['boxes'][0, 0, :3] = [0.1, 0.9, -0.2, 0.0][:3] + [0.0]  # inverted width
  params['feats'][:] = 0.0  # zero features (normalisation at 0)
  params['logits'][:] = 0.0  # all equal scores: ties everywhere in the matching
  data['boxes'][1, :, 2:] = 0.0  # degenerate targets too
  (loss, terms), grads = _ours_fn(2, 2, True)(params, data)
  assert np.isfinite(loss)
  for v in terms.values():
    assert np.isfinite(v)
  for g in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(g))


def test_invalid_arguments():
  params, data = _problem(5, **PRETRAIN)
  targets = {'labels': data['labels'], 'boxes': data['boxes'], 'mask': data['mask']}
  outputs = _outputs(params, data, True)
  with pytest.raises(ValueError, match='greedy'):
    set_criterion(outputs, targets, num_classes=2, solver='greedy')
  with pytest.raises(ValueError, match='num_replicas'):
    set_criterion(outputs, targets, num_classes=2, num_replicas=3)
  with pytest.raises(ValueError, match='num_classes'):
    set_criterion(outputs, targets, num_classes=5)
  with pytest.raises(ValueError, match='gt_feature'):
    set_criterion(_outputs(params, data, False), targets, num_classes=2, feature_recon=True)


def test_configured_matching_costs_reach_the_training_loss():
  """matcher.cost_* decide the matching, and so the loss: two queries, one target, where
  the box term prefers query 0 and the class term query 1."""
  from updetr_jax import train_step  # noqa: PLC0415
  from updetr_jax.configs import finetune_coco  # noqa: PLC0415

  outputs = {
    'pred_logits': np.array([[[0.0, -4.0, 0.0], [4.0, -4.0, 0.0]]], np.float32),
    'pred_boxes': np.array([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]]], np.float32),
  }
  targets = {
    'labels': np.array([[0]], np.int32),
    'boxes': np.array([[[0.5, 0.5, 0.2, 0.2]]], np.float32),
    'mask': np.array([[True]]),
  }
  config = finetune_coco.get_config()
  config.model.num_classes = 2
  config.loss_replicas = 1
  loss = {}
  for name, costs in {'box': (0.0, 5.0, 2.0), 'class': (100.0, 0.0, 0.0)}.items():
    config.matcher.update(dict(zip(('cost_class', 'cost_bbox', 'cost_giou'), costs)))
    _, terms = train_step.criterion(config)(outputs, targets)
    loss[name] = float(terms['loss_bbox'])
  assert loss['box'] < 1e-6  # query 0 sits on the target
  assert loss['class'] > 0.1  # query 1, the confident one, was matched instead
