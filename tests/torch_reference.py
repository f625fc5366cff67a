"""PyTorch reference of DETR and the UP-DETR pre-training model (test-only).

Written from the facts in docs/method.md ('DETR, the detector', 'UP-DETR
pre-training', 'Checkpoint layouts of the PyTorch releases') for parity tests: the
``state_dict()`` of the modules here has exactly the key names and shapes of the
DETR / UP-DETR PyTorch releases, so a state dict produced here can be fed to the
JAX importer and the outputs compared.

CPU, float32, torch only (no torchvision). Sequence-first tensors ([S, B, d]) inside
the transformer, as in the releases.

Public API
----------
- ``build_detr(...)`` / ``build_updetr(...)``: constructors with explicit arguments.
- ``randomize_(model, seed)``: deterministic random fill of every parameter and buffer.
- ``group_attn_mask(num_queries, num_patches, num_used=None)``: UP-DETR decoder
  self-attention mask (float, 0 / -inf).
- ``nearest_mask(mask, size)``: padding mask -> feature-map mask (release rule).
- Modules: ``FrozenBatchNorm2d``, ``Bottleneck``, ``ResNet``, ``Backbone``,
  ``PositionEmbeddingSine``, ``PositionEmbeddingLearned``, ``Joiner``, ``MLP``,
  ``Transformer`` (+ encoder / decoder layers), ``DETR``, ``UPDETR``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
  'FrozenBatchNorm2d',
  'Bottleneck',
  'ResNet',
  'Backbone',
  'PositionEmbeddingSine',
  'PositionEmbeddingLearned',
  'Joiner',
  'MLP',
  'TransformerEncoderLayer',
  'TransformerDecoderLayer',
  'TransformerEncoder',
  'TransformerDecoder',
  'Transformer',
  'DETR',
  'UPDETR',
  'nearest_mask',
  'group_attn_mask',
  'build_detr',
  'build_updetr',
  'randomize_',
]


# ----------------------------------------------------------------------------------
# Backbone
# ----------------------------------------------------------------------------------
class FrozenBatchNorm2d(nn.Module):
  """BatchNorm with fixed statistics: y = x * scale + shift.

  scale = weight * rsqrt(running_var + eps), shift = bias - running_mean * scale.
  Four buffers (no parameters, no num_batches_tracked), eps = 1e-5.
  """

  def __init__(self, num_features: int, eps: float = 1e-5):
    super().__init__()
    self.eps = eps
    self.register_buffer('weight', torch.ones(num_features))
    self.register_buffer('bias', torch.zeros(num_features))
    self.register_buffer('running_mean', torch.zeros(num_features))
    self.register_buffer('running_var', torch.ones(num_features))

  def forward(self, x: Tensor) -> Tensor:
    scale = self.weight * torch.rsqrt(self.running_var + self.eps)
    shift = self.bias - self.running_mean * scale
    return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


class Bottleneck(nn.Module):
  """ResNet v1.5 bottleneck: 1x1 -> 3x3 (stride, dilation) -> 1x1 (x4)."""

  expansion = 4

  def __init__(
    self,
    in_ch: int,
    planes: int,
    stride: int = 1,
    dilation: int = 1,
    downsample: Optional[nn.Module] = None,
  ):
    super().__init__()
    out_ch = planes * self.expansion
    self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
    self.bn1 = FrozenBatchNorm2d(planes)
    self.conv2 = nn.Conv2d(
      planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )
    self.bn2 = FrozenBatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
    self.bn3 = FrozenBatchNorm2d(out_ch)
    self.downsample = downsample

  def forward(self, x: Tensor) -> Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + identity)


class ResNet(nn.Module):
  """torchvision-layout ResNet body (no avgpool / fc); forward returns layer4 output.

  ``width`` is the stem width (64 standard); stage k has planes width * 2**(k-1) and
  outputs 4 * planes channels, so layer4 has 32 * width channels.
  ``dilation=True`` is DC5: layer4 stride 1, dilation 2 (its first block keeps the
  previous dilation 1, torchvision's rule).
  """

  def __init__(self, blocks: Sequence[int] = (3, 4, 6, 3), width: int = 64, dilation: bool = False):
    super().__init__()
    assert len(blocks) == 4
    self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
    self.bn1 = FrozenBatchNorm2d(width)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    self._in_ch = width
    self._dilation = 1
    self.layer1 = self._make_layer(width, blocks[0], stride=1, dilate=False)
    self.layer2 = self._make_layer(width * 2, blocks[1], stride=2, dilate=False)
    self.layer3 = self._make_layer(width * 4, blocks[2], stride=2, dilate=False)
    self.layer4 = self._make_layer(width * 8, blocks[3], stride=2, dilate=dilation)
    self.num_channels = width * 8 * Bottleneck.expansion
    del self._in_ch, self._dilation

  def _make_layer(self, planes: int, n: int, stride: int, dilate: bool) -> nn.Sequential:
    previous_dilation = self._dilation
    if dilate:
      self._dilation *= stride
      stride = 1
    out_ch = planes * Bottleneck.expansion
    downsample = None
    if stride != 1 or self._in_ch != out_ch:
      downsample = nn.Sequential(
        nn.Conv2d(self._in_ch, out_ch, 1, stride=stride, bias=False),
        FrozenBatchNorm2d(out_ch),
      )
    layers = [Bottleneck(self._in_ch, planes, stride, previous_dilation, downsample)]
    self._in_ch = out_ch
    for _ in range(1, n):
      layers.append(Bottleneck(self._in_ch, planes, 1, self._dilation))
    return nn.Sequential(*layers)

  def forward(self, x: Tensor) -> Tensor:
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    x = self.layer1(x)
    x = self.layer2(x)
    x = self.layer3(x)
    return self.layer4(x)


def nearest_mask(mask: Tensor, size) -> Tensor:
  """[B,H,W] bool padding mask -> [B,h,w] bool, nearest (release rule)."""
  return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


class Backbone(nn.Module):
  """Holds ``body`` (keys backbone.0.body.*); returns (layer4 feature, its mask)."""

  def __init__(self, blocks, width, dilation):
    super().__init__()
    self.body = ResNet(blocks, width, dilation)
    self.num_channels = self.body.num_channels

  def forward(self, images: Tensor, mask: Tensor):
    feat = self.body(images)
    return feat, nearest_mask(mask, feat.shape[-2:])


class PositionEmbeddingSine(nn.Module):
  def __init__(
    self,
    num_pos_feats: int = 128,
    temperature: float = 10000.0,
    normalize: bool = True,
    scale: float = 2 * math.pi,
  ):
    super().__init__()
    self.num_pos_feats = num_pos_feats
    self.temperature = temperature
    self.normalize = normalize
    self.scale = scale

  def forward(self, feat: Tensor, mask: Tensor) -> Tensor:
    not_mask = (~mask).to(torch.float32)
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    if self.normalize:
      eps = 1e-6
      y = y / (y[:, -1:, :] + eps) * self.scale
      x = x / (x[:, :, -1:] + eps) * self.scale
    i = torch.arange(self.num_pos_feats, dtype=torch.float32)
    dim_t = self.temperature ** (2 * torch.div(i, 2, rounding_mode='floor') / self.num_pos_feats)
    px = x[:, :, :, None] / dim_t
    py = y[:, :, :, None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
  def __init__(self, num_pos_feats: int = 128, size: int = 50):
    super().__init__()
    self.row_embed = nn.Embedding(size, num_pos_feats)
    self.col_embed = nn.Embedding(size, num_pos_feats)

  def forward(self, feat: Tensor, mask: Tensor) -> Tensor:
    h, w = feat.shape[-2:]
    x_emb = self.col_embed(torch.arange(w))  # [w, F]
    y_emb = self.row_embed(torch.arange(h))  # [h, F]
    pos = torch.cat([x_emb[None].expand(h, w, -1), y_emb[:, None].expand(h, w, -1)], dim=-1)
    return pos.permute(2, 0, 1)[None].expand(feat.shape[0], -1, -1, -1).contiguous()


class Joiner(nn.Sequential):
  """backbone.0 = Backbone, backbone.1 = position embedding."""

  def __init__(self, backbone: Backbone, position: nn.Module):
    super().__init__(backbone, position)
    self.num_channels = backbone.num_channels

  def forward(self, images: Tensor, mask: Tensor):
    feat, fmask = self[0](images, mask)
    pos = self[1](feat, fmask).to(feat.dtype)
    return feat, fmask, pos


# ----------------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------------
def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
  return x if pos is None else x + pos


class TransformerEncoderLayer(nn.Module):
  def __init__(self, d_model, nhead, dim_feedforward, dropout, normalize_before):
    super().__init__()
    self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
    self.linear1 = nn.Linear(d_model, dim_feedforward)
    self.dropout = nn.Dropout(dropout)
    self.linear2 = nn.Linear(dim_feedforward, d_model)
    self.norm1 = nn.LayerNorm(d_model, eps=1e-5)
    self.norm2 = nn.LayerNorm(d_model, eps=1e-5)
    self.dropout1 = nn.Dropout(dropout)
    self.dropout2 = nn.Dropout(dropout)
    self.normalize_before = normalize_before

  def _ffn(self, x):
    return self.linear2(self.dropout(F.relu(self.linear1(x))))

  def forward(self, src, key_padding_mask=None, pos=None):
    if self.normalize_before:
      s = self.norm1(src)
      q = k = _with_pos(s, pos)
      src = src + self.dropout1(
        self.self_attn(q, k, s, key_padding_mask=key_padding_mask, need_weights=False)[0]
      )
      s = self.norm2(src)
      return src + self.dropout2(self._ffn(s))
    q = k = _with_pos(src, pos)
    src = self.norm1(
      src
      + self.dropout1(
        self.self_attn(q, k, src, key_padding_mask=key_padding_mask, need_weights=False)[0]
      )
    )
    return self.norm2(src + self.dropout2(self._ffn(src)))


class TransformerDecoderLayer(nn.Module):
  def __init__(self, d_model, nhead, dim_feedforward, dropout, normalize_before):
    super().__init__()
    self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
    self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
    self.linear1 = nn.Linear(d_model, dim_feedforward)
    self.dropout = nn.Dropout(dropout)
    self.linear2 = nn.Linear(dim_feedforward, d_model)
    self.norm1 = nn.LayerNorm(d_model, eps=1e-5)
    self.norm2 = nn.LayerNorm(d_model, eps=1e-5)
    self.norm3 = nn.LayerNorm(d_model, eps=1e-5)
    self.dropout1 = nn.Dropout(dropout)
    self.dropout2 = nn.Dropout(dropout)
    self.dropout3 = nn.Dropout(dropout)
    self.normalize_before = normalize_before

  def _ffn(self, x):
    return self.linear2(self.dropout(F.relu(self.linear1(x))))

  def forward(
    self, tgt, memory, tgt_mask=None, memory_key_padding_mask=None, pos=None, query_pos=None
  ):
    if self.normalize_before:
      t = self.norm1(tgt)
      q = k = _with_pos(t, query_pos)
      tgt = tgt + self.dropout1(self.self_attn(q, k, t, attn_mask=tgt_mask, need_weights=False)[0])
      t = self.norm2(tgt)
      tgt = tgt + self.dropout2(
        self.multihead_attn(
          _with_pos(t, query_pos),
          _with_pos(memory, pos),
          memory,
          key_padding_mask=memory_key_padding_mask,
          need_weights=False,
        )[0]
      )
      t = self.norm3(tgt)
      return tgt + self.dropout3(self._ffn(t))
    q = k = _with_pos(tgt, query_pos)
    tgt = self.norm1(
      tgt + self.dropout1(self.self_attn(q, k, tgt, attn_mask=tgt_mask, need_weights=False)[0])
    )
    tgt = self.norm2(
      tgt
      + self.dropout2(
        self.multihead_attn(
          _with_pos(tgt, query_pos),
          _with_pos(memory, pos),
          memory,
          key_padding_mask=memory_key_padding_mask,
          need_weights=False,
        )[0]
      )
    )
    return self.norm3(tgt + self.dropout3(self._ffn(tgt)))


class TransformerEncoder(nn.Module):
  def __init__(self, layer_fn, num_layers, norm: Optional[nn.Module]):
    super().__init__()
    self.layers = nn.ModuleList([layer_fn() for _ in range(num_layers)])
    self.norm = norm  # only registered (keys transformer.encoder.norm.*) when pre-norm

  def forward(self, src, key_padding_mask=None, pos=None):
    for layer in self.layers:
      src = layer(src, key_padding_mask=key_padding_mask, pos=pos)
    return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
  def __init__(self, layer_fn, num_layers, norm: nn.Module):
    super().__init__()
    self.layers = nn.ModuleList([layer_fn() for _ in range(num_layers)])
    self.norm = norm

  def forward(
    self, tgt, memory, tgt_mask=None, memory_key_padding_mask=None, pos=None, query_pos=None
  ):
    outs = []
    for layer in self.layers:
      tgt = layer(
        tgt,
        memory,
        tgt_mask=tgt_mask,
        memory_key_padding_mask=memory_key_padding_mask,
        pos=pos,
        query_pos=query_pos,
      )
      outs.append(self.norm(tgt))
    return torch.stack(outs)  # [L, N, B, d]


class Transformer(nn.Module):
  def __init__(
    self,
    d_model=256,
    nhead=8,
    num_encoder_layers=6,
    num_decoder_layers=6,
    dim_feedforward=2048,
    dropout=0.1,
    normalize_before=False,
  ):
    super().__init__()
    enc = lambda: TransformerEncoderLayer(
      d_model, nhead, dim_feedforward, dropout, normalize_before
    )
    dec = lambda: TransformerDecoderLayer(
      d_model, nhead, dim_feedforward, dropout, normalize_before
    )
    self.encoder = TransformerEncoder(
      enc, num_encoder_layers, nn.LayerNorm(d_model) if normalize_before else None
    )
    self.decoder = TransformerDecoder(dec, num_decoder_layers, nn.LayerNorm(d_model))
    self.d_model = d_model
    self.nhead = nhead

  def forward(self, src, mask, query_embed, pos_embed, tgt_mask=None):
    """src [B,d,h,w], mask [B,h,w] bool, query_embed [N,d] or [N,B,d], pos [B,d,h,w].

    Returns (hs [L,B,N,d], memory [B,d,h,w]).
    """
    bs, c, h, w = src.shape
    src = src.flatten(2).permute(2, 0, 1)
    pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
    if query_embed.dim() == 2:
      query_embed = query_embed[:, None].repeat(1, bs, 1)
    mask = mask.flatten(1)
    tgt = torch.zeros_like(query_embed)
    memory = self.encoder(src, key_padding_mask=mask, pos=pos_embed)
    hs = self.decoder(
      tgt,
      memory,
      tgt_mask=tgt_mask,
      memory_key_padding_mask=mask,
      pos=pos_embed,
      query_pos=query_embed,
    )
    return hs.transpose(1, 2), memory.permute(1, 2, 0).reshape(bs, c, h, w)


# ----------------------------------------------------------------------------------
# Detectors
# ----------------------------------------------------------------------------------
class MLP(nn.Module):
  """Linear layers ``layers.{i}`` with ReLU between (none after the last)."""

  def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
    super().__init__()
    dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
    dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
    self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims_in, dims_out))

  def forward(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = F.relu(x)
    return x


class DETR(nn.Module):
  def __init__(
    self,
    backbone: Joiner,
    transformer: Transformer,
    num_classes: int,
    num_queries: int,
    aux_loss: bool = True,
  ):
    super().__init__()
    d = transformer.d_model
    self.num_queries = num_queries
    self.transformer = transformer
    self.class_embed = nn.Linear(d, num_classes + 1)
    self.bbox_embed = MLP(d, d, 4, 3)
    self.query_embed = nn.Embedding(num_queries, d)
    self.input_proj = nn.Conv2d(backbone.num_channels, d, kernel_size=1)
    self.backbone = backbone
    self.aux_loss = aux_loss

  def _features(self, images, mask):
    feat, fmask, pos = self.backbone(images, mask)
    return feat, fmask, pos, self.input_proj(feat)

  def _heads(self, hs):
    return self.class_embed(hs), self.bbox_embed(hs).sigmoid()

  def forward(self, images: Tensor, mask: Tensor, return_internals: bool = False):
    """images [B,3,H,W] float32 (normalised), mask [B,H,W] bool (True = padding)."""
    feat, fmask, pos, src = self._features(images, mask)
    hs, memory = self.transformer(src, fmask, self.query_embed.weight, pos)
    logits, boxes = self._heads(hs)
    out = {'pred_logits': logits[-1], 'pred_boxes': boxes[-1]}
    if self.aux_loss:
      out['aux_outputs'] = [
        {'pred_logits': a, 'pred_boxes': b} for a, b in zip(logits[:-1], boxes[:-1])
      ]
    if return_internals:
      out['internals'] = dict(feature=feat, mask=fmask, pos=pos, src=src, memory=memory, hs=hs)
    return out


def group_attn_mask(num_queries: int, num_patches: int, num_used: Optional[int] = None) -> Tensor:
  """Float [n, n] additive mask: 0 where queries i, j are in the same group of
  num_queries // num_patches consecutive queries, -inf elsewhere.

  ``num_used`` (default num_queries) is the number of queries kept (K * N / M).
  Correct for any M dividing N (M = 1 gives all zeros, i.e. no masking).
  """
  if num_queries % num_patches:
    raise ValueError(f'num_patches={num_patches} must divide num_queries={num_queries}')
  n = num_queries if num_used is None else num_used
  group = torch.arange(n) // (num_queries // num_patches)
  same = group[:, None] == group[None, :]
  return torch.zeros(n, n).masked_fill(~same, float('-inf'))


class UPDETR(DETR):
  """UP-DETR pre-training model (random query patch detection)."""

  def __init__(
    self,
    backbone,
    transformer,
    num_classes,
    num_queries,
    aux_loss=True,
    num_patches=10,
    keep_prob=0.9,
  ):
    super().__init__(backbone, transformer, num_classes, num_queries, aux_loss)
    if num_queries % num_patches:
      raise ValueError('num_patches must divide num_queries')
    d = transformer.d_model
    c5 = backbone.num_channels
    self.num_patches = num_patches
    self.keep_prob = keep_prob
    self.patch2query = nn.Linear(c5, d)
    self.feature_align = MLP(d, d, c5, 2)

  def forward(self, images: Tensor, mask: Tensor, patches: Tensor, return_internals: bool = False):
    """patches [B,K,3,ph,pw] (K <= num_patches). Uses the first K*N/M queries."""
    bs, k = patches.shape[:2]
    if k > self.num_patches:
      raise ValueError(f'got {k} patches > num_patches={self.num_patches}')
    per = self.num_queries // self.num_patches
    n_used = k * per

    feat, fmask, pos, src = self._features(images, mask)

    # patches through the same backbone body, no mask; GAP over layer4
    pfeat = self.backbone[0].body(patches.flatten(0, 1))
    gt_feature = pfeat.mean(dim=(2, 3)).view(bs, k, -1)  # [B,K,C5], no detach (release)
    pq = self.patch2query(gt_feature)  # [B,K,d]
    pq = pq.repeat_interleave(per, dim=1).permute(1, 0, 2)  # [N',B,d]
    if self.training:
      keep = torch.bernoulli(
        torch.full((n_used, bs, 1), self.keep_prob, dtype=pq.dtype, device=pq.device)
      )
      pq = pq * keep
    query_pos = pq + self.query_embed.weight[:n_used, None, :]

    tgt_mask = None
    if self.num_patches > 1:
      tgt_mask = group_attn_mask(self.num_queries, self.num_patches, n_used).to(src)

    hs, memory = self.transformer(src, fmask, query_pos, pos, tgt_mask=tgt_mask)
    logits, boxes = self._heads(hs)
    feats = self.feature_align(hs)  # [L,B,N',C5]
    out = {
      'pred_logits': logits[-1],
      'pred_boxes': boxes[-1],
      'pred_feature': feats[-1],
      'gt_feature': gt_feature,
    }
    if self.aux_loss:
      out['aux_outputs'] = [
        {'pred_logits': a, 'pred_boxes': b, 'pred_feature': f, 'gt_feature': gt_feature}
        for a, b, f in zip(logits[:-1], boxes[:-1], feats[:-1])
      ]
    if return_internals:
      out['internals'] = dict(
        feature=feat,
        mask=fmask,
        pos=pos,
        src=src,
        memory=memory,
        hs=hs,
        query_pos=query_pos,
        tgt_mask=tgt_mask,
      )
    return out


# ----------------------------------------------------------------------------------
# Builders and random init
# ----------------------------------------------------------------------------------
def _build_parts(
  blocks,
  width,
  dilation,
  position_embedding,
  hidden_dim,
  nheads,
  enc_layers,
  dec_layers,
  dim_feedforward,
  dropout,
  pre_norm,
):
  if hidden_dim % 2:
    raise ValueError('hidden_dim must be even')
  if position_embedding in ('sine', 'v2'):
    position = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
  elif position_embedding in ('learned', 'v3'):
    position = PositionEmbeddingLearned(hidden_dim // 2)
  else:
    raise ValueError(f'unknown position_embedding {position_embedding!r}')
  backbone = Joiner(Backbone(list(blocks), width, dilation), position)
  transformer = Transformer(
    hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward, dropout, pre_norm
  )
  return backbone, transformer


def build_detr(
  blocks=(3, 4, 6, 3),
  width=64,
  dilation=False,
  position_embedding='sine',
  hidden_dim=256,
  nheads=8,
  enc_layers=6,
  dec_layers=6,
  dim_feedforward=2048,
  dropout=0.1,
  num_queries=100,
  pre_norm=False,
  num_classes=91,
  aux_loss=True,
) -> DETR:
  backbone, transformer = _build_parts(
    blocks,
    width,
    dilation,
    position_embedding,
    hidden_dim,
    nheads,
    enc_layers,
    dec_layers,
    dim_feedforward,
    dropout,
    pre_norm,
  )
  return DETR(backbone, transformer, num_classes, num_queries, aux_loss).float()


def build_updetr(
  blocks=(3, 4, 6, 3),
  width=64,
  dilation=False,
  position_embedding='sine',
  hidden_dim=256,
  nheads=8,
  enc_layers=6,
  dec_layers=6,
  dim_feedforward=2048,
  dropout=0.1,
  num_queries=100,
  pre_norm=True,
  num_classes=2,
  aux_loss=True,
  num_patches=10,
) -> UPDETR:
  backbone, transformer = _build_parts(
    blocks,
    width,
    dilation,
    position_embedding,
    hidden_dim,
    nheads,
    enc_layers,
    dec_layers,
    dim_feedforward,
    dropout,
    pre_norm,
  )
  return UPDETR(backbone, transformer, num_classes, num_queries, aux_loss, num_patches).float()


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
  """Fill every parameter and buffer with seeded random values of sensible scale.

  - conv / linear / attention weights: N(0, std) with std = 1/sqrt(fan_in)
    (sqrt(2/fan_in) for backbone convs, which feed ReLUs); biases N(0, 0.1^2).
  - FrozenBatchNorm2d: running_var U(0.5, 1.5), running_mean N(0, 0.1^2),
    bias N(0, 0.1^2), weight U(0.5, 1.5) except bn3 of every bottleneck, U(0.1, 0.3),
    so the residual stream stays O(1) at R50 / R101 depth.
  - LayerNorm: weight U(0.5, 1.5), bias N(0, 0.1^2).
  - Embeddings (query_embed, row/col_embed): N(0, 1).
  Deterministic: a private torch.Generator seeded with ``seed``, modules visited in
  registration order.
  """
  g = torch.Generator().manual_seed(int(seed))

  def normal_(t, std):
    t.copy_(torch.randn(t.shape, generator=g) * std)

  def uniform_(t, lo, hi):
    t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

  for mname, m in model.named_modules():
    local = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
    if not local:
      continue
    if isinstance(m, FrozenBatchNorm2d):
      last_bn = mname.endswith('bn3')
      uniform_(m.weight, 0.1 if last_bn else 0.5, 0.3 if last_bn else 1.5)
      normal_(m.bias, 0.1)
      normal_(m.running_mean, 0.1)
      uniform_(m.running_var, 0.5, 1.5)
    elif isinstance(m, nn.LayerNorm):
      uniform_(m.weight, 0.5, 1.5)
      normal_(m.bias, 0.1)
    elif isinstance(m, nn.Embedding):
      normal_(m.weight, 1.0)
    else:
      gain = 2.0 if isinstance(m, nn.Conv2d) and '.body' in f'.{mname}' else 1.0
      for name, t in local:
        if t.dim() >= 2:
          fan_in = t[0].numel()
          normal_(t, math.sqrt(gain / fan_in))
        else:
          normal_(t, 0.1)
  return model
