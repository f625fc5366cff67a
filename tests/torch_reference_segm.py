"""PyTorch reference of DETR's panoptic segmentation head (test-only).

Written from the behaviour of the DETR / UP-DETR PyTorch releases: their
``models/segmentation.py`` (``DETRsegm``, ``MHAttentionMap``, ``MaskHeadSmallConv``,
the mask losses, ``PostProcessPanoptic``) and the mask terms of ``SetCriterion`` in
``models/detr.py``. It builds on the detector of ``tests/torch_reference.py``: the
``state_dict()`` of ``DETRsegm`` holds the detector's keys under ``detr.`` plus the
``bbox_attention.*`` and ``mask_head.*`` keys of the releases' panoptic checkpoints,
with their shapes, so parity tests can feed it to an importer and compare outputs.

CPU, float32, torch only (numpy for the panopticapi colour codes).

Release facts kept here
-----------------------
- The backbone returns the outputs of layer1..layer4; the transformer runs on layer4
  (through ``input_proj``) exactly as in the detector; the mask head reads layer3,
  layer2, layer1 (in that order) through its three adapters.
- ``MaskHeadSmallConv(dim, fpn_dims, context_dim)`` has widths dim, context_dim / 2,
  / 4, / 8, / 16 for lay1..lay5 (GroupNorm with 8 groups after each), adapters
  adapter1..3 map fpn_dims[0..2] to context_dim / 2, / 4, / 8, and ``out_lay`` maps
  context_dim / 16 to one channel. The releases use dim = hidden + nheads,
  fpn_dims = [1024, 512, 256] (R50 / R101), context_dim = hidden; GroupNorm(8) then
  needs hidden % 128 == 0 and (hidden + nheads) % 8 == 0.
- ``MHAttentionMap``: the softmax of UP-DETR's release runs over the H*W positions of
  each head (``softmax='per_head'``, the default here); DETR's release normalises over
  heads and positions jointly (``softmax='joint'``).
- ``PostProcessPanoptic``: see its docstring (segment ids, stuff merging, the void
  result without any kept query).

Public API
----------
- ``build_detr_segm(num_classes=250, softmax=..., **build_detr_kwargs)``.
- ``randomize_``: the detector reference's random fill; it covers this model too
  (GroupNorm falls in its generic branch) and, the detector being registered first,
  gives ``detr.*`` the same values as ``randomize_(build_detr(...), seed)``.
- ``resnet_stages(body, images)``: the four stage outputs of a ``ResNet``.
- Modules: ``MHAttentionMap``, ``MaskHeadSmallConv``, ``DETRsegm``,
  ``PostProcessPanoptic``.
- Losses: ``matched_mask_logits(...)``, ``sigmoid_focal_loss``, ``dice_loss``,
  ``loss_masks(...)``.
- ``id2rgb`` / ``rgb2id`` (panopticapi's colour code, ``panoptic_reference``'s),
  ``pil_nearest_indices``.
"""

from __future__ import annotations

import math
import os
import sys
from collections import defaultdict
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference as ref  # noqa: E402
from torch_reference import nearest_mask, randomize_  # noqa: E402
from panoptic_reference import id2rgb, rgb2id  # noqa: E402,F401  (panopticapi's colour code)

__all__ = [
  'MHAttentionMap',
  'MaskHeadSmallConv',
  'DETRsegm',
  'PostProcessPanoptic',
  'build_detr_segm',
  'randomize_',
  'resnet_stages',
  'fpn_channels',
  'matched_mask_logits',
  'sigmoid_focal_loss',
  'dice_loss',
  'loss_masks',
  'id2rgb',
  'rgb2id',
  'pil_nearest_indices',
]


# ----------------------------------------------------------------------------------
# Backbone stages
# ----------------------------------------------------------------------------------
def resnet_stages(body: ref.ResNet, images: Tensor) -> list[Tensor]:
  """Runs a ``ResNet`` body and returns [layer1, layer2, layer3, layer4] outputs.

  Same computation as ``body(images)`` (whose result is the last entry); the body's
  modules are used as they are, so the key names do not change.
  """
  x = body.maxpool(F.relu(body.bn1(body.conv1(images))))
  stages = []
  for layer in (body.layer1, body.layer2, body.layer3, body.layer4):
    x = layer(x)
    stages.append(x)
  return stages


def fpn_channels(body: ref.ResNet) -> list[int]:
  """Channels of layer3, layer2, layer1 ([1024, 512, 256] for R50 / R101)."""
  return [layer[-1].conv3.out_channels for layer in (body.layer3, body.layer2, body.layer1)]


# ----------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------
class MHAttentionMap(nn.Module):
  """Multi-head attention weights of the queries over the encoder memory.

  q = q_linear(hs), k = k_linear applied as a 1x1 conv on the memory map; the dot
  products of each head are scaled by (hidden / heads) ** -0.5 (on q), padded
  positions get -inf, and a softmax turns them into weights (no values, no output
  projection). ``softmax='per_head'``: over the H*W positions of each head (UP-DETR's
  release); ``'joint'``: over heads and positions together (DETR's release).
  Dropout of the releases is 0 and left out.
  """

  def __init__(self, query_dim: int, hidden_dim: int, num_heads: int, softmax: str = 'per_head'):
    super().__init__()
    if softmax not in ('per_head', 'joint'):
      raise ValueError(f'softmax must be per_head or joint, got {softmax!r}')
    if hidden_dim % num_heads:
      raise ValueError('num_heads must divide hidden_dim')
    self.num_heads = num_heads
    self.hidden_dim = hidden_dim
    self.softmax = softmax
    self.q_linear = nn.Linear(query_dim, hidden_dim)
    self.k_linear = nn.Linear(query_dim, hidden_dim)
    for lin in (self.q_linear, self.k_linear):
      nn.init.xavier_uniform_(lin.weight)
      nn.init.zeros_(lin.bias)
    self.normalize_fact = float(hidden_dim / num_heads) ** -0.5

  def forward(self, q: Tensor, k: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """q [B, N, query_dim], k [B, query_dim, H, W], mask [B, H, W] bool (True = pad).

    Returns [B, N, heads, H, W].
    """
    b, n = q.shape[:2]
    h, w = k.shape[-2:]
    c = self.hidden_dim // self.num_heads
    q = self.q_linear(q).view(b, n, self.num_heads, c)
    k = F.conv2d(k, self.k_linear.weight[:, :, None, None], self.k_linear.bias)
    k = k.view(b, self.num_heads, c, h, w)
    logits = torch.einsum('bqnc,bnchw->bqnhw', q * self.normalize_fact, k)
    if mask is not None:
      logits = logits.masked_fill(mask[:, None, None], float('-inf'))
    start = 3 if self.softmax == 'per_head' else 2
    return F.softmax(logits.flatten(start), dim=-1).view(logits.shape)


def _repeat_per_query(x: Tensor, n: int) -> Tensor:
  """[B, C, H, W] -> [B*n, C, H, W], each image repeated n times in a row."""
  return x[:, None].expand(-1, n, -1, -1, -1).flatten(0, 1)


class MaskHeadSmallConv(nn.Module):
  """The releases' FPN-style mask head (GroupNorm(8) after each 3x3 conv).

  Widths: lay1 dim -> dim, lay2 -> context_dim // 2, lay3 -> // 4, lay4 -> // 8,
  lay5 -> // 16, out_lay -> 1; adapter{1,2,3}: fpn_dims[k] -> width of lay{k+2}'s
  input. Convs start as kaiming_uniform_(a=1), bias 0.
  """

  def __init__(self, dim: int, fpn_dims: Sequence[int], context_dim: int, groups: int = 8):
    super().__init__()
    widths = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
    for wd in widths:
      if wd % groups:
        raise ValueError(
          f'GroupNorm({groups}) needs every width divisible by {groups}, got {widths} '
          '(hidden_dim % 128 == 0 and (hidden_dim + nheads) % 8 == 0)'
        )
    self.dim = dim
    self.lay1 = nn.Conv2d(dim, dim, 3, padding=1)
    self.gn1 = nn.GroupNorm(groups, dim)
    for i in range(1, 5):
      setattr(self, f'lay{i + 1}', nn.Conv2d(widths[i - 1], widths[i], 3, padding=1))
      setattr(self, f'gn{i + 1}', nn.GroupNorm(groups, widths[i]))
    self.out_lay = nn.Conv2d(widths[4], 1, 3, padding=1)
    for i in range(3):
      setattr(self, f'adapter{i + 1}', nn.Conv2d(fpn_dims[i], widths[i + 1], 1))
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_uniform_(m.weight, a=1)
        nn.init.zeros_(m.bias)

  def _block(self, i: int, x: Tensor) -> Tensor:
    return F.relu(getattr(self, f'gn{i}')(getattr(self, f'lay{i}')(x)))

  def forward(self, x: Tensor, bbox_mask: Tensor, fpns: Sequence[Tensor]) -> Tensor:
    """x [B, C, h, w] (projected layer4), bbox_mask [B, N, heads, h, w],
    fpns [layer3, layer2, layer1] features [B, C_k, H_k, W_k].

    Returns [B*N, 1, H_1, W_1] mask logits (H_1, W_1: layer1's size).
    """
    n = bbox_mask.shape[1]
    x = torch.cat([_repeat_per_query(x, n), bbox_mask.flatten(0, 1)], dim=1)
    x = self._block(1, x)
    x = self._block(2, x)
    for i, feat in enumerate(fpns):
      lateral = getattr(self, f'adapter{i + 1}')(feat)
      if lateral.shape[0] != x.shape[0]:
        lateral = _repeat_per_query(lateral, x.shape[0] // lateral.shape[0])
      x = lateral + F.interpolate(x, size=lateral.shape[-2:], mode='nearest')
      x = self._block(i + 3, x)
    return self.out_lay(x)


class DETRsegm(nn.Module):
  """The detector (keys ``detr.*``) plus ``bbox_attention`` and ``mask_head``."""

  def __init__(
    self,
    detr: ref.DETR,
    fpn_dims: Optional[Sequence[int]] = None,
    softmax: str = 'per_head',
  ):
    super().__init__()
    self.detr = detr
    hidden, nheads = detr.transformer.d_model, detr.transformer.nhead
    if fpn_dims is None:
      fpn_dims = fpn_channels(detr.backbone[0].body)
    self.bbox_attention = MHAttentionMap(hidden, hidden, nheads, softmax=softmax)
    self.mask_head = MaskHeadSmallConv(hidden + nheads, list(fpn_dims), hidden)

  def forward(self, images: Tensor, mask: Tensor, return_internals: bool = False):
    """images [B, 3, H, W] float32 (normalised), mask [B, H, W] bool (True = padding).

    Returns the detector's outputs plus ``pred_masks`` [B, N, ceil(H/4), ceil(W/4)]
    (mask logits of the last decoder layer).
    """
    detr = self.detr
    stages = resnet_stages(detr.backbone[0].body, images)
    feat = stages[-1]
    fmask = nearest_mask(mask, feat.shape[-2:])
    pos = detr.backbone[1](feat, fmask).to(feat.dtype)
    src = detr.input_proj(feat)
    hs, memory = detr.transformer(src, fmask, detr.query_embed.weight, pos)
    logits, boxes = detr._heads(hs)
    out = {'pred_logits': logits[-1], 'pred_boxes': boxes[-1]}
    if detr.aux_loss:
      out['aux_outputs'] = [
        {'pred_logits': a, 'pred_boxes': b} for a, b in zip(logits[:-1], boxes[:-1])
      ]
    attn = self.bbox_attention(hs[-1], memory, mask=fmask)
    masks = self.mask_head(src, attn, [stages[2], stages[1], stages[0]])
    b, n = attn.shape[:2]
    out['pred_masks'] = masks.view(b, n, masks.shape[-2], masks.shape[-1])
    if return_internals:
      out['internals'] = dict(
        stages=stages, mask=fmask, pos=pos, src=src, memory=memory, hs=hs, attention=attn
      )
    return out


def build_detr_segm(*, num_classes=250, softmax='per_head', **detr_kwargs) -> DETRsegm:
  """``ref.build_detr(**detr_kwargs)`` wrapped in ``DETRsegm``.

  num_classes defaults to the releases' panoptic setting (250). The FPN widths are
  read from the backbone (4 * width * [4, 2, 1]).
  """
  detr = ref.build_detr(num_classes=num_classes, **detr_kwargs)
  return DETRsegm(detr, softmax=softmax).float()


# ----------------------------------------------------------------------------------
# Losses (matched queries of the last layer only; auxiliary layers get none)
# ----------------------------------------------------------------------------------
def matched_mask_logits(
  pred_masks: Tensor,
  target_masks: Sequence[Tensor],
  indices: Sequence[tuple],
) -> tuple[Tensor, Tensor]:
  """Gathers matched predicted / target masks and brings them to one size.

  Args:
    pred_masks: [B, N, h, w] mask logits.
    target_masks: per image a [n_i, H_i, W_i] tensor of binary masks.
    indices: per image a pair (query indices, target indices) of equal length.

  Returns:
    (logits, targets), both [M, Hp * Wp] float, M the number of matched pairs in
    image order. The targets are zero-padded at the bottom / right to the largest
    H_i, W_i of the batch (Hp, Wp), and the predicted logits are upsampled bilinearly
    (align_corners=False) to that padded size, as in the releases.
  """
  hp = max(int(t.shape[-2]) for t in target_masks)
  wp = max(int(t.shape[-1]) for t in target_masks)
  src, tgt = [], []
  for b, (qi, ti) in enumerate(indices):
    qi = torch.as_tensor(qi, dtype=torch.long)
    ti = torch.as_tensor(ti, dtype=torch.long)
    t = target_masks[b].to(pred_masks.dtype)
    t = F.pad(t, (0, wp - t.shape[-1], 0, hp - t.shape[-2]))
    src.append(pred_masks[b, qi])
    tgt.append(t[ti])
  src = torch.cat(src)
  tgt = torch.cat(tgt)
  src = F.interpolate(src[:, None], size=(hp, wp), mode='bilinear', align_corners=False)
  return src[:, 0].flatten(1), tgt.flatten(1)


def sigmoid_focal_loss(
  inputs: Tensor, targets: Tensor, num_boxes: float, alpha: float = 0.25, gamma: float = 2
) -> Tensor:
  """Focal loss on [M, P] logits / binary targets: per-mask mean over the P pixels,
  summed over masks, divided by num_boxes. alpha < 0 turns the class weight off.
  """
  p = inputs.sigmoid()
  ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction='none')
  p_t = p * targets + (1 - p) * (1 - targets)
  loss = ce * (1 - p_t) ** gamma
  if alpha >= 0:
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
  return loss.mean(1).sum() / num_boxes


def dice_loss(inputs: Tensor, targets: Tensor, num_boxes: float) -> Tensor:
  """Dice loss on [M, P] logits / targets with +1 smoothing, summed over masks,
  divided by num_boxes.
  """
  p = inputs.sigmoid().flatten(1)
  numerator = 2 * (p * targets).sum(1) + 1
  denominator = p.sum(1) + targets.sum(1) + 1
  return (1 - numerator / denominator).sum() / num_boxes


def loss_masks(
  pred_masks: Tensor,
  target_masks: Sequence[Tensor],
  indices: Sequence[tuple],
  num_boxes: float,
) -> dict[str, Tensor]:
  """The releases' two mask terms: {'loss_mask': focal, 'loss_dice': dice}."""
  src, tgt = matched_mask_logits(pred_masks, target_masks, indices)
  return {
    'loss_mask': sigmoid_focal_loss(src, tgt, num_boxes),
    'loss_dice': dice_loss(src, tgt, num_boxes),
  }


# ----------------------------------------------------------------------------------
# Panoptic post-processing
# ----------------------------------------------------------------------------------
def pil_nearest_indices(n_in: int, n_out: int) -> Tensor:
  """Source index of each output pixel of a PIL ``Image.NEAREST`` resize (one axis).

  PIL steps a float64 source coordinate from 0.5 * n_in / n_out by n_in / n_out and
  truncates it; the accumulated sum is kept here, which reproduces its rounding.
  """
  step = n_in / n_out
  pos = 0.5 * step
  out = []
  for _ in range(n_out):
    out.append(min(int(math.floor(pos)), n_in - 1))
    pos += step
  return torch.tensor(out, dtype=torch.long)


class PostProcessPanoptic(nn.Module):
  """Panoptic segmentation of one image from the model's outputs (releases' rules).

  1. Keep the queries whose argmax class (softmax over all C + 1 logits) is not
     "no object" (the last) and whose probability is > ``threshold``.
  2. Upsample their mask logits (the whole given map) bilinearly (align_corners=False)
     to ``processed_size``.
  3. Each pixel takes the argmax over the kept queries (of the softmax over them);
     the id of a segment is the index of its query among the kept ones (0, 1, ...).
  4. First pass only: pixels of all the queries of one stuff class take the id of the
     first of them (things are never merged). The map is resized to ``target_size``
     with PIL's nearest rule and the area of every kept query's id is counted.
  5. While a kept query has area <= 4 (a merged-away stuff duplicate has area 0), all
     such queries are dropped and 3.-4. redone, without the stuff merge (the
     releases' loop). A dropped stuff duplicate's pixels therefore go to the next best
     kept query; the stuff class stays one segment when that is its first query.
  6. segments_info: {'id', 'isthing', 'category_id', 'area'} per remaining query.

  With no kept query the map is all 0 and segments_info is empty: the whole image
  is the unlabelled (void) id 0 of the panoptic format (the releases set a category
  1 there, but no segment is ever listed with it).
  The releases then encode the map as a PNG (``id2rgb``); that step is left out.
  """

  def __init__(self, is_thing_map: Mapping[int, bool], threshold: float = 0.85):
    super().__init__()
    self.is_thing_map = is_thing_map
    self.threshold = threshold

  @torch.no_grad()
  def single(
    self,
    logits: Tensor,
    masks: Tensor,
    processed_size: Sequence[int],
    target_size: Optional[Sequence[int]] = None,
  ) -> tuple[Tensor, list[dict]]:
    """logits [N, C+1], masks [N, h, w] logits; sizes (height, width).

    Returns (segment ids [H_t, W_t] int64, segments_info).
    """
    h, w = (int(s) for s in processed_size)
    th, tw = (h, w) if target_size is None else (int(s) for s in target_size)
    probs = logits.softmax(-1)
    scores, labels = probs.max(-1)
    keep = (labels != logits.shape[-1] - 1) & (scores > self.threshold)
    classes = labels[keep].tolist()
    cur = masks[keep].float()
    if cur.shape[0]:
      cur = F.interpolate(cur[:, None], size=(h, w), mode='bilinear', align_corners=False)[:, 0]
    else:
      cur = cur.new_zeros((0, h, w))
    cur = cur.flatten(1)
    rows, cols = pil_nearest_indices(h, th), pil_nearest_indices(w, tw)

    stuff = defaultdict(list)
    for k, c in enumerate(classes):
      if not self.is_thing_map[c]:
        stuff[c].append(k)

    def ids_and_areas(m: Tensor, dedup: bool):
      if m.shape[0] == 0:
        ids = torch.zeros((h, w), dtype=torch.long)
      else:
        ids = m.t().softmax(-1).argmax(-1).view(h, w)
      if dedup:
        for group in stuff.values():
          for k in group[1:]:
            ids = ids.masked_fill(ids == k, group[0])
      ids = ids[rows][:, cols]
      return ids, [int((ids == k).sum()) for k in range(m.shape[0])]

    ids, area = ids_and_areas(cur, dedup=True)
    while classes:
      small = [a <= 4 for a in area]
      if not any(small):
        break
      kept = [k for k, s in enumerate(small) if not s]
      classes = [classes[k] for k in kept]
      cur = cur[torch.tensor(kept, dtype=torch.long)]
      ids, area = ids_and_areas(cur, dedup=False)

    info = [
      {'id': k, 'isthing': bool(self.is_thing_map[c]), 'category_id': int(c), 'area': a}
      for k, (c, a) in enumerate(zip(classes, area))
    ]
    return ids, info

  def forward(
    self,
    outputs: Mapping[str, Tensor],
    processed_sizes: Sequence[Sequence[int]],
    target_sizes: Optional[Sequence[Sequence[int]]] = None,
  ) -> list[dict]:
    """Batch version: a list of {'segment_ids', 'segments_info'} per image."""
    if target_sizes is None:
      target_sizes = processed_sizes
    assert len(processed_sizes) == len(target_sizes) == len(outputs['pred_logits'])
    preds = []
    for logits, masks, size, tsize in zip(
      outputs['pred_logits'], outputs['pred_masks'], processed_sizes, target_sizes
    ):
      ids, info = self.single(logits, masks, size, tsize)
      preds.append({'segment_ids': ids, 'segments_info': info})
    return preds
