r"""DETR fine-tuning on PASCAL VOC (train 07+12 trainval, test 07 test), 20 classes.

Variants: default ``150ep`` (lr drop at 100), ``300ep`` (drop at 200). The
fine-tuning loop itself is not in this release yet (see README).
"""
import ml_collections

from configs.finetune_coco import finetune_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  # 20 classes; VOC 2007 + 2012 trainval images.
  return finetune_config(arg or '150ep', name='finetune_voc', num_classes=20,
                         examples_per_epoch=16551)
