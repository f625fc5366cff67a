r"""Run a DETR checkpoint on image files: COCO-style json and labelled pictures.

  python -m updetr_jax.predict --checkpoint=/tmp/detr_r50 \
      --config=configs/finetune_coco.py --output=/tmp/pred a.jpg b.png

--checkpoint: an Orbax variables checkpoint (``checkpoints.save_variables``, e.g.
written by ``updetr_jax.torch_import``) or a PyTorch ``.pth`` (imported on the fly).
--workdir: a training workdir; its own config.json gives the model (--config is then
not needed); --which picks the checkpoint: auto (default: the best-evaluated one in
workdir/best when present, else the latest), best or latest.

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
--query_size (default: the model's data.patch_size, else 128) x the same, as the
one-shot pipeline crops its queries (``preprocess_query``). Records have category_id 0
and category_name 'query'; OUT/<name>.png shows the query beside the instances found.

Query patch detection with an UP-DETR pre-training model (its pretext task, as the
release's visualisation notebook; ``predict_patch_files``): K query patches
(1 <= K <= model.num_patches), each found in the image by its group's top-scoring query
(score: the probability of 'is the patch', label 1; ``evaluate.patch_predictions``,
the pre-training evaluation's group_top):

  python -m updetr_jax.predict --workdir=workdir/demo --output=/tmp/patches \
      --query_box=10,20,60,90 --query_box=40,5,120,50 a.jpg b.jpg
  python -m updetr_jax.predict --checkpoint=updetr_r50.pth --config=configs/pretrain.py \
      --output=/tmp/patches --query=crop1.jpg --query=crop2.jpg a.jpg

--query_box (repeated): the K patches are cut from each image itself (pixels of the
original image, inside it); --query (repeated): the K patches are those files, searched
in every image (one --query with K --query_box: K crops of that file). Each patch is
resized to --query_size (default data.patch_size of the model's config) as the
pre-training pipeline crops its patches (``preprocess_query``, no augmentation); the
image to the pre-training evaluation's size (data.eval_scale, data.max_size; --scale
and --max_size when given). OUT/detections.json holds one record per (image, patch):
{file_name, image_id, patch (its index k), bbox [x, y, w, h] in original pixels
(clipped to the image), score, and query_box [x0, y0, x1, y1] with iou (of bbox with
it), or query (the file)}; OUT/<name>.png draws each found box with its score (the
query boxes solid) above the query patches (``visualize.plot_patch_detection``).

From Python, ``load_model(workdir=...)`` or ``load_model(checkpoint=..., config=...)``
gives the model, its variables and its kind ('detr', 'oneshot', 'pretrain': the run's
``config.task``, guessed from the model config only when there is none);
``predict_files`` and ``predict_patch_files`` run it. Only ``main`` reads the flags.

One file: the three model kinds (DETR, one-shot, pre-training) share one command's
flags, its checkpoint loading, its image and query preprocessing and its flag checks.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from updetr_jax import box_ops, checkpoints, cli, evaluate, files, visualize
from updetr_jax.class_names import get_class_names
from updetr_jax.models import build_model, fields, variable_shapes


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


MODEL_SOURCES = ('workdir', 'checkpoint', 'config', 'which')  # define_model_flags's


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


class ModelSourceError(ValueError):
  """``load_model`` was given a wrong combination of sources, a config.task it does not
  know, or a model of a kind its caller does not take (the command-line programs report
  it as a usage error)."""


MODEL_KINDS = ('detr', 'oneshot', 'pretrain')
# config.task (updetr_jax.tasks) -> the kind of model it trains
TASK_KINDS = {'detection': 'detr', 'oneshot': 'oneshot', 'pretrain': 'pretrain'}


def model_kind(model_config, task: str | None = None) -> str:
  """'detr', 'oneshot' or 'pretrain' (an UP-DETR pre-training model: model.num_patches
  query patches).

  task: the run's ``config.task`` (a workdir's config.json and the config files have
  it), which decides. Without it (a bare model config), the kind is guessed from the
  model: no num_patches, DETR; one query patch and no feature reconstruction head,
  one-shot (which a pre-training with M = 1 and no feature head would also look like);
  else pre-training.
  """
  if task:
    if task not in TASK_KINDS:
      raise ModelSourceError(f'config.task={task!r}: not one of {sorted(TASK_KINDS)}')
    return TASK_KINDS[task]
  model_config = fields.fill(model_config)
  if not model_config['num_patches']:
    return 'detr'
  if model_config['num_patches'] == 1 and not model_config['feature_head']:
    return 'oneshot'
  return 'pretrain'


class LoadedModel(NamedTuple):
  """What ``load_model`` returns."""

  model: Any  # the Flax module (``build_model``)
  variables: dict  # {'params', 'batch_stats'}
  model_config: dict
  source: dict  # {'workdir', 'which', 'step'} or {'checkpoint'}
  kind: str  # ``model_kind``


def _as_dict(tree) -> dict:
  """A ConfigDict or a mapping -> a plain dict."""
  return tree.to_dict() if hasattr(tree, 'to_dict') else dict(tree)


def run_config(*, workdir: str | None = None, config=None) -> dict:
  """The config of the model's run: the workdir's config.json, else ``config`` (a
  ConfigDict or a dict; ``{}`` when neither is given)."""
  if workdir:
    return dict(files.read_json(os.path.join(workdir, 'config.json')))
  return {} if config is None else _as_dict(config)


def data_config(*, workdir: str | None = None, config=None) -> dict:
  """The data config of the model's run (``run_config``'s ``data``; ``{}`` without
  one). Gives the patch size and evaluation scale."""
  return dict(run_config(workdir=workdir, config=config).get('data', {}))


def load_model(
  *,
  workdir: str | None = None,
  checkpoint: str | None = None,
  config=None,
  which: str = 'auto',
  kinds=MODEL_KINDS,
) -> LoadedModel:
  """The model of a training workdir, or of a checkpoint with the config it was
  trained with, when its kind (``model_kind``) is one of ``kinds``.

  Args:
    workdir: a training workdir (its config.json gives the model and task); which:
      its checkpoint, 'auto' (the best-evaluated one when there is one, else the
      latest), 'best' or 'latest'.
    checkpoint: or an Orbax variables checkpoint or a PyTorch ``.pth``, with
    config: its run's config (ConfigDict or dict): its ``model`` and, when it has
      one, its ``task``.
    kinds: the kinds the caller takes (``MODEL_KINDS``).
  Returns: ``LoadedModel`` (model, variables, model config dict, source, kind).
  Raises: ModelSourceError on a wrong combination of arguments, or a model of
    another kind (e.g. a DETR program given a one-shot or pre-training model).
  """
  if bool(workdir) == bool(checkpoint):
    raise ModelSourceError('give exactly one of --workdir and --checkpoint')
  if not workdir and config is None:
    raise ModelSourceError('--checkpoint needs --config (the model it was trained with)')
  where = workdir or checkpoint
  if workdir:
    variables, step, model_config = checkpoints.restore_workdir_variables(workdir, which)
    task = run_config(workdir=workdir).get('task')
  else:
    model_config, task = _as_dict(config['model']), config.get('task')
  kind = model_kind(model_config, task)
  patches = fields.fill(model_config)['num_patches']
  if kind == 'detr' and patches:
    raise ModelSourceError(
      f'{where}: config.task={task!r} is DETR, but its model has model.num_patches={patches}'
    )
  if kind != 'detr' and not patches:
    raise ModelSourceError(
      f'{where}: config.task={task!r} takes query patches, but its model has model.num_patches=0'
    )
  if kind not in kinds:
    if kind == 'oneshot':
      raise ModelSourceError(
        f'{where} is a one-shot detector: it needs a query (predict --query=crop.jpg)'
      )
    if kind == 'pretrain':
      raise ModelSourceError(
        f'{where} holds an UP-DETR pre-training model '
        f'(model.num_patches={patches}), which needs query patches '
        '(predict --query_box / --query); fine-tune it into DETR (or a one-shot detector) '
        'first'
      )
    raise ModelSourceError(f'{where} is a DETR, which takes no query patches')
  model = build_model(model_config)
  if workdir:
    source = {'workdir': workdir, 'which': which, 'step': int(step)}
  else:
    variables = load_model_variables(model, model_config, checkpoint)
    source = {'checkpoint': checkpoint}
  return LoadedModel(model, variables, model_config, source, kind)


def load_model_or_usage_error(kinds=MODEL_KINDS, **sources) -> LoadedModel:
  """``load_model(**sources)`` for a command line: its ``ModelSourceError`` becomes a
  usage error. ``sources``: the flags ``MODEL_SOURCES`` name."""
  try:
    return load_model(kinds=kinds, **sources)
  except ModelSourceError as e:
    raise app.UsageError(str(e)) from e


def load_image(path: str) -> np.ndarray:
  """File -> RGB uint8 [H, W, 3]."""
  with Image.open(path) as im:
    return np.asarray(im.convert('RGB'))


def resize_rule_tf(height, width, scale: int, max_size: int | None):
  """``data.augment.resize_rule`` in TensorFlow ops, for sizes known only when run.

  Args: height, width: int scalar tensors; scale, max_size: Python ints (max_size
    0 or None: no cap). Returns (new_h, new_w) int32 scalar tensors, equal to
    ``resize_rule``'s: its arithmetic (``data.augment.resized_size``) on TensorFlow's
    float64 ops.
  """
  import tensorflow as tf  # noqa: PLC0415
  from updetr_jax.data import augment  # noqa: PLC0415

  new_h, new_w = augment.resized_size(
    tf.cast(height, tf.float64),
    tf.cast(width, tf.float64),
    tf.constant(scale, tf.float64),
    max_size,
    tf,
  )
  return tf.cast(new_h, tf.int32), tf.cast(new_w, tf.int32)


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
  files.write_json(os.path.join(output, 'detections.json'), records, indent=None)
  return records


def make_patch_detect_fn(model):
  """Jitted (variables, images [B, H, W, 3], padding_mask [B, H, W], patches
  [B, K, P, P, 3]) -> (boxes [B, K, 4] cxcywh of the unpadded image, scores [B, K]):
  each patch's answer, the top-scoring query of its group (``evaluate.
  patch_predictions``, the pre-training evaluation's group_top), in eval mode."""

  @jax.jit
  def detect(variables, images, padding_mask, patches):
    out = model.apply(variables, images, padding_mask, patches)
    return evaluate.patch_predictions(out, patches.shape[1])

  return detect


def _cxcywh_to_xyxy_pixels(boxes, height: int, width: int) -> np.ndarray:
  """[K, 4] cxcywh in [0, 1] -> xyxy pixels [K, 4], clipped to the image."""
  cx, cy, w, h = np.asarray(boxes, np.float64).T
  size = np.array([width, height, width, height], np.float64)
  xyxy = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * size
  return np.clip(xyxy, 0.0, size)


def _xyxy_pixels_to_cxcywh(boxes, height: int, width: int) -> np.ndarray:
  """[K, 4] xyxy pixels -> cxcywh [K, 4] relative to the image."""
  x0, y0, x1, y1 = np.asarray(boxes, np.float64).T
  return np.stack(
    [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height], -1
  )


def predict_patch_files(
  model,
  variables,
  paths,
  output: str,
  *,
  patch_size: int,
  query_boxes=None,
  patches: np.ndarray | None = None,
  query_names=None,
  scale: int = 480,
  max_size: int = 600,
) -> list[dict]:
  """Query patch detection with an UP-DETR pre-training model (as the release's
  notebook): finds K query patches in each image; writes detections.json and one png
  per image.

  Args:
    query_boxes: K boxes x0, y0, x1, y1 in pixels, cropped from each image itself
      (``preprocess_query``: the pre-training's patch crop, resize to patch_size and
      normalisation) as its K query patches.
    patches: or K query patches float32 [K, P, P, 3] (``preprocess_query``), the same
      for every image; query_names: K names recorded with them (e.g. the files).
    scale, max_size: the image resize (the pre-training evaluation's data.eval_scale
      and data.max_size), run alone with no padding as ``predict_files``.
  Returns: the records, one per (image, patch), as in the module docstring (score: the
    probability of 'is the patch', label 1, of the top query of group k).
  """
  if (query_boxes is None) == (patches is None):
    raise ValueError('give exactly one of query_boxes and patches')
  os.makedirs(output, exist_ok=True)
  detect = make_patch_detect_fn(model)
  records = []
  for i, (path, name) in enumerate(zip(paths, _png_names(paths))):
    image = load_image(path)
    h, w = image.shape[:2]
    if query_boxes is not None:
      patches_i = np.stack([preprocess_query(image, patch_size, b) for b in query_boxes])
    else:
      patches_i = np.asarray(patches, np.float32)
    x = preprocess(image, scale, max_size)
    boxes, scores = jax.device_get(
      detect(variables, x[None], np.zeros((1,) + x.shape[:2], bool), patches_i[None])
    )
    boxes, scores = boxes[0], scores[0]
    xyxy = _cxcywh_to_xyxy_pixels(boxes, h, w)
    ious = None
    if query_boxes is not None:
      ious = np.asarray(box_ops.box_iou(xyxy, np.asarray(query_boxes, np.float64))[0])
    for k in range(len(patches_i)):
      x0, y0, x1, y1 = (float(v) for v in xyxy[k])
      rec = {
        'file_name': os.path.basename(path),
        'image_id': i,
        'patch': k,
        'bbox': [x0, y0, x1 - x0, y1 - y0],
        'score': float(scores[k]),
      }
      if query_boxes is not None:
        rec.update(query_box=[float(v) for v in query_boxes[k]], iou=float(ious[k]))
      else:
        rec['query'] = str(query_names[k]) if query_names is not None else f'#{k}'
      records.append(rec)
    visualize.plot_patch_detection(
      os.path.join(output, f'{name}.png'),
      image,
      None,
      patches_i,
      None if query_boxes is None else _xyxy_pixels_to_cxcywh(query_boxes, h, w),
      _xyxy_pixels_to_cxcywh(xyxy, h, w),
      ious,
      title=f'{name}: query patches found (dashed)'
      + (', their boxes (solid)' if query_boxes is not None else ''),
      scores=scores,
    )
  files.write_json(os.path.join(output, 'detections.json'), records, indent=None)
  return records


def _parse_box(text: str) -> list[float]:
  try:
    box = [float(v) for v in text.split(',')]
  except ValueError:
    box = []
  if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
    raise app.UsageError(f'--query_box={text!r}: give x0,y0,x1,y1 with x0<x1, y0<y1')
  return box


def _pretrain_queries(where: str, num_patches: int, queries, query_boxes, paths, size: int):
  """The query patches of a pre-training model (from ``where``, with ``num_patches``)
  from --query files and --query_box texts: kwargs of ``predict_patch_files``. Raises
  app.UsageError on a wrong combination."""
  m = num_patches
  queries, boxes = list(queries), [_parse_box(b) for b in query_boxes]
  if not queries and not boxes:
    raise app.UsageError(
      f'{where} holds an UP-DETR pre-training model '
      f'(model.num_patches={m}): give its query patches, --query_box=x0,y0,x1,y1 '
      '(repeated, boxes of each image in pixels) or --query=crop.jpg (repeated, patches '
      'searched in every image)'
    )
  if queries and boxes and len(queries) > 1:
    raise app.UsageError(
      '--query_box with --query crops the one --query file: give one --query, or no '
      '--query_box (whole files)'
    )
  k = len(boxes) or len(queries)
  if k > m:
    raise app.UsageError(
      f'{k} query patches given, but the model has model.num_patches={m}: give at most '
      f'{m} (--query_box or --query)'
    )
  if queries:
    if boxes:  # the boxes are crops of the --query file
      image, base = load_image(queries[0]), os.path.basename(queries[0])
      crops = [(image, b, f'{base}[{",".join(f"{v:g}" for v in b)}]') for b in boxes]
    else:
      crops = [(load_image(q), None, os.path.basename(q)) for q in queries]
    return {
      'patches': np.stack([preprocess_query(im, size, b) for im, b, _ in crops]),
      'query_names': [name for _, _, name in crops],
    }
  for path in paths:  # the boxes are cut from each image: inside every one
    with Image.open(path) as im:  # the size, from the header
      w, h = im.size
    for b in boxes:
      if b[0] < 0 or b[1] < 0 or b[2] > w or b[3] > h:
        raise app.UsageError(
          f'--query_box={",".join(f"{v:g}" for v in b)} is not inside {path} ({w} x {h} pixels)'
        )
  return {'query_boxes': boxes}


def main(argv):
  FLAGS = flags.FLAGS  # noqa: N806
  cli.setup_logging()
  paths = argv[1:]
  if not paths:
    raise app.UsageError('give at least one image file')
  queries, boxes = list(FLAGS.query or []), list(FLAGS.query_box or [])
  # A one-shot detector needs a --query.
  model, variables, model_config, source, kind = load_model_or_usage_error(
    MODEL_KINDS if queries else ('detr', 'pretrain'), **{k: FLAGS[k].value for k in MODEL_SOURCES}
  )
  where = FLAGS.workdir or FLAGS.checkpoint
  if kind == 'detr' and (queries or boxes):
    raise app.UsageError(
      f'{where} is a DETR, which takes no --query / --query_box (a one-shot or '
      'pre-training model does)'
    )
  if kind == 'oneshot' and (len(queries) > 1 or len(boxes) > 1):
    raise app.UsageError(
      'a one-shot detector takes one --query (and at most one --query_box in it)'
    )
  data = data_config(workdir=FLAGS.workdir, config=FLAGS.config)
  size = FLAGS.query_size or int(data.get('patch_size', 0)) or 128
  patch_queries = None
  if kind == 'pretrain':
    m = model_config['num_patches']
    patch_queries = _pretrain_queries(where, m, queries, boxes, paths, size)
  if 'step' in source:
    print(f'restored step {source["step"]} of {source["workdir"]} ({source["which"]})')
  if patch_queries is not None:
    records = predict_patch_files(
      model,
      variables,
      paths,
      FLAGS.output,
      patch_size=size,
      scale=FLAGS.scale if FLAGS['scale'].present else int(data.get('eval_scale', 480)),
      max_size=FLAGS.max_size if FLAGS['max_size'].present else int(data.get('max_size', 600)),
      **patch_queries,
    )
    mean = np.mean([r['score'] for r in records])
    print(
      f'{len(paths)} images x {len(records) // len(paths)} query patches, mean score '
      f'{mean:.3f}; wrote {FLAGS.output}/detections.json and pngs'
    )
    return
  query = None
  if queries:
    box = _parse_box(boxes[0]) if boxes else None
    query = preprocess_query(load_image(queries[0]), size, box)
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
  flags.DEFINE_float('threshold', 0.7, 'score threshold for the pictures (DETR, one-shot)')
  flags.DEFINE_enum(
    'class_names', 'coco', ['coco', 'voc', 'none'], 'label names for the pictures and json'
  )
  flags.DEFINE_integer(
    'scale', 800, 'shorter side after resizing (pre-training model: default data.eval_scale)'
  )
  flags.DEFINE_integer(
    'max_size', 1333, 'cap on the longer side (pre-training model: default data.max_size)'
  )
  flags.DEFINE_multi_string(
    'query',
    None,
    'image file of a query: one-shot, the query object; pre-training, a query patch '
    '(repeat for up to model.num_patches)',
  )
  flags.DEFINE_multi_string(
    'query_box',
    None,
    'x0,y0,x1,y1 pixels: one-shot, the query object in --query; pre-training, a query '
    'patch cut from each image (or from the one --query; repeat for up to '
    'model.num_patches)',
  )
  flags.DEFINE_integer(
    'query_size', 0, 'query side after resizing (0: the model data.patch_size, else 128)'
  )
  flags.mark_flags_as_required(['output'])


def cli_main():
  """Console script ``updetr-predict``."""
  cli.run(main, _define_flags)


if __name__ == '__main__':
  cli_main()
