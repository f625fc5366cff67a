"""Multi-host: 2 processes x 4 fake CPU devices (JAX's multi-controller runtime over
127.0.0.1) train like 1 process x 8 devices, and each layout resumes the other's
checkpoint. Also the single-host / argument rules of ``distributed.maybe_initialize``.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data_helpers import change_saved_values  # noqa: E402
from test_train import TINY_OVERRIDES  # noqa: E402

from updetr_jax import distributed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
DEVICES = 8  # global, in both layouts; the global batch gives each device 1 example
TIMEOUT = 900  # seconds, per phase (two jobs side by side)


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(local_devices: int, cache_dir) -> dict:
  env = dict(
    os.environ,
    PYTHONPATH=ROOT,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={local_devices}',
    # The resumed runs reuse the other phase's compilations of their layout.
    JAX_COMPILATION_CACHE_DIR=str(cache_dir),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
  )
  for k in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(k, None)
  return env


class Job:
  """One training job (``processes`` x ``8 / processes`` devices) as subprocesses."""

  def __init__(
    self, workdir, steps: int, processes: int, log_dir, cache_dir, checkpoint_every: int = 1000
  ):
    self.workdir, self.processes = workdir, processes
    cmd = [
      sys.executable,
      '-m',
      'updetr_jax.main',
      '--config=configs/pretrain.py:demo',
      f'--workdir={workdir}',
      *TINY_OVERRIDES,
      f'--config.batch_size={DEVICES}',
      f'--config.num_train_steps={steps}',
      '--config.log_every_steps=1',
      f'--config.checkpoint_every_steps={checkpoint_every}',
      '--config.keep_checkpoints=5',
    ]
    port = _free_port()
    env = _env(DEVICES // processes, cache_dir)
    self.logs, self.procs = [], []
    for i in range(processes):
      extra = (
        [
          f'--coordinator_address=127.0.0.1:{port}',
          f'--num_processes={processes}',
          f'--process_id={i}',
        ]
        if processes > 1
        else []
      )
      log = os.path.join(log_dir, f'{os.path.basename(workdir)}_{steps}_{processes}x_p{i}.log')
      self.logs.append(log)
      with open(log, 'w') as f:  # files, not pipes: the chatty children never block
        self.procs.append(
          subprocess.Popen(cmd + extra, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        )

  def log(self, i: int) -> str:
    with open(self.logs[i]) as f:
      return f.read()

  def failure(self) -> str | None:
    """None while all processes run or succeeded, else a report with their logs."""
    codes = [p.poll() for p in self.procs]
    if all(c in (None, 0) for c in codes):
      return None
    return '\n'.join(
      f'--- {self.workdir} process {i} (exit {c}), last output:\n{self.log(i)[-6000:]}'
      for i, c in enumerate(codes)
    )

  def done(self) -> bool:
    return all(p.poll() == 0 for p in self.procs)

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _wait_all(job, timeout=TIMEOUT) -> list[int]:
  """Exit codes of the job's processes (killed at the timeout)."""
  deadline = time.time() + timeout
  try:
    while any(p.poll() is None for p in job.procs) and time.time() < deadline:
      time.sleep(0.2)
  finally:
    job.kill()
  return [p.returncode for p in job.procs]


def _run_together(*jobs, timeout=TIMEOUT):
  """Waits for the jobs; on a failure or timeout kills them all and fails the test."""
  deadline = time.time() + timeout
  try:
    while not all(j.done() for j in jobs):
      for j in jobs:
        report = j.failure()
        if report:
          pytest.fail(f'a training process failed:\n{report}')
      if time.time() > deadline:
        pytest.fail(
          f'timed out after {timeout} s:\n'
          + '\n'.join(
            j.failure() or '\n'.join(j.log(i)[-3000:] for i in range(j.processes)) for j in jobs
          )
        )
      time.sleep(0.2)
  finally:
    for j in jobs:
      j.kill()


def _metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _losses(workdir) -> dict:
  return {d['step']: d['loss'] for d in _metrics(workdir)}


def _checkpoint_steps(workdir) -> list[int]:
  d = os.path.join(workdir, 'checkpoints')
  return sorted(
    int(s)
    for s in os.listdir(d)
    if s.isdigit() and os.path.exists(os.path.join(d, s, '_CHECKPOINT_METADATA'))
  )


def test_two_processes_train_like_one_and_resume_each_other(tmp_path):
  a, b = str(tmp_path / 'two_procs'), str(tmp_path / 'one_proc')
  logs, cache = tmp_path / 'logs', tmp_path / 'jax_cache'
  logs.mkdir()
  t0 = time.time()

  # Fresh runs: A as 2 processes x 4 devices, B as 1 process x 8 devices.
  job_a = Job(a, STEPS, 2, logs, cache)
  job_b = Job(b, STEPS, 1, logs, cache)
  _run_together(job_a, job_b)
  t1 = time.time()
  for i in range(2):
    assert f'process {i} of 2, 4 local of 8 global devices' in job_a.log(i), job_a.log(i)
  # Process 0 alone writes the metrics: one line per step, not one per process.
  assert [d['step'] for d in _metrics(a)] == list(range(1, STEPS + 1))
  for w in (a, b):
    assert os.path.exists(os.path.join(w, 'config.json'))
    assert os.path.exists(os.path.join(w, 'summary.json'))
    assert _checkpoint_steps(w)[-1] == STEPS
  two, one = _losses(a), _losses(b)
  np.testing.assert_allclose(
    [two[s] for s in range(1, STEPS + 1)], [one[s] for s in range(1, STEPS + 1)], rtol=1e-5
  )

  # Swap the layouts: A's 2-process checkpoint resumes as 1 x 8, B's 1-process
  # checkpoint as 2 x 4, one more step each.
  job_a = Job(a, STEPS + 1, 1, logs, cache)
  job_b = Job(b, STEPS + 1, 2, logs, cache)
  _run_together(job_a, job_b)
  t2 = time.time()
  assert f'at step {STEPS}' in job_a.log(0), job_a.log(0)
  for i in range(2):
    assert f'at step {STEPS}' in job_b.log(i), job_b.log(i)
  assert [d['step'] for d in _metrics(b)] == list(range(1, STEPS + 2))
  for w in (a, b):
    assert _checkpoint_steps(w)[-1] == STEPS + 1
  resumed_a, resumed_b = _losses(a)[STEPS + 1], _losses(b)[STEPS + 1]
  np.testing.assert_allclose(resumed_a, resumed_b, rtol=1e-5)
  print(
    f'fresh runs {t1 - t0:.0f} s, resumed runs {t2 - t1:.0f} s; losses '
    f'{[one[s] for s in range(1, STEPS + 1)]} then {resumed_a}'
  )


def test_two_processes_fall_back_from_a_corrupt_newest_step_together(tmp_path):
  """Every process verifies, they agree on the newest intact step, process 0 moves the
  corrupt one aside; with no intact step left, every process stops (no fresh start)."""
  workdir, logs, cache = str(tmp_path / 'run'), tmp_path / 'logs', tmp_path / 'jax_cache'
  logs.mkdir()
  _run_together(Job(workdir, STEPS, 2, logs, cache, checkpoint_every=1))
  assert _checkpoint_steps(workdir) == list(range(1, STEPS + 1))
  first = _losses(workdir)
  # Other values of one array, read back by Orbax without error: only the checksums
  # tell, computed across the processes (a collective) and agreed on by all of them.
  changed = change_saved_values(os.path.join(workdir, 'checkpoints', str(STEPS)), 'state/params/')

  job = Job(workdir, STEPS + 1, 2, logs, cache, checkpoint_every=1)
  _run_together(job)
  for i in range(2):
    log = job.log(i)
    assert f'step {STEPS} is corrupt or incomplete' in log, log
    assert f'{changed}: values differ from those saved' in log, log
    assert f'at step {STEPS - 1}' in log, log  # resumed from the newest intact step
  assert os.path.isdir(os.path.join(workdir, 'corrupt_checkpoints', str(STEPS)))
  with open(os.path.join(workdir, 'summary.json')) as f:
    moved = json.load(f)['corrupt_checkpoints_moved_to']
  assert [os.path.relpath(p, workdir) for p in moved] == [f'corrupt_checkpoints/{STEPS}']
  resumed = _losses(workdir)
  np.testing.assert_allclose(resumed[STEPS], first[STEPS], rtol=1e-5)  # step 3 retrained
  assert _checkpoint_steps(workdir)[-1] == STEPS + 1

  for step in _checkpoint_steps(workdir):  # now no step is intact
    os.remove(os.path.join(workdir, 'checkpoints', str(step), '_CHECKPOINT_METADATA'))
  job = Job(workdir, STEPS + 2, 2, logs, cache, checkpoint_every=1)
  codes = _wait_all(job)
  for i in range(2):
    assert codes[i] != 0 and 'no step is intact' in job.log(i), (codes, job.log(i)[-3000:])
  assert max(_losses(workdir)) == STEPS + 1  # nothing trained from scratch


def test_single_host_is_left_alone(monkeypatch):
  for k in (
    'JAX_COORDINATOR_ADDRESS',
    'JAX_NUM_PROCESSES',
    'JAX_PROCESS_ID',
    'SLURM_NTASKS',
    'OMPI_MCA_orte_hnp_uri',
    'MEGASCALE_COORDINATOR_ADDRESS',
    'TPU_WORKER_HOSTNAMES',
    'TPU_PROCESS_ADDRESSES',
  ):
    monkeypatch.delenv(k, raising=False)
  monkeypatch.setattr(distributed, '_on_tpu_vm', lambda: False)
  called = []
  monkeypatch.setattr(
    distributed.jax.distributed, 'initialize', lambda *a, **k: called.append((a, k))
  )
  assert distributed.maybe_initialize() is False
  assert distributed.maybe_initialize('127.0.0.1:1234', 1, 0) is False  # one process
  assert not called


def test_partial_arguments_name_the_missing_ones(monkeypatch):
  monkeypatch.setattr(
    distributed.jax.distributed, 'initialize', lambda *a, **k: pytest.fail('must not initialise')
  )
  with pytest.raises(ValueError, match='missing: num_processes, process_id'):
    distributed.maybe_initialize(coordinator_address='127.0.0.1:1234')
  with pytest.raises(ValueError, match=r'process_id=2 must be in \[0, num_processes=2\)'):
    distributed.maybe_initialize('127.0.0.1:1234', 2, 2)
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.delenv('JAX_PROCESS_ID', raising=False)
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS', raising=False)
  with pytest.raises(ValueError, match='missing: JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID'):
    distributed.maybe_initialize()


@pytest.mark.parametrize(
  'env, cluster',
  [
    (
      {
        'SLURM_JOB_ID': '7',
        'SLURM_STEP_NODELIST': 'n[1-2]',
        'SLURM_NTASKS': '2',
        'SLURM_PROCID': '1',
        'SLURM_LOCALID': '0',
      },
      'slurm',
    ),
    (
      {
        'SLURM_JOB_ID': '7',
        'SLURM_STEP_NODELIST': 'n1',
        'SLURM_NTASKS': '1',
        'SLURM_PROCID': '0',
        'SLURM_LOCALID': '0',
      },
      None,
    ),
    ({'TPU_WORKER_HOSTNAMES': 'w-0,w-1,w-2,w-3'}, 'tpu pod slice'),
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, None),
    ({'MEGASCALE_COORDINATOR_ADDRESS': '10.0.0.2'}, 'tpu multi-slice'),
    ({'OMPI_MCA_orte_hnp_uri': 'x', 'OMPI_COMM_WORLD_SIZE': '4'}, 'ompi'),
  ],
)
def test_cluster_detection_from_the_environment(env, cluster, monkeypatch):
  monkeypatch.setattr(distributed, '_on_tpu_vm', lambda: False)
  assert distributed._cluster_from_env(env) == cluster
  kwargs, _ = distributed._arguments(None, None, None, env)
  assert kwargs == ({} if cluster else None)  # {}: JAX's own detection fills them in
