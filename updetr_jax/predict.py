r"""Run a DETR checkpoint on image files: COCO-style json and labelled pictures.

  python -m updetr_jax.predict --checkpoint=/tmp/detr_r50 \
      --config=configs/finetune_coco.py --output=/tmp/pred a.jpg b.png

--checkpoint: an Orbax variables checkpoint (``checkpoints.save_variables``, e.g.
written by ``updetr_jax.torch_import``) or a PyTorch ``.pth`` (imported on the fly).
--workdir: a DETR fine-tuning workdir; its own config.json gives the model (--config
is then not needed); --which picks the checkpoint: auto (default: the best-evaluated
one in workdir/best when present, else the latest), best or latest.

Each image is resized as DETR evaluates (shorter side --scale=800, longer side at
most --max_size=1333, ``data.augment.resize_rule``), normalised and run alone with
no padding (a canvas that depends on the image only; see ``evaluate``'s module
docstring). Writes OUT/detections.json: every one of the N predictions per image
(no threshold, no NMS, as DETR's COCO evaluation), each {file_name, image_id (the
position on the command line), category_id (= label), category_name (when
--class_names is not 'none'), bbox [x, y, w, h] in original pixels, score}; and
OUT/<name>.png with the boxes scoring >= --threshold.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from updetr_jax import checkpoints, evaluate, visualize
from updetr_jax.class_names import get_class_names
from updetr_jax.models import build_model

def _looks_like_train_workdir(path: str) -> bool:
  """A training workdir holds checkpoints/<step>/ (train.py's Orbax manager)."""
  sub = os.path.join(path, 'checkpoints')
  return os.path.isdir(sub) or any(
      d.isdigit() and os.path.isdir(os.path.join(path, d)) for d in os.listdir(path))


def load_model_variables(model, model_config, checkpoint: str):
  """Variables for ``model`` from an Orbax variables checkpoint or a ``.pth``."""
  if checkpoint.endswith('.pth'):
    from updetr_jax.torch_import import import_torch_checkpoint
    return import_torch_checkpoint(checkpoint, model_config)
  if os.path.isdir(checkpoint) and _looks_like_train_workdir(checkpoint):
    raise ValueError(f'{checkpoint} looks like a training workdir: pass it as --workdir')
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, 64, 64), bool)))
  return checkpoints.load_variables(checkpoint, abstract)


def load_image(path: str) -> np.ndarray:
  """File -> RGB uint8 [H, W, 3]."""
  with Image.open(path) as im:
    return np.asarray(im.convert('RGB'))


def preprocess(image_rgb: np.ndarray, scale: int, max_size: int) -> np.ndarray:
  """RGB uint8 [H, W, 3] -> resized (DETR rule, bilinear) ImageNet-normalised
  float32 [h, w, 3]."""
  from updetr_jax.data.augment import resize_rule
  h, w = image_rgb.shape[:2]
  nh, nw = resize_rule(h, w, scale, max_size)
  resized = Image.fromarray(image_rgb).resize((nw, nh), Image.BILINEAR)
  x = np.asarray(resized, np.float32) / 255.0
  return (x - visualize.IMAGENET_MEAN) / visualize.IMAGENET_STD


def _png_names(paths):
  """Unique output names: the file stem, suffixed by its position on a clash."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  return [f'{s}_{i}' if stems.count(s) > 1 else s for i, s in enumerate(stems)]


def predict_files(model, variables, paths, output: str, *, threshold: float = 0.7,
                  class_names=None, scale: int = 800, max_size: int = 1333) -> list[dict]:
  """Detects objects in image files; writes detections.json and one png per image.

  Returns the json's records (see the module docstring).
  """
  os.makedirs(output, exist_ok=True)
  detect = evaluate.make_detect_fn(model)
  evaluator = evaluate.CocoEvaluator()
  for i, (path, name) in enumerate(zip(paths, _png_names(paths))):
    image = load_image(path)
    out = evaluate.detect_images(detect, variables, [preprocess(image, scale, max_size)],
                                 [image.shape[:2]], batch_size=1, multiple=1)
    scores, labels, boxes = out['scores'][0], out['labels'][0], out['boxes'][0]
    evaluator.update([i], scores[None], labels[None], boxes[None])
    keep = scores >= threshold
    visualize.plot_detections(os.path.join(output, f'{name}.png'), image, boxes[keep],
                              labels[keep], scores[keep], class_names)
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
  from absl import app
  from updetr_jax import cli
  cli.setup_logging()
  paths = argv[1:]
  if not paths:
    raise app.UsageError('give at least one image file')
  if bool(_WORKDIR.value) == bool(_CHECKPOINT.value):
    raise app.UsageError('give exactly one of --workdir and --checkpoint')
  if _WORKDIR.value:
    variables, step, model_config = checkpoints.restore_workdir_variables(
        _WORKDIR.value, _WHICH.value)
    if model_config.get('num_patches'):
      raise app.UsageError(f'{_WORKDIR.value} holds an UP-DETR pre-training model '
                           f'(model.num_patches={model_config["num_patches"]}), which needs '
                           'query patches; fine-tune it into DETR first')
    model = build_model(model_config)
    print(f'restored step {step} of {_WORKDIR.value} ({_WHICH.value})')
  else:
    if _CONFIG.value is None:
      raise app.UsageError('--checkpoint needs --config (the model it was trained with)')
    model = build_model(_CONFIG.value.model)
    variables = load_model_variables(model, _CONFIG.value.model, _CHECKPOINT.value)
  records = predict_files(model, variables, paths, _OUTPUT.value,
                          threshold=_THRESHOLD.value,
                          class_names=get_class_names(_CLASS_NAMES.value),
                          scale=_SCALE.value, max_size=_MAX_SIZE.value)
  shown = sum(r['score'] >= _THRESHOLD.value for r in records)
  print(f'{len(paths)} images, {shown} detections >= {_THRESHOLD.value}; '
        f'wrote {_OUTPUT.value}/detections.json and pngs')


if __name__ == '__main__':
  from absl import app, flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file('config', None, 'config file (uses its .model)')
  _CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                    'Orbax variables checkpoint directory or PyTorch .pth')
  _WORKDIR = flags.DEFINE_string('workdir', None,
                                 'training workdir (latest checkpoint, its config.json)')
  _WHICH = flags.DEFINE_enum('which', 'auto', ['auto', 'best', 'latest'],
                             'with --workdir: the best-evaluated checkpoint (workdir/best), '
                             'the latest, or auto (best when there is one)')
  _OUTPUT = flags.DEFINE_string('output', None, 'output directory')
  _THRESHOLD = flags.DEFINE_float('threshold', 0.7, 'score threshold for the pictures')
  _CLASS_NAMES = flags.DEFINE_enum('class_names', 'coco', ['coco', 'voc', 'none'],
                                   'label names for the pictures and json')
  _SCALE = flags.DEFINE_integer('scale', 800, 'shorter side after resizing')
  _MAX_SIZE = flags.DEFINE_integer('max_size', 1333, 'cap on the longer side')
  flags.mark_flags_as_required(['output'])
  app.run(main)
