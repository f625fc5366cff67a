"""DETR's encoder-decoder transformer (post-norm and pre-norm), batch-first.

Positions enter queries and keys only, never values (as released); the option
``value_pos`` (not in the release) also adds them to the values of the decoder's
cross-attention, so a query's output says *where* it attended, not only what it saw
there (measured in docs/results/pretext_learnability.md). Parameter names follow the
release (``self_attn``, ``multihead_attn``, ``linear1``, ``norm1``, ...); the packed
PyTorch ``in_proj_weight`` is split into ``q_proj``/``k_proj``/``v_proj``.

Mixed precision: with ``dtype=bfloat16`` the projections, the FFN and the
residual stream run in bfloat16; parameters stay float32. Attention logits and
softmax are float32 (the q.k product accumulates into float32), LayerNorm
statistics are float32 (flax promotes them), and the decoder's shared final norm
emits float32 for the heads. ``remat=True`` recomputes each layer's activations
in the backward pass (``nn.remat``) without changing the parameter names.

Attention implementation (``attention``, ``fields.ATTENTION_CHOICES``; same parameters
and names whichever is chosen, so checkpoints load either way):

  'einsum'       the default: two einsums and a softmax, written out. Exact release
                 semantics, dropout on the attention probabilities included.
  'dot_product'  ``jax.nn.dot_product_attention`` with ``implementation='xla'``.
  'cudnn'        ``jax.nn.dot_product_attention`` with ``implementation='cudnn'``:
                 cuDNN's fused (flash) attention kernel. GPU only, bfloat16/float16
                 inputs only (``model.dtype='bfloat16'``); JAX raises otherwise.

The two fused choices apply NO dropout to the attention probabilities (the JAX API
has none): with ``dropout > 0`` in training they differ from the release by that
one term, while the residual and feed-forward dropouts stay as they are. With
dropout off they compute the same function as 'einsum' (float32: to ~1e-6).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from updetr_jax.models import fields
from updetr_jax.models.layers import _uniform_bias, layer_norm

# DETR applies xavier_uniform_ to every matrix of the transformer. For the packed
# q/k/v in-projection torch sees one [3d, d] matrix: bound sqrt(6 / (d + 3d)), which
# for our [d, d] slices is variance_scaling(0.5, fan_avg).
_XAVIER = nn.initializers.xavier_uniform()
_XAVIER_PACKED_QKV = nn.initializers.variance_scaling(0.5, 'fan_avg', 'uniform')


def fused_attention(q, k, v, mask, implementation: str):
  """softmax(q.k) v by ``jax.nn.dot_product_attention``; no probability dropout.

  Args:
    q: [B, Lq, h, dh], already scaled by dh ** -0.5 (as the einsum path does).
    k, v: [B, Lk, h, dh], the same dtype as q.
    mask: bool broadcastable to [B, h, Lq, Lk] (True = may attend), or None.
    implementation: 'xla' or 'cudnn'.

  Returns:
    [B, Lq, h, dh] in q's dtype. Logits and softmax are float32 in both
    implementations, as in the einsum path.
  """
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if implementation == 'cudnn':
      # cuDNN takes the mask as a bias whose last two dimensions must be [Lq, Lk].
      mask = jnp.broadcast_to(mask, mask.shape[:2] + (q.shape[1], k.shape[1]))
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0, implementation=implementation)


class MultiHeadAttention(nn.Module):
  """torch.nn.MultiheadAttention semantics.

  Call: query [B, Lq, d], key [B, Lk, d], value [B, Lk, d],
  mask bool broadcastable to [B, heads, Lq, Lk] (True = may attend).
  Returns [B, Lq, d]. ``attention``: one of fields.ATTENTION_CHOICES (the fused ones
  skip the dropout on attention probabilities; see the module docstring).
  """

  d_model: int
  num_heads: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32
  attention: str = 'einsum'

  @nn.compact
  def __call__(self, query, key, value, mask=None, train: bool = False):
    d, h = self.d_model, self.num_heads
    if d % h:
      raise ValueError(f'model.hidden_dim={d} is not divisible by model.nheads={h}')
    dh = d // h

    def proj(x, name, init):
      y = nn.Dense(
        d, kernel_init=init, bias_init=nn.initializers.zeros, name=name, dtype=self.dtype
      )(x)
      return y.reshape(y.shape[:-1] + (h, dh))

    q = proj(query, 'q_proj', _XAVIER_PACKED_QKV) * (dh**-0.5)
    k = proj(key, 'k_proj', _XAVIER_PACKED_QKV)
    v = proj(value, 'v_proj', _XAVIER_PACKED_QKV)
    if self.attention == 'einsum':
      # Accumulate (and keep) the logits in float32 even when q, k are bfloat16.
      logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
      if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
      probs = nn.softmax(logits, axis=-1)
      probs = nn.Dropout(self.dropout)(probs, deterministic=not train).astype(v.dtype)
      out = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    else:
      # Checked here too: this module may be built without build_model.
      fields.check('attention', self.attention)
      out = fused_attention(q, k, v, mask, 'cudnn' if self.attention == 'cudnn' else 'xla')
    out = out.reshape(query.shape[:-1] + (d,))
    return nn.Dense(
      d, kernel_init=_XAVIER, bias_init=nn.initializers.zeros, name='out_proj', dtype=self.dtype
    )(out)


class EncoderLayer(nn.Module):
  """Self-attention + FFN. Call: src [B, S, d], pos [B, S, d], mask [B, 1, 1, S]."""

  d_model: int
  nheads: int
  dim_feedforward: int
  dropout: float
  pre_norm: bool
  dtype: jnp.dtype = jnp.float32
  attention: str = 'einsum'

  def _attention(self, name):
    return MultiHeadAttention(
      self.d_model, self.nheads, self.dropout, self.dtype, self.attention, name=name
    )

  def _drop(self, x, train):
    return nn.Dropout(self.dropout)(x, deterministic=not train)

  def _ffn(self, x, train):
    """linear2(dropout(relu(linear1(x))))."""
    dense = lambda n, fan_in, name: nn.Dense(  # noqa: E731
      n, kernel_init=_XAVIER, bias_init=_uniform_bias(fan_in), name=name, dtype=self.dtype
    )
    x = nn.relu(dense(self.dim_feedforward, self.d_model, 'linear1')(x))
    return dense(self.d_model, self.dim_feedforward, 'linear2')(self._drop(x, train))

  def _norms(self, n):
    return (layer_norm(name=f'norm{i}', dtype=self.dtype) for i in range(1, n + 1))

  @nn.compact
  def __call__(self, src, pos, mask, train: bool = False):
    attn = self._attention('self_attn')
    drop = lambda x: self._drop(x, train)  # noqa: E731
    norm1, norm2 = self._norms(2)
    if self.pre_norm:
      s = norm1(src)
      src = src + drop(attn(s + pos, s + pos, s, mask, train))
      return src + drop(self._ffn(norm2(src), train))
    src = norm1(src + drop(attn(src + pos, src + pos, src, mask, train)))
    return norm2(src + drop(self._ffn(src, train)))


class DecoderLayer(EncoderLayer):
  """Self-attention (group mask), cross-attention to memory, FFN.

  Call: tgt [B, N, d], memory [B, S, d], pos [B, S, d], query_pos [B, N, d],
  self_mask broadcastable to [B, 1, N, N], memory_mask [B, 1, 1, S].
  """

  value_pos: bool = False  # cross-attention values = memory + pos (not in the release)

  @nn.compact
  def __call__(self, tgt, memory, pos, query_pos, self_mask, memory_mask, train: bool = False):
    self_attn = self._attention('self_attn')
    cross_attn = self._attention('multihead_attn')
    drop = lambda x: self._drop(x, train)  # noqa: E731
    norm1, norm2, norm3 = self._norms(3)
    key = memory + pos
    value = key if self.value_pos else memory
    if self.pre_norm:
      t = norm1(tgt)
      tgt = tgt + drop(self_attn(t + query_pos, t + query_pos, t, self_mask, train))
      t = norm2(tgt)
      tgt = tgt + drop(cross_attn(t + query_pos, key, value, memory_mask, train))
      return tgt + drop(self._ffn(norm3(tgt), train))
    tgt = norm1(tgt + drop(self_attn(tgt + query_pos, tgt + query_pos, tgt, self_mask, train)))
    tgt = norm2(tgt + drop(cross_attn(tgt + query_pos, key, value, memory_mask, train)))
    return norm3(tgt + drop(self._ffn(tgt, train)))


class Encoder(nn.Module):
  """Encoder layers (+ final norm when pre-norm).

  Call: src, pos [B, S, d], mask [B, 1, 1, S]. Returns [B, S, d] (layer dtype).
  """

  layer_kwargs: dict
  num_layers: int
  remat: bool = False

  @nn.compact
  def __call__(self, x, pos, mask, train: bool = False):
    # static_argnums counts self: (self, src, pos, mask, train) -> train is 4.
    layer_cls = nn.remat(EncoderLayer, static_argnums=(4,)) if self.remat else EncoderLayer
    for i in range(self.num_layers):
      x = layer_cls(**self.layer_kwargs, name=f'layers_{i}')(x, pos, mask, train)
    if self.layer_kwargs['pre_norm']:
      x = layer_norm(name='norm', dtype=self.layer_kwargs['dtype'])(x)
    return x


class Decoder(nn.Module):
  """Decoder layers; every layer's output goes through the shared final ``norm``.

  Returns [L, B, N, d] float32 (the norm's output only feeds the float32 heads).
  """

  layer_kwargs: dict
  num_layers: int
  remat: bool = False

  @nn.compact
  def __call__(self, tgt, memory, pos, query_pos, self_mask, memory_mask, train: bool = False):
    # (self, tgt, memory, pos, query_pos, self_mask, memory_mask, train): train is 7.
    layer_cls = nn.remat(DecoderLayer, static_argnums=(7,)) if self.remat else DecoderLayer
    norm = layer_norm(name='norm', dtype=jnp.float32)
    hs = []
    for i in range(self.num_layers):
      tgt = layer_cls(**self.layer_kwargs, name=f'layers_{i}')(
        tgt, memory, pos, query_pos, self_mask, memory_mask, train
      )
      hs.append(norm(tgt))
    return jnp.stack(hs)


class Transformer(nn.Module):
  """DETR transformer. Names: ``encoder/layers_i``, ``encoder/norm``, ``decoder/...``.

  Call:
    src [B, S, d] flattened projected features, padding [B, S] bool (True = padded),
    pos [B, S, d], query_pos [B, N, d], self_mask bool [N, N] or None (True = may attend),
    tgt [B, N, d] the decoder's initial content (None: zeros, as released).
  Returns: hs [L_dec, B, N, d] float32, memory [B, S, d] (``dtype``).
  ``remat``: rematerialise every encoder and decoder layer in the backward pass.
  ``attention``: one of fields.ATTENTION_CHOICES (module docstring). ``value_pos``: the
  decoder's cross-attention values carry the positions too (module docstring).
  """

  d_model: int = 256
  nheads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  dim_feedforward: int = 2048
  dropout: float = 0.1
  pre_norm: bool = False
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  attention: str = 'einsum'
  value_pos: bool = False

  @nn.compact
  def __call__(self, src, padding, pos, query_pos, self_mask=None, train: bool = False, tgt=None):
    kw = dict(
      d_model=self.d_model,
      nheads=self.nheads,
      dim_feedforward=self.dim_feedforward,
      dropout=self.dropout,
      pre_norm=self.pre_norm,
      dtype=self.dtype,
      attention=self.attention,
    )
    memory_mask = (~padding)[:, None, None, :]
    dec_kw = dict(kw, value_pos=self.value_pos)
    memory = Encoder(kw, self.num_encoder_layers, self.remat, name='encoder')(
      src, pos, memory_mask, train
    )
    if self_mask is not None:
      self_mask = self_mask[None, None]
    hs = Decoder(dec_kw, self.num_decoder_layers, self.remat, name='decoder')(
      jnp.zeros_like(query_pos) if tgt is None else tgt.astype(query_pos.dtype),
      memory,
      pos,
      query_pos,
      self_mask,
      memory_mask,
      train,
    )
    return hs, memory
