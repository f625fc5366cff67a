"""Numpy reference of COCO panoptic quality (PQ, SQ, RQ) (test-only).

Written from the behaviour of panopticapi's evaluation (``pq_compute_single_core`` and
``PQStat.pq_average`` in ``panopticapi/evaluation.py``, ``rgb2id`` / ``id2rgb`` in
``panopticapi/utils.py``) and from the definition of panoptic quality in Kirillov et
al. 2019, 'Panoptic Segmentation'. Small id maps go in directly, so tests can state
PQ cases worked out on paper without PNG files or JSON.

Rules, per image
----------------
- Id 0 in the ground-truth map is VOID. Ground-truth ids that are neither 0 nor listed
  in the ground-truth ``segments_info`` take part in no match and are not VOID either.
- A predicted segment's area is its pixel count in the predicted map. A ground-truth
  segment's area is its ``'area'`` field when given (panopticapi reads it from the
  JSON), else its pixel count in the ground-truth map.
- A ground-truth segment and a predicted segment of the same category match when
  ``IoU > 0.5`` (strictly), with ``IoU = I / (area_pred + area_gt - I - V)``, ``I``
  their common pixels and ``V`` the predicted segment's pixels on VOID: the union
  leaves out the prediction's VOID pixels. IoU above 0.5 makes a match unique.
- Crowd ground-truth segments (``iscrowd == 1``) are never matched and are not false
  negatives; every other unmatched ground-truth segment is a false negative.
- An unmatched predicted segment is a false positive unless more than half of its
  area (strictly) lies on VOID plus the crowd region of its own category. Where a
  category has several crowd segments in one image only the last one listed is that
  region (panopticapi keeps one per category).
- Per category, over all images: ``tp``, ``fp``, ``fn`` and ``iou`` (the sum of the
  matched IoUs).

Averages
--------
Per category ``PQ = iou / (tp + fp / 2 + fn / 2)``, ``SQ = iou / tp`` (0 without a
match), ``RQ = tp / (tp + fp / 2 + fn / 2)``. 'All', 'Things' (``isthing == 1``) and
'Stuff' are the plain means over the categories of that group with
``tp + fp + fn > 0``; ``n`` counts them. A category with no segment anywhere is left
out of the means and reported with zeros in ``per_class``. A group with ``n == 0``
gives zeros here (panopticapi divides by zero there).

Checks
------
Raised as ``ValueError`` (panopticapi raises ``KeyError``): a predicted map id other
than 0 missing from the predicted ``segments_info``, a listed predicted id absent from
the map, a predicted segment of a category not in ``categories``; also maps of
different shapes or with negative ids.

Public API
----------
- ``pq_compute(pairs, categories)``: PQ / SQ / RQ over images
  ``(gt_map, gt_segments, pred_map, pred_segments)``.
- ``pq_image_stats(...)``: per-category ``tp`` / ``fp`` / ``fn`` / ``iou`` of one image.
- ``pq_average(stats, categories, isthing)``: the means of one group and per class.
- ``rgb2id(color)`` / ``id2rgb(id_map)``: ``id = R + 256 G + 256^2 B``.

The keyword arguments with a leading underscore replace one rule by a wrong one, so
that tests can show that their expected values depend on the rule:
``_iou_threshold`` and ``_iou_strict`` (match on ``IoU >= t`` when False),
``_void_rule`` (``'void_in_union'``: no VOID removal from the union;
``'void_not_ignored'``: VOID does not excuse a false positive) and ``_crowd_rule``
(``'as_regular'``: crowd segments are ordinary segments; ``'not_ignored_for_fp'``:
a crowd region does not excuse a false positive).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

__all__ = [
  'VOID',
  'OFFSET',
  'pq_compute',
  'pq_image_stats',
  'pq_average',
  'rgb2id',
  'id2rgb',
]

VOID = 0
OFFSET = 256 * 256 * 256  # ids are below 256^3 (three 8-bit channels)

_VOID_RULES = ('panopticapi', 'void_in_union', 'void_not_ignored')
_CROWD_RULES = ('panopticapi', 'as_regular', 'not_ignored_for_fp')
_STAT_KEYS = ('tp', 'fp', 'fn', 'iou')


# ----------------------------------------------------------------------------------
# Id encoding
# ----------------------------------------------------------------------------------
def rgb2id(color):
  """Colour -> segment id, ``R + 256 G + 256^2 B``.

  Args:
    color: an [H, W, 3] array (uint8 or wider) or a sequence of 3 ints.

  Returns:
    An [H, W] int64 array for an [H, W, 3] array, else an int.
  """
  if isinstance(color, np.ndarray) and color.ndim == 3:
    c = color.astype(np.int64)
    return c[..., 0] + 256 * c[..., 1] + 256 * 256 * c[..., 2]
  return int(color[0]) + 256 * int(color[1]) + 256 * 256 * int(color[2])


def id2rgb(id_map):
  """Segment id -> colour, the inverse of ``rgb2id`` for ids below ``256^3``.

  Args:
    id_map: an integer array of any shape, or an int.

  Returns:
    A uint8 array of shape ``id_map.shape + (3,)``, or a list ``[R, G, B]`` of ints.
  """
  if np.ndim(id_map):  # an array (numpy, or anything numpy reads, e.g. a torch tensor)
    id_map = np.asarray(id_map)
    rest = id_map.astype(np.int64)
    rgb = np.zeros(id_map.shape + (3,), dtype=np.uint8)
    for channel in range(3):
      rgb[..., channel] = rest % 256
      rest = rest // 256
    return rgb
  rest = int(id_map)
  color = []
  for _ in range(3):
    color.append(rest % 256)
    rest //= 256
  return color


# ----------------------------------------------------------------------------------
# One image
# ----------------------------------------------------------------------------------
def _id_map(array, what: str) -> np.ndarray:
  m = np.asarray(array)
  if m.ndim != 2:
    raise ValueError(f'{what} must be an [H, W] id map, got shape {m.shape}')
  if not np.issubdtype(m.dtype, np.integer):
    raise ValueError(f'{what} must hold integer ids, got dtype {m.dtype}')
  m = m.astype(np.int64)
  if m.size and (m.min() < 0 or m.max() >= OFFSET):
    raise ValueError(f'{what} ids must lie in [0, {OFFSET}), got [{m.min()}, {m.max()}]')
  return m


def _empty_stats() -> dict:
  return {'tp': 0, 'fp': 0, 'fn': 0, 'iou': 0.0}


def pq_image_stats(
  gt_map,
  gt_segments: Sequence[Mapping[str, Any]],
  pred_map,
  pred_segments: Sequence[Mapping[str, Any]],
  categories: Mapping[int, Mapping[str, Any]],
  *,
  image_id: Any = None,
  _iou_threshold: float = 0.5,
  _iou_strict: bool = True,
  _void_rule: str = 'panopticapi',
  _crowd_rule: str = 'panopticapi',
) -> dict:
  """Per-category counts of one image.

  Args:
    gt_map: [H, W] ground-truth ids, 0 for VOID.
    gt_segments: dicts with ``id``, ``category_id``, ``iscrowd`` (0 when missing) and
      an optional ``area``.
    pred_map: [H, W] predicted ids, 0 for no segment.
    pred_segments: dicts with ``id`` and ``category_id``.
    categories: ``{category_id: {'isthing': 0 or 1, ...}}``.
    image_id: named in error messages.
    _iou_threshold, _iou_strict, _void_rule, _crowd_rule: see the module docstring.

  Returns:
    ``{category_id: {'tp', 'fp', 'fn', 'iou'}}`` for the categories seen in this image.

  Raises:
    ValueError: on the inconsistencies listed in the module docstring.
  """
  if _void_rule not in _VOID_RULES:
    raise ValueError(f'_void_rule must be one of {_VOID_RULES}, got {_void_rule!r}')
  if _crowd_rule not in _CROWD_RULES:
    raise ValueError(f'_crowd_rule must be one of {_CROWD_RULES}, got {_crowd_rule!r}')
  where = f'image {image_id!r}' if image_id is not None else 'an image'
  gt = _id_map(gt_map, 'gt_map')
  pred = _id_map(pred_map, 'pred_map')
  if gt.shape != pred.shape:
    raise ValueError(f'In {where} gt_map {gt.shape} and pred_map {pred.shape} differ in shape')

  gt_segms = {int(s['id']): dict(s) for s in gt_segments}
  pred_segms = {int(s['id']): dict(s) for s in pred_segments}
  if _crowd_rule == 'as_regular':
    for s in gt_segms.values():
      s['iscrowd'] = 0

  # Predicted areas, and the consistency of the predicted map with its segment list.
  not_seen = set(pred_segms)
  ids, counts = np.unique(pred, return_counts=True)
  for seg_id, count in zip(ids.tolist(), counts.tolist()):
    if seg_id not in pred_segms:
      if seg_id == VOID:
        continue
      raise ValueError(
        f'In {where} predicted segment id {seg_id} is in the predicted map but not in '
        'the predicted segments_info'
      )
    pred_segms[seg_id]['area'] = count
    not_seen.discard(seg_id)
    cat = pred_segms[seg_id]['category_id']
    if cat not in categories:
      raise ValueError(f'In {where} predicted segment id {seg_id} has unknown category_id {cat!r}')
  if not_seen:
    raise ValueError(
      f'In {where} predicted segment ids {sorted(not_seen)} are in the predicted '
      'segments_info but not in the predicted map'
    )

  # Ground-truth areas: the given 'area', else the pixel count.
  gt_ids, gt_counts = np.unique(gt, return_counts=True)
  gt_pixels = dict(zip(gt_ids.tolist(), gt_counts.tolist()))
  for seg_id, s in gt_segms.items():
    if 'area' not in s:
      s['area'] = gt_pixels.get(seg_id, 0)

  # Pixel counts of every (gt id, pred id) pair.
  pair_ids, pair_counts = np.unique(gt * OFFSET + pred, return_counts=True)
  overlap = {
    (key // OFFSET, key % OFFSET): count
    for key, count in zip(pair_ids.tolist(), pair_counts.tolist())
  }

  stats: dict = {}

  def stat(cat):
    return stats.setdefault(cat, _empty_stats())

  # Matches.
  gt_matched, pred_matched = set(), set()
  for (gt_id, pred_id), inter in overlap.items():
    if gt_id not in gt_segms or pred_id not in pred_segms:
      continue
    g, p = gt_segms[gt_id], pred_segms[pred_id]
    if g.get('iscrowd', 0) == 1:
      continue
    if g['category_id'] != p['category_id']:
      continue
    union = p['area'] + g['area'] - inter
    if _void_rule != 'void_in_union':
      union -= overlap.get((VOID, pred_id), 0)
    iou = inter / union
    matched = iou > _iou_threshold if _iou_strict else iou >= _iou_threshold
    if matched:
      s = stat(g['category_id'])
      s['tp'] += 1
      s['iou'] += iou
      gt_matched.add(gt_id)
      pred_matched.add(pred_id)

  # False negatives; crowd regions (the last crowd segment listed per category).
  crowd_of_category = {}
  for gt_id, g in gt_segms.items():
    if gt_id in gt_matched:
      continue
    if g.get('iscrowd', 0) == 1:
      crowd_of_category[g['category_id']] = gt_id
      continue
    stat(g['category_id'])['fn'] += 1

  # False positives: unmatched predictions not mostly on VOID / crowd of their category.
  for pred_id, p in pred_segms.items():
    if pred_id in pred_matched:
      continue
    ignored = 0
    if _void_rule != 'void_not_ignored':
      ignored += overlap.get((VOID, pred_id), 0)
    if _crowd_rule != 'not_ignored_for_fp' and p['category_id'] in crowd_of_category:
      ignored += overlap.get((crowd_of_category[p['category_id']], pred_id), 0)
    if ignored / p['area'] > 0.5:
      continue
    stat(p['category_id'])['fp'] += 1
  return stats


# ----------------------------------------------------------------------------------
# Averages
# ----------------------------------------------------------------------------------
def pq_average(
  stats: Mapping[int, Mapping[str, Any]],
  categories: Mapping[int, Mapping[str, Any]],
  isthing: Optional[bool],
) -> tuple[dict, dict]:
  """Means over one group of categories.

  Args:
    stats: ``{category_id: {'tp', 'fp', 'fn', 'iou'}}`` summed over the images.
    categories: ``{category_id: {'isthing': 0 or 1, ...}}``; the order of the means.
    isthing: None for all categories, True for things, False for stuff.

  Returns:
    ``({'pq', 'sq', 'rq', 'n'}, {category_id: {'pq', 'sq', 'rq', 'tp', 'fp', 'fn'}})``,
    the second over the group's categories.
  """
  pq = sq = rq = 0.0
  n = 0
  per_class = {}
  for cat, info in categories.items():
    if isthing is not None and (info['isthing'] == 1) != isthing:
      continue
    s = stats.get(cat, _empty_stats())
    tp, fp, fn, iou = s['tp'], s['fp'], s['fn'], s['iou']
    counts = {'tp': tp, 'fp': fp, 'fn': fn}
    if tp + fp + fn == 0:
      per_class[cat] = {'pq': 0.0, 'sq': 0.0, 'rq': 0.0, **counts}
      continue
    n += 1
    denom = tp + 0.5 * fp + 0.5 * fn
    pq_c = iou / denom
    sq_c = iou / tp if tp else 0.0
    rq_c = tp / denom
    per_class[cat] = {'pq': pq_c, 'sq': sq_c, 'rq': rq_c, **counts}
    pq += pq_c
    sq += sq_c
    rq += rq_c
  if n == 0:
    return {'pq': 0.0, 'sq': 0.0, 'rq': 0.0, 'n': 0}, per_class
  return {'pq': pq / n, 'sq': sq / n, 'rq': rq / n, 'n': n}, per_class


def pq_compute(
  pairs: Iterable[tuple],
  categories: Mapping[int, Mapping[str, Any]],
  *,
  _iou_threshold: float = 0.5,
  _iou_strict: bool = True,
  _void_rule: str = 'panopticapi',
  _crowd_rule: str = 'panopticapi',
) -> dict:
  """Panoptic quality over a set of images.

  Args:
    pairs: ``(gt_map, gt_segments, pred_map, pred_segments)`` per image, as in
      ``pq_image_stats``.
    categories: ``{category_id: {'isthing': 0 or 1, 'name': ...}}``.
    _iou_threshold, _iou_strict, _void_rule, _crowd_rule: see the module docstring.

  Returns:
    ``{'All' | 'Things' | 'Stuff': {'pq', 'sq', 'rq', 'n'},
    'per_class': {category_id: {'pq', 'sq', 'rq', 'tp', 'fp', 'fn'}}}``.
  """
  totals: dict = {}
  for index, (gt_map, gt_segments, pred_map, pred_segments) in enumerate(pairs):
    image = pq_image_stats(
      gt_map,
      gt_segments,
      pred_map,
      pred_segments,
      categories,
      image_id=index,
      _iou_threshold=_iou_threshold,
      _iou_strict=_iou_strict,
      _void_rule=_void_rule,
      _crowd_rule=_crowd_rule,
    )
    for cat, s in image.items():
      total = totals.setdefault(cat, _empty_stats())
      for key in _STAT_KEYS:
        total[key] += s[key]
  results = {}
  for name, isthing in (('All', None), ('Things', True), ('Stuff', False)):
    results[name], per_class = pq_average(totals, categories, isthing)
    if name == 'All':
      results['per_class'] = per_class
  return results
