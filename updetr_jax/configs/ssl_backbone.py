r"""Stage 0: a CNN trained self-supervised (SimCLR) on unlabeled images, for
``config.init.backbone_checkpoint`` (task 'simclr', ``updetr_jax/tasks/simclr.py``):

  updetr-ssl-backbone --workdir=workdir/ssl --config.data.folder=/path/to/images

writes ``workdir/ssl/backbone.npz``; every field: docs/configuration.md.
"""

import ml_collections


VARIANTS = ('default',)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if (arg or 'default') not in VARIANTS:
    raise ValueError(f'configs/ssl_backbone.py: unknown variant {arg!r} (choose one of {VARIANTS})')
  config = ml_collections.ConfigDict()
  config.task = 'simclr'
  config.seed = 0  # the initialisation and every draw of the views
  # model.backbone: a models/resnet.py RESNET_VARIANTS name; the projection head is
  # Linear-BN-ReLU-Linear to projection_dim (SwAV's layout).
  config.model = ml_collections.ConfigDict(dict(backbone='resnet_small', projection_dim=128))
  config.data = ml_collections.ConfigDict(
    dict(
      folder='',  # unlabeled images (searched recursively)
      max_size=128,  # each image shrunk to fit max_size x max_size on the host
      view_size=64,  # side of the square views
      crop_scale=(0.2, 1.0),  # RandomResizedCrop: fraction of the area ...
      crop_ratio=(3 / 4, 4 / 3),  # ... and aspect ratio
      flip_prob=0.5,
      # The query patches' colour augmentation (device_augment.augment_patches):
      color_jitter=(0.4, 0.4, 0.4, 0.1),  # brightness, contrast, saturation, hue
      color_jitter_prob=0.8,
      color_jitter_random_order=False,
      grayscale_prob=0.2,
      blur_prob=0.0,
      blur_sigma=(0.1, 2.0),
      blur_kernel_size=0,  # 0: the odd number nearest view_size / 10
      patch_chunk=8,  # examples cropped at a time on each device
    )
  )
  config.loss = ml_collections.ConfigDict(dict(temperature=0.2))  # NT-Xent
  config.loss_replicas = 1
  config.batch_size = 64  # images per step (2 views each), distinct within a step
  config.examples_per_epoch = -1  # the folder's readable images
  config.num_train_steps = 500
  config.optim = ml_collections.ConfigDict(
    dict(lr=2e-3, weight_decay=1e-4, warmup_fraction=0.05, end_lr_fraction=0.01, frozen=())
  )
  config.init = ml_collections.ConfigDict(
    dict(backbone_checkpoint='', checkpoint='', pretrained='', random_backbone=True)
  )
  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 2
  config.log_every_steps = 25
  config.compilation_cache_dir = ''
  # The retrieval figure of two held-out views of the first num_images images, at
  # step 0, every every_steps (0: at the end only) and at the end.
  config.eval = ml_collections.ConfigDict(dict(enabled=True, num_images=256, every_steps=0))
  return config
