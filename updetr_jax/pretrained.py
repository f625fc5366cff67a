"""Pre-trained weights into a model: where they come from and what carries over.

``load_pretrained`` reads a training workdir, a PyTorch release ``.pth`` or Orbax
variables; ``init_from_pretrained`` copies every weight but the task heads into a
freshly initialised model (UP-DETR pre-training -> DETR fine-tuning, docs/method.md,
'Fine-tuning'; -> one-shot detection, which keeps ``patch2query`` as its query encoder).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import traverse_util

from updetr_jax import checkpoints, files
from updetr_jax.models import fields as model_fields
from updetr_jax.torch_import import import_torch_checkpoint, load_state_dict

# Fields that must agree between a pre-training checkpoint and the model it initialises.
ARCHITECTURE_FIELDS = (
  'backbone',
  'dilation',
  'position_embedding',
  'hidden_dim',
  'nheads',
  'enc_layers',
  'dec_layers',
  'dim_feedforward',
  'num_queries',
  'pre_norm',
  'value_pos',
)
# Fields that must agree too when the query-patch path (patch2query) is carried, as
# in a one-shot detector initialised from a pre-training; DETR has no patches.
PATCH_ARCHITECTURE_FIELDS = ('patch_content',)
# Always fresh in the initialised model: what its classes mean is task specific.
FRESH_HEADS = ('class_embed',)
# Query-patch heads: carried when both models have them (one-shot detection keeps the
# pre-trained patch2query, its query encoder); fresh when only the model has them (a
# one-shot detector from a DETR checkpoint). DETR has neither, so fine-tuning drops them.
PATCH_HEADS = ('patch2query', 'feature_align')


def load_pretrained(path: str, model_config):
  """Pre-trained weights for fine-tuning, from any of:

  * a training workdir (``config.json`` + ``checkpoints/``): its latest checkpoint;
  * a PyTorch release ``.pth`` (UP-DETR pre-training or DETR): imported with
    ``model_config``'s architecture, the heads sized from the file;
  * an Orbax variables checkpoint (``save_variables`` / ``updetr_jax.torch_import``).
  Returns (variables, model config dict of the source, or None when unknown).
  """
  if files.isdir(path) and files.exists(os.path.join(path, 'config.json')):
    variables, _, config = checkpoints.restore_workdir_variables(path)
    return variables, config
  if path.endswith('.pth'):
    sd = load_state_dict(path)
    if 'class_embed.weight' not in sd:
      raise ValueError(
        f'{path} has no class_embed.weight: not a DETR / UP-DETR model '
        '(a backbone-only file goes to init.backbone_checkpoint)'
      )
    config = dict(model_config)
    config.update(
      num_classes=int(sd['class_embed.weight'].shape[0]) - 1,
      num_patches=1 if 'patch2query.weight' in sd else 0,
      feature_recon=any(k.startswith('feature_align.') for k in sd),
    )
    return import_torch_checkpoint(sd, config), None
  if not files.isdir(path):
    raise FileNotFoundError(
      f'init.pretrained={path!r}: no such workdir, .pth file or Orbax checkpoint'
    )
  return checkpoints.load_variables(path), None


def init_from_pretrained(variables, model_config, pretrained, pretrained_model_config):
  """Fine-tuning init: every pre-trained weight except the task heads.

  Returns (variables, {'fresh': [top-level modules left at their init]}).

  Args:
    variables: freshly initialised variables of the fine-tuning model.
    model_config: its model config; pretrained / pretrained_model_config: the
      pre-training variables and model config (``load_pretrained``; a config of
      None checks the shapes only).
  Returns: (variables with every leaf copied from ``pretrained`` but ``FRESH_HEADS``
    and the ``PATCH_HEADS`` that ``pretrained`` lacks, which keep their fresh init;
    the sorted names of those fresh modules).
  Raises: ValueError naming the architecture fields that differ or the weights
    that are missing / misshapen.
  """
  src = traverse_util.flatten_dict(dict(pretrained))
  out = traverse_util.flatten_dict(dict(variables))
  has = {p[1] for p in src}
  wants = {p[1] for p in out}
  carries_patches = 'patch2query' in has & wants
  architecture = ARCHITECTURE_FIELDS + (PATCH_ARCHITECTURE_FIELDS if carries_patches else ())
  diff = []
  if pretrained_model_config is not None:
    # A config saved before a field existed means its default.
    theirs, ours = model_fields.fill(pretrained_model_config), model_fields.fill(model_config)
    diff = [
      f'{f}: pre-trained {theirs.get(f)!r} vs model {ours.get(f)!r}'
      for f in architecture
      if theirs.get(f) != ours.get(f)
    ]
  if diff:
    raise ValueError('pre-trained checkpoint has another architecture:\n  ' + '\n  '.join(diff))
  problems = []
  if carries_patches and ('patch_norm' in has) != ('patch_norm' in wants):
    # patch2query was trained on standardised (or raw) patch features: carrying it
    # without its statistics (or the reverse) would silently change its input.
    raise ValueError(
      'pre-trained patch2query was trained with model.patch_feature_norm='
      f'{"patch_norm" in has}, this model has {"patch_norm" in wants}: set '
      f'--config.model.patch_feature_norm={"patch_norm" in has}'
    )
  fresh = set()
  for path, leaf in out.items():
    if path[1] in FRESH_HEADS or (path[1] in PATCH_HEADS and path[1] not in has):
      fresh.add(path[1])
      continue
    if path not in src:
      problems.append(f'missing {"/".join(path)}')
    elif np.shape(src[path]) != np.shape(leaf):
      problems.append(
        f'{"/".join(path)}: pre-trained {np.shape(src[path])} vs model {np.shape(leaf)}'
      )
    else:
      out[path] = jax.numpy.asarray(src[path], leaf.dtype)
  if problems:
    raise ValueError('pre-trained weights do not fit the model:\n  ' + '\n  '.join(problems))
  return traverse_util.unflatten_dict(out), sorted(fresh)
