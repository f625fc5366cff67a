r"""Export a DETR detector for serving: a TF SavedModel and a ``jax.export`` artifact.

  python -m updetr_jax.export --workdir=/tmp/finetune --output=/tmp/served
  python -m updetr_jax.export --checkpoint=/tmp/detr_r50 \
      --config=configs/finetune_coco.py --output=/tmp/served

--workdir (a fine-tuning workdir; --which=auto|best|latest as in ``predict``) or
--checkpoint (Orbax variables or a PyTorch ``.pth``) with --config give the model.
Writes into --output (see docs/export.md):
  saved_model/          TF SavedModel (``jax2tf``), signature ``serving_default``:
                        images uint8 [B, H, W, 3] (any B, H, W; one size per batch) ->
                        boxes float32 [B, N, 4] (xyxy, original pixels), scores float32
                        [B, N], labels int32 [B, N].
  detector.jax_export   serialized ``jax.export.Exported`` (StableHLO, weights inside):
                        (images float32 [B, h, w, 3] resized and normalised, orig_size
                        float32 [B, 2]) -> (scores [B, N], labels [B, N], boxes [B, N, 4]).
  export.json           the inputs/outputs of both, the model config, scale/max_size, the
                        class names (--class_names), where the weights came from.

One preprocessing. Both run what ``predict`` runs: ``predict.preprocess_images`` (DETR's
resize rule: shorter side --scale, longer side at most --max_size; bilinear resize as the
evaluation pipeline; ImageNet normalisation), then each image alone, unpadded, through
the model and ``evaluate.postprocess`` (``evaluate.make_detect_fn`` with a mask of
zeros). DETR's outputs depend on the canvas an image runs in (``evaluate``'s module
docstring, "Padding"), so no batch is padded: a batch holds images of one size, which
give the same detections alone or together.

Where the resize runs. The resized size, e.g. round(800 * H / min(H, W)), cannot be
computed from symbolic dimensions in a shape-polymorphic JAX function (no division by a
symbolic dimension), so the resize is TensorFlow: inside the SavedModel's
``tf.function`` (sizes known when run), before the converted JAX function, whose image
dimensions (b, h, w) are symbolic. The ``jax.export`` artifact holds that JAX function
only: its caller resizes and normalises, e.g. with ``predict.preprocess_images``, whose
outputs are the artifact's inputs.

Symbolic image sizes. ``DETR.encode_image`` downsamples the padding mask to the C5 map
with indices computed in numpy from the static shapes, which symbolic sizes cannot give.
Unpadded, that mask is all False, so the export traces the model with its
``encode_image`` replaced (``flax.linen.intercept_methods``) by the same computation
with the C5 mask made directly as zeros; nothing else of the model changes. A model with
the learned position embedding (a 50x50 table) exports with the bound on (h, w) it needs
(``shape_constraints``); larger inputs fail when called, as they do in the model.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from updetr_jax import cli, evaluate, files, normalization, predict
from updetr_jax.class_names import get_class_names
from updetr_jax.data import augment
from updetr_jax.models.position import PositionEmbeddingLearned

SAVED_MODEL_DIR = 'saved_model'
JAX_EXPORT_FILE = 'detector.jax_export'
METADATA_FILE = 'export.json'
SIGNATURE = 'serving_default'
FORMAT_VERSION = 1


def _unpadded_encode_image(next_fun, args, kwargs, context):
  """Flax method interceptor: ``DETR.encode_image`` for unpadded images of any,
  possibly symbolic, size (its padding mask argument is ignored: all False).

  Same computation as ``encode_image``, except that the C5 padding mask is made as
  zeros instead of downsampled from the (all-False) image mask.
  """
  if context.method_name != 'encode_image':
    return next_fun(*args, **kwargs)
  module = context.module
  feat = module.body(args[0] if args else kwargs['images'])
  return module.encode_features(feat, jnp.zeros(feat.shape[:3], bool))


def shape_constraints(model) -> tuple[str, ...]:
  """Bounds on the symbolic resized size (h, w) that the model needs: the learned
  position embedding covers C5 maps of at most ``max_len`` cells a side (images of
  at most 32 * 50 = 1600 px a side, 800 with a dilated C5); none for the sine one."""
  if model.position_embedding in ('learned', 'v3'):
    side = (16 if model.dilation else 32) * PositionEmbeddingLearned.max_len
    return (f'h <= {side}', f'w <= {side}')
  return ()


def make_serving_fn(model):
  """The exported JAX function, traceable with symbolic batch and image sizes.

  Returns fn(variables, images [B, h, w, 3] float32 resized and normalised,
  orig_size [B, 2] float32 (H, W) of the original images) -> (scores [B, N] float32,
  labels [B, N] int32, boxes [B, N, 4] float32 xyxy in original pixels): the model
  run on each image unpadded and ``evaluate.postprocess``, as ``predict``.
  """
  if getattr(model, 'num_patches', 0):
    raise ValueError(
      f'an UP-DETR pre-training model (num_patches={model.num_patches}) '
      'needs query patches; fine-tune it into DETR to export it'
    )
  detect = evaluate.make_detect_fn(model)

  def serve(variables, images, orig_size):
    with nn.intercept_methods(_unpadded_encode_image):
      return detect(variables, images, jnp.zeros(images.shape[:3], bool), orig_size)

  return serve


def export_jax(model, variables, platforms: Sequence[str] = ('cpu',)):
  """``jax.export.Exported`` of ``make_serving_fn(model)`` with the variables as
  constants: call(images [B, h, w, 3] float32, orig_size [B, 2] float32) ->
  (scores, labels, boxes), B, h, w symbolic."""
  serve = make_serving_fn(model)
  variables = jax.device_get(variables)
  b, h, w = jax.export.symbolic_shape('b, h, w', constraints=shape_constraints(model))
  return jax.export.export(
    jax.jit(lambda x, size: serve(variables, x, size)), platforms=tuple(platforms)
  )(jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32), jax.ShapeDtypeStruct((b, 2), jnp.float32))


def save_tf(
  model, variables, path: str, *, scale: int, max_size: int, platforms: Sequence[str] = ('cpu',)
) -> None:
  """Writes the TF SavedModel (signature ``serving_default``, see the module docstring): a
  tf.Module whose ``serve`` is the signature, the weights as tf.Variables."""
  import tensorflow as tf  # noqa: PLC0415
  from jax.experimental import jax2tf  # noqa: PLC0415

  converted = jax2tf.convert(
    make_serving_fn(model),
    with_gradient=False,
    polymorphic_shapes=[None, '(b, h, w, 3)', '(b, 2)'],
    polymorphic_constraints=shape_constraints(model),
    native_serialization_platforms=tuple(platforms),
  )
  module = tf.Module()
  module.variables_tree = tf.nest.map_structure(
    lambda v: tf.Variable(np.asarray(v), trainable=False), jax.device_get(variables)
  )

  @tf.function(
    autograph=False, input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name='images')]
  )
  def serve(images):
    x, orig_size = predict.preprocess_images(images, scale, max_size)
    scores, labels, boxes = converted(module.variables_tree, x, orig_size)
    return {'boxes': boxes, 'scores': scores, 'labels': labels}

  module.serve = serve
  tf.saved_model.save(module, path, signatures={SIGNATURE: module.serve.get_concrete_function()})


def _model_fields(model) -> dict:
  """The model's dataclass fields as json values (dtypes as names)."""
  out = {}
  for f in dataclasses.fields(model):
    if f.name in ('parent', 'name'):
      continue
    v = getattr(model, f.name)
    out[f.name] = (
      v
      if isinstance(v, (bool, int, float, str, type(None)))
      else str(jnp.dtype(v) if f.name == 'dtype' else v)
    )
  return out


def _tensor(dtype: str, shape: list, description: str, **name) -> dict:
  """export.json's description of one input or output (``name=``: first, when given)."""
  return {**name, 'dtype': dtype, 'shape': shape, 'description': description}


def _metadata(
  model, exported, *, scale, max_size, class_names, model_config, platforms, source
) -> dict:
  n, c = model.num_queries, model.num_classes
  size_rule = (
    f'(h, w) = updetr_jax.data.augment.resize_rule(H, W, {scale}, {max_size}): '
    f'shorter side {scale}, longer side at most {max_size}'
  )
  outputs = {
    'scores': _tensor('float32', ['B', n], f'max softmax probability over the {c} real classes'),
    'labels': _tensor('int32', ['B', n], 'argmax over the real classes (0..num_classes-1)'),
    'boxes': _tensor('float32', ['B', n, 4], 'x0, y0, x1, y1 in original-image pixels'),
  }
  return {
    'format_version': FORMAT_VERSION,
    'preprocessing': {
      'scale': int(scale),
      'max_size': int(max_size) if max_size else None,
      'resize': size_rule + '; bilinear, antialiased when an axis shrinks below '
      f'{augment.ANTIALIAS_BELOW} of its size (data.augment.resize_image)',
      'normalize': '(pixel / 255 - mean) / std',
      'mean': list(normalization.MEAN),
      'std': list(normalization.STD),
      'function': 'updetr_jax.predict.preprocess_images',
      'padding': 'none: every image runs at its resized size',
    },
    'saved_model': {
      'path': SAVED_MODEL_DIR,
      'signature': SIGNATURE,
      'inputs': {
        'images': _tensor(
          'uint8',
          ['B', 'H', 'W', 3],
          'RGB images of one size per batch; resized and normalised inside (preprocessing)',
        )
      },
      'outputs': outputs,
      'platforms': list(platforms),
    },
    'jax_export': {
      'path': JAX_EXPORT_FILE,
      'load': 'jax.export.deserialize(bytearray(open(path, "rb").read()))',
      'inputs': [
        _tensor(
          'float32',
          ['B', 'h', 'w', 3],
          'the images resized and normalised as in preprocessing, '
          'unpadded (= predict.preprocess_images(...)[0])',
          name='images',
        ),
        _tensor(
          'float32',
          ['B', 2],
          '(H, W) of the original images (= predict.preprocess_images(...)[1])',
          name='orig_size',
        ),
      ],
      'outputs': [dict(name=k, **outputs[k]) for k in ('scores', 'labels', 'boxes')],
      'shape_constraints': list(shape_constraints(model)),
      'platforms': list(exported.platforms),
      'calling_convention_version': int(exported.calling_convention_version),
      'jax_version': jax.__version__,
    },
    'num_queries': n,
    'num_classes': c,
    'model': dict(model_config) if model_config is not None else _model_fields(model),
    'class_names': (
      {str(k): v for k, v in sorted(class_names.items())} if class_names is not None else None
    ),
    'source': dict(source or {}),
  }


def export_detector(
  model,
  variables,
  output_dir: str,
  *,
  scale: int = 800,
  max_size: int = 1333,
  class_names: Mapping[int, str] | None = None,
  model_config: Mapping | None = None,
  platforms: Sequence[str] = ('cpu',),
  source: Mapping | None = None,
) -> dict:
  """Writes output_dir/saved_model, output_dir/detector.jax_export and export.json.

  Args: model: a DETR (``build_model``); variables: its {'params', 'batch_stats'};
    scale, max_size: DETR's resize rule; class_names: {label: name} or None;
    model_config: recorded in export.json (default: the model's fields); platforms:
    what the StableHLO is lowered for ('cpu', 'cuda', 'tpu'); source: recorded as is
    (e.g. the workdir and step).
  Returns: the contents of export.json.
  """
  platforms = tuple(platforms)
  files.makedirs(output_dir)
  logging.info('exporting with jax.export (platforms %s)', ','.join(platforms))
  exported = export_jax(model, variables, platforms)
  files.write_file(files.join(output_dir, JAX_EXPORT_FILE), bytes(exported.serialize()))
  logging.info('writing the TF SavedModel %s', files.join(output_dir, SAVED_MODEL_DIR))
  save_tf(
    model,
    variables,
    files.join(output_dir, SAVED_MODEL_DIR),
    scale=scale,
    max_size=max_size,
    platforms=platforms,
  )
  meta = _metadata(
    model,
    exported,
    scale=scale,
    max_size=max_size,
    class_names=class_names,
    model_config=model_config,
    platforms=platforms,
    source=source,
  )
  files.write_json(files.join(output_dir, METADATA_FILE), meta, indent=1)
  logging.info('wrote %s', output_dir)
  return meta


def load_jax_export(output_dir: str):
  """The deserialized ``jax.export.Exported`` of an export directory."""
  with files.open_file(files.join(output_dir, JAX_EXPORT_FILE), 'rb') as f:
    return jax.export.deserialize(bytearray(f.read()))


def main(argv):
  FLAGS = flags.FLAGS  # noqa: N806
  cli.setup_logging()
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  model, variables, model_config, source, _ = predict.load_model_or_usage_error(
    ('detr',), **{k: FLAGS[k].value for k in predict.MODEL_SOURCES}
  )
  if 'step' in source:
    logging.info('restored step %d of %s (%s)', source['step'], source['workdir'], source['which'])
  platforms = [p.strip() for p in FLAGS.platforms.split(',') if p.strip()]
  export_detector(
    model,
    variables,
    FLAGS.output,
    scale=FLAGS.scale,
    max_size=FLAGS.max_size,
    class_names=get_class_names(FLAGS.class_names),
    model_config=model_config,
    platforms=platforms,
    source=source,
  )
  print(
    f'wrote {FLAGS.output}/{SAVED_MODEL_DIR}, {FLAGS.output}/{JAX_EXPORT_FILE} and '
    f'{FLAGS.output}/{METADATA_FILE}'
  )


def _define_flags():
  predict.define_model_flags()
  flags.DEFINE_string('output', None, 'output directory')
  flags.DEFINE_enum(
    'class_names', 'coco', ['coco', 'voc', 'none'], 'label names recorded in export.json'
  )
  flags.DEFINE_integer('scale', 800, 'shorter side after resizing')
  flags.DEFINE_integer('max_size', 1333, 'cap on the longer side')
  flags.DEFINE_string(
    'platforms',
    'cpu',
    'comma-separated platforms the StableHLO is lowered for: cpu, cuda, '
    'tpu (one artifact can hold several)',
  )
  flags.mark_flags_as_required(['output'])


def cli_main():
  """Console script ``updetr-export``."""
  cli.run(main, _define_flags)


if __name__ == '__main__':
  cli_main()
