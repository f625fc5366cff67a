"""DETR fine-tuning end to end on a tiny COCO-format set made here: training, pycocotools
AP equal to pycocotools on the written json, batch-size-invariant evaluation, best and
last checkpoints, predictions from the workdir."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from updetr_jax.configs import finetune_coco
from updetr_jax import checkpoints, evaluate, train
from updetr_jax.tasks import detection as detection_task
from updetr_jax.models import build_model
from updetr_jax.sharding import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORIES = {4: 'red square', 9: 'green bar', 17: 'blue block'}
COLOURS = {4: (220, 40, 40), 9: (40, 200, 60), 17: (50, 70, 230)}


def _make_set(root: str, n: int = 10, seed: int = 0):
  """n images of 2-3 sizes with 1-3 coloured rectangles each (category = colour), some
  crowd and degenerate boxes; returns (ann_file, image_dir)."""
  rng = np.random.default_rng(seed)
  image_dir = os.path.join(root, 'images')
  os.makedirs(image_dir, exist_ok=True)
  coco = {
    'images': [],
    'annotations': [],
    'categories': [{'id': c, 'name': n_} for c, n_ in CATEGORIES.items()],
  }
  sizes = [(60, 80), (80, 60), (48, 96)]
  for i in range(n):
    h, w = sizes[i % len(sizes)]
    img = (rng.uniform(0, 60, (h, w, 3))).astype(np.uint8)
    iid = 100 + 7 * i
    for _ in range(1 + i % 3):
      c = int(rng.choice(list(CATEGORIES)))
      bw, bh = int(rng.integers(w // 4, w // 2)), int(rng.integers(h // 4, h // 2))
      x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
      img[y : y + bh, x : x + bw] = COLOURS[c]
      coco['annotations'].append(
        {
          'id': len(coco['annotations']) + 1,
          'image_id': iid,
          'category_id': c,
          'bbox': [x, y, bw, bh],
          'area': bw * bh,
          'iscrowd': 0,
        }
      )
    if i == 3:  # a crowd region and an empty box: dropped from training, kept in the json
      coco['annotations'].append(
        {
          'id': len(coco['annotations']) + 1,
          'image_id': iid,
          'category_id': 4,
          'bbox': [0, 0, 10, 10],
          'area': 100,
          'iscrowd': 1,
        }
      )
      coco['annotations'].append(
        {
          'id': len(coco['annotations']) + 1,
          'image_id': iid,
          'category_id': 9,
          'bbox': [5, 5, 0, 4],
          'area': 0,
          'iscrowd': 0,
        }
      )
    name = f'{iid}.png'
    Image.fromarray(img).save(os.path.join(image_dir, name))
    coco['images'].append({'id': iid, 'file_name': name, 'height': h, 'width': w})
  ann = os.path.join(root, 'ann.json')
  with open(ann, 'w') as f:
    json.dump(coco, f)
  return ann, image_dir


def tiny_finetune_config(ann_file, image_dir):
  config = finetune_coco.get_config('150ep')
  config.model.update(
    backbone='resnet_tiny',
    hidden_dim=32,
    nheads=2,
    enc_layers=1,
    dec_layers=2,
    dim_feedforward=64,
    num_queries=10,
    num_classes=-1,
    dropout=0.0,
  )
  config.data.update(
    ann_file=ann_file,
    image_dir=image_dir,
    eval_ann_file='',
    scales=(40, 48),
    max_size=64,
    eval_scale=48,
    crop_resize_scales=(48,),
    crop_size=(32, 48),
    buckets=((48, 64), (48, 96)),
    max_targets=8,
    index_cache_dir=None,
    cache_decoded=True,
    prefetch=1,
    num_parallel_calls=2,
  )
  config.batch_size = 4
  config.loss_replicas = 1
  config.num_train_steps = 8
  config.examples_per_epoch = -1
  config.optim.update(lr=1e-3, lr_backbone=1e-4)
  config.eval.update(batch_size=2, every_steps=4, num_pictures=2, picture_threshold=0.0)
  config.checkpoint_every_steps = 4
  config.log_every_steps = 2
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('finetune'))
  ann, image_dir = _make_set(os.path.join(root, 'data'))
  config = tiny_finetune_config(ann, image_dir)
  workdir = os.path.join(root, 'run')
  summary = train.run(config, workdir)
  return config, workdir, summary, ann


def _pycocotools_direct(ann_file, results_file):
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval

  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(ann_file)
    ev = COCOeval(gt, gt.loadRes(results_file), 'bbox')
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev.stats[:6]


def test_finetune_run_writes_evaluation_equal_to_pycocotools(trained):
  config, workdir, summary, ann = trained
  assert summary['task'] == 'detection' and summary['steps'] == 8
  # 3 categories with ids 4, 9, 17 -> labels = ids, 18 classes (19 logits)
  assert json.load(open(os.path.join(workdir, 'config.json')))['model']['num_classes'] == 18
  results = json.load(open(os.path.join(workdir, 'eval', 'detections.json')))
  assert len(results) == 10 * 10  # every query of every image, no threshold
  assert {r['category_id'] for r in results} <= set(CATEGORIES)
  direct = _pycocotools_direct(ann, os.path.join(workdir, 'eval', 'detections.json'))
  ours = [summary['eval'][k] for k in evaluate.COCO_METRICS]
  np.testing.assert_allclose(ours, direct, rtol=0, atol=1e-12)
  assert summary['eval']['AP50'] > 0  # the boxes are not all misses
  # periodic eval at 4, final at 8; TensorBoard + jsonl + pictures
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [l['step'] for l in lines] == [2, 4, 6, 8]
  assert all(np.isfinite(l['loss']) for l in lines)
  assert len(summary['pngs']) == 2 and all(os.path.exists(p) for p in summary['pngs'])
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))


def test_best_and_last_checkpoints(trained):
  config, workdir, summary, _ = trained
  best = json.load(open(os.path.join(workdir, 'best', 'best.json')))
  assert best['step'] in (4, 8) and best['metric'] == 'AP'
  assert summary['best'] == {k: best[k] for k in ('step', 'metric', 'value')}
  assert best['value'] == max(best['metrics']['AP'], summary['eval']['AP'])
  last, step, _ = checkpoints.restore_workdir_variables(workdir, 'latest')
  assert step == 8
  chosen, best_step, _ = checkpoints.restore_workdir_variables(workdir, 'auto')
  assert best_step == best['step']
  if best_step == 8:
    jax.tree_util.tree_map(np.testing.assert_array_equal, last, chosen)


def test_eval_batch_1_equals_batch_8(trained):
  """Each image is run in its own shape bucket: batch size and neighbours change nothing."""
  config, workdir, _, _ = trained
  variables, _, _ = checkpoints.restore_workdir_variables(workdir, 'latest')
  model = build_model(config.model)
  mesh = make_mesh()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  out = {}
  for bs in (1, 8):
    config = config.copy_and_resolve_references()  # the module's config stays as trained
    config.eval.batch_size = bs
    task = detection_task.DetectionTask(config, sharding)
    metrics = task.evaluate(model, variables, 0, os.path.join(workdir, f'eval_bs{bs}'))
    results = json.load(open(os.path.join(workdir, f'eval_bs{bs}', 'eval', 'detections.json')))
    out[bs] = (
      metrics,
      sorted((r['image_id'], r['bbox'], r['score'], r['category_id']) for r in results),
    )
  assert out[1][0] == out[8][0]
  a, b = out[1][1], out[8][1]
  assert [r[0] for r in a] == [r[0] for r in b]
  np.testing.assert_allclose(
    [r[1] + [r[2]] for r in a], [r[1] + [r[2]] for r in b], rtol=1e-5, atol=1e-5
  )


def test_resume_keeps_going_and_refuses_nothing(trained, tmp_path):
  """Rerunning a finished run with a longer schedule continues from its checkpoint."""
  config, finished, _, _ = trained
  workdir = str(tmp_path / 'run')  # a copy: the other tests read the 8-step run
  shutil.copytree(finished, workdir)
  config = config.copy_and_resolve_references()
  config.num_train_steps = 10
  config.eval.batch_size = 2
  summary = train.run(config, workdir)
  assert summary['steps'] == 10
  lines = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [l['step'] for l in lines][-2:] == [8, 10]


def test_detection_config_errors(trained):
  config, _, _, _ = trained
  mesh = make_mesh()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  bad = config.copy_and_resolve_references()
  bad.model.num_classes = 5
  with pytest.raises(ValueError, match=r'model.num_classes=5 .* labels .* up to 17'):
    detection_task.DetectionTask(bad, sharding)
  bad = config.copy_and_resolve_references()
  bad.model.num_patches = 2
  with pytest.raises(ValueError, match='num_patches=0'):
    detection_task.DetectionTask(bad, sharding)


def test_predict_cli_on_the_workdir(trained, tmp_path):
  config, workdir, _, ann = trained
  image_dir = os.path.join(os.path.dirname(ann), 'images')
  files = sorted(os.path.join(image_dir, f) for f in os.listdir(image_dir))[:2]
  out = str(tmp_path / 'pred')
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'updetr_jax.predict',
      f'--workdir={workdir}',
      f'--output={out}',
      '--threshold=0.0',
      '--class_names=none',
      *files,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = json.load(open(os.path.join(out, 'detections.json')))
  assert len(records) == 2 * 10
  assert sorted(os.listdir(out)) == sorted(
    ['detections.json'] + [os.path.basename(f)[:-4] + '.png' for f in files]
  )
