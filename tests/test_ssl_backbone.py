"""Stage 0 (SimCLR pre-training of the CNN) -> .npz -> the detector's frozen backbone."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from updetr_jax import files, ssl_backbone
from updetr_jax.models import build_model
from updetr_jax.models.resnet import build_resnet
from updetr_jax.models import init_variables
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
TRAIN = dict(backbone='resnet_tiny', steps=40, batch_size=16, image_size=32, seed=0, lr=3e-3)


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
  out = str(root / 'out' / 'ssl_tiny.npz')
  summary = ssl_backbone.train_ssl_backbone(images, out, **TRAIN)
  return images, out, summary


def test_training_lowers_the_loss_and_writes_the_files(trained):
  _, out, summary = trained
  losses = summary['loss_history']
  assert len(losses) == TRAIN['steps'] and np.all(np.isfinite(losses))
  assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.2, losses  # 3.37 -> 2.80 here
  assert summary['steps'] == TRAIN['steps'] and summary['seconds'] > 0
  for k in ('retrieval_top1_before', 'retrieval_top1_after', 'pos_cos_after', 'neg_cos_after'):
    assert np.isfinite(summary[k]), k
  d = os.path.dirname(out)
  assert sorted(os.listdir(d)) == ['loss_curve.png', 'ssl_tiny.npz', 'summary.json']


def test_rerun_with_same_parameters_is_skipped(trained):
  images, out, summary = trained
  again = ssl_backbone.train_ssl_backbone(images, out, **TRAIN)
  assert again['skipped'] and again['final_loss'] == summary['final_loss']


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
  model = ssl_backbone.SimCLRNet(backbone_name='resnet_tiny')
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32)
  v = jax.jit(model.init, static_argnums=2)(jax.random.PRNGKey(0), x, False)
  params = jax.tree_util.tree_map(
    lambda p: p + jnp.asarray(rng.normal(0, 0.2, p.shape), p.dtype), v['params']
  )
  stats = v['batch_stats']
  update = jax.jit(
    lambda p, s: model.apply(
      {'params': p, 'batch_stats': s}, 1.5 * x + 0.3, True, mutable=['batch_stats']
    )[1]['batch_stats']
  )
  for _ in range(3):
    stats = update(params, stats)
  return jax.device_get({'params': params, 'batch_stats': stats})


@pytest.mark.parametrize('dilation', [False, True])
def test_detector_backbone_equals_the_eval_mode_twin(simclr_variables, tmp_path, dilation):
  v = simclr_variables
  path = str(tmp_path / 'w.npz')
  files.write_npz(path, ssl_backbone.export_torchvision(v))
  cfg = dict(TINY_DETR, dilation=dilation)
  variables = import_torch_checkpoint(
    path, cfg, variables=init_variables(build_model(cfg), jax.random.PRNGKey(1))
  )
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 64, 48, 3)), jnp.float32)
  twin = ssl_backbone.build_train_resnet('resnet_tiny', dilation=dilation)
  want = jax.jit(twin.apply, static_argnums=2)(ssl_backbone.backbone_variables(v), x, False)
  got = jax.jit(build_resnet('resnet_tiny', dilation).apply)(
    {'params': variables['params']['body'], 'batch_stats': variables['batch_stats']['body']}, x
  )
  assert got.shape == want.shape == ((2, 4, 3, 256) if dilation else (2, 2, 2, 256))
  scale = float(jnp.abs(want).max())
  assert scale > 0
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)


def test_same_seed_same_weights(tmp_path):
  images = _write_images(str(tmp_path / 'images'), n=8)
  kw = dict(TRAIN, steps=2, batch_size=4)
  a = ssl_backbone.train_ssl_backbone(images, str(tmp_path / 'a' / 'w.npz'), **kw)
  b = ssl_backbone.train_ssl_backbone(images, str(tmp_path / 'b' / 'w.npz'), **kw)
  assert a['loss_history'] == b['loss_history']
  sa, sb = (
    load_state_dict(str(tmp_path / 'a' / 'w.npz')),
    load_state_dict(str(tmp_path / 'b' / 'w.npz')),
  )
  assert sa.keys() == sb.keys()
  for k in sa:
    np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


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
