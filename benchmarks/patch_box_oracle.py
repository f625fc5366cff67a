r"""How much of a query patch's box its pooled CNN feature says (prints JSON).

UP-DETR describes a query patch by one vector: the frozen CNN's global-average-pooled
C5 feature of the crop resized to P x P (``gt_feature``). The decoder must find the box
from that vector and the image. This measures the most any decoder could get from it:
for each query patch of a held-out learnability mosaic (``data/mosaics.py``, the
release's patch rectangles), it crops every box of a grid over the image (x, y, w, h in
steps of ``--step`` pixels), pools each crop's feature with the same CNN and crop, and
takes the box whose feature is nearest to the patch's (cosine of the channel-
standardised features, as ``model.patch_feature_norm``). The IoU of that box with the
true one is an upper bound on a pretext answer from the feature (a search no decoder
does), beside two references measured on the same boxes:

* ``grid_ceiling``: the best IoU of any grid box (the grid's own resolution);
* ``centre_only``: the true centre with one size for every patch (the best constant
  size): what a decoder that finds where a patch is but not how large it is gets;
* ``box_prior``: the best single box for every patch (a decoder that ignores it).

``--styles`` are mosaic styles (``data/mosaics.py``) or ``photos``: the 14 scikit-image
photographs of ``make demo`` (its 10 training and 4 held-out ones; ``--images`` does not
apply), centre-cropped to the mosaics' aspect and resized to their size, so the same
grid and CNN measure natural pixels.

  python benchmarks/patch_box_oracle.py [--styles=cells,ramp,rotated_ramp,photos] \
      [--cells=6,10] [--images=16] [--step=8] [--seed=0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tensorflow as tf  # noqa: E402

from updetr_jax import box_ops, device_augment  # noqa: E402
from updetr_jax.configs import pretrain  # noqa: E402
from updetr_jax.data import mosaics, patches, sources  # noqa: E402
from updetr_jax.data.patches import MIN_PATCH  # noqa: E402
from updetr_jax.models import build_model, init_variables  # noqa: E402


def release_boxes(seed: int, index: int, height: int, width: int, count: int) -> np.ndarray:
  """The pre-training's patch rectangles (data/patches.py, the release's rule) for
  image ``index``: float32 [count, 4] (x, y, w, h) pixels."""
  boxes = patches.sample_patch_boxes(tf.constant([seed, index]), height, width, count)
  return boxes.numpy().astype(np.float32)


def demo_photos(height: int, width: int) -> list[np.ndarray]:
  """make demo's photographs (training and held-out), centre-cropped to width/height's
  aspect and resized (bilinear, antialiased) to it: uint8 [height, width, 3] each."""
  out = []
  for _, a in sources.demo_arrays(sources.DEMO_TRAIN_IMAGES + sources.DEMO_EVAL_IMAGES):
    a, _ = sources.to_rgb_array(a)
    h, w = a.shape[:2]
    ch, cw = (
      (h, round(h * width / height)) if w * height > h * width else (round(w * height / width), w)
    )
    y, x = (h - ch) // 2, (w - cw) // 2
    crop = tf.image.resize(a[y : y + ch, x : x + cw], (height, width), antialias=True)
    out.append(np.asarray(tf.clip_by_value(tf.round(crop), 0, 255), np.uint8))
  return out


def grid_boxes(height: int, width: int, step: int) -> np.ndarray:
  """Every (x, y, w, h) on a step-pixel grid inside the image: float32 [G, 4]."""
  out = []
  for w in range(MIN_PATCH, width - MIN_PATCH + 1, step):
    for h in range(MIN_PATCH, height - MIN_PATCH + 1, step):
      for x in range(0, width - w + 1, step):
        for y in range(0, height - h + 1, step):
          out.append((x, y, w, h))
  return np.asarray(out, np.float32)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Boxes (x, y, w, h) [..., 4], broadcast -> IoU [...] (box_ops.box_iou)."""

  def xyxy(x):
    return np.concatenate([x[..., :2], x[..., :2] + x[..., 2:]], -1)

  return np.asarray(box_ops.box_iou(xyxy(a), xyxy(b))[0])


def centred(boxes: np.ndarray, w: float, h: float) -> np.ndarray:
  cx, cy = boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2
  return np.stack([cx - w / 2, cy - h / 2, np.full_like(cx, w), np.full_like(cy, h)], -1)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--styles', default='cells,ramp')
  p.add_argument('--cells', default='6,10', help="data.mosaic_cells of 'cells' images")
  p.add_argument('--images', type=int, default=16)
  p.add_argument('--patches', type=int, default=4, help='query patches per image')
  p.add_argument('--step', type=int, default=8)
  p.add_argument('--seed', type=int, default=0, help='the random CNN (model init seed)')
  p.add_argument('--chunk', type=int, default=1024)
  a = p.parse_args(argv)
  config = pretrain.get_config('mosaics')
  height, width = (int(s) for s in config.data.mosaic_size)
  size = int(config.data.patch_size)
  model = build_model(config.model)
  variables = init_variables(model, jax.random.PRNGKey(a.seed))

  @jax.jit
  def features(image, boxes):  # uint8 [H, W, 3], [G, 4] -> [G, C5]
    crops = device_augment.crop_patches(image[None], boxes[None], size)[0]
    return model.apply(
      variables, device_augment.normalize(crops)[None], method=type(model).patch_features
    )[0]

  grid = grid_boxes(height, width, a.step)
  pad = -len(grid) % a.chunk
  grid_padded = np.concatenate([grid, np.repeat(grid[:1], pad, 0)])
  cells = tuple(int(c) for c in a.cells.split(','))
  results = {}
  for style in a.styles.split(','):
    t0 = time.time()
    if style == 'photos':
      images = demo_photos(height, width)
    else:
      images = mosaics.mosaic_arrays('eval', a.images, seed=0, style=style, cells=cells)
    true, feats, grid_feats = [], [], []
    for index, img in enumerate(images):
      boxes = release_boxes(a.seed, index, height, width, a.patches)
      true.append(boxes)
      feats.append(np.asarray(features(img, boxes)))
      g = [
        np.asarray(features(img, grid_padded[i : i + a.chunk]))
        for i in range(0, len(grid_padded), a.chunk)
      ]
      grid_feats.append(np.concatenate(g)[: len(grid)])
    true, feats, grid_feats = np.stack(true), np.stack(feats), np.stack(grid_feats)
    # Channel statistics of every crop of every image (patch_feature_norm's role).
    mean = grid_feats.reshape(-1, grid_feats.shape[-1]).mean(0)
    std = grid_feats.reshape(-1, grid_feats.shape[-1]).std(0) + 1e-6

    def unit(f):
      z = (f - mean) / std
      return z / np.linalg.norm(z, axis=-1, keepdims=True)

    sim = np.einsum('bmc,bgc->bmg', unit(feats), unit(grid_feats))  # [B, M, G]
    chosen = grid[np.argmax(sim, -1)]  # [B, M, 4]
    t = true.reshape(-1, 4)
    oracle = iou(chosen.reshape(-1, 4), t)
    ceiling = iou(t[:, None], grid[None]).max(1)
    centre = max(
      float(iou(centred(t, w, h), t).mean())
      for w in range(16, width, 4)
      for h in range(16, height, 4)
    )
    prior = max(
      float(iou(np.array([[(width - w) / 2, (height - h) / 2, w, h]], np.float32), t).mean())
      for w in range(16, width, 4)
      for h in range(16, height, 4)
    )
    results[style] = dict(
      oracle_iou=round(float(oracle.mean()), 3),
      oracle_iou_median=round(float(np.median(oracle)), 3),
      oracle_share_above_0_5=round(float((oracle > 0.5).mean()), 3),
      grid_ceiling=round(float(ceiling.mean()), 3),
      centre_only=round(centre, 3),
      box_prior=round(prior, 3),
      patches=int(len(t)),
      grid_boxes=int(len(grid)),
      seconds=round(time.time() - t0, 1),
    )
    if style == 'cells':
      results[style]['mosaic_cells'] = list(cells)
    print(json.dumps({style: results[style]}), file=sys.stderr, flush=True)
  print(
    json.dumps(
      dict(
        benchmark='patch_box_oracle',
        config='configs/pretrain.py:mosaics',
        patch_size=size,
        image_size=[height, width],
        step=a.step,
        cnn_seed=a.seed,
        results=results,
      ),
      indent=1,
    )
  )


if __name__ == '__main__':
  main()
