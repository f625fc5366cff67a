"""The update step and what it needs: train state, loss. TF-free.

Everything a benchmark or a task needs to build the jitted step without the input
pipeline (``benchmarks/device_suite.py`` runs it where TensorFlow is not installed;
the mesh and host <-> global arrays are ``updetr_jax.sharding``'s, the step's FLOPs
``mfu.step_cost``):

  total_steps: (num_train_steps, steps_per_epoch) from the config
  init_train_state: variables (+ ``initial_weights.load_initial_weights``), trainable
    / frozen split, optimizer -> an ``InitialState``
  criterion / make_train_step: the loss and the pure update (state, constants,
    batch, rng) -> (state, metrics); check_finite stops a run at a non-finite loss
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from updetr_jax import losses, optim
from updetr_jax.initial_weights import load_initial_weights
from updetr_jax.models import fields, init_variables


def total_steps(config) -> tuple[int, int]:
  """(num_train_steps, steps_per_epoch) from the config."""
  steps_per_epoch = max(config.examples_per_epoch // config.batch_size, 1)
  if config.num_train_steps > 0:
    return config.num_train_steps, steps_per_epoch
  return int(config.num_epochs * steps_per_epoch), steps_per_epoch


def criterion(config):
  """The DETR / UP-DETR loss as configured: (outputs, targets) -> (loss, terms)."""
  model = fields.fill(config.model)
  return functools.partial(
    losses.set_criterion,
    num_classes=model['num_classes'],
    eos_coef=config.loss.eos_coef,
    weight_ce=config.loss.weight_ce,
    weight_bbox=config.loss.weight_bbox,
    weight_giou=config.loss.weight_giou,
    weight_feature=config.loss.get('weight_feature', 0.0),
    feature_recon=model['feature_recon'],
    solver=config.matcher.solver,
    cost_class=config.matcher.cost_class,
    cost_bbox=config.matcher.cost_bbox,
    cost_giou=config.matcher.cost_giou,
    num_replicas=config.loss_replicas,
    match_groups=(model['num_patches'] if config.matcher.get('group_matching', False) else 0),
  )


class InitialState(NamedTuple):
  """What ``init_train_state`` returns (unpacks as the 5-tuple of its fields).

  state = {'step', 'params' (trainable), 'opt_state'} (+ 'batch_stats' when they are
  trained); constants = {'frozen' params, 'batch_stats' (the frozen ones, else {})};
  tx and schedules: the optimizer's.
  """

  variables: dict
  state: dict
  constants: dict
  tx: optax.GradientTransformation
  schedules: Any


def init_train_state(
  config,
  model,
  rng,
  steps_per_epoch: int,
  load_init: bool = True,
  optimizer=None,
  train_batch_stats: bool = False,
) -> InitialState:
  """Initial weights (with the configured imports) and optimizer state.

  ``config.init``'s imports: ``initial_weights.load_initial_weights``. load_init=False
  skips them (a resumed run restores its own checkpoint instead). optimizer:
  (trainable params, steps_per_epoch) -> (tx, schedules); default
  ``optim.make_optimizer`` of ``config.optim``. train_batch_stats: the model updates
  its ``batch_stats`` in training (training-mode BatchNorm): they go into the state.
  """
  variables = init_variables(model, rng)
  if load_init:
    variables = load_initial_weights(config, variables)
  trainable, frozen = optim.partition_params(variables['params'], config.optim.frozen)
  if optimizer is None:
    optimizer = functools.partial(optim.make_optimizer, config.optim)
  tx, schedules = optimizer(trainable, steps_per_epoch)
  state = {'step': jnp.zeros((), jnp.int32), 'params': trainable, 'opt_state': tx.init(trainable)}
  constants = {'frozen': frozen, 'batch_stats': variables['batch_stats']}
  if train_batch_stats:
    state['batch_stats'], constants['batch_stats'] = variables['batch_stats'], {}
  return InitialState(variables, state, constants, tx, schedules)


def make_train_step(model, tx, loss_fn, prepare=None):
  """Pure update: (state, constants, batch, rng) -> (state, metrics).

  batch: images [B, H, W, 3], padding_mask [B, H, W], targets, and patches
  [B, M, P, P, 3] for UP-DETR (absent for DETR); or what ``prepare`` (jittable,
  host batch -> such a batch, e.g. ``device_augment.batch_preparer``) makes of it
  at the start of the step.
  state = {'step', 'params' (trainable), 'opt_state'} (+ 'batch_stats', updated by
  the model in training); constants = {'frozen', 'batch_stats'} get no gradient. A
  non-finite loss or gradient leaves the state unchanged and reports ``finite = False``.
  """

  def step_fn(state, constants, batch, rng):
    rng = jax.random.fold_in(rng, state['step'])
    trains_stats = 'batch_stats' in state
    if prepare is not None:
      batch = prepare(batch)

    def loss_of(params):
      out = model.apply(
        full_variables(dict(state, params=params), constants),
        batch['images'],
        batch['padding_mask'],
        batch.get('patches'),
        train=True,
        rngs={'dropout': rng},
        mutable=['batch_stats'] if trains_stats else False,
      )
      out, updated = out if trains_stats else (out, {})
      loss, terms = loss_fn(out, batch['targets'])
      return loss, (terms, updated)

    (loss, (terms, updated)), grads = jax.value_and_grad(loss_of, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new = {
      'step': state['step'] + 1,
      'params': optax.apply_updates(state['params'], updates),
      'opt_state': opt_state,
      **updated,
    }
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree_util.tree_map(
      lambda a, b: jnp.where(finite, a, b), new, dict(state, step=state['step'] + 1)
    )
    metrics = dict(terms, loss=loss, grad_norm=grad_norm, finite=finite)
    return new, metrics

  return step_fn


def full_variables(state, constants):
  """Train state + constants -> variables for ``model.apply``."""
  return {
    'params': optim.merge_params(state['params'], constants['frozen']),
    'batch_stats': state.get('batch_stats', constants['batch_stats']),
  }


def with_batch_stats(state, constants, batch_stats):
  """(state, constants) with ``batch_stats`` where they live (the state when trained)."""
  if 'batch_stats' in state:
    return dict(state, batch_stats=batch_stats), constants
  return state, dict(constants, batch_stats=batch_stats)


def check_finite(metrics, step: int) -> None:
  if not bool(metrics['finite']):
    bad = sorted(k for k, v in metrics.items() if k != 'finite' and not np.isfinite(v))
    raise FloatingPointError(
      f'non-finite training loss at step {step} (terms: {bad or "gradient"}); the step '
      'was not applied and no checkpoint was written after it. Lower the learning rate '
      'or check the input data.'
    )
