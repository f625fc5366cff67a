"""Training tasks: what ``train.run`` trains and how it evaluates, one module each.

``train.run`` owns the loop (mesh, checkpoints, optimizer, jitted step, logging,
preemption); a task owns everything specific to what is learnt. A new task is one
module here plus a config whose ``task`` field names it in ``TASKS``; its class
derives from ``base.TaskBase``, which gives the defaults below (``base.LabelledTask``
adds the data set-up, evaluation helpers and pictures of the tasks on labelled images).

The interface (``Task``), called in this order by ``train.run``; every task class
has every member (``tests/test_tasks.py``):

``Task(config, data_sharding)``
    Validates the config (raise ``ValueError`` naming the field) and may resolve
    fields from the data before the model is built (e.g. ``model.num_classes``).
``model() -> flax module``
    What is trained, called as ``model.apply(variables, images, padding_mask, patches,
    train=...)``. Default: the detector of ``config.model`` (``models.build_model``).
``optimizer(trainable_params, steps_per_epoch) -> (tx, schedules)``
    The optax transform and its schedules ({'lr': step -> value, ...}). Default:
    ``optim.make_optimizer`` of ``config.optim`` (the release's AdamW, step decay).
``trains_batch_stats: bool``
    True: the model updates its ``batch_stats`` in training (training-mode BatchNorm),
    kept in the train state. Default False (frozen statistics, in the constants).
``examples_per_epoch() -> int``
    Sets ``config.examples_per_epoch`` (epochs -> steps, schedules). Default: the
    config's.
``criterion() -> loss_fn``
    ``(model outputs, batch['targets']) -> (loss, {name: term})``, jittable; the loss
    inputs are whatever ``train_data``'s batches carry under ``'targets'``. Default:
    the configured DETR / UP-DETR set loss (``train_step.criterion``).
``train_data(start_step) -> (iterator, stats)``
    Host-local batches (numpy dicts with ``sharding.MODEL_INPUTS`` keys: ``images``
    [B, H, W, 3], ``padding_mask`` [B, H, W], ``targets`` (padded, fixed shapes),
    optionally ``patches``), resumed at ``start_step``; ``stats.as_dict()`` /
    ``stats.report()`` count skipped inputs. ``iterator.close()`` ends it.
``device_inputs(train) -> prepare | None``
    A jittable function run at the start of the train step (and the task's own
    evaluation): host batch -> the model's inputs. Pre-training sends uint8 images,
    patch rectangles and seeds; the crops and their augmentation happen on the
    device (``device_augment.batch_preparer``), each device mapping its own
    examples of the task's data sharding. Default None: the host batch holds the
    model's inputs.
``calibrate(model, variables) -> variables``
    Data-dependent initial values of non-trained variables (e.g. the pre-training's
    ``patch_norm`` statistics), called once on a fresh run (not on resume), before
    the first evaluation; the result's ``batch_stats`` replace the run's
    (``train_step.with_batch_stats``). Default: ``variables`` unchanged.
``evaluate(model, variables, step, workdir) -> {metric: float}``
    Called every ``eval.every_steps``, at the end, and at step 0 when the class
    attribute ``evaluate_at_start`` is True (default False); the metrics go to
    TensorBoard, ``eval.jsonl`` and (``eval.best_metric``) the best checkpoint.
``finish(metrics, step, workdir) -> dict``
    Summary entries (and PNGs) after the final evaluation.
"""

from __future__ import annotations

import importlib
from typing import Protocol

# config.task -> 'module:class' (imported on use: a task's data code loads only when run)
TASKS = {
  'pretrain': 'updetr_jax.tasks.pretrain:PatchTask',
  'detection': 'updetr_jax.tasks.detection:DetectionTask',
  'oneshot': 'updetr_jax.tasks.oneshot:OneShotTask',
  'simclr': 'updetr_jax.tasks.simclr:SimCLRTask',
}


class Task(Protocol):
  """Everything ``train.run`` uses of a task; see the module docstring."""

  evaluate_at_start: bool
  trains_batch_stats: bool

  def model(self): ...

  def optimizer(self, trainable, steps_per_epoch: int): ...

  def examples_per_epoch(self) -> int: ...

  def criterion(self): ...

  def train_data(self, start: int): ...

  def device_inputs(self, train: bool): ...

  def calibrate(self, model, variables): ...

  def evaluate(self, model, variables, step: int, workdir: str) -> dict: ...

  def finish(self, metrics: dict, step: int, workdir: str) -> dict: ...


def get_task(name: str) -> type:
  """The task class registered as ``name`` (``config.task``)."""
  if name not in TASKS:
    raise ValueError(f'config.task={name!r}: choose one of {sorted(TASKS)}')
  module, cls = TASKS[name].split(':')
  return getattr(importlib.import_module(module), cls)
