"""One-shot detection end to end on a tiny COCO-format set: training with the CoAE
protocol, seen / unseen AP50 over query runs, predict --query, and the init from an
UP-DETR pre-training (patch2query kept) or a DETR (patch2query fresh)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from test_finetune import _make_set, tiny_finetune_config
from updetr_jax import checkpoints, evaluate, files, sharding, train, train_step
from updetr_jax.configs import compare as compare_config
from updetr_jax.configs import oneshot_voc
from updetr_jax.data.oneshot import oneshot_data_config
from updetr_jax.models import build_model, init_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# test_finetune's tiny DETR (its architecture fields; the one-shot head is set apart).
_ARCH = ('backbone', 'hidden_dim', 'nheads', 'enc_layers', 'dec_layers', 'dim_feedforward')
TINY = {k: tiny_finetune_config('', '').model[k] for k in _ARCH + ('num_queries', 'dropout')}


def tiny_oneshot_data(ann_file, image_dir, **overrides):
  """test_finetune's tiny detection data as a one-shot data config (16-px queries)."""
  data = tiny_finetune_config(ann_file, image_dir).data.to_dict()
  return oneshot_data_config(**{**data, 'patch_size': 16, **overrides})


def tiny_oneshot_config(ann_file, image_dir):
  data = tiny_oneshot_data(ann_file, image_dir, unseen_classes=('blue block',))
  config = oneshot_voc.oneshot_config('150ep', data)
  config.model.update(**TINY)
  config.batch_size = 4
  config.loss_replicas = 1
  config.num_train_steps = 8
  config.optim.update(lr=1e-3, lr_backbone=1e-4)
  config.eval.update(
    batch_size=2, every_steps=4, num_pictures=2, picture_threshold=0.0, query_seeds=(0, 1)
  )
  config.checkpoint_every_steps = 4
  config.log_every_steps = 2
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('oneshot'))
  ann, image_dir = _make_set(os.path.join(root, 'data'), n=12)
  config = tiny_oneshot_config(ann, image_dir)
  workdir = os.path.join(root, 'run')
  summary = train.run(config, workdir)
  return config, workdir, summary, ann, image_dir


def test_train_and_evaluate_seen_unseen_ap50(trained):
  """The run trains on seen classes only, evaluates both splits over the query runs
  and writes every run's per-class AP (json, eval.jsonl, PNGs, best checkpoint)."""
  config, workdir, summary, _, _ = trained
  assert summary['task'] == 'oneshot' and summary['steps'] == 8
  stats = summary['data_stats']
  assert stats['unseen_boxes'] > 0 and stats['images_without_seen_class'] >= 1
  ev = summary['eval']
  for part in ('seen', 'unseen'):
    runs = [ev[f'AP50_{part}_run{s}'] for s in (0, 1)]
    assert ev[f'AP50_{part}'] == pytest.approx(np.mean(runs), abs=1e-12)
    assert ev[f'AP50_{part}_std'] == pytest.approx(np.std(runs, ddof=1), abs=1e-12)
  record = files.read_json(os.path.join(workdir, 'eval', 'oneshot_step8.json'))
  assert record['seen'] == ['red square', 'green bar'] and record['unseen'] == ['blue block']
  per_class = [r['per_class'] for r in record['runs']]
  assert ev['AP50_seen_run0'] == pytest.approx(
    np.mean([per_class[0]['red square'], per_class[0]['green bar']]), abs=1e-12
  )
  assert ev['AP50_unseen_run1'] == pytest.approx(per_class[1]['blue block'], abs=1e-12)
  control = record['other_class_query']  # the control run: queries of another class
  assert control['query_seed'] == 0
  assert ev['AP50_seen_other_class_query'] == control['AP50_seen']
  assert ev['AP50_unseen_other_class_query'] == control['AP50_unseen']
  with open(os.path.join(workdir, 'eval.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f if line.strip()]
  assert steps == [4, 8]
  assert len(summary['pngs']) == 2 and all(os.path.exists(p) for p in summary['pngs'])
  assert summary['best']['metric'] == 'AP50_seen'


def test_evaluation_equals_scoring_the_detections_again(trained):
  """The metrics of a run equal ``oneshot_ap50`` on its trials' detections, rerun here
  through the task (its query seed 1), from the json ground truth."""
  from updetr_jax.tasks.oneshot import OneShotTask

  config, workdir, summary, ann, _ = trained
  variables, _, model_config = checkpoints.restore_workdir_variables(workdir)
  model = build_model(model_config)
  task = OneShotTask(config.copy_and_resolve_references(), _data_sharding())
  ids, labels, scores, boxes = task.run_trials(model, variables, 1)
  gt = evaluate.oneshot_ground_truth(
    evaluate.evaluation_ground_truth(config.data), ids, labels, task.info.label_to_category_id
  )
  # Every (image, class present) pair of the json once.
  coco = json.load(open(ann))
  pairs = {
    (a['image_id'], a['category_id'])
    for a in coco['annotations']
    if not a['iscrowd'] and a['bbox'][2] > 0 and a['bbox'][3] > 0
  }
  assert sorted(zip(ids.tolist(), labels.tolist())) == sorted(pairs)
  dets = [{'label': l, 'scores': s, 'boxes': b} for l, s, b in zip(labels, scores, boxes)]
  ap = evaluate.oneshot_ap50(dets, gt, task.info.seen, task.info.unseen)
  assert ap['seen'] == pytest.approx(summary['eval']['AP50_seen_run1'], abs=1e-9)
  assert ap['unseen'] == pytest.approx(summary['eval']['AP50_unseen_run1'], abs=1e-9)


def _data_sharding():
  from jax.sharding import NamedSharding, PartitionSpec as P

  return NamedSharding(sharding.make_mesh(), P('data'))


def test_predict_with_a_query(trained, tmp_path):
  _, workdir, _, _, image_dir = trained
  images = sorted(os.path.join(image_dir, f) for f in os.listdir(image_dir))[:2]
  out = str(tmp_path / 'pred')
  run = lambda *args: subprocess.run(  # noqa: E731
    [sys.executable, '-m', 'updetr_jax.predict', f'--workdir={workdir}', *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  proc = run(f'--query={images[0]}', '--query_box=2,2,30,20', f'--output={out}', *images)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = json.load(open(os.path.join(out, 'detections.json')))
  assert len(records) == 2 * 10
  assert {r['category_name'] for r in records} == {'query'}
  assert sorted(os.listdir(out)) == sorted(
    ['detections.json'] + [os.path.basename(f)[:-4] + '.png' for f in images]
  )
  proc = run(f'--output={out}2', images[0])  # a one-shot model needs its query
  assert proc.returncode != 0 and 'it needs a query (predict --query' in proc.stderr


def test_init_from_pretraining_keeps_patch2query_and_from_detr_starts_it_fresh(tmp_path):
  """UP-DETR pre-training -> one-shot: every weight but the class head, patch2query
  included, feature_align gone; DETR -> one-shot: patch2query fresh too."""
  config = oneshot_voc.get_config()
  config.model.update(**TINY)
  config.init.pretrained = str(tmp_path / 'pre')
  pre_cfg = dict(config.model.to_dict(), num_classes=2, num_patches=2, feature_head=True)
  pre = init_variables(build_model(pre_cfg), jax.random.PRNGKey(1))
  checkpoints.save_variables(config.init.pretrained, pre, pre_cfg)
  model = build_model(config.model)
  fresh = traverse_util.flatten_dict(init_variables(model, jax.random.PRNGKey(2)))
  variables, *_ = train_step.init_train_state(config, model, jax.random.PRNGKey(2), 10)
  got, src = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(pre)
  assert not any(k[1] == 'feature_align' for k in got)
  assert any(k[1] == 'patch2query' for k in got)
  for k, v in got.items():
    want = fresh[k] if k[1] == 'class_embed' else src[k]
    np.testing.assert_array_equal(np.asarray(v), np.asarray(want), err_msg='/'.join(k))

  detr_cfg = dict(config.model.to_dict(), num_classes=5, num_patches=0)
  detr = init_variables(build_model(detr_cfg), jax.random.PRNGKey(3))
  checkpoints.save_variables(str(tmp_path / 'detr'), detr, detr_cfg)
  config.init.pretrained = str(tmp_path / 'detr')
  variables, *_ = train_step.init_train_state(config, model, jax.random.PRNGKey(2), 10)
  got, src = traverse_util.flatten_dict(variables), traverse_util.flatten_dict(detr)
  for k, v in got.items():
    want = fresh[k] if k[1] in ('class_embed', 'patch2query') else src[k]
    np.testing.assert_array_equal(np.asarray(v), np.asarray(want), err_msg='/'.join(k))


def test_model_config_errors_name_the_field():
  from updetr_jax.tasks.oneshot import check_model_config

  config = oneshot_voc.get_config()
  check_model_config(config.model)
  config.model.update(num_classes=20, feature_head=True)
  with pytest.raises(ValueError, match='num_classes=20.*feature_head=True'):
    check_model_config(config.model)


def test_compare_oneshot_variant_is_the_oneshot_task():
  """configs/compare.py:oneshot: the one-shot task on the miniature, the pre-training's
  architecture, seen / unseen metrics."""
  c = compare_config.get_config('oneshot')
  assert c.finetune.task == 'oneshot' and tuple(c.metrics) == ('AP50_seen', 'AP50_unseen')
  for k in ('backbone', 'hidden_dim', 'num_queries', 'pre_norm', 'enc_layers', 'dec_layers'):
    assert c.finetune.model[k] == c.pretrain.model[k], k
  assert c.finetune.data.patch_size == c.pretrain.data.patch_size
  from updetr_jax import compare

  single = compare.pretrain_config(c, 'updetr_single_query', 'cnn.npz')
  assert single.model.num_patches == 1 and c.pretrain.model.num_patches == 4


def test_best_checkpoint_is_not_stuck_on_a_nan_metric(tmp_path):
  """A first evaluation whose best_metric is NaN (no trial of any seen class yet) must
  not block every later number from becoming the best; a NaN never replaces one."""
  config = oneshot_voc.get_config()
  best = train.BestCheckpoint(str(tmp_path), 'AP50_seen', config)
  ckpt = {'w': np.zeros(3, np.float32)}
  assert best.update(1, {'AP50_seen': float('nan')}, ckpt)
  assert best.update(2, {'AP50_seen': 0.25}, ckpt)
  assert not best.update(3, {'AP50_seen': float('nan')}, ckpt)
  assert not best.update(4, {'AP50_seen': 0.2}, ckpt)
  assert best.record['step'] == 2


def test_voc_release_config():
  """configs/oneshot_voc.py: the pre-training's architecture (pre-norm R50, N=100) with
  one query on all queries and a binary head; CoAE's split (16 seen, cow / sheep / cat /
  aeroplane unseen); 128-px queries; five query runs; DETR's VOC optimiser."""
  from updetr_jax.class_names import VOC_CLASSES
  from updetr_jax.configs import finetune_voc, pretrain
  from updetr_jax.data.oneshot import class_split
  from updetr_jax.pretrained import ARCHITECTURE_FIELDS

  c = oneshot_voc.get_config()
  pre = pretrain.get_config()
  assert c.task == 'oneshot' and c.data.source == 'tfds_voc'
  for k in ARCHITECTURE_FIELDS:
    assert c.model[k] == pre.model[k], k
  assert c.model.backbone == 'resnet50' and c.model.num_queries == 100 and c.model.pre_norm
  assert (c.model.num_patches, c.model.num_classes, c.model.feature_head) == (1, 1, False)
  assert c.data.patch_size == pre.data.patch_size == 128
  seen, unseen = class_split(c.data.unseen_classes, dict(enumerate(VOC_CLASSES)), {})
  assert [VOC_CLASSES[l] for l in unseen] == ['aeroplane', 'cat', 'cow', 'sheep']
  assert len(seen) == 16
  assert tuple(c.eval.query_seeds) == (0, 1, 2, 3, 4) and c.eval.best_metric == 'AP50_seen'
  voc = finetune_voc.get_config()
  assert c.optim.to_dict() == voc.optim.to_dict() and c.num_epochs == voc.num_epochs
  assert c.batch_size == voc.batch_size
