"""Where a run's first weights come from (``config.init``).

check_backbone_init: refuses a run whose real-size CNN would stay random
load_initial_weights: the configured imports (backbone checkpoint, UP-DETR
  pre-training, checkpoint of this model) over freshly initialised variables
"""

from __future__ import annotations

from absl import logging

from updetr_jax import checkpoints, pretrained
from updetr_jax.torch_import import import_torch_checkpoint

# Real-size CNNs, which the releases always start from pre-trained weights.
PRETRAINED_CNNS = ('resnet50', 'resnet101')


def check_backbone_init(config, resuming: bool) -> None:
  """Refuses a run whose real-size CNN would keep its random initialisation.

  The releases always load a pre-trained ResNet (UP-DETR: SwAV 800 epochs, frozen;
  DETR: torchvision ImageNet); a frozen random ResNet-50 trains for days to nothing.
  Allowed when a weight source is configured (``init.backbone_checkpoint``,
  ``init.pretrained`` or ``init.checkpoint``), when resuming, for the small test /
  demo CNNs, or on purpose with ``init.random_backbone=True``.
  """
  init = config.get('init', {})
  if (
    config.model.backbone not in PRETRAINED_CNNS
    or resuming
    or init.get('random_backbone', False)
    or any(init.get(k) for k in ('backbone_checkpoint', 'pretrained', 'checkpoint'))
  ):
    return
  raise ValueError(
    f'config.model.backbone={config.model.backbone!r} would start from random weights: '
    'set config.init.backbone_checkpoint to a torchvision-layout ResNet .pth (the '
    'UP-DETR release uses SwAV 800 epochs, swav_800ep_pretrain.pth.tar from '
    "https://github.com/facebookresearch/swav; DETR uses torchvision's ImageNet "
    'ResNet), or config.init.pretrained / config.init.checkpoint; to train from a '
    'random CNN on purpose, pass --config.init.random_backbone=True'
  )


def load_initial_weights(config, variables: dict) -> dict:
  """``variables`` with the weights ``config.init`` names imported, in this order.

  ``backbone_checkpoint`` (torchvision-layout ResNet .pth), ``pretrained``
  (fine-tuning: every weight but the task heads of an UP-DETR pre-training workdir,
  .pth or Orbax variables; ``pretrained.load_pretrained``), ``checkpoint`` (Orbax
  variables of this very model). Without any of them, ``variables`` unchanged.
  """
  init = config.init
  if init.get('backbone_checkpoint'):
    variables = import_torch_checkpoint(init.backbone_checkpoint, config.model, variables=variables)
  if init.get('pretrained'):
    source, source_config = pretrained.load_pretrained(init.pretrained, config.model)
    variables, fresh = pretrained.init_from_pretrained(
      variables, dict(config.model), source, source_config
    )
    logging.info(
      'initialised from %s: every weight of the model but %s (fresh)',
      init.pretrained,
      ', '.join(fresh),
    )
  if init.get('checkpoint'):
    variables = checkpoints.load_variables(init.checkpoint, variables)
  return variables
