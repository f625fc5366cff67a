"""Pieces shared by the config files."""

import ml_collections


def detr_model(**overrides) -> ml_collections.ConfigDict:
  """DETR R50 as released (field names = the release's arguments), with overrides."""
  m = ml_collections.ConfigDict(
    dict(
      backbone='resnet50',
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
      num_classes=91,  # COCO category ids up to 90 -> 92 logits with "no object"
      aux_loss=True,
      dtype='float32',  # 'bfloat16': bf16 activations/matmuls, float32 params and losses
      remat='',  # '' | 'transformer' | 'backbone' | 'all': recompute in the backward pass
      # 'einsum' (the release's attention, with dropout on the probabilities) |
      # 'dot_product' (jax.nn.dot_product_attention, XLA) | 'cudnn' (its fused kernel);
      # the last two skip attention-probability dropout (models/transformer.py)
      attention='einsum',
      # Not in the release: positions in the decoder cross-attention's values too
      # (models/transformer.py; same parameters, so keep it as pre-trained).
      value_pos=False,
    )
  )
  m.update(overrides)
  return m


def matcher() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(solver='exact', cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)
  )


# The small model of the CPU demos (minutes): the pre-training demo and the
# pre-training vs scratch comparison (configs/compare.py) use it; an architecture
# mismatch would refuse a pre-trained init. DC5 (stride 16) gives 128-px images an
# 8x10 map. The pre-training demo's CNN is random and frozen (no download);
# configs/compare.py trains it self-supervised first (stage 0).
DEMO_ARCHITECTURE = dict(
  backbone='resnet_small',
  dilation=True,
  hidden_dim=64,
  nheads=4,
  enc_layers=2,
  dec_layers=2,
  dim_feedforward=128,
  dropout=0.0,
  num_queries=20,
  pre_norm=True,
)
