"""How well the frozen CNN's patch features tell query patches apart (prints JSON).

UP-DETR finds a query patch in its image by its CNN feature (global-average-pooled
C5, ``gt_feature``). This measures, on evaluation batches of the pre-training data
of a comparison workdir, the mean cosine similarity between the features of patches
of the same image and of different images, for a random CNN and for a CNN checkpoint
(e.g. stage 0 of ``updetr_jax.compare``), at several patch sizes.

    python benchmarks/patch_features.py --workdir=workdir/compare \
        [--checkpoint=workdir/compare/stage0/backbone.npz] [--patch_sizes=32,64]
"""

import argparse
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from updetr_jax.configs import compare as compare_config  # noqa: E402
from updetr_jax import compare, device_augment  # noqa: E402
from updetr_jax.sharding import model_inputs  # noqa: E402
from updetr_jax.data import eval_data_config, make_pretrain_dataset  # noqa: E402
from updetr_jax.models import build_model  # noqa: E402
from updetr_jax.models import init_variables
from updetr_jax.torch_import import import_torch_checkpoint  # noqa: E402


def cosines(features: np.ndarray) -> tuple[float, float]:
  """features [B, M, C] -> (mean cosine between patches of one image, of two images)."""
  f = features / np.linalg.norm(features, axis=-1, keepdims=True)
  b, m, _ = f.shape
  cos = np.einsum('bmc,dnc->bmdn', f, f)
  same_image = np.eye(b, dtype=bool)[:, None, :, None] & ~np.eye(m, dtype=bool)[None, :, None]
  other_image = ~np.eye(b, dtype=bool)[:, None, :, None] & np.ones((1, m, 1, m), bool)
  return float(cos[same_image].mean()), float(cos[other_image].mean())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='workdir/compare')
  parser.add_argument('--checkpoint', default='')
  parser.add_argument('--patch_sizes', default='32,64')
  parser.add_argument('--batch', type=int, default=16)
  args = parser.parse_args()
  config = compare_config.get_config('mini')
  config.miniature.directory = os.path.join(args.workdir, 'data')
  compare.prepare_data(config, args.workdir)
  checkpoint = args.checkpoint or os.path.join(args.workdir, 'stage0', 'backbone.npz')
  p = compare.pretrain_config(config, 'updetr', '')
  model = build_model(p.model)
  data, held_out = eval_data_config(p.data)
  for size in (int(s) for s in args.patch_sizes.split(',')):
    data['patch_size'] = size
    it, _ = make_pretrain_dataset(
      data, global_batch_size=args.batch, num_patches=p.model.num_patches, train=False, seed=1
    )
    batch = jax.jit(device_augment.batch_preparer(data, train=False))(model_inputs(next(it)))
    it.close()
    for name, path in (('random', ''), ('checkpoint', checkpoint)):
      variables = init_variables(model, jax.random.PRNGKey(0))
      if path:
        variables = import_torch_checkpoint(path, p.model, variables=variables)
      out = model.apply(variables, batch['images'], batch['padding_mask'], batch['patches'])
      same, other = cosines(np.asarray(out['gt_feature']))
      print(
        json.dumps(
          dict(
            cnn=name,
            checkpoint=path,
            patch_size=size,
            held_out=held_out,
            images=args.batch,
            patches_per_image=p.model.num_patches,
            cos_same_image=round(same, 3),
            cos_other_images=round(other, 3),
          )
        ),
        flush=True,
      )


if __name__ == '__main__':
  main()
