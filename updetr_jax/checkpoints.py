"""Orbax checkpoints: imported weights, training state, pre-train -> fine-tune init.

Every checkpoint written here carries integrity records and every read verifies them
(``integrity``): a damaged or incomplete checkpoint is an error naming the files or
arrays that fail (``integrity.CorruptCheckpointError``), never different values; one
written by another model / optimizer configuration names the config fields that
differ (``integrity.ConfigMismatchError``). Resuming falls back to the newest intact
step (``TrainCheckpoints.restore_latest``).
"""

from __future__ import annotations

import os

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from updetr_jax import files, integrity, optim
from updetr_jax.models import build_model, variable_shapes


def _what(directory: str, step: int | None = None) -> str:
  return f'checkpoint {directory}' + ('' if step is None else f' step {step}')


def _shape_structs(tree):
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


def save_variables(path: str, variables, config=None) -> None:
  """Writes a variable tree (e.g. imported PyTorch weights) as an Orbax checkpoint,
  with its integrity records (``integrity``); ``config`` (model config) is recorded."""
  path = files.abspath(path)
  record = integrity.make_record(variables, {'model': config} if config is not None else None)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, variables, force=True, custom_metadata={integrity.RECORD_KEY: record})
  if jax.process_index() == 0:
    integrity.write_file_record(path)


def load_variables(path: str, target=None):
  """Reads a tree written by ``save_variables``, verified against its integrity
  records; ``target`` (arrays or ShapeDtypeStructs) fixes structure, shapes and
  shardings when given.

  Raises: CorruptCheckpointError (damaged / incomplete, naming files or arrays) or
    ConfigMismatchError (arrays of other shapes than ``target``'s).
  """
  path = files.abspath(path)
  if not files.exists(path):
    raise FileNotFoundError(f'no checkpoint at {path}')

  def restore():
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(path) if target is None else ckptr.restore(path, _shape_structs(target))

  return _verified_restore(path, _what(path), target, None, restore)


def _verified_restore(step_dir: str, what: str, target, config, restore):
  """``restore()`` of the checkpoint in ``step_dir``, checked against its integrity
  records: files and record first, the arrays against ``target`` (when given; a
  mismatch names the fields of ``config`` that differ), the restored values last."""
  problems = integrity.check_files(step_dir)
  try:
    record = integrity.read_record(step_dir, what)
  except integrity.CorruptCheckpointError as e:
    raise integrity.CorruptCheckpointError(what, problems + e.problems) from None
  mismatch = [] if target is None else integrity.structure_diff(record, target)
  if mismatch and not problems:  # an intact checkpoint of other arrays
    fields = integrity.config_diff(record.get('config', {}), config) if config is not None else []
    if config is not None and not fields:
      fields = ['no recorded config field differs (written by another version of the code?)']
    raise integrity.ConfigMismatchError(what, fields + mismatch)
  if problems:
    raise integrity.CorruptCheckpointError(what, problems)
  try:
    restored = restore()
  except Exception as e:  # noqa: BLE001
    raise integrity.CorruptCheckpointError(
      what, [f'Orbax could not read it: {type(e).__name__}: {str(e)[:500]}']
    ) from e
  bad = integrity.value_diff(record, restored)
  if bad:
    raise integrity.CorruptCheckpointError(what, bad)
  return restored


def train_manager(
  directory: str,
  *,
  save_every_steps: int,
  keep: int,
  async_save: bool = True,
  read_only: bool = False,
) -> ocp.CheckpointManager:
  """Orbax manager for training state: saves every K steps (plus forced saves), keeps N.

  Orbax writes each step to a temporary directory and renames it when complete, so
  a run killed mid-save leaves the previous checkpoint as the latest.
  """
  directory = files.abspath(directory)
  policies = ocp.checkpoint_managers
  # Every K steps and at a JAX-detected preemption; not Orbax's default extra save of
  # the first step (a forced save ends the run anyway).
  policy = policies.AnySavePolicy(
    [policies.FixedIntervalPolicy(save_every_steps), policies.PreemptionCheckpointingPolicy()]
  )
  options = ocp.CheckpointManagerOptions(
    save_decision_policy=policy,
    max_to_keep=keep,
    read_only=read_only,
    enable_async_checkpointing=async_save,
    cleanup_tmp_directories=not read_only,
  )
  return ocp.CheckpointManager(directory, options=options)


def _all_processes(ok: bool) -> bool:
  """True when ``ok`` holds on every process (one collective when multi-process)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class TrainCheckpoints:
  """The checkpoints of a training run (``workdir/checkpoints``, ``workdir/best``):
  an Orbax manager whose every save carries integrity records and whose restores
  verify them.

  ``save`` records the arrays' checksums inside the step's commit and, once a step
  has committed, its file record. ``restore_latest`` restores the newest intact step:
  newer steps that are corrupt or incomplete are moved to ``corrupt_<dir>/<step>``
  (kept for inspection, never deleted); when none is intact it raises and moves
  nothing.
  """

  def __init__(
    self,
    directory: str,
    *,
    save_every_steps: int = 1,
    keep: int = 1,
    config=None,
    async_save: bool = True,
    read_only: bool = False,
  ):
    self.directory = files.abspath(directory)
    self.config = config
    self.manager = train_manager(
      self.directory,
      save_every_steps=save_every_steps,
      keep=keep,
      async_save=async_save,
      read_only=read_only,
    )
    self._record_config = integrity.config_record(config)
    self._unsealed: list[int] = []  # committed or in flight, without a file record yet
    self.moved_aside: list[str] = []  # corrupt steps moved away by restore_latest

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, tree, *, force: bool = False) -> bool:
    """Saves ``tree`` at ``step`` when the policy (or ``force``) says so."""
    if not (force or self.manager.should_save(step)):
      return False
    record = integrity.make_record(tree, None)
    record['config'] = self._record_config
    saved = self.manager.save(
      step,
      args=ocp.args.StandardSave(tree),
      force=force,
      custom_metadata={integrity.RECORD_KEY: record},
    )
    self._seal()  # the previous saves have committed by now
    if saved:
      self._unsealed.append(step)
    return saved

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()
    self._seal()

  def _seal(self) -> None:
    """File records of the steps this object saved that have committed."""
    done = self._unsealed if not self.manager.is_saving_in_progress() else self._unsealed[:-1]
    for step in done:
      step_dir = os.path.join(self.directory, str(step))
      if jax.process_index() == 0 and files.exists(os.path.join(step_dir, integrity.COMMIT_MARKER)):
        integrity.write_file_record(step_dir)
    self._unsealed = self._unsealed[len(done) :]

  def restore(self, step: int, abstract_tree, *, partial: bool = False, as_numpy=False):
    """Step ``step`` into the structure (and shardings) of ``abstract_tree``, verified.

    partial: ``abstract_tree`` is a subset of the saved tree (e.g. weights without
    optimizer state). Raises CorruptCheckpointError / ConfigMismatchError.
    """
    step_dir = os.path.join(self.directory, str(step))
    target = _shape_structs(abstract_tree)
    if partial:
      restore_args = (
        jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        if as_numpy
        else None
      )
      args = ocp.args.PyTreeRestore(item=target, partial_restore=True, restore_args=restore_args)
    else:
      args = ocp.args.StandardRestore(target)
    return _verified_restore(
      step_dir,
      _what(self.directory, step),
      abstract_tree,
      self.config,
      lambda: self.manager.restore(step, args=args),
    )

  def restore_latest(self, abstract_tree):
    """(tree, step) of the newest intact step, or (None, None) with no checkpoint.

    Corrupt newer steps are moved aside (after every process agrees on the step to
    resume from). Raises CorruptCheckpointError when no step is intact, and
    ConfigMismatchError at once for a step written by another configuration.
    """
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      error = None
      try:
        tree = self.restore(step, abstract_tree)
      except integrity.CorruptCheckpointError as e:
        error = e
      if _all_processes(error is None):
        self._move_aside(failed)
        return tree, step
      error = error or integrity.CorruptCheckpointError(
        _what(self.directory, step), ['another process could not restore it']
      )
      failed.append((step, error))
    if failed:
      lines = [f'step {s}: {p}' for s, e in failed for p in e.problems]
      lines.append(
        'no step is intact; nothing was moved. Restore the files (or move the '
        'directory away to start from scratch on purpose) and rerun'
      )
      raise integrity.CorruptCheckpointError(_what(self.directory), lines)
    return None, None

  def _move_aside(self, failed) -> None:
    if not failed:
      return
    aside = os.path.join(
      os.path.dirname(self.directory), 'corrupt_' + os.path.basename(self.directory)
    )
    for step, error in failed:
      dst = os.path.join(aside, str(step))
      n = 1
      while files.exists(dst):
        dst, n = os.path.join(aside, f'{step}.{n}'), n + 1
      logging.warning('%s\nresuming from an older step; moving it to %s', error, dst)
      if jax.process_index() == 0:
        files.makedirs(aside)
        files.rename(os.path.join(self.directory, str(step)), dst)
      self.moved_aside.append(dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices('updetr_jax.checkpoints.move_aside')
    self.manager.reload()


BEST_DIR = 'best'  # workdir/best: the checkpoint with the best evaluation metric
LAST_DIR = 'checkpoints'  # workdir/checkpoints: the latest training states


def restore_workdir_variables(workdir: str, which: str = 'latest'):
  """Model variables of a training workdir's checkpoint (``train.run``).

  which: 'latest' (workdir/checkpoints), 'best' (workdir/best, written by fine-tuning
  runs with evaluation) or 'auto' (best when present, else latest).
  Reads ``workdir/config.json`` to rebuild the parameter shapes and restores only
  the weights (no optimizer state) with a partial restore, verified against the
  checkpoint's integrity records (``TrainCheckpoints.restore``).
  Returns (variables {'params', 'batch_stats'}, step, model config dict).
  """
  if which not in ('latest', 'best', 'auto'):
    raise ValueError(f"which={which!r}: choose 'latest', 'best' or 'auto'")
  best = os.path.join(workdir, BEST_DIR)
  if which == 'auto':
    which = 'best' if has_steps(best) else 'latest'
  if not files.exists(os.path.join(workdir, 'config.json')):
    raise FileNotFoundError(f'{workdir} is not a training workdir (no config.json)')
  try:
    config = files.read_json(os.path.join(workdir, 'config.json'))
  except ValueError as e:
    raise ValueError(
      f'{workdir}/config.json is unreadable ({e}): it gives the shapes of the checkpointed arrays'
    ) from e
  shapes = variable_shapes(build_model(config['model']))
  trainable, frozen = optim.partition_params(shapes['params'], config['optim']['frozen'])
  target = {
    'state': {'params': trainable},
    'constants': {'frozen': frozen, 'batch_stats': shapes['batch_stats']},
  }
  sub = BEST_DIR if which == 'best' else LAST_DIR
  ckpts = TrainCheckpoints(os.path.join(workdir, sub), config=config, read_only=True)
  step = ckpts.latest_step()
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {workdir}/{sub}')
  restored = ckpts.restore(step, target, partial=True, as_numpy=True)
  params = optim.merge_params(restored['state']['params'], restored['constants']['frozen'])
  return (
    {'params': params, 'batch_stats': restored['constants']['batch_stats']},
    step,
    config['model'],
  )


def has_steps(directory: str) -> bool:
  """Does ``directory`` hold step folders of a checkpoint manager?"""
  return files.isdir(directory) and any(d.isdigit() for d in files.listdir(directory))
