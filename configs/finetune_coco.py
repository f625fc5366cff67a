r"""DETR fine-tuning on COCO 2017 (from scratch or from an UP-DETR checkpoint).

  python -m updetr_jax.main --config=configs/finetune_coco.py --workdir=/tmp/detr_coco
"""
import ml_collections


def model_config(**overrides) -> ml_collections.ConfigDict:
  """DETR R50 as released (post-norm, 91 classes -> 92 logits)."""
  m = ml_collections.ConfigDict(dict(
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
      num_classes=91,
      aux_loss=True,
      dtype='float32',
  ))
  m.update(overrides)
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  config.model = model_config()
  config.matcher = ml_collections.ConfigDict(dict(
      solver='exact', cost_class=1.0, cost_bbox=5.0, cost_giou=2.0))
  config.loss = ml_collections.ConfigDict(dict(
      eos_coef=0.1, weight_ce=1.0, weight_bbox=5.0, weight_giou=2.0))
  return config
