"""Pictures a person would rather see than read: patches and boxes, loss curves."""

from __future__ import annotations

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from updetr_jax import files  # noqa: E402
from updetr_jax.normalization import MEAN, STD  # noqa: E402


def denormalize(x: np.ndarray) -> np.ndarray:
  """ImageNet-normalised [..., 3] -> RGB in [0, 1] (``normalization``'s MEAN, STD)."""
  mean, std = np.asarray(MEAN, np.float32), np.asarray(STD, np.float32)
  return np.clip(np.asarray(x) * std + mean, 0.0, 1.0)


def _save(fig, path: str) -> None:
  files.save_figure(fig, path, dpi=100)
  plt.close(fig)


def _box(ax, x0, y0, x1, y1, color, **style) -> None:
  ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, **style))


def _label(ax, x, y, text: str, color, fontsize=9, **frame) -> None:
  ax.text(
    x, y, text, fontsize=fontsize, va='bottom', bbox=dict(facecolor=color, alpha=0.6, **frame)
  )


def _show_xyxy(ax, h: int, w: int) -> None:
  ax.set_xlim(0, w)
  ax.set_ylim(h, 0)
  ax.axis('off')


def _xyxy_pixels(box_cxcywh, h, w):
  cx, cy, bw, bh = np.asarray(box_cxcywh, np.float64)
  return (cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h


def plot_patch_detection(
  path: str,
  image,
  padding_mask,
  patches,
  true_boxes,
  pred_boxes,
  ious=None,
  title: str = '',
  scores=None,
) -> None:
  """One image with its query patches: true boxes solid, predictions dashed.

  Args: image [H, W, 3] normalised (uint8: RGB, shown as it is), padding_mask [H, W]
    (None: no padding), patches [M, P, P, 3] normalised, true_boxes [M, 4] (None: not
    known, not drawn) and pred_boxes [M, 4] cxcywh of the unpadded image, ious [M],
    scores [M] (each prediction's score, written at its box and under its patch).
  """
  image = np.asarray(image)
  if padding_mask is None:
    h, w = image.shape[:2]
  else:
    valid = ~np.asarray(padding_mask)
    h = int(valid.any(axis=1).sum())
    w = int(valid.any(axis=0).sum())
  shown = image[:h, :w] if image.dtype == np.uint8 else denormalize(image)[:h, :w]
  m = len(patches)
  colors = plt.cm.tab10(np.arange(m) % 10)
  fig = plt.figure(figsize=(8, 5.5))
  grid = fig.add_gridspec(2, max(m, 1), height_ratios=[4, 1])
  ax = fig.add_subplot(grid[0, :])
  ax.imshow(shown)
  for j in range(m):
    drawn = [(pred_boxes[j], '--')]
    if true_boxes is not None:
      drawn.insert(0, (true_boxes[j], '-'))
    for box, style in drawn:
      x, y, bw, bh = _xyxy_pixels(box, h, w)
      _box(ax, x, y, x + bw, y + bh, colors[j], lw=2, ls=style)
    if scores is not None:
      x, y, _, _ = _xyxy_pixels(pred_boxes[j], h, w)
      _label(ax, x, y, f'#{j} {float(scores[j]):.2f}', colors[j], fontsize=8, pad=1, lw=0)
  ax.set_title(title or 'query patches: true box (solid) vs prediction (dashed)')
  ax.axis('off')
  for j in range(m):
    pa = fig.add_subplot(grid[1, j])
    pa.imshow(denormalize(patches[j]))
    label = f'#{j}'
    if scores is not None:
      label += f' score {float(scores[j]):.2f}'
    if ious is not None:
      label += f' IoU {float(ious[j]):.2f}'
    pa.set_title(label, fontsize=8, color=colors[j])
    pa.axis('off')
  fig.tight_layout()
  _save(fig, path)


def plot_curves(path: str, curves: dict[str, tuple[list, list]], title: str = '') -> None:
  """curves: name -> (steps, values). One line each, log y when all positive."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, (steps, values) in curves.items():
    ax.plot(steps, values, label=name)
  if all(min(v) > 0 for _, v in curves.values() if len(v)):
    ax.set_yscale('log')
  ax.set_xlabel('step')
  ax.legend()
  ax.set_title(title)
  fig.tight_layout()
  _save(fig, path)


def plot_detections(path: str, image_rgb, boxes_xyxy, labels, scores, class_names=None) -> None:
  """One image with labelled boxes (draws every box given; threshold beforehand).

  Args: image_rgb [H, W, 3] uint8 or float in [0, 1]; boxes_xyxy [K, 4] in pixels;
    labels [K] int; scores [K]; class_names: {label: name}, a sequence indexed by
    label, or None (label numbers).
  """
  image = np.asarray(image_rgb)
  h, w = image.shape[:2]
  fig = plt.figure(figsize=(8, 8 * h / max(w, 1)))
  ax = fig.add_axes([0, 0, 1, 1])
  ax.imshow(image)
  for (x0, y0, x1, y1), label, score in zip(
    np.asarray(boxes_xyxy, np.float64), np.asarray(labels), np.asarray(scores)
  ):
    label = int(label)
    name = str(label)
    if class_names is not None:
      try:
        name = str(class_names[label])
      except (KeyError, IndexError):
        pass
    color = plt.cm.tab20(label % 20)
    _box(ax, x0, y0, x1, y1, color, lw=2)
    _label(ax, x0, y0, f'{name} {float(score):.2f}', color, pad=1, lw=0)
  _show_xyxy(ax, h, w)
  _save(fig, path)


def plot_oneshot(
  path: str, query_rgb, image_rgb, boxes_xyxy, scores, title: str = '', true_boxes=None
) -> None:
  """One-shot detection: the query crop beside the image and the instances found.

  Args: query_rgb [P, P, 3] and image_rgb [H, W, 3] (uint8 or float in [0, 1]);
    boxes_xyxy [K, 4] pixels and scores [K] (threshold beforehand); true_boxes [G, 4]
    xyxy drawn dashed when given.
  """
  image = np.asarray(image_rgb)
  h, w = image.shape[:2]
  fig = plt.figure(figsize=(10, 7 * h / max(w, 1) + 0.6))
  grid = fig.add_gridspec(1, 2, width_ratios=[1, 3])
  qa = fig.add_subplot(grid[0, 0])
  qa.imshow(np.asarray(query_rgb))
  qa.set_title('query')
  qa.axis('off')
  ax = fig.add_subplot(grid[0, 1])
  ax.imshow(image)
  for x0, y0, x1, y1 in np.asarray(true_boxes if true_boxes is not None else [], np.float64):
    _box(ax, x0, y0, x1, y1, 'white', lw=1.5, ls='--')
  for (x0, y0, x1, y1), score in zip(np.asarray(boxes_xyxy, np.float64), np.asarray(scores)):
    _box(ax, x0, y0, x1, y1, 'lime', lw=2)
    _label(ax, x0, y0, f'{float(score):.2f}', 'lime')
  _show_xyxy(ax, h, w)
  ax.set_title(
    title or 'found instances (solid)' + (', true (dashed)' if true_boxes is not None else '')
  )
  fig.tight_layout()
  _save(fig, path)
