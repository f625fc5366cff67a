"""The pre-training vs scratch harness, end to end on tiny budgets."""

import ast
import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from conftest import importorskip  # fails instead of skipping under CI=true

importorskip('tensorflow')

from updetr_jax.configs import compare as compare_config  # noqa: E402
from updetr_jax.configs import pretrain as pretrain_config  # noqa: E402
from updetr_jax import checkpoints, compare, train, train_step  # noqa: E402
from updetr_jax.data import miniature  # noqa: E402
from updetr_jax.models import build_model  # noqa: E402
from updetr_jax.models import init_variables  # noqa: E402

TINY_MODEL = dict(
  backbone='resnet_tiny',
  hidden_dim=32,
  nheads=2,
  enc_layers=1,
  dec_layers=2,
  dim_feedforward=64,
  num_queries=8,
)


def tiny_config(data: dict, cache: str):
  """configs/compare.py:mini on a COCO json + folders it is given, tiny budgets."""
  c = compare_config.get_config('mini')
  c.arms = ('updetr', 'scratch')
  c.seeds = (0, 1)
  c.label_fractions = (0.5,)
  c.miniature.enabled = False
  c.compilation_cache_dir = cache
  c.stage0.update(num_train_steps=3, batch_size=8)
  c.stage0.data.update(folder=data['pool_dir'], view_size=32)
  p, f = c.pretrain, c.finetune
  p.model.update(num_patches=2, **TINY_MODEL)
  p.data.update(
    folder=data['pool_dir'],
    eval_folder=data['eval_dir'],
    scales=(64,),
    max_size=80,
    eval_scale=64,
    buckets=((64, 80),),
    patch_size=16,
  )
  p.update(batch_size=4, num_train_steps=3, checkpoint_every_steps=3, log_every_steps=1)
  p.report_flops = f.report_flops = False  # no FLOP count (step_cost: the other train.run tests)
  p.eval.num_batches = 1
  f.model.update(**TINY_MODEL)
  f.data.update(
    ann_file=data['train_ann'],
    image_dir=data['train_dir'],
    eval_ann_file=data['eval_ann'],
    eval_image_dir=data['eval_dir'],
    scales=(64,),
    max_size=80,
    eval_scale=64,
    crop_resize_scales=(64,),
    crop_size=(48, 64),
    buckets=((64, 80),),
    repeats=4,
  )
  f.update(batch_size=4, num_train_steps=4, checkpoint_every_steps=2, log_every_steps=2)
  f.eval.update(every_steps=2, batch_size=4, num_pictures=0)
  return c


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('mini'))
  return miniature.write_miniature(root, num_pool=12, num_train=8, num_eval=6)


def _flat(tree):
  return {'/'.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.fixture(scope='module')
def harness(data, tmp_path_factory):
  """(config, workdir, results) of one compare.run: the tests below read it (its
  pre-training is also the one the arms' initial weights are checked against)."""
  root = tmp_path_factory.mktemp('harness')
  workdir = str(root / 'cmp')
  config = tiny_config(data, str(root / 'xla'))
  return config, workdir, compare.run(config, workdir)


def test_harness_end_to_end_and_rerun(harness):
  config, workdir, results = harness

  # Every run evaluated at steps 2 and 4; statistics over the 2 seeds, paired diffs.
  stats = results['stats']['0.5']
  assert stats['steps'] == [2, 4]
  for arm in ('updetr', 'scratch'):
    for m in ('AP', 'AP50'):
      cells = stats['arms'][arm][m]
      assert [c['n'] for c in cells] == [2, 2]
      per_seed = [results['curves']['0.5'][arm][str(s)]['4'][m] for s in (0, 1)]
      assert cells[-1]['mean'] == pytest.approx(np.mean(per_seed))
      assert cells[-1]['std'] == pytest.approx(np.std(per_seed, ddof=1))
  diffs = [
    results['curves']['0.5']['updetr'][str(s)]['4']['AP']
    - results['curves']['0.5']['scratch'][str(s)]['4']['AP']
    for s in (0, 1)
  ]
  assert stats['paired']['updetr']['AP'][-1]['mean'] == pytest.approx(np.mean(diffs))
  assert 'scratch' not in stats['paired']
  for name in ('results.json', 'results.txt', 'curves.png', 'stage0/backbone.npz'):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert 'paired difference' in open(os.path.join(workdir, 'results.txt')).read()
  # The 50% label subset: half the training images, the same for both arms of a seed.
  subset = json.load(open(os.path.join(workdir, 'data_subsets', 'train_frac0.5_seed0.json')))
  assert len(subset['images']) == 4
  for arm in ('updetr', 'scratch'):
    cfg = json.load(open(os.path.join(workdir, 'finetune', 'frac0.5', arm, 'seed0', 'config.json')))
    assert cfg['data']['ann_file'].endswith('train_frac0.5_seed0.json')
    assert cfg['init']['backbone_checkpoint'].endswith('stage0/backbone.npz')

  # Rerunning skips every finished run (no run of the loop at all).
  calls = []
  original = train.run
  train.run = lambda *a, **k: calls.append(a) or original(*a, **k)
  try:
    again = compare.run(config, workdir)
  finally:
    train.run = original
  assert calls == []
  assert again['stats'] == results['stats']


def test_pretrained_arm_starts_from_the_pretrained_transformer(harness, tmp_path):
  """Leaf by leaf: the UP-DETR arm's initial weights (transformer, query embeddings,
  input projection, box head, CNN) are the pre-training's; the scratch arm's are its
  own fresh initialisation, none loaded."""
  config, workdir, _ = harness
  pre_dir = os.path.join(workdir, 'pretrain', 'updetr')  # the harness's pre-training
  pre_vars, _, _ = checkpoints.restore_workdir_variables(pre_dir)
  pre = _flat(pre_vars['params'])

  def initial(arm):
    c = compare.finetune_config(
      config, arm, 0, 1.0, '', pre_dir if arm != 'scratch' else '', str(tmp_path / 'subsets')
    )
    c.model.num_classes = 7  # what the loop takes from the data (num_classes=-1)
    model = build_model(c.model)
    variables, *_ = train_step.init_train_state(c, model, jax.random.PRNGKey(c.seed), 10)
    fresh = init_variables(model, jax.random.PRNGKey(c.seed))  # nothing loaded
    return _flat(variables['params']), _flat(fresh['params'])

  (up, fresh), (scratch, fresh_scratch) = initial('updetr'), initial('scratch')
  shared = [k for k in pre if k in up and not k.startswith('class_embed')]
  assert any(k.startswith('transformer/') for k in shared)
  assert any(k.startswith('query_embed') for k in shared)
  for k in shared:
    np.testing.assert_array_equal(up[k], pre[k], err_msg=k)  # loaded
  for k in scratch:
    np.testing.assert_array_equal(scratch[k], fresh_scratch[k], err_msg=k)  # not loaded
  moved = [k for k in shared if not np.array_equal(pre[k], fresh[k])]
  assert sum(k.startswith('transformer/') for k in moved) > 10  # pre-training trained them
  for k in moved:
    assert not np.array_equal(scratch[k], pre[k]), k
  # The class head is new in both arms (2 + 1 logits in pre-training).
  assert up['class_embed/kernel'].shape != pre['class_embed/kernel'].shape


def test_bad_configs_name_the_field(data, tmp_path):
  config = tiny_config(data, '')
  config.arms = ('updetr',)
  with pytest.raises(ValueError, match="include 'scratch'"):
    compare.run(config, str(tmp_path / 'a'))
  config.arms = ('updetr', 'nope', 'scratch')
  with pytest.raises(ValueError, match='unknown'):
    compare.run(config, str(tmp_path / 'b'))
  config.arms = ('scratch',)
  config.label_fractions = (0.0,)
  with pytest.raises(ValueError, match='label_fractions'):
    compare.run(config, str(tmp_path / 'c'))


def test_patch_options_arms_fine_tune_with_their_pretraining_architecture(tmp_path):
  """The options arms pre-train with configs/pretrain.py PATCH_OPTIONS and their
  fine-tunings take the architecture fields those change (value_pos; one-shot also
  patch_content and patch_feature_norm), or loading the pre-training is refused;
  scratch_value_pos is scratch with that decoder, plain scratch is unchanged."""
  subsets = str(tmp_path / 'subsets')
  mini = compare_config.get_config('mini')
  p = compare.pretrain_config(mini, 'updetr_patch_options', '')
  assert p.model.patch_feature_norm and p.model.patch_content and p.model.value_pos
  assert p.matcher.group_matching and p.optim.lr == 4e-4
  assert not compare.pretrain_config(mini, 'updetr', '').model.value_pos  # release path

  def tuned(config, arm):
    return compare.finetune_config(config, arm, 0, 1.0, '', 'PRE', subsets)

  lookup = compare.pretrain_config(mini, 'updetr_lookup', '')
  assert lookup.data.source == 'mosaics' and lookup.data.mosaic_style == 'rotated_ramp'
  assert lookup.model.patch_feature_norm and lookup.matcher.group_matching
  assert tuned(mini, 'updetr_lookup').model.value_pos
  assert tuned(mini, 'updetr_patch_options').model.value_pos
  assert tuned(mini, 'updetr_patch_options').init.pretrained == 'PRE'
  assert not tuned(mini, 'updetr').model.value_pos
  assert not tuned(mini, 'scratch').model.value_pos
  scratch_vp = tuned(mini, 'scratch_value_pos')
  assert scratch_vp.model.value_pos and scratch_vp.init.pretrained == ''
  one = tuned(compare_config.get_config('oneshot'), 'updetr_single_query_patch_options')
  assert one.model.value_pos and one.model.patch_content and one.model.patch_feature_norm
  assert one.model.num_patches == 1


def test_a_preempted_run_stops_the_harness(tmp_path, monkeypatch):
  """A run that checkpointed on SIGTERM (train.run returns preempted_at) stops the
  harness with SIGTERM's exit status; it does not go on to the next run as if that
  one had finished (which then lacks its curve)."""
  calls = []

  def preempted(config, workdir):
    calls.append(workdir)
    return {'task': 'detection', 'steps': 10, 'preempted_at': 4}

  monkeypatch.setattr(train, 'run', preempted)
  with pytest.raises(SystemExit) as stop:
    compare._run(None, str(tmp_path / 'run'), 'fine-tuning scratch, seed 0')
  assert stop.value.code == 143 and len(calls) == 1


def test_lookup_variant_pairs_name_its_arms():
  config = compare_config.get_config('lookup')
  compare.check_config(config)  # its pairs are two of its arms
  config.pairs = (('updetr_lookup', 'nope'),)
  with pytest.raises(ValueError, match='config.pairs'):
    compare.check_config(config)


def test_lookup_arm_pretrains_as_the_learnability_benchmark_arm():
  """updetr_lookup's pre-training is the benchmark's lookup run (its arm of
  configs/pretrain.py PRETEXT_ARMS, on rotated_ramp mosaics for 12,000 steps): every
  field the benchmark's command sets and every override of the comparison's arm are
  equal in both, but the evaluation and checkpoint cadence."""
  from benchmarks import pretext_learnability

  command = pretext_learnability.command(
    'out', compare.LOOKUP_ARM, 0, 12000, 4, 1000, 'rotated_ramp'
  )
  flags = dict(a.removeprefix('--config.').split('=', 1) for a in command if '--config.' in a)

  def value(text):
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text  # a string field

  benchmark = pretrain_config.get_config('mosaics')
  benchmark.update_from_flattened_dict({k: value(v) for k, v in flags.items()})
  lookup = compare.pretrain_config(compare_config.get_config('lookup'), 'updetr_lookup', '')
  cadence = {'seed', 'eval.every_steps', 'checkpoint_every_steps'}
  fields = (set(flags) | set(compare.ARMS['updetr_lookup'])) - cadence
  assert set(pretrain_config.PRETEXT_ARMS[compare.LOOKUP_ARM]) <= fields
  for field in sorted(fields):
    assert lookup[field] == benchmark[field], field
