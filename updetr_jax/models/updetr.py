"""UP-DETR pre-training model: random query patch detection (Dai et al. 2021)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from updetr_jax.models import fields
from updetr_jax.models.detr import DETR
from updetr_jax.models.layers import MLP, linear
from updetr_jax.models.resnet import FrozenBatchNorm

_D = fields.DEFAULTS


def group_attention_mask(num_queries: int, num_patches: int) -> np.ndarray | None:
  """Decoder self-attention mask for ``num_patches`` groups of consecutive queries.

  Returns bool [N, N], True inside each group's diagonal block (may attend), or
  None for a single group (M = 1). Correct for any M dividing N.
  """
  if num_queries % num_patches:
    raise ValueError(
      f'model.num_queries={num_queries} must be divisible by model.num_patches={num_patches}'
    )
  if num_patches == 1:
    return None
  group = np.arange(num_queries) // (num_queries // num_patches)
  return group[:, None] == group[None, :]


class UPDETR(DETR):
  """DETR plus query patches: patch features are added to groups of object queries.

  Call: images [B, H, W, 3], padding_mask [B, H, W], patches [B, K, h, w, 3] with
  K <= num_patches (K patches use the first K * N / M queries). Returns DETR's dict
  (with N' = K * N / M queries) plus pred_feature [B, N', C5] (also in each aux
  dict; not with ``feature_head=False``) and gt_feature [B, K, C5] (global-average-
  pooled backbone features of the patches). One-shot detection is K = M = 1: the
  query crop's feature is added to all N queries, no attention mask.
  As in the release, gt_feature keeps its gradient: with the CNN frozen (the default)
  nothing flows into it, since frozen weights are not differentiated; with a trainable
  CNN the feature-reconstruction loss also trains the CNN through it (the paper's
  ablation "feature reconstruction without frozen CNN").
  """

  # The release's M (configs/pretrain.py); built directly, UP-DETR needs M > 0, so not
  # fields' default 0 (which build_model reads as DETR).
  num_patches: int = 10
  # Per-query probability of dropping the patch feature.
  patch_query_drop: float = _D['patch_query_drop']
  # feature_align (pred_feature), the pre-training's feature reconstruction head; the
  # one-shot detector (tasks/oneshot.py) has none.
  feature_head: bool = _D['feature_head']
  # Not in the release (defaults off). patch_feature_norm: standardise each channel of
  # the pooled patch features before patch2query, with frozen statistics of the
  # training patches (batch_stats 'patch_norm', set by ``tasks.pretrain.calibrate_
  # patch_norm``); gt_feature, the reconstruction target, stays raw.
  # query_shuffle: the release's --query_shuffle (training only: the query embeddings
  # are taken in a random permutation of the N indices before the patch features are
  # added; the groups and the mask stay fixed).
  # patch_content: the patch queries also start the decoder's content stream (tgt,
  # zeros in the release), so every decoder layer's values and the heads see the
  # patch itself, not only where its query attended.
  patch_feature_norm: bool = _D['patch_feature_norm']
  query_shuffle: bool = _D['query_shuffle']
  patch_content: bool = _D['patch_content']

  def setup(self):
    super().setup()
    c5 = self.body.num_channels
    self.patch2query = linear(self.hidden_dim, c5, name=None)
    if self.patch_feature_norm:
      self.patch_norm = FrozenBatchNorm()
    if self.feature_head:
      self.feature_align = MLP(self.hidden_dim, c5, 2)

  def patch_features(self, patches):
    """patches [B, K, h, w, 3] -> pooled backbone features [B, K, C5] (float32)."""
    b, k = patches.shape[:2]
    feat = self.body(patches.reshape((b * k,) + patches.shape[2:]))
    return jnp.mean(feat.astype(jnp.float32), axis=(1, 2)).reshape(b, k, -1)

  def __call__(self, images, padding_mask, patches=None, train: bool = False):
    if patches is None or patches.ndim != 5 or patches.shape[-1] != 3:
      raise ValueError(
        'UP-DETR needs patches of shape [B, K, h, w, 3], got '
        f'{None if patches is None else patches.shape}'
      )
    b, k = patches.shape[:2]
    if b != images.shape[0] or not 1 <= k <= self.num_patches:
      raise ValueError(
        f'patches {patches.shape}: need batch {images.shape[0]} and '
        f'1 <= K <= model.num_patches={self.num_patches}'
      )
    group_size = self.num_queries // self.num_patches
    n = k * group_size
    self_mask = group_attention_mask(n, k)

    src, padding, pos = self.encode_image(images, padding_mask)
    feat = self.patch_features(patches)
    query_in = self.patch_norm(feat) if self.patch_feature_norm else feat
    patch_query = jnp.repeat(self.patch2query(query_in), group_size, axis=1)  # [B, N', d]
    if train and self.patch_query_drop > 0:
      keep = jax.random.bernoulli(self.make_rng('dropout'), 1.0 - self.patch_query_drop, (b, n, 1))
      patch_query = patch_query * keep
    embed = self.query_embed.embedding
    if train and self.query_shuffle:
      embed = embed[jax.random.permutation(self.make_rng('dropout'), self.num_queries)]
    query_pos = (patch_query + embed[None, :n]).astype(self.dtype)
    tgt = patch_query.astype(self.dtype) if self.patch_content else None
    hs, _ = self.transformer(src, padding, pos, query_pos, self_mask, train, tgt)
    per_layer = self.predict_heads(hs)
    if self.feature_head:
      per_layer['pred_feature'] = self.feature_align(hs.astype(jnp.float32))
    out = self.format_outputs(per_layer)
    out['gt_feature'] = feat
    return out
