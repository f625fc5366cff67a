"""One-shot AP50 (evaluate.oneshot_ap50 / oneshot_ground_truth): the per-class, seen and
unseen AP50 equal an independent computation on the same detections (1e-9).

The reference below is written from scratch in the classic py-faster-rcnn ``voc_eval``
style and uses nothing of ``updetr_jax.evaluate``: per class c, gather the detections
of every trial of class c, sort them by descending score, match each greedily to the
highest-IoU ground-truth box of its trial (IoU > 0.5: true positive unless the box is
taken (false positive) or difficult (ignored); else false positive), recall over the
non-difficult boxes, and ``voc_ap(rec, prec, use_07_metric=True)``. Continuous
coordinates (no "+1" pixel). The recall thresholds are exactly k / 10 as
``evaluate.voc07_ap50`` documents (py-faster-rcnn's ``np.arange(0., 1.1, 0.1)`` holds
0.30000000000000004, 0.6000000000000001 and 0.7000000000000001, which differ from
that when a recall is exactly 0.3, 0.6 or 0.7).
"""

import numpy as np
import pytest

from updetr_jax import evaluate

THRESHOLDS = [k / 10 for k in range(11)]


# --- the independent reference ------------------------------------------------------------


def _ref_iou(box, gts):
  """IoU of one xyxy box with gts [g, 4], continuous coordinates, float64."""
  gts = np.asarray(gts, np.float64).reshape(-1, 4)
  ixmin = np.maximum(gts[:, 0], box[0])
  iymin = np.maximum(gts[:, 1], box[1])
  ixmax = np.minimum(gts[:, 2], box[2])
  iymax = np.minimum(gts[:, 3], box[3])
  iw = np.maximum(ixmax - ixmin, 0.0)
  ih = np.maximum(iymax - iymin, 0.0)
  inters = iw * ih
  uni = (
    (box[2] - box[0]) * (box[3] - box[1])
    + (gts[:, 2] - gts[:, 0]) * (gts[:, 3] - gts[:, 1])
    - inters
  )
  return inters / uni


def _ref_voc_ap_07(rec, prec):
  ap = 0.0
  for t in THRESHOLDS:
    if np.sum(rec >= t) == 0:
      p = 0.0
    else:
      p = np.max(prec[rec >= t])
    ap = ap + p / 11.0
  return ap


def _ref_voc_eval(trials, c, ovthresh=0.5):
  """AP of class c over ``trials`` [(label, det_boxes, det_scores, gt_boxes,
  gt_difficult)]; nan without non-difficult ground truth."""
  class_recs = {}
  npos = 0
  image_ids, confidence, bb = [], [], []
  for t, (label, dboxes, dscores, gboxes, gdiff) in enumerate(trials):
    if label != c:
      continue
    difficult = np.asarray(gdiff, bool)
    class_recs[t] = {
      'bbox': np.asarray(gboxes, np.float64).reshape(-1, 4),
      'difficult': difficult,
      'det': [False] * len(difficult),
    }
    npos += int(np.sum(~difficult))
    for box, score in zip(np.asarray(dboxes).reshape(-1, 4), np.asarray(dscores).reshape(-1)):
      image_ids.append(t)
      confidence.append(float(score))
      bb.append(np.asarray(box, np.float64))
  if npos == 0:
    return float('nan')
  nd = len(image_ids)
  tp, fp = np.zeros(nd), np.zeros(nd)
  if nd:
    sorted_ind = np.argsort(-np.asarray(confidence))
    bb = np.asarray(bb)[sorted_ind]
    image_ids = [image_ids[x] for x in sorted_ind]
    for d in range(nd):
      r = class_recs[image_ids[d]]
      ovmax = -np.inf
      if r['bbox'].size > 0:
        overlaps = _ref_iou(bb[d], r['bbox'])
        ovmax = np.max(overlaps)
        jmax = int(np.argmax(overlaps))
      if ovmax > ovthresh:
        if not r['difficult'][jmax]:
          if not r['det'][jmax]:
            tp[d] = 1.0
            r['det'][jmax] = True
          else:
            fp[d] = 1.0
      else:
        fp[d] = 1.0
  fp, tp = np.cumsum(fp), np.cumsum(tp)
  rec = tp / float(npos)
  prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
  return _ref_voc_ap_07(rec, prec)


def _reference(trials, seen, unseen):
  classes = sorted({t[0] for t in trials} | set(seen) | set(unseen))
  per_class = {c: _ref_voc_eval(trials, c) for c in classes}

  def mean(cs):
    v = [per_class[c] for c in cs if not np.isnan(per_class[c])]
    return sum(v) / len(v) if v else float('nan')

  return per_class, mean(seen), mean(unseen)


# --- random trials ---------------------------------------------------------------------------


def _rand_box(rng, w=200.0, h=150.0):
  x0, y0 = rng.uniform(0, w - 20), rng.uniform(0, h - 20)
  return np.array([x0, y0, rng.uniform(x0 + 8, w), rng.uniform(y0 + 8, h)])


def _near(rng, gt, spread):
  """A box near gt: corners jittered by ``spread`` x its size."""
  w, h = gt[2] - gt[0], gt[3] - gt[1]
  j = rng.normal(0, spread, 4) * [w, h, w, h]
  box = gt + j
  box[2] = max(box[2], box[0] + 1.0)
  box[3] = max(box[3], box[1] + 1.0)
  return box


def _far_from_half(box, gts):
  """IoU with every box of gts away from 0.5: float32 (library) and float64 (reference)
  IoUs cannot decide a match differently."""
  return len(gts) == 0 or np.abs(_ref_iou(box, gts) - 0.5).min() > 1e-4


def _random_trials(rng, classes, *, n_trials, all_difficult=(), no_detections=(), perfect=()):
  """Trials [(label, det_boxes [k,4], det_scores [k], gt_boxes [g,4], difficult [g])]."""
  trials = []
  for c in classes:
    for _ in range(n_trials(c)):
      g = int(rng.integers(1, 5))
      gts = np.stack([_rand_box(rng) for _ in range(g)])
      diff = rng.random(g) < 0.2
      if c in all_difficult:
        diff[:] = True
      dets = []
      if c not in no_detections:
        for b in gts:
          for _ in range(int(rng.integers(0, 4)) if c not in perfect else 1):
            while True:
              d = _near(rng, b, 0.0 if c in perfect else rng.choice([0.03, 0.15, 0.35]))
              if _far_from_half(d, gts):
                break
            dets.append(d)
        for _ in range(int(rng.integers(0, 3)) if c not in perfect else 0):
          while True:
            d = _rand_box(rng)
            if _far_from_half(d, gts):
              break
          dets.append(d)
      if rng.random() < 0.15 and c not in perfect:  # a trial with no detection at all
        dets = []
      dets = np.asarray(dets, np.float64).reshape(-1, 4)
      trials.append((c, dets, None, gts, diff))
  # distinct scores over all detections (the ranking has no ties)
  total = sum(len(t[1]) for t in trials)
  scores = rng.permutation(total) / total + rng.uniform(0, 1e-3)
  out, k = [], 0
  order = rng.permutation(len(trials))  # trials of a class are not consecutive
  for i in order:
    c, dets, _, gts, diff = trials[i]
    out.append((c, dets, scores[k : k + len(dets)], gts, diff))
    k += len(dets)
  return out


def _library(trials, seen, unseen):
  dets = [{'label': c, 'boxes': b, 'scores': s} for c, b, s, _, _ in trials]
  gts = [{'boxes': g, 'difficult': d} for _, _, _, g, d in trials]
  return evaluate.oneshot_ap50(dets, gts, seen, unseen)


def _assert_same(trials, seen, unseen):
  out = _library(trials, seen, unseen)
  per_class, ref_seen, ref_unseen = _reference(trials, seen, unseen)
  assert set(out['per_class']) == set(per_class)
  for c, ap in per_class.items():
    if np.isnan(ap):
      assert np.isnan(out['per_class'][c]), c
    else:
      assert out['per_class'][c] == pytest.approx(ap, abs=1e-9), c
  for got, want in ((out['seen'], ref_seen), (out['unseen'], ref_unseen)):
    if np.isnan(want):
      assert np.isnan(got)
    else:
      assert got == pytest.approx(want, abs=1e-9)
  counts = {}
  for t in trials:
    counts[t[0]] = counts.get(t[0], 0) + 1
  assert out['trials'] == counts
  return out, per_class


SEEN = (0, 1, 2, 4, 6, 9)  # 9: no trial at all
UNSEEN = (3, 5, 7)


@pytest.mark.parametrize('seed', range(6))
def test_oneshot_ap50_equals_independent_voc_eval(seed):
  rng = np.random.default_rng(seed)
  trials = _random_trials(
    rng,
    [0, 1, 2, 3, 4, 5, 6, 7],
    n_trials=lambda c: int(rng.integers(2, 9)),
    all_difficult=(6,),  # a seen class with only difficult boxes: nan, not in the mean
    no_detections=(7,),  # an unseen class never detected: AP 0
    perfect=(4,),
  )
  out, ref = _assert_same(trials, SEEN, UNSEEN)
  assert np.isnan(ref[6]) and np.isnan(ref[9]) and ref[7] == 0.0
  # the APs are not trivial: several strictly between 0 and 1
  assert sum(0.05 < ref[c] < 0.95 for c in (0, 1, 2, 3, 5)) >= 3
  # the means are over their own classes only
  assert out['seen'] == pytest.approx(np.mean([ref[c] for c in (0, 1, 2, 4)]), abs=1e-12)
  assert out['unseen'] == pytest.approx(np.mean([ref[c] for c in (3, 5, 7)]), abs=1e-12)


def test_oneshot_ap50_hand_checked_cases():
  """Small cases whose AP is known by hand, through both implementations."""
  gt = np.array([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
  hit0, hit1 = gt[0] + [0.2, 0, 0.2, 0], gt[1] + [0, 0.3, 0, 0.3]
  miss = np.array([50.0, 50.0, 60.0, 60.0])
  trials = [
    # class 0: TP, FP (duplicate), TP -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    (0, np.stack([hit0, hit0, hit1]), np.array([0.9, 0.8, 0.7]), gt, np.zeros(2, bool)),
    # class 1: the difficult box is ignored: one TP on the other -> AP 1
    (1, np.stack([hit0, hit1]), np.array([0.6, 0.5]), gt, np.array([True, False])),
    # class 2: a miss ranked first, then a TP of one box of two -> recall 1/2 at prec 1/2
    (2, np.stack([miss, hit1]), np.array([0.95, 0.4]), gt, np.zeros(2, bool)),
  ]
  out, ref = _assert_same(trials, seen=(0, 1), unseen=(2,))
  assert ref[0] == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)  # t <= 0.5: 1; t > 0.5: 2/3
  assert ref[1] == pytest.approx(1.0)
  assert ref[2] == pytest.approx(6 / 11 * 0.5)
  assert out['seen'] == pytest.approx((ref[0] + 1.0) / 2)


def test_oneshot_ground_truth_uses_the_trial_class_only():
  """oneshot_ground_truth on a pycocotools ground truth (coco_gt_from_arrays): per trial
  only the boxes of the trial's class in its image, crowd -> difficult; the AP over it
  equals the reference on the arrays themselves."""
  rng = np.random.default_rng(11)
  label_to_cat = {0: 3, 1: 7, 2: 12, 3: 20}  # labels -> category ids
  image_ids = [10, 20, 30, 40, 50, 60]
  sizes = [(150, 200)] * len(image_ids)
  boxes, cats, crowd = [], [], []
  for i in range(len(image_ids)):
    k = int(rng.integers(3, 8))
    boxes.append(np.stack([_rand_box(rng) for _ in range(k)]))
    cats.append(rng.choice(list(label_to_cat.values()), k))
    crowd.append(rng.random(k) < 0.25)
  cats[0][:2] = 3  # two boxes of one class in one image, one of them crowd
  crowd[0][:2] = [False, True]
  gt = evaluate.coco_gt_from_arrays(
    image_ids, sizes, boxes, cats, crowd, categories={3: 'a', 7: 'b', 12: 'c', 20: 'd'}
  )
  # trials: every (image, class present); plus one absent class (no box, no positive)
  t_ids, t_labels = [], []
  for i, iid in enumerate(image_ids):
    for l, cat in label_to_cat.items():
      if (cats[i] == cat).any():
        t_ids.append(iid)
        t_labels.append(l)
  absent = next(
    (iid, l)
    for i, iid in enumerate(image_ids)
    for l, cat in label_to_cat.items()
    if not (cats[i] == cat).any()
  )
  t_ids.append(absent[0])
  t_labels.append(absent[1])
  truth = evaluate.oneshot_ground_truth(gt, t_ids, t_labels, label_to_cat)
  assert len(truth) == len(t_ids)
  trials = []
  for iid, l, g in zip(t_ids, t_labels, truth):
    i = image_ids.index(iid)
    sel = cats[i] == label_to_cat[l]
    assert g['boxes'].shape == (int(sel.sum()), 4)
    np.testing.assert_allclose(g['boxes'], boxes[i][sel], atol=1e-9)
    np.testing.assert_array_equal(g['difficult'], crowd[i][sel])
    dets = []
    for b in boxes[i]:  # detections near every box of the image, other classes too
      while True:
        d = _near(rng, b, rng.choice([0.03, 0.2]))
        if _far_from_half(d, boxes[i][sel]):
          break
      dets.append(d)
    trials.append((l, np.stack(dets), None, boxes[i][sel], crowd[i][sel]))
  total = sum(len(t[1]) for t in trials)
  scores = rng.permutation(total) / total
  k = 0
  for t, (l, d, _, g, c) in enumerate(trials):
    trials[t] = (l, d, scores[k : k + len(d)], g, c)
    k += len(d)
  seen, unseen = (0, 1), (2, 3)
  dets = [{'label': l, 'boxes': d, 'scores': s} for l, d, s, _, _ in trials]
  out = evaluate.oneshot_ap50(dets, truth, seen, unseen)
  per_class, ref_seen, ref_unseen = _reference(trials, seen, unseen)
  for c in per_class:
    assert out['per_class'][c] == pytest.approx(per_class[c], abs=1e-9, nan_ok=True), c
  assert out['seen'] == pytest.approx(ref_seen, abs=1e-9)
  assert out['unseen'] == pytest.approx(ref_unseen, abs=1e-9)
  assert sum(0.05 < per_class[c] < 0.95 for c in per_class) >= 2
  # scoring the trials against every box of the image (not the class's) differs
  everything = [
    {'boxes': boxes[image_ids.index(iid)], 'difficult': crowd[image_ids.index(iid)]}
    for iid in t_ids
  ]
  wrong = evaluate.oneshot_ap50(dets, everything, seen, unseen)['per_class']
  assert any(abs(wrong[c] - out['per_class'][c]) > 1e-3 for c in out['per_class'])


def test_oneshot_ground_truth_ignores_empty_boxes():
  """A zero-width or zero-height box of the json (dropped by the pipeline, so never a
  trial's target and never matchable) is ignored like a difficult one, not a miss."""
  boxes = [np.array([[10, 10, 50, 40], [5, 5, 5, 9], [20, 30, 60, 30]], np.float64)]
  gt = evaluate.coco_gt_from_arrays([1], [(100, 100)], boxes, [np.array([3, 3, 3])])
  (truth,) = evaluate.oneshot_ground_truth(gt, [1], [0], {0: 3})
  np.testing.assert_array_equal(truth['difficult'], [False, True, True])
  det = {'label': 0, 'boxes': np.array([[10.0, 10.0, 50.0, 40.0]]), 'scores': np.array([0.9])}
  assert evaluate.oneshot_ap50([det], [truth], (0,), ())['seen'] == 1.0
