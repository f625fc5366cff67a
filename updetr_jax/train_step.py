"""The update step and what it needs: mesh, train state, loss, step cost. TF-free.

Everything a benchmark or a task needs to build and time the jitted step without the
input pipeline (``benchmarks/device_suite.py`` runs it where TensorFlow is not
installed):

  make_mesh / to_global / process_gather: the ``('data',)`` mesh and host <-> global
    arrays
  init_train_state: variables (+ configured imports), trainable / frozen split,
    optimizer; check_backbone_init refuses a random real-size CNN
  criterion / make_train_step: the loss and the pure update (state, constants,
    batch, rng) -> (state, metrics); check_finite stops a run at a non-finite loss
  step_cost: FLOPs (XLA cost analysis) and the devices' peak, for MFU
"""

from __future__ import annotations

import collections
import functools
from absl import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

from updetr_jax import checkpoints, losses, mfu, optim, pretrained
from updetr_jax.models import init_variables
from updetr_jax.torch_import import import_torch_checkpoint


def make_mesh() -> jax.sharding.Mesh:
  """1-D data-parallel mesh over every device of every process."""
  return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def to_global(batch, sharding):
  """Host-local numpy batch -> global jax.Arrays split over the data axis."""
  return jax.tree_util.tree_map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
  )


def total_steps(config) -> tuple[int, int]:
  """(num_train_steps, steps_per_epoch) from the config."""
  steps_per_epoch = max(config.examples_per_epoch // config.batch_size, 1)
  if config.num_train_steps > 0:
    return config.num_train_steps, steps_per_epoch
  return int(config.num_epochs * steps_per_epoch), steps_per_epoch


def criterion(config):
  """The DETR / UP-DETR loss as configured: (outputs, targets) -> (loss, terms)."""
  return functools.partial(
    losses.set_criterion,
    num_classes=config.model.num_classes,
    eos_coef=config.loss.eos_coef,
    weight_ce=config.loss.weight_ce,
    weight_bbox=config.loss.weight_bbox,
    weight_giou=config.loss.weight_giou,
    weight_feature=config.loss.get('weight_feature', 0.0),
    feature_recon=bool(config.model.get('feature_recon', False)),
    solver=config.matcher.solver,
    cost_class=config.matcher.cost_class,
    cost_bbox=config.matcher.cost_bbox,
    cost_giou=config.matcher.cost_giou,
    num_replicas=config.loss_replicas,
    match_groups=(
      config.model.get('num_patches', 0) if config.matcher.get('group_matching', False) else 0
    ),
  )


# Real-size CNNs, which the releases always start from pre-trained weights.
PRETRAINED_CNNS = ('resnet50', 'resnet101')


def check_backbone_init(config, resuming: bool) -> None:
  """Refuses a run whose real-size CNN would keep its random initialisation.

  The releases always load a pre-trained ResNet (UP-DETR: SwAV 800 epochs, frozen;
  DETR: torchvision ImageNet); a frozen random ResNet-50 trains for days to nothing.
  Allowed when a weight source is configured (``init.backbone_checkpoint``,
  ``init.pretrained`` or ``init.checkpoint``), when resuming, for the small test /
  demo CNNs, or on purpose with ``init.random_backbone=True``.
  """
  init = config.get('init', {})
  if (
    config.model.backbone not in PRETRAINED_CNNS
    or resuming
    or init.get('random_backbone', False)
    or any(init.get(k) for k in ('backbone_checkpoint', 'pretrained', 'checkpoint'))
  ):
    return
  raise ValueError(
    f'config.model.backbone={config.model.backbone!r} would start from random weights: '
    'set config.init.backbone_checkpoint to a torchvision-layout ResNet .pth (the '
    'UP-DETR release uses SwAV 800 epochs, swav_800ep_pretrain.pth.tar from '
    "https://github.com/facebookresearch/swav; DETR uses torchvision's ImageNet "
    'ResNet), or config.init.pretrained / config.init.checkpoint; to train from a '
    'random CNN on purpose, pass --config.init.random_backbone=True'
  )


def init_train_state(config, model, rng, steps_per_epoch: int, load_init: bool = True):
  """Initial weights (with the configured imports) and optimizer state.

  ``config.init``: ``backbone_checkpoint`` (torchvision-layout ResNet .pth),
  ``pretrained`` (fine-tuning: every weight but the task heads of an UP-DETR
  pre-training workdir, .pth or Orbax variables; ``pretrained.load_pretrained``),
  ``checkpoint`` (Orbax variables of this very model). load_init=False skips them
  (a resumed run restores its own checkpoint instead).
  Returns (variables, state, constants, tx, schedules): state = {'step', 'params'
  (trainable), 'opt_state'}, constants = {'frozen' params, 'batch_stats'}.
  """
  variables = init_variables(model, rng)
  init = config.init if load_init else {}
  if init.get('backbone_checkpoint'):
    variables = import_torch_checkpoint(init.backbone_checkpoint, config.model, variables=variables)
  if init.get('pretrained'):
    source, source_config = pretrained.load_pretrained(init.pretrained, config.model)
    variables, fresh = pretrained.init_from_pretrained(
      variables, dict(config.model), source, source_config
    )
    logging.info(
      'initialised from %s: every weight of the model but %s (fresh)',
      init.pretrained,
      ', '.join(fresh),
    )
  if init.get('checkpoint'):
    variables = checkpoints.load_variables(init.checkpoint, variables)
  trainable, frozen = optim.partition_params(variables['params'], config.optim.frozen)
  tx, schedules = optim.make_optimizer(config.optim, trainable, steps_per_epoch)
  state = {'step': jnp.zeros((), jnp.int32), 'params': trainable, 'opt_state': tx.init(trainable)}
  constants = {'frozen': frozen, 'batch_stats': variables['batch_stats']}
  return variables, state, constants, tx, schedules


def make_train_step(model, tx, loss_fn, prepare=None):
  """Pure update: (state, constants, batch, rng) -> (state, metrics).

  batch: images [B, H, W, 3], padding_mask [B, H, W], targets, and patches
  [B, M, P, P, 3] for UP-DETR (absent for DETR); or what ``prepare`` (jittable,
  host batch -> such a batch, e.g. ``device_augment.batch_preparer``) makes of it
  at the start of the step.
  state = {'step', 'params' (trainable), 'opt_state'}; constants = {'frozen',
  'batch_stats'} get no gradient. A non-finite loss or gradient leaves the state
  unchanged and reports ``finite = False``.
  """

  def step_fn(state, constants, batch, rng):
    rng = jax.random.fold_in(rng, state['step'])
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
      )
      return loss_fn(out, batch['targets'])

    (loss, terms), grads = jax.value_and_grad(loss_of, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new = {
      'step': state['step'] + 1,
      'params': optax.apply_updates(state['params'], updates),
      'opt_state': opt_state,
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
    'batch_stats': constants['batch_stats'],
  }


def check_finite(metrics, step: int) -> None:
  if not bool(metrics['finite']):
    bad = sorted(k for k, v in metrics.items() if k != 'finite' and not np.isfinite(v))
    raise FloatingPointError(
      f'non-finite training loss at step {step} (terms: {bad or "gradient"}); the step '
      'was not applied and no checkpoint was written after it. Lower the learning rate '
      'or check the input data.'
    )


def step_cost(train_step, args, dtype: str, prepare=None) -> dict:
  """FLOPs of one train step (XLA's cost analysis of the lowered step, all devices)
  and the peak FLOP/s of the job's devices (None when the device is not in
  ``mfu.PEAK_FLOPS``; the dtype column from ``mfu.peak_dtype``). ``prepare``: the
  step's ``device_augment.Preparer``, whose loop over the examples the analysis
  counts once (its ``uncounted_flops`` are added)."""
  flops = mfu.step_flops(train_step.lower(*args))
  if flops and hasattr(prepare, 'uncounted_flops'):
    flops += prepare.uncounted_flops(args[2])
  device = jax.devices()[0]
  kind = device.device_kind
  peak_dtype = mfu.peak_dtype(dtype, device)
  peak = mfu.device_peak_flops(kind, peak_dtype)
  total_peak = peak * jax.device_count() if peak else None
  logging.info(
    'train step: %s GFLOP (XLA cost analysis, first batch shape); %d x %s, peak %s',
    f'{flops / 1e9:,.1f}' if flops else '?',
    jax.device_count(),
    kind,
    f'{total_peak / 1e12:,.0f} TFLOP/s ({peak_dtype})' if total_peak else 'unknown (no MFU)',
  )
  return {'flops_per_step': flops, 'peak_flops': total_peak}


# (pre-training sends image_size, patch_boxes and patch_seeds instead of padding_mask
# and patches: device_augment.prepare_batch)
MODEL_INPUTS = (
  'images',
  'padding_mask',
  'patches',
  'image_size',
  'patch_boxes',
  'patch_seeds',
  'targets',
)


def model_inputs(batch: dict) -> dict:
  """The entries of a host batch the train step reads (ids, sizes and flags stay home)."""
  return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def prefetch_to_device(iterator, sharding, size: int = 2):
  """Host batches -> global device batches, ``size`` ahead (double buffering).

  Each batch is put on the devices (``to_global`` of its ``model_inputs``) while
  the step on an earlier one runs: JAX dispatches the step asynchronously, so the
  host's next batch and its transfer overlap the device's work.
  """
  queue = collections.deque()

  def put():
    try:
      queue.append(to_global(model_inputs(next(iterator)), sharding))
    except StopIteration:
      pass

  for _ in range(size):
    put()
  while queue:
    yield queue.popleft()
    put()


def process_gather(x: np.ndarray) -> np.ndarray:
  """Host-local rows -> the global batch's rows (in process order) on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))
