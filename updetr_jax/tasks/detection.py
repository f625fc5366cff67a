"""Detection task: DETR fine-tuning on labelled boxes (COCO json, TFDS COCO / VOC),
evaluated with pycocotools (and VOC07 AP50) on the evaluation split."""

from __future__ import annotations

from absl import logging
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from updetr_jax import evaluate, files, visualize
from updetr_jax.data import make_detection_dataset
from updetr_jax.train_step import criterion, process_gather, to_global


class DetectionTask:
  """Fine-tuning DETR on labelled boxes (COCO json, TFDS COCO / VOC), evaluated with
  pycocotools (and VOC07 AP50 when ``eval.voc07``) on the evaluation split."""

  evaluate_at_start = False  # no detections worth scoring before fine-tuning

  def __init__(self, config, data_sharding):
    self.config, self.sharding = config, data_sharding
    if config.model.get('num_patches', 0):
      raise ValueError(
        f'config.task=detection trains DETR: set config.model.num_patches=0 '
        f'(got {config.model.num_patches})'
      )
    # Plans the data before the model is built: errors surface early, num_classes.
    self._train_it, self._train_stats, self.info = self._dataset(train=True)
    self._eval_it = None
    n = self.info.num_classes
    if config.model.num_classes < 0:
      config.model.num_classes = n
    elif config.model.num_classes < n:
      raise ValueError(
        f'config.model.num_classes={config.model.num_classes} but the labels '
        f'of {self.info.source} go up to {n - 1}'
      )
    self.detect = None
    self.gt = None

  def _dataset(self, *, train: bool):
    c = self.config
    return make_detection_dataset(
      c.data,
      global_batch_size=c.batch_size if train else c.eval.batch_size,
      train=train,
      seed=c.seed,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )

  def examples_per_epoch(self) -> int:
    return (
      self.config.examples_per_epoch
      if self.config.examples_per_epoch > 0
      else self.info.num_examples
    )

  def criterion(self):
    """The DETR / UP-DETR set loss as configured (``train_step.criterion``)."""
    return criterion(self.config)

  def train_data(self, start: int):
    self._train_it.seek(start)
    return self._train_it, self._train_stats

  def evaluate(self, model, variables, step: int, workdir: str) -> dict:
    """COCO metrics (AP, AP50, AP75, APs, APm, APl; VOC07 AP50 as 'AP50_voc07') on the
    evaluation split; writes ``workdir/eval/detections.json`` (COCO results format)."""
    c = self.config
    if c.eval.batch_size % jax.device_count():
      raise ValueError(
        f'config.eval.batch_size={c.eval.batch_size} must be divisible by '
        f'the {jax.device_count()} devices'
      )
    if self.detect is None:
      self.detect = evaluate.make_detect_fn(
        model, out_shardings=NamedSharding(self.sharding.mesh, P())
      )
      self.gt = evaluate.evaluation_ground_truth(c.data)
    if self._eval_it is None:
      self._eval_it, _, self._eval_info = self._dataset(train=False)
    else:
      self._eval_it.seek(0)
    it, info = self._eval_it, self._eval_info
    evaluator = evaluate.CocoEvaluator(info.label_to_category_id)
    self._shown = []
    for batch in it:
      g = to_global({k: batch[k] for k in ('images', 'padding_mask', 'orig_size')}, self.sharding)
      scores, labels, boxes = jax.device_get(
        self.detect(variables, g['images'], g['padding_mask'], g['orig_size'])
      )
      ids, valid = process_gather(batch['image_id']), process_gather(batch['valid'])
      evaluator.update(ids, scores, labels, boxes, valid)
      self._keep_for_pictures(batch, scores, labels, boxes)
    metrics = evaluator.summarize(self.gt)
    if c.eval.get('voc07', False):
      metrics['AP50_voc07'] = evaluate.voc07_from_coco(
        self.gt, evaluator.results(), evaluator.image_ids
      )['mAP']
    if jax.process_index() == 0:
      files.makedirs(os.path.join(workdir, 'eval'))
      evaluator.write_json(os.path.join(workdir, 'eval', 'detections.json'))
    logging.info(
      'step %d: %s on %d images: %s',
      step,
      info.source,
      len(evaluator.image_ids),
      ', '.join(f'{k} {v:.4f}' for k, v in metrics.items()),
    )
    return metrics

  def _keep_for_pictures(self, batch, scores, labels, boxes):
    """The first ``eval.num_pictures`` valid images of process 0 and their detections."""
    lo = jax.process_index() * len(batch['valid'])  # host rows in the global batch
    for r in range(len(batch['valid'])):
      if len(self._shown) < self.config.eval.get('num_pictures', 4) and batch['valid'][r]:
        self._shown.append(
          (
            batch['images'][r],
            batch['padding_mask'][r],
            batch['orig_size'][r],
            batch['image_id'][r],
            scores[lo + r],
            labels[lo + r],
            boxes[lo + r],
          )
        )

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
      visualize.plot_detections(
        png,
        visualize.denormalize(image[:h, :w]),
        boxes[keep] * scale,
        labels[keep],
        scores[keep],
        self.info.class_names,
      )
      pngs.append(png)
    out['pngs'] = pngs
    return out
