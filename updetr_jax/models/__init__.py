"""Flax modules: ResNet backbone, position encodings, transformer, DETR, UP-DETR."""

from absl import logging
import jax
import jax.numpy as jnp

from updetr_jax.models import fields
from updetr_jax.models.detr import DETR
from updetr_jax.models.fields import ATTENTION_CHOICES, REMAT_CHOICES
from updetr_jax.models.updetr import UPDETR, group_attention_mask

__all__ = [
  'DETR',
  'UPDETR',
  'ATTENTION_CHOICES',
  'REMAT_CHOICES',
  'build_model',
  'fields',
  'group_attention_mask',
  'init_variables',
  'variable_shapes',
]


def build_model(model_config, dtype=None):
  """Builds DETR, or UP-DETR when ``model_config.num_patches`` is set (> 0).

  Args:
    model_config: the ``.model`` ConfigDict (or any mapping) with the release's
      argument names; the fields, their defaults (for the optional ones, when absent)
      and allowed values are ``fields.FIELDS``. ``attention`` 'dot_product' / 'cudnn'
      skip the dropout on attention probabilities, logged as a warning when ``dropout``
      > 0; UP-DETR's options are in models/updetr.py.
    dtype: activation/matmul dtype (default: model_config.dtype); parameters are
      always float32.
  """
  cfg = fields.fill(model_config)
  if dtype is not None:
    cfg['dtype'] = jnp.dtype(dtype).name
  fields.validate(cfg)
  kwargs = {f: cfg[f] for f in fields.DETR_FIELDS}
  kwargs['dtype'] = jnp.dtype(cfg['dtype'])
  if cfg['attention'] != 'einsum' and cfg['dropout'] > 0:
    logging.warning(
      'model.attention=%r applies no dropout to attention probabilities '
      '(the release applies model.dropout=%s there too); residual and FFN '
      'dropout are unchanged',
      cfg['attention'],
      cfg['dropout'],
    )
  if cfg['num_patches']:
    patch_kwargs = {f: cfg[f] for f in fields.PATCH_FIELDS if f != 'feature_recon'}
    return UPDETR(**kwargs, **patch_kwargs)
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
