"""Export: the TF SavedModel (reloaded by TensorFlow alone) and the deserialized
``jax.export`` artifact give ``predict``'s detections on the demo photographs, for a
random-weight DETR and for a fine-tuning workdir exported by the CLI; batches of two,
several image sizes (portrait, landscape, enlarged, capped by max_size) through one
SavedModel; the TensorFlow resize rule equals ``resize_rule``."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import importorskip  # fails instead of skipping under CI=true

tf = importorskip('tensorflow')

from test_evaluate import TINY  # noqa: E402
from test_finetune import _make_set, tiny_finetune_config  # noqa: E402
from updetr_jax import build_model, checkpoints, evaluate, export, predict  # noqa: E402
from updetr_jax import train  # noqa: E402
from updetr_jax.data import augment, sources  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE, MAX_SIZE = 96, 160  # small resized images keep the test fast
# Scores and boxes (normalised by the image size, i.e. 1e-4 of a side) agree to TOL.
TOL = 1e-4


def _demo_images():
  """{name: uint8 [H, W, 3]}: demo photos and crops giving every branch of the resize:
  square, landscape, portrait, long side capped by MAX_SIZE, enlarged (no antialias)."""
  demo = dict(sources.demo_arrays(('astronaut', 'chelsea', 'coffee')))
  coffee = demo['coffee']  # 400 x 600
  return {
    'astronaut': demo['astronaut'],  # 512 x 512
    'astronaut_flipped': np.ascontiguousarray(demo['astronaut'][:, ::-1]),
    'chelsea': demo['chelsea'],  # 300 x 451 -> 96 x 144
    'coffee_portrait': np.ascontiguousarray(coffee.transpose(1, 0, 2)),  # 600 x 400
    'coffee_strip': coffee[100:250],  # 150 x 600: capped -> 40 x 160
    'coffee_small': coffee[200:260, 300:380],  # 60 x 80: enlarged to 96 x 128
  }


# Batches fed to the SavedModel: one size per batch; two of them hold two images.
BATCHES = (
  ('astronaut', 'astronaut_flipped'),
  ('chelsea',),
  ('coffee_portrait',),
  ('coffee_strip',),
  ('coffee_small',),
  ('coffee_small', 'coffee_small'),
)


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
  """(images {name: array}, {name: png path}) of the demo photos."""
  root = tmp_path_factory.mktemp('demo')
  images = _demo_images()
  paths = {}
  for name, image in images.items():
    paths[name] = str(root / f'{name}.png')
    Image.fromarray(image).save(paths[name])
  return images, paths


def _predicted(model, variables, demo, output, scale=SCALE, max_size=MAX_SIZE):
  """{name: (scores [N], labels [N], boxes [N, 4] xyxy)} from predict.predict_files."""
  images, paths = demo
  names = list(paths)
  records = predict.predict_files(
    model,
    variables,
    [paths[n] for n in names],
    output,
    threshold=1.0,
    scale=scale,
    max_size=max_size,
  )
  out = {}
  for i, name in enumerate(names):
    mine = [r for r in records if r['image_id'] == i]  # query order
    xywh = np.array([r['bbox'] for r in mine])
    out[name] = (
      np.array([r['score'] for r in mine]),
      np.array([r['category_id'] for r in mine]),
      np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
    )
  return out


def _assert_same_detections(name, image, got, want):
  """got, want: (scores [N], labels [N], boxes [N, 4] xyxy in pixels) of one image."""
  h, w = image.shape[:2]
  scores, labels, boxes = (np.asarray(a) for a in got)
  np.testing.assert_allclose(scores, want[0], rtol=0, atol=TOL, err_msg=f'{name}: scores')
  np.testing.assert_array_equal(labels, want[1], err_msg=f'{name}: labels')
  side = np.array([w, h, w, h], np.float64)
  np.testing.assert_allclose(
    boxes / side, want[2] / side, rtol=0, atol=TOL, err_msg=f'{name}: boxes'
  )


def _check_export(output_dir, demo, want, scale=SCALE, max_size=MAX_SIZE):
  """The SavedModel (tf.saved_model.load) on BATCHES and the jax.export artifact on every
  image give the detections ``want``."""
  images, _ = demo
  meta = json.load(open(os.path.join(output_dir, 'export.json')))
  assert meta['preprocessing']['scale'] == scale
  assert meta['preprocessing']['max_size'] == max_size
  loaded = tf.saved_model.load(os.path.join(output_dir, 'saved_model'))
  serve = loaded.signatures['serving_default']
  n = meta['num_queries']
  for batch in BATCHES:
    out = serve(images=tf.constant(np.stack([images[k] for k in batch])))
    assert out['boxes'].shape == (len(batch), n, 4) and out['labels'].dtype == tf.int32
    for r, name in enumerate(batch):
      got = (out['scores'][r].numpy(), out['labels'][r].numpy(), out['boxes'][r].numpy())
      _assert_same_detections(name, images[name], got, want[name])
  exported = jax.export.deserialize(
    bytearray(open(os.path.join(output_dir, 'detector.jax_export'), 'rb').read())
  )
  for name, image in images.items():
    x, orig_size = predict.preprocess_images(image[None], scale, max_size)
    scores, labels, boxes = exported.call(x.numpy(), orig_size.numpy())
    assert labels.dtype == jnp.int32
    _assert_same_detections(name, image, (scores[0], labels[0], boxes[0]), want[name])


@pytest.fixture(scope='module')
def tiny():
  model = build_model(TINY)
  variables = jax.jit(model.init)(
    jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool)
  )
  return model, variables


def test_random_detr_export_gives_predicts_detections(tmp_path, tiny, demo):
  model, variables = tiny
  want = _predicted(model, variables, demo, str(tmp_path / 'predict'))
  assert len({round(float(s[0][0]), 6) for s in want.values()}) > 1  # not constant
  meta = export.export_detector(
    model,
    variables,
    str(tmp_path / 'export'),
    scale=SCALE,
    max_size=MAX_SIZE,
    class_names={1: 'one', 3: 'three'},
  )
  assert meta == json.load(open(tmp_path / 'export' / 'export.json'))
  assert meta['class_names'] == {'1': 'one', '3': 'three'}
  assert meta['model']['num_queries'] == 10 and meta['num_classes'] == 5
  assert [i['name'] for i in meta['jax_export']['inputs']] == ['images', 'orig_size']
  assert meta['jax_export']['platforms'] == ['cpu']
  _check_export(str(tmp_path / 'export'), demo, want)


@pytest.fixture(scope='module')
def finetuned(tmp_path_factory):
  """A tiny DETR fine-tuning workdir made by train.run (a few steps)."""
  root = str(tmp_path_factory.mktemp('finetune'))
  ann, image_dir = _make_set(os.path.join(root, 'data'))
  config = tiny_finetune_config(ann, image_dir)
  config.num_train_steps = 2
  config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.eval.update(every_steps=2, num_pictures=0)
  config.report_flops = False  # no FLOP count (step_cost: the other train.run tests)
  workdir = os.path.join(root, 'run')
  train.run(config, workdir)
  return workdir


# Serves a SavedModel with JAX, Flax and this package made unimportable (TensorFlow's
# tf.lite imports JAX when it can, and copes when it cannot).
TF_ONLY = r"""
import sys
for name in ('jax', 'jaxlib', 'flax', 'updetr_jax'):
  sys.modules[name] = None
import numpy as np
import tensorflow as tf
serve = tf.saved_model.load(sys.argv[1]).signatures['serving_default']
out = serve(images=tf.constant(np.load(sys.argv[2])))
np.savez(sys.argv[3], **{k: v.numpy() for k, v in out.items()})
"""


class _Background:
  """A subprocess run beside the test's own work (its output to files, not pipes)."""

  def __init__(self, cmd, log_prefix, **kwargs):
    self.out, self.err = f'{log_prefix}.out', f'{log_prefix}.err'
    with open(self.out, 'w') as out, open(self.err, 'w') as err:
      self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, **kwargs)

  def wait(self, timeout) -> tuple[int, str, str]:
    """(exit status, stdout, stderr); killed past ``timeout`` seconds."""
    try:
      self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
      raise
    with open(self.out) as out, open(self.err) as err:
      return self.proc.returncode, out.read(), err.read()


@pytest.fixture
def background():
  """start(cmd, log_prefix, **Popen kwargs) -> _Background; any still running at the
  end of the test (one that failed before waiting) is killed."""
  started = []

  def start(cmd, log_prefix, **kwargs):
    started.append(_Background(cmd, log_prefix, **kwargs))
    return started[-1]

  yield start
  for b in started:
    if b.proc.poll() is None:
      b.proc.kill()
      b.proc.wait()


def test_cli_exports_a_finetuning_workdir(tmp_path, finetuned, demo, background):
  out = tmp_path / 'served'
  cli = background(  # exports while this process computes predict's detections
    [
      sys.executable,
      '-m',
      'updetr_jax.export',
      f'--workdir={finetuned}',
      f'--output={out}',
      f'--scale={SCALE}',
      f'--max_size={MAX_SIZE}',
      '--class_names=voc',
    ],
    str(tmp_path / 'export'),
    cwd=ROOT,
  )
  variables, step, model_config = checkpoints.restore_workdir_variables(finetuned, 'auto')
  model = build_model(model_config)
  want = _predicted(model, variables, demo, str(tmp_path / 'predict'))
  code, _, err = cli.wait(timeout=600)
  assert code == 0, err[-3000:]
  meta = json.load(open(out / 'export.json'))
  assert meta['source']['workdir'] == finetuned and meta['source']['which'] == 'auto'
  assert meta['class_names']['0'] == 'aeroplane' and meta['num_classes'] == 18
  assert meta['source']['step'] == step and meta['model'] == model_config
  # A process with TensorFlow alone serves the same detections (while this one checks
  # the export).
  images, _ = demo
  batch = ('astronaut', 'astronaut_flipped')
  np.save(tmp_path / 'batch.npy', np.stack([images[k] for k in batch]))
  tf_only = background(
    [
      sys.executable,
      '-c',
      TF_ONLY,
      str(out / 'saved_model'),
      str(tmp_path / 'batch.npy'),
      str(tmp_path / 'served.npz'),
    ],
    str(tmp_path / 'tf_only'),
    cwd=str(tmp_path),
  )
  _check_export(str(out), demo, want)
  code, _, err = tf_only.wait(timeout=300)
  assert code == 0, err[-3000:]
  served = np.load(tmp_path / 'served.npz')
  for r, name in enumerate(batch):
    got = (served['scores'][r], served['labels'][r], served['boxes'][r])
    _assert_same_detections(name, images[name], got, want[name])


def test_cli_help_and_usage_errors(tmp_path, background):
  def start(name, *args):  # both at once
    return background(
      [sys.executable, '-m', 'updetr_jax.export', *args], str(tmp_path / name), cwd=ROOT
    )

  usage = start(
    'usage', f'--output={tmp_path}', f'--workdir={tmp_path}', f'--checkpoint={tmp_path}'
  )
  code, out, err = start('help', '--help').wait(timeout=300)
  assert code in (0, 1), err[-3000:]  # absl's --help exits with 1
  assert all(f in out for f in ('--workdir', '--checkpoint', '--output', '--scale'))
  code, _, err = usage.wait(timeout=300)
  assert code != 0 and 'exactly one of --workdir and --checkpoint' in err


def test_resize_rule_in_tensorflow_equals_resize_rule():
  rng = np.random.default_rng(0)
  h = np.concatenate([rng.integers(1, 3000, 4000), [800, 1333, 750, 480, 1, 2000]])
  w = np.concatenate([rng.integers(1, 3000, 4000), [1333, 800, 1000, 640, 1, 3]])
  for scale, max_size in ((800, 1333), (480, 1333), (96, 160), (600, 0)):
    want = augment.resize_rule(h, w, scale, max_size)
    got = predict.resize_rule_tf(tf.constant(h), tf.constant(w), scale, max_size)
    np.testing.assert_array_equal(got[0].numpy(), want[0])
    np.testing.assert_array_equal(got[1].numpy(), want[1])


def test_learned_position_embedding_exports_with_its_size_bound(demo):
  """The learned embedding's 50x50 table bounds the resized size: 1600 px a side."""
  images, _ = demo
  model = build_model(dict(TINY, position_embedding='learned'))
  variables = jax.jit(model.init)(
    jax.random.PRNGKey(1), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool)
  )
  exported = export.export_jax(model, variables)
  detect = evaluate.make_detect_fn(model)
  for name in ('chelsea', 'coffee_portrait'):
    x, orig_size = predict.preprocess_images(images[name][None], SCALE, MAX_SIZE)
    want = evaluate.detect_images(detect, variables, [x[0].numpy()], orig_size.numpy(), multiple=1)
    got = exported.call(x.numpy(), orig_size.numpy())
    _assert_same_detections(
      name, images[name], [a[0] for a in got], [want[k][0] for k in ('scores', 'labels', 'boxes')]
    )
  with pytest.raises(ValueError, match='h <= 1600'):
    exported.call(np.zeros((1, 1601, 64, 3), np.float32), np.ones((1, 2), np.float32))


def test_updetr_is_refused():
  with pytest.raises(ValueError, match='query patches'):
    export.make_serving_fn(build_model(dict(TINY, num_patches=2)))
