"""The model config's fields: each one's default and allowed values, written once.

``configs.common.detr_model`` builds the DETR config from ``DETR_FIELDS`` (the UP-DETR
configs add ``PATCH_FIELDS``); ``build_model`` reads a config through ``fill`` and
``validate``; the pre-trained init's architecture comparison and the checkpoint config
check read both configs through ``fill``, so that a config saved before a field existed
means that field's default. The modules' own defaults (models/detr.py, updetr.py) are
these too. Plain Python: importing it builds nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Field:
  """One model config field.

  default: its value in ``detr_model`` and in a config that lacks it (or sets it to
    None, or to '' when the default is a string).
  choices: the allowed values; () allows any.
  required: in every model config since the first release: ``build_model`` refuses a
    config without it (the others are filled with their default).
  """

  default: Any
  choices: tuple = ()
  required: bool = False


# model.dtype: activation / matmul dtype; parameters and losses stay float32.
DTYPE_CHOICES = ('float32', 'bfloat16')
# model.remat: which blocks recompute their activations in the backward pass
# (less memory, about one more forward of those blocks); parameter names unchanged.
REMAT_CHOICES = ('', 'transformer', 'backbone', 'all')
# model.attention: how the attention itself is computed (models/transformer.py).
ATTENTION_CHOICES = ('einsum', 'dot_product', 'cudnn')

# DETR R50 as released (field names = the release's arguments) and its options: the
# fields of every model config.
DETR_FIELDS = {
  'backbone': Field('resnet50', required=True),
  'dilation': Field(False, required=True),
  'position_embedding': Field('sine', required=True),
  'hidden_dim': Field(256, required=True),
  'nheads': Field(8, required=True),
  'enc_layers': Field(6, required=True),
  'dec_layers': Field(6, required=True),
  'dim_feedforward': Field(2048, required=True),
  'dropout': Field(0.1, required=True),
  'num_queries': Field(100, required=True),
  'pre_norm': Field(False, required=True),
  # COCO category ids up to 90 -> 92 logits with "no object"
  'num_classes': Field(91, required=True),
  'aux_loss': Field(True, required=True),
  # 'bfloat16': bf16 activations/matmuls, float32 params and losses
  'dtype': Field('float32', DTYPE_CHOICES),
  # '' | 'transformer' | 'backbone' | 'all': recompute in the backward pass
  'remat': Field('', REMAT_CHOICES),
  # 'einsum' (the release's attention, with dropout on the probabilities) |
  # 'dot_product' (jax.nn.dot_product_attention, XLA) | 'cudnn' (its fused kernel);
  # the last two skip attention-probability dropout (models/transformer.py)
  'attention': Field('einsum', ATTENTION_CHOICES),
  # Not in the release: positions in the decoder cross-attention's values too
  # (models/transformer.py; same parameters, so keep it as pre-trained).
  'value_pos': Field(False),
}

# UP-DETR's fields (models/updetr.py; configs/pretrain.py sets the release's values):
# num_patches > 0 builds UP-DETR, 0 DETR.
PATCH_FIELDS = {
  'num_patches': Field(0),
  'feature_recon': Field(False),  # the feature reconstruction loss
  'patch_query_drop': Field(0.1),  # per-query probability of dropping the patch feature
  'feature_head': Field(True),  # feature_align; the one-shot detector has none
  # Not in the release (models/updetr.py):
  'patch_feature_norm': Field(False),
  'query_shuffle': Field(False),
  'patch_content': Field(False),
}

FIELDS = {**DETR_FIELDS, **PATCH_FIELDS}
DEFAULTS = {name: f.default for name, f in FIELDS.items()}


def check(name: str, value) -> None:
  """ValueError when ``value`` is not one of field ``name``'s choices."""
  choices = FIELDS[name].choices
  if choices and value not in choices:
    raise ValueError(f'model.{name}={value!r}: expected one of {choices}')


def fill(model_config) -> dict:
  """The model config (a ConfigDict or a mapping) as a dict in which every field but
  the required ones that it lacks has its default, as a config saved before the field
  existed means. None, and '' for a field with a string default, also mean the
  default; the boolean fields are made bool."""
  out = dict(model_config)
  for name, f in FIELDS.items():
    if f.required:
      continue
    value = out.get(name)
    if value is None or (value == '' and isinstance(f.default, str)):
      out[name] = f.default
    elif isinstance(f.default, bool):
      out[name] = bool(value)
  return out


def validate(config: dict) -> None:
  """ValueError naming a required field that ``config`` (``fill``'s dict) lacks, a value
  outside its field's choices, or num_queries not divisible by num_patches."""
  missing = [name for name, f in FIELDS.items() if f.required and name not in config]
  if missing:
    raise ValueError(f'model config is missing fields: {missing}')
  for name in FIELDS:
    check(name, config[name])
  if config['num_patches'] and config['num_queries'] % config['num_patches']:
    raise ValueError(
      f'model.num_queries={config["num_queries"]} must be divisible by '
      f'model.num_patches={config["num_patches"]}'
    )
