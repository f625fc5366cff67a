r"""Is random query patch detection learned where the pixels decide it? Prints JSON.

Trains ``configs/pretrain.py:mosaics`` (the demo's model on random mosaics whose
pixels say where every crop came from, ``updetr_jax/data/mosaics.py``; 64 held-out
mosaics) once per (arm, seed) and reads each run's ``eval.jsonl``: the patch
diagnostics of ``updetr_jax/evaluate.py`` against steps, with the control that decides
it, ``group_top_wrong_patches`` (the model's answer when every image is given another
image's patches). A decoder that uses its query has group_top well above it.

  python benchmarks/pretext_learnability.py --workdir=workdir/learnability \
      --arms=release,patchnorm_groupmatch --seeds=0,1,2 [--steps=1500] [--num_patches=4] \
      [--style=cells|ramp|rotated_ramp]

``--style=ramp`` is the positive control (``data/mosaics.py``): the colours code the
position, so a patch alone gives its box and no matching against the image is needed.
``--style=rotated_ramp``: the same ramp in a frame drawn per image, so a patch's box is
found only by looking its colours up in its own image.

Arms: ``PRETEXT_ARMS`` of ``configs/pretrain.py`` (config overrides), ``release`` (the
release's behaviour) and the options beyond the release (docs/method.md, 'Options
beyond the release') alone and combined. Writes ``results.json`` (per run: the curves;
per arm and evaluation step: mean +- std over seeds, ddof=1, of each metric and of the
paired group_top - group_top_wrong_patches, ``gap``; ``updetr_jax.stats``),
``curves.png`` (mean +- std bands) and a Markdown table of the final step
(``table.md``), and prints the JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from updetr_jax import stats
from updetr_jax.configs import pretrain
from updetr_jax.data import mosaics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METRICS = (
  'group_top',
  'group_top_wrong_patches',
  'group_best',
  'group_best_wrong_patches',
  'own_group',
  'matched',
)
# The Markdown table's columns (gap: group_top - group_top_wrong_patches, per seed).
COLUMNS = ('group_top', 'group_top_wrong_patches', 'gap', 'own_group', 'group_best', 'matched')


def arm_flags(arm: str, num_patches: int) -> list[str]:
  """The arm's config overrides as ``main.py`` flags (without ``--config.``)."""
  return [
    f'{k}={v if isinstance(v, str) else repr(v)}'
    for k, v in pretrain.pretext_arm(arm, num_patches).items()
  ]


def command(
  out: str, arm: str, seed: int, steps: int, num_patches: int, every: int, style: str
) -> list[str]:
  """The pre-training of one (arm, seed) into ``out``."""
  return [
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
  ] + [f'--config.{f}' for f in arm_flags(arm, num_patches)]


def run_one(
  workdir: str, arm: str, seed: int, steps: int, num_patches: int, every: int, style: str
) -> dict:
  out = os.path.join(workdir, f'{arm}_seed{seed}')
  curves_path = os.path.join(out, 'eval.jsonl')
  if not os.path.exists(os.path.join(out, 'summary.json')):
    cmd = command(out, arm, seed, steps, num_patches, every, style)
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


def over_seeds(runs: dict, seeds: list[int]) -> dict:
  """runs {arm: {seed: run}} -> ``stats.over_seeds`` of the metrics and the gap."""
  curves = {
    arm: {
      seed: {
        t: {
          **{m: run['curves'][m][i] for m in METRICS},
          'gap': run['curves']['group_top'][i] - run['curves']['group_top_wrong_patches'][i],
        }
        for i, t in enumerate(run['steps'])
      }
      for seed, run in by_seed.items()
    }
    for arm, by_seed in runs.items()
  }
  return stats.over_seeds(curves, list(runs), seeds, (*METRICS, 'gap'))


def final(curve_stats: dict) -> dict:
  """{arm: {metric: mean_std at the last step}}."""
  return {
    arm: {m: cells[-1] for m, cells in per_metric.items()}
    for arm, per_metric in curve_stats['arms'].items()
  }


def table(summary: dict, steps: int) -> str:
  rows = [(arm, [s[c] for c in COLUMNS]) for arm, s in summary.items()]
  return stats.table([f'arm ({steps} steps)', *COLUMNS], rows)


def plot(curve_stats: dict, path: str, title: str) -> None:
  other = "(dotted: other images' patches)"
  panels = {
    f'group_top IoU {other}': (curve_stats, 'group_top', 'group_top_wrong_patches'),
    'own_group': (curve_stats, 'own_group', None),
    f'group_best IoU {other}': (curve_stats, 'group_best', 'group_best_wrong_patches'),
  }
  stats.plot(
    path,
    panels,
    'pre-training step',
    'IoU, mean +- std over seeds',
    f'{title} (benchmarks/pretext_learnability.py)',
  )


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', default='workdir/learnability')
  p.add_argument('--arms', default='release,patchnorm_groupmatch')
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
  unknown = sorted(set(arms) - set(pretrain.PRETEXT_ARMS))
  if unknown:
    p.error(f'unknown arms {unknown}; known: {sorted(pretrain.PRETEXT_ARMS)}')
  os.makedirs(a.workdir, exist_ok=True)
  seeds = [int(s) for s in a.seeds.split(',')]
  runs = {
    arm: {s: run_one(a.workdir, arm, s, a.steps, a.num_patches, a.every, a.style) for s in seeds}
    for arm in arms
  }
  curve_stats = over_seeds(runs, seeds)
  summary = final(curve_stats)
  result = {
    'config': 'configs/pretrain.py:mosaics',
    'steps': a.steps,
    'num_patches': a.num_patches,
    'mosaic_style': a.style,
    'seeds': seeds,
    'arms': {arm: arm_flags(arm, a.num_patches) for arm in arms},
    'summary': summary,
    'stats': curve_stats,
    'runs': {arm: {str(s): r for s, r in v.items()} for arm, v in runs.items()},
  }
  with open(os.path.join(a.workdir, 'results.json'), 'w') as f:
    json.dump(result, f, indent=1)
  md = table(summary, curve_stats['steps'][-1])
  with open(os.path.join(a.workdir, 'table.md'), 'w') as f:
    f.write(md + '\n')
  plot(
    curve_stats,
    os.path.join(a.workdir, 'curves.png'),
    f'held-out {a.style} mosaics, M={a.num_patches}',
  )
  print(json.dumps({'summary': summary, 'table': md}, indent=1))


if __name__ == '__main__':
  main()
