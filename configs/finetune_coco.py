r"""DETR fine-tuning on COCO 2017 (from scratch or from an UP-DETR pre-training workdir).

Variants: default ``300ep`` (lr drop at 200), ``150ep`` (drop at 100).
The fine-tuning loop itself is not in this release yet (see README); the model,
matcher, loss and optimizer sections are the release's hyper-parameters.
"""
import ml_collections

from configs import common

# Stem and stage 1 frozen, stages 2-4 trained at lr_backbone (DETR's backbone rule).
FROZEN_STEM_AND_STAGE1 = (r'^body/(conv1|bn1|layer1_\d+)/',)


def finetune_optim(lr_drop_epochs) -> ml_collections.ConfigDict:
  """AdamW as in the releases: lr 1e-4, backbone 5e-5 (SPEC §4), wd 1e-4, clip 0.1."""
  return ml_collections.ConfigDict(dict(
      lr=1e-4, lr_backbone=5e-5, weight_decay=1e-4, clip_max_norm=0.1,
      lr_drop_epochs=tuple(lr_drop_epochs), frozen=FROZEN_STEM_AND_STAGE1))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or '300ep'
  schedules = {'300ep': (300, 200), '150ep': (150, 100)}
  if variant not in schedules:
    raise ValueError(f'configs/finetune_coco.py: unknown variant {variant!r} '
                     f'(choose one of {sorted(schedules)})')
  epochs, drop = schedules[variant]
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = common.detr_model()
  config.matcher = common.matcher()
  config.loss = ml_collections.ConfigDict(dict(
      eos_coef=0.1, weight_ce=1.0, weight_bbox=5.0, weight_giou=2.0))
  config.batch_size = 16  # 2 per GPU x 8
  config.loss_replicas = 8
  config.num_epochs = epochs
  config.examples_per_epoch = 117266  # COCO train2017 images with annotations
  config.optim = finetune_optim((drop,))
  return config
