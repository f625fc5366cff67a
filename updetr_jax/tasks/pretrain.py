"""Pre-training task: random query patch detection (docs/method.md, 'UP-DETR
pre-training'), evaluated by the IoU of each query patch's prediction on evaluation
images (``evaluate.patch_iou``)."""

from __future__ import annotations

import functools
import itertools
import os
import re

from absl import logging

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from updetr_jax import device_augment, evaluate, matching, visualize
from updetr_jax.data import eval_data_config, make_pretrain_dataset
from updetr_jax.models import fields, resnet
from updetr_jax.tasks.base import TaskBase, format_metrics
from updetr_jax.sharding import model_inputs, process_gather, to_global


# Training batches whose patches set the patch_norm statistics (model.patch_feature_norm).
CALIBRATION_BATCHES = 16


def _data(config) -> dict:
  from updetr_jax.data import resolve_config  # noqa: PLC0415

  return resolve_config(config.data)


def _trained_on(config) -> str:
  """One sentence: the model, its CNN, the data and the budget of a pre-training."""
  d, m, init = _data(config), config.model, config.init
  data = {
    'demo': f"{len(d['demo_images'])} of scikit-image's photographs",
    'mosaics': f"{d['mosaic_count']} synthetic '{d['mosaic_style']}' mosaics",
    'folder': f'the images of {d["folder"]}',
    'tfds': f'TFDS {d["tfds_name"]}:{d["tfds_split"]}',
  }.get(d['source'], d['source'])
  weights = init.get('backbone_checkpoint') or init.get('pretrained') or init.get('checkpoint')
  cnn = f'from {weights}' if weights else 'random'
  if any(re.match(p, 'body/') for p in config.optim.frozen):
    cnn += ', frozen'
  return (
    f'UP-DETR pre-training: {m.backbone} CNN ({cnn}), {m.hidden_dim}-d transformer, '
    f'{m.num_queries} queries, {m.num_patches} query patches per image; trained '
    f'{config.num_train_steps if config.num_train_steps > 0 else config.num_epochs} '
    f'{"steps" if config.num_train_steps > 0 else "epochs"} of {config.batch_size} images '
    f'on {data}'
  )


def reading_guide(config, iou: dict, step: int, eval_images: str) -> list[str]:
  """The lines that end a pre-training: what was trained, how to read the patch IoUs,
  and the config's reference figures (``eval.reference``) beside this run's."""
  gap = iou['group_top'] - iou['group_top_wrong_patches']
  m = config.model.num_patches
  lines = [
    _trained_on(config) + f'; evaluated on query patches of {eval_images}.',
    'How to read it: matched = IoU of the prediction the matcher assigns to each patch; '
    "group_top = IoU of the model's answer (its group's top-scoring query); the gap "
    "to other images' patches is how much that answer depends on the patch (0: not at all).",
    f'This run, step {step}: matched {iou["matched"]:.3f}, group_top {iou["group_top"]:.3f}, '
    f"with other images' patches {iou['group_top_wrong_patches']:.3f} (gap {gap:.3f}), "
    f'own_group {iou["own_group"]:.2f} (chance {1 / m:.2f}).',
  ]
  ref = config.eval.get('reference')
  if ref:
    figures = ', '.join(f'{k} {mean:.3f} ± {std:.3f}' for k, mean, std in ref.figures)
    lines += [
      f'Expected ({ref.source}, mean ± std over seeds {ref.seeds}, {ref.machine}): {figures}.',
      ref.note,
      'Figures vary with the CPU (XLA orders float sums differently): read this run '
      'against the mean ± std, not against one seed elsewhere.',
    ]
  return lines


def make_eval_step(model, num_patches: int, out_shardings=None, prepare=None):
  """Jitted (variables, batch) -> (patch IoU [B, M], outputs), eval mode.

  out_shardings: e.g. a replicated ``NamedSharding`` so that every process of a
  multi-host job can read the whole batch's results. prepare: the host batch ->
  the model's inputs, on the device (``device_augment.batch_preparer``)."""

  @functools.partial(jax.jit, out_shardings=out_shardings)
  def eval_step(variables, batch):
    if prepare is not None:
      batch = prepare(batch)
    out = model.apply(
      variables, batch['images'], batch['padding_mask'], batch['patches'], train=False
    )
    ious = evaluate.patch_iou(out, batch['targets'], num_patches)
    # The same images with the next image's patches: does the model use the patches?
    wrong = model.apply(
      variables,
      batch['images'],
      batch['padding_mask'],
      jnp.roll(batch['patches'], 1, axis=0),
      train=False,
    )
    ious['group_best_wrong_patches'] = evaluate.group_best_iou(
      wrong['pred_boxes'], batch['targets'], num_patches
    )
    # The model's answer (each group's top-scoring query) with the wrong patches.
    wrong_top, _ = evaluate.patch_predictions(wrong, num_patches)
    ious['group_top_wrong_patches'] = evaluate.patch_box_iou(wrong_top, batch['targets'])
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
    mask = process_gather(batch['targets']['mask'])  # the global batch's rows
    for k, v in ious.items():
      totals[k] = totals.get(k, 0.0) + float(np.asarray(v)[mask].sum())
    count += int(mask.sum())
    if first is None:  # this host's rows of the global outputs
      b = len(batch['targets']['mask'])
      rows = slice(jax.process_index() * b, (jax.process_index() + 1) * b)
      first = (
        batch,
        jax.tree_util.tree_map(lambda x: np.asarray(x)[rows], out),
        jax.tree_util.tree_map(lambda x: np.asarray(x)[rows], ious),
      )
  return {k: v / max(count, 1) for k, v in totals.items()}, first


class PatchTask(TaskBase):
  """Pre-training: random query patch detection, evaluated by the patch IoU on
  evaluation images (held out when the data config names them)."""

  evaluate_at_start = True  # before/after figures of the patch IoU

  def __init__(self, config, data_sharding):
    super().__init__(config, data_sharding)
    if fields.fill(config.model)['num_patches'] <= 0:
      raise ValueError('config.task=pretrain needs config.model.num_patches > 0')
    self.eval_step = None
    self.before = None
    self._eval_it = None
    self.eval_data, self.held_out = eval_data_config(config.data)
    self.eval_images = 'held-out images' if self.held_out else 'training images'
    if not self.held_out and config.eval.get('num_batches', 0) > 0:
      logging.warning(
        'pre-training evaluation: no held-out images configured '
        '(data.eval_folder / eval_tfds_split); new patches of training images'
      )

  def device_inputs(self, train: bool, local: bool = False):
    """Host batch -> model inputs on the device: crops, augmentation (training only),
    normalisation (``device_augment.batch_preparer``), each device its own examples
    of the task's mesh; ``local``: a batch on one device instead."""
    data = self.eval_data if not train else _data(self.config)
    return device_augment.batch_preparer(data, train, None if local else self.sharding)

  def _dataset(self, data, *, train: bool, seed: int, start: int = 0):
    """``make_pretrain_dataset`` of ``data`` with the run's batch and patches."""
    return make_pretrain_dataset(
      data,
      global_batch_size=self.config.batch_size,
      num_patches=self.config.model.num_patches,
      train=train,
      seed=seed,
      start_step=start,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )

  def train_data(self, start: int):
    return self._dataset(self.config.data, train=True, seed=self.config.seed, start=start)

  def _eval_batches(self):
    """Evaluation query patches: eval transforms, a different patch seed, fixed order;
    the same first ``eval.num_batches`` batches at every evaluation; images from
    ``data.eval_data_config`` (held out when configured)."""
    c = self.config
    if self._eval_it is None:
      self._eval_it, _ = self._dataset(self.eval_data, train=False, seed=c.seed + 1)
    else:
      self._eval_it.seek(0)
    return itertools.islice(self._eval_it, c.eval.num_batches)

  def calibrate(self, model, variables):
    """Data-dependent frozen statistics, from the first ``CALIBRATION_BATCHES``
    training batches (the run's own images and patches, fixed seed):

    * ``init.calibrate_backbone_bn``: every FrozenBatchNorm of the CNN gets the mean
      and variance of its input on the training images (``resnet.
      estimate_batchnorm_statistics``, averaged over the batches); for a random CNN
      this makes its features centred and spread instead of all alike.
    * ``model.patch_feature_norm``: ``patch_norm`` gets the per-channel mean and
      variance of the pooled patch features (after the above).
    """
    c = self.config
    backbone = bool(c.init.get('calibrate_backbone_bn', False))
    patch_norm = fields.fill(c.model)['patch_feature_norm']
    if not backbone and not patch_norm:
      return variables
    it, _ = self._dataset(c.data, train=True, seed=c.seed)
    prepare = jax.jit(self.device_inputs(train=True))
    batches = [  # global arrays, sharded as the train step's
      prepare(to_global(model_inputs(b), self.sharding))
      for b in itertools.islice(it, CALIBRATION_BATCHES)
    ]
    it.close()
    replicated = NamedSharding(self.sharding.mesh, P())
    if backbone:
      variables = self._calibrate_backbone(model, variables, batches, replicated)
    if patch_norm:
      variables = self._calibrate_patch_norm(model, variables, batches, replicated)
    return variables

  def _calibrate_backbone(self, model, variables, batches, replicated):
    def body_stats(v, images, padding_mask):
      run = lambda x: model.apply(v, x, method=lambda m, y: m.body(y))
      return resnet.estimate_batchnorm_statistics(run, images, padding_mask)

    stats_fn = jax.jit(body_stats, out_shardings=replicated)
    per_batch = [
      jax.device_get(stats_fn(variables, b['images'], b['padding_mask'])) for b in batches
    ]
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables['batch_stats']))
    for path in per_batch[0]:
      means = np.stack([s[path][0] for s in per_batch])
      second = np.stack([s[path][1] + np.square(s[path][0]) for s in per_batch])
      mean = means.mean(0)
      flat[path + ('mean',)] = jnp.asarray(mean, jnp.float32)
      flat[path + ('var',)] = jnp.asarray(second.mean(0) - np.square(mean), jnp.float32)
    logging.info(
      'init.calibrate_backbone_bn: statistics of %d FrozenBatchNorm layers re-estimated on '
      '%d training images',
      len(per_batch[0]),
      sum(len(b['images']) for b in batches),
    )
    return dict(variables, batch_stats=flax.traverse_util.unflatten_dict(flat))

  def _calibrate_patch_norm(self, model, variables, batches, replicated):
    feats = jax.jit(
      functools.partial(model.apply, method='patch_features'), out_shardings=replicated
    )
    stats = [jax.device_get(feats(variables, b['patches'])) for b in batches]
    stats = np.concatenate([s.reshape(-1, s.shape[-1]) for s in stats])
    batch_stats = dict(variables['batch_stats'])
    batch_stats['patch_norm'] = dict(
      batch_stats['patch_norm'],
      mean=jnp.asarray(stats.mean(0), jnp.float32),
      var=jnp.asarray(stats.var(0), jnp.float32),
    )
    logging.info(
      'patch_feature_norm: statistics of %d training patches (mean |feature| %.3g, mean std %.3g)',
      len(stats),
      float(np.abs(stats.mean(0)).mean()),
      float(stats.std(0).mean()),
    )
    return dict(variables, batch_stats=batch_stats)

  def evaluate(self, model, variables, step: int, workdir: str) -> dict:
    """{'patch_iou_matched', 'patch_iou_group_top'} on the evaluation batches."""
    if self.eval_step is None:
      self.eval_step = make_eval_step(
        model,
        self.config.model.num_patches,
        out_shardings=NamedSharding(self.sharding.mesh, P()),
        prepare=self.device_inputs(train=False),
      )
    iou, self._first = evaluate_patches(
      self.eval_step, variables, self._eval_batches(), self.sharding
    )
    if self.before is None:
      self.before = iou
    logging.info(
      'step %d: query patches of %s: mean IoU %s', step, self.eval_images, format_metrics(iou)
    )
    return {f'patch_iou_{k}': v for k, v in iou.items()}

  def finish(self, metrics: dict, step: int, workdir: str) -> dict:
    """Summary entries (and the patch PNG) after the final evaluation."""
    before = self.before
    out = {
      'eval_images': self.eval_images,  # every metric of evaluate.patch_iou
      'patch_eval_before': {k: round(v, 4) for k, v in before.items()},
      'patch_eval_after': {k[len('patch_iou_') :]: round(v, 4) for k, v in metrics.items()},
    }
    own, wrong = metrics['patch_iou_group_top'], metrics['patch_iou_group_top_wrong_patches']
    logging.info(
      "step %d: group_top %.3f with the images' own patches, %.3f with other images' "
      'patches (gap %.3f: how much the answer depends on the query patch)',
      step,
      own,
      wrong,
      own - wrong,
    )
    after = {k[len('patch_iou_') :]: v for k, v in metrics.items()}
    out['reading'] = reading_guide(self.config, after, step, self.eval_images)
    if jax.process_index() == 0:
      batch, out_, iou = self._first
      # This host's first batch, prepared on one local device for the figure.
      local = jax.device_put(model_inputs(batch), jax.local_devices()[0])
      batch = jax.device_get(jax.jit(self.device_inputs(train=False, local=True))(local))
      idx = np.asarray(matching.hungarian_match(out_, batch['targets']))
      boxes = np.take_along_axis(out_['pred_boxes'], np.maximum(idx, 0)[..., None], axis=1)
      png = os.path.join(workdir, 'patch_detection.png')
      visualize.plot_patch_detection(
        png,
        batch['images'][0],
        batch['padding_mask'][0],
        batch['patches'][0],
        batch['targets']['boxes'][0],
        boxes[0],
        iou['matched'][0],
        title=f'query patches of {self.eval_images} after {step} steps: '
        'matched predictions\n'
        f'(mean IoU {before["matched"]:.2f} -> {metrics["patch_iou_matched"]:.2f})',
      )
      out['png'] = png
    return out
