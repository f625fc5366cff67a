r"""DETR fine-tuning on COCO 2017, from an UP-DETR pre-training or from scratch.

  python -m updetr_jax.main --config=configs/finetune_coco.py --workdir=/tmp/ft_coco \
      --config.data.ann_file=/data/coco/annotations/instances_train2017.json \
      --config.data.image_dir=/data/coco/train2017 \
      --config.data.eval_ann_file=/data/coco/annotations/instances_val2017.json \
      --config.data.eval_image_dir=/data/coco/val2017 \
      --config.init.pretrained=/tmp/updetr_pretrain   # or an UP-DETR .pth

Variants (``:name``): default ``300ep`` (lr drop at 200), ``150ep`` (drop at 100).
Pre-trained vs scratch, measured: configs/compare.py (``python -m updetr_jax.compare``).
Data: any COCO-format json + image folder (``data.source='coco_json'``, the default
with the release's ``--coco_path`` layout), or TFDS ``coco/2017`` with
``--config.data.source=tfds_coco`` (see ``updetr_jax/data/detection.py``).
"""

import ml_collections

from updetr_jax.configs import common

# Stem and stage 1 frozen, stages 2-4 trained at lr_backbone (DETR's backbone rule).
FROZEN_STEM_AND_STAGE1 = (r'^body/(conv1|bn1|layer1_\d+)/',)


def finetune_optim(lr_drop_epochs) -> ml_collections.ConfigDict:
  """AdamW as in the releases: lr 1e-4, backbone 5e-5 (the 5e-4 in the release's README is
  a typo), wd 1e-4, clip 0.1."""
  return ml_collections.ConfigDict(
    dict(
      lr=1e-4,
      lr_backbone=5e-5,
      weight_decay=1e-4,
      clip_max_norm=0.1,
      lr_drop_epochs=tuple(lr_drop_epochs),
      frozen=FROZEN_STEM_AND_STAGE1,
    )
  )


SCHEDULES = {'300ep': (300, 200), '150ep': (150, 100)}  # epochs, lr drop epoch

# Images of COCO train2017 that an epoch iterates: all 118,287 of them, since images
# without boxes are kept (as in the release), not the 117,266 that have annotations.
COCO_TRAIN2017_IMAGES = 118287


def finetune_config(
  variant: str,
  *,
  name: str,
  num_classes: int,
  examples_per_epoch: int,
  data: ml_collections.ConfigDict,
) -> ml_collections.ConfigDict:
  """DETR fine-tuning with the release hyper-parameters; ``variant`` picks the schedule.

  The transformer is pre-norm, as UP-DETR pre-trains it (the architecture must match
  to load ``init.pretrained``); set ``--config.model.pre_norm=False`` for the
  original DETR trained from scratch.
  """
  if variant not in SCHEDULES:
    raise ValueError(
      f'configs/{name}.py: unknown variant {variant!r} (choose one of {sorted(SCHEDULES)})'
    )
  epochs, drop = SCHEDULES[variant]
  config = ml_collections.ConfigDict()
  config.task = 'detection'
  config.seed = 0
  # num_classes = -1 takes the label count of the data (custom json).
  config.model = common.detr_model(num_classes=num_classes, pre_norm=True)
  config.matcher = common.matcher()
  config.loss = ml_collections.ConfigDict(
    dict(eos_coef=0.1, weight_ce=1.0, weight_bbox=5.0, weight_giou=2.0)
  )
  config.data = data
  config.batch_size = 16  # 2 per GPU x 8
  # The release normalises the loss per GPU (8 GPUs x 2 images): keeping that count
  # fixed makes the loss identical whatever mesh the run uses.
  config.loss_replicas = 8
  config.num_epochs = epochs
  config.num_train_steps = -1  # > 0 overrides num_epochs
  config.examples_per_epoch = examples_per_epoch  # -1: the training set's size
  config.optim = finetune_optim((drop,))
  config.init = ml_collections.ConfigDict(
    dict(
      # An UP-DETR pre-training workdir, a release .pth (UP-DETR or DETR) or Orbax
      # variables: every weight but class_embed / patch2query / feature_align.
      pretrained='',
      # torchvision-layout ResNet .pth for a DETR trained from scratch (the release
      # starts from the ImageNet-supervised or SwAV CNN).
      backbone_checkpoint='',
      checkpoint='',  # Orbax variables of this very model (e.g. to evaluate one)
      # A resnet50/101 run without any of the above is refused unless this is True.
      random_backbone=False,
    )
  )
  steps_per_epoch = max(examples_per_epoch // config.batch_size, 1)
  # Periodic evaluation (pycocotools on the evaluation split; VOC07 AP50 with voc07);
  # the checkpoint with the best best_metric is kept in workdir/best. Each image is
  # evaluated in a canvas that depends on its own size only: AP does not depend on
  # batch_size.
  config.eval = ml_collections.ConfigDict(
    dict(
      enabled=True,
      batch_size=8,
      every_steps=5 * steps_per_epoch,
      best_metric='AP',
      voc07=False,
      num_pictures=4,
      picture_threshold=0.5,
    )
  )
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 3
  config.log_every_steps = 100
  config.compilation_cache_dir = ''  # e.g. ~/.cache/updetr_jax/xla: reuse compiled steps
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  from updetr_jax.data import detection_data_config

  # 91 classes (COCO category ids up to 90); every train2017 image.
  return finetune_config(
    arg or '300ep',
    name='finetune_coco',
    num_classes=91,
    examples_per_epoch=COCO_TRAIN2017_IMAGES,
    data=detection_data_config(),
  )
