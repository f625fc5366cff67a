"""Evaluation metrics.

Pre-training: how well each query patch is found, as IoU with the patch's true box,
for two choices of "the" prediction of patch j:
  * matched: the query the DETR Hungarian matcher assigns to patch j (the
    prediction the loss trains; uses the true boxes to choose, like DETR's
    training metrics);
  * group top: the query of patch j's group with the highest "is the patch"
    probability (no ground truth used; needs a class head that has learned to rank
    the queries of a group, which takes far longer than localisation).
Diagnostics of whether the patches are used at all (``patch_iou``):
  * group best: the best IoU among the queries of patch j's group (an oracle within
    the group: is any of them on the patch?);
  * own group: 1 where the matched query of patch j lies in patch j's group, else 0
    (chance: 1 / M);
  * group best, wrong patches (``group_best_wrong_patches``, computed by the
    pre-training eval step with ``group_best_iou``): group best when every image
    gets another image's patches; equal to group best when the predictions do
    not depend on the patches;
  * group top, wrong patches (``group_top_wrong_patches``): the model's answer
    (group top) with another image's patches, scored against this image's true
    boxes. The gap group_top - group_top_wrong_patches is what shows that the
    decoder uses its query: zero for a model that ignores the patches.

Detection (fine-tuned DETR; docs/method.md, 'DETR, the detector'):
  postprocess(pred_logits, pred_boxes, orig_size) -> scores, labels, boxes_xyxy
  canvas_shape / pad_to_canvas / make_detect_fn / detect_images: batched inference
    whose results do not depend on the batch (see "Padding" below)
  CocoEvaluator: COCO-style results and pycocotools AP
  coco_gt_from_arrays: an in-memory pycocotools COCO ground truth
  evaluation_ground_truth: the ground truth of a detection data config's eval split
  voc07_ap50: the VOC07 11-point AP at IoU 0.5 ('difficult' boxes ignored);
    voc07_from_coco: the same from a COCO ground truth and COCO-style results
  oneshot_ap50 / oneshot_ground_truth: one-shot detection's per-class AP50 over
    (image, class) trials and its seen / unseen means

Padding. DETR is not padding invariant: a zero-padded canvas changes the outputs of
the valid region, because (1) every CNN layer whose receptive field crosses the
image's bottom/right border sees the padded area's (non-zero) activations instead
of that layer's own zero padding, and (2) the nearest-neighbour downsampled mask
marks a C5 cell valid or not depending on the canvas when the canvas is not a
multiple of 32. The transformer itself is invariant (padded keys get probability 0).
So a result depends on the canvas an image is run in, and with the release's
"pad to the largest image of the batch" on the batch it lands in (AP moves with the
per-device batch, by up to about 10 points). Here an image's canvas is a function of
its own size only (``canvas_shape``: the smallest of fixed canvases that holds it, or
its size rounded up to a multiple of 32; or no padding at all, batch 1), so detections
and AP do not depend on the batch size, batch order or device count.

One file: every metric here scores the outputs of one inference path (the canvas rule
above), and the pre-training and detection metrics share the matching and box code;
a reader compares them side by side.
"""

from __future__ import annotations

import contextlib
import functools
import io
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from updetr_jax import box_ops, files, matching


def patch_predictions(outputs, num_patches: int):
  """Best query of each patch group.

  Args: outputs with pred_logits [B, N, C+1], pred_boxes [B, N, 4]; the N queries
    form num_patches groups of N / num_patches consecutive queries.
  Returns: boxes [B, M, 4] cxcywh, scores [B, M] (softmax prob of class 1).
  """
  logits, boxes = outputs['pred_logits'], outputs['pred_boxes']
  b, n, _ = logits.shape
  g = n // num_patches
  score = jax.nn.softmax(logits, axis=-1)[..., 1].reshape(b, num_patches, g)
  best = jnp.argmax(score, axis=-1)  # [B, M]
  boxes = boxes.reshape(b, num_patches, g, 4)
  picked = jnp.take_along_axis(boxes, best[..., None, None], axis=2)[:, :, 0]
  return picked, jnp.max(score, axis=-1)


def patch_box_iou(boxes, targets):
  """IoU [B, M] of one box per patch (boxes [B, M, 4] cxcywh) with the patch's
  true box; 0 where the target is padding."""
  iou, _ = box_ops.box_iou(
    box_ops.box_cxcywh_to_xyxy(boxes), box_ops.box_cxcywh_to_xyxy(targets['boxes'])
  )
  return jnp.where(targets['mask'], iou, 0.0)


def patch_iou(outputs, targets, num_patches: int):
  """IoUs [B, M] with each patch's true box (0 where padded).

  Returns {'matched', 'group_top', 'group_best', 'own_group'} (see the module
  docstring), each [B, M].
  """
  top, _ = patch_predictions(outputs, num_patches)
  idx = matching.hungarian_match(outputs, targets)  # [B, M]
  matched = jnp.take_along_axis(outputs['pred_boxes'], jnp.maximum(idx, 0)[..., None], axis=1)
  g = outputs['pred_boxes'].shape[1] // num_patches
  own = (idx // g == jnp.arange(idx.shape[1])[None]) & targets['mask']
  return {
    'matched': patch_box_iou(matched, targets),
    'group_top': patch_box_iou(top, targets),
    'group_best': group_best_iou(outputs['pred_boxes'], targets, num_patches),
    'own_group': own.astype(jnp.float32),
  }


def group_best_iou(pred_boxes, targets, num_patches: int):
  """[B, M]: the best IoU of the queries of patch j's group with patch j's box.

  pred_boxes [B, N, 4] cxcywh, N = num_patches groups of N / M consecutive queries;
  targets boxes [B, M, 4], mask [B, M].
  """
  b, n = pred_boxes.shape[:2]
  groups = box_ops.box_cxcywh_to_xyxy(pred_boxes).reshape(b, num_patches, n // num_patches, 4)
  iou, _ = box_ops.box_iou(groups, box_ops.box_cxcywh_to_xyxy(targets['boxes'])[:, :, None])
  return jnp.where(targets['mask'], jnp.max(iou, axis=-1), 0.0)


# --- detection: post-processing and batch-independent inference ---------------------


def postprocess(pred_logits, pred_boxes, orig_size):
  """DETR's post-processing (docs/method.md, 'DETR, the detector'); jittable.

  Args: pred_logits [B, N, C+1] (last = no object), pred_boxes [B, N, 4] cxcywh
    normalised by the unpadded image, orig_size [B, 2] (h, w) of the original image.
  Returns: scores [B, N] (max softmax prob over the C real classes), labels [B, N]
    int32, boxes [B, N, 4] xyxy in original pixels (exact whatever the padding, as the
    boxes are relative to the unpadded image).
  """
  prob = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)[..., :-1]
  scores = jnp.max(prob, axis=-1)
  labels = jnp.argmax(prob, axis=-1).astype(jnp.int32)
  size = jnp.asarray(orig_size, jnp.float32)
  h, w = size[:, 0], size[:, 1]
  scale = jnp.stack([w, h, w, h], axis=-1)[:, None, :]
  return scores, labels, box_ops.box_cxcywh_to_xyxy(pred_boxes) * scale


def canvas_shape(height: int, width: int, canvases=None, multiple: int = 32):
  """The padded (H, W) canvas of one image; a function of its own size only.

  canvases: fixed (H, W) shapes: the smallest-area one holding the image (first on
    ties); ValueError if none does. Otherwise the size rounded up to ``multiple``
    (32 = the C5 stride, which keeps the mask downsampling exact; 1 = no padding).
  """
  if canvases:
    fits = [(ch * cw, k) for k, (ch, cw) in enumerate(canvases) if ch >= height and cw >= width]
    if not fits:
      raise ValueError(f'no canvas of {list(canvases)} holds an image of {(height, width)}')
    return tuple(int(v) for v in canvases[min(fits)[1]])
  m = max(int(multiple), 1)
  return -(-int(height) // m) * m, -(-int(width) // m) * m


def pad_to_canvas(images: Sequence[np.ndarray], canvas, rows: int | None = None):
  """Zero-pads images bottom/right to ``canvas`` (H, W).

  Args: images: [h_i, w_i, 3] normalised; rows: batch size (>= len(images)); the
    extra rows are blank unpadded images (results to be discarded).
  Returns: images [rows, H, W, 3] float32, padding_mask [rows, H, W] (True on padding).
  """
  rows = len(images) if rows is None else rows
  h, w = canvas
  batch = np.zeros((rows, h, w, 3), np.float32)
  mask = np.zeros((rows, h, w), bool)
  for i, im in enumerate(images):
    ih, iw = im.shape[:2]
    if ih > h or iw > w:
      raise ValueError(f'image {(ih, iw)} does not fit the canvas {(h, w)}')
    batch[i, :ih, :iw] = im
    mask[i] = True
    mask[i, :ih, :iw] = False
  return batch, mask


def make_detect_fn(model, out_shardings=None):
  """Jitted (variables, images [B,H,W,3], padding_mask [B,H,W], orig_size [B,2],
  patches=None) -> (scores [B,N], labels [B,N], boxes_xyxy [B,N,4]) in eval mode.

  patches: the one-shot detector's query crops [B, 1, P, P, 3] (None for DETR).
  out_shardings: e.g. a replicated ``NamedSharding`` so that every process of a
  multi-host job can read the whole batch's results."""

  @functools.partial(jax.jit, out_shardings=out_shardings)
  def detect(variables, images, padding_mask, orig_size, patches=None):
    out = model.apply(variables, images, padding_mask, patches)
    return postprocess(out['pred_logits'], out['pred_boxes'], orig_size)

  return detect


def detect_images(
  detect_fn,
  variables,
  images: Sequence[np.ndarray],
  orig_sizes,
  *,
  batch_size: int = 1,
  canvases=None,
  multiple: int = 32,
  query: np.ndarray | None = None,
) -> dict:
  """Runs ``detect_fn`` on images grouped by canvas (``canvas_shape``), in batches of
  exactly ``batch_size`` rows (the last of each canvas filled with blank rows).

  Every image sees the same canvas whatever the batch size or order, so results do
  not depend on them (up to float rounding).
  Args: images: [h_i, w_i, 3] resized and normalised; orig_sizes [n, 2] (h, w);
    query: a one-shot detector's query [P, P, 3] (normalised), the same for every image.
  Returns: numpy {'scores' [n, N], 'labels' [n, N], 'boxes' [n, N, 4]} in input order.
  """
  orig_sizes = np.asarray(orig_sizes, np.float32).reshape(-1, 2)
  groups: dict[tuple[int, int], list[int]] = {}
  for i, im in enumerate(images):
    groups.setdefault(canvas_shape(im.shape[0], im.shape[1], canvases, multiple), []).append(i)
  per_image = {}
  for canvas, idx in groups.items():
    for s in range(0, len(idx), batch_size):
      chunk = idx[s : s + batch_size]
      batch, mask = pad_to_canvas([images[i] for i in chunk], canvas, batch_size)
      size = np.ones((batch_size, 2), np.float32)
      size[: len(chunk)] = orig_sizes[chunk]
      patches = None
      if query is not None:
        patches = np.broadcast_to(np.asarray(query, np.float32), (batch_size, 1, *query.shape))
      out = jax.device_get(detect_fn(variables, batch, mask, size, patches))
      for r, i in enumerate(chunk):
        per_image[i] = tuple(o[r] for o in out)
  n = len(images)
  return {
    k: np.stack([per_image[i][j] for i in range(n)]) if n else np.zeros((0,))
    for j, k in enumerate(('scores', 'labels', 'boxes'))
  }


# --- COCO-style evaluation ------------------------------------------------------------

COCO_METRICS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')


def _xywh_to_xyxy(b) -> np.ndarray:
  """COCO boxes (x, y, w, h) -> float64 [k, 4] xyxy."""
  b = np.asarray(b, np.float64).reshape(-1, 4)
  return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)


def coco_from_dataset(dataset: dict):
  """A pycocotools ``COCO`` from a COCO-format dict, without its printout."""
  from pycocotools.coco import COCO

  coco = COCO()
  coco.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def coco_gt_from_arrays(image_ids, image_sizes, boxes, category_ids, iscrowd=None, categories=None):
  """An in-memory pycocotools ``COCO`` ground truth from per-image arrays.

  Args: image_ids [n]; image_sizes [n, 2] (h, w); boxes: n arrays [k_i, 4] xyxy in
    pixels; category_ids: n arrays [k_i]; iscrowd: n bool arrays [k_i] or None
    (COCOeval ignores crowd boxes: a detection matching one is neither TP nor FP; VOC
    'difficult' can be passed here, noting that crowd matching uses the intersection
    over the detection's area, not IoU); categories: ids, {id: name}, or None (the ids
    present).
  """
  anns, images = [], []
  for i, (iid, (h, w)) in enumerate(zip(image_ids, np.asarray(image_sizes).reshape(-1, 2))):
    images.append({'id': int(iid), 'height': int(h), 'width': int(w)})
    b = np.asarray(boxes[i], np.float64).reshape(-1, 4)
    crowd = np.zeros(len(b), bool) if iscrowd is None else np.asarray(iscrowd[i], bool)
    for box, cat, c in zip(b, np.asarray(category_ids[i]).reshape(-1), crowd):
      bw, bh = box[2] - box[0], box[3] - box[1]
      anns.append(
        {
          'id': len(anns) + 1,
          'image_id': int(iid),
          'category_id': int(cat),
          'bbox': [float(box[0]), float(box[1]), float(bw), float(bh)],
          'area': float(bw * bh),
          'iscrowd': int(c),
        }
      )
  if categories is None:
    categories = sorted({a['category_id'] for a in anns})
  if not isinstance(categories, Mapping):
    categories = {k: k for k in categories}
  cats = [{'id': int(k), 'name': str(v)} for k, v in categories.items()]
  return coco_from_dataset({'images': images, 'annotations': anns, 'categories': cats})


class CocoEvaluator:
  """Accumulates DETR detections (all N per image, no NMS) as COCO results.

  label_to_category: None (label == category id, e.g. COCO's 91-id scheme), a
    {label: category_id} mapping or a sequence indexed by label; predictions whose
    label has no category (e.g. an unused COCO id with a mapping) are dropped.
  """

  def __init__(self, label_to_category=None):
    self.label_to_category = label_to_category
    self._results: list[dict] = []
    self._image_ids: dict[int, None] = {}  # in evaluation order
    self.summary_text = ''

  def _categories(self, labels):
    """labels [N] -> (category ids [N], keep [N] bool)."""
    m = self.label_to_category
    labels = np.asarray(labels).astype(np.int64)
    if m is None:
      return labels, np.ones(len(labels), bool)
    if isinstance(m, Mapping):
      keep = np.array([int(l) in m for l in labels], bool)
      return np.array([m.get(int(l), -1) for l in labels], np.int64), keep
    table = np.asarray(m, np.int64)
    keep = (labels >= 0) & (labels < len(table))
    return table[np.clip(labels, 0, len(table) - 1)], keep

  def update(self, image_ids, scores, labels, boxes_xyxy, valid=None) -> None:
    """Adds a batch. Args: image_ids [B]; scores [B, N]; labels [B, N]; boxes_xyxy
    [B, N, 4] in original pixels; valid [B] bool (False rows, e.g. batch padding,
    are skipped). An image id seen before raises ValueError."""
    image_ids = np.asarray(image_ids).reshape(-1)
    scores, labels = np.asarray(scores), np.asarray(labels)
    boxes = np.asarray(boxes_xyxy, np.float64)
    valid = np.ones(len(image_ids), bool) if valid is None else np.asarray(valid, bool)
    for b, iid in enumerate(image_ids):
      if not valid[b]:
        continue
      iid = int(iid)
      if iid in self._image_ids:
        raise ValueError(f'image id {iid} was already evaluated')
      self._image_ids[iid] = None
      cats, keep = self._categories(labels[b])
      x0, y0, x1, y1 = boxes[b].T
      for k in np.flatnonzero(keep):
        self._results.append(
          {
            'image_id': iid,
            'category_id': int(cats[k]),
            'bbox': [float(x0[k]), float(y0[k]), float(x1[k] - x0[k]), float(y1[k] - y0[k])],
            'score': float(scores[b, k]),
          }
        )

  @property
  def image_ids(self) -> list[int]:
    return list(self._image_ids)

  def results(self) -> list[dict]:
    """COCO result dicts: image_id, category_id, bbox [x, y, w, h], score."""
    return [dict(r, bbox=list(r['bbox'])) for r in self._results]

  def write_json(self, path: str) -> None:
    files.write_json(path, self._results, indent=None)

  def summarize(self, coco_gt) -> dict[str, float]:
    """pycocotools bbox AP over the evaluated images (its printout in summary_text).

    Returns {AP, AP50, AP75, APs, APm, APl}. As in pycocotools, a metric is -1 when
    no ground truth counts for it (e.g. no small objects); with no detections at all
    the metrics with ground truth are 0.
    """
    from pycocotools.cocoeval import COCOeval

    ids = sorted(self._image_ids)
    missing = set(ids) - set(coco_gt.getImgIds())
    if missing:
      raise ValueError(
        f'{len(missing)} evaluated image ids are not in the ground truth, '
        f'e.g. {sorted(missing)[:5]}'
      )
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      if self._results:
        coco_dt = coco_gt.loadRes(self.results())
      else:  # loadRes cannot take an empty list
        gt = coco_gt.dataset
        coco_dt = coco_from_dataset(
          {'images': list(gt['images']), 'categories': list(gt['categories']), 'annotations': []}
        )
      ev = COCOeval(coco_gt, coco_dt, 'bbox')
      ev.params.imgIds = ids
      ev.evaluate()
      ev.accumulate()
      ev.summarize()
    self.summary_text = buf.getvalue()
    return {k: float(v) for k, v in zip(COCO_METRICS, ev.stats[:6])}


# --- VOC07 AP50 -----------------------------------------------------------------------


def _pairwise_ious(detections, ground_truth, chunk: int = 256) -> list[np.ndarray]:
  """Per image IoU [k_det, k_gt] of xyxy boxes (box_ops, fixed-shape chunks)."""
  n = len(detections)
  dk = [len(np.asarray(d['scores']).reshape(-1)) for d in detections]
  gk = [len(np.asarray(g['labels']).reshape(-1)) for g in ground_truth]
  dmax, gmax = max(dk + [1]), max(gk + [1])
  out = []
  for s in range(0, n, chunk):
    db = np.zeros((chunk, dmax, 4), np.float32)
    gb = np.zeros((chunk, gmax, 4), np.float32)
    for r, i in enumerate(range(s, min(s + chunk, n))):
      db[r, : dk[i]] = np.asarray(detections[i]['boxes'], np.float32).reshape(-1, 4)
      gb[r, : gk[i]] = np.asarray(ground_truth[i]['boxes'], np.float32).reshape(-1, 4)
    iou, _ = box_ops.box_iou(db[:, :, None], gb[:, None])
    iou = np.asarray(iou)
    out += [iou[r, : dk[i], : gk[i]] for r, i in enumerate(range(s, min(s + chunk, n)))]
  return out


def voc07_ap50(
  detections: Sequence[Mapping],
  ground_truth: Sequence[Mapping],
  num_classes: int,
  iou_threshold: float = 0.5,
) -> dict:
  """PASCAL VOC07 11-point AP at IoU > 0.5, per class and mean.

  Args: detections: per image {'boxes' [k, 4] xyxy, 'scores' [k], 'labels' [k]};
    ground_truth: per image (same order) {'boxes' [g, 4] xyxy, 'labels' [g],
    optional 'difficult' [g] bool}; labels in [0, num_classes).
  Per class, detections of all images in descending score order (stable) are matched
  greedily: to the ground-truth box of that class in the same image with the highest
  IoU; IoU > threshold and not yet taken -> TP, taken -> FP (duplicate), 'difficult'
  -> ignored (neither); lower IoU or no box -> FP. Recall = TP / non-difficult boxes.
  AP = mean over t = 0, 0.1, ..., 1 (exactly i / 10) of the max precision at recall
  >= t (0 if none). Continuous coordinates (no VOC devkit "+1" pixel).
  Returns: {'per_class': [C] (nan for a class without non-difficult boxes),
    'mAP': mean over the classes that have them (nan if none)}.
  """
  if len(detections) != len(ground_truth):
    raise ValueError(f'{len(detections)} detection entries for {len(ground_truth)} images')
  ious = _pairwise_ious(detections, ground_truth)
  det_labels = [np.asarray(d['labels']).reshape(-1) for d in detections]
  det_scores = [np.asarray(d['scores'], np.float64).reshape(-1) for d in detections]
  gt_labels = [np.asarray(g['labels']).reshape(-1) for g in ground_truth]
  gt_difficult = [
    np.asarray(g.get('difficult', np.zeros(len(l), bool)), bool).reshape(-1)
    for g, l in zip(ground_truth, gt_labels)
  ]
  thresholds = np.arange(11) / 10.0
  per_class = []
  for c in range(num_classes):
    npos = sum(int(np.sum((l == c) & ~d)) for l, d in zip(gt_labels, gt_difficult))
    cand = [(i, k) for i, l in enumerate(det_labels) for k in np.flatnonzero(l == c)]
    if npos == 0:
      per_class.append(float('nan'))
      continue
    order = np.argsort(-np.array([det_scores[i][k] for i, k in cand]), kind='stable')
    taken = [np.zeros(len(l), bool) for l in gt_labels]
    tp = np.zeros(len(cand))
    fp = np.zeros(len(cand))
    for rank, j in enumerate(order):
      i, k = cand[j]
      g = np.flatnonzero(gt_labels[i] == c)
      ov = ious[i][k, g]
      if not (len(g) and ov.max() > iou_threshold):
        fp[rank] = 1
        continue
      best = g[int(np.argmax(ov))]
      if gt_difficult[i][best]:
        continue
      if taken[i][best]:
        fp[rank] = 1
      else:
        tp[rank], taken[i][best] = 1, True
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    rec = ctp / npos
    prec = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    per_class.append(
      float(np.mean([prec[rec >= t].max() if np.any(rec >= t) else 0.0 for t in thresholds]))
    )
  valid = [a for a in per_class if not np.isnan(a)]
  return {'per_class': per_class, 'mAP': float(np.mean(valid)) if valid else float('nan')}


def voc07_from_coco(coco_gt, results: Sequence[Mapping], image_ids) -> dict:
  """VOC07 AP50 of COCO-style ``results`` over ``image_ids`` of ``coco_gt``.

  Crowd boxes of the ground truth count as VOC 'difficult' (ignored); classes are the
  ground truth's categories in id order. Returns ``voc07_ap50``'s dict plus
  'category_ids' (the order of 'per_class').
  """
  cat_ids = sorted(coco_gt.getCatIds())
  index = {c: i for i, c in enumerate(cat_ids)}
  by_image: dict[int, list] = {int(i): [] for i in image_ids}
  for r in results:
    if int(r['image_id']) in by_image and int(r['category_id']) in index:
      by_image[int(r['image_id'])].append(r)
  dets, gts = [], []
  for iid, rs in by_image.items():
    dets.append(
      {
        'boxes': _xywh_to_xyxy([r['bbox'] for r in rs]),
        'scores': np.array([r['score'] for r in rs], np.float64),
        'labels': np.array([index[int(r['category_id'])] for r in rs], np.int64),
      }
    )
    anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[iid]))
    gts.append(
      {
        'boxes': _xywh_to_xyxy([a['bbox'] for a in anns]),
        'labels': np.array([index[int(a['category_id'])] for a in anns], np.int64),
        'difficult': np.array([bool(a.get('iscrowd', 0)) for a in anns], bool),
      }
    )
  out = voc07_ap50(dets, gts, len(cat_ids))
  out['category_ids'] = cat_ids
  return out


def oneshot_ap50(
  detections: Sequence[Mapping],
  ground_truth: Sequence[Mapping],
  seen: Sequence[int],
  unseen: Sequence[int],
  iou_threshold: float = 0.5,
) -> dict:
  """One-shot detection AP50 (docs/method.md, 'One-shot detection'): per class, the
  VOC07 11-point AP of the detections of that class's trials against its boxes in their images.

  Args: detections: per trial {'label': the trial's class c, 'boxes' [k, 4] xyxy,
    'scores' [k]}; ground_truth: per trial (same order) {'boxes' [g, 4] xyxy: the
    boxes of class c in the trial's image, optional 'difficult' [g] bool (ignored,
    as VOC)}; seen / unseen: the class labels of each mean.
  Each (image, class) pair must be one trial: a trial is scored as an image of
  ``voc07_ap50`` whose only class is c.
  Returns {'per_class': {label: AP (nan: no trial or only difficult boxes)},
    'seen' / 'unseen': means over those classes with an AP (nan if none),
    'trials': {label: number of trials}}.
  """
  if len(detections) != len(ground_truth):
    raise ValueError(f'{len(detections)} trials of detections for {len(ground_truth)} of boxes')
  labels = [int(d['label']) for d in detections]
  num = max(labels + [int(c) for c in (*seen, *unseen)] + [-1]) + 1
  dets = [dict(d, labels=np.full(np.size(d['scores']), c)) for d, c in zip(detections, labels)]
  gts = [dict(g, labels=np.full(np.size(g['boxes']) // 4, c)) for g, c in zip(ground_truth, labels)]
  ap = voc07_ap50(dets, gts, num, iou_threshold)['per_class']

  def mean(classes):
    v = [ap[c] for c in classes if not np.isnan(ap[c])]
    return float(np.mean(v)) if v else float('nan')

  return {
    'per_class': {c: ap[c] for c in sorted({*labels, *seen, *unseen})},
    'seen': mean(seen),
    'unseen': mean(unseen),
    'trials': {c: labels.count(c) for c in sorted(set(labels))},
  }


def oneshot_ground_truth(coco_gt, image_ids, labels, label_to_category_id) -> list[dict]:
  """Per trial (image_ids[t], labels[t]): {'boxes' xyxy, 'difficult'} of that class's
  boxes in the image from a pycocotools ground truth. Crowd boxes count as VOC
  difficult (ignored), and so do empty ones (w or h <= 0), which the pipeline drops
  from the trials and no detection can match."""
  out = []
  for iid, c in zip(image_ids, labels):
    anns = coco_gt.loadAnns(
      coco_gt.getAnnIds(imgIds=[int(iid)], catIds=[int(label_to_category_id[int(c)])])
    )
    b = np.asarray([a['bbox'] for a in anns], np.float64).reshape(-1, 4)
    crowd = np.array([bool(a.get('iscrowd', 0)) for a in anns], bool).reshape(-1)
    out.append({'boxes': _xywh_to_xyxy(b), 'difficult': crowd | (b[:, 2] <= 0) | (b[:, 3] <= 0)})
  return out


def evaluation_ground_truth(data_config):
  """pycocotools ``COCO`` ground truth of a detection config's evaluation split.

  coco_json: the json file itself (``eval_ann_file``, else ``ann_file``), crowd boxes
  included, as pycocotools evaluates it. TFDS COCO / VOC: built from the TFDS
  records in original pixels with COCO category ids (VOC: label + 1); COCO crowd
  boxes and VOC 'difficult' objects are marked ``iscrowd`` (ignored by COCOeval and
  by ``voc07_from_coco``).
  """
  from updetr_jax.data import detection

  cfg = detection.resolve_detection_config(detection.detection_fields(data_config))
  if cfg['source'] == 'coco_json':
    ann_file = cfg['eval_ann_file'] or cfg['ann_file']
    if not files.exists(ann_file):
      raise FileNotFoundError(f'data.eval_ann_file={ann_file!r} not found')
    return coco_from_dataset(files.read_json(ann_file))
  if cfg['source'] not in ('tfds_coco', 'tfds_voc'):
    raise ValueError(f'data.source={cfg["source"]!r} has no detection ground truth')
  kind = cfg['source'][5:]
  cfg = dict(cfg, voc_keep_difficult=False)  # keep the flags: they become iscrowd
  ids, sizes, boxes, cats, crowd = [], [], [], [], []
  for part in detection._tfds_source(cfg[f'tfds_{kind}_eval'], cfg):
    entries = detection._tfds_part_annotations(part, kind, cfg)
    for i, (iid, xywh, labels, is_crowd, difficult) in enumerate(entries):
      ids.append(iid)
      sizes.append((part.index.height[i], part.index.width[i]))
      boxes.append(_xywh_to_xyxy(xywh))
      cats.append(labels if kind == 'coco' else labels + 1)
      crowd.append(is_crowd | (difficult if difficult is not None else False))
  from updetr_jax.class_names import COCO_CATEGORIES, VOC_CLASSES

  names = dict(COCO_CATEGORIES) if kind == 'coco' else {i + 1: n for i, n in enumerate(VOC_CLASSES)}
  return coco_gt_from_arrays(ids, sizes, boxes, cats, crowd, categories=names)
