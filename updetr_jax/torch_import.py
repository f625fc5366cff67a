"""Import of the PyTorch releases' weights into Flax variables.

Supported layouts (docs/method.md, 'Checkpoint layouts of the PyTorch releases'):
  * DETR / UP-DETR checkpoints: ``{'model': state_dict}`` with keys
    ``backbone.0.body.*``, ``transformer.*``, ``query_embed.weight``, ...
  * torchvision-layout ResNet state dicts for the backbone alone (``conv1.weight``,
    ``layer1.0.conv1.weight``, ...), optionally under ``module.`` (SwAV). Their
    classifier / self-supervision heads (``fc``, ``projection_head``, ``prototypes``)
    are dropped and reported; everything else must match.

Every expected key must be present with the right shape and every given key must
be used; otherwise one ``CheckpointMismatchError`` lists all problems.

CLI (writes an Orbax checkpoint of the variables):
  python -m updetr_jax.torch_import --checkpoint=detr-r50.pth \
      --config=configs/finetune_coco.py --output=/tmp/detr_r50
"""

from __future__ import annotations

from absl import logging
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from updetr_jax import files
from updetr_jax.models import build_model, init_variables, variable_shapes

# Heads of classification / self-supervised checkpoints that DETR never uses.
BACKBONE_ONLY_IGNORED = ('fc.', 'projection_head.', 'prototypes.')
_QKV = ('q_proj', 'k_proj', 'v_proj')
# Flax leaf -> torch parameter name (Dense / Conv / Embed / BatchNorm).
_TORCH_LEAF_NAMES = {
  'kernel': 'weight',
  'scale': 'weight',
  'embedding': 'weight',
  'bias': 'bias',
  'mean': 'running_mean',
  'var': 'running_var',
}
# Axes of a torch kernel in the order of the Flax one's (OIHW <-> HWIO, [out, in] <->
# [in, out]), by number of dimensions; other leaves have the same layout.
_TORCH_AXES = {4: (3, 2, 0, 1), 2: (1, 0)}


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model: lists missing, unexpected and misshapen keys."""


def load_state_dict(path_or_state_dict) -> dict[str, np.ndarray]:
  """Reads a ``.pth`` or ``.npz`` file (or takes a dict): {key: float32 numpy array}.

  A ``.npz`` (numpy archive whose keys are the state-dict keys, e.g. written by
  ``updetr_jax.ssl_backbone``) is read without PyTorch; any other file is read with
  ``torch.load``. Unwraps ``{'model': ...}`` / ``{'state_dict': ...}`` and strips
  ``module.``.
  """
  sd = path_or_state_dict
  if isinstance(sd, (str, os.PathLike)):
    if os.fspath(sd).lower().endswith('.npz'):
      if not files.exists(os.fspath(sd)):
        raise FileNotFoundError(f'checkpoint file not found: {sd}')
      sd = files.read_npz(os.fspath(sd))
    else:
      try:
        import torch  # optional dependency, only to read .pth files
      except ImportError as e:
        raise ImportError(f'reading {sd} needs PyTorch: pip install torch (CPU build)') from e
      if not os.path.exists(sd):
        raise FileNotFoundError(f'checkpoint file not found: {sd}')
      sd = torch.load(sd, map_location='cpu', weights_only=True)
  if not isinstance(sd, Mapping):
    raise TypeError(f'expected a state dict (mapping), got {type(sd).__name__}')
  for wrapper in ('model', 'state_dict'):
    if wrapper in sd and isinstance(sd[wrapper], Mapping):
      sd = sd[wrapper]
      break
  out = {}
  for key, value in sd.items():
    if key.startswith('module.'):
      key = key[len('module.') :]
    if hasattr(value, 'detach'):  # torch.Tensor
      value = value.detach().cpu().float().numpy()
    out[key] = np.asarray(value, dtype=np.float32)
  return out


def _module_key(name: str) -> str:
  """Flax submodule name -> torch name ('layer1_0' -> 'layer1.0', 'layers_3' -> 'layers.3')."""
  return re.sub(r'_(\d+)$', r'.\1', name)


def _torch_name(collection: str, path: tuple[str, ...], backbone_only: bool):
  """Flax leaf -> (torch key, qkv slice index or None, kind of transform)."""
  *mods, leaf = path
  slice_idx = None
  if mods and mods[-1] in _QKV:
    slice_idx = _QKV.index(mods[-1])
    mods = mods[:-1]
    leaf = 'in_proj_' + ('weight' if leaf == 'kernel' else 'bias')
  prefix = []
  for m in mods:
    if m == 'body':
      prefix += [] if backbone_only else ['backbone', '0', 'body']
    elif m == 'position':
      prefix += ['backbone', '1']
    else:
      prefix.append(_module_key(m))
  if collection == 'batch_stats' or leaf in ('kernel', 'embedding', 'scale'):
    name = _TORCH_LEAF_NAMES[leaf]
  elif leaf in ('row_embed', 'col_embed'):
    prefix.append(leaf)
    name = 'weight'
  else:
    name = leaf
  return '.'.join(prefix + [name]), slice_idx


def convert_state_dict(sd: Mapping[str, np.ndarray], shapes, backbone_only: bool) -> dict:
  """Maps a release state dict onto the flax variable tree described by ``shapes``.

  With ``backbone_only`` only the ``body`` (ResNet) leaves are filled.
  Returns a nested dict of numpy arrays; raises CheckpointMismatchError.
  """
  flat = traverse_util.flatten_dict(jax.tree_util.tree_map(lambda x: x, dict(shapes)))
  expected: dict[str, tuple] = {}  # torch key -> expected torch shape
  plan = []  # (flax path, torch key, slice index)
  for fpath, leaf in flat.items():
    collection, path = fpath[0], fpath[1:]
    if backbone_only and path[0] != 'body':
      continue
    key, sl = _torch_name(collection, path, backbone_only)
    shape = tuple(leaf.shape)
    axes = _TORCH_AXES.get(len(shape)) if path[-1] == 'kernel' else None
    tshape = shape if axes is None else tuple(shape[a] for a in axes)
    if sl is not None:
      tshape = (3 * tshape[0],) + tshape[1:]
    expected[key] = tshape
    plan.append((fpath, key, sl, axes))

  ignored = []
  given = dict(sd)
  for k in list(given):
    if k.endswith('num_batches_tracked') or (backbone_only and k.startswith(BACKBONE_ONLY_IGNORED)):
      ignored.append(k)
      given.pop(k)
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(set(given) - set(expected))
  mismatched = sorted(
    f'{k}: checkpoint {tuple(given[k].shape)} vs model {expected[k]}'
    for k in set(expected) & set(given)
    if tuple(given[k].shape) != expected[k]
  )
  if missing or unexpected or mismatched:
    lines = ['checkpoint does not match the model config:']
    for title, items in (
      ('missing keys', missing),
      ('unexpected keys', unexpected),
      ('shape mismatches', mismatched),
    ):
      if items:
        lines.append(f'  {title} ({len(items)}):')
        lines += [f'    {x}' for x in items]
    raise CheckpointMismatchError('\n'.join(lines))
  if ignored:
    logging.info(
      'torch import: dropped %d keys not used by DETR: %s',
      len(ignored),
      sorted({k.split('.')[0] for k in ignored}),
    )

  out = {}
  for fpath, key, sl, axes in plan:
    value = given[key]
    if sl is not None:
      value = np.split(value, 3, axis=0)[sl]
    out[fpath] = value if axes is None else value.transpose(np.argsort(axes))
  return traverse_util.unflatten_dict(out)


def export_state_dict(variables) -> dict[str, np.ndarray]:
  """Flax variables -> torch-layout state dict: the inverse of the backbone-only import.

  For trees whose module names mirror torch's (``layer1_0`` -> ``layer1.0``,
  ``projection_head_3`` -> ``projection_head.3``): conv kernels HWIO -> OIHW and dense
  kernels [in, out] -> [out, in] as ``.weight``; BatchNorm ``scale`` / ``bias`` (in
  ``params`` or ``batch_stats``) and ``mean`` / ``var`` -> ``weight`` / ``bias`` /
  ``running_mean`` / ``running_var``.

  Args: variables: {collection: nested dict of arrays}, e.g. {'params': ...,
    'batch_stats': ...} of a training-mode ResNet (``updetr_jax.ssl_backbone``).
  Returns: {torch key: float32 numpy array}.
  Raises: ValueError for a leaf without a torch name or two leaves with one key.
  """
  out: dict[str, np.ndarray] = {}
  for collection, tree in dict(variables).items():
    for path, value in traverse_util.flatten_dict(dict(tree)).items():
      *mods, leaf = path
      if leaf not in _TORCH_LEAF_NAMES:
        raise ValueError(f'{collection}/{"/".join(path)}: no torch name for leaf {leaf!r}')
      key = '.'.join([_module_key(m) for m in mods] + [_TORCH_LEAF_NAMES[leaf]])
      if key in out:
        raise ValueError(f'{collection}/{"/".join(path)}: torch key {key!r} given twice')
      value = np.asarray(value, np.float32)
      if leaf == 'kernel' and value.ndim in _TORCH_AXES:
        value = value.transpose(_TORCH_AXES[value.ndim])
      out[key] = np.ascontiguousarray(value)
  return out


def _is_backbone_only(sd: Mapping[str, Any]) -> bool:
  return 'conv1.weight' in sd and not any(k.startswith('backbone.') for k in sd)


def import_torch_checkpoint(path_or_state_dict, model_config, *, rng=None, variables=None):
  """Variables for ``build_model(model_config).apply`` from a PyTorch release file.

  Args:
    path_or_state_dict: a ``.pth`` path, or a (possibly wrapped) state dict of torch
      tensors or numpy arrays.
    model_config: the ``.model`` config the weights are meant for.
    rng, variables: for a backbone-only (torchvision / SwAV) file, the rest of the
      model comes from ``variables`` if given, else a fresh init with ``rng``
      (default PRNGKey(0)).
  Returns: {'params': ..., 'batch_stats': ...} of jnp float32 arrays.
  Raises: CheckpointMismatchError naming every missing, unexpected or misshapen key.
  """
  sd = load_state_dict(path_or_state_dict)
  model = build_model(model_config)
  shapes = variable_shapes(model)
  backbone_only = _is_backbone_only(sd)
  converted = convert_state_dict(sd, shapes, backbone_only)
  if not backbone_only:
    return jax.tree_util.tree_map(jnp.asarray, converted)
  if variables is None:
    variables = init_variables(model, rng if rng is not None else jax.random.PRNGKey(0))
  merged = traverse_util.flatten_dict(jax.tree_util.tree_map(jnp.asarray, dict(variables)))
  merged.update(traverse_util.flatten_dict(jax.tree_util.tree_map(jnp.asarray, converted)))
  return traverse_util.unflatten_dict(merged)


def main(argv):
  del argv
  from absl import flags
  from updetr_jax import checkpoints, cli

  cli.setup_logging()
  FLAGS = flags.FLAGS  # noqa: N806
  cfg = FLAGS.config
  variables = import_torch_checkpoint(FLAGS.checkpoint, cfg.model)
  checkpoints.save_variables(FLAGS.output, variables, cfg.model.to_dict())
  n = sum(x.size for x in jax.tree_util.tree_leaves(variables))
  print(f'wrote {n:,} values from {FLAGS.checkpoint} to {FLAGS.output}')


def _define_flags():
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file('config', None, 'config file (uses its .model)')
  flags.DEFINE_string('checkpoint', None, 'PyTorch .pth file')
  flags.DEFINE_string('output', None, 'directory for the Orbax checkpoint')
  flags.mark_flags_as_required(['config', 'checkpoint', 'output'])


def cli_main():
  """Console script ``updetr-import``."""
  from updetr_jax import cli

  cli.run(main, _define_flags)


if __name__ == '__main__':
  cli_main()
