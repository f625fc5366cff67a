"""Input pipeline of UP-DETR pre-training (random query patch detection).

The method: docs/method.md, 'UP-DETR pre-training'.

Public API:
  make_pretrain_dataset(data_config, *, global_batch_size, num_patches, train=True,
      seed=0, start_step=0, process_index=0, process_count=1) -> (iterator, DataStats)
  bucket_shapes(data_config) -> [(H, W)]   the fixed batch shapes
  default_data_config() / demo_data_config() / mosaic_data_config()
Fine-tuning (labelled detection data: COCO json, TFDS COCO / VOC), detection.py:
  make_detection_dataset(data_config, *, global_batch_size, train=True, seed=0,
      start_step=0, process_index=0, process_count=1) -> (iterator, DataStats, DatasetInfo)
  detection_data_config() / voc_data_config()
One-shot detection (the CoAE protocol over the same sources), oneshot.py:
  make_oneshot_dataset(data_config, *, global_batch_size, train=True, seed=0, ...,
      query_seed=0) -> (iterator, OneShotStats, OneShotInfo); oneshot_data_config()
The miniature benchmark of real pixels (pre-training pool, labelled train / eval sets
as COCO json; docs/miniature.md): miniature.write_miniature(directory, ...).
Shape buckets and epoch plans: planning.py; batches, determinism and host sharding:
batching.py; data configs: config.py; sources and bad-image handling: sources.py;
patches: patches.py (the rectangles); resize and normalisation: augment.py. The patch
crops and their augmentation run on the accelerator: updetr_jax/device_augment.py.

Data config fields (ConfigDict or dict; missing fields take the release value): the
defaults are in config.py, each field's meaning in docs/configuration.md (the
``data.*`` rows of configs/pretrain.py).
"""

import tensorflow as _tf

try:  # the input pipeline runs on the host CPU only
  _tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # already initialised by the caller
  pass

from updetr_jax.data.augment import resize_rule  # noqa: E402
from updetr_jax.data.batching import make_pretrain_dataset  # noqa: E402
from updetr_jax.data.config import (  # noqa: E402
  default_data_config,
  demo_data_config,
  mosaic_data_config,
  eval_data_config,
  resolve_config,
)
from updetr_jax.data.planning import DataStats, bucket_shapes  # noqa: E402
from updetr_jax.data.detection import (  # noqa: E402
  DatasetInfo,
  detection_bucket_shapes,
  detection_data_config,
  make_detection_dataset,
  voc_data_config,
)
from updetr_jax.data.sources import list_image_files, probe_image  # noqa: E402

__all__ = [
  'make_pretrain_dataset',
  'bucket_shapes',
  'default_data_config',
  'demo_data_config',
  'mosaic_data_config',
  'eval_data_config',
  'resolve_config',
  'DataStats',
  'resize_rule',
  'list_image_files',
  'probe_image',
  'make_detection_dataset',
  'DatasetInfo',
  'detection_data_config',
  'voc_data_config',
  'detection_bucket_shapes',
]
