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


SCHEDULES = {'300ep': (300, 200), '150ep': (150, 100)}  # epochs, lr drop epoch


def finetune_config(variant: str, *, name: str, num_classes: int,
                    examples_per_epoch: int) -> ml_collections.ConfigDict:
  """DETR fine-tuning with the release hyper-parameters; ``variant`` picks the schedule."""
  if variant not in SCHEDULES:
    raise ValueError(f'configs/{name}.py: unknown variant {variant!r} '
                     f'(choose one of {sorted(SCHEDULES)})')
  epochs, drop = SCHEDULES[variant]
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = common.detr_model(num_classes=num_classes)
  config.matcher = common.matcher()
  config.loss = ml_collections.ConfigDict(dict(
      eos_coef=0.1, weight_ce=1.0, weight_bbox=5.0, weight_giou=2.0))
  config.batch_size = 16  # 2 per GPU x 8
  config.loss_replicas = 8
  config.num_epochs = epochs
  config.examples_per_epoch = examples_per_epoch
  config.optim = finetune_optim((drop,))
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  # 91 classes (COCO category ids up to 90); train2017 images with annotations.
  return finetune_config(arg or '300ep', name='finetune_coco', num_classes=91,
                         examples_per_epoch=117266)
