"""Crop the query patches from the original image (the release) or from the resized one
(the device, updetr_jax/device_augment.py)? Measures the difference. Prints JSON.

For each of scikit-image's colour photographs (ImageNet-sized: 300-640 px) and each
release training scale drawn (``--scales``, max_size 600), the release's M=10 patch
rectangles are drawn in original pixels (``data.patches.sample_patch_boxes``) and
cut two ways, P=128:
  original: ``data.patches.crop_patch`` of the decoded image (the release);
  resized:  ``device_augment.crop_patches`` of the uint8 image the host sends
            (resized by ``data.augment.resize_image``, rounded), at the rectangle
            mapped to it.
Reported: PSNR of resized vs original (pixels in [0, 1]); the cosine between the
frozen CNN's pooled features (``gt_feature``: the release model's ResNet-50 at its
random initialisation, or ``--checkpoint``, a torchvision-layout .pth) of the two
crops, beside the cosine between two different patches of one image (the scale a
difference must be small against).

    python benchmarks/patch_crop_source.py [--scales=320,400,480] [--checkpoint=r50.pth]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'immunohistochemistry', 'colorwheel')


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--scales', default='320,400,480')
  p.add_argument('--patch_size', type=int, default=128)
  p.add_argument('--num_patches', type=int, default=10)
  p.add_argument('--checkpoint', default='')
  a = p.parse_args()
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import skimage.data  # noqa: PLC0415
  import tensorflow as tf  # noqa: PLC0415

  from updetr_jax import device_augment  # noqa: PLC0415
  from updetr_jax.configs import pretrain  # noqa: PLC0415
  from updetr_jax.data import augment, patches  # noqa: PLC0415
  from updetr_jax.models import build_model, init_variables  # noqa: PLC0415

  config = pretrain.get_config()
  model = build_model(config.model)
  variables = init_variables(model, jax.random.PRNGKey(0))
  if a.checkpoint:
    from updetr_jax.torch_import import import_torch_checkpoint  # noqa: PLC0415

    variables = import_torch_checkpoint(a.checkpoint, config.model, variables=variables)
  features = jax.jit(lambda x: model.apply(variables, x, method='patch_features'))
  size = a.patch_size
  psnr, cos_same, cos_other, shapes = [], [], [], []
  for k, name in enumerate(PHOTOS):
    orig = getattr(skimage.data, name)()
    if orig.ndim != 3 or orig.shape[2] != 3:
      continue
    orig = np.ascontiguousarray(orig[..., :3], np.uint8)
    h, w = orig.shape[:2]
    for j, scale in enumerate(int(s) for s in a.scales.split(',')):
      rh, rw = augment.resize_rule(h, w, scale, 600)
      shapes.append([h, w, rh, rw])
      resized = augment.resize_image(tf.constant(orig), [rh, rw]).numpy()
      resized = np.clip(np.round(resized), 0, 255).astype(np.uint8)
      boxes = patches.sample_patch_boxes(tf.constant([k, j], tf.int64), h, w, a.num_patches)
      boxes = boxes.numpy()
      src = tf.constant(orig, tf.float32) / 255.0
      ref = np.stack([patches.crop_patch(src, tf.constant(b), size).numpy() for b in boxes])
      mapped = boxes * np.array([rw / w, rh / h, rw / w, rh / h], np.float32)
      got = np.asarray(
        device_augment.crop_patches(jnp.asarray(resized)[None], jnp.asarray(mapped)[None], size)
      )[0]
      mse = np.mean(np.square(got - ref), axis=(1, 2, 3))
      psnr += (10 * np.log10(1.0 / np.maximum(mse, 1e-12))).tolist()
      fr, fg = (
        np.asarray(features(device_augment.normalize(jnp.asarray(x))[None]))[0] for x in (ref, got)
      )
      fr, fg = (f / np.linalg.norm(f, axis=-1, keepdims=True) for f in (fr, fg))
      cos_same += np.sum(fr * fg, -1).tolist()
      cos_other += np.sum(fr * np.roll(fr, 1, 0), -1).tolist()
  psnr = np.asarray(psnr)
  print(
    json.dumps(
      dict(
        patches=len(psnr),
        photos_hw_resized_hw=shapes,
        patch_size=size,
        cnn=a.checkpoint or 'release ResNet-50, random initialisation',
        psnr_db_median=round(float(np.median(psnr)), 2),
        psnr_db_p5=round(float(np.percentile(psnr, 5)), 2),
        feature_cosine_resized_vs_original_mean=round(float(np.mean(cos_same)), 5),
        feature_cosine_resized_vs_original_min=round(float(np.min(cos_same)), 5),
        feature_cosine_between_two_patches_mean=round(float(np.mean(cos_other)), 5),
      )
    )
  )


if __name__ == '__main__':
  main()
