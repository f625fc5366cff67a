"""Self-checks of the PyTorch reference (tests/torch_reference.py) on its own."""

import math
import os
import sys

import pytest

from conftest import importorskip  # fails instead of skipping under CI=true

torch = importorskip('torch')

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference as ref  # noqa: E402

TINY = dict(
  blocks=[1, 1, 1, 1],
  width=8,
  dilation=False,
  position_embedding='sine',
  hidden_dim=32,
  nheads=4,
  enc_layers=2,
  dec_layers=2,
  dim_feedforward=64,
  dropout=0.1,
  num_queries=12,
  pre_norm=False,
  num_classes=5,
  aux_loss=True,
)
H, W = 48, 64


def _inputs(b=2, seed=0):
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(b, 3, H, W, generator=g)
  mask = torch.zeros(b, H, W, dtype=torch.bool)
  mask[1, 40:, :] = True
  mask[1, :, 50:] = True
  x[mask[:, None].expand_as(x)] = 0.0
  return x, mask


def _detr(**kw):
  cfg = dict(TINY, **kw)
  return ref.randomize_(ref.build_detr(**cfg), seed=1).eval()


def _updetr(num_patches=3, **kw):
  cfg = dict(TINY, pre_norm=True, num_classes=2, **kw)
  return ref.randomize_(ref.build_updetr(**cfg, num_patches=num_patches), seed=2).eval()


@pytest.mark.parametrize('pre_norm', [False, True])
@pytest.mark.parametrize('pos', ['sine', 'learned'])
def test_detr_shapes(pre_norm, pos):
  m = _detr(pre_norm=pre_norm, position_embedding=pos)
  x, mask = _inputs()
  with torch.no_grad():
    out = m(x, mask)
  assert out['pred_logits'].shape == (2, 12, 6)
  assert out['pred_boxes'].shape == (2, 12, 4)
  assert len(out['aux_outputs']) == 1
  assert out['aux_outputs'][0]['pred_logits'].shape == (2, 12, 6)
  for t in (out['pred_logits'], out['pred_boxes']):
    assert torch.isfinite(t).all()
  assert (out['pred_boxes'] > 0).all() and (out['pred_boxes'] < 1).all()
  assert out['pred_logits'].std() > 0.1  # not collapsed


def test_detr_no_aux_and_dc5():
  m = _detr(aux_loss=False, dilation=True)
  x, mask = _inputs()
  with torch.no_grad():
    out = m(x, mask, return_internals=True)
  assert 'aux_outputs' not in out
  # DC5: stride 16 -> 48x64 gives 3x4
  assert out['internals']['feature'].shape == (2, 256, 3, 4)
  body = m.backbone[0].body
  assert body.layer4[0].conv2.stride == (1, 1) and body.layer4[0].conv2.dilation == (1, 1)
  assert body.layer4[0].downsample[0].stride == (1, 1)
  m2 = _detr(dilation=True, blocks=[1, 1, 1, 2])
  l4 = m2.backbone[0].body.layer4
  assert l4[1].conv2.dilation == (2, 2) and l4[1].conv2.padding == (2, 2)


def test_key_layout_post_norm():
  sd = _detr().state_dict()
  must = [
    'backbone.0.body.conv1.weight',
    'backbone.0.body.bn1.weight',
    'backbone.0.body.bn1.bias',
    'backbone.0.body.bn1.running_mean',
    'backbone.0.body.bn1.running_var',
    'backbone.0.body.layer1.0.conv1.weight',
    'backbone.0.body.layer1.0.bn3.running_var',
    'backbone.0.body.layer1.0.downsample.0.weight',
    'backbone.0.body.layer1.0.downsample.1.running_mean',
    'backbone.0.body.layer4.0.downsample.0.weight',
    'input_proj.weight',
    'input_proj.bias',
    'query_embed.weight',
    'class_embed.weight',
    'class_embed.bias',
    'bbox_embed.layers.0.weight',
    'bbox_embed.layers.2.bias',
    'transformer.encoder.layers.0.self_attn.in_proj_weight',
    'transformer.encoder.layers.0.self_attn.in_proj_bias',
    'transformer.encoder.layers.0.self_attn.out_proj.weight',
    'transformer.encoder.layers.1.linear1.weight',
    'transformer.encoder.layers.1.norm2.bias',
    'transformer.decoder.layers.0.self_attn.in_proj_weight',
    'transformer.decoder.layers.0.multihead_attn.in_proj_weight',
    'transformer.decoder.layers.1.multihead_attn.out_proj.bias',
    'transformer.decoder.layers.1.norm3.weight',
    'transformer.decoder.norm.weight',
    'transformer.decoder.norm.bias',
  ]
  for k in must:
    assert k in sd, k
  assert 'transformer.encoder.norm.weight' not in sd
  assert not any('num_batches_tracked' in k or k.startswith('backbone.0.body.fc') for k in sd)
  assert not any(k.startswith('backbone.1.') for k in sd)  # sine has no params
  assert not any(k.startswith(('patch2query', 'feature_align')) for k in sd)
  # no second-block downsample (channels and stride unchanged)
  assert (
    'backbone.0.body.layer1.1.downsample.0.weight' not in _detr(blocks=[2, 1, 1, 1]).state_dict()
  )
  # shapes
  d = 32
  assert sd['backbone.0.body.conv1.weight'].shape == (8, 3, 7, 7)
  assert sd['backbone.0.body.layer4.0.conv3.weight'].shape == (256, 64, 1, 1)
  assert sd['input_proj.weight'].shape == (d, 256, 1, 1)
  assert sd['query_embed.weight'].shape == (12, d)
  assert sd['class_embed.weight'].shape == (6, d)
  assert sd['bbox_embed.layers.2.weight'].shape == (4, d)
  assert sd['transformer.encoder.layers.0.self_attn.in_proj_weight'].shape == (3 * d, d)
  assert sd['transformer.encoder.layers.0.self_attn.in_proj_bias'].shape == (3 * d,)
  assert sd['transformer.decoder.layers.0.linear1.weight'].shape == (64, d)
  # all tensors float32
  assert all(v.dtype == torch.float32 for v in sd.values())


def test_key_layout_pre_norm_learned_updetr():
  sd = _updetr(position_embedding='learned').state_dict()
  assert 'transformer.encoder.norm.weight' in sd
  assert sd['backbone.1.row_embed.weight'].shape == (50, 16)
  assert sd['backbone.1.col_embed.weight'].shape == (50, 16)
  assert sd['patch2query.weight'].shape == (32, 256)
  assert sd['feature_align.layers.0.weight'].shape == (32, 32)
  assert sd['feature_align.layers.1.weight'].shape == (256, 32)
  assert 'feature_align.layers.2.weight' not in sd
  assert sd['class_embed.weight'].shape == (3, 32)


def test_real_r50_key_count():
  sd = ref.build_detr(blocks=[3, 4, 6, 3], width=64, hidden_dim=256).state_dict()
  body = [k for k in sd if k.startswith('backbone.0.body.')]
  # 53 convs (incl. 4 downsample) + 53 frozen BNs x 4 buffers
  assert len(body) == 53 + 53 * 4
  assert sd['backbone.0.body.layer4.2.conv3.weight'].shape == (2048, 512, 1, 1)
  assert sd['transformer.encoder.layers.5.self_attn.in_proj_weight'].shape == (768, 256)


@pytest.mark.parametrize('m_patches', [1, 2, 3, 4, 6, 12])
def test_group_mask(m_patches):
  n = 12
  mask = ref.group_attn_mask(n, m_patches)
  per = n // m_patches
  assert mask.shape == (n, n) and mask.dtype == torch.float32
  for i in range(n):
    for j in range(n):
      same = i // per == j // per
      assert (mask[i, j] == 0) if same else (mask[i, j] == -math.inf)
  # every row keeps exactly `per` entries
  assert ((mask == 0).sum(1) == per).all()
  # truncated (eval with K < M patches)
  k = max(1, m_patches - 1)
  sub = ref.group_attn_mask(n, m_patches, k * per)
  assert torch.equal(sub, mask[: k * per, : k * per])


def test_group_mask_rejects_non_divisor():
  with pytest.raises(ValueError):
    ref.group_attn_mask(12, 5)


def test_updetr_shapes_and_groups():
  m = _updetr(num_patches=3)
  x, mask = _inputs()
  g = torch.Generator().manual_seed(5)
  patches = torch.randn(2, 3, 3, 32, 32, generator=g)
  with torch.no_grad():
    out = m(x, mask, patches, return_internals=True)
  assert out['pred_logits'].shape == (2, 12, 3)
  assert out['pred_boxes'].shape == (2, 12, 4)
  assert out['pred_feature'].shape == (2, 12, 256)
  assert out['gt_feature'].shape == (2, 3, 256)
  assert len(out['aux_outputs']) == 1
  assert out['aux_outputs'][0]['pred_feature'].shape == (2, 12, 256)
  # gt_feature = GAP of the same backbone body
  with torch.no_grad():
    f = m.backbone[0].body(patches[1, 2:3]).mean((2, 3))
  torch.testing.assert_close(out['gt_feature'][1, 2:3], f)
  # query_pos: query i gets patch i // 4, plus query_embed
  qp = out['internals']['query_pos']  # [N,B,d]
  with torch.no_grad():
    expect = m.patch2query(out['gt_feature'][0, 1]) + m.query_embed.weight[5]
  torch.testing.assert_close(qp[5, 0], expect)
  # groups are independent: changing patch 2 leaves queries of groups 0, 1 unchanged
  p2 = patches.clone()
  p2[:, 2] = torch.randn(2, 3, 32, 32, generator=g)
  with torch.no_grad():
    out2 = m(x, mask, p2)
  torch.testing.assert_close(out2['pred_boxes'][:, :8], out['pred_boxes'][:, :8])
  assert not torch.allclose(out2['pred_boxes'][:, 8:], out['pred_boxes'][:, 8:])
  # eval with fewer patches uses the first K*N/M queries, same result for those groups
  with torch.no_grad():
    out3 = m(x, mask, patches[:, :2])
  assert out3['pred_boxes'].shape == (2, 8, 4)
  torch.testing.assert_close(out3['pred_boxes'], out['pred_boxes'][:, :8])


def test_updetr_single_patch_and_training_mode():
  m = _updetr(num_patches=1)
  x, mask = _inputs()
  patches = torch.randn(2, 1, 3, 32, 32)
  with torch.no_grad():
    out = m(x, mask, patches, return_internals=True)
  assert out['internals']['tgt_mask'] is None
  assert out['pred_logits'].shape == (2, 12, 3)
  m.train()
  torch.manual_seed(0)
  out = m(x, mask, patches)
  assert out['pred_feature'].shape == (2, 12, 256)
  assert out['gt_feature'].requires_grad  # not detached, as in the release
  out['pred_feature'].sum().backward()
  assert m.patch2query.weight.grad is not None


def test_padding_mask_and_positions():
  x, mask = _inputs()
  fm = ref.nearest_mask(mask, (2, 2))
  assert fm.dtype == torch.bool and fm.shape == (2, 2, 2)
  assert not fm[0].any()
  # sine: x channels of the last valid column reach 2*pi (sin channel 0 of pos_x)
  pe = ref.PositionEmbeddingSine(8)
  m = torch.zeros(1, 3, 5, dtype=torch.bool)
  m[:, :, 4:] = True
  p = pe(torch.zeros(1, 1, 3, 5), m)
  assert p.shape == (1, 16, 3, 5)
  torch.testing.assert_close(p[0, 8, 0, 3], torch.tensor(math.sin(2 * math.pi * 4 / (4 + 1e-6))))
  torch.testing.assert_close(p[0, 9, 0, 0], torch.tensor(math.cos(2 * math.pi / 4)))
  torch.testing.assert_close(p[0, 0, 1, 0], torch.tensor(math.sin(2 * math.pi * 2 / 3)))
  # learned: x (col) first, then y (row)
  le = ref.randomize_(ref.PositionEmbeddingLearned(4), 0)
  q = le(torch.zeros(2, 1, 3, 5), torch.zeros(2, 3, 5, dtype=torch.bool))
  assert q.shape == (2, 8, 3, 5)
  torch.testing.assert_close(q[1, :4, 2, 3], le.col_embed.weight[3])
  torch.testing.assert_close(q[1, 4:, 2, 3], le.row_embed.weight[2])


def test_frozen_bn_formula():
  bn = ref.randomize_(ref.FrozenBatchNorm2d(4), 3)
  x = torch.randn(2, 4, 3, 3)
  ev = torch.nn.functional.batch_norm(
    x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=1e-5
  )
  torch.testing.assert_close(bn(x), ev)


def test_randomize_deterministic_and_complete():
  a = ref.randomize_(ref.build_updetr(**dict(TINY, pre_norm=True), num_patches=3), 7)
  b = ref.randomize_(ref.build_updetr(**dict(TINY, pre_norm=True), num_patches=3), 7)
  c = ref.randomize_(ref.build_updetr(**dict(TINY, pre_norm=True), num_patches=3), 8)
  fresh = ref.build_updetr(**dict(TINY, pre_norm=True), num_patches=3).state_dict()
  sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
  for k in sa:
    assert torch.equal(sa[k], sb[k]), k
    assert not torch.equal(sa[k], sc[k]), k
    assert not torch.equal(sa[k], fresh[k]), k  # every tensor was touched
    if k.endswith('running_var'):
      assert (sa[k] > 0).all()
