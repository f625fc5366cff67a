"""Do the one-shot query features carry the class? (prints JSON)

The one-shot detector sees its query only through the frozen CNN's global-average-pooled
C5 feature (then ``patch2query``). On the evaluation queries of a one-shot workdir
(the pipeline's own crops, query seed 0), this measures with that workdir's CNN: the
mean cosine similarity between queries of the same class and of different classes, and
the leave-one-out 1-nearest-neighbour class accuracy against the majority-class rate.

    python benchmarks/query_features.py --workdir=workdir/oneshot_demo/finetune/frac1/scratch/seed0
"""

import argparse
import json
import os
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from updetr_jax import checkpoints, device_augment, files  # noqa: E402
from updetr_jax.data.oneshot import make_oneshot_dataset  # noqa: E402
from updetr_jax.models import build_model  # noqa: E402


def class_separation(features: np.ndarray, labels: np.ndarray) -> dict:
  """features [n, C], labels [n] -> cosines within / across classes, 1-NN accuracy."""
  f = features / np.linalg.norm(features, axis=-1, keepdims=True)
  sim = f @ f.T
  same = labels[:, None] == labels[None]
  off = ~np.eye(len(f), dtype=bool)
  np.fill_diagonal(sim, -np.inf)
  nn = labels[np.argmax(sim, axis=1)]
  np.fill_diagonal(sim, 1.0)
  return {
    'cosine_same_class': float(sim[same & off].mean()),
    'cosine_other_class': float(sim[~same].mean()),
    'nn1_accuracy': float((nn == labels).mean()),
    'majority_rate': float(np.bincount(labels).max() / len(labels)),
  }


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--workdir', required=True, help='a one-shot training workdir')
  ap.add_argument('--max_queries', type=int, default=1000)
  args = ap.parse_args()
  config = ml_collections.ConfigDict(files.read_json(os.path.join(args.workdir, 'config.json')))
  variables, step, model_config = checkpoints.restore_workdir_variables(args.workdir)
  model = build_model(model_config)
  it, _, info = make_oneshot_dataset(config.data, global_batch_size=50, train=False)
  feats, labels, seen = [], [], set()
  for batch in it:
    x = device_augment.normalize(jnp.asarray(batch['patches'][:, 0]) / 255.0)  # host uint8
    f = np.asarray(model.apply(variables, x, method=lambda m, x: jnp.mean(m.body(x), axis=(1, 2))))
    for r in np.flatnonzero(batch['valid']):
      key = (int(batch['query_image_id'][r]), tuple(batch['query_box'][r].tolist()))
      if key not in seen:  # a box can be the query of several trials: count it once
        seen.add(key)
        feats.append(f[r])
        labels.append(int(batch['label'][r]))
    if len(feats) >= args.max_queries:
      break
  feats, labels = np.stack(feats[: args.max_queries]), np.array(labels[: args.max_queries])
  out = dict(
    workdir=args.workdir,
    step=int(step),
    distinct_queries=int(len(feats)),
    query_size=int(config.data.patch_size),
    **class_separation(feats, labels),
  )
  it.close()
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  main()
