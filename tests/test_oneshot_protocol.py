"""One-shot detection data protocol (CoAE, data/oneshot.py) on a tiny COCO json made here:
unseen boxes never trained on, images without a seen class skipped, queries never from
the target image, deterministic per-seed evaluation queries, every (image, class) trial
evaluated exactly once, query crops, class_split.

Every expectation is computed from the json itself (``_Truth``), not from the library's
annotations. The numpy paths (``OneShotProtocol``, ``it.plan``, ``it.host_rows``) are
checked over many epochs / seeds; a few real batches go through tf.data.
"""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from conftest import importorskip  # fails instead of skipping under CI=true

tf = importorskip('tensorflow')

from test_oneshot import tiny_oneshot_data  # noqa: E402
from updetr_jax.data import oneshot  # noqa: E402

# Category ids (label_mapping 'auto' keeps them as labels: 7 ids, max 13 <= 2 * 7).
CATS = {1: 'cat', 2: 'dog', 3: 'cow', 5: 'sheep', 8: 'horse', 11: 'lonely', 13: 'zebra'}
UNSEEN = ('cow', 5)  # a name and a category id (sheep)
UNSEEN_IDS = {3, 5}
MIN_SIZE = 8  # query_min_size (default)
TINY = 'tiny'  # a 6 x 6 box: a target, never a query
CROWD, EMPTY = 'crowd', 'empty'
# Per image, the categories of its boxes (in annotation order).
LAYOUT = [
  [3, 5],  # 0: only unseen classes
  [3, 3],  # 1: only unseen classes
  [11, 3],  # 2: a seen class of this image only (+ unseen): no query anywhere
  [(1, CROWD), (2, EMPTY)],  # 3: only a crowd and an empty box: no box left
  [13, 1],  # 4: zebra occurs here only; cat is the only class to train on
  [1, 1, 2],
  [2, 8, 5],
  [8, 8, 3],
  [1, 2, 8],
  [5, 1],
  [2, 2, 2],
  [8, 3],
  [1, 5, 2, 8],
  [(1, TINY)],  # 13: cat's only box here is too small to be a query
  [2, 8],
  [3, 1, 5],
  [],  # 16: no annotation at all
  [1, 8, 2],
]
SIZES = [(60, 80), (80, 60), (48, 96)]


def _make_oneshot_set(root, seed=0):
  """Writes the LAYOUT images (textured noise, tinted boxes) and ann.json; float boxes
  inside the image. Returns (ann_file, image_dir)."""
  rng = np.random.default_rng(seed)
  image_dir = os.path.join(root, 'images')
  os.makedirs(image_dir, exist_ok=True)
  coco = dict(images=[], annotations=[], categories=[{'id': c, 'name': n} for c, n in CATS.items()])
  for i, boxes in enumerate(LAYOUT):
    h, w = SIZES[i % len(SIZES)]
    img = rng.uniform(0, 255, (h, w, 3))
    iid = 1000 + 13 * i  # not the image index
    for entry in boxes:
      c, kind = entry if isinstance(entry, tuple) else (entry, None)
      if kind == TINY:
        bw = bh = 6.0
      else:
        bw = float(np.round(rng.uniform(w / 5, w / 2), 1))
        bh = float(np.round(rng.uniform(h / 5, h / 2), 1))
      x = float(np.round(rng.uniform(0, w - bw - 0.5), 1))
      y = float(np.round(rng.uniform(0, h - bh - 0.5), 1))
      if kind == EMPTY:
        bw = 0.0
      colour = np.array([(c * 70) % 256, (c * 150) % 256, (c * 40 + 90) % 256], np.float64)
      ys, xs = slice(int(y), int(math.ceil(y + bh))), slice(int(x), int(math.ceil(x + bw)))
      img[ys, xs] = 0.6 * colour + 0.4 * img[ys, xs]
      coco['annotations'].append(
        {
          'id': len(coco['annotations']) + 1,
          'image_id': iid,
          'category_id': c,
          'bbox': [x, y, bw, bh],
          'area': bw * bh,
          'iscrowd': int(kind == CROWD),
        }
      )
    name = f'{iid}.png'
    Image.fromarray(img.astype(np.uint8)).save(os.path.join(image_dir, name))
    coco['images'].append({'id': iid, 'file_name': name, 'height': h, 'width': w})
  # images listed out of id order: the library sorts by id, the tests use ids only
  coco['images'] = coco['images'][::-1]
  ann = os.path.join(root, 'ann.json')
  with open(ann, 'w') as f:
    json.dump(coco, f)
  return ann, image_dir


class _Truth:
  """The protocol's sets computed straight from the json (independent of the library).

  boxes[iid]: list of (category, xyxy float64 [4]) of the non-crowd, non-empty boxes.
  """

  def __init__(self, ann_file, image_dir):
    with open(ann_file) as f:
      js = json.load(f)
    self.images = {im['id']: im for im in js['images']}
    self.path = {iid: os.path.join(image_dir, im['file_name']) for iid, im in self.images.items()}
    self.boxes = {iid: [] for iid in self.images}
    for a in js['annotations']:
      x, y, w, h = a['bbox']
      xyxy = np.array([x, y, x + w, y + h], np.float64)
      if not a['iscrowd'] and w > 0 and h > 0:
        self.boxes[a['image_id']].append((a['category_id'], xyxy))

  def of(self, iid, c):
    """xyxy [k, 4] of class c in image iid (annotation order)."""
    b = [xyxy for cc, xyxy in self.boxes[iid] if cc == c]
    return np.asarray(b, np.float64).reshape(-1, 4)

  def classes(self, iid, train):
    cs = {c for c, _ in self.boxes[iid]}
    return cs - UNSEEN_IDS if train else cs

  def pool_images(self, c, train):
    """Images holding a query-eligible box of class c (both sides >= MIN_SIZE)."""
    if train and c in UNSEEN_IDS:
      return set()
    return {
      iid
      for iid, bs in self.boxes.items()
      if any(cc == c and (b[2:] - b[:2] >= MIN_SIZE).all() for cc, b in bs)
    }

  def is_query(self, iid, c, qid, q_box, train):
    """Is q_box an eligible box of class c in image qid, another image than iid?"""
    if qid == iid or qid not in self.pool_images(c, train):
      return False
    ok = [
      b
      for cc, b in self.boxes[qid]
      if cc == c and (b[2:] - b[:2] >= MIN_SIZE).all() and np.allclose(b, q_box, atol=1e-4)
    ]
    return len(ok) == 1

  def has_query(self, iid, c, train):
    return bool(self.pool_images(c, train) - {iid})

  def train_images(self):
    """Image ids to train on, and the ids of images without a seen class / a query."""
    keep, no_class, no_query = set(), set(), set()
    for iid in self.images:
      cs = self.classes(iid, train=True)
      if not cs:
        no_class.add(iid)
      elif not any(self.has_query(iid, c, True) for c in cs):
        no_query.add(iid)
      else:
        keep.add(iid)
    return keep, no_class, no_query

  def trials(self):
    """Evaluation: {(image id, class)} with a query, and those without."""
    run, skipped = set(), set()
    for iid in self.images:
      for c in self.classes(iid, train=False):
        (run if self.has_query(iid, c, False) else skipped).add((iid, c))
    return run, skipped


@pytest.fixture(scope='module')
def fixture(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('oneshot'))
  ann, image_dir = _make_oneshot_set(root)
  return ann, image_dir, _Truth(ann, image_dir)


def _cfg(ann, image_dir, **kw):
  return tiny_oneshot_data(ann, image_dir, **{'unseen_classes': UNSEEN, **kw})


def _dataset(fixture, train, batch=4, **kw):
  ann, image_dir, _ = fixture
  seed = kw.pop('seed', 0)
  query_seed = kw.pop('query_seed', 0)
  return oneshot.make_oneshot_dataset(
    _cfg(ann, image_dir, **kw),
    global_batch_size=batch,
    train=train,
    seed=seed,
    query_seed=query_seed,
  )


def _all_rows(it, epoch):
  """host_rows of every global batch of ``epoch``, valid rows only, as a list of dicts."""
  out = []
  for j in range(len(it.plan(epoch))):
    rows = it.host_rows(epoch, j)
    for r in np.flatnonzero(rows['valid']):
      out.append({k: v[r] for k, v in rows.items()})
  return out


def _expected_targets(truth, iid, c, flip):
  """cxcywh normalised by the image (no crop), flipped when ``flip``."""
  im = truth.images[iid]
  h, w = im['height'], im['width']
  b = truth.of(iid, c).copy()
  if flip:
    b = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)
  b = b / [w, h, w, h]
  return np.concatenate([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], 1)


# --- the fixture itself ------------------------------------------------------------------


def test_fixture_has_the_cases(fixture):
  """The json holds every case the tests rely on (guards the tests, not the library)."""
  truth = fixture[2]
  keep, no_class, no_query = truth.train_images()
  ids = sorted(truth.images)
  assert no_class == {ids[0], ids[1], ids[3], ids[16]}
  assert no_query == {ids[2]}
  assert len(keep) == len(LAYOUT) - 5
  run, skipped = truth.trials()
  assert skipped == {(ids[2], 11), (ids[4], 13)}
  assert {c for _, c in run} == {1, 2, 3, 5, 8}


# --- class split ---------------------------------------------------------------------------


def test_class_split_names_and_category_ids():
  names = {0: 'cat', 1: 'dog', 2: 'cow', 3: 'sheep'}
  to_cat = {0: 4, 1: 7, 2: 42, 3: 2}  # contiguous labels, other category ids
  assert oneshot.class_split(('cow',), names, to_cat) == ((0, 1, 3), (2,))
  # ints are category ids, not labels: 7 is dog (label 1), 2 is sheep (label 3)
  assert oneshot.class_split((7, 2), names, to_cat) == ((0, 2), (1, 3))
  assert oneshot.class_split((np.int64(42), 'cat'), names, to_cat) == ((1, 3), (0, 2))
  assert oneshot.class_split((), names, to_cat) == ((0, 1, 2, 3), ())


def test_class_split_errors_name_unknown_classes():
  names = {0: 'cat', 1: 'dog', 2: 'cow'}
  to_cat = {0: 4, 1: 7, 2: 42}
  with pytest.raises(ValueError) as e:
    oneshot.class_split(('cow', 'unicorn', 99, 'dog'), names, to_cat)
  msg = str(e.value)
  assert "'unicorn'" in msg and '99' in msg
  assert 'unseen_classes' in msg
  # an int that is a label but no category id is unknown; a digit string is a name
  for bad in ((1,), ('7',)):
    with pytest.raises(ValueError, match='not classes of this data'):
      oneshot.class_split(bad, names, to_cat)


def test_class_split_through_the_dataset(fixture):
  """('cow', 5): a name and a category id -> cow and sheep unseen, the rest seen."""
  _, _, info = _dataset(fixture, train=True)
  assert info.unseen == (3, 5)
  assert info.seen == (1, 2, 8, 11, 13)
  ann, image_dir, _ = fixture
  with pytest.raises(ValueError, match="'giraffe'"):
    oneshot.make_oneshot_dataset(
      _cfg(ann, image_dir, unseen_classes=('cow', 'giraffe')), global_batch_size=4
    )


# --- training --------------------------------------------------------------------------------


def test_training_targets_are_the_query_class_boxes_only(fixture):
  """Over several epochs of host rows (flip on, crop off): each row's class is seen and
  in the image, its targets are exactly that class's boxes there (label 0), so no
  unseen box (nor a box of another class) ever reaches a target."""
  truth = fixture[2]
  it, stats, info = _dataset(fixture, train=True, crop_prob=0.0, hflip_prob=0.5)
  seen = set(info.seen)
  n_rows, flips = 0, set()
  for epoch in range(8):
    for row in _all_rows(it, epoch):
      iid, c = int(row['image_id']), int(row['label'])
      assert c in seen and c not in UNSEEN_IDS
      assert c in truth.classes(iid, train=True)
      assert not row['crop']
      got = row['boxes'][row['tmask']]
      want = _expected_targets(truth, iid, c, bool(row['flip']))
      assert got.shape == want.shape, (iid, c)
      np.testing.assert_allclose(got, want, atol=1e-5)
      assert (row['labels'] == 0).all()
      assert row['tmask'].sum() == len(truth.of(iid, c))
      # no unseen box of the image is among the targets
      for cu in UNSEEN_IDS:
        for u in _expected_targets(truth, iid, cu, bool(row['flip'])):
          assert not np.isclose(got, u, atol=1e-4).all(1).any()
      n_rows += 1
      flips.add(bool(row['flip']))
  assert n_rows >= 8 * 2 * 4 and flips == {True, False}
  n_unseen = sum(c in UNSEEN_IDS for bs in truth.boxes.values() for c, _ in bs)
  assert stats.as_dict()['unseen_boxes'] == n_unseen == 12


def test_training_targets_with_crop_are_a_subset(fixture):
  """Default geometry (flip, crop): the targets never outnumber the class's boxes."""
  truth = fixture[2]
  it, _, _ = _dataset(fixture, train=True)
  cropped = 0
  for epoch in range(4):
    for row in _all_rows(it, epoch):
      iid, c = int(row['image_id']), int(row['label'])
      assert c in truth.classes(iid, train=True)
      assert row['tmask'].sum() <= len(truth.of(iid, c))
      cropped += bool(row['crop'])
  assert cropped


def test_images_without_a_seen_class_are_not_trained_on(fixture):
  truth = fixture[2]
  keep, no_class, no_query = truth.train_images()
  it, stats, info = _dataset(fixture, train=True)
  d = stats.as_dict()
  assert d['images_without_seen_class'] == len(no_class) == 4
  assert d['images_without_query'] == len(no_query) == 1
  assert info.num_trials == info.num_examples == len(keep)
  ids = it.ann.image_ids
  assert {int(ids[i]) for i in it.images} == keep
  trained = set()
  for epoch in range(10):
    trained |= {int(row['image_id']) for row in _all_rows(it, epoch)}
  assert trained == keep  # every trainable image, and nothing else
  assert not trained & (no_class | no_query)


def test_training_choices_over_many_epochs(fixture):
  """OneShotProtocol.training_choices directly: the class is uniform over the image's
  seen classes with a query elsewhere (all of them drawn), the query is an eligible box
  of that class in ANOTHER image, and every such box gets drawn."""
  truth = fixture[2]
  it, _, _ = _dataset(fixture, train=True)
  proto, ann = it.protocol, it.ann
  image = np.tile(it.images, 4)
  drawn_classes = {int(i): set() for i in it.images}
  drawn_queries = {}
  for epoch in range(60):
    label, row = proto.training_choices(image, seed=3, epoch=epoch)
    for i, c, q in zip(image, label, row):
      iid, qid = int(ann.image_ids[i]), int(ann.image_ids[proto.row_image[q]])
      assert truth.is_query(iid, int(c), qid, ann.boxes[q], train=True), (iid, int(c), qid)
      assert int(ann.labels[q]) == int(c)
      drawn_classes[int(i)].add(int(c))
      drawn_queries.setdefault(int(c), set()).add(int(q))
  for i, cs in drawn_classes.items():
    iid = int(ann.image_ids[i])
    assert cs == {c for c in truth.classes(iid, True) if truth.has_query(iid, c, True)}, iid
  for c, qs in drawn_queries.items():
    n_pool = sum(
      cc == c and (b[2:] - b[:2] >= MIN_SIZE).all() for bs in truth.boxes.values() for cc, b in bs
    )
    assert len(qs) == n_pool, c
  assert 11 not in drawn_queries and 13 not in drawn_queries


def test_training_queries_never_from_the_target_image(fixture):
  """Host rows over several epochs: query image != target image, and the query box is
  a box of the row's class in the query image (json)."""
  truth = fixture[2]
  it, _, _ = _dataset(fixture, train=True, seed=7)
  n = 0
  for epoch in range(6):
    for row in _all_rows(it, epoch):
      iid, c, qid = int(row['image_id']), int(row['label']), int(row['q_image_id'])
      assert qid != iid
      assert truth.is_query(iid, c, qid, row['q_box'], train=True)
      n += 1
  assert n > 20


def test_one_training_batch_through_tf_data(fixture):
  """A real batch matches its host rows: targets, class, query; patches are finite."""
  it, _, _ = _dataset(fixture, train=True, seed=1)
  rows = it.host_rows(*it.locate(0))
  b = next(it)
  np.testing.assert_array_equal(b['image_id'], rows['image_id'])
  np.testing.assert_array_equal(b['label'], rows['label'])
  np.testing.assert_array_equal(b['query_image_id'], rows['q_image_id'])
  np.testing.assert_array_equal(b['query_box'], rows['q_box'])
  np.testing.assert_array_equal(b['targets']['mask'], rows['tmask'])
  np.testing.assert_allclose(b['targets']['boxes'], rows['boxes'] * rows['tmask'][..., None])
  assert (b['targets']['labels'] == 0).all() and b['valid'].all()
  assert (b['query_image_id'] != b['image_id']).all()
  assert b['patches'].shape == (4, 1, 16, 16, 3) and np.isfinite(b['patches']).all()
  it.close()


# --- evaluation -------------------------------------------------------------------------------


def _eval_queries(it):
  """{(image id, class): (query image id, query box tuple)} of one planned pass."""
  plan = it.plan(0)
  out = {}
  for j in range(len(plan)):
    rows = it.host_rows(0, j)
    for r in np.flatnonzero(rows['valid']):
      key = (int(rows['image_id'][r]), int(rows['label'][r]))
      assert key not in out
      out[key] = (int(rows['q_image_id'][r]), tuple(float(v) for v in rows['q_box'][r]))
  return out


def test_evaluation_trials_and_trials_without_query(fixture):
  """Trials = every (image, class present) pair (unseen classes included), minus the
  classes found in no other image (counted in trials_without_query)."""
  truth = fixture[2]
  run, skipped = truth.trials()
  it, stats, info = _dataset(fixture, train=False)
  assert stats.as_dict()['trials_without_query'] == len(skipped) == 2
  assert stats.as_dict()['unseen_boxes'] == 0  # evaluation keeps the unseen classes
  assert info.num_trials == info.num_examples == len(run)
  ids = it.ann.image_ids
  all_trials = {(int(ids[i]), int(c)) for i, c in zip(it.trial_image, it.trial_label)}
  assert all_trials == run | skipped
  q_row = it.plan(0).extra['q_row']
  no_query = {
    (int(ids[i]), int(c)) for i, c, q in zip(it.trial_image, it.trial_label, q_row) if q < 0
  }
  assert no_query == skipped
  assert set(_eval_queries(it)) == run


@pytest.mark.parametrize('query_seed', [0, 1, 2, 3, 4])
def test_evaluation_queries_never_from_the_target_image(fixture, query_seed):
  truth = fixture[2]
  it, _, _ = _dataset(fixture, train=False, query_seed=query_seed)
  queries = _eval_queries(it)
  assert len(queries) == len(truth.trials()[0])
  for (iid, c), (qid, q_box) in queries.items():
    assert qid != iid
    assert truth.is_query(iid, c, qid, np.asarray(q_box), train=False), (iid, c, qid)
  # the protocol's own arrays agree
  proto = it.protocol
  for t, (i, c) in enumerate(zip(it.trial_image, it.trial_label)):
    q = proto.evaluation_queries(it.trial_image[t : t + 1], it.trial_label[t : t + 1], query_seed)
    if q[0] >= 0:
      assert proto.row_image[q[0]] != i and proto.ann.labels[q[0]] == c


def test_evaluation_queries_deterministic_per_seed(fixture):
  """Two fresh datasets with one seed choose the same queries (whatever the batch
  size); use_query_seed(s) equals a fresh dataset of seed s; seeds 0..4 differ."""
  per_seed = []
  for s in range(5):
    a = _eval_queries(_dataset(fixture, train=False, query_seed=s)[0])
    b = _eval_queries(_dataset(fixture, train=False, query_seed=s, batch=3)[0])
    assert a == b
    per_seed.append(a)
  it, _, _ = _dataset(fixture, train=False, query_seed=4)
  for s in (2, 0):
    it.use_query_seed(s)
    assert _eval_queries(it) == per_seed[s]
  keys = set(per_seed[0])
  assert all(set(q) == keys for q in per_seed)
  differ = [sum(per_seed[s][k] != per_seed[0][k] for k in keys) for s in range(1, 5)]
  assert all(d > 0 for d in differ), differ  # every other seed changes some queries
  # most trials whose class is in > 2 other images get more than one query over the seeds
  truth = fixture[2]
  varied = [
    k
    for k in keys
    if len(truth.pool_images(k[1], False) - {k[0]}) > 2 and len({q[k] for q in per_seed}) > 1
  ]
  assert len(varied) >= len(keys) // 2


def test_every_trial_evaluated_once_per_run(fixture):
  """A full pass of real batches for two query seeds: the valid rows' (image, class)
  are the json's trials, each exactly once; queries from other images."""
  truth = fixture[2]
  run, _ = truth.trials()
  it, _, _ = _dataset(fixture, train=False)
  queries = {}
  for s in (0, 1):
    it.use_query_seed(s)
    seen, q = [], {}
    for b in it:
      for r in np.flatnonzero(b['valid']):
        key = (int(b['image_id'][r]), int(b['label'][r]))
        seen.append(key)
        q[key] = int(b['query_image_id'][r])
        assert q[key] != key[0]
    assert len(seen) == len(set(seen)), 'a trial evaluated twice'
    assert set(seen) == run
    queries[s] = q
  assert queries[0] != queries[1]


def _pil_crop(path, box, p):
  """Independent query crop: box rounded outward, PIL float bilinear (antialiased)."""
  img = np.asarray(Image.open(path).convert('RGB'), np.float32)
  h, w = img.shape[:2]
  x0, y0 = max(int(math.floor(box[0])), 0), max(int(math.floor(box[1])), 0)
  x1, y1 = min(int(math.ceil(box[2])), w), min(int(math.ceil(box[3])), h)
  crop = img[y0:y1, x0:x1]
  chans = [
    np.asarray(Image.fromarray(crop[..., k], mode='F').resize((p, p), Image.BILINEAR))
    for k in range(3)
  ]
  return np.stack(chans, -1) / 255.0


def test_query_crop_equals_an_independent_crop(fixture):
  """Evaluation patches, de-normalised, equal the query box cropped from the query
  image file and resized with PIL (and differ from the same box in the target image)."""
  truth = fixture[2]
  it, _, _ = _dataset(fixture, train=False, query_seed=2)
  b = next(it)
  it.close()
  checked = 0
  for r in np.flatnonzero(b['valid']):
    got = b['patches'][r, 0] / 255.0  # uint8 from the host (rounded)
    qid, box = int(b['query_image_id'][r]), b['query_box'][r]
    want = _pil_crop(truth.path[qid], box, 16)
    assert got.shape == want.shape == (16, 16, 3)
    # TF's antialiased bilinear and PIL's agree to ~1e-4 / 255 here, plus the rounding
    assert np.abs(got - want).mean() < 0.5 / 255, (qid, np.abs(got - want).mean())
    assert np.abs(got - want).max() < 4 / 255
    wrong = _pil_crop(truth.path[int(b['image_id'][r])], box, 16)
    assert np.abs(got - wrong).mean() > 10 / 255
    checked += 1
  assert checked >= 3
  # different queries give different patches
  v = np.flatnonzero(b['valid'])
  assert np.abs(b['patches'][v[0]] / 255.0 - b['patches'][v[1]] / 255.0).mean() > 0.02


def test_control_run_queries_of_another_class(fixture):
  """The control run (``use_query_seed(s, other_class=True)``): the same trials, each
  with a query of another class from another image; deterministic per seed."""
  truth = fixture[2]
  it, _, _ = _dataset(fixture, train=False)
  normal = _eval_queries(it)
  it.use_query_seed(0, other_class=True)
  control = _eval_queries(it)
  assert set(control) == set(normal) == truth.trials()[0]
  ids, labels = it.ann.image_ids, it.ann.labels
  for (iid, c), (qid, q_box) in control.items():
    assert qid != iid
    rows = np.flatnonzero(ids[it.protocol.row_image] == qid)
    row = rows[np.all(np.isclose(it.ann.boxes[rows], q_box), axis=1)]
    assert len(row) == 1 and labels[row[0]] != c, (iid, c, qid)
  it2, _, _ = _dataset(fixture, train=False)
  it2.use_query_seed(0, other_class=True)
  assert _eval_queries(it2) == control
  it2.use_query_seed(0)
  assert _eval_queries(it2) == normal


def test_a_query_image_that_fails_to_decode_blanks_its_rows(fixture, tmp_path):
  """A query image that passed the index but is corrupt at load time: the pass goes
  on, every row that loads it (as target or query) is replaced and invalid, counted as
  decode_failed; all other trials are evaluated."""
  import shutil

  ann, image_dir, _ = fixture
  images = str(tmp_path / 'images')
  shutil.copytree(image_dir, images)
  it, stats, _ = _dataset((ann, images, None), train=False, cache_decoded=False)
  queries = _eval_queries(it)
  bad = max({q for q, _ in queries.values()}, key=[q for q, _ in queries.values()].count)
  name = next(im['file_name'] for im in json.load(open(ann))['images'] if im['id'] == bad)
  with open(os.path.join(images, name), 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' + b'\0' * 64)  # corrupt after the index accepted it
  got = set()
  for batch in it:
    for r in np.flatnonzero(batch['valid']):
      got.add((int(batch['image_id'][r]), int(batch['label'][r])))
      assert bad not in (int(batch['image_id'][r]), int(batch['query_image_id'][r]))
  want = {k for k, (q, _) in queries.items() if bad not in (k[0], q)}
  assert got == want and len(want) < len(queries)
  assert stats.as_dict()['decode_failed'] == len(queries) - len(want)
