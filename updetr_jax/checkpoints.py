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


def train_manager(directory: str, *, save_every_steps: int, keep: int,
                  async_save: bool = True) -> ocp.CheckpointManager:
  """Orbax manager for training state: saves every K steps (plus forced saves), keeps N.

  Orbax writes each step to a temporary directory and renames it when complete, so
  a run killed mid-save leaves the previous checkpoint as the latest.
  """
  directory = os.path.abspath(directory) if '://' not in directory else directory
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_every_steps, max_to_keep=keep,
      enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory, options=options)


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
  """Restores the latest step into the structure/shardings of ``abstract_state``.

  Returns (state, step) or (None, None) when the directory holds no checkpoint.
  """
  step = manager.latest_step()
  if step is None:
    return None, None
  target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, abstract_state)
  try:
    state = manager.restore(step, args=ocp.args.StandardRestore(target))
  except (ValueError, KeyError) as e:
    raise ValueError(f'checkpoint {manager.directory}/{step} does not fit this config '
                     f'(model or optimizer changed?): {e}') from e
  return state, step
