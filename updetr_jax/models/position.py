"""2-D position encodings for the C5 feature map (DETR's sine and learned variants)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp


class PositionEmbeddingSine(nn.Module):
  """Sine encoding of the normalised cumulative (unpadded) pixel coordinates.

  Call: mask bool [B, h, w] (True on padding). Returns [B, h, w, 2 * num_pos_feats]
  with channels (pos_y, pos_x), each interleaving sin (even) and cos (odd).
  """

  num_pos_feats: int = 128
  temperature: float = 10000.0
  scale: float = 2 * math.pi
  eps: float = 1e-6

  def __call__(self, mask):
    not_mask = (~mask).astype(jnp.float32)
    y = jnp.cumsum(not_mask, axis=1)
    x = jnp.cumsum(not_mask, axis=2)
    y = y / (y[:, -1:, :] + self.eps) * self.scale
    x = x / (x[:, :, -1:] + self.eps) * self.scale
    i = jnp.arange(self.num_pos_feats, dtype=jnp.float32)
    dim_t = self.temperature ** (2 * jnp.floor(i / 2) / self.num_pos_feats)

    def encode(c):
      p = c[..., None] / dim_t  # [B, h, w, F]
      out = jnp.stack([jnp.sin(p[..., 0::2]), jnp.cos(p[..., 1::2])], axis=-1)
      return out.reshape(p.shape)

    return jnp.concatenate([encode(y), encode(x)], axis=-1)


class PositionEmbeddingLearned(nn.Module):
  """Learned row/column tables (50 entries each); channels (pos_x, pos_y).

  Call: mask bool [B, h, w] (only its shape is used). Returns [B, h, w, 2 * num_pos_feats].
  """

  num_pos_feats: int = 128
  max_len: int = 50

  @nn.compact
  def __call__(self, mask):
    b, h, w = mask.shape
    if h > self.max_len or w > self.max_len:
      raise ValueError(
        f'learned position embedding supports feature maps up to '
        f'{self.max_len}x{self.max_len}, got {h}x{w}'
      )
    init = nn.initializers.uniform(1.0)  # torch nn.init.uniform_: U[0, 1)
    row = self.param('row_embed', init, (self.max_len, self.num_pos_feats))
    col = self.param('col_embed', init, (self.max_len, self.num_pos_feats))
    x = jnp.broadcast_to(col[None, :w], (h, w, self.num_pos_feats))
    y = jnp.broadcast_to(row[:h, None], (h, w, self.num_pos_feats))
    pos = jnp.concatenate([x, y], axis=-1)
    return jnp.broadcast_to(pos[None], (b, h, w, 2 * self.num_pos_feats))


def build_position_encoding(kind: str, hidden_dim: int) -> nn.Module:
  if kind in ('sine', 'v2'):
    return PositionEmbeddingSine(hidden_dim // 2)
  if kind in ('learned', 'v3'):
    return PositionEmbeddingLearned(hidden_dim // 2)
  raise ValueError(f"model.position_embedding={kind!r}: expected 'sine' or 'learned'")
