"""Calibration and the pre-training options, as a user sees them: the statistics a run
calibrates, trains with and saves; the raw feature-reconstruction target; the limit of
group matching; and the patch_feature_norm check of a one-shot initialisation
(value_pos in both decoders: tests/test_pretext.py)."""

import os
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from updetr_jax import checkpoints, device_augment, matching, pretrained, sharding, train
from updetr_jax import train_step
from updetr_jax.data import resolve_config
from updetr_jax.models import build_model, init_variables, variable_shapes
from updetr_jax.models.resnet import FrozenBatchNorm
from updetr_jax.tasks import pretrain as task_module

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_pretext import _mosaic_tiny_config, tiny_config  # noqa: E402
from test_train import fixed_batch  # noqa: E402

STEPS = 2  # the calibrated run: a checkpoint at its last step
STEM = ('body', 'bn1')  # the first FrozenBatchNorm: its input does not depend on statistics


def _calibrated_config():
  """Tiny mosaics pre-training with both calibrations, augmented patches, no evaluation."""
  config = _mosaic_tiny_config()  # model.patch_feature_norm on
  config.init.calibrate_backbone_bn = True
  config.data.augment_patches = True
  config.num_train_steps = STEPS
  config.checkpoint_every_steps = STEPS
  config.log_every_steps = STEPS
  config.eval.update(num_batches=0, every_steps=0)
  return config


def _flat(tree) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(jax.device_get(tree)))


@pytest.fixture(scope='module')
def calibrated_run(tmp_path_factory):
  """A short calibrated pre-training: its checkpoint restored as predict or a resume
  reads it, and calibration recomputed here on the same (frozen) CNN from the init's
  statistics."""
  config = _calibrated_config()
  workdir = str(tmp_path_factory.mktemp('calibrated_run'))
  train.run(config, workdir)
  saved, step, _ = checkpoints.restore_workdir_variables(workdir)
  config = _calibrated_config()
  task = task_module.PatchTask(config, NamedSharding(sharding.make_mesh(), P('data')))
  model = build_model(config.model)
  init = init_variables(model, jax.random.PRNGKey(0))
  calibrated = task.calibrate(model, dict(saved, batch_stats=init['batch_stats']))
  return {
    'config': config,
    'task': task,
    'model': model,
    'saved': saved,
    'step': step,
    'init': init,
    'calibrated': calibrated,
  }


def _calibration_batches(run, augmented: bool) -> list[dict]:
  """The run's first CALIBRATION_BATCHES training batches, prepared as the model sees
  them: with the training augmentation (``augmented``) or without it."""
  it, _ = run['task'].train_data(0)
  prepare = jax.jit(device_augment.batch_preparer(resolve_config(run['config'].data), augmented))
  batches = [
    jax.device_get(prepare(sharding.model_inputs(next(it))))
    for _ in range(task_module.CALIBRATION_BATCHES)
  ]
  it.close()
  return batches


def test_the_checkpoint_holds_the_statistics_that_calibration_computed(calibrated_run):
  run = calibrated_run
  assert run['step'] == STEPS
  saved = _flat(run['saved']['batch_stats'])
  init = _flat(run['init']['batch_stats'])
  calibrated = _flat(run['calibrated']['batch_stats'])
  assert saved.keys() == init.keys() == calibrated.keys()
  layers = {p[:-1] for p in saved}
  assert ('patch_norm',) in layers and len(layers) == 18  # resnet_tiny: 17 + patch_norm
  for path in saved:
    np.testing.assert_allclose(
      saved[path], calibrated[path], rtol=1e-5, atol=1e-6, err_msg='/'.join(path)
    )
  # Calibrated, not the init's identity (mean 0, var 1), in every layer and patch_norm.
  for path in saved:
    if path[-1] in ('mean', 'var'):
      assert np.abs(saved[path] - init[path]).max() > 1e-3, path


def _stem_input(model, variables, images) -> np.ndarray:
  """The input of the CNN's first FrozenBatchNorm on ``images``: [pixels, C] float64."""
  seen = []

  def record(next_fun, args, kwargs, context):
    if (
      isinstance(context.module, FrozenBatchNorm)
      and context.method_name == '__call__'
      and tuple(context.module.path) == STEM
    ):
      seen.append(np.asarray(args[0], np.float64))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply(variables, images, method=lambda m, x: m.body(x))
  (x,) = seen
  return x.reshape(-1, x.shape[-1])


def test_backbone_calibration_pools_the_variance_of_all_calibration_batches(calibrated_run):
  run = calibrated_run
  batches = _calibration_batches(run, augmented=True)
  assert not any(b['padding_mask'].any() for b in batches)  # every pixel counts alike
  per_batch = [_stem_input(run['model'], run['calibrated'], b['images']) for b in batches]
  pooled = np.concatenate(per_batch)
  stats = run['calibrated']['batch_stats']['body']['bn1']
  np.testing.assert_allclose(np.asarray(stats['mean']), pooled.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(stats['var']), pooled.var(0), rtol=5e-4)
  # The batches' means differ: the mean of the per-batch variances is another figure.
  mean_of_vars = np.mean([x.var(0) for x in per_batch], axis=0)
  assert np.abs(mean_of_vars / pooled.var(0) - 1).min() > 2e-3


def test_patch_statistics_are_those_of_the_patches_training_sees(calibrated_run):
  run = calibrated_run
  assert run['config'].data.augment_patches

  def feature_stats(augmented):
    feats = [
      run['model'].apply(run['calibrated'], b['patches'], method='patch_features')
      for b in _calibration_batches(run, augmented)
    ]
    feats = np.concatenate([np.asarray(f, np.float64).reshape(-1, f.shape[-1]) for f in feats])
    return feats.mean(0), feats.var(0)

  stats = run['calibrated']['batch_stats']['patch_norm']
  mean, var = feature_stats(augmented=True)
  np.testing.assert_allclose(np.asarray(stats['mean']), mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(stats['var']), var, rtol=1e-3, atol=1e-6)
  # The augmentation changes them: the statistics of unaugmented patches are others.
  _, plain_var = feature_stats(augmented=False)
  assert np.abs(plain_var / np.maximum(var, 1e-6) - 1).max() > 5e-2


def test_the_reconstruction_target_is_the_raw_patch_feature():
  config = tiny_config()
  config.model.update(patch_feature_norm=True, patch_query_drop=0.0, dropout=0.0)
  model = build_model(config.model)
  variables = init_variables(model, jax.random.PRNGKey(0))
  batch = fixed_batch()
  args = (batch['images'], batch['padding_mask'], batch['patches'])
  raw = np.asarray(model.apply(variables, batch['patches'], method='patch_features'))
  c = raw.shape[-1]
  stats = dict(
    variables['batch_stats']['patch_norm'],
    mean=jnp.linspace(-1.0, 1.0, c),
    var=jnp.linspace(0.5, 3.0, c),
  )
  shifted = dict(variables, batch_stats=dict(variables['batch_stats'], patch_norm=stats))
  out = model.apply(shifted, *args)
  np.testing.assert_allclose(np.asarray(out['gt_feature']), raw, rtol=1e-6, atol=1e-7)
  # The statistics do reach the queries: only the target stays raw.
  identity = model.apply(variables, *args)
  assert np.abs(np.asarray(out['pred_boxes']) - np.asarray(identity['pred_boxes'])).max() > 1e-4
  np.testing.assert_array_equal(np.asarray(out['gt_feature']), np.asarray(identity['gt_feature']))


def _three_targets_for_two_groups():
  outputs = {
    'pred_logits': jnp.zeros((1, 4, 3)),
    'pred_boxes': jnp.full((1, 4, 4), 0.5),
  }
  targets = {
    'boxes': jnp.full((1, 3, 4), 0.3),
    'labels': jnp.ones((1, 3), jnp.int32),
    'mask': jnp.ones((1, 3), bool),
  }
  return outputs, targets


@pytest.mark.parametrize('solver', ['exact', 'scipy'])
def test_group_matching_refuses_more_targets_than_groups(solver):
  outputs, targets = _three_targets_for_two_groups()
  with pytest.raises(ValueError, match=r'at most one target per group \(M=3\)'):
    matching.hungarian_match(outputs, targets, solver=solver, num_groups=2)
  # As many targets as groups: one in each.
  two = {k: v[:, :2] for k, v in targets.items()}
  idx = np.asarray(matching.hungarian_match(outputs, two, solver=solver, num_groups=2))
  assert idx[0, 0] in (0, 1) and idx[0, 1] in (2, 3)


def test_group_matching_refuses_more_targets_than_patches_in_the_loss():
  config = tiny_config()
  config.loss_replicas = 1
  config.model.update(num_patches=2, feature_recon=False)
  config.matcher.group_matching = True
  outputs, targets = _three_targets_for_two_groups()
  outputs['pred_logits'] = jnp.zeros((1, 4, config.model.num_classes + 1))
  with pytest.raises(ValueError, match='at most one target per group'):
    train_step.criterion(config)(outputs, targets)


def _zeros(model) -> dict:
  """Variables of ``model``'s shapes (the refusal reads which weights there are)."""
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), variable_shapes(model))


def test_one_shot_init_refuses_a_pretraining_without_patch_norm():
  config = tiny_config()
  assert not config.model.patch_feature_norm
  source = _zeros(build_model(config.model))
  source_config = dict(config.model)
  config.model.update(patch_feature_norm=True, num_patches=1, feature_head=False)
  target = _zeros(build_model(config.model))
  message = (
    r'pre-trained patch2query was trained with model\.patch_feature_norm=False, this model '
    r'has True: set --config\.model\.patch_feature_norm=False'
  )
  for theirs in (source_config, None):  # with its config, or the weights alone
    with pytest.raises(ValueError, match=message):
      pretrained.init_from_pretrained(target, dict(config.model), source, theirs)
  # Without the option on either side the weights carry over.
  config.model.patch_feature_norm = False
  target = _zeros(build_model(config.model))
  out, fresh = pretrained.init_from_pretrained(target, dict(config.model), source, source_config)
  assert 'patch_norm' not in out['batch_stats'] and 'patch2query' not in fresh
