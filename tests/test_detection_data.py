"""Detection (fine-tuning) input pipeline: targets, augmentation geometry, determinism."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import importorskip  # fails instead of skipping under CI=true

tf = importorskip('tensorflow')

from updetr_jax import data  # noqa: E402
from updetr_jax.data import augment, detection, sources  # noqa: E402
from data_helpers import assert_same, take  # noqa: E402

DARK, BRIGHT = 20, 230
# image id -> (h, w, [(category, xywh, iscrowd)]); boxes are drawn BRIGHT unless crowd.
IMAGES = {
  3: (
    60,
    80,
    [
      (1, (10, 15, 30, 20), 0),
      (1, (0, 0, 20, 20), 1),  # crowd: dropped
      (2, (50, 10, 0, 10), 0),
    ],
  ),  # empty: dropped
  7: (80, 60, [(3, (5, 30, 20, 25), 0), (2, (40, 60, 40, 40), 0)]),  # crosses border
  11: (64, 64, []),  # no annotations
  25: (50, 70, [(5, (20, 10, 25, 25), 0)]),
  30: (70, 50, [(1, (8, 8, 20, 30), 0), (3, (30, 40, 15, 20), 0)]),
  31: (56, 72, [(2, (40, 5, 25, 40), 0)]),
  32: (66, 66, [(5, (2, 2, 30, 30), 0), (1, (40, 40, 20, 20), 0)]),
}
CORRUPT_ID = 20
CATS = (1, 2, 3, 5)


def _draw(h, w, anns):
  img = np.full((h, w, 3), DARK, np.uint8)
  for _, (x, y, bw, bh), crowd in anns:
    if not crowd and bw > 0 and bh > 0:
      img[int(y) : int(y + bh), int(x) : int(x + bw)] = BRIGHT
  return img


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('coco'))
  os.makedirs(os.path.join(root, 'img'))
  js = dict(images=[], annotations=[], categories=[dict(id=c, name=f'c{c}') for c in CATS])
  aid = 1
  for iid, (h, w, anns) in IMAGES.items():
    name = f'{iid:04d}.jpg'
    Image.fromarray(_draw(h, w, anns)).save(os.path.join(root, 'img', name), quality=95)
    js['images'].append(dict(id=iid, file_name=name, height=h, width=w))
    for c, box, crowd in anns:
      js['annotations'].append(
        dict(
          id=aid, image_id=iid, category_id=c, bbox=list(box), area=box[2] * box[3], iscrowd=crowd
        )
      )
      aid += 1
  js['images'].append(dict(id=CORRUPT_ID, file_name='bad.jpg', height=40, width=40))
  with open(os.path.join(root, 'img', 'bad.jpg'), 'wb') as f:
    f.write(np.random.default_rng(0).bytes(2000))
  ann = os.path.join(root, 'ann.json')
  with open(ann, 'w') as f:
    json.dump(js, f)
  return ann, os.path.join(root, 'img')


def cfg_for(coco, **kw):
  ann, img = coco
  c = dict(
    source='coco_json',
    ann_file=ann,
    image_dir=img,
    eval_ann_file='',
    scales=(32, 40, 48),
    max_size=64,
    eval_scale=48,
    crop_resize_scales=(48, 56),
    crop_size=(24, 40),
    buckets=((48, 64),),
    index_cache_dir=None,
    prefetch=1,
    num_parallel_calls=2,
  )
  c.update(kw)
  return c


def unpadded(b, i):
  valid = ~b['padding_mask'][i]
  return int(valid.any(1).sum()), int(valid.any(0).sum())


def expected_targets(iid):
  """Eval targets of image iid: (labels, cxcywh normalised), crowd/empty dropped, clipped."""
  h, w, anns = IMAGES[iid]
  labels, boxes = [], []
  for c, (x, y, bw, bh), crowd in anns:
    x0, y0, x1, y1 = np.clip([x, y, x + bw, y + bh], 0, [w, h, w, h])
    if crowd or x1 <= x0 or y1 <= y0:
      continue
    labels.append(c)
    boxes.append([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h])
  return np.array(labels, np.int32), np.array(boxes, np.float32).reshape(-1, 4)


def check_batch_structure(b, shapes, t=100):
  n, hh, ww, _ = b['images'].shape
  assert (hh, ww) in shapes and b['images'].dtype == np.float32
  assert b['padding_mask'].shape == (n, hh, ww) and b['padding_mask'].dtype == bool
  tg = b['targets']
  assert tg['labels'].shape == (n, t) and tg['labels'].dtype == np.int32
  assert tg['boxes'].shape == (n, t, 4) and tg['boxes'].dtype == np.float32
  assert tg['mask'].shape == (n, t) and tg['mask'].dtype == bool
  assert b['image_id'].dtype == np.int64 and b['orig_size'].dtype == np.int32
  for i in range(n):
    m = tg['mask'][i]
    k = int(m.sum())
    assert m[:k].all() and not m[k:].any()  # targets first, then padding
    assert (tg['labels'][i, k:] == 0).all() and (tg['boxes'][i, k:] == 0).all()
    assert set(tg['labels'][i, :k].tolist()) <= set(CATS)
    cx, cy, bw, bh = tg['boxes'][i, :k].T
    eps = 1e-5
    assert (bw > 0).all() and (bh > 0).all()
    assert (cx - bw / 2 >= -eps).all() and (cx + bw / 2 <= 1 + eps).all()
    assert (cy - bh / 2 >= -eps).all() and (cy + bh / 2 <= 1 + eps).all()
    rh, rw = unpadded(b, i)
    valid = ~b['padding_mask'][i]
    assert (valid == (np.arange(hh)[:, None] < rh) & (np.arange(ww)[None] < rw)).all()
    assert (b['images'][i][~valid] == 0).all()


def check_pixels(b, i):
  """Bright pixels of row i coincide with its target boxes (up to resampling edges)."""
  rh, rw = unpadded(b, i)
  img = b['images'][i, :rh, :rw] * np.array(augment.STD) + np.array(augment.MEAN)
  gray = img.mean(-1)
  yy, xx = np.mgrid[0:rh, 0:rw] + 0.5
  inner = np.zeros((rh, rw), bool)
  outer = np.zeros((rh, rw), bool)
  k = int(b['targets']['mask'][i].sum())
  for cx, cy, bw, bh in b['targets']['boxes'][i, :k]:
    x0, x1 = (cx - bw / 2) * rw, (cx + bw / 2) * rw
    y0, y1 = (cy - bh / 2) * rh, (cy + bh / 2) * rh
    inner |= (xx > x0 + 1.5) & (xx < x1 - 1.5) & (yy > y0 + 1.5) & (yy < y1 - 1.5)
    outer |= (xx > x0 - 1.5) & (xx < x1 + 1.5) & (yy > y0 - 1.5) & (yy < y1 + 1.5)
  assert (gray[inner] > 0.65).all(), 'box interior not bright'
  assert (gray[~outer] < 0.3).all(), 'bright pixels outside every box'


# --- units -------------------------------------------------------------------------------


def test_label_map():
  coco_ids = sorted(detection.COCO_CATEGORIES)
  m = detection.label_map(coco_ids)
  assert m == {c: c for c in coco_ids} and max(m.values()) + 1 == 91
  assert detection.label_map([1, 1000]) == {1: 0, 1000: 1}
  assert detection.label_map([3, 7], 'contiguous') == {3: 0, 7: 1}
  assert detection.label_map([1, 1000], 'category_id') == {1: 1, 1000: 1000}


def test_transform_boxes_flip_and_crop():
  box = np.array([[10, 20, 30, 60]], np.float32)  # xyxy in a 100 x 50 (h x w) image
  g = dict(flip=0, h1=100, w1=50, y0=0, x0=0, ch=100, cw=50)
  out, keep = detection.transform_boxes(box, 100, 50, g)
  np.testing.assert_allclose(out, [[0.4, 0.4, 0.4, 0.4]], atol=1e-6)
  out, _ = detection.transform_boxes(box, 100, 50, {**g, 'flip': 1})
  np.testing.assert_allclose(out, [[0.6, 0.4, 0.4, 0.4]], atol=1e-6)
  # Resize x2 to 200 x 100, crop y 50..150, x 30..80: box -> [20, 40, 60, 120] - (30, 50)
  # = [-10, -10, 30, 70] clipped to [0, 0, 30, 70] in a 100 x 50 crop.
  g = dict(flip=0, h1=200, w1=100, y0=50, x0=30, ch=100, cw=50)
  out, keep = detection.transform_boxes(box, 100, 50, g)
  np.testing.assert_allclose(out, [[0.3, 0.35, 0.6, 0.7]], atol=1e-6)
  out, keep = detection.transform_boxes(box, 100, 50, {**g, 'x0': 60})  # left of crop
  assert out.shape == (0, 4) and keep.size == 0


def test_tfds_example_conversion():
  coco_ex = {
    'image/id': 42,
    'objects': {
      'bbox': np.array([[0.1, 0.2, 0.5, 0.6], [0, 0, 1, 1]], np.float32),
      'label': np.array([0, 79]),
      'is_crowd': np.array([False, True]),
    },
  }
  iid, xywh, lab, crowd, diff = detection.tfds_per_image(coco_ex, 'coco', 100, 200)
  assert iid == 42 and diff is None and crowd.tolist() == [False, True]
  np.testing.assert_allclose(xywh[0], [40, 10, 80, 40], atol=1e-4)
  assert lab.tolist() == [1, 90]  # person, toothbrush: COCO category ids
  voc_ex = {
    'image/filename': b'2008_000123.jpg',
    'objects': {
      'bbox': np.array([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]], np.float32),
      'label': np.array([14, 7]),
      'is_difficult': np.array([False, True]),
    },
  }
  e = detection.tfds_per_image(voc_ex, 'voc', 50, 80)
  assert e[0] == 2008000123 and e[2].tolist() == [14, 7]
  ann = detection.build_annotations([e], [50], [80])
  assert ann.labels.tolist() == [14] and ann.dropped['difficult_boxes'] == 1
  np.testing.assert_allclose(ann.boxes, [[0, 0, 40, 25]])
  assert detection.voc_image_id('000005.jpg') == 5
  assert len(detection.VOC_CLASSES) == 20 and len(detection.COCO_CATEGORIES) == 80


def test_concat_source(coco):
  _, img = coco
  paths = sorted(os.path.join(img, f) for f in os.listdir(img))
  a = sources.FileListSource(paths[:2], 'a')
  b = sources.FileListSource(paths[2:], 'b')
  cat = sources.ConcatSource([a, b])
  assert cat.num_images == len(paths) and len(cat.index) == len(paths)
  assert cat.read_bytes(3) == open(paths[3], 'rb').read()
  np.testing.assert_array_equal(cat.index.height, np.r_[a.index.height, b.index.height])


# --- the pipeline ------------------------------------------------------------------------


def test_eval_targets_once_each(coco):
  cfg = cfg_for(coco)
  it, stats, info = data.make_detection_dataset(cfg, global_batch_size=3, train=False)
  assert info.num_classes == 6 and info.class_names == {c: f'c{c}' for c in CATS}
  assert info.label_to_category_id == {c: c for c in CATS}
  assert info.skipped_image_ids == (CORRUPT_ID,) and info.num_examples == len(IMAGES)
  assert info.shapes == ((48, 64), (64, 48))
  seen = []
  for b in it:
    check_batch_structure(b, info.shapes)
    for i in range(len(b['valid'])):
      if not b['valid'][i]:
        assert not b['targets']['mask'][i].any()
        continue
      iid = int(b['image_id'][i])
      seen.append(iid)
      h, w, _ = IMAGES[iid]
      assert b['orig_size'][i].tolist() == [h, w]
      assert unpadded(b, i) == data.resize_rule(h, w, 48, 64)
      labels, boxes = expected_targets(iid)
      k = int(b['targets']['mask'][i].sum())
      assert b['targets']['labels'][i, :k].tolist() == labels.tolist()
      np.testing.assert_allclose(b['targets']['boxes'][i, :k], boxes, atol=1e-6)
      check_pixels(b, i)
  assert sorted(seen) == sorted(IMAGES)  # every usable image exactly once
  d = stats.as_dict()
  assert d['crowd_boxes'] == 1 and d['empty_boxes'] == 1 and d['corrupt'] == 1
  assert d['examples'] == len(IMAGES) and 'crowd 1' in stats.report()


@pytest.mark.parametrize('hflip,crop', [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)])
def test_train_augmentation_keeps_boxes_on_objects(coco, hflip, crop):
  cfg = cfg_for(coco, hflip_prob=hflip, crop_prob=crop)
  it, _, info = data.make_detection_dataset(cfg, global_batch_size=2, seed=hflip + 2 * crop)
  for b in take(it, 6):
    check_batch_structure(b, info.shapes)
    assert b['valid'].all()
    for i in range(2):
      check_pixels(b, i)


def test_flip_mirrors_image_and_boxes(coco):
  kw = dict(global_batch_size=2, seed=5)
  plain = take(
    data.make_detection_dataset(cfg_for(coco, hflip_prob=0.0, crop_prob=0.0), **kw)[0], 3
  )
  flipped = take(
    data.make_detection_dataset(cfg_for(coco, hflip_prob=1.0, crop_prob=0.0), **kw)[0], 3
  )
  for a, b in zip(plain, flipped):
    np.testing.assert_array_equal(a['image_id'], b['image_id'])
    for i in range(2):
      rh, rw = unpadded(a, i)
      assert unpadded(b, i) == (rh, rw)
      np.testing.assert_allclose(
        b['images'][i, :rh, :rw], a['images'][i, :rh, ::-1][:, -rw:], atol=1e-4
      )
      ta, tb = a['targets'], b['targets']
      np.testing.assert_array_equal(ta['mask'][i], tb['mask'][i])
      k = int(ta['mask'][i].sum())
      np.testing.assert_allclose(tb['boxes'][i, :k, 0], 1 - ta['boxes'][i, :k, 0], atol=1e-6)
      np.testing.assert_allclose(tb['boxes'][i, :k, 1:], ta['boxes'][i, :k, 1:], atol=1e-6)


def test_crop_sizes_and_truncation(coco):
  cfg = cfg_for(coco, crop_prob=1.0, max_targets=1)
  it, stats, info = data.make_detection_dataset(cfg, global_batch_size=2, seed=1)
  plan = it.plan(0)
  g = plan.extra
  assert g['crop'].all()
  assert ((g['ch'] >= np.minimum(24, g['h1'])) & (g['ch'] <= np.minimum(40, g['h1']))).all()
  assert ((g['y0'] >= 0) & (g['y0'] + g['ch'] <= g['h1'])).all()
  assert ((g['x0'] >= 0) & (g['x0'] + g['cw'] <= g['w1'])).all()
  n = 0
  for b in take(it, 4):
    check_batch_structure(b, info.shapes, t=1)
    n += 1
  assert stats.as_dict()['batches'] == n
  eval_it, eval_stats, _ = data.make_detection_dataset(
    cfg_for(coco, max_targets=1), global_batch_size=2, train=False
  )
  list(eval_it)
  assert eval_stats.as_dict()['targets_truncated'] == 3  # images 7, 30 and 32


def test_determinism_resume_and_host_sharding(coco):
  cfg = cfg_for(coco)
  kw = dict(global_batch_size=2)
  ref_it, ref_stats, _ = data.make_detection_dataset(cfg, seed=3, **kw)
  ref = take(ref_it, 6)
  assert ref_stats.as_dict()['epochs'] >= 2  # crosses an epoch boundary
  other = take(data.make_detection_dataset(cfg, seed=4, **kw)[0], 3)
  assert any(
    not np.array_equal(a['image_id'], b['image_id']) or a['images'].shape != b['images'].shape
    for a, b in zip(other, ref)
  )
  k = len(ref_it.plan(0)) + 1
  resumed = take(data.make_detection_dataset(cfg, seed=3, start_step=k, **kw)[0], 6 - k)
  for a, b in zip(ref[k:], resumed):
    assert_same(a, b)
  hosts = [
    take(data.make_detection_dataset(cfg, seed=3, process_index=p, process_count=2, **kw)[0], 3)
    for p in range(2)
  ]
  for j in range(3):
    assert hosts[0][j]['images'].shape[0] == 1
    cat = {
      k: np.concatenate([hosts[0][j][k], hosts[1][j][k]])
      for k in ('images', 'padding_mask', 'valid', 'image_id', 'orig_size')
    }
    cat['targets'] = {
      k: np.concatenate([hosts[0][j]['targets'][k], hosts[1][j]['targets'][k]])
      for k in ('labels', 'boxes', 'mask')
    }
    assert_same(cat, ref[j])


def test_config_errors(coco):
  with pytest.raises(ValueError, match='unknown data config'):
    data.make_detection_dataset(cfg_for(coco, patch_size=3), global_batch_size=2)
  with pytest.raises(FileNotFoundError):
    data.make_detection_dataset(cfg_for(coco, ann_file='/nonexistent.json'), global_batch_size=2)
  c = data.detection_data_config()
  assert c.max_size == 1333 and c.eval_scale == 800 and tuple(c.scales)[::10] == (480, 800)
  shapes = data.detection_bucket_shapes(c)
  assert len(shapes) == 6 and all(max(s) <= 1344 for s in shapes)
  for h, w in ((480, 640), (640, 480), (427, 640), (333, 1000), (1000, 200)):
    for s in (480, 800):
      rh, rw = data.resize_rule(h, w, s, 1333)
      assert any(rh <= bh and rw <= bw for bh, bw in shapes), (h, w, s)
  assert data.voc_data_config().source == 'tfds_voc'
