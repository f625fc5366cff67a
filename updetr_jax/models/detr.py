"""The DETR detector: backbone -> input_proj -> transformer -> class and box heads."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from updetr_jax.models import fields
from updetr_jax.models.layers import MLP, TORCH_KERNEL_INIT, _uniform_bias, linear
from updetr_jax.models.position import build_position_encoding
from updetr_jax.models.resnet import build_resnet, downsample_mask
from updetr_jax.models.transformer import Transformer

_D = fields.DEFAULTS


class DETR(nn.Module):
  """DETR (Carion et al. 2020). Fields use the release's argument names.

  Call: images float [B, H, W, 3] (normalised), padding_mask bool [B, H, W]
  (True on padding). Returns dict:
    pred_logits [B, N, num_classes + 1], pred_boxes [B, N, 4] (cxcywh in [0, 1] of
    the unpadded image), aux_outputs: list of such dicts for the first
    dec_layers - 1 decoder layers (when aux_loss).
  """

  backbone: str = _D['backbone']
  dilation: bool = _D['dilation']
  position_embedding: str = _D['position_embedding']
  hidden_dim: int = _D['hidden_dim']
  nheads: int = _D['nheads']
  enc_layers: int = _D['enc_layers']
  dec_layers: int = _D['dec_layers']
  dim_feedforward: int = _D['dim_feedforward']
  dropout: float = _D['dropout']
  num_queries: int = _D['num_queries']
  pre_norm: bool = _D['pre_norm']
  num_classes: int = _D['num_classes']
  aux_loss: bool = _D['aux_loss']
  dtype: jnp.dtype = jnp.dtype(_D['dtype'])  # activation / matmul dtype; params stay float32
  remat: str = _D['remat']  # one of fields.REMAT_CHOICES
  # One of fields.ATTENTION_CHOICES (models/transformer.py); the fused two apply no
  # dropout to attention probabilities. Same parameters either way.
  attention: str = _D['attention']
  # Not in the release: the decoder's cross-attention values carry the positions
  # (models/transformer.py); same parameters.
  value_pos: bool = _D['value_pos']

  def setup(self):
    # build_model checks every field; a DETR built directly would otherwise take a
    # misspelt remat for none (a bad attention fails in MultiHeadAttention).
    fields.check('remat', self.remat)
    self.body = build_resnet(
      self.backbone, self.dilation, self.dtype, remat=self.remat in ('backbone', 'all')
    )
    self.position = build_position_encoding(self.position_embedding, self.hidden_dim)
    c5 = self.body.num_channels
    self.input_proj = nn.Conv(
      self.hidden_dim,
      (1, 1),
      kernel_init=TORCH_KERNEL_INIT,
      bias_init=_uniform_bias(c5),
      dtype=self.dtype,
    )
    self.query_embed = nn.Embed(
      self.num_queries, self.hidden_dim, embedding_init=nn.initializers.normal(1.0)
    )
    self.transformer = Transformer(
      d_model=self.hidden_dim,
      nheads=self.nheads,
      num_encoder_layers=self.enc_layers,
      num_decoder_layers=self.dec_layers,
      dim_feedforward=self.dim_feedforward,
      dropout=self.dropout,
      pre_norm=self.pre_norm,
      dtype=self.dtype,
      remat=self.remat in ('transformer', 'all'),
      attention=self.attention,
      value_pos=self.value_pos,
    )
    self.class_embed = linear(self.num_classes + 1, self.hidden_dim, name=None)
    self.bbox_embed = MLP(self.hidden_dim, 4, 3)

  def encode_image(self, images, padding_mask):
    """Returns src [B, S, d], padding [B, S] bool, pos [B, S, d] for the C5 map."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be [B, H, W, 3], got shape {images.shape}')
    if padding_mask.shape != images.shape[:3]:
      raise ValueError(
        f'padding_mask must be [B, H, W] = {images.shape[:3]}, got shape {padding_mask.shape}'
      )
    feat = self.body(images)
    return self.encode_features(feat, downsample_mask(padding_mask.astype(bool), feat.shape[1:3]))

  def encode_features(self, feat, mask):
    """C5 features [B, h, w, C5] and their padding mask [B, h, w] -> ``encode_image``'s."""
    b, h, w, _ = feat.shape
    pos = self.position(mask).astype(self.dtype)
    src = self.input_proj(feat)
    d = self.hidden_dim
    return src.reshape(b, h * w, d), mask.reshape(b, h * w), pos.reshape(b, h * w, d)

  def predict_heads(self, hs):
    """hs [L, B, N, d] -> per-layer head outputs, each [L, B, N, ...] (float32)."""
    hs = hs.astype(jnp.float32)
    return {'pred_logits': self.class_embed(hs), 'pred_boxes': jax.nn.sigmoid(self.bbox_embed(hs))}

  def format_outputs(self, per_layer: dict) -> dict:
    """{key: [L, ...]} -> final-layer dict with aux_outputs for the other layers."""
    out = {k: v[-1] for k, v in per_layer.items()}
    if self.aux_loss:
      out['aux_outputs'] = [
        {k: v[i] for k, v in per_layer.items()} for i in range(self.dec_layers - 1)
      ]
    return out

  def __call__(self, images, padding_mask, patches=None, train: bool = False):
    if patches is not None:
      raise ValueError(
        'DETR takes no query patches; build the model with model.num_patches '
        '(UP-DETR) to pass patches'
      )
    src, padding, pos = self.encode_image(images, padding_mask)
    query_pos = jnp.broadcast_to(
      self.query_embed.embedding[None].astype(self.dtype),
      (src.shape[0], self.num_queries, self.hidden_dim),
    )
    hs, _ = self.transformer(src, padding, pos, query_pos, None, train)
    return self.format_outputs(self.predict_heads(hs))
