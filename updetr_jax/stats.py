"""Curves over seeds: mean +- std (ddof 1), paired differences, their table and figure.

Used by the comparison harness (``updetr_jax.compare``) and the learnability benchmark
(``benchmarks/pretext_learnability.py``).
"""

from __future__ import annotations

import numpy as np

from updetr_jax import files


def mean_std(values) -> dict:
  """{'mean', 'std' (ddof 1; 0 for a single value), 'n'} of ``values``."""
  v = np.asarray(values, np.float64)
  return {
    'mean': float(v.mean()),
    'std': float(v.std(ddof=1)) if len(v) > 1 else 0.0,
    'n': int(len(v)),
  }


def over_seeds(curves: dict, arms, seeds, metrics, baseline: str | None = None, pairs=()) -> dict:
  """Statistics over seeds of curves, at the steps every run evaluated.

  Args:
    curves: {arm: {seed: {step: {metric: value}}}}.
    arms: the arms to summarise, in order.
    seeds: the seeds every arm ran.
    metrics: the metrics to summarise.
    baseline: an arm: each other arm's paired difference (arm - baseline, per seed).
    pairs: more paired differences, (a, b) for a - b per seed.

  Returns:
    {'steps': [...], 'arms': {arm: {metric: [stats per step]}}, 'paired': {arm: {metric:
    [stats per step of arm - baseline]}}, 'pairs': {'a - b': {metric: [...]}}}, stats as
    ``mean_std``'s.
  """
  step_sets = [set(curves[a][s]) for a in arms for s in seeds]
  steps = sorted(set.intersection(*step_sets)) if step_sets else []

  def cells(value):
    return {m: [mean_std([value(s, t, m) for s in seeds]) for t in steps] for m in metrics}

  def paired(a, b):
    return cells(lambda s, t, m: curves[a][s][t][m] - curves[b][s][t][m])

  out = {'steps': steps, 'arms': {}, 'paired': {}, 'pairs': {}}
  for arm in arms:
    out['arms'][arm] = cells(lambda s, t, m, arm=arm: curves[arm][s][t][m])
    if baseline is not None and arm != baseline:
      out['paired'][arm] = paired(arm, baseline)
  for a, b in pairs:
    out['pairs'][f'{a} - {b}'] = paired(a, b)
  return out


def table(header, rows, scale: float = 1.0, digits: int = 3, markdown: bool = True) -> str:
  """Rows of mean +- std cells under ``header`` (its first column names the rows).

  Args:
    header: the column titles.
    rows: (row name, [stats as ``mean_std``'s, one per further column]).
    scale: factor of the printed values (100: x100).
    digits: decimals.
    markdown: a Markdown table ('mean ± std'), or plain text in aligned columns
      ('mean +- std').
  """

  def cell(c, sign):
    return f'{scale * c["mean"]:.{digits}f} {sign} {scale * c["std"]:.{digits}f}'

  if markdown:
    lines = ['| ' + ' | '.join(header) + ' |', '|---' * len(header) + '|']
    return '\n'.join(
      lines + [f'| {name} | ' + ' | '.join(cell(c, '±') for c in cs) + ' |' for name, cs in rows]
    )
  width = max(16, *(len(h) + 2 for h in header[1:]))
  lines = [f'{header[0]:>6}' + ''.join(f'{h:>{width}}' for h in header[1:])]
  lines += [f'{name:>6}' + ''.join(f'{cell(c, "+-"):>{width}}' for c in cs) for name, cs in rows]
  return '\n'.join(lines)


def plot(path: str, panels: dict, xlabel: str, ylabel: str, title: str = '', scale=1.0) -> None:
  """Mean curves with +- std bands over seeds, one panel per key of ``panels``.

  Args:
    path: the PNG (local or remote).
    panels: panel title -> (``over_seeds``' statistics, metric, control metric or None);
      each arm is one colour, its control (e.g. the same model given other images'
      patches) dotted.
    xlabel: the steps' axis.
    ylabel: the values' axis.
    title: above the panels.
    scale: factor of the plotted values (100: x100).
  """
  import matplotlib  # noqa: PLC0415

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  n = max(len(panels), 1)
  fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
  for ax, (name, (stats, metric, control)) in zip(axes[0], panels.items()):
    steps = np.asarray(stats['steps'], np.float64)
    for i, arm in enumerate(stats['arms']):
      color = plt.cm.tab10(i % 10)
      for m, style, label in ((metric, '-', arm), (control, ':', None)):
        if m is None:
          continue
        mean = scale * np.asarray([c['mean'] for c in stats['arms'][arm][m]], np.float64)
        std = scale * np.asarray([c['std'] for c in stats['arms'][arm][m]], np.float64)
        ax.plot(steps, mean, ls=style, marker='o', ms=3, color=color, label=label)
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  files.save_figure(fig, path, dpi=100)
  plt.close(fig)
