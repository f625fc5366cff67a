r"""UP-DETR pre-training (random query patch detection) on unlabeled images.

  python -m updetr_jax.main --config=configs/pretrain.py --workdir=/tmp/updetr_pretrain
  python -m updetr_jax.main --config=configs/pretrain.py:single_query --workdir=...

Variants (``:name``): default = the release's ImageNet run (ResNet-50 frozen,
pre-norm, N=100 queries, M=10 patches, 60 epochs); ``single_query`` = M=1.
"""
import ml_collections


def model_config(**overrides) -> ml_collections.ConfigDict:
  """The release's UP-DETR pre-training model (field names = release arguments)."""
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
      pre_norm=True,
      num_classes=2,  # label 1 = "is the patch"; 3 logits with "no object"
      aux_loss=True,
      num_patches=10,
      feature_recon=True,
      patch_query_drop=0.1,
      dtype='float32',
  ))
  m.update(overrides)
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'imagenet'
  config = ml_collections.ConfigDict()
  config.model = model_config()
  config.matcher = ml_collections.ConfigDict(dict(
      solver='exact', cost_class=1.0, cost_bbox=5.0, cost_giou=2.0))
  config.loss = ml_collections.ConfigDict(dict(
      eos_coef=0.1, weight_ce=1.0, weight_bbox=5.0, weight_giou=2.0, weight_feature=1.0))
  if variant == 'single_query':
    config.model.num_patches = 1
  elif variant != 'imagenet':
    raise ValueError(f'configs/pretrain.py: unknown variant {variant!r} '
                     "(choose 'imagenet' or 'single_query')")
  return config
