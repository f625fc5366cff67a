"""Evaluation: pre-training patch metrics on hand-made logits; detection
post-processing, batch-independent inference, COCO AP through pycocotools, VOC07 AP50
on hand-computed cases, the predict CLI end to end."""

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from updetr_jax import build_model, checkpoints, evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(
  backbone='resnet_tiny',
  hidden_dim=32,
  nheads=2,
  enc_layers=1,
  dec_layers=1,
  dim_feedforward=64,
  num_queries=10,
  num_classes=5,
  pre_norm=False,
  aux_loss=False,
  position_embedding='sine',
  dilation=False,
  dropout=0.0,
)
SIZES = [(70, 90), (100, 64), (64, 64)]  # resized images; the originals are 2x


@pytest.fixture(scope='module')
def tiny():
  model = build_model(TINY)
  variables = jax.jit(model.init)(
    jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool)
  )
  return model, variables, evaluate.make_detect_fn(model)


@pytest.fixture(scope='module')
def images():
  rng = np.random.default_rng(0)
  return [rng.standard_normal((h, w, 3)).astype(np.float32) for h, w in SIZES]


def _softmax(row):
  e = [math.exp(v) for v in row]
  return [v / sum(e) for v in e]


def test_patch_group_top_scores_class_1_and_its_iou():
  # Pre-training logits [B=1, N=6, 3]: class 0 unused, 1 = "is the patch", 2 = no
  # object; M=2 patches -> groups of queries (0, 1, 2) and (3, 4, 5). Queries 0 and 4
  # are the most confident of their group in class 0 but not in class 1: they must
  # lose to queries 1 and 5 (the groups' most confident class-1 queries).
  logits = [
    [5.0, 1.0, 0.0],
    [0.0, 2.0, 0.0],
    [0.0, 0.0, 3.0],
    [0.0, 0.0, 0.0],
    [4.0, 0.0, 0.0],
    [0.0, 3.0, 1.0],
  ]
  boxes = [
    [0.1, 0.1, 0.1, 0.1],
    [0.6, 0.5, 0.4, 0.4],
    [0.9, 0.9, 0.1, 0.1],
    [0.7, 0.7, 0.2, 0.2],
    [0.8, 0.2, 0.1, 0.1],
    [0.25, 0.25, 0.1, 0.2],
  ]
  outputs = {
    'pred_logits': jnp.array([logits], jnp.float32),
    'pred_boxes': jnp.array([boxes], jnp.float32),
  }
  picked, scores = evaluate.patch_predictions(outputs, num_patches=2)
  np.testing.assert_allclose(picked[0], [boxes[1], boxes[5]], atol=1e-7)
  p1 = [_softmax(row)[1] for row in logits]
  assert p1[1] > p1[0] and p1[5] > p1[4]
  assert _softmax(logits[0])[0] > _softmax(logits[1])[0]  # class 0 would pick query 0
  np.testing.assert_allclose(scores[0], [p1[1], p1[5]], rtol=1e-6)

  targets = {
    'labels': jnp.ones((1, 2), jnp.int32),
    'boxes': jnp.array([[[0.5, 0.5, 0.4, 0.4], [0.25, 0.25, 0.2, 0.2]]], jnp.float32),
    'mask': jnp.ones((1, 2), bool),
  }
  iou = evaluate.patch_iou(outputs, targets, num_patches=2)['group_top']
  # Patch 0: target xyxy (.3, .3, .7, .7), query 1 (.4, .3, .8, .7): intersection
  # .3 * .4 = .12, union .16 + .16 - .12 = .20 -> .6 (query 0 would give 0).
  # Patch 1: target (.15, .15, .35, .35), query 5 (.2, .15, .3, .35) inside it:
  # .1 * .2 / (.2 * .2) = .5 (query 4 would give 0).
  np.testing.assert_allclose(iou, [[0.6, 0.5]], atol=1e-6)


def test_patch_diagnostics_group_best_and_own_group():
  # M=2 groups (queries 0, 1) and (2, 3). Patch 0's box is predicted exactly by query
  # 3 (group 1) and at IoU .25 by query 1 (its own group); patch 1's exactly by query
  # 0 (group 0) and not at all by its own group.
  t0, t1 = [0.5, 0.5, 0.4, 0.4], [0.2, 0.2, 0.2, 0.2]
  far = [0.9, 0.9, 0.1, 0.1]
  boxes = [t1, [0.4, 0.4, 0.2, 0.2], far, t0]
  outputs = {'pred_logits': jnp.zeros((1, 4, 3)), 'pred_boxes': jnp.array([boxes])}
  targets = {
    'labels': jnp.ones((1, 2), jnp.int32),
    'boxes': jnp.array([[t0, t1]]),
    'mask': jnp.array([[True, True]]),
  }
  ious = evaluate.patch_iou(outputs, targets, num_patches=2)
  np.testing.assert_allclose(ious['matched'], [[1.0, 1.0]], atol=1e-6)
  # query 1 (.3, .3, .5, .5) inside patch 0's (.3, .3, .7, .7): .04 / .16
  np.testing.assert_allclose(ious['group_best'], [[0.25, 0.0]], atol=1e-6)
  np.testing.assert_array_equal(ious['own_group'], [[0.0, 0.0]])  # matched elsewhere
  swapped = dict(outputs, pred_boxes=jnp.array([[t0, boxes[1], t1, far]]))
  ious = evaluate.patch_iou(swapped, targets, num_patches=2)
  np.testing.assert_array_equal(ious['own_group'], [[1.0, 1.0]])
  np.testing.assert_allclose(ious['group_best'], [[1.0, 1.0]], atol=1e-6)


def test_postprocess_matches_numpy():
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((2, 7, 4)).astype(np.float32) * 3
  boxes = rng.uniform(0.1, 0.9, (2, 7, 4)).astype(np.float32)
  size = np.array([[480, 640], [300, 200]])
  scores, labels, xyxy = jax.jit(evaluate.postprocess)(logits, boxes, size)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  p = (e / e.sum(-1, keepdims=True))[..., :-1]
  np.testing.assert_allclose(scores, p.max(-1), rtol=1e-6)
  np.testing.assert_array_equal(labels, p.argmax(-1))
  h, w = size[:, 0, None], size[:, 1, None]
  cx, cy, bw, bh = np.moveaxis(boxes, -1, 0)
  want = np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
  np.testing.assert_allclose(xyxy, want, rtol=1e-5, atol=1e-4)


def test_canvas_shape():
  assert evaluate.canvas_shape(70, 90) == (96, 96)
  assert evaluate.canvas_shape(70, 90, multiple=1) == (70, 90)
  canvases = [(128, 160), (160, 128), (256, 256)]
  assert evaluate.canvas_shape(100, 150, canvases) == (128, 160)
  assert evaluate.canvas_shape(150, 100, canvases) == (160, 128)
  assert evaluate.canvas_shape(200, 100, canvases) == (256, 256)
  with pytest.raises(ValueError, match='no canvas'):
    evaluate.canvas_shape(300, 10, canvases)


def _ap(out, gt, image_ids):
  ev = evaluate.CocoEvaluator(label_to_category=[1, 2, 3, 4, 5])
  ev.update(image_ids, out['scores'], out['labels'], out['boxes'])
  return ev.summarize(gt)


def _random_gt(image_ids, sizes, seed=0):
  rng = np.random.default_rng(seed)
  boxes, cats = [], []
  for h, w in sizes:
    xy = rng.uniform(0, 0.5, (3, 2)) * [w, h]
    wh = rng.uniform(0.2, 0.5, (3, 2)) * [w, h]
    boxes.append(np.concatenate([xy, xy + wh], -1))
    cats.append(rng.integers(1, 6, 3))
  return evaluate.coco_gt_from_arrays(image_ids, sizes, boxes, cats, categories=range(1, 6))


def test_detections_do_not_depend_on_the_batch(tiny, images):
  """The design: each image's canvas depends on its own size only, so batch 1 and a
  batch of 3 (other images, other order) give the same boxes and the same AP."""
  model, variables, detect = tiny
  orig = np.array(SIZES) * 2
  canvases = [(128, 128)]
  one = evaluate.detect_images(detect, variables, images, orig, batch_size=1, canvases=canvases)
  rev = evaluate.detect_images(
    detect, variables, images[::-1], orig[::-1], batch_size=3, canvases=canvases
  )
  many = {k: v[::-1] for k, v in rev.items()}
  np.testing.assert_allclose(one['boxes'], many['boxes'], atol=1e-3)  # pixels
  np.testing.assert_allclose(one['scores'], many['scores'], atol=1e-5)
  np.testing.assert_array_equal(one['labels'], many['labels'])
  assert one['boxes'].shape == (3, TINY['num_queries'], 4)
  ids = [11, 12, 13]
  gt = _random_gt(ids, [tuple(s) for s in orig])
  assert _ap(one, gt, ids) == pytest.approx(_ap(many, gt, ids), abs=1e-9)


def test_release_style_padding_changes_outputs(tiny, images):
  """What forces the design: padding to the batch's largest image (the release) gives
  other outputs than no padding, through the CNN's border receptive fields and the
  downsampled mask, even for this randomly initialised model."""
  model, variables, detect = tiny
  ims, orig = images[:2], np.array(SIZES[:2]) * 2
  alone = evaluate.detect_images(detect, variables, ims, orig, multiple=1)
  batch_max = tuple(np.max([im.shape[:2] for im in ims], 0))  # (100, 90)
  padded = evaluate.detect_images(detect, variables, ims, orig, batch_size=2, canvases=[batch_max])
  diff = np.abs(alone['boxes'] - padded['boxes']).max(axis=(1, 2))
  assert diff.max() > 1e-2, diff  # pixels of a 200x180 / 140x128 image


def _gt_three_images():
  sizes = [(200, 300), (240, 320), (180, 180)]
  boxes = [
    np.array([[10, 20, 110, 140], [150, 30, 290, 190]]),
    np.array([[5, 5, 25, 30], [100, 100, 300, 230], [40, 150, 120, 220]]),
    np.array([[30, 30, 150, 170]]),
  ]
  cats = [np.array([1, 3]), np.array([3, 7, 1]), np.array([7])]
  return sizes, boxes, cats


def _detections_for(boxes, cats, shift=0.0, n=10, seed=0):
  """[B, n] arrays: the gt boxes (label = index of the category in [1, 3, 7]) with
  score 0.9, then low-scoring random boxes; rows padded to the same n."""
  rng = np.random.default_rng(seed)
  label_of = {1: 0, 3: 1, 7: 2}
  s = np.full((len(boxes), n), 0.05)
  l = rng.integers(0, 3, (len(boxes), n))
  xy = rng.uniform(0, 100, (len(boxes), n, 2))
  b = np.concatenate([xy, xy + 30], -1)
  for i, (bx, c) in enumerate(zip(boxes, cats)):
    k = len(bx)
    b[i, :k] = bx + shift
    s[i, :k] = 0.9
    l[i, :k] = [label_of[int(v)] for v in c]
  return s, l, b


def test_coco_evaluator_equals_pycocotools_on_its_json(tmp_path):
  from pycocotools.cocoeval import COCOeval

  sizes, boxes, cats = _gt_three_images()
  ids = [5, 9, 42]
  gt = evaluate.coco_gt_from_arrays(ids, sizes, boxes, cats, categories={1: 'a', 3: 'b', 7: 'c'})
  results = {}
  for shift in (0.0, 12.0):
    ev = evaluate.CocoEvaluator(label_to_category=[1, 3, 7])
    s, l, b = _detections_for(boxes, cats, shift)
    # one batch with a padded (invalid) row in the middle: it must be skipped
    pad = lambda x: np.concatenate([x[:2], x[:1], x[2:]])  # noqa: E731
    ev.update(pad(np.array(ids)), pad(s), pad(l), pad(b), valid=[True, True, False, True])
    assert ev.image_ids == ids and len(ev.results()) == 30
    r = ev.results()[0]
    assert set(r) == {'image_id', 'category_id', 'bbox', 'score'}
    assert r['bbox'] == pytest.approx([10 + shift, 20 + shift, 100, 120])
    path = str(tmp_path / f'det{shift}.json')
    ev.write_json(path)
    stats = ev.summarize(gt)
    with contextlib.redirect_stdout(io.StringIO()):
      direct = COCOeval(gt, gt.loadRes(path), 'bbox')
      direct.evaluate()
      direct.accumulate()
      direct.summarize()
    assert list(stats.values()) == pytest.approx(list(direct.stats[:6]), abs=1e-12)
    assert 'Average Precision' in ev.summary_text
    results[shift] = stats
  assert results[0.0]['AP'] == pytest.approx(1.0)
  assert results[0.0]['AP50'] == pytest.approx(1.0)
  assert 0.0 < results[12.0]['AP'] < 0.9
  with pytest.raises(ValueError, match='already evaluated'):
    ev.update([5], s[:1], l[:1], b[:1])


def test_coco_evaluator_edge_cases():
  sizes, boxes, cats = _gt_three_images()
  gt = evaluate.coco_gt_from_arrays([1, 2, 3], sizes, boxes, cats)
  ev = evaluate.CocoEvaluator()
  stats = ev.summarize(gt)  # nothing evaluated
  assert all(v == -1 for v in stats.values())
  # images evaluated, but every prediction's label has no category -> no results
  ev = evaluate.CocoEvaluator(label_to_category={0: 1})
  ev.update([1, 3], np.ones((2, 3)), np.full((2, 3), 4), np.zeros((2, 3, 4)))
  assert ev.results() == []
  stats = ev.summarize(gt)
  assert stats['AP'] == 0.0 and stats['APs'] == -1.0  # no small gt in images 1, 3
  ev = evaluate.CocoEvaluator()
  ev.update([77], np.ones((1, 1)), np.ones((1, 1)), np.zeros((1, 1, 4)))
  with pytest.raises(ValueError, match='not in the ground truth'):
    ev.summarize(gt)


def _box(x, y, s=10):
  return [x, y, x + s, y + s]


def test_voc07_ap50_hand_computed():
  dets = [
    {
      'boxes': [_box(0, 0), _box(50, 50), _box(0, 0), _box(20, 20)],  # image 0, class 0
      'scores': [0.9, 0.8, 0.75, 0.7],
      'labels': [0, 0, 0, 0],
    },
    {
      'boxes': [_box(0, 0), _box(1, 1), _box(40, 40), _box(20, 20), _box(60, 60), _box(70, 70)],
      'scores': [0.95, 0.93, 0.9, 0.8, 0.1, 0.5],
      'labels': [1, 1, 1, 1, 0, 2],
    },
  ]
  gt = [
    {'boxes': [_box(0, 0), _box(20, 20)], 'labels': [0, 0]},
    {'boxes': [_box(0, 0), _box(20, 20)], 'labels': [1, 1], 'difficult': [True, False]},
  ]
  out = evaluate.voc07_ap50(dets, gt, num_classes=3)
  # class 0: TP .9, FP .8, duplicate FP .75, TP .7, FP .1 (no class-0 box in image 1);
  # recall .5 .5 .5 1 1, precision 1 .5 .33 .5 .4 -> t <= .5: 1, t > .5: .5
  assert out['per_class'][0] == pytest.approx((6 * 1 + 5 * 0.5) / 11)
  # class 1: two detections on the difficult box are ignored; FP .9, TP .8, npos 1
  # -> precision .5 at recall 1 (1/4 if they counted as FP)
  assert out['per_class'][1] == pytest.approx(0.5)
  assert np.isnan(out['per_class'][2])  # no ground truth of class 2
  assert out['mAP'] == pytest.approx(np.mean(out['per_class'][:2]))


def test_voc07_11_point_interpolation():
  # 10 boxes, 3 found first then 2 misses: recall reaches exactly 0.3 -> thresholds
  # 0, .1, .2, .3 have precision 1 (t = i / 10 exactly) -> 4 / 11
  gts = [{'boxes': [_box(20 * i, 0) for i in range(10)], 'labels': [0] * 10}]
  dets = [
    {
      'boxes': [_box(0, 0), _box(20, 0), _box(40, 0), _box(0, 100), _box(0, 200)],
      'scores': [0.9, 0.8, 0.7, 0.6, 0.5],
      'labels': [0] * 5,
    }
  ]
  assert evaluate.voc07_ap50(dets, gts, 1)['per_class'][0] == pytest.approx(4 / 11)
  # IoU must exceed 0.5: IoU exactly 0.5 is a miss, IoU 0.6 a hit
  half = [{'boxes': [[0, 0, 10, 5]], 'scores': [1.0], 'labels': [0]}]
  one = [{'boxes': [_box(0, 0)], 'labels': [0]}]
  assert evaluate.voc07_ap50(half, one, 1)['mAP'] == 0.0
  hit = [{'boxes': [[0, 0, 10, 6]], 'scores': [1.0], 'labels': [0]}]
  assert evaluate.voc07_ap50(hit, one, 1)['mAP'] == pytest.approx(1.0)
  empty = [{'boxes': np.zeros((0, 4)), 'scores': [], 'labels': []}]
  assert evaluate.voc07_ap50(empty, one, 1)['mAP'] == 0.0


def test_predict_refuses_a_training_workdir(tmp_path, tiny):
  from updetr_jax import predict

  os.makedirs(tmp_path / 'checkpoints' / '100')
  with pytest.raises(ValueError, match='training workdir'):
    predict.load_model_variables(tiny[0], TINY, str(tmp_path))


def test_predict_cli_end_to_end(tmp_path, tiny):
  model, variables, detect = tiny
  checkpoints.save_variables(str(tmp_path / 'ckpt'), variables)
  rng = np.random.default_rng(3)
  paths = []
  for name, (h, w) in (('a', (60, 80)), ('b', (90, 50))):
    paths.append(str(tmp_path / f'{name}.png'))
    Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(paths[-1])
  out = tmp_path / 'out'
  overrides = [f'--config.model.{k}={v}' for k, v in TINY.items()]
  cmd = [
    sys.executable,
    '-m',
    'updetr_jax.predict',
    f'--checkpoint={tmp_path / "ckpt"}',
    '--config=configs/finetune_coco.py',
    *overrides,
    f'--output={out}',
    '--threshold=0.0',
    '--class_names=coco',
    '--scale=64',
    '--max_size=96',
    *paths,
  ]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.getsize(out / 'a.png') > 0 and os.path.getsize(out / 'b.png') > 0
  records = json.load(open(out / 'detections.json'))
  assert len(records) == 2 * TINY['num_queries']
  assert {r['file_name'] for r in records} == {'a.png', 'b.png'}
  assert set(records[0]) == {
    'file_name',
    'image_id',
    'category_id',
    'category_name',
    'bbox',
    'score',
  }
  # the same numbers as the model run here on the same preprocessing (weights round trip)
  from updetr_jax import predict

  for i, path in enumerate(paths):
    image = predict.load_image(path)
    x = predict.preprocess(image, 64, 96)
    assert x.shape[:2] == [(64, 85), (95, 53)][i]  # DETR's rule: short 64, long <= 96
    s, l, b = detect(
      variables, x[None], np.zeros((1,) + x.shape[:2], bool), np.array([image.shape[:2]])
    )
    mine = [r for r in records if r['image_id'] == i]
    np.testing.assert_allclose([r['score'] for r in mine], s[0], rtol=1e-4)
    np.testing.assert_array_equal([r['category_id'] for r in mine], l[0])
    xywh = np.array([r['bbox'] for r in mine])
    np.testing.assert_allclose(xywh[:, :2], b[0, :, :2], atol=1e-2)
    np.testing.assert_allclose(xywh[:, :2] + xywh[:, 2:], b[0, :, 2:], atol=1e-2)
