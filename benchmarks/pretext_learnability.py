r"""Is random query patch detection learned where the pixels decide it? Prints JSON.

Trains ``configs/pretrain.py:mosaics`` (the demo's model on random mosaics whose
pixels say where every crop came from, ``updetr_jax/data/mosaics.py``; 64 held-out
mosaics) once per (arm, seed) and reads each run's ``eval.jsonl``: the patch
diagnostics of ``updetr_jax/evaluate.py`` against steps, with the control that decides
it, ``group_top_wrong_patches`` (the model's answer when every image is given another
image's patches). A decoder that uses its query has group_top well above it.

  python benchmarks/pretext_learnability.py --workdir=workdir/learnability \
      --arms=release,group_norm --seeds=0,1,2 [--steps=1500] [--num_patches=4] \
      [--style=cells|ramp|rotated_ramp]

``--style=ramp`` is the positive control (``data/mosaics.py``): the colours code the
position, so a patch alone gives its box and no matching against the image is needed.
``--style=rotated_ramp``: the same ramp in a frame drawn per image, so a patch's box is
found only by looking its colours up in its own image.

Arms (config overrides, ``ARMS``; ``{num_patches}`` is replaced by --num_patches):
``release`` (the release's behaviour), and the options beyond the release
(docs/method.md, 'Options beyond the release') alone and combined.
Writes ``results.json`` (per run: the curves; per arm: mean +- std over seeds of the
final metrics, ddof=1, and the paired group_top - group_top_wrong_patches),
``curves.png`` and a Markdown table (``table.md``), and prints the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from updetr_jax.data import mosaics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# arm -> config overrides (main.py flags, without --config.)
# The two options that let the patch through (docs/results/pretext_learnability.md).
_GROUP_NORM = ['model.patch_feature_norm=True', 'matcher.group_matching=True']
_CONTENT_VALUE_POS = ['model.patch_content=True', 'model.value_pos=True']
ARMS = {
  'release': [],
  'patch_norm': ['model.patch_feature_norm=True'],
  'group_matching': ['matcher.group_matching=True'],
  'query_shuffle': ['model.query_shuffle=True'],
  'group_norm': _GROUP_NORM,
  'group_norm_lr1e-3': _GROUP_NORM + ['optim.lr=1e-3'],
  'group_norm_value_pos': _GROUP_NORM + ['model.value_pos=True'],
  'group_norm_content': _GROUP_NORM + ['model.patch_content=True'],
  'group_norm_content_value_pos': _GROUP_NORM + _CONTENT_VALUE_POS,
  'group_norm_content_value_pos_lr4e-4': _GROUP_NORM + _CONTENT_VALUE_POS + ['optim.lr=4e-4'],
  'group_norm_content_value_pos_lr4e-4_drop200': _GROUP_NORM
  + _CONTENT_VALUE_POS
  + ['optim.lr=4e-4', 'optim.lr_drop_epochs=(200,)'],
  # One query per patch (model.num_queries = M, formatted in run_one): each group's
  # answer is its only query, so group_top = group_best and no ranking within a group
  # is learned. num_queries is an architecture field: such a pre-training initialises
  # only detectors with as many queries.
  'group_norm_content_value_pos_one_query': _GROUP_NORM
  + _CONTENT_VALUE_POS
  + ['model.num_queries={num_patches}'],
  # ... with a higher learning rate (the demo's 2e-4 learns the lookup slowly).
  'group_norm_content_value_pos_one_query_lr4e-4': _GROUP_NORM
  + _CONTENT_VALUE_POS
  + ['model.num_queries={num_patches}', 'optim.lr=4e-4'],
  'group_norm_content_value_pos_one_query_lr1e-3': _GROUP_NORM
  + _CONTENT_VALUE_POS
  + ['model.num_queries={num_patches}', 'optim.lr=1e-3'],
  # ... and the learning rate x 0.1 from epoch 200 (step 10,000 of the 400-image,
  # batch-8 mosaics), as the release drops it for its last third.
  'group_norm_content_value_pos_one_query_lr4e-4_drop200': _GROUP_NORM
  + _CONTENT_VALUE_POS
  + ['model.num_queries={num_patches}', 'optim.lr=4e-4', 'optim.lr_drop_epochs=(200,)'],
  'group_norm_content_value_pos_one_query_lr1e-3_drop200': _GROUP_NORM
  + _CONTENT_VALUE_POS
  + ['model.num_queries={num_patches}', 'optim.lr=1e-3', 'optim.lr_drop_epochs=(200,)'],
  # The frozen random CNN's BatchNorm statistics re-estimated on the training images.
  'group_norm_calibrated_cnn': _GROUP_NORM + ['init.calibrate_backbone_bn=True'],
  'group_norm_calibrated_cnn_value_pos': _GROUP_NORM
  + ['init.calibrate_backbone_bn=True', 'model.value_pos=True'],
  # Diagnostic, not the method (the CNN is frozen in UP-DETR): are the frozen
  # random CNN's features what holds the decoder back?
  'group_norm_trainable_cnn': _GROUP_NORM
  + ['optim.lr_backbone=2e-4', "optim.frozen=('^position/',)"],
}
METRICS = (
  'group_top',
  'group_top_wrong_patches',
  'group_best',
  'group_best_wrong_patches',
  'own_group',
  'matched',
)


def run_one(
  workdir: str, arm: str, seed: int, steps: int, num_patches: int, every: int, style: str
) -> dict:
  out = os.path.join(workdir, f'{arm}_seed{seed}')
  curves_path = os.path.join(out, 'eval.jsonl')
  if not os.path.exists(os.path.join(out, 'summary.json')):
    cmd = [
      sys.executable,
      '-m',
      'updetr_jax.main',
      '--config=configs/pretrain.py:mosaics',
      f'--workdir={out}',
      f'--config.seed={seed}',
      f'--config.num_train_steps={steps}',
      f'--config.eval.every_steps={every}',
      f'--config.model.num_patches={num_patches}',
      f'--config.checkpoint_every_steps={steps}',
      f'--config.data.mosaic_style={style}',
    ] + [f'--config.{o.format(num_patches=num_patches)}' for o in ARMS[arm]]
    t0 = time.time()
    with open(os.path.join(workdir, f'{arm}_seed{seed}.log'), 'w') as log:
      subprocess.run(cmd, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    print(f'{arm} seed {seed}: {time.time() - t0:.0f} s', file=sys.stderr, flush=True)
  rows = [json.loads(line) for line in open(curves_path)]
  # The loop evaluates at step 0 (task.evaluate_at_start), every `every` steps and
  # at the end; step 0 is written to TensorBoard only, the rest to eval.jsonl.
  steps_seen = [r['step'] for r in rows]
  curves = {m: [r[f'patch_iou_{m}'] for r in rows] for m in METRICS}
  return {'steps': steps_seen, 'curves': curves}


def mean_std(values) -> list[float]:
  v = np.asarray(values, np.float64)
  return [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0]


def summarize(runs: dict) -> dict:
  """runs {arm: {seed: run}} -> {arm: {metric: [mean, std], 'gap': [mean, std]}}."""
  out = {}
  for arm, by_seed in runs.items():
    final = {m: [r['curves'][m][-1] for r in by_seed.values()] for m in METRICS}
    s = {m: mean_std(v) for m, v in final.items()}
    s['gap'] = mean_std(np.subtract(final['group_top'], final['group_top_wrong_patches']))
    s['seeds'] = len(by_seed)
    out[arm] = s
  return out


def table(summary: dict, steps: int) -> str:
  cols = ('group_top', 'group_top_wrong_patches', 'gap', 'own_group', 'group_best', 'matched')
  lines = [
    f'| arm ({steps} steps) | ' + ' | '.join(cols) + ' |',
    '|---' * (len(cols) + 1) + '|',
  ]
  for arm, s in summary.items():
    cells = ' | '.join(f'{s[c][0]:.3f} ± {s[c][1]:.3f}' for c in cols)
    lines.append(f'| {arm} | {cells} |')
  return '\n'.join(lines)


def plot(runs: dict, path: str, title: str) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for i, (arm, by_seed) in enumerate(runs.items()):
    colour = f'C{i}'
    for j, run in enumerate(by_seed.values()):
      lab = arm if j == 0 else None
      axes[0].plot(run['steps'], run['curves']['group_top'], colour, label=lab)
      axes[0].plot(run['steps'], run['curves']['group_top_wrong_patches'], colour, ls=':')
      axes[1].plot(run['steps'], run['curves']['own_group'], colour, label=lab)
      axes[2].plot(run['steps'], run['curves']['group_best'], colour, label=lab)
      axes[2].plot(run['steps'], run['curves']['group_best_wrong_patches'], colour, ls=':')
  axes[0].set_title("group_top IoU (dotted: other images' patches)")
  axes[1].set_title('own_group')
  axes[2].set_title("group_best IoU (dotted: other images' patches)")
  for ax in axes:
    ax.set_xlabel('pre-training step')
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  fig.suptitle(f'{title}: one line per seed (benchmarks/pretext_learnability.py)')
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', default='workdir/learnability')
  p.add_argument('--arms', default='release,group_norm')
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--steps', type=int, default=1500)
  p.add_argument('--every', type=int, default=250)
  p.add_argument('--num_patches', type=int, default=4)
  # 'cells': the benchmark; 'ramp': the positive control (colour = position, so the
  # patch alone gives its box: is the patch reaching the queries at all?);
  # 'rotated_ramp': a frame per image, so the patch must be looked up in its image.
  p.add_argument('--style', choices=mosaics.STYLES, default='cells')
  a = p.parse_args(argv)
  arms = a.arms.split(',')
  unknown = sorted(set(arms) - set(ARMS))
  if unknown:
    p.error(f'unknown arms {unknown}; known: {sorted(ARMS)}')
  os.makedirs(a.workdir, exist_ok=True)
  seeds = [int(s) for s in a.seeds.split(',')]
  runs = {
    arm: {s: run_one(a.workdir, arm, s, a.steps, a.num_patches, a.every, a.style) for s in seeds}
    for arm in arms
  }
  summary = summarize(runs)
  result = {
    'config': 'configs/pretrain.py:mosaics',
    'steps': a.steps,
    'num_patches': a.num_patches,
    'mosaic_style': a.style,
    'seeds': seeds,
    'arms': {arm: ARMS[arm] for arm in arms},
    'summary': summary,
    'runs': {arm: {str(s): r for s, r in v.items()} for arm, v in runs.items()},
  }
  with open(os.path.join(a.workdir, 'results.json'), 'w') as f:
    json.dump(result, f, indent=1)
  md = table(summary, a.steps)
  with open(os.path.join(a.workdir, 'table.md'), 'w') as f:
    f.write(md + '\n')
  plot(
    runs, os.path.join(a.workdir, 'curves.png'), f'held-out {a.style} mosaics, M={a.num_patches}'
  )
  print(json.dumps({'summary': summary, 'table': md}, indent=1))


if __name__ == '__main__':
  main()
