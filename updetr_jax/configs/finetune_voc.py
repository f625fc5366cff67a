r"""DETR fine-tuning on PASCAL VOC (train 07+12 trainval, test 07 test), 20 classes.

  python -m updetr_jax.main --config=configs/finetune_voc.py --workdir=/tmp/ft_voc \
      --config.init.pretrained=/tmp/updetr_pretrain

Reads TFDS ``voc/2007`` and ``voc/2012`` ($TFDS_DATA_DIR or --config.data.tfds_data_dir);
evaluates COCO-style AP and VOC07 AP50 ('AP50_voc07') on VOC07 test, 'difficult'
objects ignored. Variants: default ``150ep`` (lr drop at 100), ``300ep`` (drop at 200).
"""

import ml_collections

from updetr_jax.configs.finetune_coco import finetune_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  from updetr_jax.data import voc_data_config

  # 20 classes; VOC 2007 + 2012 trainval images.
  config = finetune_config(
    arg or '150ep',
    name='finetune_voc',
    num_classes=20,
    examples_per_epoch=16551,
    data=voc_data_config(),
  )
  config.eval.voc07 = True
  return config
