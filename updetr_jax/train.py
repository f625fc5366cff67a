"""Training: UP-DETR pre-training and DETR fine-tuning, one linear ``run(config, workdir)``.

``config.task`` picks the task: 'pretrain' (``PatchTask``: query patches, patch IoU)
or 'detection' (``DetectionTask``: labelled boxes, COCO AP / VOC07 AP50). Sections of
``run``: mesh, checkpoints, model & optimizer (+ restore), input pipeline, update step,
train loop (periodic eval, best checkpoint), final evaluation. Data parallel: ``jax.jit`` over a ``('data',)`` mesh
with ``NamedSharding`` (batch split, state replicated); works unchanged on one CPU,
8 fake devices, a GPU box or a multi-host TPU slice.
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metric_writers
from jax.sharding import NamedSharding, PartitionSpec as P

from updetr_jax import (checkpoints, evaluate, files, losses, matching, mfu, optim, pretrained,
                        visualize)
from updetr_jax.data import eval_data_config, make_detection_dataset, make_pretrain_dataset
from updetr_jax.models import build_model, init_variables
from updetr_jax.torch_import import import_torch_checkpoint


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
  """The DETR / UP-DETR loss as configured: (outputs, targets) -> (loss, terms)."""
  return functools.partial(
      losses.set_criterion, num_classes=config.model.num_classes,
      eos_coef=config.loss.eos_coef, weight_ce=config.loss.weight_ce,
      weight_bbox=config.loss.weight_bbox, weight_giou=config.loss.weight_giou,
      weight_feature=config.loss.get('weight_feature', 0.0),
      feature_recon=bool(config.model.get('feature_recon', False)),
      solver=config.matcher.solver, num_replicas=config.loss_replicas)


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
  if (config.model.backbone not in PRETRAINED_CNNS or resuming
      or init.get('random_backbone', False)
      or any(init.get(k) for k in ('backbone_checkpoint', 'pretrained', 'checkpoint'))):
    return
  raise ValueError(
      f'config.model.backbone={config.model.backbone!r} would start from random weights: '
      'set config.init.backbone_checkpoint to a torchvision-layout ResNet .pth (the '
      'UP-DETR release uses SwAV 800 epochs, swav_800ep_pretrain.pth.tar from '
      'https://github.com/facebookresearch/swav; DETR uses torchvision\'s ImageNet '
      'ResNet), or config.init.pretrained / config.init.checkpoint; to train from a '
      'random CNN on purpose, pass --config.init.random_backbone=True')


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
    variables = import_torch_checkpoint(init.backbone_checkpoint, config.model,
                                        variables=variables)
  if init.get('pretrained'):
    source, source_config = pretrained.load_pretrained(init.pretrained, config.model)
    variables = pretrained.init_from_pretrained(variables, dict(config.model), source,
                                                source_config)
    logging.warning('initialised from %s (all weights but %s)', init.pretrained,
                    ', '.join(pretrained.PRETRAIN_ONLY_HEADS))
  if init.get('checkpoint'):
    variables = checkpoints.load_variables(init.checkpoint, variables)
  trainable, frozen = optim.partition_params(variables['params'], config.optim.frozen)
  tx, schedules = optim.make_optimizer(config.optim, trainable, steps_per_epoch)
  state = {'step': jnp.zeros((), jnp.int32), 'params': trainable,
           'opt_state': tx.init(trainable)}
  constants = {'frozen': frozen, 'batch_stats': variables['batch_stats']}
  return variables, state, constants, tx, schedules


def make_train_step(model, tx, loss_fn):
  """Pure update: (state, constants, batch, rng) -> (state, metrics).

  batch: images [B, H, W, 3], padding_mask [B, H, W], targets, and patches
  [B, M, P, P, 3] for UP-DETR (absent for DETR).
  state = {'step', 'params' (trainable), 'opt_state'}; constants = {'frozen',
  'batch_stats'} get no gradient. A non-finite loss or gradient leaves the state
  unchanged and reports ``finite = False``.
  """

  def step_fn(state, constants, batch, rng):
    rng = jax.random.fold_in(rng, state['step'])

    def loss_of(params):
      out = model.apply(full_variables(dict(state, params=params), constants),
                        batch['images'], batch['padding_mask'], batch.get('patches'),
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


def make_eval_step(model, num_patches: int, out_shardings=None):
  """Jitted (variables, batch) -> (patch IoU [B, M], outputs), eval mode.

  out_shardings: e.g. a replicated ``NamedSharding`` so that every process of a
  multi-host job can read the whole batch's results."""

  @functools.partial(jax.jit, out_shardings=out_shardings)
  def eval_step(variables, batch):
    out = model.apply(variables, batch['images'], batch['padding_mask'], batch['patches'],
                      train=False)
    ious = evaluate.patch_iou(out, batch['targets'], num_patches)
    # The same images with the next image's patches: does the model use the patches?
    wrong = model.apply(variables, batch['images'], batch['padding_mask'],
                        jnp.roll(batch['patches'], 1, axis=0), train=False)
    ious['group_best_wrong_patches'] = evaluate.group_best_iou(
        wrong['pred_boxes'], batch['targets'], num_patches)
    return ious, out

  return eval_step


def evaluate_patches(eval_step, variables, batches, sharding):
  """Mean IoUs of the patch predictions over ``batches`` (see ``evaluate.patch_iou``).

  ``eval_step``'s outputs must be readable by every process (replicated
  ``out_shardings`` on a multi-host mesh). Returns ({'matched': mean, 'group_top':
  mean}, (first host batch, its outputs, its IoU dict)) for plotting.
  """
  totals, count, first = {}, 0, None
  for batch in batches:
    ious, out = jax.device_get(eval_step(variables, to_global(model_inputs(batch), sharding)))
    mask = _process_gather(batch['targets']['mask'])  # the global batch's rows
    for k, v in ious.items():
      totals[k] = totals.get(k, 0.0) + float(np.asarray(v)[mask].sum())
    count += int(mask.sum())
    if first is None:  # this host's rows of the global outputs
      b = len(batch['targets']['mask'])
      rows = slice(jax.process_index() * b, (jax.process_index() + 1) * b)
      first = (batch, jax.tree_util.tree_map(lambda x: np.asarray(x)[rows], out),
               jax.tree_util.tree_map(lambda x: np.asarray(x)[rows], ious))
  return {k: v / max(count, 1) for k, v in totals.items()}, first


def step_cost(train_step, args, dtype: str) -> dict:
  """FLOPs of one train step (XLA's cost analysis of the lowered step, all devices)
  and the peak FLOP/s of the job's devices (None when the device is not in
  ``mfu.PEAK_FLOPS``; the dtype column from ``mfu.peak_dtype``)."""
  flops = mfu.step_flops(train_step.lower(*args))
  device = jax.devices()[0]
  kind = device.device_kind
  peak_dtype = mfu.peak_dtype(dtype, device)
  peak = mfu.device_peak_flops(kind, peak_dtype)
  total_peak = peak * jax.device_count() if peak else None
  logging.warning('train step: %s GFLOP (XLA cost analysis, first batch shape); %d x %s, '
                  'peak %s', f'{flops / 1e9:,.1f}' if flops else '?', jax.device_count(),
                  kind, f'{total_peak / 1e12:,.0f} TFLOP/s ({peak_dtype})' if total_peak
                  else 'unknown (no MFU)')
  return {'flops_per_step': flops, 'peak_flops': total_peak}


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
      terms = ' '.join(f'{k[5:]} {scalars[k]:.3f}' for k in
                       ('loss_ce', 'loss_bbox', 'loss_giou', 'loss_feature') if k in scalars)
      util = f'  MFU {scalars["mfu"]:.1%}' if 'mfu' in scalars else ''
      logging.warning('step %d/%d  loss %.4f (%s)  lr %.2e  %.2f steps/s%s  ETA %s', step,
                      self.total, scalars['loss'], terms, scalars.get('lr', 0), rate, util,
                      time.strftime('%H:%M:%S', time.gmtime(eta)))
    self.t0, self.s0 = now, step



MODEL_INPUTS = ('images', 'padding_mask', 'patches', 'targets')


def model_inputs(batch: dict) -> dict:
  """The entries of a host batch the train step reads (ids, sizes and flags stay home)."""
  return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def _process_gather(x: np.ndarray) -> np.ndarray:
  """Host-local rows -> the global batch's rows (in process order) on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


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


class PatchTask:
  """Pre-training: random query patch detection, evaluated by the patch IoU on
  evaluation images (held out when the data config names them)."""

  def __init__(self, config, data_sharding):
    self.config, self.sharding = config, data_sharding
    if config.model.get('num_patches', 0) <= 0:
      raise ValueError('config.task=pretrain needs config.model.num_patches > 0')
    self.eval_step = None
    self.before = None
    self._eval_it = None
    self.eval_data, self.held_out = eval_data_config(config.data)
    self.eval_images = 'held-out images' if self.held_out else 'training images'
    if not self.held_out and config.eval.get('num_batches', 0) > 0:
      logging.warning('pre-training evaluation: no held-out images configured '
                      '(data.eval_folder / eval_tfds_split); new patches of training images')

  def examples_per_epoch(self) -> int:
    return self.config.examples_per_epoch

  def train_data(self, start: int):
    c = self.config
    it, stats = make_pretrain_dataset(
        c.data, global_batch_size=c.batch_size, num_patches=c.model.num_patches, train=True,
        seed=c.seed, start_step=start, process_index=jax.process_index(),
        process_count=jax.process_count())
    return it, stats

  def _eval_batches(self):
    """Evaluation query patches: eval transforms, a different patch seed, fixed order;
    the same first ``eval.num_batches`` batches at every evaluation; images from
    ``data.eval_data_config`` (held out when configured)."""
    c = self.config
    if self._eval_it is None:
      self._eval_it, _ = make_pretrain_dataset(
          self.eval_data, global_batch_size=c.batch_size, num_patches=c.model.num_patches,
          train=False, seed=c.seed + 1, process_index=jax.process_index(),
          process_count=jax.process_count())
    else:
      self._eval_it.seek(0)
    return itertools.islice(self._eval_it, c.eval.num_batches)

  def evaluate(self, model, variables, step: int, workdir: str) -> dict:
    """{'patch_iou_matched', 'patch_iou_group_top'} on the evaluation batches."""
    if self.eval_step is None:
      self.eval_step = make_eval_step(model, self.config.model.num_patches,
                                      out_shardings=NamedSharding(self.sharding.mesh, P()))
    iou, self._first = evaluate_patches(self.eval_step, variables, self._eval_batches(),
                                        self.sharding)
    if self.before is None:
      self.before = iou
    logging.warning('step %d: query patches of %s: mean IoU %s', step, self.eval_images,
                    _fmt(iou))
    return {f'patch_iou_{k}': v for k, v in iou.items()}

  def finish(self, metrics: dict, step: int, workdir: str) -> dict:
    """Summary entries (and the patch PNG) after the final evaluation."""
    before = self.before
    out = {'eval_images': self.eval_images,  # every metric of evaluate.patch_iou
           'patch_eval_before': {k: round(v, 4) for k, v in before.items()},
           'patch_eval_after': {k[len('patch_iou_'):]: round(v, 4) for k, v in metrics.items()}}
    if jax.process_index() == 0:
      batch, out_, iou = self._first
      idx = np.asarray(matching.hungarian_match(out_, batch['targets']))
      boxes = np.take_along_axis(out_['pred_boxes'], np.maximum(idx, 0)[..., None], axis=1)
      png = os.path.join(workdir, 'patch_detection.png')
      visualize.plot_patch_detection(
          png, batch['images'][0], batch['padding_mask'][0], batch['patches'][0],
          batch['targets']['boxes'][0], boxes[0], iou['matched'][0],
          title=f'query patches of {self.eval_images} after {step} steps: '
                'matched predictions\n'
                f'(mean IoU {before["matched"]:.2f} -> {metrics["patch_iou_matched"]:.2f})')
      out['png'] = png
    return out


class DetectionTask:
  """Fine-tuning DETR on labelled boxes (COCO json, TFDS COCO / VOC), evaluated with
  pycocotools (and VOC07 AP50 when ``eval.voc07``) on the evaluation split."""

  def __init__(self, config, data_sharding):
    self.config, self.sharding = config, data_sharding
    if config.model.get('num_patches', 0):
      raise ValueError(f'config.task=detection trains DETR: set config.model.num_patches=0 '
                       f'(got {config.model.num_patches})')
    # Plans the data before the model is built: errors surface early, num_classes.
    self._train_it, self._train_stats, self.info = self._dataset(train=True)
    self._eval_it = None
    n = self.info.num_classes
    if config.model.num_classes < 0:
      config.model.num_classes = n
    elif config.model.num_classes < n:
      raise ValueError(f'config.model.num_classes={config.model.num_classes} but the labels '
                       f'of {self.info.source} go up to {n - 1}')
    self.detect = None
    self.gt = None

  def _dataset(self, *, train: bool):
    c = self.config
    return make_detection_dataset(
        c.data, global_batch_size=c.batch_size if train else c.eval.batch_size, train=train,
        seed=c.seed, process_index=jax.process_index(), process_count=jax.process_count())

  def examples_per_epoch(self) -> int:
    return self.config.examples_per_epoch if self.config.examples_per_epoch > 0 else \
        self.info.num_examples

  def train_data(self, start: int):
    self._train_it.seek(start)
    return self._train_it, self._train_stats

  def evaluate(self, model, variables, step: int, workdir: str) -> dict:
    """COCO metrics (AP, AP50, AP75, APs, APm, APl; VOC07 AP50 as 'AP50_voc07') on the
    evaluation split; writes ``workdir/eval/detections.json`` (COCO results format)."""
    c = self.config
    if c.eval.batch_size % jax.device_count():
      raise ValueError(f'config.eval.batch_size={c.eval.batch_size} must be divisible by '
                       f'the {jax.device_count()} devices')
    if self.detect is None:
      self.detect = evaluate.make_detect_fn(
          model, out_shardings=NamedSharding(self.sharding.mesh, P()))
      self.gt = evaluate.evaluation_ground_truth(c.data)
    if self._eval_it is None:
      self._eval_it, _, self._eval_info = self._dataset(train=False)
    else:
      self._eval_it.seek(0)
    it, info = self._eval_it, self._eval_info
    evaluator = evaluate.CocoEvaluator(info.label_to_category_id)
    self._shown = []
    for batch in it:
      g = to_global({k: batch[k] for k in ('images', 'padding_mask', 'orig_size')},
                    self.sharding)
      scores, labels, boxes = jax.device_get(
          self.detect(variables, g['images'], g['padding_mask'], g['orig_size']))
      ids, valid = _process_gather(batch['image_id']), _process_gather(batch['valid'])
      evaluator.update(ids, scores, labels, boxes, valid)
      self._keep_for_pictures(batch, scores, labels, boxes)
    metrics = evaluator.summarize(self.gt)
    if c.eval.get('voc07', False):
      metrics['AP50_voc07'] = evaluate.voc07_from_coco(self.gt, evaluator.results(),
                                                       evaluator.image_ids)['mAP']
    if jax.process_index() == 0:
      files.makedirs(os.path.join(workdir, 'eval'))
      evaluator.write_json(os.path.join(workdir, 'eval', 'detections.json'))
    logging.warning('step %d: %s on %d images: %s', step, info.source,
                    len(evaluator.image_ids),
                    ', '.join(f'{k} {v:.4f}' for k, v in metrics.items()))
    return metrics

  def _keep_for_pictures(self, batch, scores, labels, boxes):
    """The first ``eval.num_pictures`` valid images of process 0 and their detections."""
    lo = jax.process_index() * len(batch['valid'])  # host rows in the global batch
    for r in range(len(batch['valid'])):
      if len(self._shown) < self.config.eval.get('num_pictures', 4) and batch['valid'][r]:
        self._shown.append((batch['images'][r], batch['padding_mask'][r],
                            batch['orig_size'][r], batch['image_id'][r], scores[lo + r],
                            labels[lo + r], boxes[lo + r]))

  def finish(self, metrics: dict, step: int, workdir: str) -> dict:
    """Summary entries and PNGs of the last evaluation's first images."""
    out = {'eval': dict(metrics)}
    if jax.process_index() > 0:
      return out
    threshold = self.config.eval.get('picture_threshold', 0.5)
    pngs = []
    for image, pad, orig, iid, scores, labels, boxes in self._shown:
      h, w = int((~pad).any(1).sum()), int((~pad).any(0).sum())
      scale = np.array([w / orig[1], h / orig[0]] * 2, np.float32)
      keep = scores >= threshold
      png = os.path.join(workdir, f'detections_{int(iid)}.png')
      visualize.plot_detections(png, visualize.denormalize(image[:h, :w]),
                                boxes[keep] * scale, labels[keep], scores[keep],
                                self.info.class_names)
      pngs.append(png)
    out['pngs'] = pngs
    return out


TASKS = {'pretrain': PatchTask, 'detection': DetectionTask}


class BestCheckpoint:
  """Keeps the checkpoint with the best ``eval.best_metric`` in ``workdir/best``
  (one step; ``best.json`` holds its step and metrics). Survives restarts."""

  def __init__(self, workdir: str, metric: str, config):
    self.metric = metric
    self.manager = checkpoints.TrainCheckpoints(
        os.path.join(workdir, checkpoints.BEST_DIR), save_every_steps=1, keep=1, config=config)
    self.json = os.path.join(workdir, checkpoints.BEST_DIR, 'best.json')
    self.record = None
    if files.exists(self.json):
      record = files.read_json(self.json)
      if record.get('step') in self.manager.all_steps():
        self.record = record

  def update(self, step: int, metrics: dict, ckpt) -> bool:
    if self.metric not in metrics:
      raise ValueError(f'config.eval.best_metric={self.metric!r} is not among the evaluation '
                       f'metrics {sorted(metrics)}')
    value = metrics[self.metric]
    if self.record is not None and not value > self.record['value']:
      return False
    self.manager.save(step, ckpt, force=True)
    self.record = {'step': step, 'metric': self.metric, 'value': value, 'metrics': metrics}
    if jax.process_index() == 0:
      files.write_json(self.json, self.record)
    logging.warning('step %d: new best %s %.4f -> %s', step, self.metric, value,
                    self.manager.directory)
    return True


def run(config, workdir: str) -> dict:
  """Trains as configured (``config.task``: 'pretrain' or 'detection'); resumes from
  ``workdir/checkpoints`` when present.

  Returns a summary dict (also written to ``workdir/summary.json``).
  """
  # ---------------------------------------------------------------- Set up mesh
  files.makedirs(workdir)
  if config.get('compilation_cache_dir'):  # compiled steps persist across runs
    jax.config.update('jax_compilation_cache_dir',
                      os.path.abspath(os.path.expanduser(config.compilation_cache_dir)))
  mesh = make_mesh()
  repl = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P('data'))
  if config.batch_size % jax.device_count():
    raise ValueError(f'config.batch_size={config.batch_size} must be divisible by the '
                     f'{jax.device_count()} devices')
  if config.batch_size % config.loss_replicas:
    raise ValueError(f'config.batch_size={config.batch_size} must be divisible by '
                     f'config.loss_replicas={config.loss_replicas}')
  task_name = config.get('task', 'pretrain')
  if task_name not in TASKS:
    raise ValueError(f'config.task={task_name!r}: choose one of {sorted(TASKS)}')
  check_backbone_init(config, resuming=checkpoints.has_steps(
      os.path.join(workdir, checkpoints.LAST_DIR)))
  task = TASKS[task_name](config, data_sharding)  # may resolve config fields
  config.examples_per_epoch = task.examples_per_epoch()
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() == 0:
    files.write_file(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
  num_steps, steps_per_epoch = total_steps(config)
  evaluating = config.eval.get('enabled', config.eval.get('num_batches', 0) > 0)

  # ------------------------------------------------------ Checkpoints
  manager = checkpoints.TrainCheckpoints(
      os.path.join(workdir, checkpoints.LAST_DIR), save_every_steps=config.checkpoint_every_steps,
      keep=config.keep_checkpoints, config=config)
  best = (BestCheckpoint(workdir, config.eval.best_metric, config)
          if evaluating and config.eval.get('best_metric') else None)

  # ------------------------------------------------------ Model & optimizer
  model = build_model(config.model)
  init_rng, step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  resuming = manager.latest_step() is not None
  variables, state, constants, tx, schedules = init_train_state(
      config, model, init_rng, steps_per_epoch, load_init=not resuming)
  logging.warning('model: %s params trainable, %s frozen; %d steps (%d per epoch)',
                  f'{optim.count_params(state["params"]):,}',
                  f'{optim.count_params(constants["frozen"]):,}', num_steps, steps_per_epoch)
  state, constants = jax.device_put((state, constants), repl)
  restored, start = manager.restore_latest({'state': state, 'constants': constants})
  if restored is not None:
    state, constants = restored['state'], restored['constants']
    logging.warning('resumed from %s at step %d', manager.directory, start)
  start = int(start or 0)

  # ------------------------------------------------------ Input pipeline
  train_iter, data_stats = task.train_data(start)
  if evaluating and task_name == 'pretrain':  # the initial model (before any resumed
    task.evaluate(model, variables, 0, workdir)  # training), for the before/after
  del variables  # its buffers may be donated to the train step

  # ------------------------------------------------------ Update step
  train_step = jax.jit(make_train_step(model, tx, criterion(config)), donate_argnums=(0,),
                       out_shardings=(repl, repl))

  def run_eval(step):
    metrics = task.evaluate(model, full_variables(state, constants), step, workdir)
    writer.write_scalars(step, {f'eval/{k}': v for k, v in metrics.items()})
    if jax.process_index() == 0:  # every evaluation, for curves (updetr_jax.compare)
      files.append_line(os.path.join(workdir, 'eval.jsonl'),
                        json.dumps({'step': step, **{k: float(v) for k, v in metrics.items()}}))
    if best is not None:
      best.update(step, metrics, {'state': state, 'constants': constants})
    return metrics

  # ------------------------------------------------------ Train loop
  progress = Progress(writer, num_steps, start, config.log_every_steps,
                      os.path.join(workdir, 'metrics.jsonl'))
  pending = None  # metrics of the previous step, checked one step late (keeps async dispatch)
  t_start = time.time()
  preemption = PreemptionWatch()
  preempted_at = None
  for step in range(start + 1, num_steps + 1):
    batch = to_global(model_inputs(next(train_iter)), data_sharding)
    if step == start + 1 and config.get('report_flops', True):
      progress.cost = step_cost(train_step, (state, constants, batch, step_rng),
                                config.model.get('dtype', 'float32'))
    state, step_metrics = train_step(state, constants, batch, step_rng)
    if pending is not None:
      check_finite(jax.device_get(pending[1]), pending[0])
    pending = (step, step_metrics)
    eval_now = evaluating and config.eval.every_steps > 0 and step % config.eval.every_steps == 0
    if (manager.should_save(step) or step == num_steps or eval_now
        or step % config.log_every_steps == 0):
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
      logging.warning('preemption notice (SIGTERM): saved step %d to %s; rerun the same '
                      'command to resume', step, manager.directory)
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
  summary = {'task': task_name, 'steps': num_steps, 'train_seconds': round(train_time, 1),
             'data_stats': stats}
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
    visualize.plot_curves(os.path.join(workdir, 'loss_curves.png'), progress.history,
                          'training losses')
  writer.flush()
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, 'summary.json'), summary)
  return summary
