"""Pre-training loop: a real step learns, NaN never lands, SIGKILL + resume is exact,
8 devices give the loss of 1."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from updetr_jax import train_step
from updetr_jax.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from updetr_jax.configs import pretrain  # noqa: E402

TINY_OVERRIDES = [
  '--config.model.backbone=resnet_tiny',
  '--config.model.hidden_dim=32',
  '--config.model.nheads=2',
  '--config.model.enc_layers=1',
  '--config.model.dec_layers=2',
  '--config.model.dim_feedforward=64',
  '--config.model.num_queries=8',
  '--config.model.num_patches=2',
  '--config.data.scales=(64,)',
  '--config.data.max_size=80',
  '--config.data.eval_scale=64',
  '--config.data.buckets=((64,80),)',
  '--config.data.patch_size=16',
  '--config.data.demo_repeats=2',
  '--config.batch_size=4',
  '--config.eval.num_batches=0',
]


def tiny_config():
  config = pretrain.get_config('demo')
  config.model.update(
    backbone='resnet_tiny',
    hidden_dim=32,
    nheads=2,
    enc_layers=1,
    dec_layers=2,
    dim_feedforward=64,
    num_queries=8,
    num_patches=2,
  )
  config.data.update(
    scales=(64,), max_size=80, eval_scale=64, buckets=((64, 80),), patch_size=16, demo_repeats=2
  )
  config.batch_size = 4
  return config


def fixed_batch(batch=4, num_patches=2, seed=0):
  rng = np.random.default_rng(seed)
  wh = rng.uniform(0.2, 0.5, (batch, num_patches, 2))
  c = rng.uniform(wh / 2, 1 - wh / 2)
  mask = np.zeros((batch, 64, 80), bool)
  mask[0, 48:] = True  # a padded image
  return {
    'images': rng.standard_normal((batch, 64, 80, 3)).astype(np.float32),
    'padding_mask': mask,
    'patches': rng.standard_normal((batch, num_patches, 16, 16, 3)).astype(np.float32),
    'targets': {
      'boxes': np.concatenate([c, wh], -1).astype(np.float32),
      'labels': np.ones((batch, num_patches), np.int32),
      'mask': np.ones((batch, num_patches), bool),
    },
  }


def setup_step(config):
  model = build_model(config.model)
  _, state, constants, tx, _ = train_step.init_train_state(config, model, jax.random.PRNGKey(0), 10)
  step = jax.jit(train_step.make_train_step(model, tx, train_step.criterion(config)))
  return state, constants, step


@pytest.fixture(scope='module')
def tiny_step():
  """setup_step(tiny_config() with lr 1e-3): one compilation for the tests below (the
  jitted step does not donate, so each test starts from the same initial state)."""
  config = tiny_config()
  config.optim.update(lr=1e-3, lr_backbone=1e-3)
  return setup_step(config)


def test_train_steps_lower_the_loss_on_a_fixed_batch(tiny_step):
  state, constants, step = tiny_step
  batch = jax.tree_util.tree_map(jnp.asarray, fixed_batch())
  rng = jax.random.PRNGKey(0)
  losses = []
  for _ in range(8):
    state, metrics = step(state, constants, batch, rng)
    assert bool(metrics['finite'])
    losses.append(float(metrics['loss']))
  assert int(state['step']) == 8
  assert losses[-1] < 0.9 * losses[0], losses


def test_frozen_backbone_has_no_gradient_or_optimizer_state():
  config = pretrain.get_config()  # release: the whole CNN frozen
  config.model.update(
    backbone='resnet_tiny',
    hidden_dim=32,
    nheads=2,
    enc_layers=1,
    dec_layers=1,
    dim_feedforward=64,
    num_queries=8,
    num_patches=2,
  )
  config.loss_replicas = 1
  state, constants, step = setup_step(config)
  assert 'body' not in state['params'] and 'body' in constants['frozen']
  opt_paths = jax.tree_util.tree_flatten_with_path(state['opt_state'])[0]
  assert not any('body' in jax.tree_util.keystr(p) for p, _ in opt_paths)
  state, metrics = step(
    state, constants, jax.tree_util.tree_map(jnp.asarray, fixed_batch()), jax.random.PRNGKey(0)
  )
  assert bool(metrics['finite'])
  assert 'body' not in state['params']


def test_learned_position_embedding_is_in_the_backbone_group():
  """The release's parameter groups put ``backbone.1.row_embed`` / ``col_embed`` with
  the backbone: frozen in pre-training, lr_backbone in fine-tuning."""
  from updetr_jax.configs import finetune_coco  # noqa: PLC0415

  config = pretrain.get_config()
  config.model.update(
    backbone='resnet_tiny',
    hidden_dim=32,
    nheads=2,
    enc_layers=1,
    dec_layers=1,
    dim_feedforward=64,
    num_queries=8,
    num_patches=2,
    position_embedding='learned',
  )
  state, constants, _ = setup_step(config)
  assert 'position' not in state['params'] and 'position' in constants['frozen']
  config = finetune_coco.get_config()
  config.model.update(
    backbone='resnet_tiny',
    hidden_dim=32,
    nheads=2,
    enc_layers=1,
    dec_layers=1,
    dim_feedforward=64,
    num_queries=8,
    num_classes=3,
    position_embedding='learned',
  )
  config.optim.update(lr=1e-2, lr_backbone=0.0)  # only the non-backbone group moves
  model = build_model(config.model)
  _, state, constants, tx, _ = train_step.init_train_state(config, model, jax.random.PRNGKey(0), 10)
  assert 'position' in state['params']
  grads = jax.tree_util.tree_map(jnp.ones_like, state['params'])
  updates, _ = jax.jit(tx.update)(grads, state['opt_state'], state['params'])  # fast
  assert float(jnp.abs(updates['position']['row_embed']).max()) == 0.0
  assert float(jnp.abs(updates['query_embed']['embedding']).max()) > 0.0


def test_non_finite_loss_leaves_state_unchanged_and_stops(tiny_step):
  state, constants, step = tiny_step
  batch = fixed_batch()
  batch['images'][1, 3, 3, 0] = np.nan
  before = jax.tree_util.tree_map(np.asarray, state['params'])
  state, metrics = step(
    state, constants, jax.tree_util.tree_map(jnp.asarray, batch), jax.random.PRNGKey(0)
  )
  assert not bool(metrics['finite'])
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, before, jax.tree_util.tree_map(np.asarray, state['params'])
  )
  with pytest.raises(FloatingPointError, match='non-finite training loss at step 1'):
    train_step.check_finite(jax.device_get(metrics), 1)


def _main_cmd(workdir, steps, extra=(), signal_at=None):
  """The training command; signal_at=(signal name, 'logged' | 'saving', step): the run
  sends itself that signal at that point (see _SIGNAL_AT)."""
  entry = ['-m', 'updetr_jax.main']
  if signal_at is not None:
    entry = ['-c', _SIGNAL_AT, *(str(a) for a in signal_at), 'updetr_jax.main']
  return [
    sys.executable,
    *entry,
    '--config=configs/pretrain.py:demo',
    f'--workdir={workdir}',
    f'--config.num_train_steps={steps}',
    '--config.checkpoint_every_steps=2',
    '--config.log_every_steps=1',
    *TINY_OVERRIDES,
    *extra,
  ]


# python -c _SIGNAL_AT SIGNAL POINT STEP MODULE [its flags]: the entry point MODULE
# (updetr_jax.main, updetr_jax.ssl_backbone) that sends itself SIGNAL at a known point
# of the run, wherever the machine's load puts the steps in time: 'logged', once the
# metrics line of STEP is written; 'saving', once the (asynchronous) save of STEP has
# started. A real signal, to the product's handlers.
_SIGNAL_AT = textwrap.dedent("""
    import os, runpy, signal, sys
    from updetr_jax import checkpoints, train
    sig, point, at, module = signal.Signals[sys.argv[1]], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    if point == 'logged':
      logged = train.Progress.__call__
      def hooked(self, step, scalars):
        logged(self, step, scalars)
        if step == at:
          os.kill(os.getpid(), sig)
      train.Progress.__call__ = hooked
    elif point == 'saving':
      save = checkpoints.TrainCheckpoints.save
      def hooked(self, step, tree, **kwargs):
        saved = save(self, step, tree, **kwargs)
        if step == at:
          os.kill(os.getpid(), sig)
        return saved
      checkpoints.TrainCheckpoints.save = hooked
    else:
      raise ValueError(point)
    sys.argv = [module, *sys.argv[5:]]
    runpy.run_module(module, run_name='__main__', alter_sys=True)
""")


def _losses(workdir):
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      d = json.loads(line)
      out[d['step']] = d['loss']
  return out


def _env():
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  # Every compilation goes to the pytest run's cache (conftest): the interrupted runs and
  # their reruns load the reference run's programs instead of compiling them again.
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  return env


STEPS = 8  # 3 epochs of the demo data here: every resumed run crosses an epoch
KILL_AT = 4  # SIGKILL with the save of this step in flight (step 2 committed)
TERM_AT = 3  # SIGTERM once this step is logged (periodic saves every 100: none yet)


@pytest.fixture(scope='module')
def reference_losses(tmp_path_factory):
  """Losses of an uninterrupted run of STEPS steps."""
  ref_dir = tmp_path_factory.mktemp('ref')
  subprocess.run(
    _main_cmd(ref_dir, STEPS), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=600
  )
  ref = _losses(ref_dir)
  assert sorted(ref) == list(range(1, STEPS + 1))
  return ref


def test_sigkill_and_rerun_gives_the_uninterrupted_losses(tmp_path, reference_losses):
  steps, ref = STEPS, reference_losses
  run_dir = tmp_path / 'run'
  killed = subprocess.run(
    _main_cmd(run_dir, steps, signal_at=('SIGKILL', 'saving', KILL_AT)),
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  killed_at = max(_losses(run_dir))
  assert killed_at < steps, 'the run finished before it was killed; nothing was tested'

  subprocess.run(
    _main_cmd(run_dir, steps), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=600
  )
  resumed = _losses(run_dir)  # later lines (the rerun) overwrite the killed run's
  assert sorted(resumed) == list(range(1, steps + 1))
  for s in range(1, steps + 1):
    np.testing.assert_allclose(resumed[s], ref[s], rtol=1e-6, err_msg=f'step {s}')


def test_sigterm_checkpoints_the_current_step_exits_0_and_resumes(tmp_path, reference_losses):
  """A preemption notice saves the step being trained (not the last periodic one)."""
  run_dir = tmp_path / 'run'
  cmd = _main_cmd(run_dir, STEPS, ['--config.checkpoint_every_steps=100'])
  proc = subprocess.run(
    _main_cmd(
      run_dir, STEPS, ['--config.checkpoint_every_steps=100'], ('SIGTERM', 'logged', TERM_AT)
    ),
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  err = proc.stderr
  assert proc.returncode == 0, err[-3000:]
  stopped_at = max(_losses(run_dir))
  assert 3 <= stopped_at < STEPS, 'the run finished before the signal; nothing was tested'
  saved = sorted(int(d) for d in os.listdir(run_dir / 'checkpoints') if d.isdigit())
  assert saved == [stopped_at], saved  # the current step, with periodic saves every 100
  assert f'saved step {stopped_at}' in err

  rerun = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f'at step {stopped_at}' in rerun.stderr
  resumed = _losses(run_dir)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  for s in range(1, STEPS + 1):
    np.testing.assert_allclose(resumed[s], reference_losses[s], rtol=1e-6, err_msg=f'step {s}')


_DEVICES_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from test_train import tiny_config, fixed_batch, setup_step
    from updetr_jax import sharding
    from jax.sharding import NamedSharding, PartitionSpec as P
    config = tiny_config(); config.batch_size = 8
    state, constants, step = setup_step(config)
    mesh = sharding.make_mesh()
    repl = NamedSharding(mesh, P())
    state, constants = jax.device_put((state, constants), repl)
    batch = sharding.to_global(fixed_batch(batch=8), NamedSharding(mesh, P('data')))
    out = []
    for _ in range(3):
      state, m = step(state, constants, batch, jax.random.PRNGKey(0))
      out.append(float(m['loss']))
    print(json.dumps({{'devices': jax.device_count(), 'losses': out}}))
""")


def _run_devices(n):
  env = _env()
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={n}'
  script = _DEVICES_SCRIPT.format(root=ROOT, tests=os.path.dirname(__file__))
  res = subprocess.run(
    [sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=600, check=True
  )
  return json.loads(res.stdout.strip().splitlines()[-1])


def test_eight_fake_devices_give_the_one_device_loss():
  one, eight = _run_devices(1), _run_devices(8)
  assert one['devices'] == 1 and eight['devices'] == 8
  np.testing.assert_allclose(eight['losses'], one['losses'], rtol=1e-5)


def _feature_grads(config):
  """Gradients of the feature-reconstruction loss alone w.r.t. the trainable params,
  (without, with) a stop-gradient on the target ``gt_feature``: one initialisation,
  jitted (compiled as a whole, much faster here than op by op; the stop-gradient
  lowers to nothing, so where it changes nothing the two programs are the same)."""
  config.loss.update(weight_ce=0.0, weight_bbox=0.0, weight_giou=0.0, weight_feature=1.0)
  model = build_model(config.model)
  _, state, constants, _, _ = train_step.init_train_state(config, model, jax.random.PRNGKey(0), 10)
  batch = jax.tree_util.tree_map(jnp.asarray, fixed_batch())
  loss_fn = train_step.criterion(config)

  def loss_of(params, stop_target):
    out = model.apply(
      train_step.full_variables(dict(state, params=params), constants),
      batch['images'],
      batch['padding_mask'],
      batch['patches'],
      train=False,
    )
    if stop_target:
      out = dict(out, gt_feature=jax.lax.stop_gradient(out['gt_feature']))
    return loss_fn(out, batch['targets'])[0]

  grad = jax.jit(jax.grad(loss_of), static_argnums=1)
  return grad(state['params'], False), grad(state['params'], True)


def test_feature_target_gradient_as_in_the_release():
  """The release does not detach gt_feature: with a trainable CNN the feature loss
  trains the CNN through the target too; with the frozen CNN nothing changes."""
  config = tiny_config()
  config.loss_replicas = 1
  config.optim.frozen = ()  # CNN trains ("feature reconstruction without frozen CNN")
  free, stopped = _feature_grads(config)
  diff = jax.tree_util.tree_map(
    lambda a, b: float(jnp.abs(a - b).max()), free['body'], stopped['body']
  )
  assert max(jax.tree_util.tree_leaves(diff)) > 1e-6  # the target path reaches the CNN
  config = tiny_config()
  config.loss_replicas = 1  # frozen CNN (the default): identical gradients
  free, stopped = _feature_grads(config)
  assert 'body' not in free
  jax.tree_util.tree_map(np.testing.assert_array_equal, free, stopped)
