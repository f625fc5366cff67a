r"""DETR fine-tuning on PASCAL VOC (train 07+12 trainval, test 07 test), 20 classes.

Variants: default ``150ep`` (lr drop at 100), ``300ep`` (drop at 200). The
fine-tuning loop itself is not in this release yet (see README).
"""
import ml_collections

from configs import common
from configs.finetune_coco import finetune_optim


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or '150ep'
  schedules = {'300ep': (300, 200), '150ep': (150, 100)}
  if variant not in schedules:
    raise ValueError(f'configs/finetune_voc.py: unknown variant {variant!r} '
                     f'(choose one of {sorted(schedules)})')
  epochs, drop = schedules[variant]
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = common.detr_model(num_classes=20)
  config.matcher = common.matcher()
  config.loss = ml_collections.ConfigDict(dict(
      eos_coef=0.1, weight_ce=1.0, weight_bbox=5.0, weight_giou=2.0))
  config.batch_size = 16
  config.loss_replicas = 8
  config.num_epochs = epochs
  config.examples_per_epoch = 16551  # VOC 2007 + 2012 trainval
  config.optim = finetune_optim((drop,))
  return config
