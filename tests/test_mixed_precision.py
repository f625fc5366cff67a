"""bfloat16 compute with float32 parameters, and rematerialisation (model.remat)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from test_train import fixed_batch, tiny_config
from updetr_jax import train_step
from updetr_jax.models import build_model
from updetr_jax.models import variable_shapes


def _float_dtypes(tree):
  return {
    str(x.dtype) for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)
  }


def _batch():
  return jax.tree_util.tree_map(jnp.asarray, fixed_batch())


def _assert_same_variable_tree(a, b):
  """Same paths, shapes and dtypes (ShapeDtypeStruct trees from variable_shapes)."""
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(
    lambda x, y: (x.shape, x.dtype) == (y.shape, y.dtype) or pytest.fail(f'{x} != {y}'), a, b
  )


@pytest.fixture(scope='module')
def initial():
  """tiny_config's initial train state, as test_train.setup_step makes it (float32).

  Returns (state, constants, tx, model variables); a bfloat16 model has the same
  float32 variables (test_bf16_model_has_the_float32_variable_tree), so every
  test here starts from these weights.
  """
  config = tiny_config()
  _, state, constants, tx, _ = train_step.init_train_state(
    config, build_model(config.model), jax.random.PRNGKey(0), 10
  )
  variables = jax.tree_util.tree_map(np.asarray, train_step.full_variables(state, constants))
  return jax.tree_util.tree_map(np.asarray, state), constants, tx, variables


@pytest.fixture(scope='module')
def steps_by_dtype(initial):
  """One train step per dtype on the fixed batch from the same weights and optimizer state.

  Returns {dtype: (state before, state after, metrics)}.
  """
  state0, constants, tx, _ = initial
  batch = _batch()
  out = {}
  for dtype in ('float32', 'bfloat16'):
    config = tiny_config()
    config.model.dtype = dtype
    step = jax.jit(
      train_step.make_train_step(build_model(config.model), tx, train_step.criterion(config))
    )
    new, metrics = step(
      jax.tree_util.tree_map(jnp.asarray, state0), constants, batch, jax.random.PRNGKey(0)
    )
    out[dtype] = (state0, new, jax.device_get(metrics))
  return out


def test_bf16_model_has_the_float32_variable_tree():
  config = tiny_config()
  f32 = variable_shapes(build_model(config.model))
  config.model.dtype = 'bfloat16'
  bf16 = variable_shapes(build_model(config.model))
  _assert_same_variable_tree(f32, bf16)
  assert _float_dtypes(bf16) == {'float32'}


def test_bf16_step_loss_is_close_to_float32(steps_by_dtype):
  m32, m16 = steps_by_dtype['float32'][2], steps_by_dtype['bfloat16'][2]
  assert bool(m16['finite']) and np.isfinite(m16['loss']) and np.isfinite(m16['grad_norm'])
  # Measured on CPU: loss 1e-4 apart, gradient norm 0.5 %.
  np.testing.assert_allclose(m16['loss'], m32['loss'], rtol=0.02)
  np.testing.assert_allclose(m16['grad_norm'], m32['grad_norm'], rtol=0.05)
  assert m16['loss'] != m32['loss']  # bfloat16 really ran


def test_bf16_params_and_optimizer_state_stay_float32(steps_by_dtype):
  state0, state1 = steps_by_dtype['bfloat16'][:2]
  assert _float_dtypes(state1['params']) == {'float32'}
  assert _float_dtypes(state1['opt_state']) == {'float32'}
  assert int(state1['step']) == 1
  moved = jax.tree_util.tree_map(
    lambda a, b: bool(np.any(np.asarray(a) != b)), state1['params'], state0['params']
  )
  assert any(jax.tree_util.tree_leaves(moved))  # the step updated the weights


def test_bf16_compute_dtypes_per_module():
  """Backbone, projection and transformer run in bfloat16; heads and loss inputs float32.

  Shapes and dtypes only (jax.eval_shape): nothing is compiled or computed.
  """
  config = tiny_config()
  config.model.dtype = 'bfloat16'
  model = build_model(config.model)
  b = fixed_batch(batch=1)
  args = (jnp.asarray(b['images']), jnp.asarray(b['padding_mask']), jnp.asarray(b['patches']))
  variables = variable_shapes(model)
  assert _float_dtypes(variables) == {'float32'}
  out, state = jax.eval_shape(
    lambda v: model.apply(
      v, *args, train=True, rngs={'dropout': jax.random.PRNGKey(0)}, capture_intermediates=True
    ),
    variables,
  )
  for key in ('pred_logits', 'pred_boxes', 'pred_feature', 'gt_feature'):
    assert out[key].dtype == jnp.float32, key
  flat = traverse_util.flatten_dict(state['intermediates'])
  dtypes = {'/'.join(k[:-1]): jax.tree_util.tree_leaves(v)[0].dtype for k, v in flat.items()}
  bf16_prefixes = ('body/', 'input_proj', 'transformer/encoder/', 'transformer/decoder/layers_')
  checked = [k for k in dtypes if k.startswith(bf16_prefixes) and 'Dropout' not in k]
  assert len(checked) > 30
  assert {k: str(dtypes[k]) for k in checked if dtypes[k] != jnp.bfloat16} == {}
  for k in ('transformer/decoder', 'class_embed', 'bbox_embed', 'feature_align', 'patch2query'):
    assert dtypes[k] == jnp.float32, k


def _loss_and_grads(config, variables, batch):
  """Loss and gradients w.r.t. all params (backbone too) of a train-mode forward."""
  model = build_model(config.model)
  loss_fn = train_step.criterion(config)

  def loss_of(params):
    out = model.apply(
      dict(variables, params=params),
      batch['images'],
      batch['padding_mask'],
      batch['patches'],
      train=True,
      rngs={'dropout': jax.random.PRNGKey(3)},
    )
    return loss_fn(out, batch['targets'])[0]

  return jax.jit(jax.value_and_grad(loss_of))(variables['params'])


def _remat_config(remat):
  config = tiny_config()
  config.model.update(dropout=0.1, remat=remat)  # dropout: rngs must replay under remat
  return config


@pytest.mark.parametrize('remat', ['transformer', 'backbone', 'all'])
def test_remat_keeps_the_variable_tree(remat):
  plain = variable_shapes(build_model(_remat_config('').model))
  wrapped = variable_shapes(build_model(_remat_config(remat).model))
  _assert_same_variable_tree(plain, wrapped)


def test_remat_gives_the_same_loss_and_gradients(initial):
  """remat='all' (every Bottleneck and transformer layer) with dropout on: same numbers."""
  batch = _batch()
  variables = initial[3]
  loss, grads = _loss_and_grads(_remat_config(''), variables, batch)
  loss_r, grads_r = _loss_and_grads(_remat_config('all'), variables, batch)
  assert np.isfinite(loss)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  assert float(jnp.abs(grads['body']['conv1']['kernel']).max()) > 0  # backbone differentiated
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_r, grads
  )


def test_bad_dtype_or_remat_is_refused():
  config = tiny_config()
  with pytest.raises(ValueError, match='model.remat'):
    build_model(dict(config.model, remat='encoder'))
  with pytest.raises(ValueError, match='model.dtype'):
    build_model(dict(config.model, dtype='float16'))
