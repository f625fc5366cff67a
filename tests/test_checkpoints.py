"""Pre-training workdir -> fine-tuning init: exactly the intended weights."""

import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from updetr_jax.configs import pretrain
from updetr_jax import checkpoints, optim, pretrained, train_step
from updetr_jax.models import build_model
from updetr_jax.models import init_variables

ARCH = dict(
  backbone='resnet_tiny',
  hidden_dim=32,
  nheads=2,
  enc_layers=1,
  dec_layers=2,
  dim_feedforward=64,
  num_queries=8,
)


@pytest.fixture(scope='module')
def pretrain_workdir(tmp_path_factory):
  """A workdir laid out as train.run writes it, with non-initial weights."""
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  config = pretrain.get_config()
  config.model.update(num_patches=2, **ARCH)
  model = build_model(config.model)
  _, state, constants, _, _ = train_step.init_train_state(config, model, jax.random.PRNGKey(0), 10)
  leaves, tree = jax.tree_util.tree_flatten(state['params'])
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  state['params'] = jax.tree_util.tree_unflatten(
    tree, [x + jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  )
  manager = checkpoints.TrainCheckpoints(
    os.path.join(workdir, 'checkpoints'), keep=2, config=config, async_save=False
  )
  manager.save(7, {'state': state, 'constants': constants})
  manager.wait_until_finished()
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort())
  expected = {
    'params': optim.merge_params(state['params'], constants['frozen']),
    'batch_stats': constants['batch_stats'],
  }
  return workdir, expected, config


def _flat(tree):
  return traverse_util.flatten_dict(jax.tree_util.tree_map(np.asarray, dict(tree)))


def test_restore_pretrained_weights_leaf_by_leaf(pretrain_workdir):
  workdir, expected, _ = pretrain_workdir
  variables, step, model_config = checkpoints.restore_workdir_variables(workdir)
  assert step == 7 and model_config['num_patches'] == 2
  got, want = _flat(variables), _flat(expected)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg='/'.join(k))


def test_finetune_init_copies_all_but_the_task_heads(pretrain_workdir):
  workdir, expected, pre_config = pretrain_workdir
  source, _, pre_model = checkpoints.restore_workdir_variables(workdir)
  detr_config = dict(pre_config.model.to_dict(), num_classes=5, num_patches=0)
  fresh = init_variables(build_model(detr_config), jax.random.PRNGKey(3))
  variables, fresh_heads = pretrained.init_from_pretrained(fresh, detr_config, source, pre_model)
  assert fresh_heads == ['class_embed']
  got, src, new = _flat(variables), _flat(expected), _flat(fresh)
  assert not any(k[1] in ('patch2query', 'feature_align') for k in got)
  copied = 0
  for k, v in got.items():
    if k[1] == 'class_embed':
      np.testing.assert_array_equal(v, new[k])  # fresh head (6 logits, not 3)
      assert v.shape[-1] == 6
    else:
      np.testing.assert_array_equal(v, src[k], err_msg='/'.join(k))
      copied += 1
  assert copied == len(got) - 2


def test_architecture_mismatch_names_the_fields(pretrain_workdir):
  workdir, _, pre_config = pretrain_workdir
  source, _, pre_model = checkpoints.restore_workdir_variables(workdir)
  detr_config = dict(pre_config.model.to_dict(), num_patches=0, pre_norm=False, hidden_dim=64)
  fresh = init_variables(build_model(detr_config), jax.random.PRNGKey(0))
  with pytest.raises(ValueError) as e:
    pretrained.init_from_pretrained(fresh, detr_config, source, pre_model)
  assert 'hidden_dim: pre-trained 32 vs model 64' in str(e.value)
  assert 'pre_norm: pre-trained True vs model False' in str(e.value)


def test_init_train_state_with_init_pretrained(pretrain_workdir):
  """config.init.pretrained through the trainer's init: the fine-tuning state holds the
  pre-trained transformer and a fresh class head; a mismatch names the fields."""
  from updetr_jax.configs import finetune_coco

  workdir, expected, pre_config = pretrain_workdir
  config = finetune_coco.get_config()
  config.model.update(num_classes=4, **ARCH)
  config.init.pretrained = workdir
  model = build_model(config.model)
  variables, state, constants, _, _ = train_step.init_train_state(
    config, model, jax.random.PRNGKey(5), 10
  )
  got, src = _flat(variables), _flat(expected)
  fresh = _flat(init_variables(model, jax.random.PRNGKey(5)))
  for k, v in got.items():
    np.testing.assert_array_equal(
      v, fresh[k] if k[1] == 'class_embed' else src[k], err_msg='/'.join(k)
    )
  assert 'layer1_0' not in state['params']['body']  # stage 1 frozen, stage 2 trained
  assert 'layer2_0' in state['params']['body'] and 'layer1_0' in constants['frozen']['body']
  config.model.num_queries = 12
  with pytest.raises(ValueError, match='num_queries: pre-trained 8 vs model 12'):
    train_step.init_train_state(config, build_model(config.model), jax.random.PRNGKey(5), 10)
