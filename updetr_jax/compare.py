r"""Pre-training vs scratch, measured: the UP-DETR comparison harness.

  python -m updetr_jax.compare --config=configs/compare.py:mini --workdir=workdir/compare
  python -m updetr_jax.compare --config=configs/compare.py:demo --workdir=...   # short form

Stages (each in its own sub-workdir of ``WORKDIR``; a rerun skips finished runs,
recognised by their ``summary.json``, and resumes the unfinished one from its
checkpoints):
  0. ``data/``: the built-in miniature benchmark (``config.miniature.enabled``;
     ``updetr_jax.data.miniature``), or the user's own data (``config.pretrain.data``
     and ``config.finetune.data`` as in the other configs).
  1. ``stage0/backbone.npz``: the CNN trained self-supervised on the unlabeled pool
     (``config.stage0``; the SimCLR task, ``updetr_jax/tasks/simclr.py``), loaded by
     every run through ``init.backbone_checkpoint`` exactly as the release loads SwAV
     weights. Or the user's own CNN: ``--config.backbone_checkpoint=swav.pth`` (stage 0 skipped).
  2. ``pretrain/<arm>/``: one UP-DETR pre-training per pre-trained arm (``ARMS``).
  3. ``finetune/frac<f>/<arm>/seed<s>/``: fine-tuning (``config.finetune.task``: DETR
     detection, or one-shot detection for ``configs/compare.py:oneshot``) for every label fraction
     ``f``, arm and seed ``s``, all with the same budget, CNN, lr, augmentation, data
     order and label subset (``seed`` picks both; arms share them), evaluated on the
     held-out set every ``finetune.eval.every_steps``.
Then ``results.json`` (every curve, and per fraction / arm / evaluation step the mean
and std over seeds of each metric and the paired difference arm - scratch), the same
as a printed table (``results.txt``) and ``curves.png`` (AP against steps, +- std).
"""

from __future__ import annotations

import json
from absl import logging
import os
import time

import jax
import numpy as np

from updetr_jax import files, stats
from updetr_jax.configs import pretrain as pretrain_configs

# The regime that learns the pretext where the pixels decide it
# (docs/results/pretext_learnability.md): configs/pretrain.py PATCH_OPTIONS and lr 4e-4.
_PATCH_OPTIONS = pretrain_configs.PRETEXT_ARMS['patchnorm_groupmatch_content_value_pos_lr4e-4']

# The options' pre-training where it passes the learnability bar (group_top >= 0.6,
# own_group >= 0.8, a gap of at least 0.2 to other images' patches): the learnability
# benchmark's lookup (benchmarks/pretext_learnability.py --style=rotated_ramp
# --steps=12000 --arms=LOOKUP_ARM: 400 mosaics, batch 8, lr x 0.1 from step 10,000)
# with the harness's CNN; then fine-tuned on the detection data.
LOOKUP_ARM = 'patchnorm_groupmatch_content_value_pos_lr4e-4_drop200'
_LOOKUP = {
  **pretrain_configs.PRETEXT_ARMS[LOOKUP_ARM],
  # configs/pretrain.py:mosaics, as the benchmark runs it
  'data.source': 'mosaics',
  'data.mosaic_style': 'rotated_ramp',
  'data.augment_patches': False,
  'batch_size': 8,
  'examples_per_epoch': 400,
  'num_train_steps': 12000,
  'checkpoint_every_steps': 2000,
  'eval.every_steps': 2000,  # its learning curve (eval.jsonl)
}

# Arms without pre-training: their fine-tuning overrides. 'scratch' is DETR with the
# same CNN and no pre-trained transformer; scratch_value_pos has the options arms'
# decoder (value_pos), their architecture's control.
SCRATCH_ARMS = {'scratch': {}, 'scratch_value_pos': {'model.value_pos': True}}
# Pre-trained arms: overrides of config.pretrain (paths as in the config); None for
# SCRATCH_ARMS.
ARMS = {
  'updetr': {},  # the paper's setting: frozen CNN + feature reconstruction
  'updetr_no_feature_recon': {'model.feature_recon': False},
  # single-query pre-training (M = 1: every query gets the one patch, as one-shot's do)
  'updetr_single_query': {'model.num_patches': 1},
  # "feature reconstruction without frozen CNN": the CNN trains in pre-training.
  'updetr_trainable_cnn': {'optim.frozen': (r'^position/',)},
  # with the options that learn the pretext (fine-tuned with its value_pos)
  'updetr_patch_options': _PATCH_OPTIONS,
  'updetr_single_query_patch_options': {'model.num_patches': 1, **_PATCH_OPTIONS},
  'updetr_lookup': _LOOKUP,
  # ... with M = 1 (every query gets the patch, as one-shot's queries do)
  'updetr_single_query_lookup': {**_LOOKUP, 'model.num_patches': 1},
  **dict.fromkeys(SCRATCH_ARMS),
}
METRICS = ('AP', 'AP50')  # detection; config.metrics picks (one-shot: AP50_seen, AP50_unseen)


def _finished(workdir: str) -> dict | None:
  path = os.path.join(workdir, 'summary.json')
  return files.read_json(path) if files.exists(path) else None


def check_config(config) -> None:
  unknown = [a for a in config.arms if a not in ARMS]
  if unknown:
    raise ValueError(f'config.arms: unknown {unknown}; choose from {sorted(ARMS)}')
  if 'scratch' not in config.arms:
    raise ValueError("config.arms must include 'scratch' (the baseline of the paired differences)")
  if not config.seeds:
    raise ValueError('config.seeds is empty')
  for pair in config.get('pairs', ()):
    if len(pair) != 2 or any(a not in config.arms for a in pair):
      raise ValueError(f'config.pairs: {pair!r} is not two of config.arms {tuple(config.arms)}')
  if not config.metrics:
    raise ValueError('config.metrics is empty (the evaluation metrics to compare)')
  for f in config.label_fractions:
    if not 0 < f <= 1:
      raise ValueError(f'config.label_fractions: {f} is not in (0, 1]')
  if (
    any(f < 1 for f in config.label_fractions)
    and config.finetune.data.get('source', 'coco_json') != 'coco_json'
  ):
    raise ValueError(
      'config.label_fractions < 1 need a COCO json training set '
      '(config.finetune.data.source=coco_json)'
    )


# ----------------------------------------------------------------------- stages 0-1


def prepare_data(config, workdir: str) -> None:
  """Writes the miniature benchmark (when enabled) and points the configs at it."""
  if not config.miniature.enabled:
    return
  from updetr_jax.data import miniature  # noqa: PLC0415

  m = config.miniature
  directory = m.directory or os.path.join(workdir, 'data')
  paths = miniature.write_miniature(
    directory, seed=m.seed, num_pool=m.num_pool, num_train=m.num_train, num_eval=m.num_eval
  )
  config.pretrain.data.update(
    source='folder', folder=paths['pool_dir'], eval_folder=paths['eval_dir']
  )
  config.finetune.data.update(
    source='coco_json',
    ann_file=paths['train_ann'],
    image_dir=paths['train_dir'],
    eval_ann_file=paths['eval_ann'],
    eval_image_dir=paths['eval_dir'],
  )
  if config.stage0.enabled and not config.stage0.data.folder:
    config.stage0.data.folder = paths['pool_dir']


def prepare_backbone(config, workdir: str) -> str:
  """Path of the CNN every run starts from: the user's, or stage 0's (trained here)."""
  if config.backbone_checkpoint:
    return config.backbone_checkpoint
  if not config.stage0.enabled:
    return ''
  from updetr_jax.tasks.simclr import BACKBONE_FILE  # noqa: PLC0415

  c = config.stage0.copy_and_resolve_references()
  c.model.backbone = config.pretrain.model.backbone  # the CNN the pre-training loads
  if config.compilation_cache_dir:
    c.compilation_cache_dir = config.compilation_cache_dir
  directory = os.path.join(workdir, 'stage0')
  _run(c, directory, 'stage 0 (SimCLR)')
  return os.path.join(directory, BACKBONE_FILE)


# ----------------------------------------------------------------------- stages 2-3


def pretrain_config(config, arm: str, backbone: str):
  """The pre-training run of a pre-trained arm."""
  c = config.pretrain.copy_and_resolve_references()
  c.update_from_flattened_dict(ARMS[arm])
  c.init.backbone_checkpoint = backbone
  if config.compilation_cache_dir:
    c.compilation_cache_dir = config.compilation_cache_dir
  return c


def label_subset(ann_file: str, fraction: float, seed: int, out_dir: str) -> str:
  """A COCO json with ``fraction`` of the images of ``ann_file`` (a seeded choice, at
  least one image; categories kept, so labels do not change). 1.0: ``ann_file``."""
  if fraction >= 1:
    return ann_file
  out = os.path.join(out_dir, f'train_frac{fraction:g}_seed{seed}.json')
  if files.exists(out):
    return out
  coco = files.read_json(ann_file)
  images = sorted(coco['images'], key=lambda im: int(im['id']))
  n = max(1, int(round(fraction * len(images))))
  rng = np.random.default_rng([seed, 7919])
  keep = {int(images[i]['id']) for i in sorted(rng.choice(len(images), n, replace=False))}
  subset = dict(
    coco,
    images=[im for im in images if int(im['id']) in keep],
    annotations=[a for a in coco.get('annotations', []) if int(a['image_id']) in keep],
  )
  files.makedirs(out_dir)
  files.write_json(out, subset, indent=None)
  return out


def finetune_config(
  config, arm: str, seed: int, fraction: float, backbone: str, pretrain_dir: str, subset_dir: str
):
  """One fine-tuning run: identical for every arm but ``init.pretrained`` and the
  model fields the arm's pre-training changed that must agree with it
  (``updetr_jax.pretrained``'s architecture fields and patch_feature_norm, e.g.
  ``value_pos``; where the fine-tuning model has them) or its ``SCRATCH_ARMS``
  overrides."""
  from updetr_jax import pretrained  # noqa: PLC0415  (orbax: not at import)

  c = config.finetune.copy_and_resolve_references()
  c.seed = seed
  c.init.backbone_checkpoint = backbone
  if ARMS[arm] is None:
    c.init.pretrained = ''
    c.update_from_flattened_dict(SCRATCH_ARMS[arm])
  else:
    c.init.pretrained = pretrain_dir
    inherited = {
      *pretrained.ARCHITECTURE_FIELDS,
      *pretrained.PATCH_ARCHITECTURE_FIELDS,
      'patch_feature_norm',
    }
    for key, value in ARMS[arm].items():
      name = key.removeprefix('model.')
      if key.startswith('model.') and name in inherited and name in c.model:
        c.model[name] = value
  if fraction < 1:
    c.data.ann_file = label_subset(c.data.ann_file, fraction, seed, subset_dir)
  if config.compilation_cache_dir:
    c.compilation_cache_dir = config.compilation_cache_dir
  return c


def _run(config, workdir: str, what: str) -> dict:
  done = _finished(workdir)
  if done is not None:
    logging.info('compare: %s finished earlier (%s), skipped', what, workdir)
    return done
  from updetr_jax import train  # noqa: PLC0415

  logging.info('compare: %s -> %s', what, workdir)
  t0 = time.time()
  summary = train.run(config, workdir)
  if summary.get('preempted_at') is not None:
    # The run checkpointed on a preemption notice (SIGTERM): the harness stops too,
    # rather than go on to the next run as if this one had finished.
    logging.warning(
      'compare: %s stopped at step %d (SIGTERM); its checkpoint is in %s: rerun the '
      'same command to resume',
      what,
      summary['preempted_at'],
      workdir,
    )
    raise SystemExit(143)  # the status of a process ended by SIGTERM
  logging.info('compare: %s done in %.0f s', what, time.time() - t0)
  return summary


def read_curve(workdir: str) -> dict[int, dict]:
  """{step: metrics} of a run's evaluations (the last record of a step wins)."""
  path = os.path.join(workdir, 'eval.jsonl')
  curve = {}
  if files.exists(path):
    with files.open_file(path) as f:
      for line in f:
        if line.strip():
          r = json.loads(line)
          curve[int(r.pop('step'))] = r
  return curve


# ----------------------------------------------------------------------- statistics


def summarize(curves: dict, arms, seeds, metrics=METRICS, pairs=()) -> dict:
  """Statistics over seeds of the fine-tuning curves.

  curves: {fraction: {arm: {seed: {step: {metric: value}}}}} (fraction as a string).
  Returns {fraction: ``stats.over_seeds``'s statistics, paired against scratch}:
  {'steps': [...], 'arms': {arm: {metric: [stats per step]}}, 'paired': {arm: {metric:
  [stats per step of (arm - scratch) per seed]}}, 'pairs': {'a - b': {metric: [...]}}
  for each (a, b) of ``pairs``}, with stats = {'mean', 'std' (ddof 1), 'n'}, at the
  steps every run evaluated.
  """
  return {
    frac: stats.over_seeds(per_arm, arms, seeds, metrics, 'scratch', pairs)
    for frac, per_arm in curves.items()
  }


def format_table(curve_stats: dict, header: str = '', metrics=METRICS) -> str:
  """The printed comparison: per fraction and evaluation step, mean +- std over seeds
  of each arm, and the paired difference (arm - scratch) with its std."""
  lines = [header] if header else []
  for frac, table in curve_stats.items():
    for m in metrics:
      lines.append(
        f'\nlabel fraction {frac}: {m} (x100), mean +- std over seeds; '
        'paired difference = arm - scratch, per seed'
      )
      columns = [
        *table['arms'].items(),
        *((f'{a} - scratch', v) for a, v in table['paired'].items()),
        *table.get('pairs', {}).items(),
      ]
      rows = [(step, [c[m][i] for _, c in columns]) for i, step in enumerate(table['steps'])]
      names = ['step', *(name for name, _ in columns)]
      lines.append(stats.table(names, rows, scale=100, digits=2, markdown=False))
  return '\n'.join(lines)


def plot(curve_stats: dict, path: str, metrics=('AP',)) -> None:
  """Curves of each metric (one panel per metric and label fraction), +- std."""
  panels = {
    f'{metric}, label fraction {frac}': (table, metric, None)
    for frac, table in curve_stats.items()
    for metric in metrics
  }
  stats.plot(
    path,
    panels,
    'fine-tuning step',
    'x100, mean +- std over seeds',
    'UP-DETR pre-training vs scratch (same CNN, budget, data order)',
    scale=100,
  )


# ----------------------------------------------------------------------- the harness


def run(config, workdir: str) -> dict:
  """Runs (or resumes) every stage; returns and writes ``results.json``."""
  config = config.copy_and_resolve_references()
  check_config(config)
  t0 = time.time()
  files.makedirs(workdir)
  prepare_data(config, workdir)
  backbone = prepare_backbone(config, workdir)
  pretrained = {}
  for arm in config.arms:
    if ARMS[arm] is not None:
      d = os.path.join(workdir, 'pretrain', arm)
      s = _run(pretrain_config(config, arm, backbone), d, f'pre-training {arm}')
      pretrained[arm] = {
        'workdir': d,
        'summary': {
          k: s.get(k)
          for k in (
            'steps',
            'train_seconds',
            'final_train_loss',
            'eval_images',
            'patch_eval_before',
            'patch_eval_after',
          )
        },
      }
  curves, finals, seconds = {}, {}, {}
  for frac in config.label_fractions:
    fkey = f'{frac:g}'
    curves[fkey], finals[fkey] = {}, {}
    for seed in config.seeds:
      for arm in config.arms:
        d = os.path.join(workdir, 'finetune', f'frac{fkey}', arm, f'seed{seed}')
        c = finetune_config(
          config,
          arm,
          seed,
          frac,
          backbone,
          pretrained.get(arm, {}).get('workdir', ''),
          os.path.join(workdir, 'data_subsets'),
        )
        s = _run(c, d, f'fine-tuning {arm}, label fraction {fkey}, seed {seed}')
        curves[fkey].setdefault(arm, {})[seed] = read_curve(d)
        finals[fkey].setdefault(arm, {})[seed] = {
          'eval': s.get('eval'),
          'final_train_loss': s.get('final_train_loss'),
        }
        seconds[d] = s.get('train_seconds')
  metrics = tuple(config.metrics)
  pairs = [tuple(p) for p in config.get('pairs', ())]
  curve_stats = summarize(curves, list(config.arms), list(config.seeds), metrics, pairs)
  header = (
    f'UP-DETR vs scratch ({config.finetune.task}): {len(config.seeds)} seeds '
    f'{list(config.seeds)}, {config.finetune.num_train_steps} fine-tuning steps (batch '
    f'{config.finetune.batch_size}), evaluation set {config.finetune.data.eval_ann_file}'
  )
  text = format_table(curve_stats, header, metrics)
  results = {
    'arms': list(config.arms),
    'seeds': list(config.seeds),
    'label_fractions': list(config.label_fractions),
    'backbone_checkpoint': backbone,
    'pretraining': pretrained,
    'stats': curve_stats,
    'curves': {
      f: {
        a: {str(s): {str(t): v for t, v in c.items()} for s, c in per_seed.items()}
        for a, per_seed in per_arm.items()
      }
      for f, per_arm in curves.items()
    },
    'final': {
      f: {a: {str(s): v for s, v in per_seed.items()} for a, per_seed in per_arm.items()}
      for f, per_arm in finals.items()
    },
    'eval_set': _eval_set_size(config.finetune.data),
    'minutes_this_invocation': round((time.time() - t0) / 60, 1),
    'config': json.loads(config.to_json_best_effort()),
  }
  if jax.process_index() == 0:  # every process ran every stage; one writes
    files.write_json(os.path.join(workdir, 'results.json'), results)
    files.write_file(os.path.join(workdir, 'results.txt'), text + '\n')
    if curve_stats and all(t['steps'] for t in curve_stats.values()):
      plot(curve_stats, os.path.join(workdir, 'curves.png'), metrics)
    print(text, flush=True)
  return results


def _eval_set_size(data_config) -> dict:
  path = data_config.get('eval_ann_file', '')
  if data_config.get('source', 'coco_json') != 'coco_json' or not files.exists(path):
    return {}
  coco = files.read_json(path)
  return {
    'images': len(coco['images']),
    'boxes': sum(1 for a in coco.get('annotations', []) if not a.get('iscrowd', 0)),
  }


def main(argv):
  from absl import app  # noqa: PLC0415
  from updetr_jax import cli  # noqa: PLC0415

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.setup_logging()
  from absl import flags  # noqa: PLC0415

  config = flags.FLAGS.config
  cli.tune_malloc(any(c.data.get('tune_malloc', True) for c in (config.pretrain, config.finetune)))
  run(config, flags.FLAGS.workdir)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file('config', None, 'configs/compare.py[:variant]')
  flags.DEFINE_string('workdir', None, 'output directory of every stage')
  flags.mark_flags_as_required(['config', 'workdir'])


def cli_main():
  """Console script ``updetr-compare``."""
  from updetr_jax import cli  # noqa: PLC0415

  cli.run(main, _define_flags)


if __name__ == '__main__':
  cli_main()
