"""launch/*.sh: the commands each script prints under --dry-run, and its errors."""

import os
import re
import shlex
import subprocess
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = ('--name', 'tpu1', '--zone', 'us-central2-b')
SCRIPTS = (
  'tpu_create.sh',
  'tpu_setup.sh',
  'tpu_run.sh',
  'tpu_logs.sh',
  'tpu_stop.sh',
  'tpu_delete.sh',
  'gpu_run.sh',
)


_STUBS = []  # a directory with a `gcloud` that fails, first on PATH


@pytest.fixture(autouse=True, scope='module')
def _no_real_gcloud(tmp_path_factory):
  """A test that forgets --dry-run must not reach the real gcloud."""
  stubs = tmp_path_factory.mktemp('stubs')
  (stubs / 'gcloud').write_text('#!/bin/sh\necho "gcloud stub: $*" >&2\nexit 97\n')
  (stubs / 'gcloud').chmod(0o755)
  _STUBS.append(str(stubs))
  yield
  _STUBS.pop()


def _script(name, *args, env=None):
  """Runs launch/NAME with a clean TPU_* environment; returns the CompletedProcess."""
  clean = {k: v for k, v in os.environ.items() if not k.startswith('TPU_')}
  clean['PATH'] = os.pathsep.join([*_STUBS, clean.get('PATH', '')])
  clean.update(env or {})
  return subprocess.run(
    ['bash', os.path.join(ROOT, 'launch', name), *args],
    capture_output=True,
    text=True,
    env=clean,
    timeout=60,
    check=False,
  )


def _dry_run(name, *args, env=None):
  """The commands printed by NAME --dry-run, each as an argv list."""
  proc = _script(name, '--dry-run', *args, env=env)
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.splitlines()]


def _remote(argv):
  """The words of the --command=... of a `gcloud ... ssh` argv."""
  (command,) = [a for a in argv if a.startswith('--command=')]
  lexer = shlex.shlex(command[len('--command=') :], posix=True, punctuation_chars=True)
  lexer.whitespace_split = True  # ';', '&&', '>' ... come out as words of their own
  return list(lexer)


def _jax_pin():
  with open(os.path.join(ROOT, 'requirements.txt')) as f:
    return re.search(r'^jax==(\S+)', f.read(), re.M).group(1)


def test_create():
  (argv,) = _dry_run(
    'tpu_create.sh', *TPU, '--accelerator-type', 'v4-32', '--spot', '--project=proj'
  )
  assert argv[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'tpu1']
  assert {
    '--zone=us-central2-b',
    '--project=proj',
    '--accelerator-type=v4-32',
    '--version=tpu-ubuntu2204-base',
    '--spot',
  } == set(argv[6:])
  (argv,) = _dry_run(
    'tpu_create.sh',
    *TPU,
    '--accelerator-type=v4-8',
    '--preemptible',
    '--version',
    'my-runtime',
    '--',
    '--reserved',
  )
  assert argv[-3:] == ['--version=my-runtime', '--preemptible', '--reserved']
  proc = _script('tpu_create.sh', *TPU, '--accelerator-type=v4-8', '--spot', '--preemptible')
  assert proc.returncode != 0 and 'exclusive' in proc.stderr


@pytest.mark.parametrize(
  'accelerator, version',
  [
    ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v5p-32', 'v2-alpha-tpuv5'),
    ('v6e-8', 'v2-alpha-tpuv6e'),
    ('v3-8', 'tpu-ubuntu2204-base'),
  ],
)
def test_create_default_runtime(accelerator, version):
  (argv,) = _dry_run('tpu_create.sh', *TPU, '--accelerator-type', accelerator)
  assert f'--version={version}' in argv


def test_names_from_environment():
  (argv,) = _dry_run('tpu_delete.sh', env={'TPU_NAME': 'envtpu', 'TPU_ZONE': 'europe-west4-a'})
  assert argv == [
    'gcloud',
    'compute',
    'tpus',
    'tpu-vm',
    'delete',
    'envtpu',
    '--zone=europe-west4-a',
    '--quiet',
  ]


def test_setup_from_git():
  url = 'https://github.com/someone/updetr-jax.git'
  (argv,) = _dry_run('tpu_setup.sh', *TPU, '--repo', url, '--branch', 'v1')
  assert argv[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'tpu1']
  assert '--worker=all' in argv and '--zone=us-central2-b' in argv
  words = _remote(argv)
  clone = words.index('clone')
  assert words[clone - 1 : clone + 5] == ['git', 'clone', '--branch', 'v1', url, 'updetr-jax']
  assert 'python3.11' in words and '.venv' in words
  pin = _jax_pin()
  assert pin == '0.10.2'
  i = words.index('requirements.txt')
  assert words[i - 4 : i + 3] == [
    '.venv/bin/pip',
    'install',
    '-q',
    '-r',
    'requirements.txt',
    f'jax[tpu]=={pin}',
    ';',
  ]


def test_setup_copy(tmp_path):
  create_tar, scp, ssh = _dry_run('tpu_setup.sh', *TPU, '--copy', env={'TMPDIR': str(tmp_path)})
  tarball = str(tmp_path / 'updetr-jax-tpu1.tar.gz')
  assert create_tar[:2] == ['bash', '-c'] and tarball in create_tar[2]
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert scp[5:7] == [tarball, 'tpu1:updetr-jax.tar.gz'] and '--worker=all' in scp
  words = _remote(ssh)
  assert '--worker=all' in ssh and 'tar' in words and f'jax[tpu]=={_jax_pin()}' in words
  # The packing step itself: tracked and untracked files, ignored ones left out.
  subprocess.run(create_tar, check=True, timeout=60)
  with tarfile.open(tarball) as tar:
    names = {os.path.normpath(n) for n in tar.getnames()}
  assert {'requirements.txt', 'launch/common.sh', 'updetr_jax/main.py'} <= names
  assert not any(n.startswith(('.venv', '.git/')) or '__pycache__' in n for n in names)


def test_setup_needs_a_source():
  proc = _script('tpu_setup.sh', *TPU)
  assert proc.returncode != 0 and '--repo' in proc.stderr
  proc = _script('tpu_setup.sh', *TPU, '--repo', 'u', '--copy')
  assert proc.returncode != 0 and 'exclusive' in proc.stderr


def test_run():
  lr_drop = '--config.optim.lr_drop_epochs=(40,)'
  (argv,) = _dry_run(
    'tpu_run.sh',
    *TPU,
    '--config',
    'configs/pretrain.py:single_query',
    '--workdir=gs://bucket/updetr/run1',
    '--tfds-data-dir',
    'gs://bucket/tfds',
    '--config.batch_size=64',
    lr_drop,
  )
  assert argv[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'tpu1']
  assert '--worker=all' in argv
  words = _remote(argv)
  assert words.index('TFDS_DATA_DIR=gs://bucket/tfds') < words.index('nohup')
  main = words.index('nohup') + 1
  assert words[main : main + 7] == [
    '.venv/bin/python',
    '-m',
    'updetr_jax.main',
    '--config=configs/pretrain.py:single_query',
    '--workdir=gs://bucket/updetr/run1',
    '--config.batch_size=64',
    lr_drop,
  ]
  assert words[main + 7 : main + 9] == ['>', 'logs/train.log'] and '&' in words
  assert not any('coordinator' in w for w in words)  # TPU pods find each other


def test_run_without_tfds_dir_warns_on_local_workdir():
  proc = _script(
    'tpu_run.sh',
    '--dry-run',
    *TPU,
    '--config=configs/pretrain.py',
    '--workdir=/tmp/w',
    '--',
    '--flagfile=f',
  )
  assert proc.returncode == 0 and 'not on GCS' in proc.stderr
  words = _remote(shlex.split(proc.stdout))
  assert 'TFDS_DATA_DIR' not in ' '.join(words) and '--flagfile=f' in words


def test_logs_stop_delete():
  (argv,) = _dry_run('tpu_logs.sh', *TPU)
  assert '--worker=0' in argv
  assert _remote(argv) == ['tail', '-n', '100', '-F', 'updetr-jax/logs/train.log']
  (argv,) = _dry_run('tpu_logs.sh', *TPU, '--worker=all', '--lines', '5')
  assert '--worker=all' in argv and _remote(argv)[:3] == ['tail', '-n', '5']
  (argv,) = _dry_run('tpu_stop.sh', *TPU)
  assert '--worker=all' in argv and 'kill' in _remote(argv)
  (argv,) = _dry_run('tpu_delete.sh', *TPU, '--project', 'proj')
  assert argv == [
    'gcloud',
    'compute',
    'tpus',
    'tpu-vm',
    'delete',
    'tpu1',
    '--zone=us-central2-b',
    '--project=proj',
    '--quiet',
  ]


def test_gpu_run_single_node():
  (argv,) = _dry_run(
    'gpu_run.sh',
    '--config=configs/pretrain.py:demo',
    '--workdir',
    '/tmp/w',
    '--gpus',
    '0,1',
    '--mem-fraction=0.9',
    '--config.batch_size=8',
  )
  assert argv[0] == 'env'
  main = argv.index('-m')
  env = argv[1 : main - 1]
  assert f'PYTHONPATH={ROOT}' in env
  assert {'CUDA_VISIBLE_DEVICES=0,1', 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9'} <= set(env)
  assert argv[main:] == [
    '-m',
    'updetr_jax.main',
    '--config=configs/pretrain.py:demo',
    '--workdir=/tmp/w',
    '--config.batch_size=8',
  ]


def test_gpu_run_multi_node_forwards_flags():
  (argv,) = _dry_run(
    'gpu_run.sh',
    '--config=c.py',
    '--workdir=w',
    '--num-processes',
    '2',
    '--coordinator=10.0.0.1:1234',
    '--process-id',
    '1',
    '--python=py',
  )
  assert argv[argv.index('py') :] == [
    'py',
    '-m',
    'updetr_jax.main',
    '--config=c.py',
    '--workdir=w',
    '--coordinator_address=10.0.0.1:1234',
    '--num_processes=2',
    '--process_id=1',
  ]
  proc = _script(
    'gpu_run.sh', '--config=c.py', '--workdir=w', '--num-processes=2', '--process-id=0'
  )
  assert proc.returncode != 0 and '--coordinator' in proc.stderr
  proc = _script(
    'gpu_run.sh',
    '--config=c.py',
    '--workdir=w',
    '--num-processes=2',
    '--coordinator=h:1',
    '--process-id=2',
  )
  assert proc.returncode != 0 and '--process-id' in proc.stderr


def test_gpu_run_runs_the_command():
  proc = _script('gpu_run.sh', '--config=c.py', '--workdir=w', '--python=echo', '--config.x=a b')
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == [
    '-m',
    'updetr_jax.main',
    '--config=c.py',
    '--workdir=w',
    '--config.x=a',
    'b',
  ]


@pytest.mark.parametrize(
  'script, args, missing',
  [
    ('tpu_create.sh', ('--zone=z', '--accelerator-type=v4-8'), '--name'),
    ('tpu_create.sh', ('--name=n', '--accelerator-type=v4-8'), '--zone'),
    ('tpu_create.sh', TPU, '--accelerator-type'),
    ('tpu_setup.sh', ('--zone=z', '--copy'), '--name'),
    ('tpu_run.sh', (*TPU, '--workdir=gs://b/w'), '--config'),
    ('tpu_run.sh', (*TPU, '--config=configs/pretrain.py'), '--workdir'),
    ('tpu_logs.sh', ('--name=n',), '--zone'),
    ('tpu_delete.sh', ('--zone=z',), '--name'),
    ('gpu_run.sh', ('--workdir=w',), '--config'),
    ('gpu_run.sh', ('--config=c',), '--workdir'),
  ],
)
def test_missing_required_argument(script, args, missing):
  proc = _script(script, '--dry-run', *args)
  assert proc.returncode != 0 and not proc.stdout
  assert f'missing required argument {missing}' in proc.stderr


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_and_unknown_argument(script):
  proc = _script(script, '--help')
  assert proc.returncode == 0 and 'Usage: launch/' + script in proc.stdout
  assert '--dry-run' in proc.stdout
  proc = _script(script, '--no-such-flag')
  assert proc.returncode != 0 and '--no-such-flag' in proc.stderr
  proc = _script(script, '--zone' if script != 'gpu_run.sh' else '--workdir')
  assert proc.returncode != 0 and 'needs a value' in proc.stderr
