"""Detection task: DETR fine-tuning on labelled boxes (COCO json, TFDS COCO / VOC),
evaluated with pycocotools (and VOC07 AP50) on the evaluation split."""

from __future__ import annotations

from absl import logging
import os

import jax

from updetr_jax import evaluate, files, visualize
from updetr_jax.data import make_detection_dataset
from updetr_jax.models import fields
from updetr_jax.tasks.base import LabelledTask, unpadded
from updetr_jax.sharding import process_gather, to_global


class DetectionTask(LabelledTask):
  """Fine-tuning DETR on labelled boxes (COCO json, TFDS COCO / VOC), evaluated with
  pycocotools (and VOC07 AP50 when ``eval.voc07``) on the evaluation split."""

  def __init__(self, config, data_sharding):
    if fields.fill(config.model)['num_patches']:
      raise ValueError(
        f'config.task=detection trains DETR: set config.model.num_patches=0 '
        f'(got {config.model.num_patches})'
      )
    super().__init__(config, data_sharding)  # plans the data: num_classes
    n = self.info.num_classes
    if config.model.num_classes < 0:
      config.model.num_classes = n
    elif config.model.num_classes < n:
      raise ValueError(
        f'config.model.num_classes={config.model.num_classes} but the labels '
        f'of {self.info.source} go up to {n - 1}'
      )

  def _make_dataset(self, data_config, **kwargs):
    return make_detection_dataset(data_config, **kwargs)

  def evaluate(self, model, variables, step: int, workdir: str) -> dict:
    """COCO metrics (AP, AP50, AP75, APs, APm, APl; VOC07 AP50 as 'AP50_voc07') on the
    evaluation split; writes ``workdir/eval/detections.json`` (COCO results format)."""
    self._start_evaluation()
    detect = self._detector(model)
    it, info = self._eval_data()
    it.seek(0)
    evaluator = evaluate.CocoEvaluator(info.label_to_category_id)
    for batch in it:
      g = to_global({k: batch[k] for k in ('images', 'padding_mask', 'orig_size')}, self.sharding)
      scores, labels, boxes = jax.device_get(
        detect(variables, g['images'], g['padding_mask'], g['orig_size'])
      )
      ids, valid = process_gather(batch['image_id']), process_gather(batch['valid'])
      evaluator.update(ids, scores, labels, boxes, valid)
      keys = ('images', 'padding_mask', 'orig_size', 'image_id')
      self._keep_for_pictures(batch, keys, scores=scores, labels=labels, boxes=boxes)
    metrics = evaluator.summarize(self.gt)
    if self.config.eval.get('voc07', False):
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

  def _picture(self, shown: dict, threshold: float, workdir: str) -> str:
    h, w, scale = unpadded(shown)
    keep = shown['scores'] >= threshold
    png = os.path.join(workdir, f'detections_{int(shown["image_id"])}.png')
    visualize.plot_detections(
      png,
      visualize.denormalize(shown['images'][:h, :w]),
      shown['boxes'][keep] * scale,
      shown['labels'][keep],
      shown['scores'][keep],
      self.info.class_names,
    )
    return png
