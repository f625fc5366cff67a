"""Miniature benchmark: determinism, disjoint splits, COCO validity, the data pipeline."""

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from conftest import importorskip  # fails instead of skipping under CI=true

importorskip('tensorflow')  # the updetr_jax.data package imports it

from updetr_jax import data  # noqa: E402
from updetr_jax.data import miniature  # noqa: E402

SMALL = dict(num_pool=20, num_train=20, num_eval=20)


def file_hashes(root):
  """{relative path: sha256} of every file under root."""
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      p = os.path.join(d, n)
      with open(p, 'rb') as f:
        out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def pixel_hashes(folder):
  """{sha256 of the decoded uint8 pixels} of the images in folder."""
  return {
    hashlib.sha256(
      np.asarray(Image.open(os.path.join(folder, n)).convert('RGB')).tobytes()
    ).hexdigest()
    for n in sorted(os.listdir(folder))
  }


def load(path):
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def small(tmp_path_factory):
  return miniature.write_miniature(str(tmp_path_factory.mktemp('mini')), **SMALL)


def test_layout_and_counts(small):
  for k in ('pool_dir', 'train_dir', 'eval_dir'):
    assert os.path.isdir(small[k])
  names = sorted(os.listdir(small['pool_dir']))
  assert len(names) == 20 and names[0] == '000000_128x128.jpg'
  m = load(small['manifest'])
  assert m['generator_version'] == miniature.GENERATOR_VERSION
  assert m['params'] == dict(seed=0, image_size=[128, 128], **SMALL)
  assert [c['name'] for c in m['classes']] == [n for _, n in miniature.CATEGORIES]
  for split in ('train', 'eval'):
    coco = load(small[f'{split}_ann'])
    assert small['counts'][split]['images'] == len(coco['images']) == 20
    assert small['counts'][split]['boxes'] == len(coco['annotations'])
  assert miniature.miniature_paths(os.path.dirname(small['manifest'])) == {
    k: v for k, v in small.items() if k != 'seconds'
  }


def test_same_seed_same_bytes(small, tmp_path):
  other = miniature.write_miniature(str(tmp_path / 'again'), **SMALL)
  a = file_hashes(os.path.dirname(small['manifest']))
  b = file_hashes(os.path.dirname(other['manifest']))
  assert a == b and len(a) == 60 + 3
  files = load(small['manifest'])['files']
  assert {k: v[1] for k, v in files.items()} == {k: v for k, v in a.items() if k != 'manifest.json'}


def test_other_seed_other_scenes(small, tmp_path):
  other = miniature.write_miniature(str(tmp_path / 'seed1'), seed=1, **SMALL)
  for split in miniature.SPLITS:
    assert not pixel_hashes(small[f'{split}_dir']) & pixel_hashes(other[f'{split}_dir'])
  # The instance split does not depend on the seed.
  used = load(other['manifest'])['instances_used']
  assert not set(used['eval']) & set(load(small['manifest'])['instances_used']['train'])


def test_eval_disjoint_from_pool_and_train(small):
  ev = pixel_hashes(small['eval_dir'])
  assert len(ev) == 20
  assert not ev & pixel_hashes(small['pool_dir'])
  assert not ev & pixel_hashes(small['train_dir'])
  m = load(small['manifest'])
  used = {s: set(v) for s, v in m['instances_used'].items()}
  assert used['eval'] and not used['eval'] & (used['pool'] | used['train'])
  assert not used['pool'] & used['train']
  coco = load(small['eval_ann'])
  assert {a['instance'] for a in coco['annotations']} == used['eval']
  # The full instance sets and background bands of the splits are disjoint too.
  assets = {s: miniature.split_assets(s) for s in miniature.SPLITS}
  keys = {s: {i.key for v in a.instances.values() for i in v} for s, a in assets.items()}
  bands = {s: {n for n, _ in a.backgrounds} for s, a in assets.items()}
  for x, y in (('eval', 'pool'), ('eval', 'train'), ('pool', 'train')):
    assert not keys[x] & keys[y] and not bands[x] & bands[y]
  assert len(keys['eval']) == 30 + 7 + sum(  # faces, coins, digits 0/1/4/7
    len(miniature._split_indices(n, 0)['eval']) for n in (178, 182, 181, 179)
  )
  assert set(m['backgrounds']['eval']) == bands['eval']


def test_coco_json_valid(small):
  lo, hi = miniature.OBJECTS_PER_IMAGE
  for split in ('train', 'eval'):
    coco = COCO(small[f'{split}_ann'])
    assert sorted(coco.getCatIds()) == [1, 2, 3, 4, 5, 6]
    assert len(coco.getImgIds()) == 20
    for img in coco.loadImgs(coco.getImgIds()):
      path = os.path.join(small[f'{split}_dir'], img['file_name'])
      assert Image.open(path).size == (img['width'], img['height'])
      anns = coco.loadAnns(coco.getAnnIds(imgIds=img['id']))
      assert lo <= len(anns) <= hi
      for a in anns:
        x, y, w, h = a['bbox']
        assert w > 0 and h > 0 and a['area'] == w * h and a['iscrowd'] == 0
        assert x >= 0 and y >= 0 and x + w <= img['width'] and y + h <= img['height']
    ids = [a['id'] for a in coco.dataset['annotations']]
    assert len(set(ids)) == len(ids)


def test_boxes_are_tight():
  """Pasted shapes are cropped to alpha > 0: every border row / column is touched."""
  rng = np.random.default_rng(0)
  assets = miniature.split_assets('eval')
  for cat, instances in assets.instances.items():
    for inst in instances[:5]:
      for side in (24.0, 40.0, 64.0):
        aspect = float(rng.uniform(0.9, 1.1))
        gray, alpha = miniature._object_shape(inst, cat, side, aspect)
        assert gray.shape == alpha.shape and max(alpha.shape) <= side * 1.1 + 1
        for edge in (alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]):
          assert edge.max() >= 0.2
        if cat == 1:  # faces: opaque rectangles
          assert (alpha == 1).all()
  image, anns = miniature.render_scene(np.random.default_rng(1), assets, (128, 128))
  assert image.shape == (128, 128, 3) and image.dtype == np.uint8
  lo, hi = miniature.OBJECTS_PER_IMAGE
  assert lo <= len(anns) <= hi


def test_rewrite_only_when_needed(tmp_path, monkeypatch):
  d = str(tmp_path / 'm')
  first = miniature.write_miniature(d, num_pool=3, num_train=2, num_eval=2)
  assert 'seconds' in first
  real = miniature.render_split

  def fail(*a, **k):
    raise AssertionError('rewrote a complete benchmark')

  monkeypatch.setattr(miniature, 'render_split', fail)
  again = miniature.write_miniature(d, num_pool=3, num_train=2, num_eval=2)
  assert 'seconds' not in again and again['counts'] == first['counts']
  assert miniature.write_miniature(d, num_pool=3, num_train=2, num_eval=2, verify=True)
  monkeypatch.setattr(miniature, 'render_split', real)
  # Other parameters: rewritten, stale files gone.
  out = miniature.write_miniature(d, num_pool=2, num_train=2, num_eval=2, image_size=96)
  assert 'seconds' in out and sorted(os.listdir(out['pool_dir'])) == [
    '000000_96x96.jpg',
    '000001_96x96.jpg',
  ]
  # A missing file, or (with verify) a changed one: rewritten.
  os.remove(os.path.join(out['eval_dir'], '000001_96x96.jpg'))
  out = miniature.write_miniature(d, num_pool=2, num_train=2, num_eval=2, image_size=96)
  assert 'seconds' in out and len(os.listdir(out['eval_dir'])) == 2
  path = os.path.join(out['train_dir'], '000000_96x96.jpg')
  data = bytearray(open(path, 'rb').read())
  data[-3] ^= 1
  open(path, 'wb').write(bytes(data))
  kw = dict(num_pool=2, num_train=2, num_eval=2, image_size=96)
  assert 'seconds' not in miniature.write_miniature(d, **kw)
  assert 'seconds' in miniature.write_miniature(d, verify=True, **kw)


def test_default_eval_split_is_large_enough():
  assert miniature.DEFAULT_COUNTS['num_eval'] >= miniature.MIN_EVAL_IMAGES == 300
  scenes = list(miniature.render_split('eval', miniature.DEFAULT_COUNTS['num_eval']))
  boxes = sum(len(a) for _, a in scenes)
  assert len(scenes) >= 300 and boxes >= miniature.MIN_EVAL_BOXES == 1500
  cats = np.bincount([b['category_id'] for _, a in scenes for b in a], minlength=7)[1:]
  assert cats.min() > 0.1 * boxes  # every class well represented


def test_cli(tmp_path, capsys):
  out = miniature.main(
    [f'--output={tmp_path}', '--num_pool=2', '--num_train=2', '--num_eval=2', '--image_size=64,80']
  )
  text = capsys.readouterr().out
  assert 'eval :     2 images' in text and out['counts']['pool']['images'] == 2
  assert Image.open(os.path.join(out['eval_dir'], '000000_64x80.jpg')).size == (80, 64)


def test_loads_in_the_pipeline(small):
  common = dict(
    scales=(96, 112, 128),
    max_size=128,
    eval_scale=128,
    buckets=((128, 128),),
    index_cache_dir=None,
    prefetch=1,
    num_parallel_calls=2,
  )
  cfg = dict(
    source='coco_json',
    ann_file=small['train_ann'],
    image_dir=small['train_dir'],
    eval_ann_file=small['eval_ann'],
    eval_image_dir=small['eval_dir'],
    crop_resize_scales=(96, 128),
    crop_size=(64, 96),
    **common,
  )
  it, _, info = data.make_detection_dataset(cfg, global_batch_size=4, train=True)
  b = next(it)
  assert b['images'].shape == (4, 128, 128, 3) and b['targets']['mask'].any()
  assert info.num_classes == 7 and info.class_names[1] == 'face'
  labels = b['targets']['labels'][b['targets']['mask']]
  assert labels.min() >= 1 and labels.max() <= 6
  # Evaluation at the native size: the targets are the json boxes.
  it, _, info = data.make_detection_dataset(cfg, global_batch_size=4, train=False)
  b = next(it)
  coco = load(small['eval_ann'])
  for r in range(4):
    iid = int(b['image_id'][r])
    anns = [a for a in coco['annotations'] if a['image_id'] == iid]
    t = b['targets']
    k = int(t['mask'][r].sum())
    assert k == len(anns)
    xywh = np.array([a['bbox'] for a in anns], np.float32)
    want = np.concatenate([xywh[:, :2] + xywh[:, 2:] / 2, xywh[:, 2:]], 1) / 128.0
    np.testing.assert_allclose(t['boxes'][r, :k], want, atol=1e-6)
    np.testing.assert_array_equal(t['labels'][r, :k], [a['category_id'] for a in anns])
  pcfg = dict(source='folder', folder=small['pool_dir'], patch_size=32, **common)
  it, _ = data.make_pretrain_dataset(pcfg, global_batch_size=4, num_patches=2)
  b = next(it)
  assert b['images'].shape == (4, 128, 128, 3) and b['patch_boxes'].shape == (4, 2, 4)
  assert b['valid'].all()
