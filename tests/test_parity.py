"""Same weights, same numbers: our Flax models vs PyTorch modules with the release layout."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import importorskip  # fails instead of skipping under CI=true

torch = importorskip('torch')
sys.path.insert(0, os.path.dirname(__file__))
import torch_reference as ref  # noqa: E402

from updetr_jax import build_model, import_torch_checkpoint  # noqa: E402
from updetr_jax.models.resnet import resnet_spec  # noqa: E402
from updetr_jax.torch_import import CheckpointMismatchError  # noqa: E402

RTOL = 1e-4


def tiny_config(**overrides):
  cfg = dict(
    backbone='resnet_tiny',
    dilation=False,
    position_embedding='sine',
    hidden_dim=32,
    nheads=4,
    enc_layers=2,
    dec_layers=3,
    dim_feedforward=64,
    dropout=0.1,
    num_queries=20,
    pre_norm=False,
    num_classes=5,
    aux_loss=True,
  )
  cfg.update(overrides)
  return cfg


def torch_model(cfg, seed=0):
  blocks, width = resnet_spec(cfg['backbone'])
  kwargs = {
    k: cfg[k]
    for k in (
      'dilation',
      'position_embedding',
      'hidden_dim',
      'nheads',
      'enc_layers',
      'dec_layers',
      'dim_feedforward',
      'dropout',
      'num_queries',
      'pre_norm',
      'num_classes',
      'aux_loss',
    )
  }
  if cfg.get('num_patches'):
    model = ref.build_updetr(blocks=blocks, width=width, num_patches=cfg['num_patches'], **kwargs)
  else:
    model = ref.build_detr(blocks=blocks, width=width, **kwargs)
  ref.randomize_(model, seed)
  return model.eval()


def padded_batch(sizes=((64, 96), (80, 64)), seed=0):
  """Two images of different sizes zero-padded bottom/right, as the release collates."""
  rng = np.random.default_rng(seed)
  h = max(s[0] for s in sizes)
  w = max(s[1] for s in sizes)
  images = np.zeros((len(sizes), h, w, 3), np.float32)
  mask = np.ones((len(sizes), h, w), bool)
  for i, (hi, wi) in enumerate(sizes):
    images[i, :hi, :wi] = rng.standard_normal((hi, wi, 3))
    mask[i, :hi, :wi] = False
  return images, mask


def run_both(cfg, images, mask, patches=None, seed=0):
  tm = torch_model(cfg, seed)
  sd = tm.state_dict()
  args = [torch.from_numpy(images.transpose(0, 3, 1, 2)), torch.from_numpy(mask)]
  if patches is not None:
    args.append(torch.from_numpy(patches.transpose(0, 1, 4, 2, 3).copy()))
  with torch.no_grad():
    expected = tm(*args)
  variables = import_torch_checkpoint(sd, cfg)
  model = build_model(cfg)
  with jax.default_matmul_precision('highest'):
    got = jax.jit(model.apply)(
      variables,
      jnp.asarray(images),
      jnp.asarray(mask),
      None if patches is None else jnp.asarray(patches),
    )
  return got, expected


def assert_close(got, expected, name):
  expected = expected.detach().numpy() if hasattr(expected, 'detach') else expected
  got = np.asarray(got)
  assert got.shape == expected.shape, (name, got.shape, expected.shape)
  scale = float(np.abs(expected).max()) or 1.0
  err = float(np.abs(got - expected).max())
  assert err <= RTOL * scale, f'{name}: max abs err {err:.3g} > {RTOL} x scale {scale:.3g}'


def compare_outputs(got, expected, keys):
  for k in keys:
    assert_close(got[k], expected[k], k)
  assert len(got.get('aux_outputs', [])) == len(expected.get('aux_outputs', []))
  for i, (g, e) in enumerate(zip(got.get('aux_outputs', []), expected.get('aux_outputs', []))):
    for k in keys:
      if k in e and k in g:
        assert_close(g[k], e[k], f'aux_outputs[{i}].{k}')


@pytest.mark.parametrize(
  'overrides',
  [
    dict(),  # DETR, post-norm, sine
    dict(position_embedding='learned', dilation=True),  # DC5
    dict(pre_norm=True, aux_loss=False),
  ],
)
def test_detr_matches_torch(overrides):
  cfg = tiny_config(**overrides)
  images, mask = padded_batch()
  got, expected = run_both(cfg, images, mask)
  assert got['pred_logits'].shape == (2, 20, 6)
  compare_outputs(got, expected, ('pred_logits', 'pred_boxes'))


@pytest.mark.parametrize('num_patches,k', [(4, 4), (4, 2), (10, 10), (1, 1)])
def test_updetr_pretrain_matches_torch(num_patches, k):
  cfg = tiny_config(pre_norm=True, num_classes=2, num_patches=num_patches)
  images, mask = padded_batch(((64, 96), (72, 80)), seed=1)
  patches = np.random.default_rng(2).standard_normal((2, k, 32, 40, 3)).astype(np.float32)
  got, expected = run_both(cfg, images, mask, patches)
  n = k * (20 // num_patches)
  assert got['pred_logits'].shape == (2, n, 3)
  assert got['gt_feature'].shape == (2, k, 256)
  compare_outputs(got, expected, ('pred_logits', 'pred_boxes', 'pred_feature'))
  assert_close(got['gt_feature'], expected['gt_feature'], 'gt_feature')


def test_release_size_detr_r50_matches_torch():
  """ResNet-50 and the full 6+6-layer, 256-d transformer (small images for speed)."""
  cfg = tiny_config(
    backbone='resnet50',
    hidden_dim=256,
    nheads=8,
    enc_layers=6,
    dec_layers=6,
    dim_feedforward=2048,
    num_queries=100,
    num_classes=91,
  )
  images, mask = padded_batch(((96, 128), (128, 96)), seed=3)
  got, expected = run_both(cfg, images, mask)
  compare_outputs(got, expected, ('pred_logits', 'pred_boxes'))


def test_renamed_key_is_named():
  cfg = tiny_config(pre_norm=True, num_classes=2, num_patches=4)
  sd = torch_model(cfg).state_dict()
  bad = 'transformer.decoder.layers.1.linear1.weight'
  sd['transformer.decoder.layers.1.linear_1.weight'] = sd.pop(bad)
  with pytest.raises(CheckpointMismatchError) as e:
    import_torch_checkpoint({'model': sd}, cfg)
  assert bad in str(e.value) and 'linear_1' in str(e.value)


def test_wrong_shape_is_named():
  cfg = tiny_config()
  sd = torch_model(cfg).state_dict()
  sd['class_embed.weight'] = torch.zeros(3, 32)  # a 2-class head into a 5-class model
  sd['class_embed.bias'] = torch.zeros(3)
  with pytest.raises(CheckpointMismatchError) as e:
    import_torch_checkpoint(sd, cfg)
  msg = str(e.value)
  assert 'class_embed.weight: checkpoint (3, 32) vs model (6, 32)' in msg
  assert 'class_embed.bias' in msg


def test_pretrain_checkpoint_into_detr_config_lists_extra_heads():
  """An UP-DETR file does not silently load into a DETR config."""
  cfg = tiny_config(pre_norm=True, num_classes=2, num_patches=4)
  sd = torch_model(cfg).state_dict()
  detr_cfg = dict(cfg, num_patches=0)
  with pytest.raises(CheckpointMismatchError) as e:
    import_torch_checkpoint(sd, detr_cfg)
  assert 'patch2query.weight' in str(e.value)
  assert 'feature_align.layers.0.weight' in str(e.value)


def test_backbone_only_swav_layout(tmp_path):
  """torchvision-layout ResNet under 'module.' with SwAV heads: the body is replaced
  exactly, the heads are dropped, the rest of the model keeps its init."""
  cfg = tiny_config()
  tm = torch_model(cfg, seed=4)
  body = tm.backbone[0].body.state_dict()
  sd = {'module.' + k: v for k, v in body.items()}
  sd['module.projection_head.0.weight'] = torch.zeros(8, 256)
  sd['module.prototypes.weight'] = torch.zeros(30, 8)
  sd['module.bn1.num_batches_tracked'] = torch.tensor(5)
  path = tmp_path / 'swav.pth'
  torch.save(sd, path)
  base = import_torch_checkpoint(tm.state_dict(), cfg)
  variables = import_torch_checkpoint(str(path), cfg, variables=base)
  for a, b in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A wrong key inside the backbone is not skipped.
  sd['module.layer1.0.conv9.weight'] = sd.pop('module.layer1.0.conv1.weight')
  with pytest.raises(CheckpointMismatchError, match='layer1.0.conv1.weight'):
    import_torch_checkpoint(sd, cfg)


def test_finetune_init_from_release_updetr_pth(tmp_path):
  """An UP-DETR release .pth initialises a DETR fine-tuning model: every weight but the
  class head (which stays fresh), patch2query and feature_align."""
  from flax import traverse_util

  from updetr_jax import pretrained
  from updetr_jax.models import init_variables

  pre = tiny_config(pre_norm=True, num_classes=2, num_patches=4)
  tm = torch_model(pre, seed=2)
  path = tmp_path / 'updetr.pth'
  torch.save({'model': tm.state_dict()}, path)
  detr_cfg = dict(pre, num_patches=0, num_classes=7)
  fresh = init_variables(build_model(detr_cfg), jax.random.PRNGKey(1))
  src, src_cfg = pretrained.load_pretrained(str(path), detr_cfg)
  assert src_cfg is None and 'patch2query' in src['params']
  got = traverse_util.flatten_dict(
    pretrained.init_from_pretrained(fresh, detr_cfg, src, src_cfg)[0]
  )
  want = traverse_util.flatten_dict(import_torch_checkpoint(str(path), pre))
  new = traverse_util.flatten_dict(fresh)
  for k, v in got.items():
    ref_leaf = new[k] if k[1] == 'class_embed' else want[k]
    np.testing.assert_array_equal(np.asarray(v), np.asarray(ref_leaf), err_msg='/'.join(k))
  # A post-norm DETR cannot take the pre-norm file: the importer names the extra norm.
  with pytest.raises(CheckpointMismatchError, match='encoder.norm'):
    pretrained.load_pretrained(str(path), dict(detr_cfg, pre_norm=False))
