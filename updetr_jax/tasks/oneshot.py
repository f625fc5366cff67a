"""One-shot detection task (docs/method.md, 'One-shot detection'): find the instances of
a query crop's class.

The model is UP-DETR with one query patch (``model.num_patches=1``): the query crop
goes through the CNN, global average pooling and ``patch2query`` and is added to all
N object queries (no attention mask); the class head is binary (``num_classes=1``:
label 0 = "is the query's class", plus no-object), no ``feature_align``. From an
UP-DETR pre-training (``init.pretrained``) every weight but the class head is kept,
``patch2query`` included; from a DETR checkpoint ``patch2query`` starts fresh.

Data and protocol: ``updetr_jax.data.oneshot`` (CoAE: unseen classes removed from
training, one trial per (test image, class present), deterministic queries per seed).
Evaluation: for every seed of ``eval.query_seeds`` (five in the literature) one pass
over the trials; per class the VOC07 11-point AP50 (``evaluate.oneshot_ap50``), its
means over the seen and the unseen classes per run, and mean +- std over the runs.
A control run (``eval.other_class_queries``, default on) gives every trial a query of
another class: a detector that uses its query loses AP there; one that ignores it
(a class-agnostic detector) scores the same.
"""

from __future__ import annotations

from absl import logging
import os

import jax
import numpy as np

from updetr_jax import device_augment, evaluate, files, visualize
from updetr_jax.data.oneshot import make_oneshot_dataset, resolve_oneshot_config
from updetr_jax.models import fields
from updetr_jax.tasks.base import LabelledTask, unpadded
from updetr_jax.sharding import process_gather, to_global


def _name(names: dict, label: int) -> str:
  return str(names.get(label, label)).replace(' ', '_')


def check_model_config(model) -> None:
  """The one-shot detector's model fields, or ValueError naming the wrong ones."""
  wrong = []
  model = fields.fill(model)
  if model['num_patches'] != 1:
    wrong.append(f'config.model.num_patches={model["num_patches"]} (needs 1)')
  if model['num_classes'] != 1:
    wrong.append(f'config.model.num_classes={model["num_classes"]} (needs 1: binary)')
  if model['feature_head']:
    wrong.append('config.model.feature_head=True (needs False: no feature_align)')
  if model['feature_recon']:
    wrong.append('config.model.feature_recon=True (needs False)')
  if wrong:
    raise ValueError('config.task=oneshot: ' + '; '.join(wrong))


class OneShotTask(LabelledTask):
  """One-shot detection fine-tuning, evaluated by seen / unseen AP50 over query runs."""

  def __init__(self, config, data_sharding):
    check_model_config(config.model)
    seeds = tuple(config.eval.query_seeds)
    if not seeds or len(set(seeds)) != len(seeds):
      raise ValueError(f'config.eval.query_seeds={seeds}: give distinct seeds (five, as CoAE)')
    super().__init__(config, data_sharding)
    self._eval_prepare = None  # the query crops normalised on the device (evaluation)
    names = self.info.class_names
    logging.info(
      'one-shot: %d training images; seen classes %s; unseen classes %s',
      self.info.num_trials,
      [names.get(c, c) for c in self.info.seen],
      [names.get(c, c) for c in self.info.unseen],
    )

  def _make_dataset(self, data_config, **kwargs):
    return make_oneshot_dataset(data_config, **kwargs, query_seed=self.config.eval.query_seeds[0])

  def device_inputs(self, train: bool):
    """The query crops (uint8 from the host) augmented (training) and normalised on
    the device, each device its own examples (``device_augment.query_preparer``)."""
    return device_augment.query_preparer(
      resolve_oneshot_config(self.config.data), train, self.sharding
    )

  def run_trials(self, model, variables, query_seed: int, other_class: bool = False):
    """One pass over the evaluation trials with ``query_seed``'s queries (of another
    class with ``other_class``: the control run).

    Returns (image_ids [T], labels [T], scores [T, N], boxes [T, N, 4] xyxy in
    original pixels) of the valid trials (every process gets all of them).
    """
    detect = self._detector(model)
    if self._eval_prepare is None:
      self._eval_prepare = jax.jit(self.device_inputs(train=False))
    it, _ = self._eval_data()
    it.use_query_seed(query_seed, other_class)  # from the first batch
    ids, labels, scores, boxes = [], [], [], []
    keep_pictures = not self._shown and not other_class  # the first query run's trials
    for batch in it:
      inputs = ('images', 'padding_mask', 'orig_size', 'patches', 'patch_seeds')
      g = self._eval_prepare(to_global({k: batch[k] for k in inputs}, self.sharding))
      s, _, b = jax.device_get(
        detect(variables, g['images'], g['padding_mask'], g['orig_size'], g['patches'])
      )
      valid = process_gather(batch['valid'])
      ids.append(process_gather(batch['image_id'])[valid])
      labels.append(process_gather(batch['label'])[valid])
      scores.append(np.asarray(s)[valid])
      boxes.append(np.asarray(b)[valid])
      if keep_pictures:
        keys = ('images', 'padding_mask', 'orig_size', 'image_id', 'label', 'patches')
        self._keep_for_pictures(batch, keys, scores=s, boxes=b)
    cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape)  # noqa: E731
    n = self.config.model.num_queries
    return cat(ids, (0,)), cat(labels, (0,)), cat(scores, (0, n)), cat(boxes, (0, n, 4))

  def evaluate(self, model, variables, step: int, workdir: str) -> dict:
    """AP50_seen / AP50_unseen (mean over the query runs), their std over the runs,
    each run's, and per class (mean over runs, 'AP50_<class>'); writes
    ``workdir/eval/oneshot_step<step>.json`` (every run's per-class AP and trials)."""
    c = self.config
    self._start_evaluation()
    info, names = self.info, self.info.class_names

    def score(seed, other_class=False):
      ids, labels, scores, boxes = self.run_trials(model, variables, seed, other_class)
      gt = evaluate.oneshot_ground_truth(self.gt, ids, labels, info.label_to_category_id)
      dets = [{'label': int(l), 'scores': s, 'boxes': b} for l, s, b in zip(labels, scores, boxes)]
      return dict(evaluate.oneshot_ap50(dets, gt, info.seen, info.unseen), query_seed=seed)

    runs = [score(seed) for seed in c.eval.query_seeds]
    metrics = {}
    for part in ('seen', 'unseen'):
      v = np.array([r[part] for r in runs], np.float64)
      metrics[f'AP50_{part}'] = float(v.mean())
      metrics[f'AP50_{part}_std'] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
      for r in runs:
        metrics[f'AP50_{part}_run{r["query_seed"]}'] = r[part]
    for label in runs[0]['per_class']:
      v = [r['per_class'][label] for r in runs]
      metrics[f'AP50_{_name(names, label)}'] = float(np.mean(v))
    control = None
    if c.eval.get('other_class_queries', True):  # does the detector use its query?
      control = score(c.eval.query_seeds[0], other_class=True)
      for part in ('seen', 'unseen'):
        metrics[f'AP50_{part}_other_class_query'] = control[part]
    if jax.process_index() == 0:
      files.makedirs(os.path.join(workdir, 'eval'))
      files.write_json(
        os.path.join(workdir, 'eval', f'oneshot_step{step}.json'),
        {
          'step': step,
          'seen': [names.get(l, l) for l in info.seen],
          'unseen': [names.get(l, l) for l in info.unseen],
          'runs': [
            {
              'query_seed': r['query_seed'],
              'AP50_seen': r['seen'],
              'AP50_unseen': r['unseen'],
              'per_class': {names.get(l, str(l)): a for l, a in r['per_class'].items()},
              'trials': {names.get(l, str(l)): t for l, t in r['trials'].items()},
            }
            for r in runs
          ],
          'other_class_query': None
          if control is None
          else {
            'query_seed': control['query_seed'],
            'AP50_seen': control['seen'],
            'AP50_unseen': control['unseen'],
          },
        },
      )
    logging.info(
      'step %d: one-shot AP50 over %d query runs (%d trials each): seen %.4f +- %.4f, '
      'unseen %.4f +- %.4f',
      step,
      len(runs),
      sum(runs[0]['trials'].values()),
      metrics['AP50_seen'],
      metrics['AP50_seen_std'],
      metrics['AP50_unseen'],
      metrics['AP50_unseen_std'],
    )
    if control is not None:
      logging.info(
        'step %d: control, queries of another class: AP50 seen %.4f, unseen %.4f',
        step,
        control['seen'],
        control['unseen'],
      )
    return metrics

  def _picture(self, shown: dict, threshold: float, workdir: str) -> str:
    """The query crop beside the instances found (true boxes dashed)."""
    h, w, scale = unpadded(shown)
    keep = shown['scores'] >= threshold
    truth = evaluate.oneshot_ground_truth(
      self.gt, [shown['image_id']], [shown['label']], self.info.label_to_category_id
    )[0]['boxes']
    name = _name(self.info.class_names, int(shown['label']))
    png = os.path.join(workdir, f'oneshot_{int(shown["image_id"])}_{name}.png')
    visualize.plot_oneshot(
      png,
      shown['patches'][0] / 255.0,  # the host's uint8 crop
      visualize.denormalize(shown['images'][:h, :w]),
      shown['boxes'][keep] * scale,
      shown['scores'][keep],
      title=f'query: {name} (score >= {threshold}; true boxes dashed)',
      true_boxes=truth * scale,
    )
    return png
