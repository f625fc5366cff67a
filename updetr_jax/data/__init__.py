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

Data config fields (ConfigDict or dict; missing fields take the release value):
  source          'tfds' | 'folder' | 'demo' | 'mosaics' (the learnability
                  benchmark's images, data/mosaics.py: mosaic_split, mosaic_count,
                  mosaic_eval_count held-out ones, mosaic_seed, mosaic_size, mosaic_style,
                  mosaic_cells).
  tfds_name       TFDS dataset ('imagenet2012'); labels are ignored.
  tfds_split      split ('train').
  tfds_data_dir   TFDS data dir ('': $TFDS_DATA_DIR or TFDS' default).
  tfds_image_key  image feature name ('image').
  folder          root of a tree of .jpg/.jpeg/.png/.bmp/.gif files (any case).
  demo_images     scikit-image photo names for source='demo'.
  eval_tfds_split / eval_folder / eval_demo_images
                  pre-training evaluation images never trained on ('validation'; '';
                  the demo: 4 photos kept out of demo_images); see eval_data_config.
  demo_repeats    demo only: each photo appears this many times per epoch, with
                  different patches and scales (a larger virtual dataset).
  scales          training short-side sizes, one drawn per image
                  (320, 336, ..., 480: the ten release values).
  max_size        cap on the long side (600).
  eval_scale      evaluation short side (480).
  buckets         (short, long) caps of the shape buckets, each used in both
                  orientations ((384, 512), (448, 576), (480, 608)); empty: one cap
                  (max scale, max_size) rounded up to multiples of 32.
  patch_size      P, side of the query patches (128).
  augment_patches apply the query-patch augmentation in training (True; on the
                  device, device_augment.py).
  color_jitter    (brightness, contrast, saturation, hue) = (0.4, 0.4, 0.4, 0.1).
  color_jitter_prob 0.8;  grayscale_prob 0.2;  blur_prob 0.5;
  color_jitter_random_order  False: fixed order brightness, contrast, saturation,
                  hue; True: random order per image (slower; see augment.py).
  blur_sigma      (0.1, 2.0);  blur_kernel_size  odd, 0 = about P/10 (13 for 128).
  patch_chunk     examples whose patches the device makes at once (1; must divide
                  the per-device batch; device_augment.map_examples).
  shuffle         shuffle the examples each epoch (training only) (True).
  cache_decoded   decode a folder/TFDS source once into memory (small sets; the demo
                  is always in memory) (False).
  num_parallel_calls  parallel per-example map calls (-1: AUTOTUNE).
  prefetch        batches prefetched (2).
  threads         tf.data private thread pool size (0: TF's default).
  index_cache_dir where the per-image index (sizes/statuses) is cached
                  ('~/.cache/updetr_jax'; None: rebuild every run).
  index_threads   threads probing images for the index (0: all cores).
  tune_malloc     set glibc malloc thresholds for big short-lived buffers (True):
                  process-wide, about halves the pipeline's CPU cost on Linux; read
                  by the entry points, which call cli.tune_malloc at start-up.
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
