"""The documentation's commands run as written, and the docs speak to users.

Every shell block of README.md and docs/**/*.md is read as a user would copy it:
- each ``make`` target exists in the Makefile;
- each ``--config=FILE[:variant]`` loads through ml_collections' config flag (as the
  entry points load it) with the command's ``--config.a.b=v`` overrides applied, so a
  misspelt field or a value of the wrong type fails here;
- each training command passes the start-up check that refuses a real-size CNN left
  at its random initialisation (``initial_weights.check_backbone_init``);
- each other ``--flag`` of a package module or benchmark script is a flag it defines;
- each ``launch/*.sh`` command passes ``--dry-run``.
It also checks the README's size and that its first 200 lines hold the two commands a
new user comes for, every relative link of the docs, and that no page, module or test
speaks of the team's process instead of the project.
"""

import functools
import glob
import os
import re
import shlex
import subprocess
import tempfile

import pytest
from absl import flags
from ml_collections import config_flags

from updetr_jax import initial_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
SHELL_LANGS = ('bash', 'sh', 'shell', 'console')
# Commands whose --config is a training config (updetr_jax.main and its launchers).
TRAINING = ('updetr_jax.main', 'updetr-train', 'launch/tpu_run.sh', 'launch/gpu_run.sh')
# Console scripts (pyproject.toml) and the modules they run.
SCRIPTS = {
  'updetr-train': 'main',
  'updetr-predict': 'predict',
  'updetr-import': 'torch_import',
  'updetr-export': 'export',
  'updetr-compare': 'compare',
  'updetr-ssl-backbone': 'ssl_backbone',
}
# Flags absl defines for every program.
ABSL_FLAGS = {
  'help',
  'helpfull',
  'helpshort',
  'helpxml',
  'flagfile',
  'undefok',
  'verbosity',
  'v',
  'logtostderr',
  'alsologtostderr',
  'log_dir',
  'stderrthreshold',
  'showprefixforinfo',
  'only_check_args',
  'pdb',
  'pdb_post_mortem',
  'run_with_pdb',
  'run_with_profiling',
  'use_cprofile_for_profiling',
  'profile_file',
}


def doc_files() -> list[str]:
  files = [README] + sorted(glob.glob(os.path.join(ROOT, 'docs', '**', '*.md'), recursive=True))
  return [f for f in files if os.path.isfile(f)]


def shell_blocks(path: str) -> list[tuple[int, str]]:
  """(first line number, text) of each fenced shell block of a markdown file."""
  blocks, lines, start, lang = [], None, 0, None
  with open(path) as f:
    for number, line in enumerate(f, 1):
      fence = re.match(r'^\s*```\s*(\S*)', line)
      if fence and lines is None:
        lines, start, lang = [], number + 1, fence.group(1).lower()
      elif fence and lines is not None:
        if lang in SHELL_LANGS:
          blocks.append((start, ''.join(lines)))
        lines = None
      elif lines is not None:
        lines.append(line)
  return blocks


def commands(path: str) -> list[tuple[str, list[str], dict]]:
  """(place, argv, exported environment) of each command in the file's shell blocks.

  Continuation lines are joined, comments dropped, and ``&&``, ``;`` and ``|`` split
  one line into several commands. ``export A=1 B=2`` lines set the environment of the
  commands after them in the same file.
  """
  out, env = [], {}
  rel = os.path.relpath(path, ROOT)
  for start, text in shell_blocks(path):
    text = re.sub(r'\\\n', ' ', text)
    for offset, line in enumerate(text.splitlines()):
      lexer = shlex.shlex(line, posix=True, punctuation_chars=';&|')
      lexer.whitespace_split = True
      lexer.commenters = '#'
      try:
        words = list(lexer)
      except ValueError as e:
        raise AssertionError(f'{rel}:{start + offset}: cannot split {line!r}: {e}') from e
      argv = []
      for word in words + [';']:
        if word in (';', '&&', '||', '|', '&'):
          if argv and argv[0] == 'export':
            env.update(a.split('=', 1) for a in argv[1:] if '=' in a)
          elif argv:
            out.append((f'{rel}:{start + offset}', argv, dict(env)))
          argv = []
        else:
          argv.append(word)
  return out


def all_commands():
  return [c for path in doc_files() for c in commands(path)]


def program(argv: list[str]) -> str:
  """What a command runs: 'make', 'updetr_jax.main', 'launch/tpu_run.sh', 'benchmarks/x.py'."""
  words = [w for w in argv if not re.fullmatch(r'[A-Z_][A-Z0-9_]*=.*', w)]  # VAR=value prefix
  if not words:
    return ''
  head = words[0]
  if head in ('python', 'python3', '.venv/bin/python') or head.endswith('/python'):
    if len(words) > 2 and words[1] == '-m':
      return words[2]
    return words[1] if len(words) > 1 else head
  if head == 'bash' and len(words) > 1:
    head = words[1]
  if head.startswith('./'):
    head = head[2:]
  if head in SCRIPTS:
    return head
  return head


def arguments(argv: list[str]) -> list[str]:
  """The words after the program (python -m X / bash X / X)."""
  prog = program(argv)
  for i, w in enumerate(argv):
    if w == prog or w.endswith('/' + prog) or w == './' + prog:
      return argv[i + 1 :]
  return argv[1:]


def config_words(args: list[str]) -> tuple[str | None, list[str]]:
  """The --config FILE[:variant] (path made absolute) and the --config.* overrides."""
  config, overrides, i = None, [], 0
  while i < len(args):
    w = args[i]
    if w == '--config' and i + 1 < len(args):
      config, i = args[i + 1], i + 2
      continue
    if w.startswith('--config='):
      config = w[len('--config=') :]
    elif w.startswith('--config.'):
      overrides.append(w)
    i += 1
  if config is not None and not os.path.isabs(config):
    config = os.path.join(ROOT, config)
  return config, overrides


def load_config(config: str, overrides: list[str]):
  """The config as the entry points load it (ml_collections' config flag)."""
  argv = ['prog', f'--config={config}', *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


@functools.cache
def makefile_targets() -> frozenset:
  with open(os.path.join(ROOT, 'Makefile')) as f:
    return frozenset(re.findall(r'^([A-Za-z0-9_.-]+)\s*:(?!=)', f.read(), re.M))


@functools.cache
def defined_flags(source: str) -> frozenset:
  """Flag names defined (absl or argparse) in a file or (a directory) the files under it."""
  paths = [source]
  if os.path.isdir(source):
    paths = glob.glob(os.path.join(source, '**', '*.py'), recursive=True)
  names = set()
  for p in paths:
    with open(p) as f:
      text = f.read()
    names.update(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", text))
    names.update(re.findall(r"add_argument\(\s*'--([\w-]+)'", text))
  return frozenset(names)


def check_command(argv: list[str], env: dict) -> list[str]:
  """Problems of one documented command (an empty list when it would run)."""
  prog = program(argv)
  args = arguments(argv)
  problems = []
  if prog == 'make':
    for target in args:
      if not target.startswith('-') and '=' not in target and target not in makefile_targets():
        problems.append(f'make target {target!r} is not in the Makefile')
    return problems

  module = None
  if prog.startswith('updetr_jax.'):
    module = prog.split('.', 1)[1]
  elif prog in SCRIPTS:
    module = SCRIPTS[prog]
  config, overrides = config_words(args)
  if config is not None:
    try:
      cfg = load_config(config, overrides)
    except Exception as e:  # noqa: BLE001 - any failure to load is the finding
      return [f'--config={os.path.relpath(config, ROOT)} {" ".join(overrides)}: {e}']
    if prog in TRAINING and 'model' in cfg and 'init' in cfg:
      try:
        initial_weights.check_backbone_init(cfg, resuming=False)
      except ValueError as e:
        problems.append(f'would be refused at start-up: {e}')

  if module is not None or re.match(r'benchmarks/.*\.(py|sh)$', prog):
    known = set(ABSL_FLAGS) | defined_flags(os.path.join(ROOT, 'updetr_jax'))
    if prog.startswith('benchmarks/'):
      script = os.path.join(ROOT, prog)
      if not os.path.isfile(script):
        return [f'{prog} does not exist']
      # A shell wrapper hands its arguments to the Python script of the same name.
      known |= defined_flags(os.path.splitext(script)[0] + '.py')
    elif not os.path.isfile(os.path.join(ROOT, 'updetr_jax', *module.split('.')) + '.py'):
      return [f'module updetr_jax.{module} does not exist']
    for w in args:
      name = re.match(r'--([A-Za-z_][\w-]*)', w)
      if not name or w.startswith('--config'):
        continue
      name = name.group(1)
      if name not in known and not (name.startswith('no') and name[2:] in known):
        problems.append(f'flag --{name} is not defined')

  if prog.startswith('launch/'):
    script = os.path.join(ROOT, prog)
    if not os.path.isfile(script):
      return [f'{prog} does not exist']
    problems += dry_run(prog, args, env)
  return problems


@functools.cache
def _stub_dir() -> str:
  """A folder with a ``gcloud`` that fails, put first on PATH: --dry-run must not reach it."""
  stubs = tempfile.mkdtemp(prefix='docs_test_stubs')
  with open(os.path.join(stubs, 'gcloud'), 'w') as f:
    f.write('#!/bin/sh\necho "gcloud stub: $*" >&2\nexit 97\n')
  os.chmod(os.path.join(stubs, 'gcloud'), 0o755)
  return stubs


def dry_run(prog: str, args: list[str], env: dict) -> list[str]:
  """A launch script's command under --dry-run, with a gcloud that fails if reached."""
  stubs = _stub_dir()
  clean = {k: v for k, v in os.environ.items() if not k.startswith('TPU_')}
  clean.update(env)
  clean['PATH'] = os.pathsep.join([stubs, clean.get('PATH', '')])
  extra = [] if '--dry-run' in args else ['--dry-run']
  # Options of the script go before a `--` that hands the rest to the program.
  if '--' in args:
    i = args.index('--')
    args = args[:i] + extra + args[i:]
  else:
    args = args + extra
  proc = subprocess.run(
    ['bash', os.path.join(ROOT, prog), *args],
    capture_output=True,
    text=True,
    env=clean,
    cwd=ROOT,
    timeout=60,
    check=False,
  )
  if proc.returncode != 0:
    return [f'{prog} --dry-run exited {proc.returncode}: {proc.stderr.strip()[-500:]}']
  return []


COMMANDS = all_commands()


@pytest.mark.parametrize(
  'place, argv, env', COMMANDS, ids=[f'{p}:{program(a)}' for p, a, _ in COMMANDS]
)
def test_documented_command_runs_as_written(place, argv, env):
  problems = check_command(argv, env)
  assert not problems, f'{place}: {shlex.join(argv)}\n  ' + '\n  '.join(problems)


def test_the_docs_have_commands():
  programs = {program(a) for _, a, _ in COMMANDS}
  for expected in ('make', 'updetr_jax.main', 'launch/tpu_run.sh', 'updetr_jax.predict'):
    assert expected in programs, f'no documented {expected} command found'


# ------------------------------------------------------------------ the checker itself


def _problems(block: str) -> list[str]:
  path = os.path.join(tempfile.mkdtemp(prefix='docs_test'), 'page.md')
  with open(path, 'w') as f:
    f.write(f'text\n\n```bash\n{block}\n```\n')
  return [p for _, argv, env in commands(path) for p in check_command(argv, env)]


def test_checker_finds_a_misspelt_field():
  good = 'python -m updetr_jax.main --config=configs/pretrain.py:demo --workdir=w \\\n'
  assert _problems(good + '    --config.optim.lr=1e-3') == []
  assert _problems(good + '    --config.optim.learning_rate=1e-3')
  assert _problems(good + '    --config.optim.lr=fast')  # a float field
  assert _problems('python -m updetr_jax.main --config=configs/pretrain.py:tiny --workdir=w')


def test_checker_finds_a_missing_make_target():
  assert _problems('make demo test') == []
  assert _problems('make demo pretrain-demo')


def test_checker_finds_a_refused_pre_training():
  cmd = 'python -m updetr_jax.main --config=configs/pretrain.py --workdir=/tmp/x'
  assert _problems(cmd)
  assert _problems(cmd + ' --config.init.backbone_checkpoint=swav.pth') == []
  assert _problems(cmd + ' --config.init.random_backbone=True') == []
  launch = 'launch/gpu_run.sh --config configs/pretrain.py --workdir /data/run'
  assert _problems(launch)
  assert _problems(launch + ' --config.init.backbone_checkpoint=swav.pth') == []


def test_checker_finds_an_unknown_flag_and_a_failing_launch():
  assert _problems('python -m updetr_jax.predict --workdir=w --threshold=0.5 a.jpg') == []
  assert _problems('python -m updetr_jax.predict --workdir=w --treshold=0.5 a.jpg')
  assert _problems('launch/tpu_delete.sh --name t --zone z') == []
  assert _problems('launch/tpu_delete.sh --name t --zone z --colour=blue')


# ------------------------------------------------------------------ the README and links


def test_readme_is_a_guide():
  with open(README) as f:
    text = f.read()
  lines = text.splitlines()
  assert len(lines) <= 350, f'README.md has {len(lines)} lines (at most 350)'
  assert len(text.split()) <= 4000, f'README.md has {len(text.split())} words (at most 4,000)'
  assert re.search(r'^#+ .*contents', text, re.M | re.I), 'README.md has no table of contents'
  head = os.path.join(tempfile.mkdtemp(prefix='docs_test'), 'head.md')
  with open(head, 'w') as f:
    f.write('\n'.join(lines[:200]) + '\n```\n')
  found = {}
  for _, argv, _ in commands(head):
    config, _ = config_words(arguments(argv))
    if config is not None:
      found.setdefault(program(argv), set()).add(os.path.basename(config).split(':')[0])
  assert 'pretrain.py' in found.get('launch/tpu_run.sh', ()), (
    'no TPU pre-training command in the first 200 lines of README.md'
  )
  assert any('finetune_coco.py' in v for v in found.values()), (
    'no COCO fine-tuning command in the first 200 lines of README.md'
  )


def test_relative_links_resolve():
  missing = []
  for path in doc_files():
    with open(path) as f:
      text = f.read()
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
      if re.match(r'[a-z]+:', target) or target.startswith('#'):
        continue
      file = target.split('#')[0]
      if not os.path.exists(os.path.join(os.path.dirname(path), file)):
        missing.append(f'{os.path.relpath(path, ROOT)}: {target}')
  assert not missing, 'links to missing files:\n' + '\n'.join(missing)


# Words of the team's process, which mean nothing to a user (built from parts so that
# this file does not match itself).
PROCESS_WORDS = re.compile(
  '|'.join(
    [
      'sess' + r'ion [0-9]',
      'this sess' + 'ion',
      'iss' + r'ue [0-9]',
      'SP' + 'EC §',
      'not ship' + 'ped',
      'one-off scr' + 'ipt',
    ]
  ),
  re.I,
)


def test_no_process_words():
  found = []
  paths = [README]
  for folder in ('docs', 'updetr_jax', 'benchmarks', 'launch', 'tests'):
    paths += glob.glob(os.path.join(ROOT, folder, '**', '*'), recursive=True)
  for path in paths:
    if not os.path.isfile(path) or path.endswith(('.png', '.pyc', '.gz', '.npz')):
      continue
    with open(path, errors='replace') as f:
      for number, line in enumerate(f, 1):
        if PROCESS_WORDS.search(line):
          found.append(f'{os.path.relpath(path, ROOT)}:{number}: {line.strip()}')
  assert not found, 'words of the team process:\n' + '\n'.join(found)
