"""The training loop, one linear ``run(config, workdir)`` for every task.

``config.task`` picks the task (``updetr_jax.tasks``: 'pretrain', UP-DETR's query
patches; 'detection', DETR fine-tuning; 'oneshot', one-shot detection; 'simclr', the
self-supervised CNN). Sections of ``run``: mesh, checkpoints, model & optimizer
(+ restore), input pipeline, update step (``updetr_jax.train_step``), train loop
(progress, periodic eval, best checkpoint, preemption), final evaluation. Data
parallel: ``jax.jit`` over a ``('data',)`` mesh with ``NamedSharding`` (batch split,
state replicated); works unchanged on one CPU, 8 fake devices, a GPU box or a
multi-host TPU slice.
"""

from __future__ import annotations

import json
from absl import logging
import os
import signal
import threading
import time

import jax
import numpy as np
from clu import metric_writers
from jax.sharding import NamedSharding, PartitionSpec as P

from updetr_jax import checkpoints, files, optim, visualize
from updetr_jax.initial_weights import check_backbone_init
from updetr_jax.mfu import step_cost
from updetr_jax.models import fields
from updetr_jax.sharding import make_mesh, prefetch_to_device
from updetr_jax.train_step import (
  check_finite,
  full_variables,
  init_train_state,
  make_train_step,
  total_steps,
  with_batch_stats,
)
from updetr_jax.tasks import get_task


class Progress:
  """Progress lines (steps/s, ETA, MFU) and TensorBoard scalars from process 0."""

  def __init__(self, writer, total: int, start: int, every: int, jsonl_path: str):
    self.writer, self.total, self.every, self.jsonl_path = writer, total, every, jsonl_path
    self.t0, self.s0 = time.time(), start
    self.history: dict[str, tuple[list, list]] = {}
    self.cost: dict = {}  # step_cost(): flops_per_step, peak_flops

  def __call__(self, step: int, scalars: dict) -> None:
    if step % self.every and step != self.total:
      return
    now = time.time()
    rate = (step - self.s0) / max(now - self.t0, 1e-9)
    eta = (self.total - step) / max(rate, 1e-9)
    scalars = dict(scalars, steps_per_sec=rate)
    flops, peak = self.cost.get('flops_per_step'), self.cost.get('peak_flops')
    if flops:  # achieved over the whole interval: input, eval and logging included
      scalars['achieved_tflops_per_sec'] = flops * rate / 1e12
      if peak:
        scalars['mfu'] = flops * rate / peak
    self.writer.write_scalars(step, scalars)
    if jax.process_index() == 0:
      files.append_line(self.jsonl_path, json.dumps(dict(scalars, step=step)))
    for k in ('loss', 'loss_ce', 'loss_bbox', 'loss_giou', 'loss_feature'):
      if k in scalars:
        self.history.setdefault(k, ([], []))
        self.history[k][0].append(step)
        self.history[k][1].append(scalars[k])
    if jax.process_index() == 0:
      terms = ' '.join(  # the set loss's terms; SimCLR's training retrieval
        f'{k.removeprefix("loss_")} {scalars[k]:.3f}'
        for k in ('loss_ce', 'loss_bbox', 'loss_giou', 'loss_feature', 'top1')
        if k in scalars
      )
      util = f'  MFU {scalars["mfu"]:.1%}' if 'mfu' in scalars else ''
      logging.info(
        'step %d/%d  loss %.4f (%s)  lr %.2e  %.2f steps/s%s  ETA %s',
        step,
        self.total,
        scalars['loss'],
        terms,
        scalars.get('lr', 0),
        rate,
        util,
        time.strftime('%H:%M:%S', time.gmtime(eta)),
      )
    self.t0, self.s0 = now, step


class PreemptionWatch:
  """Did this job get a preemption notice (SIGTERM, what TPU VMs and spot GPUs send)?

  One process: a SIGTERM handler (installed for the run, the previous one restored by
  ``close``) sets a flag. Several processes: JAX's preemption sync point (the
  coordination service turns a SIGTERM to any process into one agreed step), so
  every host checkpoints the same step. ``reached(step)`` must be called by every
  process at every step.
  """

  def __init__(self):
    self.multi = jax.process_count() > 1
    self.signalled = False
    self._old = None
    if not self.multi and threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.signalled = True

  def reached(self, step: int) -> bool:
    if self.multi:
      from jax.experimental import multihost_utils

      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self.signalled

  def close(self) -> None:
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)
      self._old = None


class BestCheckpoint:
  """Keeps the checkpoint with the best ``eval.best_metric`` in ``workdir/best``
  (one step; ``best.json`` holds its step and metrics). Survives restarts."""

  def __init__(self, workdir: str, metric: str, config):
    self.metric = metric
    self.manager = checkpoints.TrainCheckpoints(
      os.path.join(workdir, checkpoints.BEST_DIR), save_every_steps=1, keep=1, config=config
    )
    self.json = os.path.join(workdir, checkpoints.BEST_DIR, 'best.json')
    self.record = None
    if files.exists(self.json):
      record = files.read_json(self.json)
      if record.get('step') in self.manager.all_steps():
        self.record = record

  def update(self, step: int, metrics: dict, ckpt) -> bool:
    if self.metric not in metrics:
      raise ValueError(
        f'config.eval.best_metric={self.metric!r} is not among the evaluation '
        f'metrics {sorted(metrics)}'
      )
    value = metrics[self.metric]
    best = self.record['value'] if self.record is not None else None
    # A NaN (e.g. AP of classes without trials yet) never beats a number, nor blocks one.
    if best is not None and not (value > best or (np.isnan(best) and not np.isnan(value))):
      return False
    self.manager.save(step, ckpt, force=True)
    self.record = {'step': step, 'metric': self.metric, 'value': value, 'metrics': metrics}
    if jax.process_index() == 0:
      files.write_json(self.json, self.record)
    logging.info(
      'step %d: new best %s %.4f -> %s', step, self.metric, value, self.manager.directory
    )
    return True


def run(config, workdir: str) -> dict:
  """Trains as configured (``config.task``, one of ``tasks.TASKS``); resumes from
  ``workdir/checkpoints`` when present.

  Returns a summary dict (also written to ``workdir/summary.json``).
  """
  # ---------------------------------------------------------------- Set up mesh
  files.makedirs(workdir)
  if config.get('compilation_cache_dir'):  # compiled steps persist across runs
    jax.config.update(
      'jax_compilation_cache_dir', os.path.abspath(os.path.expanduser(config.compilation_cache_dir))
    )
  mesh = make_mesh()
  repl = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P('data'))
  if config.batch_size % jax.device_count():
    raise ValueError(
      f'config.batch_size={config.batch_size} must be divisible by the {jax.device_count()} devices'
    )
  if config.batch_size % config.loss_replicas:
    raise ValueError(
      f'config.batch_size={config.batch_size} must be divisible by '
      f'config.loss_replicas={config.loss_replicas}'
    )
  task_name = config.get('task', 'pretrain')
  task_class = get_task(task_name)
  check_backbone_init(
    config, resuming=checkpoints.has_steps(os.path.join(workdir, checkpoints.LAST_DIR))
  )
  task = task_class(config, data_sharding)  # may resolve config fields
  config.examples_per_epoch = task.examples_per_epoch()
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() == 0:
    files.write_file(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
  num_steps, steps_per_epoch = total_steps(config)
  evaluating = config.eval.get('enabled', config.eval.get('num_batches', 0) > 0)

  # ------------------------------------------------------ Checkpoints
  manager = checkpoints.TrainCheckpoints(
    os.path.join(workdir, checkpoints.LAST_DIR),
    save_every_steps=config.checkpoint_every_steps,
    keep=config.keep_checkpoints,
    config=config,
  )
  best = (
    BestCheckpoint(workdir, config.eval.best_metric, config)
    if evaluating and config.eval.get('best_metric')
    else None
  )

  # ------------------------------------------------------ Model & optimizer
  model = task.model()
  init_rng, step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  resuming = manager.latest_step() is not None
  variables, state, constants, tx, schedules = init_train_state(
    config,
    model,
    init_rng,
    steps_per_epoch,
    load_init=not resuming,
    optimizer=task.optimizer,
    train_batch_stats=task.trains_batch_stats,
  )
  logging.info(
    'model: %s params trainable, %s frozen; %d steps (%d per epoch)',
    f'{optim.count_params(state["params"]):,}',
    f'{optim.count_params(constants["frozen"]):,}',
    num_steps,
    steps_per_epoch,
  )
  state, constants = jax.device_put((state, constants), repl)
  restored, start = manager.restore_latest({'state': state, 'constants': constants})
  if restored is not None:
    state, constants = restored['state'], restored['constants']
    logging.info('resumed from %s at step %d', manager.directory, start)
  start = int(start or 0)

  # ------------------------------------------------------ Input pipeline
  train_iter, data_stats = task.train_data(start)
  if restored is None:  # data-dependent initial values (default: none)
    variables = task.calibrate(model, full_variables(state, constants))
    stats = jax.device_put(variables['batch_stats'], repl)
    state, constants = with_batch_stats(state, constants, stats)
  if evaluating and task.evaluate_at_start:  # the initial model (before any resumed
    task.evaluate(model, variables, 0, workdir)  # training), for the before/after
  del variables  # its buffers may be donated to the train step

  # ------------------------------------------------------ Update step
  prepare = task.device_inputs(train=True)  # None: the batch as it is
  train_step = jax.jit(
    make_train_step(model, tx, task.criterion(), prepare),
    donate_argnums=(0,),
    out_shardings=(repl, repl),
  )

  def run_eval(step):
    metrics = task.evaluate(model, full_variables(state, constants), step, workdir)
    writer.write_scalars(step, {f'eval/{k}': v for k, v in metrics.items()})
    if jax.process_index() == 0:  # every evaluation, for curves (updetr_jax.compare)
      files.append_line(
        os.path.join(workdir, 'eval.jsonl'),
        json.dumps({'step': step, **{k: float(v) for k, v in metrics.items()}}),
      )
    if best is not None:
      best.update(step, metrics, {'state': state, 'constants': constants})
    return metrics

  # ------------------------------------------------------ Train loop
  progress = Progress(
    writer, num_steps, start, config.log_every_steps, os.path.join(workdir, 'metrics.jsonl')
  )
  pending = None  # metrics of the previous step, checked one step late (keeps async dispatch)
  t_start = time.time()
  preemption = PreemptionWatch()
  preempted_at = None
  device_batches = prefetch_to_device(train_iter, data_sharding)
  for step in range(start + 1, num_steps + 1):
    batch = next(device_batches)
    if step == start + 1 and config.get('report_flops', True):
      progress.cost = step_cost(
        train_step,
        (state, constants, batch, step_rng),
        fields.fill(config.model)['dtype'],
        prepare,
      )
    state, step_metrics = train_step(state, constants, batch, step_rng)
    if pending is not None:
      check_finite(jax.device_get(pending[1]), pending[0])
    pending = (step, step_metrics)
    eval_now = evaluating and config.eval.every_steps > 0 and step % config.eval.every_steps == 0
    if (
      manager.should_save(step)
      or step == num_steps
      or eval_now
      or step % config.log_every_steps == 0
    ):
      host = jax.device_get(step_metrics)
      check_finite(host, step)
      pending = None
      scalars = {k: float(v) for k, v in host.items() if k != 'finite'}
      scalars['lr'] = float(schedules['lr'](step - 1))
      progress(step, scalars)
      if manager.should_save(step) or step == num_steps:
        manager.save(step, {'state': state, 'constants': constants}, force=step == num_steps)
      if eval_now and step != num_steps:
        run_eval(step)
    if preemption.reached(step) and step < num_steps:  # checkpoint this step, stop cleanly
      check_finite(jax.device_get(step_metrics), step)
      if not manager.should_save(step):
        manager.save(step, {'state': state, 'constants': constants}, force=True)
      logging.warning(
        'preemption notice (SIGTERM): saved step %d to %s; rerun the same command to resume',
        step,
        manager.directory,
      )
      preempted_at = step
      break
  manager.wait_until_finished()
  preemption.close()
  train_time = time.time() - t_start
  train_iter.close()
  if preempted_at is not None:
    writer.flush()
    return {'task': task_name, 'steps': num_steps, 'preempted_at': preempted_at}
  stats = data_stats.as_dict()
  if any(stats.values()):
    logging.warning('input pipeline: %s', data_stats.report())

  # ------------------------------------------------------ Evaluation
  summary = {
    'task': task_name,
    'steps': num_steps,
    'train_seconds': round(train_time, 1),
    'data_stats': stats,
  }
  if 'loss' in progress.history:  # mean of the last (up to) 5 logged losses
    summary['final_train_loss'] = round(float(np.mean(progress.history['loss'][1][-5:])), 4)
  if config.init.get('pretrained'):
    summary['init'] = config.init.pretrained
  if manager.moved_aside:
    summary['corrupt_checkpoints_moved_to'] = manager.moved_aside
  summary.update({k: v for k, v in progress.cost.items() if v})
  if evaluating:
    metrics = run_eval(num_steps)
    summary.update(task.finish(metrics, num_steps, workdir))
    if best is not None:
      best.manager.wait_until_finished()
      summary['best'] = {k: best.record[k] for k in ('step', 'metric', 'value')}
  if jax.process_index() == 0 and progress.history:
    visualize.plot_curves(
      os.path.join(workdir, 'loss_curves.png'), progress.history, 'training losses'
    )
  writer.flush()
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, 'summary.json'), summary)
  return summary
