"""The model config's fields are defined once (``updetr_jax.models.fields``): the
configs, ``build_model``, the modules, the pre-trained init and the checkpoint config
check all give a field the same default."""

import ast
import os

import jax.numpy as jnp
import numpy as np
import pytest

from updetr_jax import integrity, pretrained
from updetr_jax.configs import common, pretrain
from updetr_jax.models import DETR, UPDETR, build_model, fields

OPTIONAL = [name for name, f in fields.FIELDS.items() if not f.required]
# Fields of build_model's modules (feature_recon is the loss's; num_patches decides
# the module, and UPDETR built directly needs one > 0).
MODULE_FIELDS = [f for f in fields.FIELDS if f not in ('feature_recon', 'num_patches')]
# What the release's pre-training sets differently from the defaults.
PRETRAIN_SETS = {'pre_norm', 'num_classes', 'num_patches', 'feature_recon'}


def _same(a, b) -> bool:
  """Equal, and of the same type (True is not 1)."""
  return type(a) is type(b) and a == b


def _full_config(**overrides) -> dict:
  """A config with every field at its default but a small UP-DETR architecture."""
  return {
    **fields.DEFAULTS,
    **dict(
      backbone='resnet_tiny',
      hidden_dim=16,
      nheads=2,
      enc_layers=1,
      dec_layers=2,
      dim_feedforward=32,
      num_queries=8,
      num_patches=2,
    ),
    **overrides,
  }


def _other(name):
  """A value of field ``name`` other than its default (a valid one where it has choices)."""
  default = fields.DEFAULTS[name]
  if isinstance(default, bool):
    return not default
  if isinstance(default, str):
    return next((c for c in fields.FIELDS[name].choices if c != default), default + 'x')
  return default + 1


def _module_value(model, name):
  value = getattr(model, name)
  return value.name if name == 'dtype' else value


def test_every_default_is_one_of_its_choices():
  for name, f in fields.FIELDS.items():
    if f.choices:
      assert f.default in f.choices, name


def test_detr_model_has_every_detr_field_at_its_default():
  config = common.detr_model().to_dict()
  assert set(config) == set(fields.DETR_FIELDS)
  for name, f in fields.DETR_FIELDS.items():
    assert _same(config[name], f.default), name


def test_pretrain_model_spells_the_patch_fields_at_their_defaults():
  config = pretrain.model_config().to_dict()
  assert set(fields.PATCH_FIELDS) - set(config) == {'feature_head'}  # True when absent
  for name in set(config) - PRETRAIN_SETS:
    assert _same(config[name], fields.DEFAULTS[name]), name


def test_module_defaults_are_the_fields_defaults():
  for name in MODULE_FIELDS:
    module = UPDETR if name in fields.PATCH_FIELDS else DETR
    assert _same(_module_value(module(), name), fields.DEFAULTS[name]), name


@pytest.mark.parametrize('name', [f for f in OPTIONAL if f in MODULE_FIELDS])
def test_build_model_of_a_config_without_a_field_uses_its_default(name):
  config = _full_config()
  del config[name]
  model = build_model(config)
  assert isinstance(model, UPDETR)
  assert _same(_module_value(model, name), fields.DEFAULTS[name]), name
  assert _same(
    _module_value(build_model(dict(config, **{name: None})), name), fields.DEFAULTS[name]
  )


def test_a_config_without_num_patches_builds_detr():
  config = _full_config()
  del config['num_patches']
  assert type(build_model(config)) is DETR
  assert fields.fill(config)['num_patches'] == fields.DEFAULTS['num_patches']
  assert fields.fill({})['feature_recon'] is fields.DEFAULTS['feature_recon']


def test_build_model_refuses_a_missing_required_field_or_a_bad_choice():
  config = _full_config()
  del config['hidden_dim']
  with pytest.raises(ValueError, match=r"missing fields: \['hidden_dim'\]"):
    build_model(config)
  for name, f in fields.FIELDS.items():
    if f.choices:
      with pytest.raises(ValueError, match=f'model.{name}='):
        build_model(_full_config(**{name: 'no such choice'}))
  with pytest.raises(ValueError, match='num_queries=8 must be divisible by model.num_patches=3'):
    build_model(_full_config(num_patches=3))


def _pretrained_init(pretrained_config, model_config):
  variables = {'params': {'patch2query': {'kernel': np.zeros((2, 2), np.float32)}}}
  return pretrained.init_from_pretrained(variables, model_config, variables, pretrained_config)


@pytest.mark.parametrize(
  'name',
  [
    f
    for f in pretrained.ARCHITECTURE_FIELDS + pretrained.PATCH_ARCHITECTURE_FIELDS
    if not fields.FIELDS[f].required
  ],
)
def test_pretrained_config_without_a_field_means_its_default(name):
  old = _full_config()
  del old[name]
  default = fields.DEFAULTS[name]
  _pretrained_init(old, _full_config(**{name: default}))  # the same architecture
  with pytest.raises(ValueError, match=f'{name}: pre-trained {default!r} vs model'):
    _pretrained_init(old, _full_config(**{name: _other(name)}))


@pytest.mark.parametrize('name', OPTIONAL)
def test_checkpoint_config_check_reads_a_missing_field_as_its_default(name):
  old = _full_config()
  del old[name]
  at_default = _full_config(**{name: fields.DEFAULTS[name]})
  assert integrity.config_diff({'model': old}, {'model': at_default}) == []
  other = _full_config(**{name: _other(name)})
  assert integrity.config_diff({'model': old}, {'model': other}) == [
    f'config.model.{name}: checkpoint {fields.DEFAULTS[name]!r} vs this run {_other(name)!r}'
  ]


def test_dtype_argument_overrides_the_config():
  model = build_model(_full_config(), dtype=jnp.bfloat16)
  assert model.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match='model.dtype'):
    build_model(_full_config(), dtype='float16')


def _default_reads(source: str) -> list[str]:
  """The ``<...model...>.get('<model field>', <default>)`` calls in ``source``: each
  would hold a second default of a field (``fields.fill`` gives the one)."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if (
      isinstance(node, ast.Call)
      and isinstance(node.func, ast.Attribute)
      and node.func.attr in ('get', 'setdefault', 'pop')
      and len(node.args) == 2
      and isinstance(node.args[0], ast.Constant)
      and node.args[0].value in fields.FIELDS
      and 'model' in ast.unparse(node.func.value)
    ):
      found.append(ast.unparse(node))
  return found


def test_no_module_reads_a_model_field_with_a_default_of_its_own():
  package = os.path.dirname(os.path.dirname(fields.__file__))
  offenders = []
  for root, _, names in os.walk(package):
    for name in names:
      path = os.path.join(root, name)
      if name.endswith('.py') and path != fields.__file__:
        with open(path) as f:
          offenders += [f'{os.path.relpath(path, package)}: {c}' for c in _default_reads(f.read())]
  assert not offenders, offenders
  planted = "if config.model.get('num_patches', 0) > 0: pass"  # the pattern it refuses
  assert _default_reads(planted) == ["config.model.get('num_patches', 0)"]
