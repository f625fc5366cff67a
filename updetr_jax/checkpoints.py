"""Orbax checkpoints: imported weights, training state, pre-train -> fine-tune init."""
from __future__ import annotations

import os

import jax
import numpy as np
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


# Fields that must agree between a pre-training checkpoint and the model it initialises.
ARCHITECTURE_FIELDS = ('backbone', 'dilation', 'position_embedding', 'hidden_dim', 'nheads',
                       'enc_layers', 'dec_layers', 'dim_feedforward', 'num_queries', 'pre_norm')
# Heads that are task specific and never carried from pre-training into fine-tuning.
PRETRAIN_ONLY_HEADS = ('class_embed', 'patch2query', 'feature_align')


def restore_workdir_variables(workdir: str):
  """Model variables of the latest checkpoint of a training workdir (``train.run``).

  Reads ``workdir/config.json`` to rebuild the parameter shapes and restores only
  the weights (no optimizer state) with a partial restore.
  Returns (variables {'params', 'batch_stats'}, step, model config dict).
  """
  import json

  from updetr_jax import optim
  from updetr_jax.models import build_model
  from updetr_jax.torch_import import variable_shapes

  with open(os.path.join(workdir, 'config.json')) as f:
    config = json.load(f)
  shapes = variable_shapes(build_model(config['model']))
  trainable, frozen = optim.partition_params(shapes['params'], config['optim']['frozen'])
  target = {'state': {'params': trainable},
            'constants': {'frozen': frozen, 'batch_stats': shapes['batch_stats']}}
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, 'checkpoints')),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints')
  restored = manager.restore(step, args=ocp.args.PyTreeRestore(
      item=target, partial_restore=True,
      restore_args=jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                          target)))
  params = optim.merge_params(restored['state']['params'], restored['constants']['frozen'])
  return ({'params': params, 'batch_stats': restored['constants']['batch_stats']}, step,
          config['model'])


def init_from_pretrained(variables, model_config, pretrained, pretrained_model_config):
  """Fine-tuning init: every pre-trained weight except the task heads.

  Args:
    variables: freshly initialised variables of the fine-tuning model.
    model_config: its model config; pretrained / pretrained_model_config: the
      pre-training variables and model config (e.g. ``restore_pretrained_variables``).
  Returns: variables with all leaves but ``PRETRAIN_ONLY_HEADS`` copied from
    ``pretrained``; ``class_embed`` keeps its fresh init.
  Raises: ValueError naming the architecture fields that differ or the weights
    that are missing / misshapen.
  """
  from flax import traverse_util

  diff = [f'{f}: pre-trained {pretrained_model_config.get(f)!r} vs model {model_config[f]!r}'
          for f in ARCHITECTURE_FIELDS if pretrained_model_config.get(f) != model_config[f]]
  if diff:
    raise ValueError('pre-trained checkpoint has another architecture:\n  ' + '\n  '.join(diff))
  src = traverse_util.flatten_dict(dict(pretrained))
  out = traverse_util.flatten_dict(dict(variables))
  problems = []
  for path, leaf in out.items():
    if path[1] in PRETRAIN_ONLY_HEADS:
      continue
    if path not in src:
      problems.append(f'missing {"/".join(path)}')
    elif np.shape(src[path]) != np.shape(leaf):
      problems.append(f'{"/".join(path)}: pre-trained {np.shape(src[path])} vs model '
                      f'{np.shape(leaf)}')
    else:
      out[path] = jax.numpy.asarray(src[path], leaf.dtype)
  if problems:
    raise ValueError('pre-trained weights do not fit the model:\n  ' + '\n  '.join(problems))
  return traverse_util.unflatten_dict(out)
