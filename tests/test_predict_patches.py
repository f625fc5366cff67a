"""predict with an UP-DETR pre-training model: query patch detection as the release's
notebook (--query_box cut from each image, --query files), and its usage errors;
``predict.load_model`` called with arguments (no flags), the kind taken from config.task.

predict's ``main`` runs in this process on flags parsed as on its command line: no
process start per call (each costs several seconds of imports), so the module's time is
mostly the 2-step training of its fixture."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from absl import app, flags, logging
from PIL import Image

from updetr_jax import checkpoints, predict, train
from updetr_jax.models import build_model, init_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
from test_train import tiny_config  # noqa: E402

# Two query boxes (x0, y0, x1, y1 pixels) inside both test images.
BOXES = ((4, 6, 40, 30), (20, 10, 50, 50))
SIZES = {'a': (64, 80), 'b': (72, 56)}  # name -> (H, W)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """test_train's tiny pre-training model (M = 2 patches of 16 px) after 2 steps, and
  two images of different sizes."""
  root = tmp_path_factory.mktemp('patches')
  config = tiny_config()
  config.num_train_steps = 2
  config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.eval.num_batches = 0
  workdir = str(root / 'run')
  train.run(config, workdir)
  rng = np.random.default_rng(0)
  images = {}
  for name, (h, w) in SIZES.items():
    images[name] = str(root / f'{name}.png')
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images[name])
  return workdir, images


def _predict(workdir, *args):
  """``python -m updetr_jax.predict --workdir=WORKDIR ARGS``, in this process."""
  fv = flags.FLAGS
  if 'query_box' not in fv:
    predict._define_flags()
  verbosity = logging.get_verbosity()
  fv.unparse_flags()
  try:
    predict.main(fv(['predict', f'--workdir={workdir}', *args]))
  finally:
    fv.unparse_flags()
    logging.set_verbosity(verbosity)


def _box_flags(boxes=BOXES):
  return [f'--query_box={",".join(map(str, b))}' for b in boxes]


@pytest.fixture(scope='module')
def box_run(pretrained, tmp_path_factory):
  workdir, images = pretrained
  out = str(tmp_path_factory.mktemp('box_run'))
  _predict(workdir, *_box_flags(), f'--output={out}', images['a'], images['b'])
  return out, json.load(open(os.path.join(out, 'detections.json')))


def test_query_boxes_find_one_box_per_patch_per_image(box_run):
  out, records = box_run
  assert sorted(os.listdir(out)) == ['a.png', 'b.png', 'detections.json']
  assert sorted((r['image_id'], r['patch']) for r in records) == [(0, 0), (0, 1), (1, 0), (1, 1)]
  for r in records:
    h, w = SIZES[r['file_name'][:-4]]
    x, y, bw, bh = r['bbox']
    assert 0 <= x and 0 <= y and bw >= 0 and bh >= 0
    assert x + bw <= w + 1e-6 and y + bh <= h + 1e-6
    assert 0.0 <= r['score'] <= 1.0 and 0.0 <= r['iou'] <= 1.0
    assert r['query_box'] == list(map(float, BOXES[r['patch']]))


def test_query_files_are_the_patches_searched(pretrained, box_run, tmp_path):
  """--query=crop.png: the crops of image a's boxes, saved as files, are the same query
  patches, so image a's answers equal the --query_box run's (the same group-top
  queries: each group sees only its own patch)."""
  workdir, images = pretrained
  a = np.asarray(Image.open(images['a']))
  crops = []
  for k, (x0, y0, x1, y1) in enumerate(BOXES):
    crops.append(str(tmp_path / f'crop{k}.png'))
    Image.fromarray(a[y0:y1, x0:x1]).save(crops[-1])
  out = str(tmp_path / 'files')
  _predict(workdir, *[f'--query={c}' for c in crops], f'--output={out}', images['a'])
  records = json.load(open(os.path.join(out, 'detections.json')))
  assert [(r['image_id'], r['patch'], r['query']) for r in records] == [
    (0, 0, 'crop0.png'),
    (0, 1, 'crop1.png'),
  ]
  want = [r for r in box_run[1] if r['image_id'] == 0]
  for got, ref in zip(records, want):
    np.testing.assert_allclose(got['bbox'], ref['bbox'], atol=1e-3)
    assert got['score'] == pytest.approx(ref['score'], abs=1e-5)
  assert os.path.exists(os.path.join(out, 'a.png'))


def test_no_query_is_a_usage_error_naming_query_box(pretrained, tmp_path):
  """Not the model's ValueError ('UP-DETR needs patches ...') from inside jit."""
  workdir, images = pretrained
  with pytest.raises(app.UsageError, match='model.num_patches=2.*--query_box'):
    _predict(workdir, f'--output={tmp_path}', images['a'])


def test_more_boxes_than_patches_is_a_usage_error(pretrained, tmp_path):
  workdir, images = pretrained
  with pytest.raises(app.UsageError, match='3 query patches given.*model.num_patches=2'):
    _predict(workdir, *_box_flags(BOXES + ((0, 0, 8, 8),)), f'--output={tmp_path}', images['a'])


def test_load_model_takes_arguments_not_flags(pretrained):
  """A library call: the workdir's model, variables, step and kind from arguments, with
  no flag parsed; a caller taking only DETRs is refused the pre-training model."""
  workdir, _ = pretrained
  assert not flags.FLAGS.is_parsed()
  loaded = predict.load_model(workdir=workdir, which='latest')
  assert loaded.kind == 'pretrain' and loaded.model.num_patches == 2
  assert loaded.source == {'workdir': workdir, 'which': 'latest', 'step': 2}
  want, step, model_config = checkpoints.restore_workdir_variables(workdir, 'latest')
  assert step == 2 and loaded.model_config == model_config
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.variables, want)
  assert predict.data_config(workdir=workdir)['patch_size'] == 16
  with pytest.raises(predict.ModelSourceError, match='pre-training model'):
    predict.load_model(workdir=workdir, kinds=('detr',))
  with pytest.raises(predict.ModelSourceError, match='exactly one of'):
    predict.load_model()


def test_a_pretraining_with_one_patch_is_not_a_oneshot_detector(tmp_path):
  """M = 1 with no feature head is what a one-shot detector's model looks like; its
  config.task says 'pretrain', which decides. Only a bare model config (no task, e.g.
  a release .pth with a model config) is guessed from the model."""
  config = tiny_config()
  config.model.update(num_patches=1, feature_head=False)
  model = build_model(config.model)
  path = str(tmp_path / 'variables')
  checkpoints.save_variables(path, init_variables(model, jax.random.PRNGKey(0)))
  assert config.task == 'pretrain'
  loaded = predict.load_model(checkpoint=path, config=config)
  assert loaded.kind == 'pretrain' and loaded.source == {'checkpoint': path}
  assert loaded.model.num_patches == 1
  bare = {'model': config.model.to_dict()}
  assert predict.load_model(checkpoint=path, config=bare).kind == 'oneshot'
