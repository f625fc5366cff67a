"""bfloat16 compute with float32 parameters, and rematerialisation (model.remat)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from test_train import fixed_batch, setup_step, tiny_config
from updetr_jax import train
from updetr_jax.models import build_model
from updetr_jax.torch_import import variable_shapes


def _float_dtypes(tree):
  return {str(x.dtype) for x in jax.tree_util.tree_leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.floating)}


def _batch():
  return jax.tree_util.tree_map(jnp.asarray, fixed_batch())


@pytest.fixture(scope='module')
def steps_by_dtype():
  """One train step per dtype from the same initial weights: {dtype: (state0, state1, m)}."""
  out = {}
  batch = _batch()
  for dtype in ('float32', 'bfloat16'):
    config = tiny_config()
    config.model.dtype = dtype
    state, constants, step = setup_step(config)
    state0 = jax.tree_util.tree_map(np.asarray, state)
    new, metrics = step(state, constants, batch, jax.random.PRNGKey(0))
    out[dtype] = (state0, new, jax.device_get(metrics))
  return out


def test_bf16_starts_from_the_float32_weights(steps_by_dtype):
  f32, bf16 = steps_by_dtype['float32'][0], steps_by_dtype['bfloat16'][0]
  jax.tree_util.tree_map(np.testing.assert_array_equal, f32['params'], bf16['params'])


def test_bf16_step_loss_is_close_to_float32(steps_by_dtype):
  m32, m16 = steps_by_dtype['float32'][2], steps_by_dtype['bfloat16'][2]
  assert bool(m16['finite']) and np.isfinite(m16['loss']) and np.isfinite(m16['grad_norm'])
  np.testing.assert_allclose(m16['loss'], m32['loss'], rtol=0.03)
  np.testing.assert_allclose(m16['grad_norm'], m32['grad_norm'], rtol=0.1)
  assert m16['loss'] != m32['loss']  # bfloat16 really ran


def test_bf16_params_and_optimizer_state_stay_float32(steps_by_dtype):
  state0, state1, _ = steps_by_dtype['bfloat16']
  assert _float_dtypes(state1['params']) == {'float32'}
  assert _float_dtypes(state1['opt_state']) == {'float32'}
  assert int(state1['step']) == 1
  moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                                 state1['params'], state0['params'])
  assert any(jax.tree_util.tree_leaves(moved))  # the step updated the weights


def test_bf16_compute_dtypes_per_module():
  """Backbone, projection and transformer run in bfloat16; heads and loss inputs float32."""
  config = tiny_config()
  config.model.dtype = 'bfloat16'
  model = build_model(config.model)
  b = fixed_batch(batch=1)
  args = (jnp.asarray(b['images']), jnp.asarray(b['padding_mask']), jnp.asarray(b['patches']))
  variables = model.init(jax.random.PRNGKey(0), *args)
  assert _float_dtypes(variables) == {'float32'}
  out, state = model.apply(variables, *args, capture_intermediates=True)
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
  loss_fn = train.criterion(config)

  def loss_of(params):
    out = model.apply(dict(variables, params=params), batch['images'], batch['padding_mask'],
                      batch['patches'], train=True, rngs={'dropout': jax.random.PRNGKey(3)})
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
  assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(wrapped)
  jax.tree_util.tree_map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or
                         pytest.fail(f'{a} != {b}'), plain, wrapped)


def test_remat_gives_the_same_loss_and_gradients():
  batch = _batch()
  config = _remat_config('')
  model = build_model(config.model)
  variables = model.init(jax.random.PRNGKey(0), batch['images'], batch['padding_mask'],
                         batch['patches'])
  loss, grads = _loss_and_grads(config, variables, batch)
  loss_r, grads_r = _loss_and_grads(_remat_config('all'), variables, batch)
  assert np.isfinite(loss)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  assert float(jnp.abs(grads['body']['conv1']['kernel']).max()) > 0  # backbone differentiated
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         grads_r, grads)


def test_bad_dtype_or_remat_is_refused():
  config = tiny_config()
  with pytest.raises(ValueError, match='model.remat'):
    build_model(dict(config.model, remat='encoder'))
  with pytest.raises(ValueError, match='model.dtype'):
    build_model(dict(config.model, dtype='float16'))
