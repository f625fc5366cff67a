"""What the training tasks share: ``TaskBase``, the defaults of the interface
(``updetr_jax.tasks``), and ``LabelledTask``, the data set-up, evaluation helpers and
pictures of the tasks trained on labelled images (detection, one-shot)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from updetr_jax import evaluate, optim, train_step
from updetr_jax.models import build_model


class TaskBase:
  """The interface's defaults; a task adds ``train_data``, ``evaluate`` and ``finish``."""

  evaluate_at_start = False  # no evaluation at step 0
  trains_batch_stats = False  # the model's batch_stats are constants

  def __init__(self, config, data_sharding):
    self.config, self.sharding = config, data_sharding

  def model(self):
    """The detector of ``config.model`` (``models.build_model``)."""
    return build_model(self.config.model)

  def optimizer(self, trainable, steps_per_epoch: int):
    """``optim.make_optimizer`` of ``config.optim``: (tx, schedules)."""
    return optim.make_optimizer(self.config.optim, trainable, steps_per_epoch)

  def examples_per_epoch(self) -> int:
    """``config.examples_per_epoch``."""
    return self.config.examples_per_epoch

  def criterion(self):
    """The DETR / UP-DETR set loss as configured (``train_step.criterion``)."""
    return train_step.criterion(self.config)

  def device_inputs(self, train: bool):
    """None: the host batch holds the model's inputs, nothing is prepared on the device."""
    del train
    return None

  def calibrate(self, model, variables):
    """``variables`` unchanged: nothing is estimated from the data."""
    del model
    return variables


def format_metrics(metrics: dict, digits: int = 4) -> str:
  return ', '.join(f'{k} {v:.{digits}f}' for k, v in metrics.items())


def unpadded(shown: dict) -> tuple[int, int, np.ndarray]:
  """(h, w) of a kept evaluation image without its padding, and the [4] factors from
  its original pixels (``orig_size``) to that image's (xyxy boxes)."""
  pad, orig = shown['padding_mask'], shown['orig_size']
  h, w = int((~pad).any(1).sum()), int((~pad).any(0).sum())
  return h, w, np.array([w / orig[1], h / orig[0]] * 2, np.float32)


class LabelledTask(TaskBase):
  """A task on labelled images: the training data is planned when the task is made
  (errors surface before the model is built; ``info`` gives the classes and the
  epoch's length), the evaluation data, detector and ground truth on first use.

  A subclass defines ``_make_dataset`` and ``_picture``; its ``evaluate`` starts with
  ``_start_evaluation`` and keeps its first trials with ``_keep_for_pictures``, which
  ``finish`` draws.
  """

  def __init__(self, config, data_sharding):
    super().__init__(config, data_sharding)
    self._train_it, self._train_stats, self.info = self._dataset(train=True)
    self._eval_it = self._eval_info = None
    self.detect = None  # evaluate.make_detect_fn (_detector)
    self.gt = None  # the evaluation split's ground truth (evaluate.evaluation_ground_truth)
    self._shown = []  # the pictures' trials (_keep_for_pictures)

  def _make_dataset(self, data_config, **kwargs):
    """``updetr_jax.data``'s ``make_*_dataset(data_config, **kwargs)`` of the task:
    (iterator, stats, info)."""
    raise NotImplementedError

  def _dataset(self, *, train: bool):
    c = self.config
    return self._make_dataset(
      c.data,
      global_batch_size=c.batch_size if train else c.eval.batch_size,
      train=train,
      seed=c.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )

  def examples_per_epoch(self) -> int:
    """``config.examples_per_epoch``, or (<= 0) the training data's."""
    c = self.config
    return c.examples_per_epoch if c.examples_per_epoch > 0 else self.info.num_examples

  def train_data(self, start: int):
    self._train_it.seek(start)
    return self._train_it, self._train_stats

  def _eval_data(self):
    """(iterator, info) of the evaluation split, made on the first call and kept; the
    caller rewinds it."""
    if self._eval_it is None:
      self._eval_it, _, self._eval_info = self._dataset(train=False)
    return self._eval_it, self._eval_info

  def _detector(self, model):
    """``evaluate.make_detect_fn(model)``, made on the first call, outputs replicated."""
    if self.detect is None:
      self.detect = evaluate.make_detect_fn(
        model, out_shardings=NamedSharding(self.sharding.mesh, P())
      )
    return self.detect

  def _start_evaluation(self) -> None:
    """Checks ``eval.batch_size``, reads the ground truth (first call) and forgets the
    previous evaluation's pictures."""
    c = self.config
    if c.eval.batch_size % jax.device_count():
      raise ValueError(
        f'config.eval.batch_size={c.eval.batch_size} must be divisible by '
        f'the {jax.device_count()} devices'
      )
    if self.gt is None:
      self.gt = evaluate.evaluation_ground_truth(c.data)
    self._shown = []

  def _keep_for_pictures(self, batch, keys, **outputs) -> None:
    """Keeps the first ``eval.num_pictures`` valid rows of this host's ``batch``: their
    ``keys`` and ``outputs`` (arrays of the global batch, every process's rows)."""
    lo = jax.process_index() * len(batch['valid'])  # host rows in the global batch
    for r in range(len(batch['valid'])):
      if len(self._shown) < self.config.eval.get('num_pictures', 4) and batch['valid'][r]:
        self._shown.append(
          {k: batch[k][r] for k in keys} | {k: np.asarray(v)[lo + r] for k, v in outputs.items()}
        )

  def _picture(self, shown: dict, threshold: float, workdir: str) -> str:
    """Draws one kept trial (``_keep_for_pictures``, scores >= ``threshold``) into a PNG
    in ``workdir``; returns its path."""
    raise NotImplementedError

  def finish(self, metrics: dict, step: int, workdir: str) -> dict:
    """Summary entries and PNGs (``_picture``) of the last evaluation's first trials."""
    out = {'eval': dict(metrics)}
    if jax.process_index() > 0:
      return out
    threshold = self.config.eval.get('picture_threshold', 0.5)
    out['pngs'] = [self._picture(shown, threshold, workdir) for shown in self._shown]
    return out
