"""benchmarks/device_suite.py and model.attention.

The suite runs end to end on CPU (--tiny) through benchmarks/device_suite.sh with
TensorFlow, tensorflow-datasets, clu and ml_collections unimportable, as on the GPU
machines; its budget and watchdog end a run with every case recorded; its written-out
release configs agree with configs/. model.attention='dot_product' computes what the
einsum attention does when dropout is off (masks included), with the same parameters.
"""

import json
import os
import subprocess
import sys
import textwrap
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import device_suite
from conftest import ROOT, importorskip
from updetr_jax.models import build_model, init_variables, transformer, variable_shapes

# What the GPU machines lack: importing any of these must fail in the suite's process.
BLOCKED = ('tensorflow', 'tensorflow_datasets', 'clu', 'ml_collections')
SITECUSTOMIZE = textwrap.dedent('''\
    """Test prelude: the device machines have no TensorFlow, TFDS, clu, ml_collections."""
    import importlib.abc
    import sys

    _BLOCKED = {blocked!r}


    class _Blocker(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        top = name.partition('.')[0]
        if top in _BLOCKED or top.startswith('tensorflow'):
          raise ImportError(f'{{name}} is blocked: not installed on the device machines')
        return None


    sys.meta_path.insert(0, _Blocker())
    ''').format(blocked=BLOCKED)


def _blocked_env(tmp_path) -> dict:
  """Environment whose Python processes cannot import BLOCKED (a sitecustomize)."""
  prelude = tmp_path / 'prelude'
  prelude.mkdir()
  (prelude / 'sitecustomize.py').write_text(SITECUSTOMIZE)
  path = os.environ.get('PYTHONPATH')
  return dict(
    os.environ, PYTHON=sys.executable, PYTHONPATH=str(prelude) + (os.pathsep + path if path else '')
  )


def _run_suite(env, *args, timeout=900):
  """bash benchmarks/device_suite.sh ARGS -> (process, [JSON records])."""
  proc = subprocess.run(
    ['bash', os.path.join(ROOT, 'benchmarks', 'device_suite.sh'), *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{')]
  return proc, records


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """The whole suite, --tiny, on CPU, with the GPU machine's missing packages blocked."""
  tmp = tmp_path_factory.mktemp('device_suite')
  env = _blocked_env(tmp)
  probe = subprocess.run(
    [sys.executable, '-c', 'import tensorflow'],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert probe.returncode != 0 and 'blocked' in probe.stderr, probe.stderr[-2000:]
  out = tmp / 'suite.jsonl'
  # A budget no load reaches before the 900 s timeout: with the default (450 s, the
  # watchdog at 465 s) a slow machine could stop a case here.
  proc, records = _run_suite(env, '--tiny', '--budget-s', '3600', '--out', str(out))
  return proc, records, out


def test_tiny_suite_runs_every_case_without_tensorflow(tiny_run):
  proc, records, out = tiny_run
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert out.read_text().splitlines() == proc.stdout.splitlines()
  *cases, summary = records
  assert [r['case'] for r in cases] == list(device_suite.CASE_NAMES)
  assert summary['summary'] and summary['platform'] == 'cpu'
  assert summary['jax_version'] == jax.__version__ and summary['device_kind']
  assert summary['error'] == [] and not summary['stopped_by_watchdog']
  for r in cases:
    assert r['status'] in ('ok', 'skipped'), r
    if r['status'] == 'skipped':  # only for the budget, with its reason
      assert r['reason'].startswith('budget'), r
      continue
    assert r['compile_s'] >= 0
    if r['kind'] == 'matching':
      assert r['matching_s'] > 0 and r['layers'] == device_suite.TINY_MODEL['dec_layers']
      continue
    assert r['step_s'] > 0 and r['images_per_s'] > 0 and r['finite'], r
    assert r['xla_flops_per_step'] > 0 and r['model_flops_per_step'] > 0
    assert r['batch'] == device_suite.TINY_SIZES.batch_per_device
    assert r['peak_dtype'] == r['dtype'] and r['mfu'] is None  # no CPU peak
    fused = r['case'].endswith('_fused')
    assert r['attention'] == ('dot_product' if fused else 'einsum')  # no cuDNN on CPU
    assert r['attention_dropout_applied'] == (not fused)
  ok = [r['case'] for r in cases if r['status'] == 'ok']
  assert ok[:2] == ['pretrain_f32_einsum', 'pretrain_matching'], 'the first cases must run'
  assert summary['ok'] == ok
  shared = [r for r in cases if r['status'] == 'ok' and 'matching_share' in r]
  assert all(0 < r['matching_share'] for r in shared if r['kind'] == 'step')
  assert set(summary['matching_share']) >= {r['case'] for r in shared if r['kind'] == 'step'}


def test_watchdog_records_every_case_and_ends_the_run(tmp_path):
  # The hard deadline (0 s: passed when the cases start) falls before the first case or
  # in it, whatever the machine's speed (a later deadline could come after a fast case).
  proc, records = _run_suite(
    _blocked_env(tmp_path), '--tiny', '--budget-s', '1000', '--deadline-s', '0', timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-5000:]
  *cases, summary = records
  assert [r['case'] for r in cases] == list(device_suite.CASE_NAMES)
  assert all(r['status'] == 'skipped' and r['reason'].startswith('budget') for r in cases)
  assert summary['stopped_by_watchdog'] and not summary['complete']


def test_budget_skips_cases_that_would_not_fit(tmp_path):
  proc, records = _run_suite(
    _blocked_env(tmp_path),
    '--tiny',
    '--budget-s',
    '0',
    '--deadline-s',  # not the default budget + 15 s: slow imports could reach it
    '600',
    '--cases',
    'pretrain_bf16_fused,finetune_matching',
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-5000:]
  *cases, summary = records
  assert [r['case'] for r in cases] == ['finetune_matching', 'pretrain_bf16_fused']  # CASES order
  assert all(r['status'] == 'skipped' and 'budget' in r['reason'] for r in cases)
  assert summary['skipped'] == [r['case'] for r in cases] and not summary['stopped_by_watchdog']


def test_release_configs_agree_with_the_config_files():
  importorskip('tensorflow')  # the config files' get_config() imports updetr_jax.data
  from updetr_jax.configs import finetune_coco, pretrain  # noqa: PLC0415

  for task, config in (
    ('pretrain', pretrain.get_config()),
    ('finetune', finetune_coco.get_config()),
  ):
    ours = device_suite.step_config(task)
    assert dict(ours.model) == config.model.to_dict(), task
    assert dict(ours.loss) == config.loss.to_dict(), task
    assert dict(ours.matcher) == config.matcher.to_dict(), task
    assert dict(ours.optim) == config.optim.to_dict(), task


# ------------------------------------------------------------------ model.attention


def _tiny_model_config(**overrides):
  return dict(device_suite.step_config('pretrain', tiny=True).model, dropout=0.0, **overrides)


def _inputs():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((2, 96, 128, 3)), jnp.float32)
  padding = np.zeros((2, 96, 128), bool)
  padding[0, :, 64:] = True  # right half of image 0, bottom third of image 1: padded
  padding[1, 64:] = True
  patches = jnp.asarray(rng.standard_normal((2, 10, 32, 32, 3)), jnp.float32)
  return images, jnp.asarray(padding), patches


@pytest.mark.parametrize('task', ['pretrain', 'finetune'])
def test_dot_product_attention_equals_einsum_with_dropout_off(task):
  """Same variables, same outputs and gradients (float32, CPU, XLA implementation):
  encoder key padding masks, UP-DETR's group mask in decoder self-attention."""
  cfg = _tiny_model_config()
  if task == 'finetune':
    cfg = {
      k: v for k, v in cfg.items() if k not in ('num_patches', 'feature_recon', 'patch_query_drop')
    }
  einsum, fused = build_model(cfg), build_model(dict(cfg, attention='dot_product'))
  assert variable_shapes(einsum) == variable_shapes(fused)  # checkpoints load either way
  variables = init_variables(einsum, jax.random.PRNGKey(0))
  images, padding, patches = _inputs()
  patches = patches if task == 'pretrain' else None

  def head_sum(model, params, train):
    out = model.apply(
      dict(variables, params=params),
      images,
      padding,
      patches,
      train=train,
      rngs={'dropout': jax.random.PRNGKey(3)},
    )
    return jnp.sum(out['pred_logits'] ** 2) + jnp.sum(out['pred_boxes']), out

  for train in (False, True):
    (a, out_a), grad_a = jax.value_and_grad(head_sum, 1, has_aux=True)(
      einsum, variables['params'], train
    )
    (b, out_b), grad_b = jax.value_and_grad(head_sum, 1, has_aux=True)(
      fused, variables['params'], train
    )
    for key in ('pred_logits', 'pred_boxes') + (('pred_feature',) if patches is not None else ()):
      np.testing.assert_allclose(out_a[key], out_b[key], atol=1e-5, rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    jax.tree_util.tree_map(
      lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4), grad_a, grad_b
    )


@pytest.mark.parametrize('mask_shape', [None, (2, 1, 1, 7), (1, 1, 5, 7), (7,)])
def test_fused_attention_module_masks(mask_shape):
  rng = np.random.default_rng(1)
  q, kv = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 5, 16), (2, 7, 16)))
  mask = None
  if mask_shape is not None:
    mask = rng.uniform(size=mask_shape) > 0.4
    mask[..., 0] = True  # every query attends to something
    mask = jnp.asarray(mask)
  outs = {}
  for attention in ('einsum', 'dot_product'):
    mha = transformer.MultiHeadAttention(16, 4, attention=attention)
    variables = mha.init(jax.random.PRNGKey(0), q, kv, kv, mask)
    outs[attention] = mha.apply(variables, q, kv, kv, mask)
  np.testing.assert_allclose(outs['einsum'], outs['dot_product'], atol=1e-5, rtol=1e-5)


def test_cudnn_gets_its_mask_as_full_length_rows():
  """cuDNN takes a mask whose last two dimensions are [Lq, Lk]: a key padding mask
  [B, 1, 1, Lk] is broadcast to [B, 1, Lq, Lk] (checked without a GPU)."""
  seen = {}
  real = jax.nn.dot_product_attention

  def spy(q, k, v, *, mask=None, scale=None, implementation=None):
    seen['mask'], seen['implementation'] = mask.shape, implementation
    return real(q, k, v, mask=mask, scale=scale, implementation='xla')

  q = jnp.ones((2, 5, 4, 8))
  k = jnp.ones((2, 7, 4, 8))
  with mock.patch.object(transformer.jax.nn, 'dot_product_attention', spy):
    transformer.fused_attention(q, k, k, jnp.ones((2, 1, 1, 7), bool), 'cudnn')
  assert seen == {'mask': (2, 1, 5, 7), 'implementation': 'cudnn'}


def test_fused_attention_applies_no_attention_dropout():
  """The documented difference: with dropout > 0 in training the einsum attention drops
  attention probabilities, the fused one does not (its output is the eval output)."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 6, 16)), jnp.float32)
  outs = {}
  for attention in ('einsum', 'dot_product'):
    mha = transformer.MultiHeadAttention(16, 4, dropout=0.5, attention=attention)
    variables = mha.init(jax.random.PRNGKey(0), x, x, x)
    for train in (False, True):
      outs[attention, train] = mha.apply(
        variables, x, x, x, train=train, rngs={'dropout': jax.random.PRNGKey(1)}
      )
  assert not np.allclose(outs['einsum', True], outs['einsum', False])
  np.testing.assert_allclose(outs['dot_product', True], outs['dot_product', False])
  np.testing.assert_allclose(outs['dot_product', False], outs['einsum', False], atol=1e-5)


def test_attention_option_is_checked():
  with pytest.raises(ValueError, match='model.attention'):
    build_model(_tiny_model_config(attention='flash'))
  assert build_model(_tiny_model_config()).attention == 'einsum'  # the default
