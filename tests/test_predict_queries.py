"""predict's query patch detection as a user sees it: boxes in pixels of a non-square
image, the --query_box checks, K query patches answered by the first K groups of a model
pre-trained with M > K patches, and a one-patch pre-training run as a pre-training.

The models are initialised, not trained (a checkpoint + a config file with task
'pretrain'); predict's ``main`` runs in this process (``test_predict_patches._predict``
with no --workdir)."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from absl import app
from PIL import Image

from updetr_jax import checkpoints, predict
from updetr_jax.models import build_model, init_variables

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
from test_predict_patches import _predict  # noqa: E402
from test_train import tiny_config  # noqa: E402

H, W = 96, 160  # the test image: wide, so a swap of width and height shows
M = 4  # query patches of the pre-training model
# Query boxes (x0, y0, x1, y1 pixels): the second is inside W x H but not H x W.
BOX0, BOX1 = (8, 8, 40, 40), (120, 10, 150, 90)
CONFIG_FILE = """
import sys
sys.path.insert(0, {tests!r})
from test_predict_queries import tiny_pretrain_config as get_config
"""


def tiny_pretrain_config(num_patches):
  """test_train's tiny pre-training config (task 'pretrain', 8 queries, 16 px patches,
  eval_scale 64, max_size 80) with ``num_patches`` query patches; one patch with no
  feature head, as a one-shot detector's model."""
  config = tiny_config()
  m = int(num_patches)
  config.model.update(num_patches=m, feature_head=m > 1)
  return config


def _save_model(root, num_patches):
  """An initialised model's checkpoint, and the flags that give it to predict (a config
  file whose argument is ``num_patches``)."""
  config = tiny_pretrain_config(num_patches)
  model = build_model(config.model)
  path = str(root / f'variables{num_patches}')
  checkpoints.save_variables(path, init_variables(model, jax.random.PRNGKey(0)))
  config_file = root / 'tiny_pretrain.py'
  config_file.write_text(CONFIG_FILE.format(tests=TESTS))
  return path, [f'--checkpoint={path}', f'--config={config_file}:{num_patches}']


def _run(model_flags, output, *args):
  """``python -m updetr_jax.predict MODEL_FLAGS --output=OUTPUT ARGS``; its records."""
  _predict('', *model_flags, f'--output={output}', *args)
  with open(os.path.join(output, 'detections.json')) as f:
    return json.load(f)


def _box_flag(box):
  return f'--query_box={",".join(map(str, box))}'


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """An initialised model with M = 4 query patches (checkpoint, predict's flags for it)
  and a W x H image."""
  root = tmp_path_factory.mktemp('queries')
  image = str(root / 'wide.png')
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(image)
  checkpoint, model_flags = _save_model(root, M)
  return checkpoint, model_flags, image


@pytest.fixture(scope='module')
def runs(setup, tmp_path_factory):
  """K -> the records of predict with the first K of the two query boxes (each K run
  once, when a test first asks for it)."""
  _, model_flags, image = setup
  boxes = [_box_flag(BOX0), _box_flag(BOX1)]
  done = {}

  def records(k):
    if k not in done:
      done[k] = _run(model_flags, str(tmp_path_factory.mktemp(f'k{k}')), *boxes[:k], image)
    return done[k]

  return records


def _group_tops(checkpoint, image_path, boxes):
  """What predict should report for ``boxes``, from the model's raw output: (patch,
  bbox [x, y, w, h] pixels, score) of the top query of each of the K groups of N / M
  queries, its box scaled by (W, H) and clipped to the image."""
  config = tiny_pretrain_config(M)
  loaded = predict.load_model(checkpoint=checkpoint, config=config)
  image = predict.load_image(image_path)
  x = predict.preprocess(image, config.data.eval_scale, config.data.max_size)
  patches = np.stack([predict.preprocess_query(image, config.data.patch_size, b) for b in boxes])
  out = jax.jit(loaded.model.apply)(
    loaded.variables, x[None], np.zeros((1,) + x.shape[:2], bool), patches[None]
  )
  logits = np.asarray(out['pred_logits'][0], np.float64)
  pred_boxes = np.asarray(out['pred_boxes'][0], np.float64)
  g = config.model.num_queries // M
  assert logits.shape[0] == len(boxes) * g  # the first K * N / M queries
  prob = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  want = []
  for k in range(len(boxes)):
    group = prob[k * g : (k + 1) * g, 1]
    top = int(np.argmax(group))
    assert np.ptp(group) > 1e-4  # the top query is clear: no near tie to flip
    cx, cy, bw, bh = pred_boxes[k * g + top]
    x0, x1 = np.clip([(cx - bw / 2) * W, (cx + bw / 2) * W], 0, W)
    y0, y1 = np.clip([(cy - bh / 2) * H, (cy + bh / 2) * H], 0, H)
    want.append((k, [x0, y0, x1 - x0, y1 - y0], float(group[top])))
  return want


def test_found_boxes_are_scaled_by_image_width_and_height(setup, monkeypatch, tmp_path):
  """Controlled model answers (cxcywh in [0, 1]) far from the centre of a wide image
  come back as pixels x * W, y * H; the second is exactly its query box (iou 1)."""
  _, model_flags, image = setup
  x0, y0, x1, y1 = BOX1
  found = np.array(
    [
      [0.2, 0.8, 0.1, 0.2],
      [(x0 + x1) / 2 / W, (y0 + y1) / 2 / H, (x1 - x0) / W, (y1 - y0) / H],
    ],
    np.float32,
  )

  def fake_detect_fn(model):
    del model

    def detect(variables, images, padding_mask, patches):
      del variables, images, padding_mask
      assert patches.shape[:2] == (1, 2)
      return found[None], np.array([[0.9, 0.6]], np.float32)

    return detect

  monkeypatch.setattr(predict, 'make_patch_detect_fn', fake_detect_fn)
  records = _run(model_flags, str(tmp_path), _box_flag(BOX0), _box_flag(BOX1), image)
  assert [r['patch'] for r in records] == [0, 1]
  np.testing.assert_allclose(records[0]['bbox'], [24.0, 67.2, 16.0, 19.2], atol=1e-3)
  np.testing.assert_allclose(records[1]['bbox'], [120.0, 10.0, 30.0, 80.0], atol=1e-3)
  assert records[1]['iou'] == pytest.approx(1.0, abs=1e-5)
  assert [r['score'] for r in records] == pytest.approx([0.9, 0.6])


def test_query_box_inside_a_wide_image_is_accepted(runs):
  """BOX1 reaches x = 150 (past H = 96, inside W = 160): the run takes it."""
  assert [r['query_box'] for r in runs(2)] == [list(map(float, BOX0)), list(map(float, BOX1))]


@pytest.mark.parametrize('box', ['100,10,161,50', '10,10,50,97', '-1,10,50,50'])
def test_query_box_outside_the_image_is_refused(setup, tmp_path, box):
  _, model_flags, image = setup
  with pytest.raises(app.UsageError, match=r'is not inside .*wide\.png \(160 x 96 pixels\)'):
    _predict('', *model_flags, f'--output={tmp_path}', f'--query_box={box}', image)


@pytest.mark.parametrize('box', ['10,10,10,50', '10,20,50,20', '50,10,10,50'])
def test_empty_query_box_is_refused(setup, tmp_path, box):
  _, model_flags, image = setup
  with pytest.raises(app.UsageError, match='x0<x1, y0<y1'):
    _predict('', *model_flags, f'--output={tmp_path}', f'--query_box={box}', image)


@pytest.mark.parametrize('k', [1, 2])
def test_k_patches_are_answered_by_the_first_k_groups(setup, runs, k):
  """K < M patches: one record per patch, each the top query of its own group of
  N / M queries (the first K groups), as the model's raw output has it."""
  checkpoint, _, image = setup
  records = runs(k)
  assert len(records) == k and {r['image_id'] for r in records} == {0}
  want = _group_tops(checkpoint, image, (BOX0, BOX1)[:k])
  for r, (patch, bbox, score) in zip(records, want):
    assert r['patch'] == patch
    np.testing.assert_allclose(r['bbox'], bbox, atol=1e-3)
    assert r['score'] == pytest.approx(score, abs=1e-5)


def test_a_patch_answer_does_not_depend_on_the_other_patches(runs):
  """Each group sees only its own patch: patch 0's answer is the same with K = 1 and
  K = 2."""
  one, two = runs(1)[0], runs(2)[0]
  np.testing.assert_allclose(one['bbox'], two['bbox'], atol=1e-3)
  assert one['score'] == pytest.approx(two['score'], abs=1e-5)


def test_a_one_patch_pretraining_runs_query_patch_detection(setup, tmp_path):
  """M = 1 with no feature head looks like a one-shot detector's model; its config's
  task 'pretrain' makes predict take --query_box as a query patch cut from the image
  (one record per image and patch), not ask for a one-shot --query."""
  _, _, image = setup
  _, model_flags = _save_model(tmp_path, 1)
  records = _run(model_flags, str(tmp_path / 'out'), _box_flag(BOX1), image)
  assert len(records) == 1
  (r,) = records
  assert r['patch'] == 0 and r['image_id'] == 0 and r['query_box'] == list(map(float, BOX1))
  assert 'category_id' not in r and 0.0 <= r['score'] <= 1.0 and 0.0 <= r['iou'] <= 1.0
  x, y, bw, bh = r['bbox']
  assert 0 <= x and x + bw <= W + 1e-6 and 0 <= y and y + bh <= H + 1e-6
  assert os.path.exists(tmp_path / 'out' / 'wide.png')
