"""Self-checks of the PyTorch panoptic-head reference (tests/torch_reference_segm.py)."""

import math
import os
import sys

import numpy as np
import pytest

from conftest import importorskip  # fails instead of skipping under CI=true

torch = importorskip('torch')

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference as ref  # noqa: E402
import torch_reference_segm as seg  # noqa: E402

# GroupNorm(8) on widths hidden / 16 and hidden + nheads: hidden 128, 8 heads.
TINY = dict(
  blocks=[1, 1, 1, 1],
  width=8,
  dilation=False,
  position_embedding='sine',
  hidden_dim=128,
  nheads=8,
  enc_layers=1,
  dec_layers=2,
  dim_feedforward=64,
  dropout=0.1,
  num_queries=6,
  pre_norm=False,
  num_classes=5,
  aux_loss=True,
)
D = 128
DIM = D + 8
FPN = [128, 64, 32]  # layer3, layer2, layer1 channels for width 8
HEAD_SHAPES = {
  'bbox_attention.q_linear.weight': (D, D),
  'bbox_attention.q_linear.bias': (D,),
  'bbox_attention.k_linear.weight': (D, D),
  'bbox_attention.k_linear.bias': (D,),
  'mask_head.lay1.weight': (DIM, DIM, 3, 3),
  'mask_head.lay1.bias': (DIM,),
  'mask_head.gn1.weight': (DIM,),
  'mask_head.gn1.bias': (DIM,),
  'mask_head.lay2.weight': (D // 2, DIM, 3, 3),
  'mask_head.lay2.bias': (D // 2,),
  'mask_head.gn2.weight': (D // 2,),
  'mask_head.gn2.bias': (D // 2,),
  'mask_head.lay3.weight': (D // 4, D // 2, 3, 3),
  'mask_head.lay3.bias': (D // 4,),
  'mask_head.gn3.weight': (D // 4,),
  'mask_head.gn3.bias': (D // 4,),
  'mask_head.lay4.weight': (D // 8, D // 4, 3, 3),
  'mask_head.lay4.bias': (D // 8,),
  'mask_head.gn4.weight': (D // 8,),
  'mask_head.gn4.bias': (D // 8,),
  'mask_head.lay5.weight': (D // 16, D // 8, 3, 3),
  'mask_head.lay5.bias': (D // 16,),
  'mask_head.gn5.weight': (D // 16,),
  'mask_head.gn5.bias': (D // 16,),
  'mask_head.out_lay.weight': (1, D // 16, 3, 3),
  'mask_head.out_lay.bias': (1,),
  'mask_head.adapter1.weight': (D // 2, FPN[0], 1, 1),
  'mask_head.adapter1.bias': (D // 2,),
  'mask_head.adapter2.weight': (D // 4, FPN[1], 1, 1),
  'mask_head.adapter2.bias': (D // 4,),
  'mask_head.adapter3.weight': (D // 8, FPN[2], 1, 1),
  'mask_head.adapter3.bias': (D // 8,),
}


def _segm(seed=1, **kw):
  return seg.randomize_(seg.build_detr_segm(**dict(TINY, **kw)), seed=seed).eval()


def _inputs(b=2, h=48, w=64, pad=True, seed=0, pad_hw=(12, 16)):
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(b, 3, h, w, generator=g)
  mask = torch.zeros(b, h, w, dtype=torch.bool)
  if pad:
    mask[1, h - pad_hw[0] :, :] = True
    mask[1, :, w - pad_hw[1] :] = True
    x[mask[:, None].expand_as(x)] = 0.0
  return x, mask


def test_state_dict_keys_and_shapes():
  sd = seg.build_detr_segm(**TINY).state_dict()
  det = ref.build_detr(**TINY).state_dict()
  assert set(sd) == {f'detr.{k}' for k in det} | set(HEAD_SHAPES)
  for k, v in det.items():
    assert sd[f'detr.{k}'].shape == v.shape, k
  for k, shape in HEAD_SHAPES.items():
    assert tuple(sd[k].shape) == shape, k
  assert all(v.dtype == torch.float32 for v in sd.values())


def test_release_widths_and_init():
  # R50 / R101: fpn_dims [1024, 512, 256], hidden 256, 8 heads -> dim 264.
  assert seg.fpn_channels(ref.ResNet((1, 1, 1, 1), 64)) == [1024, 512, 256]
  head = seg.MaskHeadSmallConv(264, [1024, 512, 256], 256)
  sd = head.state_dict()
  expect = {
    'lay1.weight': (264, 264, 3, 3),
    'gn1.weight': (264,),
    'lay2.weight': (128, 264, 3, 3),
    'lay3.weight': (64, 128, 3, 3),
    'lay4.weight': (32, 64, 3, 3),
    'lay5.weight': (16, 32, 3, 3),
    'gn5.bias': (16,),
    'out_lay.weight': (1, 16, 3, 3),
    'adapter1.weight': (128, 1024, 1, 1),
    'adapter2.weight': (64, 512, 1, 1),
    'adapter3.weight': (32, 256, 1, 1),
  }
  for k, shape in expect.items():
    assert tuple(sd[k].shape) == shape, k
  assert len(sd) == 2 * (5 + 5 + 1 + 3)
  # kaiming_uniform_(a=1): bound sqrt(3 / fan_in); biases 0
  for name in ('lay1', 'lay5', 'adapter1', 'out_lay'):
    conv = getattr(head, name)
    bound = math.sqrt(3.0 / conv.weight[0].numel())
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.8 * bound
    assert not conv.bias.any()
  att = seg.MHAttentionMap(256, 256, 8)
  assert not att.q_linear.bias.any() and not att.k_linear.bias.any()
  assert att.normalize_fact == pytest.approx(32**-0.5)
  with pytest.raises(ValueError):  # GroupNorm(8) cannot take hidden 32 / 16 = 2 channels
    seg.build_detr_segm(**dict(TINY, hidden_dim=32, nheads=8))


@pytest.mark.parametrize(
  'h,w,pad,hw4', [(64, 64, False, (16, 16)), (48, 64, True, (12, 16)), (50, 70, True, (13, 18))]
)
def test_output_shapes(h, w, pad, hw4):
  m = _segm()
  x, mask = _inputs(h=h, w=w, pad=pad)
  with torch.no_grad():
    out = m(x, mask, return_internals=True)
    det = m.detr(x, mask)
  assert out['pred_masks'].shape == (2, 6) + hw4
  assert out['pred_logits'].shape == (2, 6, 6)
  assert out['pred_boxes'].shape == (2, 6, 4)
  assert len(out['aux_outputs']) == 1
  assert out['internals']['attention'].shape == (2, 6, 8) + tuple(
    out['internals']['mask'].shape[1:]
  )
  # the detector part is the detector's own forward
  torch.testing.assert_close(out['pred_logits'], det['pred_logits'])
  torch.testing.assert_close(out['pred_boxes'], det['pred_boxes'])
  torch.testing.assert_close(
    out['aux_outputs'][0]['pred_boxes'], det['aux_outputs'][0]['pred_boxes']
  )
  stages = out['internals']['stages']
  assert [s.shape[1] for s in stages] == FPN[::-1] + [256]
  assert stages[0].shape[-2:] == hw4
  assert torch.isfinite(out['pred_masks']).all()
  assert out['pred_masks'].std() > 1e-3
  assert 'aux_outputs' not in _segm(aux_loss=False)(x, mask)


def test_dc5_output_shapes():
  m = _segm(dilation=True)
  x, mask = _inputs(h=64, w=64)
  with torch.no_grad():
    out = m(x, mask, return_internals=True)
  assert out['internals']['mask'].shape == (2, 4, 4)  # stride 16
  assert out['pred_masks'].shape == (2, 6, 16, 16)
  assert torch.isfinite(out['pred_masks']).all()


def test_attention_map_softmax_over_unpadded_positions():
  m = _segm()
  x, mask = _inputs(h=64, w=96, pad_hw=(32, 32))  # feature map 2 x 3, one row and column padded
  with torch.no_grad():
    out = m(x, mask, return_internals=True)
  att, fmask = out['internals']['attention'], out['internals']['mask']
  assert fmask[1].any() and not fmask[0].any()
  torch.testing.assert_close(att.sum((-2, -1)), torch.ones(2, 6, 8))
  assert (att[1][:, :, fmask[1]] == 0).all()
  assert (att[1][:, :, ~fmask[1]] > 0).all()
  # one entry by hand: q and k projections, scale (d / heads) ** -0.5, softmax
  hs, mem = out['internals']['hs'][-1], out['internals']['memory']
  b, q, head, c = 1, 4, 3, D // 8
  with torch.no_grad():
    qv = m.bbox_attention.q_linear(hs[b, q])[head * c : (head + 1) * c] * c**-0.5
    kv = m.bbox_attention.k_linear(mem[b].permute(1, 2, 0))[..., head * c : (head + 1) * c]
  logits = (kv @ qv).masked_fill(fmask[b], -math.inf)
  expect = logits.flatten().softmax(0).view(logits.shape)
  torch.testing.assert_close(att[b, q, head], expect)


def test_attention_joint_softmax_option():
  m = _segm(softmax='joint')
  x, mask = _inputs(h=64, w=96, pad_hw=(32, 32))
  with torch.no_grad():
    att = m(x, mask, return_internals=True)['internals']['attention']
  torch.testing.assert_close(att.sum((-3, -2, -1)), torch.ones(2, 6))
  assert not torch.allclose(att.sum((-2, -1)), torch.ones(2, 6, 8))
  with pytest.raises(ValueError):
    seg.MHAttentionMap(8, 8, 2, softmax='rows')


def test_mask_head_queries_independent():
  g = torch.Generator().manual_seed(3)
  head = ref.randomize_(seg.MaskHeadSmallConv(DIM, FPN, D), seed=4).eval()
  src = torch.randn(2, D, 2, 3, generator=g)
  att = torch.rand(2, 3, 8, 2, 3, generator=g)
  fpns = [torch.randn(2, c, 4 * k, 6 * k, generator=g) for c, k in zip(FPN, (1, 2, 4))]
  with torch.no_grad():
    a = head(src, att, fpns)
    att2 = att.clone()
    att2[1, 2] = torch.rand(8, 2, 3, generator=g)
    b = head(src, att2, fpns)
  assert a.shape == (6, 1, 16, 24)
  changed = (a - b).flatten(1).abs().amax(1) > 0
  assert changed.tolist() == [False] * 5 + [True]


def test_randomize_covers_segm_model():
  a = _segm(seed=7).state_dict()
  b = _segm(seed=7).state_dict()
  fresh = seg.build_detr_segm(**TINY).state_dict()
  det = ref.randomize_(ref.build_detr(**TINY), seed=7).state_dict()
  for k in a:
    assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a[k], fresh[k]), k
  for k, v in det.items():  # detector registered first: same draws as alone
    assert torch.equal(a[f'detr.{k}'], v), k


def test_backward_reaches_mask_head():
  m = _segm().train()
  x, mask = _inputs(b=1, h=64, w=64, pad=False)
  torch.manual_seed(0)
  out = m(x, mask)
  out['pred_masks'].square().mean().backward()
  assert m.mask_head.lay1.weight.grad.abs().sum() > 0
  assert m.bbox_attention.q_linear.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------
def test_dice_loss():
  t = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
  perfect = 50.0 * (2 * t - 1)
  assert seg.dice_loss(perfect, t, 2).abs() < 1e-6
  # logits 0 -> p = 0.5: (2 * 1 + 1) / (2 + 2 + 1) = 3 / 5
  half = torch.zeros(1, 4)
  torch.testing.assert_close(seg.dice_loss(half, t[:1], 1), torch.tensor(0.4))
  torch.testing.assert_close(seg.dice_loss(half, t[:1], 4), torch.tensor(0.1))
  # 2x2 mask with two certain pixels: p = [1, 0, 0.5, 0.5], t = [1, 0, 1, 0]
  x = torch.tensor([[50.0, -50.0, 0.0, 0.0]])
  tt = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
  torch.testing.assert_close(seg.dice_loss(x, tt, 1), torch.tensor(1 - 4.0 / 5.0))


def test_focal_loss():
  x = torch.tensor([[0.3]])
  p = 1 / (1 + math.exp(-0.3))
  pos = 0.25 * (1 - p) ** 2 * -math.log(p)
  neg = 0.75 * p**2 * -math.log(1 - p)
  torch.testing.assert_close(seg.sigmoid_focal_loss(x, torch.ones(1, 1), 1), torch.tensor(pos))
  torch.testing.assert_close(seg.sigmoid_focal_loss(x, torch.zeros(1, 1), 2), torch.tensor(neg / 2))
  # mean over the pixels of a mask, sum over masks
  xx = torch.tensor([[0.3, 0.3], [0.3, 0.3]])
  tt = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
  torch.testing.assert_close(
    seg.sigmoid_focal_loss(xx, tt, 1), torch.tensor((pos + neg) / 2 + pos), rtol=1e-6, atol=1e-7
  )
  # alpha < 0: no class weight; gamma 0: plain BCE
  torch.testing.assert_close(
    seg.sigmoid_focal_loss(x, torch.ones(1, 1), 1, alpha=-1, gamma=0), torch.tensor(-math.log(p))
  )


def test_matched_masks_upsample_pad_and_order():
  pred = torch.zeros(2, 3, 2, 2)
  pred[0, 2] = 2.0
  pred[1, 0] = -1.0
  pred[1, 1] = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
  targets = [torch.ones(2, 4, 6), torch.ones(1, 6, 4)]
  targets[1][0, 0, 0] = 0
  src, tgt = seg.matched_mask_logits(pred, targets, [([2], [1]), ([1, 0], [0, 0])])
  assert src.shape == tgt.shape == (3, 6 * 6)
  torch.testing.assert_close(src[0], torch.full((36,), 2.0))  # constant stays constant
  t0 = torch.zeros(6, 6)
  t0[:4, :6] = 1  # image 0's targets padded to the batch's 6 x 6
  torch.testing.assert_close(tgt[0], t0.flatten())
  t1 = torch.zeros(6, 6)
  t1[:6, :4] = 1
  t1[0, 0] = 0
  torch.testing.assert_close(tgt[1], t1.flatten())
  up = torch.nn.functional.interpolate(
    pred[1, 1][None, None], size=(6, 6), mode='bilinear', align_corners=False
  )
  torch.testing.assert_close(src[1], up.flatten())
  torch.testing.assert_close(src[2], torch.full((36,), -1.0))
  losses = seg.loss_masks(pred, targets, [([2], [1]), ([1, 0], [0, 0])], 3)
  torch.testing.assert_close(losses['loss_dice'], seg.dice_loss(src, tgt, 3))
  torch.testing.assert_close(losses['loss_mask'], seg.sigmoid_focal_loss(src, tgt, 3))


# ----------------------------------------------------------------------------------
# Panoptic post-processing
# ----------------------------------------------------------------------------------
THINGS = {0: True, 1: True, 2: False, 3: False}  # classes 0-3, no object = 4


def _query_logits(classes):
  """One logits row per query: 10 on its class (p ~ 0.9998), or flat (p = 0.2)."""
  out = torch.zeros(len(classes), 5)
  for i, c in enumerate(classes):
    if c is not None:
      out[i, c] = 10.0
  return out


def test_panoptic_merges_stuff_not_things():
  # queries: thing 0, thing 0, stuff 2, stuff 2, no object, low score
  logits = _query_logits([0, 0, 2, 2, 4, None])
  masks = torch.zeros(6, 8, 8)
  masks[0, 0:2] = 10  # rows 0-1: 16 px
  masks[1, 2:4, 0:4] = 10  # 8 px
  masks[2] = 5  # stuff baseline: wins every pixel nobody else claims
  masks[2, 4:6] = 10
  masks[3, 6:8] = 10  # second stuff query: rows 6-7
  masks[4:] = 20  # not kept: no influence
  ids, info = seg.PostProcessPanoptic(THINGS)(
    {'pred_logits': logits[None], 'pred_masks': masks[None]}, [(8, 8)]
  )[0].values()
  assert ids.shape == (8, 8) and ids.dtype == torch.int64
  assert info == [
    {'id': 0, 'isthing': True, 'category_id': 0, 'area': 16},
    {'id': 1, 'isthing': True, 'category_id': 0, 'area': 8},
    {'id': 2, 'isthing': False, 'category_id': 2, 'area': 40},
  ]
  assert (ids[0:2] == 0).all() and (ids[2:4, :4] == 1).all()
  assert (ids[2:4, 4:] == 2).all() and (ids[4:] == 2).all()


def test_panoptic_stuff_duplicate_pixels_go_to_next_best():
  # the merged-away duplicate has area 0 and is dropped; the argmax is then redone
  # without merging, so its pixels go to the best remaining query (here a thing)
  logits = _query_logits([2, 0, 2])
  masks = torch.zeros(3, 6, 6)
  masks[0, :3] = 10
  masks[1] = 3
  masks[1, 3:, :3] = 10
  masks[2, 3:, 3:] = 10
  ids, info = seg.PostProcessPanoptic(THINGS).single(logits, masks, (6, 6))
  assert info == [
    {'id': 0, 'isthing': False, 'category_id': 2, 'area': 18},
    {'id': 1, 'isthing': True, 'category_id': 0, 'area': 18},
  ]


def test_panoptic_drops_small_segments():
  logits = _query_logits([1, 3, 0, 1])
  masks = torch.zeros(4, 8, 8)
  masks[0] = 4  # background winner
  masks[1, :4] = 10  # stuff 3: rows 0-3
  masks[2, 6:8, 6:8] = 10  # 4 px: dropped, pixels go back to query 0
  masks[3, 4:6, 0:3] = 10  # 6 px... minus the one below
  masks[3, 5, 2] = 0  # 5 px: kept
  ids, info = seg.PostProcessPanoptic(THINGS).single(logits, masks, (8, 8))
  assert [(s['category_id'], s['area']) for s in info] == [(1, 27), (3, 32), (1, 5)]
  assert [s['id'] for s in info] == [0, 1, 2]
  assert (ids[6:, 6:] == 0).all() and (ids[4:6, :3] == 2).sum() == 5


def test_panoptic_no_query_kept_is_void():
  logits = _query_logits([4, None, 4])
  logits[1, 0] = 1.5  # best real class, but p < 0.85
  masks = torch.randn(3, 4, 4)
  pp = seg.PostProcessPanoptic(THINGS)
  ids, info = pp.single(logits, masks, (4, 4), (7, 9))
  assert info == []
  assert ids.shape == (7, 9) and not ids.any()
  # a lower threshold keeps query 1, which then covers the image
  ids, info = seg.PostProcessPanoptic(THINGS, threshold=0.3).single(logits, masks, (4, 4))
  assert info == [{'id': 0, 'isthing': True, 'category_id': 0, 'area': 16}]


def test_panoptic_resize_to_target_and_bilinear():
  # processed size 6 x 8 from a 3 x 4 mask map, then PIL-nearest to 11 x 5
  logits = _query_logits([0, 3])
  g = torch.Generator().manual_seed(0)
  masks = torch.randn(2, 3, 4, generator=g) * 4
  ids, info = seg.PostProcessPanoptic(THINGS, threshold=0.5).single(logits, masks, (6, 8), (11, 5))
  up = torch.nn.functional.interpolate(
    masks[:, None], size=(6, 8), mode='bilinear', align_corners=False
  )[:, 0]
  full = up.argmax(0)
  rows, cols = seg.pil_nearest_indices(6, 11), seg.pil_nearest_indices(8, 5)
  expect = full[rows][:, cols]
  assert torch.equal(ids, expect)
  assert [s['area'] for s in info] == [int((expect == k).sum()) for k in range(2)]
  assert sum(s['area'] for s in info) == 55


def test_pil_nearest_indices_match_pillow():
  image = pytest.importorskip('PIL.Image')
  rng = np.random.default_rng(0)
  for _ in range(40):
    h, w = rng.integers(1, 30, 2)
    th, tw = rng.integers(1, 80, 2)
    ids = np.arange(h * w).reshape(h, w)
    out = np.asarray(image.fromarray(seg.id2rgb(ids)).resize((tw, th), resample=image.NEAREST))
    expect = ids[seg.pil_nearest_indices(h, th).numpy()][:, seg.pil_nearest_indices(w, tw).numpy()]
    assert np.array_equal(seg.rgb2id(out), expect)


def test_id2rgb_rgb2id():
  assert seg.id2rgb(0) == [0, 0, 0]
  assert seg.id2rgb(1 + 256 * 2 + 65536 * 3) == [1, 2, 3]
  assert seg.rgb2id([1, 2, 3]) == 1 + 512 + 3 * 65536
  ids = np.array([[0, 255, 256], [65535, 65536, 2**24 - 1]])
  rgb = seg.id2rgb(ids)
  assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
  assert rgb[1, 2].tolist() == [255, 255, 255] and rgb[0, 2].tolist() == [0, 1, 0]
  assert np.array_equal(seg.rgb2id(rgb), ids)
  assert np.array_equal(seg.rgb2id(seg.id2rgb(torch.tensor(ids))), ids)
