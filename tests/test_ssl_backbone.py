"""Stage 0 (SimCLR training of the CNN, task 'simclr' under train.run) -> .npz -> the
detector's frozen backbone; preempted and killed runs resume exactly."""

import functools
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import test_train
from updetr_jax import files, train
from updetr_jax.configs import ssl_backbone as ssl_configs
from updetr_jax.models import build_model
from updetr_jax.models.resnet import build_resnet
from updetr_jax.models import init_variables
from updetr_jax.tasks import simclr
from updetr_jax.torch_import import import_torch_checkpoint, load_state_dict

TINY_DETR = dict(
  backbone='resnet_tiny',
  position_embedding='sine',
  hidden_dim=16,
  nheads=2,
  enc_layers=1,
  dec_layers=1,
  dim_feedforward=32,
  dropout=0.0,
  num_queries=4,
  pre_norm=False,
  num_classes=3,
  aux_loss=False,
)
# The tiny stage 0 of these tests: its config overrides, as on the command line.
TRAIN = {
  'model.backbone': 'resnet_tiny',
  'num_train_steps': 40,
  'batch_size': 16,
  'data.view_size': 32,
  'optim.lr': 3e-3,
  'log_every_steps': 1,
  'checkpoint_every_steps': 10,
  'data.patch_chunk': 4,
}


def ssl_config(images, **overrides):
  config = ssl_configs.get_config()
  config.data.folder = images
  config.update_from_flattened_dict({**TRAIN, **overrides})
  return config


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f)}


def _write_images(folder, n=16):
  """n structured 40-56 px images: stripes / checkers / blobs in random colours."""
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(n):
    h, w = rng.integers(40, 57, size=2)
    y, x = np.mgrid[:h, :w] / 8.0
    kind = i % 4
    if kind == 0:
      pattern = np.sin(x * rng.uniform(1, 3))
    elif kind == 1:
      pattern = np.sign(np.sin(x * 2) * np.sin(y * 2))
    elif kind == 2:
      pattern = np.cos(np.hypot(x - w / 16, y - h / 16) * rng.uniform(1, 3))
    else:
      pattern = np.sin((x + y) * rng.uniform(1, 3))
    c0, c1 = rng.uniform(0, 255, (2, 3))
    img = c0 + (pattern[..., None] + 1) / 2 * (c1 - c0)
    ext = '.png' if i % 2 else '.jpg'
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f'{i:02d}{ext}'))
  return folder


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp('ssl')
  images = _write_images(str(root / 'images'))
  workdir = str(root / 'out')
  summary = train.run(ssl_config(images), workdir)
  return images, os.path.join(workdir, 'backbone.npz'), summary


def test_training_lowers_the_loss_and_writes_the_files(trained):
  _, out, summary = trained
  losses = [v for _, v in sorted(_losses(os.path.dirname(out)).items())]
  assert len(losses) == TRAIN['num_train_steps'] and np.all(np.isfinite(losses))
  assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.2, losses
  assert summary['steps'] == TRAIN['num_train_steps'] and summary['train_seconds'] > 0
  for k in ('retrieval_top1_before', 'retrieval_top1_after', 'pos_cos_after', 'neg_cos_after'):
    assert np.isfinite(summary[k]), k
  d = os.path.dirname(out)
  assert {'loss_curves.png', 'backbone.npz', 'summary.json'} <= set(os.listdir(d))


def test_rerun_with_same_parameters_is_skipped(trained):
  """The same command again resumes at the last step: no step is trained again."""
  images, out, summary = trained
  before = load_state_dict(out)
  again = train.run(ssl_config(images), os.path.dirname(out))
  assert again['retrieval_top1_after'] == summary['retrieval_top1_after']
  assert 'final_train_loss' not in again  # no training step logged
  after = load_state_dict(out)
  for k in before:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)


def test_export_layout_is_torchvision_and_swav_head(trained):
  _, out, _ = trained
  sd = load_state_dict(out)
  assert sd['conv1.weight'].shape == (8, 3, 7, 7)  # OIHW
  for k in (
    'bn1.weight',
    'bn1.bias',
    'bn1.running_mean',
    'bn1.running_var',
    'layer1.0.conv2.weight',
    'layer4.0.downsample.0.weight',
    'layer4.0.downsample.1.running_var',
    'projection_head.0.weight',
    'projection_head.1.running_mean',
    'projection_head.3.bias',
  ):
    assert k in sd, k
  assert sd['projection_head.0.weight'].shape == (256, 256)  # [out, in]
  # Training moved the BN statistics away from the identity.
  assert np.abs(sd['bn1.running_mean']).max() > 1e-3
  assert np.abs(sd['bn1.running_var'] - 1).max() > 1e-3


@pytest.mark.parametrize('dilation', [False, True])
def test_trained_file_imports_into_the_detector(trained, dilation):
  _, out, _ = trained
  cfg = dict(TINY_DETR, dilation=dilation)
  base = init_variables(build_model(cfg), jax.random.PRNGKey(1))
  variables = import_torch_checkpoint(out, cfg, variables=base)  # raises on any mismatch
  sd = load_state_dict(out)
  np.testing.assert_array_equal(
    variables['batch_stats']['body']['bn1']['mean'], sd['bn1.running_mean']
  )
  np.testing.assert_array_equal(
    variables['params']['body']['layer2_0']['conv2']['kernel'],
    sd['layer2.0.conv2.weight'].transpose(2, 3, 1, 0),
  )
  # Only the backbone comes from the file; the rest is `base`.
  np.testing.assert_array_equal(
    variables['params']['query_embed']['embedding'], base['params']['query_embed']['embedding']
  )


@pytest.fixture(scope='module')
def simclr_variables():
  """SimCLRNet('resnet_tiny') variables with non-trivial BN affine terms and running
  statistics (a few training-mode passes)."""
  model = simclr.SimCLRNet(backbone='resnet_tiny')
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32)
  v = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(0), x)
  params = jax.tree_util.tree_map(
    lambda p: p + jnp.asarray(rng.normal(0, 0.2, p.shape), p.dtype), v['params']
  )
  stats = v['batch_stats']
  update = jax.jit(
    lambda p, s: model.apply(
      {'params': p, 'batch_stats': s}, 1.5 * x + 0.3, train=True, mutable=['batch_stats']
    )[1]['batch_stats']
  )
  for _ in range(3):
    stats = update(params, stats)
  return jax.device_get({'params': params, 'batch_stats': stats})


@pytest.mark.parametrize('dilation', [False, True])
def test_detector_backbone_equals_the_eval_mode_twin(simclr_variables, tmp_path, dilation):
  v = simclr_variables
  path = str(tmp_path / 'w.npz')
  files.write_npz(path, simclr.export_torchvision(v))
  cfg = dict(TINY_DETR, dilation=dilation)
  variables = import_torch_checkpoint(
    path, cfg, variables=init_variables(build_model(cfg), jax.random.PRNGKey(1))
  )
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 64, 48, 3)), jnp.float32)
  twin = build_resnet('resnet_tiny', dilation, norm='batch')  # the trained network
  backbone = {c: v[c]['backbone'] for c in ('params', 'batch_stats')}
  want = jax.jit(functools.partial(twin.apply, train=False))(backbone, x)
  got = jax.jit(build_resnet('resnet_tiny', dilation).apply)(
    {'params': variables['params']['body'], 'batch_stats': variables['batch_stats']['body']}, x
  )
  assert got.shape == want.shape == ((2, 4, 3, 256) if dilation else (2, 2, 2, 256))
  scale = float(jnp.abs(want).max())
  assert scale > 0
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)


def test_same_seed_same_weights(tmp_path):
  images = _write_images(str(tmp_path / 'images'), n=8)
  kw = {'num_train_steps': 2, 'batch_size': 4}
  train.run(ssl_config(images, **kw), str(tmp_path / 'a'))
  train.run(ssl_config(images, **kw), str(tmp_path / 'b'))
  assert _losses(tmp_path / 'a') == _losses(tmp_path / 'b')
  sa, sb = (
    load_state_dict(str(tmp_path / 'a' / 'backbone.npz')),
    load_state_dict(str(tmp_path / 'b' / 'backbone.npz')),
  )
  assert sa.keys() == sb.keys()
  for k in sa:
    np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def _ssl_cmd(images, workdir, signal_at):
  """``updetr-ssl-backbone`` with TRAIN, sending itself ``signal_at`` (test_train)."""
  return [
    sys.executable,
    '-c',
    test_train._SIGNAL_AT,
    *(str(a) for a in signal_at),
    'updetr_jax.ssl_backbone',
    f'--workdir={workdir}',
    f'--config.data.folder={images}',
    *(f'--config.{k}={v}' for k, v in TRAIN.items()),
  ]


@pytest.mark.parametrize('sig, point, at', [('SIGKILL', 'saving', 20), ('SIGTERM', 'logged', 13)])
def test_interrupted_stage0_resumes_to_the_uninterrupted_losses(trained, tmp_path, sig, point, at):
  """Killed with a save in flight, or preempted (SIGTERM: the current step is saved and
  the run exits 0), then rerun: the losses of the uninterrupted run, step for step."""
  images, out, _ = trained
  reference = _losses(os.path.dirname(out))
  run = lambda signal_at: subprocess.run(
    _ssl_cmd(images, tmp_path, signal_at),
    cwd=test_train.ROOT,
    env=test_train._env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  first = run((sig, point, at))
  stopped = max(_losses(tmp_path))
  assert stopped < TRAIN['num_train_steps'], 'the run finished before the signal'
  if sig == 'SIGTERM':
    assert first.returncode == 0 and f'saved step {stopped}' in first.stderr, first.stderr[-3000:]
    assert stopped == at
  else:
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
  rerun = run(('SIGTERM', 'logged', 10**6))  # never sent
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  resumed = _losses(tmp_path)
  assert sorted(resumed) == sorted(reference)
  for s in reference:
    np.testing.assert_allclose(resumed[s], reference[s], rtol=1e-6, err_msg=f'step {s}')
  assert os.path.exists(tmp_path / 'backbone.npz')


def test_load_state_dict_reads_npz_without_torch(tmp_path, monkeypatch):
  path = str(tmp_path / 'sd.npz')
  np.savez(
    path,
    **{
      'module.conv1.weight': np.ones((2, 3, 1, 1), np.float64),
      'module.bn1.running_var': np.arange(2),
    },
  )
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` raises ImportError
  sd = load_state_dict(path)
  assert sorted(sd) == ['bn1.running_var', 'conv1.weight']
  assert sd['conv1.weight'].dtype == np.float32 and sd['conv1.weight'].shape == (2, 3, 1, 1)
  with pytest.raises(FileNotFoundError):
    load_state_dict(str(tmp_path / 'missing.npz'))
  with pytest.raises(ImportError, match='needs PyTorch'):
    load_state_dict(str(tmp_path / 'x.pth'))
