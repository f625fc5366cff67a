"""Input pipeline: buckets, patches, determinism, resume, host sharding, bad files."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from conftest import importorskip  # fails instead of skipping under CI=true

tf = importorskip('tensorflow')

from updetr_jax import data  # noqa: E402
from updetr_jax.data import augment, patches, planning, sources  # noqa: E402
from data_helpers import assert_same, model_batch, take  # noqa: E402

# Good images (h, w) as lossless PNG unless noted; names exercise nesting and case.
GOOD = {
  'a/img0.png': (40, 60),
  'a/b/img1.PNG': (64, 48),
  'img2.png': (50, 50),
  'img3.png': (36, 80),
  'c/img4.png': (70, 45),
  'img5.png': (33, 41),
  'img6.png': (48, 64),
  'img7.png': (57, 39),
  'img8.JPG': (45, 60),
  'img9.jpeg': (60, 44),
  'img10.bmp': (40, 52),
}
BAD = {
  'bad/corrupt.jpg': 'corrupt',
  'bad/trunc.jpg': 'truncated',
  'bad/tiny.png': 'too_small',
  'bad/gray.png': 'grayscale',
  'bad/cmyk.jpg': 'cmyk',
  'bad/rgba.png': 'alpha',
}


def _photo(h, w, seed):
  """Smooth random colour image (compresses like a photo)."""
  r = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w] / 7.0
  ch = [
    np.sin(xx * r.uniform(0.3, 1) + r.uniform(0, 6))
    + np.cos(yy * r.uniform(0.3, 1) + r.uniform(0, 6))
    for _ in range(3)
  ]
  img = np.stack(ch, -1) * 60 + 128 + r.normal(0, 8, (h, w, 3))
  return np.clip(img, 0, 255).astype(np.uint8)


def _save(path, img, fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  (Image.fromarray(img) if isinstance(img, np.ndarray) else img).save(path, fmt)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('images'))
  for i, (name, (h, w)) in enumerate(GOOD.items()):
    ext = name.rsplit('.', 1)[1].lower()
    fmt = {'png': 'PNG', 'jpg': 'JPEG', 'jpeg': 'JPEG', 'bmp': 'BMP'}[ext]
    _save(os.path.join(root, name), _photo(h, w, i), fmt)
  j = os.path.join
  os.makedirs(j(root, 'bad'), exist_ok=True)
  with open(j(root, 'bad/corrupt.jpg'), 'wb') as f:
    f.write(np.random.default_rng(0).bytes(3000))
  buf = io.BytesIO()
  Image.fromarray(_photo(60, 80, 99)).save(buf, 'JPEG', quality=90)
  with open(j(root, 'bad/trunc.jpg'), 'wb') as f:
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
  _save(j(root, 'bad/tiny.png'), _photo(10, 10, 5))
  _save(j(root, 'bad/gray.png'), _photo(40, 50, 6)[..., 0])
  _save(j(root, 'bad/cmyk.jpg'), Image.fromarray(_photo(44, 58, 7)).convert('CMYK'), 'JPEG')
  rgba = np.concatenate([_photo(46, 38, 8), np.full((46, 38, 1), 200, np.uint8)], -1)
  _save(j(root, 'bad/rgba.png'), rgba)
  with open(j(root, 'notes.txt'), 'w') as f:
    f.write('not an image')
  return root


def cfg_for(folder, **kw):
  c = dict(
    source='folder',
    folder=folder,
    scales=(32, 40, 48),
    max_size=64,
    eval_scale=48,
    buckets=((48, 64),),
    patch_size=16,
    index_cache_dir=None,
    prefetch=1,
    num_parallel_calls=2,
  )
  c.update(kw)
  return c


def load_original(folder, index):
  files = data.list_image_files(folder)
  return sources.pil_decode(open(files[index % len(files)], 'rb').read())


# --- unit pieces -------------------------------------------------------------------------


def test_resize_rule_and_release_buckets():
  assert data.resize_rule(375, 500, 480, 600) == (450, 600)
  assert data.resize_rule(500, 375, 320, 600) == (426, 320)
  assert data.resize_rule(300, 451, 128, 160) == (106, 159)
  h, w = data.resize_rule(np.array([375, 500]), np.array([500, 375]), np.array([480, 320]), 600)
  assert list(h) == [450, 426] and list(w) == [600, 320]
  shapes = data.bucket_shapes(data.default_data_config())
  assert len(shapes) <= 8 and (480, 608) in shapes and (608, 480) in shapes
  # Every release scale of a 4:3 photo, either orientation, fits a bucket without clamping.
  for s in (320, 336, 352, 368, 400, 416, 432, 448, 464, 480):
    for hw in ((375, 500), (500, 375), (333, 500), (100, 1600)):
      rh, rw = data.resize_rule(*hw, s, 600)
      k, ch, cw = planning.assign_buckets([rh], [rw], data.default_data_config())
      bh, bw = shapes[int(k[0])]
      assert (ch[0], cw[0]) == (rh, rw) and rh <= bh and rw <= bw
  assert data.bucket_shapes(data.demo_data_config()) == [(128, 160), (160, 128)]


def test_folder_listing_and_probe(folder):
  files = data.list_image_files(folder)
  rel = [os.path.relpath(f, folder) for f in files]
  assert rel == sorted(rel) and len(rel) == len(GOOD) + len(BAD)
  assert 'a/b/img1.PNG' in rel and 'img8.JPG' in rel and 'notes.txt' not in rel
  for name, status in BAD.items():
    got = data.probe_image(open(os.path.join(folder, name), 'rb').read())[2]
    assert sources.STATUS_NAMES[got] == status, name
  assert data.probe_image(open(os.path.join(folder, 'img2.png'), 'rb').read())[:3] == (
    50,
    50,
    sources.OK,
  )


def test_image_index_cache_roundtrip(folder, tmp_path):
  """index_cache_dir (on by default): the probe results are written once, then read."""
  cache = tmp_path / 'cache'
  cfg = cfg_for(folder, index_cache_dir=str(cache))
  _, stats_a = data.make_pretrain_dataset(cfg, global_batch_size=2, num_patches=2)
  written = sorted(os.listdir(cache))
  assert len(written) == 1 and written[0].startswith('index-'), written
  idx = sources.ImageIndex.load(str(cache / written[0]))
  _, stats_b = data.make_pretrain_dataset(cfg, global_batch_size=2, num_patches=2)
  again = sources.ImageIndex.load(str(cache / written[0]))
  for name in ('height', 'width', 'status', 'decoder'):
    np.testing.assert_array_equal(getattr(idx, name), getattr(again, name))
  assert len(idx.status) == len(data.list_image_files(folder))


def test_patch_sampling_bounds():
  seed = tf.constant([3, 4], tf.int64)
  for h, w in ((17, 17), (40, 300), (500, 375)):
    b = patches.sample_patch_boxes(seed, h, w, 200).numpy()
    x, y, pw, ph = b.T
    assert pw.min() >= 8 and pw.max() <= w - 8 and ph.min() >= 8 and ph.max() <= h - 8
    # The release draws the corner with np.random.randint(W - w) (exclusive): a patch
    # never touches the right / bottom edge.
    assert x.min() >= 0 and (x + pw).max() <= w - 1
    assert y.min() >= 0 and (y + ph).max() <= h - 1
  b = patches.sample_patch_boxes(seed, 17, 17, 200).numpy()
  assert set(b[:, 2]) == {8, 9}  # U{8..W-8} is inclusive
  # Corner range: with w = 9 on a 17-px image, x is in {0..7}, every value reached.
  x9 = b[b[:, 2] == 9, 0]
  assert set(x9) == set(range(8))
  b = patches.sample_patch_boxes(seed, 40, 300, 2000).numpy()
  gap = 300 - (b[:, 0] + b[:, 2])  # distance to the right edge
  assert gap.min() == 1  # the largest corner the release can draw is reached


def test_tfrecord_index(tmp_path):
  path = str(tmp_path / 'x.tfrecord')
  payloads = [b'abc', b'', os.urandom(1000)]
  with tf.io.TFRecordWriter(path) as w:
    for p in payloads:
      w.write(
        tf.train.Example(
          features=tf.train.Features(
            feature={'image': tf.train.Feature(bytes_list=tf.train.BytesList(value=[p]))}
          )
        ).SerializeToString()
      )
  idx = sources.TFRecordIndex([(path, 1, -1)])
  assert len(idx) == 2
  ex = tf.train.Example.FromString(idx.read(1))
  assert ex.features.feature['image'].bytes_list.value[0] == payloads[2]


def test_config_errors(folder):
  with pytest.raises(ValueError, match='global_batch_size=6.*process_count=4'):
    data.make_pretrain_dataset(cfg_for(folder), global_batch_size=6, num_patches=2, process_count=4)
  with pytest.raises(ValueError, match='scale'):
    data.resolve_config({'scale': 3})


# --- the pipeline ------------------------------------------------------------------------


def test_train_batches_structure(folder):
  cfg = cfg_for(folder)
  it, stats = data.make_pretrain_dataset(cfg, global_batch_size=4, num_patches=3, seed=1)
  shapes = data.bucket_shapes(cfg)
  index = it.source.index
  for host in take(it, 6):
    # The host sends uint8 pixels, the valid size, rectangles and seeds, no floats.
    assert host['images'].dtype == np.uint8 and 'patches' not in host
    assert host['image_size'].shape == (4, 2) and host['patch_boxes'].shape == (4, 3, 4)
    assert host['patch_seeds'].dtype == np.uint32 and host['patch_seeds'].shape == (4, 2)
    b = model_batch(host, cfg, train=True)
    n, hh, ww, _ = b['images'].shape
    assert n == 4 and (hh, ww) in shapes
    assert b['images'].dtype == np.float32 and b['padding_mask'].shape == (4, hh, ww)
    assert b['patches'].shape == (4, 3, 16, 16, 3) and b['patches'].dtype == np.float32
    t = b['targets']
    assert t['boxes'].shape == (4, 3, 4) and t['labels'].dtype == np.int32
    assert (t['labels'] == 1).all() and t['mask'].all() and b['valid'].all()
    cx, cy, bw, bh = np.moveaxis(t['boxes'], -1, 0)
    eps = 1e-6
    assert (bw > 0).all() and (bh > 0).all()
    assert (cx - bw / 2 >= -eps).all() and (cx + bw / 2 <= 1 + eps).all()
    assert (cy - bh / 2 >= -eps).all() and (cy + bh / 2 <= 1 + eps).all()
    for i in range(4):
      img = int(b['index'][i]) % it.source.num_images
      h, w = int(index.height[img]), int(index.width[img])
      valid = ~b['padding_mask'][i]
      rh, rw = valid.any(1).sum(), valid.any(0).sum()
      assert (valid == (np.arange(hh)[:, None] < rh) & (np.arange(ww)[None] < rw)).all()
      assert (rh, rw) in {data.resize_rule(h, w, s, 64) for s in (32, 40, 48)}
      assert (b['images'][i][~valid] == 0).all()
      # Boxes sit on the pixel grid of the original image.
      np.testing.assert_allclose(
        t['boxes'][i, :, 2] * w, np.round(t['boxes'][i, :, 2] * w), atol=1e-3
      )


def test_eval_patch_and_image_match_boxes(folder):
  cfg = cfg_for(folder)
  it, stats = data.make_pretrain_dataset(cfg, global_batch_size=4, num_patches=3, train=False)
  batches = [(b, model_batch(b, cfg, train=False)) for b in it]
  seen = []
  std = np.asarray(augment.STD)
  for host, b in batches:
    for i in np.flatnonzero(b['valid']):
      orig = load_original(folder, int(b['index'][i])).astype(np.float32) / 255.0
      h, w = orig.shape[:2]
      seen.append(int(b['index'][i]))
      rh, rw = data.resize_rule(h, w, 48, 64)
      assert host['image_size'][i].tolist() == [rh, rw]
      for m in range(3):
        cx, cy, bw, bh = b['targets']['boxes'][i, m]
        box = np.round([(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h]).astype(np.int32)
        # The rectangle, mapped to the resized image, is what the device crops.
        np.testing.assert_allclose(
          host['patch_boxes'][i, m], box * np.array([rw / w, rh / h, rw / w, rh / h]), atol=1e-4
        )
        # The crop of the resized image is close to the release's crop of the
        # original (benchmarks/patch_crop_source.py measures the difference).
        ref = augment.normalize(patches.crop_patch(tf.constant(orig), tf.constant(box), 16))
        assert np.abs((b['patches'][i, m] - ref) * std).mean() < 0.03
      ref = augment.resize_image(tf.constant(orig * 255.0), [rh, rw]).numpy()
      np.testing.assert_allclose(host['images'][i, :rh, :rw], ref, atol=0.51)
      np.testing.assert_array_equal(host['images'][i, rh:], 0)
      np.testing.assert_array_equal(host['images'][i, :, rw:], 0)
  # One pass: every usable image exactly once (11 good + 3 converted).
  assert sorted(seen) == sorted(np.flatnonzero(it.source.index.usable).tolist())
  d = stats.as_dict()
  assert {
    k: d[k] for k in ('corrupt', 'truncated', 'too_small', 'grayscale', 'cmyk', 'alpha')
  } == dict.fromkeys(BAD.values(), 1)
  assert d['epochs'] == 1 and d['examples'] == 14 and 'corrupt 1' in stats.report()


def test_determinism_resume_and_host_sharding(folder):
  cfg = cfg_for(folder)
  kw = dict(global_batch_size=4, num_patches=2)
  ref_it, ref_stats = data.make_pretrain_dataset(cfg, seed=3, **kw)
  ref = take(ref_it, 7)
  assert ref_stats.as_dict()['epochs'] >= 2  # 7 batches cross an epoch boundary
  assert ref_stats.as_dict()['corrupt'] == ref_stats.as_dict()['epochs']
  other = next(data.make_pretrain_dataset(cfg, seed=4, **kw)[0])
  assert not np.array_equal(other['patch_boxes'], ref[0]['patch_boxes'])
  assert not np.array_equal(other['patch_seeds'], ref[0]['patch_seeds'])
  # Resume after k global batches (past the first epoch) = the uninterrupted stream
  # (a fresh pipeline with the same seed: this also checks determinism).
  k = len(ref_it.plan(0)) + 1
  resumed = take(data.make_pretrain_dataset(cfg, seed=3, start_step=k, **kw)[0], 7 - k)
  for a, b in zip(ref[k:], resumed):
    assert_same(a, b)
  # Two hosts: concatenating host 0 and host 1 rows gives the single-host batch.
  hosts = [
    take(data.make_pretrain_dataset(cfg, seed=3, process_index=p, process_count=2, **kw)[0], 3)
    for p in range(2)
  ]
  for j in range(3):
    assert hosts[0][j]['images'].shape[0] == 2
    cat = {
      k: np.concatenate([hosts[0][j][k], hosts[1][j][k]])
      for k in ('images', 'image_size', 'patch_boxes', 'patch_seeds', 'valid', 'index')
    }
    cat['targets'] = {
      k: np.concatenate([hosts[0][j]['targets'][k], hosts[1][j]['targets'][k]])
      for k in ('boxes', 'labels', 'mask')
    }
    assert_same(cat, ref[j])


def test_file_broken_after_indexing_is_replaced_and_counted(folder, tmp_path):
  import shutil

  root = str(tmp_path / 'copy')
  shutil.copytree(folder, root)
  cfg = cfg_for(root, shuffle=False)
  it, stats = data.make_pretrain_dataset(cfg, global_batch_size=2, num_patches=2, train=False)
  victim = data.list_image_files(root).index(os.path.join(root, 'img2.png'))
  with open(os.path.join(root, 'img2.png'), 'wb') as f:  # valid header, then garbage
    f.write(open(os.path.join(folder, 'img2.png'), 'rb').read()[:60] + b'\0' * 500)
  rows = {}
  for b in it:
    for i, v in zip(b['index'], b['valid']):
      rows.setdefault(int(i), []).append(bool(v))
  assert rows[victim] == [False] and stats.as_dict()['decode_failed'] == 1
  assert sum(any(v) for v in rows.values()) == 13


def test_demo_source_offline():
  src = sources.DemoSource()
  assert src.num_images == len(sources.DEMO_IMAGES) >= 10
  assert all(a.ndim == 3 and a.shape[2] == 3 and a.dtype == np.uint8 for a in src.arrays)
  assert max(max(a.shape[:2]) for a in src.arrays) <= sources.DEMO_MAX_SIDE
  cfg = data.demo_data_config()
  it, stats = data.make_pretrain_dataset(cfg, global_batch_size=4, num_patches=10)
  b = model_batch(next(it), cfg, train=True)
  assert b['images'].shape[1:3] in [tuple(s) for s in data.bucket_shapes(cfg)]
  assert b['patches'].shape == (4, 10, 32, 32, 3)
  assert stats.as_dict()['grayscale'] == 3  # coins, clock, moon (camera: evaluation)
