r"""DETR fine-tuning on COCO 2017 (from scratch or from an UP-DETR checkpoint).

  python -m updetr_jax.main --config=configs/finetune_coco.py --workdir=/tmp/detr_coco
"""
import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  config.model = common.detr_model()
  config.matcher = common.matcher()
  config.loss = ml_collections.ConfigDict(dict(
      eos_coef=0.1, weight_ce=1.0, weight_bbox=5.0, weight_giou=2.0))
  return config
