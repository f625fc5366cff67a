"""The package's layout rules: no import cycles (function-level imports included), no
module above ~500 lines without a reason in its docstring, tasks only through the
registry, and every console script equal to its ``python -m`` module."""

import ast
import os
import re
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'updetr_jax')
MAX_LINES = 500
REASON = 'One file:'  # docstring line of a longer module saying why it stays one file


def _modules() -> dict[str, str]:
  """{'updetr_jax.x.y': path} of every module of the package."""
  out = {}
  for root, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith('.py'):
        rel = os.path.relpath(os.path.join(root, name), ROOT)[:-3].replace(os.sep, '.')
        out[rel[: -len('.__init__')] if rel.endswith('.__init__') else rel] = os.path.join(
          root, name
        )
  return out


def _imports(name: str, path: str, modules) -> set[str]:
  """Package modules that ``name`` imports anywhere in its file."""
  with open(path) as f:
    tree = ast.parse(f.read())
  is_package = path.endswith('__init__.py')
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative import
        parts = name.split('.')[: len(name.split('.')) - node.level + (1 if is_package else 0)]
        base = '.'.join(parts + ([base] if base else []))
      targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base for a in node.names]
    else:
      continue
    for t in targets:
      while t and t not in modules:  # 'updetr_jax.models.build_model' -> its module
        t = t.rpartition('.')[0]
      if t and t != name:
        out.add(t)
  return out


def _find_cycle(graph) -> list[str] | None:
  state, stack = {}, []

  def visit(n):
    state[n] = 'open'
    stack.append(n)
    for m in sorted(graph[n]):
      if state.get(m) == 'open':
        return stack[stack.index(m) :] + [m]
      if m not in state:
        found = visit(m)
        if found:
          return found
    stack.pop()
    state[n] = 'done'
    return None

  for n in sorted(graph):
    if n not in state:
      found = visit(n)
      if found:
        return found
  return None


def test_no_import_cycles():
  modules = _modules()
  graph = {n: _imports(n, p, modules) for n, p in modules.items()}
  # A package's __init__ re-exporting its submodules is not a cycle with them.
  for n in graph:
    graph[n] = {
      m for m in graph[n] if not (m.startswith(n + '.') and modules[n].endswith('__init__.py'))
    }
  graph = {n: {m for m in ms if not n.startswith(m + '.')} for n, ms in graph.items()}
  cycle = _find_cycle(graph)
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
  assert _find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _find_cycle({'a': {'b'}, 'b': set()}) is None


def test_long_modules_say_why_they_are_one_file():
  too_long = []
  for name, path in _modules().items():
    with open(path) as f:
      text = f.read()
    n = text.count('\n')
    doc = ast.get_docstring(ast.parse(text)) or ''
    if n > MAX_LINES + 20 and REASON not in doc:
      too_long.append(f'{name}: {n} lines')
  assert not too_long, (
    f'modules above ~{MAX_LINES} lines without a "{REASON}" line in their docstring: {too_long}'
  )


def test_the_loop_never_branches_on_a_task_name():
  with open(os.path.join(PACKAGE, 'train.py')) as f:
    text = f.read()
  for task in ('pretrain', 'detection', 'oneshot'):
    assert not re.search(rf"==\s*'{task}'|'{task}'\s*==|in \(.*'{task}'", text), task


def test_console_scripts_are_the_python_m_entry_points():
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    scripts = tomllib.load(f)['project']['scripts']
  modules = _modules()
  for script, target in scripts.items():
    module, _, func = target.partition(':')
    assert module in modules, (script, module)
    with open(modules[module]) as f:
      tree = ast.parse(f.read())
    funcs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert func in funcs, (script, target)
    main_block = [
      n for n in tree.body if isinstance(n, ast.If) and '__main__' in ast.unparse(n.test)
    ]
    assert main_block and ast.unparse(main_block[0].body[-1]).strip() == f'{func}()', (
      f'{module}: `python -m` must run {func}(), the same as {script}'
    )
