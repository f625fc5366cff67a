"""Pictures a person would rather see than read: patches and boxes, loss curves."""
from __future__ import annotations

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def denormalize(x: np.ndarray) -> np.ndarray:
  """ImageNet-normalised [..., 3] -> RGB in [0, 1]."""
  return np.clip(np.asarray(x) * IMAGENET_STD + IMAGENET_MEAN, 0.0, 1.0)


def _xyxy_pixels(box_cxcywh, h, w):
  cx, cy, bw, bh = np.asarray(box_cxcywh, np.float64)
  return (cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h


def plot_patch_detection(path: str, image, padding_mask, patches, true_boxes, pred_boxes,
                         ious=None, title: str = '') -> None:
  """One image with its query patches: true boxes solid, predictions dashed.

  Args: image [H, W, 3] normalised, padding_mask [H, W], patches [M, P, P, 3]
    normalised, true_boxes / pred_boxes [M, 4] cxcywh of the unpadded image, ious [M].
  """
  valid = ~np.asarray(padding_mask)
  h = int(valid.any(axis=1).sum())
  w = int(valid.any(axis=0).sum())
  m = len(patches)
  colors = plt.cm.tab10(np.arange(m) % 10)
  fig = plt.figure(figsize=(8, 5.5))
  grid = fig.add_gridspec(2, max(m, 1), height_ratios=[4, 1])
  ax = fig.add_subplot(grid[0, :])
  ax.imshow(denormalize(image)[:h, :w])
  for j in range(m):
    for box, style in ((true_boxes[j], '-'), (pred_boxes[j], '--')):
      x, y, bw, bh = _xyxy_pixels(box, h, w)
      ax.add_patch(plt.Rectangle((x, y), bw, bh, fill=False, lw=2, ls=style,
                                 edgecolor=colors[j]))
  ax.set_title(title or 'query patches: true box (solid) vs prediction (dashed)')
  ax.axis('off')
  for j in range(m):
    pa = fig.add_subplot(grid[1, j])
    pa.imshow(denormalize(patches[j]))
    pa.set_title(f'#{j}' + (f' IoU {ious[j]:.2f}' if ious is not None else ''), fontsize=8,
                 color=colors[j])
    pa.axis('off')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


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
  fig.savefig(path, dpi=100)
  plt.close(fig)
