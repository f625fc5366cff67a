"""Orbax checkpoints: standalone variable trees (imported weights)."""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def save_variables(path: str, variables) -> None:
  """Writes a variable tree (e.g. imported PyTorch weights) as an Orbax checkpoint."""
  path = os.path.abspath(path) if '://' not in path else path
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, variables, force=True)


def load_variables(path: str, target=None):
  """Reads a tree written by ``save_variables``; ``target`` (arrays or
  ShapeDtypeStructs) fixes structure, shapes and shardings when given."""
  path = os.path.abspath(path) if '://' not in path else path
  if not (os.path.exists(path) or '://' in path):
    raise FileNotFoundError(f'no checkpoint at {path}')
  with ocp.StandardCheckpointer() as ckptr:
    if target is None:
      return ckptr.restore(path)
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    return ckptr.restore(path, target)
