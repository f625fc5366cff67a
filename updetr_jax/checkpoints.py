"""Orbax checkpoints: imported weights, training state, pre-train -> fine-tune init."""
from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from updetr_jax import files


def save_variables(path: str, variables) -> None:
  """Writes a variable tree (e.g. imported PyTorch weights) as an Orbax checkpoint."""
  path = files.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, variables, force=True)


def load_variables(path: str, target=None):
  """Reads a tree written by ``save_variables``; ``target`` (arrays or
  ShapeDtypeStructs) fixes structure, shapes and shardings when given."""
  path = files.abspath(path)
  if not files.exists(path):
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
  directory = files.abspath(directory)
  policies = ocp.checkpoint_managers
  # Every K steps and at a JAX-detected preemption; not Orbax's default extra save of
  # the first step (a forced save ends the run anyway).
  policy = policies.AnySavePolicy([policies.FixedIntervalPolicy(save_every_steps),
                                   policies.PreemptionCheckpointingPolicy()])
  options = ocp.CheckpointManagerOptions(
      save_decision_policy=policy, max_to_keep=keep,
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


BEST_DIR = 'best'  # workdir/best: the checkpoint with the best evaluation metric
LAST_DIR = 'checkpoints'  # workdir/checkpoints: the latest training states


def restore_workdir_variables(workdir: str, which: str = 'latest'):
  """Model variables of a training workdir's checkpoint (``train.run``).

  which: 'latest' (workdir/checkpoints), 'best' (workdir/best, written by fine-tuning
  runs with evaluation) or 'auto' (best when present, else latest).
  Reads ``workdir/config.json`` to rebuild the parameter shapes and restores only
  the weights (no optimizer state) with a partial restore.
  Returns (variables {'params', 'batch_stats'}, step, model config dict).
  """
  if which not in ('latest', 'best', 'auto'):
    raise ValueError(f"which={which!r}: choose 'latest', 'best' or 'auto'")
  best = os.path.join(workdir, BEST_DIR)
  if which == 'auto':
    which = 'best' if has_steps(best) else 'latest'
  if not files.exists(os.path.join(workdir, 'config.json')):
    raise FileNotFoundError(f'{workdir} is not a training workdir (no config.json)')
  from updetr_jax import optim
  from updetr_jax.models import build_model
  from updetr_jax.torch_import import variable_shapes

  config = files.read_json(os.path.join(workdir, 'config.json'))
  shapes = variable_shapes(build_model(config['model']))
  trainable, frozen = optim.partition_params(shapes['params'], config['optim']['frozen'])
  target = {'state': {'params': trainable},
            'constants': {'frozen': frozen, 'batch_stats': shapes['batch_stats']}}
  sub = BEST_DIR if which == 'best' else LAST_DIR
  manager = ocp.CheckpointManager(files.abspath(os.path.join(workdir, sub)),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {workdir}/{sub}')
  restored = manager.restore(step, args=ocp.args.PyTreeRestore(
      item=target, partial_restore=True,
      restore_args=jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                          target)))
  params = optim.merge_params(restored['state']['params'], restored['constants']['frozen'])
  return ({'params': params, 'batch_stats': restored['constants']['batch_stats']}, step,
          config['model'])


def has_steps(directory: str) -> bool:
  """Does ``directory`` hold step folders of a checkpoint manager?"""
  return files.isdir(directory) and any(d.isdigit() for d in files.listdir(directory))


def load_pretrained(path: str, model_config):
  """Pre-trained weights for fine-tuning, from any of:

  * a training workdir (``config.json`` + ``checkpoints/``): its latest checkpoint;
  * a PyTorch release ``.pth`` (UP-DETR pre-training or DETR): imported with
    ``model_config``'s architecture, the heads sized from the file;
  * an Orbax variables checkpoint (``save_variables`` / ``updetr_jax.torch_import``).
  Returns (variables, model config dict of the source, or None when unknown).
  """
  if files.isdir(path) and files.exists(os.path.join(path, 'config.json')):
    variables, _, config = restore_workdir_variables(path)
    return variables, config
  if path.endswith('.pth'):
    from updetr_jax.torch_import import import_torch_checkpoint, load_state_dict
    sd = load_state_dict(path)
    if 'class_embed.weight' not in sd:
      raise ValueError(f'{path} has no class_embed.weight: not a DETR / UP-DETR model '
                       '(a backbone-only file goes to init.backbone_checkpoint)')
    config = dict(model_config)
    config.update(num_classes=int(sd['class_embed.weight'].shape[0]) - 1,
                  num_patches=1 if 'patch2query.weight' in sd else 0,
                  feature_recon=any(k.startswith('feature_align.') for k in sd))
    return import_torch_checkpoint(sd, config), None
  if not files.isdir(path):
    raise FileNotFoundError(
        f'init.pretrained={path!r}: no such workdir, .pth file or Orbax checkpoint')
  return load_variables(path), None


def init_from_pretrained(variables, model_config, pretrained, pretrained_model_config):
  """Fine-tuning init: every pre-trained weight except the task heads.

  Args:
    variables: freshly initialised variables of the fine-tuning model.
    model_config: its model config; pretrained / pretrained_model_config: the
      pre-training variables and model config (``load_pretrained``; a config of
      None checks the shapes only).
  Returns: variables with all leaves but ``PRETRAIN_ONLY_HEADS`` copied from
    ``pretrained``; ``class_embed`` keeps its fresh init.
  Raises: ValueError naming the architecture fields that differ or the weights
    that are missing / misshapen.
  """
  from flax import traverse_util

  diff = [f'{f}: pre-trained {pretrained_model_config.get(f)!r} vs model {model_config[f]!r}'
          for f in ARCHITECTURE_FIELDS if pretrained_model_config is not None
          and pretrained_model_config.get(f) != model_config[f]]
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
