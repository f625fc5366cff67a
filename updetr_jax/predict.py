r"""Run a DETR checkpoint on image files: COCO-style json and labelled pictures.

  python -m updetr_jax.predict --checkpoint=/tmp/detr_r50 \
      --config=configs/finetune_coco.py --output=/tmp/pred a.jpg b.png

--checkpoint: an Orbax variables checkpoint (``checkpoints.save_variables``, e.g.
written by ``updetr_jax.torch_import``) or a PyTorch ``.pth`` (imported on the fly).
--workdir: a DETR fine-tuning workdir; its own config.json gives the model (--config
is then not needed); --which picks the checkpoint: auto (default: the best-evaluated
one in workdir/best when present, else the latest), best or latest.

Each image is resized as DETR evaluates (shorter side --scale=800, longer side at
most --max_size=1333, ``data.augment.resize_rule``; bilinear as the evaluation
pipeline), normalised and run alone with no padding (a canvas that depends on the
image only; see ``evaluate``'s module docstring). ``preprocess_images`` is that
preprocessing, shared with the exported detector (``updetr_jax.export``).
Writes OUT/detections.json: every one of the N predictions per image (no threshold,
no NMS, as DETR's COCO evaluation), each {file_name, image_id (the
position on the command line), category_id (= label), category_name (when
--class_names is not 'none'), bbox [x, y, w, h] in original pixels, score}; and
OUT/<name>.png with the boxes scoring >= --threshold.

One-shot detection (a ``configs/oneshot_voc.py`` workdir or checkpoint): --query=crop.jpg
finds the instances of the query's class in every image (no class list):

  python -m updetr_jax.predict --workdir=/tmp/oneshot_voc --query=cow.jpg a.jpg b.jpg

The query is the whole file, or its --query_box=x0,y0,x1,y1 (pixels), resized to
--query_size (default: the workdir's data.patch_size, else 128) x the same, as the
one-shot pipeline crops its queries (``preprocess_query``). Records have category_id 0
and category_name 'query'; OUT/<name>.png shows the query beside the instances found.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from updetr_jax import checkpoints, cli, evaluate, visualize
from updetr_jax.class_names import get_class_names
from updetr_jax.models import build_model, variable_shapes


def _looks_like_train_workdir(path: str) -> bool:
  """A training workdir holds checkpoints/<step>/ (train.py's Orbax manager)."""
  sub = os.path.join(path, 'checkpoints')
  return os.path.isdir(sub) or any(
    d.isdigit() and os.path.isdir(os.path.join(path, d)) for d in os.listdir(path)
  )


def load_model_variables(model, model_config, checkpoint: str):
  """Variables for ``model`` from an Orbax variables checkpoint or a ``.pth``."""
  if checkpoint.endswith('.pth'):
    from updetr_jax.torch_import import import_torch_checkpoint

    return import_torch_checkpoint(checkpoint, model_config)
  if os.path.isdir(checkpoint) and _looks_like_train_workdir(checkpoint):
    raise ValueError(f'{checkpoint} looks like a training workdir: pass it as --workdir')
  return checkpoints.load_variables(checkpoint, variable_shapes(model))


def define_model_flags() -> None:
  """--workdir / --which or --checkpoint / --config: where a DETR comes from (predict,
  export)."""
  config_flags.DEFINE_config_file('config', None, 'config file (uses its .model)')
  flags.DEFINE_string('checkpoint', None, 'Orbax variables checkpoint directory or PyTorch .pth')
  flags.DEFINE_string('workdir', None, 'training workdir (latest checkpoint, its config.json)')
  flags.DEFINE_enum(
    'which',
    'auto',
    ['auto', 'best', 'latest'],
    'with --workdir: the best-evaluated checkpoint (workdir/best), '
    'the latest, or auto (best when there is one)',
  )


def is_oneshot_model(model_config) -> bool:
  """A one-shot detector: one query patch, no feature reconstruction head."""
  return model_config.get('num_patches') == 1 and not model_config.get('feature_head', True)


def load_model_from_flags(oneshot: bool = False):
  """The DETR (or, with ``oneshot``, the one-shot detector) named by
  ``define_model_flags``' flags.

  Returns (model, variables, model config dict, source {'workdir', 'which', 'step'} or
  {'checkpoint'}). Raises app.UsageError on a wrong flag combination, an UP-DETR
  pre-training workdir (its model needs query patches), a one-shot model without
  ``oneshot`` or a DETR with it.
  """
  FLAGS = flags.FLAGS  # noqa: N806
  if bool(FLAGS.workdir) == bool(FLAGS.checkpoint):
    raise app.UsageError('give exactly one of --workdir and --checkpoint')
  if FLAGS.workdir:
    variables, step, model_config = checkpoints.restore_workdir_variables(
      FLAGS.workdir, FLAGS.which
    )
    where = FLAGS.workdir
  else:
    if FLAGS.config is None:
      raise app.UsageError('--checkpoint needs --config (the model it was trained with)')
    model_config = FLAGS.config.model.to_dict()
    where = FLAGS.checkpoint
  if is_oneshot_model(model_config) != oneshot:
    if is_oneshot_model(model_config):
      raise app.UsageError(
        f'{where} is a one-shot detector: it needs a query (predict --query=crop.jpg)'
      )
    if model_config.get('num_patches'):
      raise app.UsageError(
        f'{where} holds an UP-DETR pre-training model '
        f'(model.num_patches={model_config["num_patches"]}), which needs '
        'query patches; fine-tune it into DETR (or a one-shot detector) first'
      )
    raise app.UsageError(f'{where} is a DETR, which takes no --query (a one-shot model does)')
  if FLAGS.workdir:
    return (
      build_model(model_config),
      variables,
      model_config,
      {'workdir': FLAGS.workdir, 'which': FLAGS.which, 'step': int(step)},
    )
  model = build_model(model_config)
  variables = load_model_variables(model, model_config, FLAGS.checkpoint)
  return model, variables, model_config, {'checkpoint': FLAGS.checkpoint}


def load_image(path: str) -> np.ndarray:
  """File -> RGB uint8 [H, W, 3]."""
  with Image.open(path) as im:
    return np.asarray(im.convert('RGB'))


def resize_rule_tf(height, width, scale: int, max_size: int | None):
  """``data.augment.resize_rule`` in TensorFlow ops, for sizes known only when run.

  Args: height, width: int scalar tensors; scale, max_size: Python ints (max_size
    0 or None: no cap). Returns (new_h, new_w) int32 scalar tensors, equal to
    ``resize_rule``'s: the same float64 operations in the same order (tf.round, like
    np.round, rounds halves to even).
  """
  import tensorflow as tf  # noqa: PLC0415

  h = tf.cast(height, tf.float64)
  w = tf.cast(width, tf.float64)
  s = tf.constant(scale, tf.float64)
  short, long_ = tf.minimum(h, w), tf.maximum(h, w)
  if max_size:
    over = long_ / short * s > max_size
    s = tf.where(over, tf.round(max_size * short / long_), s)
  new_long = tf.floor(s * long_ / short)
  portrait = w < h  # DETR: w < h -> w is the short side
  new_h = tf.cast(tf.where(portrait, new_long, s), tf.int32)
  new_w = tf.cast(tf.where(portrait, s, new_long), tf.int32)
  return new_h, new_w


def preprocess_images(images, scale: int, max_size: int | None):
  """The one preprocessing of ``predict`` and of the exported detector (``export``).

  TensorFlow ops: runs eagerly (``preprocess``) or inside a ``tf.function`` whose
  batch and image sizes are unknown until run (the SavedModel's signature).
  Args: images: uint8 [B, H, W, 3] RGB (tensor or array; B images of one size).
  Returns: (x float32 [B, h, w, 3]: resized to (h, w) = ``resize_rule(H, W, scale,
    max_size)`` by ``data.augment.resize_image`` (bilinear, antialiased when
    shrinking, as the evaluation pipeline) and ImageNet-normalised
    (``data.augment.normalize``); orig_size float32 [B, 2]: (H, W) of every image).
  """
  import tensorflow as tf  # noqa: PLC0415
  from updetr_jax.data import augment  # noqa: PLC0415

  images = tf.convert_to_tensor(images)
  if images.dtype != tf.uint8:
    raise ValueError(f'images must be uint8 RGB [B, H, W, 3], got {images.dtype.name}')
  shape = tf.shape(images)
  new_h, new_w = resize_rule_tf(shape[1], shape[2], scale, max_size)
  x = augment.resize_image(tf.cast(images, tf.float32), tf.stack([new_h, new_w]))
  x = augment.normalize(x, 255.0)
  orig_size = tf.tile(tf.cast(shape[None, 1:3], tf.float32), tf.stack([shape[0], 1]))
  return x, orig_size


def preprocess(image_rgb: np.ndarray, scale: int, max_size: int) -> np.ndarray:
  """RGB uint8 [H, W, 3] -> resized (DETR rule, bilinear) ImageNet-normalised
  float32 [h, w, 3] (``preprocess_images`` of a batch of one)."""
  x, _ = preprocess_images(np.asarray(image_rgb, np.uint8)[None], scale, max_size)
  return x[0].numpy()


def preprocess_query(image_rgb: np.ndarray, size: int, box=None) -> np.ndarray:
  """The one-shot query: RGB uint8 [H, W, 3] (or its ``box`` x0, y0, x1, y1 in pixels,
  rounded outward) -> float32 [size, size, 3], resized as the one-shot pipeline crops
  its queries (``data.patches.crop_patch``: bilinear, antialiased, aspect not kept) and
  ImageNet-normalised."""
  import tensorflow as tf  # noqa: PLC0415
  from updetr_jax.data import augment, patches  # noqa: PLC0415

  h, w = image_rgb.shape[:2]
  x0, y0, x1, y1 = (0, 0, w, h) if box is None else box
  x0, y0 = min(max(int(np.floor(x0)), 0), w - 1), min(max(int(np.floor(y0)), 0), h - 1)
  x1, y1 = min(max(int(np.ceil(x1)), x0 + 1), w), min(max(int(np.ceil(y1)), y0 + 1), h)
  crop = patches.crop_patch(
    tf.convert_to_tensor(np.asarray(image_rgb, np.uint8)),
    tf.constant([x0, y0, x1 - x0, y1 - y0], tf.int32),
    int(size),
  )
  return augment.normalize(crop, 255.0).numpy()


def _png_names(paths):
  """Unique output names: the file stem, suffixed by its position on a clash."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  return [f'{s}_{i}' if stems.count(s) > 1 else s for i, s in enumerate(stems)]


def predict_files(
  model,
  variables,
  paths,
  output: str,
  *,
  threshold: float = 0.7,
  class_names=None,
  scale: int = 800,
  max_size: int = 1333,
  query: np.ndarray | None = None,
) -> list[dict]:
  """Detects objects in image files; writes detections.json and one png per image.

  query: the one-shot detector's query, float32 [P, P, 3] (``preprocess_query``); the
  instances of its class are found (category_id 0, category_name 'query').
  Returns the json's records (see the module docstring).
  """
  os.makedirs(output, exist_ok=True)
  detect = evaluate.make_detect_fn(model)
  evaluator = evaluate.CocoEvaluator()
  if query is not None:
    class_names = {0: 'query'}
  for i, (path, name) in enumerate(zip(paths, _png_names(paths))):
    image = load_image(path)
    out = evaluate.detect_images(
      detect,
      variables,
      [preprocess(image, scale, max_size)],
      [image.shape[:2]],
      batch_size=1,
      multiple=1,
      query=query,
    )
    scores, labels, boxes = out['scores'][0], out['labels'][0], out['boxes'][0]
    evaluator.update([i], scores[None], labels[None], boxes[None])
    keep = scores >= threshold
    png = os.path.join(output, f'{name}.png')
    if query is not None:
      visualize.plot_oneshot(
        png, visualize.denormalize(query), image, boxes[keep], scores[keep], title=name
      )
    else:
      visualize.plot_detections(png, image, boxes[keep], labels[keep], scores[keep], class_names)
  records = []
  for r in evaluator.results():
    rec = {'file_name': os.path.basename(paths[r['image_id']]), **r}
    if class_names is not None:
      rec['category_name'] = class_names.get(r['category_id'], 'N/A')
    records.append(rec)
  with open(os.path.join(output, 'detections.json'), 'w') as f:
    json.dump(records, f)
  return records


def main(argv):
  FLAGS = flags.FLAGS  # noqa: N806
  cli.setup_logging()
  paths = argv[1:]
  if not paths:
    raise app.UsageError('give at least one image file')
  model, variables, _, source = load_model_from_flags(oneshot=bool(FLAGS.query))
  if 'step' in source:
    print(f'restored step {source["step"]} of {source["workdir"]} ({source["which"]})')
  query = None
  if FLAGS.query:
    box = None
    if FLAGS.query_box:
      box = [float(v) for v in FLAGS.query_box.split(',')]
      if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
        raise app.UsageError(f'--query_box={FLAGS.query_box!r}: give x0,y0,x1,y1 with x0<x1, y0<y1')
    size = FLAGS.query_size
    if not size and FLAGS.workdir:
      with open(os.path.join(FLAGS.workdir, 'config.json')) as f:
        size = int(json.load(f).get('data', {}).get('patch_size', 0))
    size = size or 128
    query = preprocess_query(load_image(FLAGS.query), size, box)
  records = predict_files(
    model,
    variables,
    paths,
    FLAGS.output,
    threshold=FLAGS.threshold,
    class_names=get_class_names(FLAGS.class_names),
    scale=FLAGS.scale,
    max_size=FLAGS.max_size,
    query=query,
  )
  shown = sum(r['score'] >= FLAGS.threshold for r in records)
  print(
    f'{len(paths)} images, {shown} detections >= {FLAGS.threshold}; '
    f'wrote {FLAGS.output}/detections.json and pngs'
  )


def _define_flags():
  define_model_flags()
  flags.DEFINE_string('output', None, 'output directory')
  flags.DEFINE_float('threshold', 0.7, 'score threshold for the pictures')
  flags.DEFINE_enum(
    'class_names', 'coco', ['coco', 'voc', 'none'], 'label names for the pictures and json'
  )
  flags.DEFINE_integer('scale', 800, 'shorter side after resizing')
  flags.DEFINE_integer('max_size', 1333, 'cap on the longer side')
  flags.DEFINE_string('query', None, 'one-shot detection: image file of the query object')
  flags.DEFINE_string('query_box', None, 'x0,y0,x1,y1: the query object in --query (pixels)')
  flags.DEFINE_integer(
    'query_size', 0, 'query side after resizing (0: the workdir data.patch_size, else 128)'
  )
  flags.mark_flags_as_required(['output'])


def cli_main():
  """Console script ``updetr-predict``."""
  cli.run(main, _define_flags)


if __name__ == '__main__':
  cli_main()
