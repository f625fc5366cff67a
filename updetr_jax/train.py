"""UP-DETR pre-training: one linear ``run(config, workdir)``.

Sections: mesh, input pipeline, model & optimizer, checkpoint restore, update step,
train loop, final evaluation. Data parallel: ``jax.jit`` over a ``('data',)`` mesh
with ``NamedSharding`` (batch split, state replicated); works unchanged on one CPU,
8 fake devices, a GPU box or a multi-host TPU slice.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metric_writers
from jax.sharding import NamedSharding, PartitionSpec as P

from updetr_jax import checkpoints, evaluate, losses, matching, optim, visualize
from updetr_jax.data import make_pretrain_dataset
from updetr_jax.models import build_model
from updetr_jax.torch_import import import_torch_checkpoint, init_variables


def make_mesh() -> jax.sharding.Mesh:
  """1-D data-parallel mesh over every device of every process."""
  return jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))


def to_global(batch, sharding):
  """Host-local numpy batch -> global jax.Arrays split over the data axis."""
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def total_steps(config) -> tuple[int, int]:
  """(num_train_steps, steps_per_epoch) from the config."""
  steps_per_epoch = max(config.examples_per_epoch // config.batch_size, 1)
  if config.num_train_steps > 0:
    return config.num_train_steps, steps_per_epoch
  return int(config.num_epochs * steps_per_epoch), steps_per_epoch


def criterion(config):
  """The UP-DETR loss as configured: (outputs, targets) -> (loss, terms)."""
  return functools.partial(
      losses.set_criterion, num_classes=config.model.num_classes,
      eos_coef=config.loss.eos_coef, weight_ce=config.loss.weight_ce,
      weight_bbox=config.loss.weight_bbox, weight_giou=config.loss.weight_giou,
      weight_feature=config.loss.weight_feature,
      feature_recon=bool(config.model.get('feature_recon', False)),
      solver=config.matcher.solver, num_replicas=config.loss_replicas)


def init_train_state(config, model, rng, steps_per_epoch: int):
  """Initial weights (with the configured imports) and optimizer state.

  Returns (variables, state, constants, tx, schedules): state = {'step', 'params'
  (trainable), 'opt_state'}, constants = {'frozen' params, 'batch_stats'}.
  """
  variables = init_variables(model, rng)
  if config.init.backbone_checkpoint:
    variables = import_torch_checkpoint(config.init.backbone_checkpoint, config.model,
                                        variables=variables)
  if config.init.checkpoint:
    variables = checkpoints.load_variables(config.init.checkpoint, variables)
  trainable, frozen = optim.partition_params(variables['params'], config.optim.frozen)
  tx, schedules = optim.make_optimizer(config.optim, trainable, steps_per_epoch)
  state = {'step': jnp.zeros((), jnp.int32), 'params': trainable,
           'opt_state': tx.init(trainable)}
  constants = {'frozen': frozen, 'batch_stats': variables['batch_stats']}
  return variables, state, constants, tx, schedules


def make_train_step(model, tx, loss_fn):
  """Pure update: (state, constants, batch, rng) -> (state, metrics).

  state = {'step', 'params' (trainable), 'opt_state'}; constants = {'frozen',
  'batch_stats'} get no gradient. A non-finite loss or gradient leaves the state
  unchanged and reports ``finite = False``.
  """

  def step_fn(state, constants, batch, rng):
    rng = jax.random.fold_in(rng, state['step'])

    def loss_of(params):
      out = model.apply(full_variables(dict(state, params=params), constants),
                        batch['images'], batch['padding_mask'], batch['patches'],
                        train=True, rngs={'dropout': rng})
      return loss_fn(out, batch['targets'])

    (loss, terms), grads = jax.value_and_grad(loss_of, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new = {'step': state['step'] + 1, 'params': optax.apply_updates(state['params'], updates),
           'opt_state': opt_state}
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new,
                                 dict(state, step=state['step'] + 1))
    metrics = dict(terms, loss=loss, grad_norm=grad_norm, finite=finite)
    return new, metrics

  return step_fn


def _fmt(ious: dict) -> str:
  return ', '.join(f'{k} {v:.4f}' for k, v in ious.items())


def full_variables(state, constants):
  """Train state + constants -> variables for ``model.apply``."""
  return {'params': optim.merge_params(state['params'], constants['frozen']),
          'batch_stats': constants['batch_stats']}


def check_finite(metrics, step: int) -> None:
  if not bool(metrics['finite']):
    bad = sorted(k for k, v in metrics.items() if k != 'finite' and not np.isfinite(v))
    raise FloatingPointError(
        f'non-finite training loss at step {step} (terms: {bad or "gradient"}); the step '
        'was not applied and no checkpoint was written after it. Lower the learning rate '
        'or check the input data.')


def make_eval_step(model, num_patches: int):
  """Jitted (variables, batch) -> (patch IoU [B, M], outputs), eval mode."""

  @jax.jit
  def eval_step(variables, batch):
    out = model.apply(variables, batch['images'], batch['padding_mask'], batch['patches'],
                      train=False)
    return evaluate.patch_iou(out, batch['targets'], num_patches), out

  return eval_step


def evaluate_patches(eval_step, variables, batches, sharding):
  """Mean IoUs of the patch predictions over ``batches`` (see ``evaluate.patch_iou``).

  Returns ({'matched': mean, 'group_top': mean}, (first host batch, its outputs,
  its IoU dict)) for plotting.
  """
  totals, count, first = {}, 0, None
  for batch in batches:
    g = to_global(batch, sharding)
    ious, out = eval_step(variables, g)
    mask = np.asarray(g['targets']['mask'])
    for k, v in ious.items():
      totals[k] = totals.get(k, 0.0) + float(np.asarray(v)[mask].sum())
    count += int(mask.sum())
    if first is None:
      first = (batch, jax.tree_util.tree_map(np.asarray, out),
               jax.tree_util.tree_map(np.asarray, ious))
  return {k: v / max(count, 1) for k, v in totals.items()}, first


class Progress:
  """Progress lines (steps/s, ETA) and TensorBoard scalars from process 0."""

  def __init__(self, writer, total: int, start: int, every: int, jsonl_path: str):
    self.writer, self.total, self.every, self.jsonl_path = writer, total, every, jsonl_path
    self.t0, self.s0 = time.time(), start
    self.history: dict[str, tuple[list, list]] = {}

  def __call__(self, step: int, scalars: dict) -> None:
    if step % self.every and step != self.total:
      return
    now = time.time()
    rate = (step - self.s0) / max(now - self.t0, 1e-9)
    eta = (self.total - step) / max(rate, 1e-9)
    scalars = dict(scalars, steps_per_sec=rate)
    self.writer.write_scalars(step, scalars)
    if jax.process_index() == 0:
      with open(self.jsonl_path, 'a') as f:
        f.write(json.dumps(dict(scalars, step=step)) + '\n')
    for k in ('loss', 'loss_ce', 'loss_bbox', 'loss_giou', 'loss_feature'):
      if k in scalars:
        self.history.setdefault(k, ([], []))
        self.history[k][0].append(step)
        self.history[k][1].append(scalars[k])
    if jax.process_index() == 0:
      terms = ' '.join(f'{k[5:]} {scalars[k]:.3f}' for k in
                       ('loss_ce', 'loss_bbox', 'loss_giou', 'loss_feature') if k in scalars)
      logging.warning('step %d/%d  loss %.4f (%s)  lr %.2e  %.2f steps/s  ETA %s', step,
                      self.total, scalars['loss'], terms, scalars.get('lr', 0), rate,
                      time.strftime('%H:%M:%S', time.gmtime(eta)))
    self.t0, self.s0 = now, step


def run(config, workdir: str) -> dict:
  """Pre-trains as configured; resumes from ``workdir/checkpoints`` when present.

  Returns a summary dict (also written to ``workdir/summary.json``).
  """
  # ---------------------------------------------------------------- Set up mesh
  os.makedirs(workdir, exist_ok=True)
  mesh = make_mesh()
  repl = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P('data'))
  if config.batch_size % jax.device_count():
    raise ValueError(f'config.batch_size={config.batch_size} must be divisible by the '
                     f'{jax.device_count()} devices')
  if config.batch_size % config.loss_replicas:
    raise ValueError(f'config.batch_size={config.batch_size} must be divisible by '
                     f'config.loss_replicas={config.loss_replicas}')
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  num_steps, steps_per_epoch = total_steps(config)
  num_patches = config.model.num_patches

  # ------------------------------------------------------ Model & optimizer
  model = build_model(config.model)
  init_rng, step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  variables, state, constants, tx, schedules = init_train_state(
      config, model, init_rng, steps_per_epoch)
  logging.warning('model: %s params trainable, %s frozen; %d steps (%d per epoch)',
                  f'{optim.count_params(state["params"]):,}',
                  f'{optim.count_params(constants["frozen"]):,}', num_steps, steps_per_epoch)
  state, constants = jax.device_put((state, constants), repl)

  # ------------------------------------------------------ Checkpoint restore
  manager = checkpoints.train_manager(
      os.path.join(workdir, 'checkpoints'), save_every_steps=config.checkpoint_every_steps,
      keep=config.keep_checkpoints)
  ckpt = {'state': state, 'constants': constants}
  restored, start = checkpoints.restore_latest(manager, ckpt)
  if restored is not None:
    state, constants = restored['state'], restored['constants']
    logging.warning('resumed from %s at step %d', manager.directory, start)
  start = int(start or 0)

  # ------------------------------------------------------ Input pipeline
  train_iter, data_stats = make_pretrain_dataset(
      config.data, global_batch_size=config.batch_size, num_patches=num_patches, train=True,
      seed=config.seed, start_step=start, process_index=jax.process_index(),
      process_count=jax.process_count())

  def eval_batches():
    """Held-out query patches: eval transforms, a different patch seed, fixed order."""
    it, _ = make_pretrain_dataset(
        config.data, global_batch_size=config.batch_size, num_patches=num_patches,
        train=False, seed=config.seed + 1, process_index=jax.process_index(),
        process_count=jax.process_count())
    for i, b in enumerate(it):
      if i >= config.eval.num_batches:
        break
      yield b

  eval_step = make_eval_step(model, num_patches)
  if config.eval.num_batches > 0:  # the initial model, before any (resumed) training
    iou_before, _ = evaluate_patches(eval_step, variables, eval_batches(), data_sharding)
    logging.warning('held-out query patches before training: mean IoU %s', _fmt(iou_before))
  del variables  # its buffers may be donated to the train step

  # ------------------------------------------------------ Update step
  train_step = jax.jit(make_train_step(model, tx, criterion(config)), donate_argnums=(0,),
                       out_shardings=(repl, repl))

  # ------------------------------------------------------ Train loop
  progress = Progress(writer, num_steps, start, config.log_every_steps,
                      os.path.join(workdir, 'metrics.jsonl'))
  pending = None  # metrics of the previous step, checked one step late (keeps async dispatch)
  t_start = time.time()
  for step in range(start + 1, num_steps + 1):
    batch = to_global(next(train_iter), data_sharding)
    state, metrics = train_step(state, constants, batch, step_rng)
    if pending is not None:
      check_finite(jax.device_get(pending[1]), pending[0])
    pending = (step, metrics)
    if manager.should_save(step) or step == num_steps or step % config.log_every_steps == 0:
      host = jax.device_get(metrics)
      check_finite(host, step)
      pending = None
      scalars = {k: float(v) for k, v in host.items() if k != 'finite'}
      scalars['lr'] = float(schedules['lr'](step - 1))
      progress(step, scalars)
      if config.eval.every_steps > 0 and step % config.eval.every_steps == 0:
        iou, _ = evaluate_patches(eval_step, full_variables(state, constants), eval_batches(),
                                  data_sharding)
        writer.write_scalars(step, {f'eval/patch_iou_{k}': v for k, v in iou.items()})
        logging.warning('step %d: held-out query patches: mean IoU %s', step, _fmt(iou))
      if manager.should_save(step) or step == num_steps:
        manager.save(step, args=checkpoints.ocp.args.StandardSave(
            {'state': state, 'constants': constants}), force=step == num_steps)
  manager.wait_until_finished()
  train_time = time.time() - t_start
  stats = data_stats.as_dict()
  if any(stats.values()):
    logging.warning('input pipeline: %s', data_stats.report())

  # ------------------------------------------------------ Evaluation
  summary = {'steps': num_steps, 'train_seconds': round(train_time, 1), 'data_stats': stats}
  if config.eval.num_batches > 0:
    iou_after, first = evaluate_patches(eval_step, full_variables(state, constants),
                                        eval_batches(), data_sharding)
    summary.update(mean_iou_before=round(iou_before['matched'], 4),
                   mean_iou_after=round(iou_after['matched'], 4),
                   group_top_iou_before=round(iou_before['group_top'], 4),
                   group_top_iou_after=round(iou_after['group_top'], 4))
    writer.write_scalars(num_steps, {f'eval/patch_iou_{k}': v for k, v in iou_after.items()})
    if jax.process_index() == 0:
      batch, out, iou = first
      idx = np.asarray(matching.hungarian_match(out, batch['targets']))
      boxes = np.take_along_axis(out['pred_boxes'], np.maximum(idx, 0)[..., None], axis=1)
      png = os.path.join(workdir, 'patch_detection.png')
      visualize.plot_patch_detection(
          png, batch['images'][0], batch['padding_mask'][0], batch['patches'][0],
          batch['targets']['boxes'][0], boxes[0], iou['matched'][0],
          title=f'held-out query patches after {num_steps} steps: matched predictions\n'
                f'(mean IoU {iou_before["matched"]:.2f} -> {iou_after["matched"]:.2f})')
      summary['png'] = png
  if jax.process_index() == 0 and progress.history:
    visualize.plot_curves(os.path.join(workdir, 'loss_curves.png'), progress.history,
                          'training losses')
  writer.flush()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
  return summary
