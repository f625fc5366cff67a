"""Pieces shared by the config files."""

import ml_collections

from updetr_jax.models import fields


def detr_model(**overrides) -> ml_collections.ConfigDict:
  """DETR R50 as released (field names = the release's arguments), with overrides.

  The fields, their defaults and meanings are ``updetr_jax.models.fields.DETR_FIELDS``.
  """
  m = ml_collections.ConfigDict({name: f.default for name, f in fields.DETR_FIELDS.items()})
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
