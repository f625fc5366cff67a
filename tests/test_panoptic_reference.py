"""Panoptic quality cases worked out by hand, against tests/panoptic_reference.py.

Each case is a small id map pair whose PQ / SQ / RQ are computed in the comments;
where a rule matters, the same case under a wrong rule (the reference's underscore
arguments, or a wrong aggregation done here) gives a different answer, so the
expected values pin the rule down.
"""

import numpy as np
import pytest

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import panoptic_reference as ref  # noqa: E402

approx = pytest.approx

PERSON, CAR, SKY, GRASS = 1, 2, 3, 4
CATEGORIES = {
  PERSON: {'isthing': 1, 'name': 'person'},
  CAR: {'isthing': 1, 'name': 'car'},
  SKY: {'isthing': 0, 'name': 'sky'},
  GRASS: {'isthing': 0, 'name': 'grass'},
}


def _segs(*items):
  """(id, category_id[, iscrowd]) tuples -> a segments_info list."""
  out = []
  for item in items:
    seg_id, cat = item[0], item[1]
    seg = {'id': seg_id, 'category_id': cat}
    if len(item) > 2:
      seg['iscrowd'] = item[2]
    out.append(seg)
  return out


def _gt_segs(*items):
  """Ground-truth segments_info: iscrowd 0 unless given."""
  return [dict(s, iscrowd=s.get('iscrowd', 0)) for s in _segs(*items)]


def _pq(images, **kw):
  return ref.pq_compute(images, CATEGORIES, **kw)


def _check_group(result, pq, sq, rq, n):
  assert result['n'] == n
  assert result['pq'] == approx(pq)
  assert result['sq'] == approx(sq)
  assert result['rq'] == approx(rq)


def _check_class(result, cat, pq, sq, rq, tp, fp, fn):
  c = result['per_class'][cat]
  assert (c['tp'], c['fp'], c['fn']) == (tp, fp, fn)
  assert c['pq'] == approx(pq)
  assert c['sq'] == approx(sq)
  assert c['rq'] == approx(rq)


# ----------------------------------------------------------------------------------
# (1) Perfect prediction
# ----------------------------------------------------------------------------------
PERFECT_GT = np.array(
  [
    [11, 11, 11, 12, 12, 12],
    [11, 11, 11, 12, 12, 12],
    [11, 11, 11, 12, 12, 12],
    [13, 13, 13, 13, 13, 13],
    [13, 13, 13, 13, 13, 13],
    [13, 13, 13, 13, 13, 13],
  ]
)
PERFECT_GT_SEGS = _gt_segs((11, PERSON), (12, CAR), (13, SKY))


def _perfect_pred():
  # The same regions under other ids: ids carry no meaning across the two maps.
  pred = np.select([PERFECT_GT == 11, PERFECT_GT == 12], [7, 8], 9)
  return pred, _segs((7, PERSON), (8, CAR), (9, SKY))


def test_perfect_prediction():
  pred, pred_segs = _perfect_pred()
  r = _pq([(PERFECT_GT, PERFECT_GT_SEGS, pred, pred_segs)])
  # person, car, sky: tp 1 each with IoU 1 -> PQ = SQ = RQ = 1; grass appears nowhere.
  for cat in (PERSON, CAR, SKY):
    _check_class(r, cat, 1.0, 1.0, 1.0, tp=1, fp=0, fn=0)
  _check_group(r['All'], 1.0, 1.0, 1.0, n=3)
  _check_group(r['Things'], 1.0, 1.0, 1.0, n=2)
  _check_group(r['Stuff'], 1.0, 1.0, 1.0, n=1)


# ----------------------------------------------------------------------------------
# (2) One missed segment
# ----------------------------------------------------------------------------------
def test_one_missed_segment():
  gt = np.array(
    [
      [1, 1, 1, 2, 2, 2],
      [1, 1, 1, 2, 2, 2],
      [1, 1, 1, 2, 2, 2],
      [3, 3, 3, 3, 3, 3],
      [3, 3, 3, 3, 3, 3],
      [3, 3, 3, 3, 3, 3],
    ]
  )
  gt_segs = _gt_segs((1, PERSON), (2, PERSON), (3, SKY))
  # The second person (gt id 2) is left unlabelled (0) in the prediction.
  pred = np.array(
    [
      [5, 5, 5, 0, 0, 0],
      [5, 5, 5, 0, 0, 0],
      [5, 5, 5, 0, 0, 0],
      [6, 6, 6, 6, 6, 6],
      [6, 6, 6, 6, 6, 6],
      [6, 6, 6, 6, 6, 6],
    ]
  )
  r = _pq([(gt, gt_segs, pred, _segs((5, PERSON), (6, SKY)))])
  # person: tp 1 (IoU 9/9 = 1), fn 1 -> PQ = 1 / (1 + 1/2) = 2/3, SQ = 1, RQ = 2/3.
  _check_class(r, PERSON, 2 / 3, 1.0, 2 / 3, tp=1, fp=0, fn=1)
  # sky: exact -> 1, 1, 1.
  _check_class(r, SKY, 1.0, 1.0, 1.0, tp=1, fp=0, fn=0)
  # All: PQ = (2/3 + 1) / 2 = 5/6, SQ = (1 + 1) / 2 = 1, RQ = 5/6.
  _check_group(r['All'], 5 / 6, 1.0, 5 / 6, n=2)
  _check_group(r['Things'], 2 / 3, 1.0, 2 / 3, n=1)
  _check_group(r['Stuff'], 1.0, 1.0, 1.0, n=1)


# ----------------------------------------------------------------------------------
# (3) One false segment
# ----------------------------------------------------------------------------------
def test_one_false_segment():
  gt = np.array(
    [
      [1, 1, 1, 2, 2, 2],
      [1, 1, 1, 2, 2, 2],
      [1, 1, 1, 2, 2, 2],
      [2, 2, 2, 2, 2, 2],
      [2, 2, 2, 2, 2, 2],
      [2, 2, 2, 2, 2, 2],
    ]
  )
  gt_segs = _gt_segs((1, PERSON), (2, SKY))
  # A 2x2 car (id 8) cut out of the sky; no car in the ground truth.
  pred = np.array(
    [
      [5, 5, 5, 6, 6, 6],
      [5, 5, 5, 6, 6, 6],
      [5, 5, 5, 6, 6, 6],
      [6, 6, 6, 6, 6, 6],
      [6, 6, 6, 6, 8, 8],
      [6, 6, 6, 6, 8, 8],
    ]
  )
  r = _pq([(gt, gt_segs, pred, _segs((5, PERSON), (6, SKY), (8, CAR)))])
  # person: exact -> 1, 1, 1.
  _check_class(r, PERSON, 1.0, 1.0, 1.0, tp=1, fp=0, fn=0)
  # sky: gt 27 px, pred 23 px, all on gt sky -> IoU 23 / 27, tp 1 -> PQ = SQ = 23/27, RQ 1.
  _check_class(r, SKY, 23 / 27, 23 / 27, 1.0, tp=1, fp=0, fn=0)
  # car: fp 1 (4 px on sky, none on VOID) -> PQ = RQ = 0, SQ = 0 (no tp), still counted.
  _check_class(r, CAR, 0.0, 0.0, 0.0, tp=0, fp=1, fn=0)
  # All (person, car, sky): PQ = SQ = (1 + 0 + 23/27) / 3 = 50/81, RQ = (1 + 0 + 1) / 3.
  _check_group(r['All'], 50 / 81, 50 / 81, 2 / 3, n=3)
  # Things (person, car): (1 + 0) / 2 for each; Stuff: sky alone.
  _check_group(r['Things'], 0.5, 0.5, 0.5, n=2)
  _check_group(r['Stuff'], 23 / 27, 23 / 27, 1.0, n=1)


# ----------------------------------------------------------------------------------
# (4) VOID pixels
# ----------------------------------------------------------------------------------
VOID_GT = np.array(
  [
    [1, 1, 1, 0, 0, 3],
    [1, 1, 1, 0, 0, 3],
    [3, 3, 3, 3, 3, 3],
    [3, 3, 3, 3, 3, 3],
    [3, 3, 3, 0, 0, 0],
    [3, 3, 3, 0, 0, 0],
  ]
)
VOID_GT_SEGS = _gt_segs((1, PERSON), (3, SKY))
VOID_PRED = np.array(
  [
    [0, 7, 7, 7, 7, 6],
    [0, 7, 7, 7, 7, 6],
    [6, 6, 6, 6, 6, 6],
    [6, 6, 6, 6, 6, 6],
    [6, 6, 8, 8, 8, 8],
    [6, 6, 8, 8, 8, 8],
  ]
)
VOID_PRED_SEGS = _segs((7, PERSON), (6, SKY), (8, CAR))


def test_void_pixels():
  r = _pq([(VOID_GT, VOID_GT_SEGS, VOID_PRED, VOID_PRED_SEGS)])
  # person: gt 6 px (rows 0-1, cols 0-2); pred 8 px (rows 0-1, cols 1-4) of which
  #   4 on the gt person and 4 on VOID. union = 8 + 6 - 4 - 4 = 6 -> IoU = 4/6 = 2/3 > 0.5:
  #   tp 1 -> PQ = SQ = 2/3, RQ = 1.
  _check_class(r, PERSON, 2 / 3, 2 / 3, 1.0, tp=1, fp=0, fn=0)
  # sky: gt 2 + 12 + 6 = 20 px; pred 2 + 12 + 4 = 18 px, all on gt sky, none on VOID:
  #   IoU = 18 / (18 + 20 - 18) = 0.9.
  _check_class(r, SKY, 0.9, 0.9, 1.0, tp=1, fp=0, fn=0)
  # car: 8 px (rows 4-5, cols 2-5), 6 on VOID: 6/8 > 1/2 -> not an fp; no car anywhere
  #   else, so car is left out of the means.
  _check_class(r, CAR, 0.0, 0.0, 0.0, tp=0, fp=0, fn=0)
  # All (person, sky): PQ = SQ = (2/3 + 0.9) / 2 = 47/60, RQ 1.
  _check_group(r['All'], 47 / 60, 47 / 60, 1.0, n=2)
  _check_group(r['Things'], 2 / 3, 2 / 3, 1.0, n=1)
  _check_group(r['Stuff'], 0.9, 0.9, 1.0, n=1)


def test_void_pixels_under_wrong_rules():
  image = [(VOID_GT, VOID_GT_SEGS, VOID_PRED, VOID_PRED_SEGS)]
  # VOID kept in the union: person union = 8 + 6 - 4 = 10 -> IoU 0.4, no match; person
  #   fn 1, and its prediction (4/8 on VOID, not more than half) fp 1 -> PQ 0.
  #   All (person, sky): PQ = SQ = (0 + 0.9) / 2 = 0.45, RQ = (0 + 1) / 2.
  r = _pq(image, _void_rule='void_in_union')
  _check_class(r, PERSON, 0.0, 0.0, 0.0, tp=0, fp=1, fn=1)
  _check_group(r['All'], 0.45, 0.45, 0.5, n=2)
  assert r['All']['pq'] != approx(47 / 60)
  # VOID not excusing an fp: the car becomes fp 1 and enters the means with 0:
  #   All (person, car, sky): PQ = (2/3 + 0 + 0.9) / 3 = 47/90.
  r = _pq(image, _void_rule='void_not_ignored')
  _check_class(r, CAR, 0.0, 0.0, 0.0, tp=0, fp=1, fn=0)
  _check_group(r['All'], 47 / 90, 47 / 90, 2 / 3, n=3)
  _check_group(r['Things'], 1 / 3, 1 / 3, 0.5, n=2)


def test_prediction_exactly_half_on_void_is_a_false_positive():
  gt = np.array(
    [
      [3, 3, 0, 0],
      [3, 3, 0, 0],
      [3, 3, 0, 0],
      [3, 3, 0, 0],
    ]
  )
  pred = np.array(
    [
      [6, 8, 8, 0],
      [6, 8, 8, 0],
      [6, 6, 0, 0],
      [6, 6, 0, 0],
    ]
  )
  r = _pq([(gt, _gt_segs((3, SKY)), pred, _segs((6, SKY), (8, CAR)))])
  # car: 4 px, 2 on VOID: 2/4 is not more than 1/2 -> fp 1.
  _check_class(r, CAR, 0.0, 0.0, 0.0, tp=0, fp=1, fn=0)
  # sky: gt 8 px, pred 6 px on it -> IoU 6/8 = 0.75.
  _check_class(r, SKY, 0.75, 0.75, 1.0, tp=1, fp=0, fn=0)
  # All (car, sky): PQ = SQ = (0 + 0.75) / 2 = 0.375, RQ = (0 + 1) / 2.
  _check_group(r['All'], 0.375, 0.375, 0.5, n=2)


# ----------------------------------------------------------------------------------
# (5) Crowd region
# ----------------------------------------------------------------------------------
CROWD_GT = np.array(
  [
    [1, 1, 1, 2, 2, 2],
    [1, 1, 1, 2, 2, 2],
    [1, 1, 1, 2, 2, 2],
    [3, 3, 3, 3, 3, 3],
    [3, 3, 3, 3, 3, 3],
    [3, 3, 3, 3, 3, 3],
  ]
)
CROWD_GT_SEGS = _gt_segs((1, PERSON), (2, PERSON, 1), (3, SKY))  # id 2: a crowd of people
CROWD_PRED = np.array(
  [
    [5, 5, 5, 8, 8, 8],
    [5, 5, 5, 6, 6, 6],
    [5, 5, 5, 6, 6, 6],
    [7, 7, 7, 7, 7, 7],
    [7, 7, 7, 7, 7, 7],
    [7, 7, 7, 7, 7, 7],
  ]
)
CROWD_PRED_SEGS = _segs((5, PERSON), (6, PERSON), (7, SKY), (8, CAR))


def test_crowd_region():
  r = _pq([(CROWD_GT, CROWD_GT_SEGS, CROWD_PRED, CROWD_PRED_SEGS)])
  # person: id 1 matched exactly (IoU 1); the crowd (id 2) is no fn; pred id 6 (6 px, all
  #   on the person crowd) is not an fp -> tp 1, fp 0, fn 0 -> 1, 1, 1.
  _check_class(r, PERSON, 1.0, 1.0, 1.0, tp=1, fp=0, fn=0)
  # car: pred id 8 (3 px) lies on the crowd of another category -> fp 1 -> 0, 0, 0.
  _check_class(r, CAR, 0.0, 0.0, 0.0, tp=0, fp=1, fn=0)
  _check_class(r, SKY, 1.0, 1.0, 1.0, tp=1, fp=0, fn=0)
  # All (person, car, sky): (1 + 0 + 1) / 3 = 2/3 each; Things (person, car): 1/2 each.
  _check_group(r['All'], 2 / 3, 2 / 3, 2 / 3, n=3)
  _check_group(r['Things'], 0.5, 0.5, 0.5, n=2)
  _check_group(r['Stuff'], 1.0, 1.0, 1.0, n=1)


def test_crowd_region_under_wrong_rules():
  image = [(CROWD_GT, CROWD_GT_SEGS, CROWD_PRED, CROWD_PRED_SEGS)]
  # Crowd as an ordinary segment: pred id 6 (6 px) vs gt id 2 (9 px): IoU = 6 / 9 = 2/3
  #   -> a second person tp: iou sum 1 + 2/3 -> PQ = SQ = (5/3) / 2 = 5/6, RQ 1.
  #   All: PQ = (5/6 + 0 + 1) / 3 = 11/18.
  r = _pq(image, _crowd_rule='as_regular')
  _check_class(r, PERSON, 5 / 6, 5 / 6, 1.0, tp=2, fp=0, fn=0)
  assert r['All']['pq'] == approx(11 / 18)
  assert r['All']['pq'] != approx(2 / 3)
  # Crowd not excusing an fp: pred id 6 becomes a person fp -> PQ = 1 / (1 + 1/2) = 2/3.
  #   All: PQ = (2/3 + 0 + 1) / 3 = 5/9.
  r = _pq(image, _crowd_rule='not_ignored_for_fp')
  _check_class(r, PERSON, 2 / 3, 1.0, 2 / 3, tp=1, fp=1, fn=0)
  assert r['All']['pq'] == approx(5 / 9)


# ----------------------------------------------------------------------------------
# (6) Stuff as one segment per class; things / stuff averages
# ----------------------------------------------------------------------------------
STUFF_GT = np.array(
  [
    [30, 30, 20, 20, 30, 30],
    [30, 30, 20, 20, 30, 30],
    [20, 20, 20, 20, 20, 20],
    [20, 20, 10, 10, 20, 20],
    [20, 20, 10, 10, 20, 20],
    [20, 20, 20, 20, 20, 20],
  ]
)
STUFF_GT_SEGS = _gt_segs((10, PERSON), (20, SKY), (30, GRASS))  # grass: two regions, one id
STUFF_PRED = np.array(
  [
    [3, 3, 2, 2, 3, 3],
    [3, 3, 2, 2, 3, 3],
    [2, 2, 2, 2, 2, 2],
    [2, 2, 1, 1, 2, 2],
    [2, 2, 1, 2, 2, 2],
    [2, 2, 2, 2, 2, 2],
  ]
)
STUFF_PRED_SEGS = _segs((1, PERSON), (2, SKY), (3, GRASS))


def test_stuff_segment_with_two_regions():
  r = _pq([(STUFF_GT, STUFF_GT_SEGS, STUFF_PRED, STUFF_PRED_SEGS)])
  # grass: both regions (8 px) one gt segment, one pred segment on them -> IoU 1.
  _check_class(r, GRASS, 1.0, 1.0, 1.0, tp=1, fp=0, fn=0)
  # sky: gt 24 px; pred 25 px (its 24 + one person pixel) -> IoU 24/25 = 0.96.
  _check_class(r, SKY, 0.96, 0.96, 1.0, tp=1, fp=0, fn=0)
  # person: gt 4 px, pred 3 px on it -> IoU 3/4.
  _check_class(r, PERSON, 0.75, 0.75, 1.0, tp=1, fp=0, fn=0)
  # Things (person): 0.75. Stuff (sky, grass): PQ = SQ = (0.96 + 1) / 2 = 0.98.
  _check_group(r['Things'], 0.75, 0.75, 1.0, n=1)
  _check_group(r['Stuff'], 0.98, 0.98, 1.0, n=2)
  # All: the mean over the 3 classes, (0.75 + 0.96 + 1) / 3 = 2.71 / 3, not the mean of
  #   the Things and Stuff means, (0.75 + 0.98) / 2 = 0.865.
  _check_group(r['All'], 2.71 / 3, 2.71 / 3, 1.0, n=3)
  assert r['All']['pq'] != approx((r['Things']['pq'] + r['Stuff']['pq']) / 2)


def test_stuff_split_into_components_is_wrong():
  # Splitting the gt grass into its two connected regions (ids 30 and 31, 4 px each):
  #   the one pred grass segment (8 px) has IoU 4/8 = 0.5 with each -> no match; fn 2,
  #   fp 1 -> grass PQ 0; Stuff = (0.96 + 0) / 2 = 0.48; All = (0.75 + 0.96) / 3 = 0.57.
  split = STUFF_GT.copy()
  split[:2, 4:] = 31
  segs = STUFF_GT_SEGS + _gt_segs((31, GRASS))
  r = _pq([(split, segs, STUFF_PRED, STUFF_PRED_SEGS)])
  _check_class(r, GRASS, 0.0, 0.0, 0.0, tp=0, fp=1, fn=2)
  _check_group(r['Stuff'], 0.48, 0.48, 0.5, n=2)
  assert r['All']['pq'] == approx(0.57)
  assert r['All']['pq'] != approx(2.71 / 3)


# ----------------------------------------------------------------------------------
# (7) IoU of exactly 0.5
# ----------------------------------------------------------------------------------
HALF_GT = np.array(
  [
    [1, 1, 3, 3],
    [1, 1, 3, 3],
    [3, 3, 3, 3],
    [3, 3, 3, 3],
  ]
)
HALF_PRED = np.array(
  [
    [5, 7, 7, 7],
    [5, 7, 7, 7],
    [7, 7, 7, 7],
    [7, 7, 7, 7],
  ]
)
HALF_IMAGE = [(HALF_GT, _gt_segs((1, PERSON), (3, SKY)), HALF_PRED, _segs((5, PERSON), (7, SKY)))]


def test_iou_of_one_half_is_not_a_match():
  r = _pq(HALF_IMAGE)
  # person: gt 4 px, pred 2 px inside it -> IoU = 2 / (2 + 4 - 2) = 0.5, not > 0.5:
  #   fn 1, fp 1 -> 0, 0, 0.
  _check_class(r, PERSON, 0.0, 0.0, 0.0, tp=0, fp=1, fn=1)
  # sky: gt 12 px, pred 14 px -> IoU 12/14 = 6/7.
  _check_class(r, SKY, 6 / 7, 6 / 7, 1.0, tp=1, fp=0, fn=0)
  # All: PQ = SQ = (0 + 6/7) / 2 = 3/7, RQ = (0 + 1) / 2.
  _check_group(r['All'], 3 / 7, 3 / 7, 0.5, n=2)


def test_iou_of_one_half_under_wrong_thresholds():
  # IoU >= 0.5: person tp 1 with IoU 0.5 -> PQ = SQ = 0.5, RQ 1;
  #   All: PQ = (0.5 + 6/7) / 2 = 19/28.
  r = _pq(HALF_IMAGE, _iou_strict=False)
  _check_class(r, PERSON, 0.5, 0.5, 1.0, tp=1, fp=0, fn=0)
  assert r['All']['pq'] == approx(19 / 28)
  assert r['All']['pq'] != approx(3 / 7)
  # A lower threshold (> 0.4) matches as well.
  r = _pq(HALF_IMAGE, _iou_threshold=0.4)
  assert r['per_class'][PERSON]['tp'] == 1
  # Per image, the same through pq_image_stats.
  stats = ref.pq_image_stats(*HALF_IMAGE[0], CATEGORIES)
  assert stats[PERSON] == {'tp': 0, 'fp': 1, 'fn': 1, 'iou': 0.0}
  stats = ref.pq_image_stats(*HALF_IMAGE[0], CATEGORIES, _iou_strict=False)
  assert stats[PERSON]['tp'] == 1 and stats[PERSON]['iou'] == approx(0.5)


# ----------------------------------------------------------------------------------
# (8) Categories present only in the prediction, or nowhere
# ----------------------------------------------------------------------------------
def test_category_only_predicted_counts_and_absent_one_is_skipped():
  gt = np.array(
    [
      [1, 1, 3, 3],
      [1, 1, 3, 3],
      [3, 3, 3, 3],
      [3, 3, 3, 3],
    ]
  )
  pred = np.array(
    [
      [5, 5, 7, 7],
      [5, 5, 7, 7],
      [7, 7, 7, 7],
      [9, 9, 9, 9],
    ]
  )
  r = _pq([(gt, _gt_segs((1, PERSON), (3, SKY)), pred, _segs((5, PERSON), (7, SKY), (9, GRASS)))])
  _check_class(r, PERSON, 1.0, 1.0, 1.0, tp=1, fp=0, fn=0)
  # sky: gt 12 px, pred 8 px on it -> IoU 8/12 = 2/3.
  _check_class(r, SKY, 2 / 3, 2 / 3, 1.0, tp=1, fp=0, fn=0)
  # grass: only predicted (4 px on sky) -> fp 1 -> 0, 0, 0, and it counts.
  _check_class(r, GRASS, 0.0, 0.0, 0.0, tp=0, fp=1, fn=0)
  # car: nowhere -> zeros, left out of n.
  _check_class(r, CAR, 0.0, 0.0, 0.0, tp=0, fp=0, fn=0)
  # All (person, sky, grass): PQ = SQ = (1 + 2/3 + 0) / 3 = 5/9, RQ = (1 + 1 + 0) / 3.
  _check_group(r['All'], 5 / 9, 5 / 9, 2 / 3, n=3)
  # Things: person only (car skipped) -> 1. Stuff (sky, grass): (2/3 + 0) / 2 = 1/3.
  _check_group(r['Things'], 1.0, 1.0, 1.0, n=1)
  _check_group(r['Stuff'], 1 / 3, 1 / 3, 0.5, n=2)
  # Wrong averages: over every category (car as 0), (5/3) / 4 = 5/12; over the ground
  #   truth categories only (grass left out), (1 + 2/3) / 2 = 5/6.
  all_cats = np.mean([c['pq'] for c in r['per_class'].values()])
  assert all_cats == approx(5 / 12) and r['All']['pq'] != approx(all_cats)
  gt_cats = np.mean([r['per_class'][c]['pq'] for c in (PERSON, SKY)])
  assert gt_cats == approx(5 / 6) and r['All']['pq'] != approx(gt_cats)


def test_group_without_categories_gives_zeros():
  # Stuff only: Things has n = 0 and reports zeros.
  gt = np.full((4, 4), 3)
  pred = np.full((4, 4), 6)
  r = _pq([(gt, _gt_segs((3, SKY)), pred, _segs((6, SKY)))])
  _check_group(r['Things'], 0.0, 0.0, 0.0, n=0)
  _check_group(r['Stuff'], 1.0, 1.0, 1.0, n=1)
  _check_group(r['All'], 1.0, 1.0, 1.0, n=1)


# ----------------------------------------------------------------------------------
# (9) Several images
# ----------------------------------------------------------------------------------
def test_images_accumulate_per_class_before_the_means():
  gt = np.array(
    [
      [1, 1, 3, 3],
      [1, 1, 3, 3],
      [3, 3, 3, 3],
      [3, 3, 3, 3],
    ]
  )
  gt_segs = _gt_segs((1, PERSON), (3, SKY))
  # Image A: exact. Image B: sky predicted over the whole image (person missed).
  image_a = (gt, gt_segs, np.where(gt == 1, 5, 7), _segs((5, PERSON), (7, SKY)))
  image_b = (gt, gt_segs, np.full((4, 4), 7), _segs((7, SKY)))
  r = _pq([image_a, image_b])
  # person: A tp 1 (IoU 1), B fn 1 -> PQ = 1 / (1 + 1/2) = 2/3, SQ 1, RQ 2/3.
  _check_class(r, PERSON, 2 / 3, 1.0, 2 / 3, tp=1, fp=0, fn=1)
  # sky: A IoU 1, B IoU 12/16 = 0.75 -> tp 2, iou 1.75 -> PQ = SQ = 0.875, RQ 1.
  _check_class(r, SKY, 0.875, 0.875, 1.0, tp=2, fp=0, fn=0)
  # All: PQ = (2/3 + 7/8) / 2 = 37/48, SQ = (1 + 7/8) / 2 = 15/16, RQ = (2/3 + 1) / 2 = 5/6.
  _check_group(r['All'], 37 / 48, 15 / 16, 5 / 6, n=2)
  # Wrong: the mean of per-image results. A: 1; B: person (fn only) 0, sky 0.75 ->
  #   0.375; mean PQ (1 + 0.375) / 2 = 33/48.
  per_image = [_pq([image])['All']['pq'] for image in (image_a, image_b)]
  assert np.mean(per_image) == approx(33 / 48)
  assert r['All']['pq'] != approx(np.mean(per_image))
  # Order of the images does not matter.
  assert _pq([image_b, image_a]) == r


# ----------------------------------------------------------------------------------
# Ground-truth areas, id encoding, errors
# ----------------------------------------------------------------------------------
def test_gt_area_field_is_used_when_given():
  pred, pred_segs = _perfect_pred()
  counted = _pq([(PERFECT_GT, PERFECT_GT_SEGS, pred, pred_segs)])
  areas = {11: 9, 12: 9, 13: 18}
  given = [dict(s, area=areas[s['id']]) for s in PERFECT_GT_SEGS]
  assert _pq([(PERFECT_GT, given, pred, pred_segs)]) == counted
  # A given person area of 12: union = 9 + 12 - 9 = 12 -> IoU 9/12 = 0.75.
  given[0]['area'] = 12
  r = _pq([(PERFECT_GT, given, pred, pred_segs)])
  _check_class(r, PERSON, 0.75, 0.75, 1.0, tp=1, fp=0, fn=0)


def test_id_rgb_round_trip():
  assert ref.id2rgb(1) == [1, 0, 0]
  assert ref.id2rgb(256) == [0, 1, 0]
  assert ref.id2rgb(65536) == [0, 0, 1]
  assert ref.id2rgb(256**3 - 1) == [255, 255, 255]
  assert ref.rgb2id([255, 255, 255]) == 256**3 - 1
  assert ref.rgb2id((3, 2, 1)) == 3 + 256 * 2 + 65536
  ids = np.array([[0, 1, 255], [256, 65535, 65536], [123456, 7654321, 256**3 - 1]])
  rgb = ref.id2rgb(ids)
  assert rgb.dtype == np.uint8 and rgb.shape == (3, 3, 3)
  np.testing.assert_array_equal(rgb[1, 1], [255, 255, 0])
  # uint8 input must not overflow: R + 256 G + 256^2 B on wider integers.
  np.testing.assert_array_equal(ref.rgb2id(rgb), ids)
  # Maps read back from colours score the same as the id maps.
  pred, pred_segs = _perfect_pred()
  via_rgb = ref.rgb2id(ref.id2rgb(pred))
  assert _pq([(PERFECT_GT, PERFECT_GT_SEGS, via_rgb, pred_segs)]) == _pq(
    [(PERFECT_GT, PERFECT_GT_SEGS, pred, pred_segs)]
  )


def test_errors():
  pred, pred_segs = _perfect_pred()
  gt, gt_segs = PERFECT_GT, PERFECT_GT_SEGS
  # A map id not in segments_info.
  with pytest.raises(ValueError, match='id 9 is in the predicted map but not in'):
    _pq([(gt, gt_segs, pred, pred_segs[:2])])
  # A listed id absent from the map.
  with pytest.raises(ValueError, match=r'ids \[42\] are in the predicted segments_info but not'):
    _pq([(gt, gt_segs, pred, pred_segs + _segs((42, CAR)))])
  # An unknown category.
  with pytest.raises(ValueError, match='unknown category_id 99'):
    _pq([(gt, gt_segs, pred, pred_segs[:2] + _segs((9, 99)))])
  # The error names the image.
  with pytest.raises(ValueError, match='image 1'):
    _pq([(gt, gt_segs, pred, pred_segs), (gt, gt_segs, pred, pred_segs[:2])])
  # Shapes must agree.
  with pytest.raises(ValueError, match='differ in shape'):
    _pq([(gt, gt_segs, pred[:5], pred_segs)])
  # Unlabelled predicted pixels (id 0) need no entry.
  pred0 = pred.copy()
  pred0[0, 0] = 0
  r = _pq([(gt, gt_segs, pred0, pred_segs)])
  # person: pred 8 px on the 9 px gt -> IoU 8/9.
  assert r['per_class'][PERSON]['pq'] == approx(8 / 9)
