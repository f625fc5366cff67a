"""docs/configuration.md stays equal to the config files.

For every config file the doc has a section (``## `configs/FILE.py` ``) with a table of
every leaf field of the default variant (``### Fields (default variant `V`)``,
columns field | default | meaning) and, per other variant, a table of the fields that
variant changes (``### Variant `V` ``, columns field | value). configs/compare.py
documents its own fields in the full table, and its nested ``pretrain.*`` /
``finetune.*`` configs as changes against the config files they are built from.

Values are Python literals in backticks (``|`` escaped as ``\\|``), read with
``ast.literal_eval``; floats compare to a relative tolerance, everything else by its
``repr`` (so ``True`` is not ``1`` and ``1.0`` is not ``1``). The word ``removed``
(no backticks) marks a field that a variant deletes.
"""

from __future__ import annotations

import ast
import importlib
import math
import pathlib
import re

import ml_collections
import pytest

DOC = pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'configuration.md'

# Config module -> its default variant (what ``get_config()`` without a variant gives).
DEFAULT_VARIANTS = {
  'pretrain': 'imagenet',
  'finetune_coco': '300ep',
  'finetune_voc': '150ep',
  'oneshot_voc': '150ep',
  'compare': 'mini',
  'ssl_backbone': 'default',
}
NESTED = ('pretrain', 'finetune', 'stage0')  # configs/compare.py's nested whole configs
FULL_HEADER = ['field', 'default', 'meaning']
CHANGES_HEADER = ['field', 'value']
REMOVED = 'removed'
FLOAT_RTOL = 1e-9


def _module(name: str):
  return importlib.import_module(f'updetr_jax.configs.{name}')


def variants(name: str) -> tuple[str, ...]:
  """Every variant of a config module, the default first."""
  module = _module(name)
  if hasattr(module, 'VARIANTS'):
    found = tuple(module.VARIANTS)
  else:  # the fine-tuning files: the schedules
    found = tuple(_module('finetune_coco').SCHEDULES)
  default = DEFAULT_VARIANTS[name]
  return (default,) + tuple(v for v in found if v != default)


def load_config(name: str, variant: str | None) -> ml_collections.ConfigDict:
  """The config as ``--config=configs/NAME.py[:variant]`` loads it."""
  return _module(name).get_config(variant)


def flatten(config, prefix: str = '') -> dict:
  """Nested ConfigDicts -> {dotted name: leaf value}; FieldReferences resolved.

  An empty ConfigDict is a leaf (its value ``{}``).
  """
  out = {}
  for key, value in config.items():
    name = f'{prefix}{key}'
    if isinstance(value, ml_collections.FieldReference):
      value = value.get()
    if isinstance(value, (ml_collections.ConfigDict, dict)) and len(value):
      out.update(flatten(value, f'{name}.'))
    elif isinstance(value, ml_collections.ConfigDict):
      out[name] = {}
    else:
      out[name] = value
  return out


def same(doc_value, config_value) -> bool:
  """Floats within FLOAT_RTOL (both floats), containers element-wise, else by repr."""
  if isinstance(doc_value, float) or isinstance(config_value, float):
    return (
      type(doc_value) is float
      and type(config_value) is float
      and math.isclose(doc_value, config_value, rel_tol=FLOAT_RTOL)
    )
  if isinstance(doc_value, (tuple, list)) or isinstance(config_value, (tuple, list)):
    return (
      type(doc_value) is type(config_value)
      and len(doc_value) == len(config_value)
      and all(same(a, b) for a, b in zip(doc_value, config_value))
    )
  return repr(doc_value) == repr(config_value)


def changes(base: dict, other: dict) -> dict:
  """Fields of ``other`` that differ from ``base`` (flattened), and REMOVED ones.

  A leaf replaced by a sub-config (or the reverse) shows as the new fields only.
  """
  out = {k: v for k, v in other.items() if k not in base or not same(base[k], v)}
  for k in base:
    replaced = any(o.startswith(f'{k}.') or k.startswith(f'{o}.') for o in other)
    if k not in other and not replaced:
      out[k] = REMOVED
  return out


def _prefixed(flat: dict, prefix: str) -> dict:
  return {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}


def _add_prefix(flat: dict, prefix: str) -> dict:
  return {f'{prefix}{k}': v for k, v in flat.items()}


def expected_tables(load=load_config) -> dict:
  """{(section, subsection): (header, {field: value})} of every table the doc must have.

  ``load(name, variant)`` gives a config (``load_config``; the self-tests pass others).
  """
  flat = {}
  for name in DEFAULT_VARIANTS:
    for v in variants(name):
      flat[name, v] = flatten(load(name, v))
  tables = {}
  for name in DEFAULT_VARIANTS:
    section = f'configs/{name}.py'
    default, *others = variants(name)
    full = flat[name, default]
    if name == 'compare':
      full = {k: v for k, v in full.items() if k.split('.')[0] not in NESTED}
    tables[section, f'Fields (default variant {default})'] = (FULL_HEADER, full)
    if name == 'compare':
      continue
    for v in others:
      diff = changes(flat[name, default], flat[name, v])
      tables[section, f'Variant {v}'] = (CHANGES_HEADER, diff)

  # configs/compare.py: its nested configs against the files they are built from, and
  # its variants against `mini` (the oneshot variant's finetune.* against oneshot_voc).
  section = 'configs/compare.py'
  mini = flat['compare', 'mini']
  bases = {
    ('mini', 'pretrain'): flat['pretrain', 'demo'],
    ('mini', 'stage0'): flat['ssl_backbone', 'default'],
    ('mini', 'finetune'): flat['finetune_coco', '150ep'],
    ('oneshot', 'finetune'): flat['oneshot_voc', '150ep'],
  }
  for (variant, nested), base in bases.items():
    own = _prefixed(flat['compare', variant], f'{nested}.')
    diff = _add_prefix(changes(base, own), f'{nested}.')
    tables[section, f'{nested}.* in {variant}'] = (CHANGES_HEADER, diff)
  for v in variants('compare')[1:]:
    diff = changes(mini, flat['compare', v])
    if (v, 'finetune') in bases:
      diff = {k: x for k, x in diff.items() if not k.startswith('finetune.')}
    tables[section, f'Variant {v}'] = (CHANGES_HEADER, diff)
  return tables


def _heading(line: str) -> str:
  return line.lstrip('#').strip().replace('`', '')


def _cells(line: str) -> list[str]:
  inner = line.strip()[1:-1] if line.strip().endswith('|') else line.strip()[1:]
  return [c.strip().replace('\\|', '|') for c in re.split(r'(?<!\\)\|', inner)]


def parse_doc(text: str) -> dict:
  """{(section, subsection): [rows as lists of cells, header first]} of every table."""
  tables, section, subsection, current = {}, '', '', None
  for line in text.splitlines():
    if line.startswith('## '):
      section, subsection, current = _heading(line), '', None
    elif line.startswith('### '):
      subsection, current = _heading(line), None
    elif line.lstrip().startswith('|'):
      if current is None:
        key = (section, subsection)
        if key in tables:  # a second table under the same heading
          key = (section, f'{subsection} (table {len(tables)})')
        current = tables[key] = []
      cells = _cells(line)
      if not all(re.fullmatch(r':?-+:?', c) for c in cells):  # not the separator row
        current.append(cells)
    else:
      current = None
  return tables


def parse_value(cell: str):
  """A value cell -> its Python value (REMOVED for the word ``removed``)."""
  if cell == REMOVED:
    return REMOVED
  m = re.fullmatch(r'`([^`]*)`', cell)
  if not m:
    raise ValueError(f'value {cell!r} is not one `literal`')
  return ast.literal_eval(m.group(1))


def check(text: str, load=load_config) -> list[str]:
  """Every difference between the doc's tables and the configs, as messages."""
  errors = []
  expected = expected_tables(load)
  documented = {k: v for k, v in parse_doc(text).items() if k[0].startswith('configs/')}
  for key in sorted(set(expected) - set(documented)):
    errors.append(f'{key[0]} / {key[1]}: table missing from the doc')
  for key in sorted(set(documented) - set(expected)):
    errors.append(f'{key[0]} / {key[1]}: table in the doc but no such config table')
  for key in sorted(set(expected) & set(documented)):
    where = f'{key[0]} / {key[1]}'
    header, values = expected[key]
    rows = documented[key]
    if not rows or rows[0] != header:
      errors.append(f'{where}: header {rows[0] if rows else None}, expected {header}')
      continue
    doc = {}
    for row in rows[1:]:
      if len(row) != len(header):
        errors.append(f'{where}: row {row} has {len(row)} cells, expected {len(header)}')
        continue
      field = row[0].strip('`')
      if field in doc:
        errors.append(f'{where}: field {field} listed twice')
      if header == FULL_HEADER and not row[2]:
        errors.append(f'{where}: field {field} has no meaning')
      try:
        doc[field] = parse_value(row[1])
      except (ValueError, SyntaxError) as e:
        errors.append(f'{where}: field {field}: {e}')
        doc[field] = row[1]
    missing, extra = sorted(set(values) - set(doc)), sorted(set(doc) - set(values))
    if missing:
      errors.append(f'{where}: fields missing from the doc: {missing}')
    if extra:
      errors.append(f'{where}: fields in the doc but not in the config: {extra}')
    for field in sorted(set(doc) & set(values)):
      if not same(doc[field], values[field]):
        errors.append(
          f'{where}: {field} is {values[field]!r} in the config, {doc[field]!r} in the doc'
        )
  return errors


@pytest.fixture(scope='module')
def doc_text():
  return DOC.read_text()


def test_default_variants():
  for name, default in DEFAULT_VARIANTS.items():
    assert flatten(load_config(name, None)) == flatten(load_config(name, default)), name


def test_doc_matches_configs(doc_text):
  errors = check(doc_text)
  assert not errors, 'docs/configuration.md differs from the configs:\n' + '\n'.join(errors)


def test_every_full_table_has_rows(doc_text):
  """The parser finds the tables (guards against a format change that hides them)."""
  tables = parse_doc(doc_text)
  for name, default in DEFAULT_VARIANTS.items():
    key = (f'configs/{name}.py', f'Fields (default variant {default})')
    assert len(tables.get(key, ())) > 10, key


def _first_row(text: str, field: str) -> str:
  return next(line for line in text.splitlines() if line.startswith(f'| `{field}` |'))


@pytest.mark.parametrize(
  'plant',
  ['misspelt_field', 'dropped_row', 'changed_default', 'int_for_float', 'dropped_variant'],
)
def test_planted_doc_errors_are_caught(doc_text, plant):
  row = _first_row(doc_text, 'model.num_queries')
  if plant == 'misspelt_field':
    text = doc_text.replace(row, row.replace('num_queries', 'num_querys'), 1)
  elif plant == 'dropped_row':
    text = doc_text.replace(row + '\n', '', 1)
  elif plant == 'changed_default':
    text = doc_text.replace(row, row.replace('`100`', '`101`'), 1)
  elif plant == 'int_for_float':
    lr = _first_row(doc_text, 'optim.lr')
    text = doc_text.replace(lr, lr.replace('`1e-4`', '`1`'), 1)
  else:
    text = doc_text.replace('### Variant `single_query`', '### Not a variant', 1)
  assert text != doc_text
  assert check(text), plant


def test_planted_config_change_is_caught(doc_text):
  def load(name, variant):
    config = load_config(name, variant)
    if name == 'pretrain':
      config.optim.lr_backbone = 1e-5
      config.model.new_field = 3
    return config

  errors = '\n'.join(check(doc_text, load))
  assert 'optim.lr_backbone is 1e-05 in the config' in errors
  assert "fields missing from the doc: ['model.new_field']" in errors


def test_float_tolerance_and_types():
  assert same(1e-4, 0.0001) and same((0.1, 2.0), (0.1, 2.0))
  assert not same(1, 1.0) and not same(True, 1) and not same('None', None)
  assert not same((40,), [40]) and not same(1e-4, 1.1e-4)
