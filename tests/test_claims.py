"""Tests that decide what the project claims.

Each test checks one documented behaviour from its outside, on tiny hand-made inputs
whose right answer is worked out here: the comparison's statistics over seeds, the
label-fraction subsets, the lr step decay, the checkpoint checksum's order
sensitivity, the one-shot query pool's size rule, stage 0's BatchNorm running
averages and the stop at a non-finite gradient.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from updetr_jax import compare, integrity, optim, train_step
from updetr_jax.configs import compare as compare_configs
from updetr_jax.data import detection, oneshot

# ---------------------------------------------------------------- 1. comparison statistics

SEEDS = (0, 1, 2)
# Per seed, AP at steps 10 and 20 (scratch also evaluated at step 30, the arm not).
SCRATCH = {10: (0.10, 0.20, 0.30), 20: (0.30, 0.30, 0.60)}
UPDETR = {10: (0.15, 0.35, 0.40), 20: (0.50, 0.20, 0.80)}
# Worked out by hand (std: unbiased, ddof 1).
WANT_ARMS = {
  # scratch: step 10 mean .2, deviations -.1 0 .1 -> var .02 / 2; step 20 mean .4,
  # deviations -.1 -.1 .2 -> var .06 / 2.
  'scratch': {10: (0.20, 0.10), 20: (0.40, 0.03**0.5)},
  # updetr: step 10 mean .3, deviations -.15 .05 .1 -> var .035 / 2; step 20 mean .5,
  # deviations 0 -.3 .3 -> var .18 / 2.
  'updetr': {10: (0.30, 0.0175**0.5), 20: (0.50, 0.09**0.5)},
}
# Paired differences updetr - scratch per seed: step 10 (.05, .15, .10): mean .1,
# deviations -.05 .05 0 -> std .05; step 20 (.2, -.1, .2): mean .1, deviations .1 -.2
# .1 -> var .06 / 2.
WANT_PAIRED = {10: (0.10, 0.05), 20: (0.10, 0.03**0.5)}


def _curves():
  def per_seed(table, extra_step=None):
    out = {}
    for i, s in enumerate(SEEDS):
      out[s] = {t: {'AP': v[i]} for t, v in table.items()}
      if extra_step is not None:
        out[s][extra_step] = {'AP': 0.9}
    return out

  return {'1': {'updetr': per_seed(UPDETR), 'scratch': per_seed(SCRATCH, extra_step=30)}}


def test_comparison_mean_std_over_seeds_and_paired_difference():
  stats = compare.summarize(_curves(), ['updetr', 'scratch'], list(SEEDS), ('AP',))
  table = stats['1']
  assert table['steps'] == [10, 20]  # the steps every run evaluated
  for arm, want in WANT_ARMS.items():
    for i, step in enumerate(table['steps']):
      cell = table['arms'][arm]['AP'][i]
      assert cell['n'] == 3
      np.testing.assert_allclose(
        [cell['mean'], cell['std']], want[step], rtol=1e-9, err_msg=f'{arm} step {step}'
      )
  assert list(table['paired']) == ['updetr']  # scratch is the baseline, not an arm of it
  for i, step in enumerate(table['steps']):
    cell = table['paired']['updetr']['AP'][i]
    assert cell['n'] == 3
    np.testing.assert_allclose(
      [cell['mean'], cell['std']], WANT_PAIRED[step], rtol=1e-9, err_msg=f'step {step}'
    )
  # The printed table shows the same numbers (x100): the paired column at step 10.
  text = compare.format_table(stats, metrics=('AP',))
  row = next(line for line in text.splitlines() if line.split()[:1] == ['10'])
  assert row.split()[1:] == ['30.00', '+-', '13.23', '20.00', '+-', '10.00', '10.00', '+-', '5.00']


def test_comparison_extra_pairs_are_per_seed_differences():
  """config.pairs: scratch - updetr per seed is the negated paired difference (same
  std), printed as its own column."""
  stats = compare.summarize(
    _curves(), ['updetr', 'scratch'], list(SEEDS), ('AP',), pairs=[('scratch', 'updetr')]
  )
  table = stats['1']
  assert list(table['pairs']) == ['scratch - updetr']
  for i, step in enumerate(table['steps']):
    cell = table['pairs']['scratch - updetr']['AP'][i]
    mean, std = WANT_PAIRED[step]
    np.testing.assert_allclose([cell['mean'], cell['std']], [-mean, std], rtol=1e-9)
  text = compare.format_table(stats, metrics=('AP',))
  assert 'scratch - updetr' in text
  row = next(line for line in text.splitlines() if line.split()[:1] == ['10'])
  assert row.split()[-3:] == ['-10.00', '+-', '5.00']


def test_comparison_single_seed_has_zero_std():
  curves = {'1': {a: {0: {5: {'AP': v}}} for a, v in (('updetr', 0.4), ('scratch', 0.1))}}
  table = compare.summarize(curves, ['updetr', 'scratch'], [0], ('AP',))['1']
  assert table['paired']['updetr']['AP'] == [{'mean': pytest.approx(0.3), 'std': 0.0, 'n': 1}]


# ---------------------------------------------------------------- 2. label fractions


def _write_coco(path, n_images=20):
  images = [
    {'id': 100 + 3 * i, 'file_name': f'{i}.png', 'height': 8, 'width': 8} for i in range(n_images)
  ]
  images.reverse()  # file order is not id order
  annotations = [
    {
      'id': k,
      'image_id': im['id'],
      'category_id': 1 + k % 2,
      'bbox': [0, 0, 4, 4],
      'area': 16,
      'iscrowd': 0,
    }
    for k, im in enumerate(images + images)
  ]
  categories = [{'id': 1, 'name': 'a'}, {'id': 2, 'name': 'b'}]
  with open(path, 'w') as f:
    json.dump({'images': images, 'annotations': annotations, 'categories': categories}, f)
  return {im['id'] for im in images}


def _subset(path):
  with open(path) as f:
    coco = json.load(f)
  ids = {im['id'] for im in coco['images']}
  assert {a['image_id'] for a in coco['annotations']} <= ids
  assert sum(a['image_id'] in ids for a in coco['annotations']) == 2 * len(ids)
  assert len(coco['categories']) == 2  # labels do not change with the fraction
  return frozenset(ids)


def test_label_fraction_subsets_differ_between_seeds_and_repeat_per_seed(tmp_path):
  ann = str(tmp_path / 'train.json')
  all_ids = _write_coco(ann)
  seeds = range(4)
  first = {s: _subset(compare.label_subset(ann, 0.3, s, str(tmp_path / 'a'))) for s in seeds}
  again = {s: _subset(compare.label_subset(ann, 0.3, s, str(tmp_path / 'b'))) for s in seeds}
  assert first == again  # a fresh directory, same seed: the same images
  for s in seeds:
    assert len(first[s]) == 6 and first[s] <= all_ids
  assert len(set(first.values())) == len(first)  # every seed its own subset
  assert compare.label_subset(ann, 1.0, 0, str(tmp_path / 'a')) == ann  # all labels


def test_fine_tuning_runs_of_one_seed_share_the_label_subset(tmp_path):
  ann = str(tmp_path / 'train.json')
  _write_coco(ann)
  config = compare_configs.get_config('demo')
  config.finetune.data.ann_file = ann
  subsets = str(tmp_path / 'subsets')

  def run_ids(arm, seed):
    c = compare.finetune_config(config, arm, seed, 0.5, '', str(tmp_path / arm), subsets)
    assert c.seed == seed
    return _subset(c.data.ann_file)

  for seed in (0, 1):
    assert run_ids('updetr', seed) == run_ids('scratch', seed)  # arms share labels
  assert run_ids('scratch', 0) != run_ids('scratch', 1)


# ---------------------------------------------------------------- 3. lr schedule


def test_lr_drops_by_the_factor_at_the_epoch_boundary():
  spe, base = 5, 1e-3
  sched = optim.lr_schedule(base, spe, [2], gamma=0.1)
  # Updates 0..9 (epochs 0 and 1) at the base lr; from update 10 (epoch 2) x 0.1.
  got = [float(sched(i)) for i in range(14)]
  np.testing.assert_allclose(got, [base] * 10 + [base * 0.1] * 4, rtol=1e-6)


def test_optimizer_applies_the_dropped_lr_from_the_first_step_of_the_drop_epoch():
  spe, lr = 4, 1e-2
  config = ml_collections.ConfigDict(
    dict(lr=lr, lr_backbone=lr / 10, lr_drop_epochs=(1,), clip_max_norm=0.0, weight_decay=0.0)
  )
  params = {'query_embed': jnp.zeros(3), 'body': jnp.zeros(3)}
  tx, _ = optim.make_optimizer(config, params, spe)
  state = tx.init(params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)  # constant: Adam's step = lr
  sizes = []
  for _ in range(2 * spe):
    updates, state = tx.update(grads, state, params)
    sizes.append(
      [float(jnp.abs(updates['query_embed']).max()), float(jnp.abs(updates['body']).max())]
    )
  want = [[lr, lr / 10]] * spe + [[lr / 10, lr / 100]] * spe  # steps 1-4, then 5-8
  np.testing.assert_allclose(sizes, want, rtol=1e-4)


# ---------------------------------------------------------------- 4. checksum order


def test_checksum_changes_when_the_same_values_are_stored_in_another_order():
  a = np.arange(64, dtype=np.float32).reshape(8, 8) * 0.5 - 3
  top, bottom = a[:4], a[4:]
  left, right = a[:, :4], a[:, 4:]
  block = [[a[4 * i : 4 * i + 4, 4 * j : 4 * j + 4] for j in range(2)] for i in range(2)]
  reordered = {
    'row blocks swapped': np.concatenate([bottom, top]),
    'column blocks swapped': np.concatenate([right, left], axis=1),
    'transposed': a.T.copy(),
    # The shards of a 2 x 2 sharding put back in transposed order (blocks (0, 1) and
    # (1, 0) swapped, each block itself intact).
    'shard order transposed': np.block([[block[0][0], block[1][0]], [block[0][1], block[1][1]]]),
    'two elements swapped': a.reshape(-1)[[1, 0, *range(2, 64)]].reshape(8, 8),
  }
  record = integrity.make_record({'w': a})
  base = record['arrays']['w']['checksum']
  assert integrity.array_checksums({'w': a.copy()})['w'] == base
  assert integrity.value_diff(record, {'w': jnp.asarray(a)}) == []
  for name, b in reordered.items():
    assert sorted(b.reshape(-1)) == sorted(a.reshape(-1)) and b.shape == a.shape, name
    assert integrity.array_checksums({'w': b})['w'] != base, name
    problems = integrity.value_diff(record, {'w': b})
    assert len(problems) == 1 and problems[0].startswith('w: values differ'), name
  # Bytes too: an int8 array with its halves swapped.
  c = np.arange(16, dtype=np.int8)
  d = np.concatenate([c[8:], c[:8]])
  assert integrity.array_checksums({'c': c}) != integrity.array_checksums({'c': d})


# ---------------------------------------------------------------- 5. one-shot query size


def test_box_with_only_one_side_at_least_query_min_size_is_not_a_query():
  min_size = 8
  # Image 0: the target image (a cat). Images 1-4: one other cat box each.
  boxes = np.array(
    [
      [0, 0, 20, 20],  # image 0: big (a query for the others)
      [0, 0, 30, 5],  # image 1: wide but 5 px tall
      [0, 0, 5, 30],  # image 2: tall but 5 px wide
      [10, 10, 18, 17.5],  # image 3: 8 x 7.5
      [2, 2, 10, 10],  # image 4: 8 x 8, exactly the minimum: a query
    ],
    np.float32,
  )
  ann = detection.Annotations(
    boxes=boxes,
    labels=np.full(5, 3, np.int32),
    offsets=np.arange(6, dtype=np.int64),
    image_ids=np.arange(10, 15, dtype=np.int64),
    dropped={},
  )
  protocol = oneshot.OneShotProtocol(ann, np.ones(5, bool), min_size)
  assert protocol.pool[3].tolist() == [0, 4]
  # Image 0's only query is image 4's box; images 1-3 still get image 0's / 4's.
  for seed in range(5):
    image, label = protocol.evaluation_trials()
    rows = protocol.evaluation_queries(image, label, seed)
    assert rows[0] == 4 and set(rows[1:].tolist()) <= {0, 4}
    _, rows = protocol.training_choices(np.arange(5), seed=seed, epoch=0)
    assert rows[0] == 4 and set(rows.tolist()) <= {0, 4}
  # Without image 4, image 0 has no query anywhere.
  protocol = oneshot.OneShotProtocol(ann, np.array([1, 1, 1, 1, 0], bool), min_size)
  assert not protocol.has_query(3, 0)
  assert protocol.has_query(3, 1)


# ---------------------------------------------------------------- 6. stage-0 BatchNorm


def test_stage0_batchnorm_running_statistics_keep_09_and_take_01():
  """One training-mode pass: running = 0.9 x running + 0.1 x batch statistic, per
  channel, for the CNN's first BatchNorm and the projection head's. The batch
  variance is the biased one (Flax; torch's running_var takes the unbiased one)."""
  from updetr_jax.tasks.simclr import SimCLRNet  # noqa: PLC0415

  model = SimCLRNet(backbone='resnet_tiny')
  x = jnp.asarray(np.random.default_rng(0).normal(1.0, 2.0, size=(4, 32, 32, 3)), jnp.float32)
  v = model.init(jax.random.PRNGKey(0), x, train=False)
  # Non-trivial running statistics before the step.
  stats = jax.tree_util.tree_map_with_path(
    lambda p, s: jnp.full_like(s, 0.5 if p[-1].key == 'mean' else 2.0), v['batch_stats']
  )
  _, new = model.apply(
    {'params': v['params'], 'batch_stats': stats},
    x,
    train=True,
    mutable=['batch_stats', 'intermediates'],
    capture_intermediates=lambda m, _: m.name in ('conv1', 'projection_head_0'),
  )
  cases = {
    'bn1': (
      new['intermediates']['backbone']['conv1']['__call__'],
      new['batch_stats']['backbone']['bn1'],
    ),
    'projection_head_1': (
      new['intermediates']['projection_head_0']['__call__'],
      new['batch_stats']['projection_head_1'],
    ),
  }
  for name, ((inputs,), got) in cases.items():
    h = np.asarray(inputs, np.float64).reshape(-1, inputs.shape[-1])
    np.testing.assert_allclose(got['mean'], 0.9 * 0.5 + 0.1 * h.mean(0), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(got['var'], 0.9 * 2.0 + 0.1 * h.var(0), rtol=1e-5, err_msg=name)


# ---------------------------------------------------------------- 7. non-finite gradient


class _Sqrt(nn.Module):
  """A 'model' of two parameters (initialised to ``w0``), ignoring its inputs."""

  w0: float = 0.0

  @nn.compact
  def __call__(self, images, padding_mask, patches=None, train=False):
    del images, padding_mask, patches, train
    return self.param('w', nn.initializers.constant(self.w0), (2,))


def _sqrt_loss(out, targets):
  del targets
  loss = jnp.sqrt(out).sum()  # finite at 0; its gradient 1 / (2 sqrt(0)) is not
  return loss, {'loss_sqrt': loss}


@pytest.mark.parametrize('init', [0.0, 1.0])
def test_finite_loss_with_non_finite_gradient_stops_the_run(init):
  model = _Sqrt(init)
  batch = {
    'images': jnp.zeros((1, 4, 4, 3)),
    'padding_mask': jnp.zeros((1, 4, 4), bool),
    'targets': {},
  }
  params = model.init(jax.random.PRNGKey(0), batch['images'], batch['padding_mask'])['params']
  tx = optax.sgd(0.1)
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}
  constants = {'frozen': {}, 'batch_stats': {}}
  step = jax.jit(train_step.make_train_step(model, tx, _sqrt_loss))
  new, metrics = step(state, constants, batch, jax.random.PRNGKey(0))
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics['loss'])
  assert int(new['step']) == 1
  if init == 0.0:  # sqrt at 0: finite loss, infinite gradient
    assert not np.isfinite(metrics['grad_norm'])
    assert not bool(metrics['finite'])
    np.testing.assert_array_equal(new['params']['w'], params['w'])  # not applied
    with pytest.raises(FloatingPointError, match='at step 1'):
      train_step.check_finite(metrics, 1)
  else:  # the control: an ordinary step is applied and the run goes on
    assert bool(metrics['finite'])
    np.testing.assert_allclose(new['params']['w'], [1 - 0.1 * 0.5] * 2, rtol=1e-6)
    train_step.check_finite(metrics, 1)
