"""Checkpoint integrity, by fault injection on the demo-sized model's training state:
every fault either gives back the exact saved values or an error / fallback that
names the damage; never different values.
"""

import glob
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from updetr_jax.configs import pretrain
from updetr_jax import checkpoints, integrity, optim, train_step
from updetr_jax.models import build_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_helpers import change_saved_values, flip_bytes, zero_data_files  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_PARAMS = 'state/params/'  # arrays that every reader restores (also the weights-only one)


def _state(config, seed: int):
  """Training state of ``config``'s model with non-initial values (differs by seed)."""
  model = build_model(config.model)
  _, state, constants, _, _ = train_step.init_train_state(config, model, jax.random.PRNGKey(0), 10)
  leaves, tree = jax.tree_util.tree_flatten(state['params'])
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  state['params'] = jax.tree_util.tree_unflatten(
    tree, [x + jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  )
  return {'state': state, 'constants': constants}


def _host(tree):
  return {k: np.asarray(v) for k, v in integrity.leaf_paths(tree).items()}


def _assert_equal(got, want):
  got, want = _host(got), _host(want)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """A pristine workdir (config.json, checkpoints at steps 1 and 2), and the trees."""
  config = pretrain.get_config('demo')
  trees = {1: _state(config, 1), 2: _state(config, 2)}
  workdir = str(tmp_path_factory.mktemp('pristine'))
  ckpts = checkpoints.TrainCheckpoints(
    os.path.join(workdir, checkpoints.LAST_DIR), keep=5, config=config
  )
  for step, tree in trees.items():
    ckpts.save(step, tree)
  ckpts.wait_until_finished()
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort())
  return workdir, config, trees


@pytest.fixture
def workdir(saved, tmp_path):
  """A fresh copy of the pristine workdir, to damage."""
  src, config, trees = saved
  dst = str(tmp_path / 'workdir')
  shutil.copytree(src, dst)
  return dst, config, trees


def _ckpts(workdir, config):
  return checkpoints.TrainCheckpoints(
    os.path.join(workdir, checkpoints.LAST_DIR), keep=5, config=config
  )


def _step_dir(workdir, step=2):
  return os.path.join(workdir, checkpoints.LAST_DIR, str(step))


def _data_files(workdir, step=2):
  return sorted(
    glob.glob(os.path.join(_step_dir(workdir, step), 'default', 'ocdbt.process_0', 'd', '*'))
  )


def test_intact_checkpoints_come_back_exactly(workdir):
  wd, config, trees = workdir
  ckpts = _ckpts(wd, config)
  for step in (1, 2):
    _assert_equal(ckpts.restore(step, trees[step]), trees[step])
  tree, step = ckpts.restore_latest(trees[2])
  assert step == 2
  _assert_equal(tree, trees[2])
  record = integrity.read_record(_step_dir(wd), 'x')
  assert set(record['arrays']) == set(_host(trees[2]))
  assert os.path.exists(os.path.join(_step_dir(wd), integrity.FILES_RECORD))


def _change_values(wd):
  return f'{change_saved_values(_step_dir(wd), STEP_PARAMS)}: values differ from those saved'


def _change_values_without_file_record(wd):
  os.remove(os.path.join(_step_dir(wd), integrity.FILES_RECORD))  # e.g. killed before it
  return _change_values(wd)


def _zero_data_files(wd):
  zero_data_files(_step_dir(wd))
  return 'Orbax could not read it'


def _damage_tree_metadata(wd):
  flip_bytes(os.path.join(_step_dir(wd), 'default', '_METADATA'))
  return 'default/_METADATA: contents changed'


def _damage_step_metadata(wd):
  flip_bytes(os.path.join(_step_dir(wd), integrity.STEP_METADATA))
  return f'{integrity.STEP_METADATA}: contents changed'


def _damage_ocdbt_manifest(wd):
  flip_bytes(os.path.join(_step_dir(wd), 'default', 'ocdbt.process_0', 'manifest.ocdbt'), n=8)
  return 'default/ocdbt.process_0/manifest.ocdbt: contents changed'


def _largest_data_file(wd):
  return max(_data_files(wd), key=os.path.getsize)


def _truncate_data_file(wd):
  f = _largest_data_file(wd)
  size = os.path.getsize(f)
  with open(f, 'r+b') as fh:
    fh.truncate(size // 2)
  return f'{os.path.relpath(f, _step_dir(wd))}: {size // 2} bytes now, {size} bytes when saved'


def _remove_data_file(wd):
  f = _largest_data_file(wd)
  os.remove(f)
  return f'{os.path.relpath(f, _step_dir(wd))}: file missing'


def _remove_commit_marker(wd):
  os.remove(os.path.join(_step_dir(wd), integrity.COMMIT_MARKER))
  return 'commit_success.txt is missing'


# fault -> damages the workdir's step 2, returns the text the error must contain (what
# failed, by name). Each cause has one fault whose effect does not depend on where
# Orbax put the bytes (data_helpers): decodable other values, an undecodable database,
# and metadata or files that the file record names.
FAULTS = {
  'changed_values': _change_values,
  'changed_values_no_file_record': _change_values_without_file_record,
  'zeroed_data_files': _zero_data_files,
  'tree_metadata_bytes': _damage_tree_metadata,
  'step_metadata_bytes': _damage_step_metadata,
  'ocdbt_manifest_bytes': _damage_ocdbt_manifest,
  'truncated_file': _truncate_data_file,
  'missing_file': _remove_data_file,
  'no_commit_marker': _remove_commit_marker,
}


@pytest.mark.parametrize('fault', sorted(FAULTS))
def test_fault_in_newest_step_is_named_and_resume_falls_back(workdir, fault):
  wd, config, trees = workdir
  named = FAULTS[fault](wd)
  # Reading it (predict, init.pretrained, export): an error naming the damage.
  with pytest.raises(integrity.CorruptCheckpointError) as e:
    checkpoints.restore_workdir_variables(wd)
  assert 'step 2 is corrupt or incomplete' in str(e.value) and named in str(e.value), e.value
  # Resuming: the intact step 1, exactly; step 2 moved aside with all its files.
  files_before = sorted(
    os.path.relpath(p, _step_dir(wd))
    for p in glob.glob(os.path.join(_step_dir(wd), '**'), recursive=True)
  )
  tree, step = _ckpts(wd, config).restore_latest(trees[2])
  assert step == 1
  _assert_equal(tree, trees[1])
  aside = os.path.join(wd, 'corrupt_checkpoints', '2')
  assert not os.path.exists(_step_dir(wd))
  assert (
    sorted(os.path.relpath(p, aside) for p in glob.glob(os.path.join(aside, '**'), recursive=True))
    == files_before
  )
  assert _ckpts(wd, config).all_steps() == [1]


def test_no_intact_step_stops_and_moves_nothing(workdir):
  wd, config, trees = workdir
  for step in (1, 2):
    os.remove(max(_data_files(wd, step), key=os.path.getsize))
  with pytest.raises(integrity.CorruptCheckpointError, match='no step is intact') as e:
    _ckpts(wd, config).restore_latest(trees[2])
  assert 'step 2: ' in str(e.value) and 'step 1: ' in str(e.value)
  assert os.path.isdir(_step_dir(wd, 1)) and os.path.isdir(_step_dir(wd, 2))
  assert not os.path.exists(os.path.join(wd, 'corrupt_checkpoints'))


def test_another_configuration_is_named_not_called_corrupt(workdir):
  wd, config, trees = workdir
  other = pretrain.get_config('demo')
  other.model.num_queries = config.model.num_queries * 2
  other.optim.weight_decay = 0.5
  abstract = jax.eval_shape(lambda: _state(other, 1))
  with pytest.raises(integrity.ConfigMismatchError) as e:
    _ckpts(wd, other).restore_latest(abstract)
  msg = str(e.value)
  assert 'step 2 was written by another model/optimizer configuration' in msg
  assert (
    f'config.model.num_queries: checkpoint {config.model.num_queries} vs this run '
    f'{other.model.num_queries}'
  ) in msg
  assert 'config.optim.weight_decay' in msg and 'query_embed/embedding' in msg
  assert os.path.isdir(_step_dir(wd, 2))  # an intact checkpoint is never moved


def test_variables_checkpoint_is_verified(saved, tmp_path):
  """Orbax variables (save_variables: torch_import, init.checkpoint, predict)."""
  _, config, trees = saved
  variables = {
    'params': optim.merge_params(trees[2]['state']['params'], trees[2]['constants']['frozen']),
    'batch_stats': trees[2]['constants']['batch_stats'],
  }
  path = str(tmp_path / 'variables')
  checkpoints.save_variables(path, variables, config.model.to_dict())
  _assert_equal(checkpoints.load_variables(path, variables), variables)
  changed = change_saved_values(path, 'params/')
  for target in (variables, None):
    with pytest.raises(integrity.CorruptCheckpointError) as e:
      checkpoints.load_variables(path, target)
    assert 'is corrupt or incomplete' in str(e.value), e.value
    assert f'{changed}: values differ from those saved' in str(e.value), e.value
  zero_data_files(path)
  with pytest.raises(integrity.CorruptCheckpointError, match='Orbax could not read it'):
    checkpoints.load_variables(path, variables)


# Step 2's save is held where the kill must land, whatever the machine's load: its
# arrays written to the temporary directory, the commit (metadata, rename) not begun.
# The background save prints 'saving' there and waits for ever; the test kills it.
_KILL_MID_SAVE = textwrap.dedent("""
    import asyncio
    import sys
    import numpy as np
    import orbax.checkpoint as ocp
    from updetr_jax import checkpoints
    temporary = ocp.path.atomicity.AtomicRenameTemporaryPath
    finalize = temporary.finalize
    async def held_finalize(self, *args, **kwargs):
      if self.get_final().name == '2':
        print('saving', flush=True)  # asynchronous: save() returned, the commit waits
        await asyncio.Event().wait()
      return await finalize(self, *args, **kwargs)
    temporary.finalize = held_finalize
    ckpts = checkpoints.TrainCheckpoints(sys.argv[1], keep=5)
    ckpts.save(1, {'w': np.full((4096, 4096), 1, np.float32), 'b': np.arange(7, dtype=np.int32)})
    ckpts.wait_until_finished()
    ckpts.save(2, {'w': np.full((4096, 4096), 2, np.float32), 'b': np.arange(7, dtype=np.int32)})
    ckpts.wait_until_finished()  # returns only if the hold did not apply
    print('step 2 committed', flush=True)
""")


def test_kill_during_asynchronous_save_leaves_an_exact_checkpoint(tmp_path):
  directory = str(tmp_path / 'checkpoints')
  proc = subprocess.Popen(
    [sys.executable, '-c', _KILL_MID_SAVE, directory],
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'),
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  try:
    assert proc.stdout.readline().strip() == 'saving'
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  left = sorted(os.listdir(directory))
  assert any(n.startswith('2.orbax-checkpoint-tmp') for n in left), (
    f'the save of step 2 was not in flight when killed ({left}); nothing was tested'
  )
  tree, step = checkpoints.TrainCheckpoints(directory, keep=5).restore_latest(
    {'w': np.zeros((4096, 4096), np.float32), 'b': np.zeros(7, np.int32)}
  )
  assert step == 1, left
  np.testing.assert_array_equal(tree['w'], 1)
  np.testing.assert_array_equal(tree['b'], np.arange(7))
