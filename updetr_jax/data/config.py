"""Pre-training data configs: release (ImageNet via TFDS), demo, evaluation split."""

from __future__ import annotations

from typing import Any

from updetr_jax.data import sources

# Execution fields shared by the pre-training and detection pipelines.
PIPELINE_DEFAULTS: dict[str, Any] = dict(
  shuffle=True,
  cache_decoded=False,
  num_parallel_calls=-1,
  prefetch=2,
  threads=0,
  index_cache_dir='~/.cache/updetr_jax',
  index_threads=0,
  tune_malloc=True,
)

# The query patches (crop size and the device's augmentation of them), shared with
# the one-shot pipeline.
PATCH_DEFAULTS: dict[str, Any] = dict(
  patch_size=128,
  augment_patches=True,
  color_jitter=(0.4, 0.4, 0.4, 0.1),
  color_jitter_prob=0.8,
  color_jitter_random_order=False,
  grayscale_prob=0.2,
  blur_prob=0.5,
  blur_sigma=(0.1, 2.0),
  blur_kernel_size=0,
  # Examples whose patches the device makes at once (device_augment.map_examples):
  # must divide the per-device batch; the same value gives bit-identical patches on
  # any number of devices.
  patch_chunk=1,
)

DEFAULTS: dict[str, Any] = dict(
  source='tfds',
  tfds_name='imagenet2012',
  tfds_split='train',
  tfds_data_dir='',  # '': $TFDS_DATA_DIR or TFDS' default
  tfds_image_key='image',
  folder='',
  demo_images=sources.DEMO_IMAGES,
  demo_repeats=1,
  # source='mosaics' (the learnability benchmark, data/mosaics.py): mosaic_count
  # images of mosaic_split; the evaluation renders mosaic_eval_count held-out ones.
  mosaic_split='train',
  mosaic_count=400,
  mosaic_eval_count=64,
  mosaic_seed=0,
  mosaic_size=(128, 160),
  # 'cells' (Voronoi mosaics), 'ramp' (colour = position: the positive control) or
  # 'rotated_ramp' (colour = position in a frame drawn per image: a lookup).
  mosaic_style='cells',
  # (least, most) Voronoi cells per 'cells' image (data/mosaics.py CELLS).
  mosaic_cells=(6, 10),
  # Pre-training evaluation images, never trained on (see eval_data_config):
  eval_tfds_split='validation',  # tfds: ImageNet's validation split
  eval_folder='',  # folder: a second folder ('' = new patches of the training images)
  eval_demo_images=(),  # demo: photos kept out of demo_images
  scales=(320, 336, 352, 368, 400, 416, 432, 448, 464, 480),
  max_size=600,
  eval_scale=480,
  buckets=((384, 512), (448, 576), (480, 608)),
  **PATCH_DEFAULTS,
  **PIPELINE_DEFAULTS,
)

DEMO_OVERRIDES: dict[str, Any] = dict(
  source='demo',
  demo_images=sources.DEMO_TRAIN_IMAGES,
  eval_demo_images=sources.DEMO_EVAL_IMAGES,
  demo_repeats=16,
  scales=(96, 112, 128),
  max_size=160,
  eval_scale=128,
  buckets=((128, 160),),
  patch_size=32,
  cache_decoded=True,
  index_cache_dir=None,
)


# The learnability benchmark (configs/pretrain.py:mosaics): the demo's sizes on
# 128 x 160 mosaics, no patch augmentation (the pixels alone say where a patch is).
MOSAIC_OVERRIDES: dict[str, Any] = dict(
  DEMO_OVERRIDES,
  source='mosaics',
  demo_images=(),
  eval_demo_images=(),
  demo_repeats=1,
  augment_patches=False,
)


def as_config(d):
  try:
    import ml_collections  # noqa: PLC0415

    return ml_collections.ConfigDict(d)
  except ImportError:  # pragma: no cover
    return dict(d)


def default_data_config():
  """Release data config (ImageNet via TFDS, see the package docstring)."""
  return as_config(dict(DEFAULTS))


def demo_data_config():
  """Small config on the scikit-image photos: trains a tiny model on CPU in minutes."""
  return as_config({**DEFAULTS, **DEMO_OVERRIDES})


def mosaic_data_config():
  """The learnability benchmark's data: in-memory mosaics, held-out evaluation ones."""
  return as_config({**DEFAULTS, **MOSAIC_OVERRIDES})


def resolve_config(data_config, defaults=None) -> dict:
  """ConfigDict / dict (partial) -> plain dict with every field; rejects unknown ones.

  ``defaults``: the field set and default values (pre-training's DEFAULTS if None).
  """
  defaults = DEFAULTS if defaults is None else defaults
  if data_config is None:
    data_config = {}
  if hasattr(data_config, 'to_dict'):
    data_config = data_config.to_dict()
  unknown = sorted(set(data_config) - set(defaults))
  if unknown:
    raise ValueError(f'unknown data config field(s) {unknown}; known: {sorted(defaults)}')
  cfg = {**defaults, **dict(data_config)}
  cfg['scales'] = tuple(int(s) for s in cfg['scales'])
  cfg['buckets'] = tuple((int(s), int(l)) for s, l in cfg['buckets'])
  if 'mosaic_size' in cfg:  # pre-training's field set only
    cfg['mosaic_size'] = tuple(int(s) for s in cfg['mosaic_size'])
    cfg['mosaic_cells'] = tuple(int(c) for c in cfg['mosaic_cells'])
  if not cfg['scales']:
    raise ValueError('data.scales must not be empty')
  if not cfg['max_size']:
    raise ValueError('data.max_size must be set (it bounds the bucket shapes)')
  return cfg


def eval_data_config(data_config) -> tuple[dict, bool]:
  """The pre-training evaluation's data: (resolved config, held_out).

  held_out is True when the evaluation images are never trained on: TFDS
  ``eval_tfds_split`` (ImageNet validation) when it differs from ``tfds_split``, a
  folder ``eval_folder``, or the demo's ``eval_demo_images``. Otherwise (a folder run
  without ``eval_folder``, a TFDS run with ``eval_tfds_split=''``) the evaluation
  draws new patches from the training images, and held_out is False.
  """
  cfg = resolve_config(data_config)
  kind = cfg['source']
  if kind == 'tfds' and cfg['eval_tfds_split'] and cfg['eval_tfds_split'] != cfg['tfds_split']:
    return dict(cfg, tfds_split=cfg['eval_tfds_split']), True
  if kind == 'folder' and cfg['eval_folder']:
    return dict(cfg, folder=cfg['eval_folder']), True
  if kind == 'mosaics' and cfg['mosaic_eval_count'] > 0 and cfg['mosaic_split'] == 'train':
    return dict(cfg, mosaic_split='eval', mosaic_count=cfg['mosaic_eval_count']), True
  if kind == 'demo' and cfg['eval_demo_images']:
    overlap = set(cfg['eval_demo_images']) & set(cfg['demo_images'])
    if overlap:
      raise ValueError(f'data.eval_demo_images and data.demo_images share {sorted(overlap)}')
    return dict(cfg, demo_images=tuple(cfg['eval_demo_images'])), True
  return cfg, False
