"""Flax modules: ResNet backbone, position encodings, transformer, DETR, UP-DETR."""

from absl import logging
import jax
import jax.numpy as jnp

from updetr_jax.models.detr import DETR, REMAT_CHOICES
from updetr_jax.models.transformer import ATTENTION_CHOICES
from updetr_jax.models.updetr import UPDETR, group_attention_mask

__all__ = [
  'DETR',
  'UPDETR',
  'ATTENTION_CHOICES',
  'REMAT_CHOICES',
  'build_model',
  'group_attention_mask',
  'init_variables',
  'variable_shapes',
]

_FIELDS = (
  'backbone',
  'dilation',
  'position_embedding',
  'hidden_dim',
  'nheads',
  'enc_layers',
  'dec_layers',
  'dim_feedforward',
  'dropout',
  'num_queries',
  'pre_norm',
  'num_classes',
  'aux_loss',
)


def build_model(model_config, dtype=None):
  """Builds DETR, or UP-DETR when ``model_config.num_patches`` is set (> 0).

  Args: model_config: the ``.model`` ConfigDict (or any mapping) with the release's
    argument names. dtype: activation/matmul dtype (default: model_config.dtype or
    float32); parameters are always float32. Optional fields: ``remat`` (one of
    REMAT_CHOICES, default '': no rematerialisation), ``attention`` (one of
    ATTENTION_CHOICES, default 'einsum': the release's attention; 'dot_product' /
    'cudnn' use ``jax.nn.dot_product_attention`` and skip the dropout on attention
    probabilities, logged as a warning when ``dropout`` > 0; same parameters),
    ``value_pos`` (default False: positions in the decoder cross-attention's values
    too; not in the release, same parameters),
    ``num_patches``, ``patch_query_drop``, ``feature_head`` (UP-DETR's feature_align,
    default True; False for the one-shot detector), ``patch_feature_norm``,
    ``query_shuffle`` and ``patch_content`` (UP-DETR options, default False;
    models/updetr.py).
  """
  cfg = dict(model_config)
  missing = [f for f in _FIELDS if f not in cfg]
  if missing:
    raise ValueError(f'model config is missing fields: {missing}')
  kwargs = {f: cfg[f] for f in _FIELDS}
  dtype = dtype or cfg.get('dtype', 'float32')
  kwargs['dtype'] = jnp.dtype(dtype)
  if kwargs['dtype'] not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"model.dtype={dtype!r}: expected 'float32' or 'bfloat16'")
  kwargs['remat'] = cfg.get('remat') or ''
  if kwargs['remat'] not in REMAT_CHOICES:
    raise ValueError(f'model.remat={kwargs["remat"]!r}: expected one of {REMAT_CHOICES}')
  kwargs['attention'] = cfg.get('attention') or 'einsum'
  kwargs['value_pos'] = bool(cfg.get('value_pos', False))
  if kwargs['attention'] not in ATTENTION_CHOICES:
    raise ValueError(
      f'model.attention={kwargs["attention"]!r}: expected one of {ATTENTION_CHOICES}'
    )
  if kwargs['attention'] != 'einsum' and kwargs['dropout'] > 0:
    logging.warning(
      'model.attention=%r applies no dropout to attention probabilities '
      '(the release applies model.dropout=%s there too); residual and FFN '
      'dropout are unchanged',
      kwargs['attention'],
      kwargs['dropout'],
    )
  if cfg.get('num_patches'):
    if kwargs['num_queries'] % cfg['num_patches']:
      raise ValueError(
        f'model.num_queries={kwargs["num_queries"]} must be divisible by '
        f'model.num_patches={cfg["num_patches"]}'
      )
    return UPDETR(
      **kwargs,
      num_patches=cfg['num_patches'],
      patch_query_drop=cfg.get('patch_query_drop', 0.1),
      feature_head=bool(cfg.get('feature_head', True)),
      patch_feature_norm=bool(cfg.get('patch_feature_norm', False)),
      query_shuffle=bool(cfg.get('query_shuffle', False)),
      patch_content=bool(cfg.get('patch_content', False)),
    )
  return DETR(**kwargs)


def _dummy_inputs(model):
  """Smallest inputs that build every variable: a 64x64 image (+ 32x32 patches)."""
  images = jnp.zeros((1, 64, 64, 3), jnp.float32)
  mask = jnp.zeros((1, 64, 64), bool)
  if hasattr(model, 'num_patches'):
    return images, mask, jnp.zeros((1, model.num_patches, 32, 32, 3), jnp.float32)
  return images, mask, None


def variable_shapes(model) -> dict:
  """Shapes/dtypes of the model's variables, without computing anything."""
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), *_dummy_inputs(model))


def init_variables(model, rng):
  """Initialised variables (jitted init on small dummy inputs)."""
  return jax.jit(model.init)(rng, *_dummy_inputs(model))
