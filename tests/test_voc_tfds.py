"""PASCAL VOC fine-tuning through TFDS, offline: a tiny builder shaped like TFDS `voc`
is prepared as ArrayRecord in a temporary data_dir, then read by the 'tfds_voc' source
(ground truth for evaluation, a short fine-tune with COCO metrics and VOC07 AP50)."""

import contextlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import importorskip  # fails instead of skipping under CI=true

tfds = importorskip('tensorflow_datasets')
importorskip('array_record')  # TFDS' random-access (as_data_source) format

from updetr_jax.configs import finetune_voc  # noqa: E402
from test_finetune import tiny_finetune_config  # noqa: E402
from updetr_jax import evaluate, train  # noqa: E402
from updetr_jax.class_names import VOC_CLASSES  # noqa: E402

NAME = 'tiny_voc'
POSES = ('frontal', 'rear', 'left', 'right', 'unspecified')
SIZES = ((60, 80), (80, 60), (48, 72), (64, 64))  # (h, w)
COMMON = (14, 6, 11)  # person, car, dog
BOTTLE = 4  # only ever 'difficult' (in the test split): no positives for VOC07
COLOURS = {14: (225, 60, 55), 6: (50, 205, 80), 11: (60, 85, 235), BOTTLE: (235, 220, 50)}


def _split_spec(split):
  """Deterministic content of one split: list of dicts with filename, image_id, h, w and
  objects [(label, (x0, y0, x1, y1) integer pixels, difficult)]."""
  rng = np.random.default_rng({'train': 11, 'test': 12}[split])
  n = 8 if split == 'train' else 6
  out = []
  counter = 0
  for i in range(n):
    h, w = SIZES[i % len(SIZES)]
    if split == 'train':
      filename = f'2007_{123 + 17 * i:06d}.jpg'
    else:  # VOC07-style names (digits only) next to VOC12-style ones
      filename = f'{4500 + 31 * i:06d}.jpg' if i % 2 else f'2008_{301 + 5 * i:06d}.jpg'
    objects = []
    if split == 'train' and i == 5:
      pass  # an image without any object
    elif split == 'test' and i == 3:
      objects.append((BOTTLE, (8, 6, 40, 30), True))  # a lone difficult object
    else:
      for _ in range(1 + i % 2):
        bw = int(rng.integers(2 * w // 5, 7 * w // 10))
        bh = int(rng.integers(2 * h // 5, 7 * h // 10))
        x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        label = int(rng.choice(COMMON))
        objects.append((label, (x0, y0, x0 + bw, y0 + bh), counter % 4 == 3))
        counter += 1
    digits = ''.join(c for c in os.path.splitext(filename)[0] if c.isdigit())
    out.append(dict(filename=filename, image_id=int(digits), h=h, w=w, objects=objects))
  return out


def _image(entry, seed):
  rng = np.random.default_rng(seed)
  img = rng.integers(0, 50, (entry['h'], entry['w'], 3)).astype(np.uint8)
  for label, (x0, y0, x1, y1), _ in entry['objects']:
    img[y0:y1, x0:x1] = COLOURS[label]
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format='JPEG', quality=95)
  return buf.getvalue()


class TinyVoc(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Synthetic stand-in for TFDS `voc` (same feature layout, 20 VOC classes). Not
  registered: `tfds.builder('tiny_voc', data_dir=...)` reads it back from its files."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      description='Coloured rectangles in the layout of TFDS voc.',
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(encoding_format='jpeg'),
          'image/filename': tfds.features.Text(),
          'objects': tfds.features.Sequence(
            {
              'bbox': tfds.features.BBoxFeature(),
              'label': tfds.features.ClassLabel(names=VOC_CLASSES),
              'is_difficult': np.bool_,
              'is_truncated': np.bool_,
              'pose': tfds.features.ClassLabel(names=POSES),
            }
          ),
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split) for split in ('train', 'test')}

  def _generate_examples(self, split):
    for k, entry in enumerate(_split_spec(split)):
      h, w = entry['h'], entry['w']
      objects = [
        {
          'bbox': tfds.features.BBox(ymin=y0 / h, xmin=x0 / w, ymax=y1 / h, xmax=x1 / w),
          'label': label,
          'is_difficult': difficult,
          'is_truncated': bool(x0 == 0),
          'pose': POSES[(k + j) % len(POSES)],
        }
        for j, (label, (x0, y0, x1, y1), difficult) in enumerate(entry['objects'])
      ]
      yield (
        entry['filename'],
        {
          'image': _image(entry, 1000 * len(split) + k),
          'image/filename': entry['filename'],
          'objects': objects,
        },
      )


@pytest.fixture(scope='module')
def voc_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  builder = TinyVoc(data_dir=data_dir)
  builder.download_and_prepare(
    file_format='array_record', download_config=tfds.download.DownloadConfig(try_download_gcs=False)
  )
  written = os.listdir(os.path.join(data_dir, NAME, '1.0.0'))
  assert any('.array_record' in f for f in written), written
  return data_dir


def _voc_data(data_dir):
  """The VOC fine-tuning config's data section, pointed at the tiny dataset."""
  data = finetune_voc.get_config().data
  data.update(
    tfds_voc_train=(f'{NAME}:train',),
    tfds_voc_eval=(f'{NAME}:test',),
    tfds_data_dir=data_dir,
    index_cache_dir=None,
  )
  return data


def _expected_gt(split):
  """Per image of the split (sorted by id): (id, h, w, xyxy [k, 4], labels [k], difficult)."""
  rows = []
  for e in sorted(_split_spec(split), key=lambda e: e['image_id']):
    boxes = np.array([b for _, b, _ in e['objects']], np.float64).reshape(-1, 4)
    rows.append(
      (
        e['image_id'],
        e['h'],
        e['w'],
        boxes,
        np.array([l for l, _, _ in e['objects']], np.int64),
        np.array([d for _, _, d in e['objects']], bool),
      )
    )
  return rows


def test_evaluation_ground_truth_from_tfds(voc_dir):
  data = _voc_data(voc_dir)
  assert data.source == 'tfds_voc'
  gt = evaluate.evaluation_ground_truth(data)
  expected = _expected_gt('test')
  assert sorted(gt.getImgIds()) == [r[0] for r in expected]
  assert 2008000301 in gt.getImgIds() and 4531 in gt.getImgIds()  # both name styles
  cats = gt.loadCats(gt.getCatIds())
  assert [c['id'] for c in cats] == list(range(1, 21))
  assert [c['name'] for c in cats] == list(VOC_CLASSES)
  n_difficult = 0
  for iid, h, w, boxes, labels, difficult in expected:
    img = gt.loadImgs([iid])[0]
    assert (img['height'], img['width']) == (h, w)
    anns = gt.loadAnns(gt.getAnnIds(imgIds=[iid]))  # in the record's object order
    assert [a['category_id'] for a in anns] == (labels + 1).tolist()
    assert [a['iscrowd'] for a in anns] == difficult.astype(int).tolist()
    xywh = np.array([a['bbox'] for a in anns], np.float64).reshape(-1, 4)
    np.testing.assert_allclose(xywh[:, :2], boxes[:, :2], atol=1e-3)
    np.testing.assert_allclose(xywh[:, :2] + xywh[:, 2:], boxes[:, 2:], atol=1e-3)
    n_difficult += int(difficult.sum())
  assert n_difficult >= 2 and len(gt.getAnnIds()) == sum(len(r[4]) for r in expected)

  # Exact detections of the non-difficult boxes only, then also top-scoring ones on the
  # difficult boxes: both score perfectly, since difficult objects are neither needed
  # for recall nor counted as false positives (VOC07 and COCO's crowd rule).
  for with_difficult in (False, True):
    evaluator = evaluate.CocoEvaluator({label: label + 1 for label in range(20)})
    for iid, _, _, boxes, labels, difficult in expected:
      keep = np.ones_like(difficult) if with_difficult else ~difficult
      scores = np.where(difficult, 0.99, 0.9)[keep]
      evaluator.update([iid], scores[None], labels[keep][None], boxes[keep][None])
    voc = evaluate.voc07_from_coco(gt, evaluator.results(), evaluator.image_ids)
    assert voc['mAP'] == pytest.approx(1.0, abs=1e-12), with_difficult
    assert voc['category_ids'] == list(range(1, 21))
    assert np.isnan(voc['per_class'][BOTTLE])  # difficult-only class: no positives
    assert voc['per_class'][COMMON[0]] == pytest.approx(1.0, abs=1e-12)
    coco = evaluator.summarize(gt)
    assert coco['AP'] == pytest.approx(1.0, abs=1e-12), with_difficult
    assert coco['AP50'] == pytest.approx(1.0, abs=1e-12), with_difficult
  # Counting the difficult boxes as ordinary ones would lower the first score.
  plain = evaluate.coco_gt_from_arrays(
    [r[0] for r in expected],
    [r[1:3] for r in expected],
    [r[3] for r in expected],
    [r[4] + 1 for r in expected],
    categories=range(1, 21),
  )
  without = [r for r in evaluator.results() if r['score'] < 0.95]
  assert evaluate.voc07_from_coco(plain, without, evaluator.image_ids)['mAP'] < 0.99


def _pycocotools_on_expected(expected, results_file):
  """COCO metrics with a ground truth made here from the generated boxes (difficult
  -> iscrowd), by pycocotools directly."""
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval

  dataset = {
    'images': [],
    'annotations': [],
    'categories': [{'id': i + 1, 'name': n} for i, n in enumerate(VOC_CLASSES)],
  }
  for iid, h, w, boxes, labels, difficult in expected:
    dataset['images'].append({'id': iid, 'height': h, 'width': w})
    for (x0, y0, x1, y1), label, d in zip(boxes, labels, difficult):
      dataset['annotations'].append(
        {
          'id': len(dataset['annotations']) + 1,
          'image_id': iid,
          'category_id': int(label) + 1,
          'bbox': [x0, y0, x1 - x0, y1 - y0],
          'area': (x1 - x0) * (y1 - y0),
          'iscrowd': int(d),
        }
      )
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO()
    gt.dataset = dataset
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(results_file), 'bbox')
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev.stats[:6]


def test_finetune_on_tfds_voc(voc_dir, tmp_path):
  config = tiny_finetune_config('', '')  # tiny DETR; the data section is replaced
  voc = finetune_voc.get_config()
  config.data.update(
    source=voc.data.source,
    tfds_voc_train=(f'{NAME}:train',),
    tfds_voc_eval=(f'{NAME}:test',),
    tfds_data_dir=voc_dir,
    buckets=((64, 64),),  # one square canvas: one compile per step kind
    cache_decoded=False,  # images read from the ArrayRecord files
    index_cache_dir=None,
  )
  config.eval.update(voc07=voc.eval.voc07, every_steps=6, num_pictures=0)
  config.num_train_steps = 6
  config.checkpoint_every_steps = 6
  assert config.data.source == 'tfds_voc' and config.eval.voc07
  assert config.model.num_classes == -1  # taken from the data: VOC has 20 classes
  workdir = str(tmp_path / 'run')
  summary = train.run(config, workdir)

  assert summary['task'] == 'detection' and summary['steps'] == 6
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['num_classes'] == 20  # although labels stop at 14
  # Difficult training objects are dropped from the targets (counted once).
  train_difficult = sum(d for e in _split_spec('train') for _, _, d in e['objects'])
  assert train_difficult >= 1
  assert summary['data_stats']['difficult_boxes'] == train_difficult

  metrics = summary['eval']
  assert set(evaluate.COCO_METRICS) | {'AP50_voc07'} <= set(metrics)
  assert all(np.isfinite(metrics[k]) for k in evaluate.COCO_METRICS)
  results_file = os.path.join(workdir, 'eval', 'detections.json')
  with open(results_file) as f:
    results = json.load(f)
  expected = _expected_gt('test')
  ids = [r[0] for r in expected]
  assert sorted({r['image_id'] for r in results}) == ids
  assert len(results) == len(ids) * config.model.num_queries  # no threshold
  assert {r['category_id'] for r in results} <= set(range(1, 21))

  # VOC07 AP50 from the written detections and the generated boxes, independently of
  # the TFDS ground truth the run used.
  by_image = {iid: [] for iid in ids}
  for r in results:
    by_image[r['image_id']].append(r)
  dets, gts = [], []
  for iid, _, _, boxes, labels, difficult in expected:
    rs = by_image[iid]
    xywh = np.array([r['bbox'] for r in rs], np.float64).reshape(-1, 4)
    dets.append(
      {
        'boxes': np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
        'scores': np.array([r['score'] for r in rs], np.float64),
        'labels': np.array([r['category_id'] - 1 for r in rs], np.int64),
      }
    )
    gts.append({'boxes': boxes, 'labels': labels, 'difficult': difficult})
  ours = evaluate.voc07_ap50(dets, gts, len(VOC_CLASSES))['mAP']
  assert abs(metrics['AP50_voc07'] - ours) <= 1e-9, (metrics['AP50_voc07'], ours)
  # ... and the COCO metrics equal pycocotools on the same generated ground truth.
  direct = _pycocotools_on_expected(expected, results_file)
  np.testing.assert_allclose([metrics[k] for k in evaluate.COCO_METRICS], direct, rtol=0, atol=1e-9)


def test_cached_annotations_and_index_survive_a_rerun(voc_dir, tmp_path):
  """With index_cache_dir set (the configs' default), the first run writes the image
  index and the annotations and a second run reads them back unchanged; a version in
  the spec ('name:version:split') is accepted."""
  data = _voc_data(voc_dir)
  data.update(index_cache_dir=str(tmp_path / 'cache'), tfds_voc_eval=(f'{NAME}:1.0.0:test',))
  fresh = evaluate.evaluation_ground_truth(_voc_data(voc_dir))
  first = evaluate.evaluation_ground_truth(data)
  written = sorted(os.listdir(tmp_path / 'cache'))
  assert any(f.startswith('index-') for f in written), written
  assert any(f.startswith('ann-') for f in written), written
  second = evaluate.evaluation_ground_truth(data)
  assert sorted(os.listdir(tmp_path / 'cache')) == written  # read, not rebuilt
  for gt in (first, second):
    assert gt.dataset['images'] == fresh.dataset['images']
    assert gt.dataset['annotations'] == fresh.dataset['annotations']


def test_oneshot_on_tfds_voc(voc_dir, tmp_path):
  """configs/oneshot_voc.py's data through TFDS VOC ('car' unseen here: the tiny set has
  no cow, sheep, cat or aeroplane): car boxes never reach training, images with only
  cars are not trained on, the trials are the non-difficult (image, class) pairs of
  the test split whose class has a query in another image."""
  from updetr_jax.configs import oneshot_voc
  from test_oneshot import TINY

  config = oneshot_voc.get_config()
  config.model.update(**TINY)
  config.data.update(
    tfds_voc_train=(f'{NAME}:train',),
    tfds_voc_eval=(f'{NAME}:test',),
    tfds_data_dir=voc_dir,
    index_cache_dir=None,
    unseen_classes=('car',),
    scales=(48,),
    max_size=64,
    eval_scale=48,
    crop_prob=0.0,
    buckets=((64, 64),),
    patch_size=16,
  )
  config.batch_size = 2
  config.loss_replicas = 1
  config.num_train_steps = 4
  config.checkpoint_every_steps = 4
  config.eval.update(batch_size=2, every_steps=4, num_pictures=0, query_seeds=(0, 1))
  assert config.data.source == 'tfds_voc'
  summary = train.run(config, str(tmp_path / 'run'))

  spec = _split_spec('train')
  stats = summary['data_stats']
  assert stats['unseen_boxes'] == sum(l == 6 for e in spec for l, _, d in e['objects'] if not d)
  # Only cars, only difficult objects, or nothing: not trained on.
  no_seen = sum(not any(l != 6 and not d for l, _, d in e['objects']) for e in spec)
  assert stats['images_without_seen_class'] == no_seen >= 3
  record = json.load(open(tmp_path / 'run' / 'eval' / 'oneshot_step4.json'))
  assert record['unseen'] == ['car'] and len(record['seen']) == 19
  images = {}
  for e in _split_spec('test'):
    for l, _, d in e['objects']:
      if not d:
        images.setdefault(VOC_CLASSES[l], set()).add(e['image_id'])
  want = {c: len(ids) for c, ids in images.items() if len(ids) > 1}
  assert want == {'car': 3}  # person and dog (non-difficult) occur in one image each
  for run in record['runs']:
    assert run['trials'] == want
  assert np.isfinite(summary['eval']['AP50_unseen'])
  assert np.isnan(summary['eval']['AP50_seen'])  # no seen class has a trial here
