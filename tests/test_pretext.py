"""The learnability benchmark's pieces: the mosaics, group matching, the patch-feature
standardisation and its calibration, query shuffling, and the wrong-patch control of
the pre-training evaluation."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from updetr_jax import matching, sharding, train_step
from updetr_jax.configs import pretrain
from updetr_jax.data import eval_data_config, mosaic_data_config, mosaics, resolve_config, sources
from updetr_jax.models import build_model, init_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAMP_STEPS = 300  # test_pretraining_makes_the_answer_depend_on_the_patches
sys.path.insert(0, os.path.join(ROOT, 'tests'))
from test_train import fixed_batch  # noqa: E402
from test_train import tiny_config as demo_tiny_config  # noqa: E402
from data_helpers import model_batch  # noqa: E402


def tiny_config():
  """The tiny demo model with the release's patch path: each test here turns on the
  option it checks (the demo itself runs pretrain.use_patch_options)."""
  config = demo_tiny_config()
  pretrain.use_patch_options(config, on=False)
  return config


def test_mosaics_are_deterministic_and_the_splits_differ(tmp_path):
  a = mosaics.mosaic_arrays('train', 3, seed=0, image_size=(40, 48))
  b = mosaics.mosaic_arrays('train', 3, seed=0, image_size=(40, 48))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert a[0].shape == (40, 48, 3) and a[0].dtype == np.uint8
  held_out = mosaics.mosaic_arrays('eval', 3, seed=0, image_size=(40, 48))
  other_seed = mosaics.mosaic_arrays('train', 3, seed=1, image_size=(40, 48))
  for x in a:
    assert not any(np.array_equal(x, y) for y in held_out + other_seed)
  # Distinct colours: every image has at least CELLS[0] of them.
  assert all(len(np.unique(x.reshape(-1, 3) // 32, axis=0)) >= mosaics.CELLS[0] for x in a)
  paths = mosaics.write_mosaics(str(tmp_path), num_train=2, num_eval=1, image_size=(40, 48))
  from PIL import Image

  names = sorted(os.listdir(paths['train']))
  assert len(names) == 2 and len(os.listdir(paths['eval'])) == 1
  # PNG is lossless: the files hold the arrays the in-memory source renders.
  assert np.array_equal(np.asarray(Image.open(os.path.join(paths['train'], names[1]))), a[1])


def test_ramp_images_code_the_position_in_their_colour():
  (img,) = mosaics.mosaic_arrays('train', 1, seed=0, image_size=(40, 48), style='ramp')
  red, green = img[..., 0].astype(float), img[..., 1].astype(float)
  assert np.all(np.diff(red.mean(0)) > 0) and np.all(np.diff(green.mean(1)) > 0)
  other = mosaics.mosaic_arrays('train', 1, seed=0, image_size=(40, 48))[0]
  assert not np.array_equal(img, other)
  with pytest.raises(ValueError, match='mosaic_style'):
    mosaics.render_mosaic(np.random.default_rng(0), 8, 8, 'stripes')


def test_rotated_ramp_codes_the_position_in_a_frame_of_its_own():
  """'rotated_ramp': red and green are one linear function of the position per image
  (a least-squares plane explains them up to the noise), the planes differ between
  images, so the same colour sits at different places in different images."""
  imgs = mosaics.mosaic_arrays('train', 3, seed=0, image_size=(40, 48), style='rotated_ramp')
  yy, xx = np.meshgrid(np.arange(40), np.arange(48), indexing='ij')
  design = np.stack([xx.ravel(), yy.ravel(), np.ones(xx.size)], 1)
  planes = []
  for img in imgs:
    rg = img[..., :2].reshape(-1, 2).astype(float) / 255.0
    coef, *_ = np.linalg.lstsq(design, rg, rcond=None)
    resid = rg - design @ coef
    assert resid.std() < 2 * mosaics.NOISE, resid.std()  # linear in the position
    # Both directions present and not parallel: the colour gives the position.
    assert abs(np.linalg.det(coef[:2])) > 1e-5, coef
    planes.append(coef[:2])
  assert not np.allclose(planes[0], planes[1], atol=1e-3)
  assert not np.allclose(planes[1], planes[2], atol=1e-3)


def test_mosaic_cells_sets_the_number_of_cells_through_the_data_config():
  def boundary(img):  # the fraction of 4x4 blocks beside a cell boundary (a colour step)
    blocks = img.astype(float).reshape(32, 4, 40, 4, 3).mean((1, 3))
    return float((np.abs(np.diff(blocks, axis=1)).max(-1) > 12).mean())

  default = mosaics.mosaic_arrays('eval', 4, seed=0)
  dense = mosaics.mosaic_arrays('eval', 4, seed=0, cells=(30, 50))
  # Boundary length grows as sqrt(cells): (40 / 8) ** 0.5 = 2.2 (measured 2.4).
  ratio = np.mean([boundary(x) for x in dense]) / np.mean([boundary(x) for x in default])
  assert ratio > 1.8, ratio
  cfg = dict(eval_data_config(mosaic_data_config())[0], mosaic_cells=[30, 50], mosaic_count=2)
  src = sources.make_source(resolve_config(cfg))
  assert np.array_equal(src.python_load(1), dense[1])
  with pytest.raises(ValueError, match='mosaic_cells'):
    mosaics.render_mosaic(np.random.default_rng(0), 8, 8, 'cells', (5, 4))


def test_mosaic_evaluation_is_held_out():
  cfg, held_out = eval_data_config(mosaic_data_config())
  assert held_out and cfg['mosaic_split'] == 'eval'
  assert cfg['mosaic_count'] == mosaic_data_config().mosaic_eval_count


def _outputs_with_far_groups():
  """4 queries in 2 groups; target 0's box is predicted by query 2 (group 1), target
  1's by query 0 (group 0): the free matching crosses the groups."""
  boxes = np.array(
    [[0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9], [0.2, 0.2, 0.2, 0.2], [0.5, 0.5, 0.8, 0.8]]
  )
  outputs = {
    'pred_logits': jnp.zeros((1, 4, 3)),
    'pred_boxes': jnp.asarray(boxes[None], jnp.float32),
  }
  targets = {
    'boxes': jnp.asarray([[[0.2, 0.2, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]]], jnp.float32),
    'labels': jnp.ones((1, 2), jnp.int32),
    'mask': jnp.ones((1, 2), bool),
  }
  return outputs, targets


@pytest.mark.parametrize('solver', ['exact', 'scipy'])
def test_group_matching_keeps_each_patch_in_its_group(solver):
  outputs, targets = _outputs_with_far_groups()
  free = np.asarray(matching.hungarian_match(outputs, targets, solver=solver))
  assert free.tolist() == [[2, 0]]
  grouped = np.asarray(matching.hungarian_match(outputs, targets, solver=solver, num_groups=2))
  assert grouped[0, 0] in (0, 1) and grouped[0, 1] in (2, 3), grouped
  # The best within-group queries: target 0 -> query 0 or 1 by cost, target 1 -> 2 or 3.
  cost = np.asarray(
    matching.match_cost(
      outputs['pred_logits'],
      outputs['pred_boxes'],
      targets['labels'],
      targets['boxes'],
      targets['mask'],
    )
  )[0]
  assert grouped[0, 0] == np.argmin(cost[:2, 0]) and grouped[0, 1] == 2 + np.argmin(cost[2:, 1])


def test_group_matching_reaches_the_loss_from_the_config():
  config = tiny_config()
  outputs, targets = _outputs_with_far_groups()
  outputs['pred_logits'] = jnp.zeros((1, 4, config.model.num_classes + 1))
  config.loss_replicas = 1
  config.model.update(num_patches=2, feature_recon=False)
  _, free = train_step.criterion(config)(outputs, targets)
  config.matcher.group_matching = True
  _, grouped = train_step.criterion(config)(outputs, targets)
  # Matched within the groups, the boxes are far from their targets.
  assert float(grouped['loss_bbox']) > float(free['loss_bbox']) + 0.5


def _plain_and_with(base=None, **option):
  """(inputs, variables, the tiny model (with the model fields ``base``), the same model
  with ``option`` set)."""
  config = tiny_config()
  config.model.update(patch_query_drop=0.0, dropout=0.0, **(base or {}))
  batch = fixed_batch()
  args = (batch['images'], batch['padding_mask'], batch['patches'])
  plain = build_model(config.model)
  variables = init_variables(plain, jax.random.PRNGKey(0))
  config.model.update(option)
  return args, variables, plain, build_model(config.model)


def test_query_shuffle_permutes_embeddings_in_training_only():
  args, variables, plain, shuffled = _plain_and_with(query_shuffle=True)

  def boxes(model, train, seed):
    out = model.apply(variables, *args, train=train, rngs={'dropout': jax.random.PRNGKey(seed)})
    return np.asarray(out['pred_boxes'])

  np.testing.assert_array_equal(boxes(shuffled, False, 0), boxes(plain, False, 0))
  np.testing.assert_array_equal(boxes(plain, True, 0), boxes(plain, True, 1))
  a, b = boxes(shuffled, True, 0), boxes(shuffled, True, 1)
  assert np.abs(a - b).max() > 1e-4


def _mosaic_tiny_config():
  config = tiny_config()
  config.data = mosaic_data_config()
  config.data.update(
    mosaic_count=8,
    mosaic_eval_count=4,
    mosaic_size=(64, 80),
    scales=(64,),
    max_size=80,
    eval_scale=64,
    buckets=((64, 80),),
    patch_size=16,
  )
  config.examples_per_epoch = 8
  config.model.patch_feature_norm = True
  return config


def test_patch_norm_calibration_standardises_the_training_patch_features():
  from updetr_jax.tasks import pretrain as task_module

  config = _mosaic_tiny_config()
  mesh = sharding.make_mesh()
  task = task_module.PatchTask(config, NamedSharding(mesh, P('data')))
  model = build_model(config.model)
  variables = init_variables(model, jax.random.PRNGKey(0))
  stats = variables['batch_stats']['patch_norm']
  assert float(jnp.abs(stats['mean']).max()) == 0.0  # identity until calibrated
  calibrated = task.calibrate(model, variables)
  it, _ = task.train_data(0)
  feats = [
    model.apply(
      calibrated, model_batch(next(it), config.data, True)['patches'], method='patch_features'
    )
    for _ in range(task_module.CALIBRATION_BATCHES)
  ]
  it.close()
  feats = jnp.concatenate([f.reshape(-1, f.shape[-1]) for f in feats])
  normed = np.asarray(model.apply(calibrated, feats, method=lambda m, x: m.patch_norm(x)))
  varying = np.asarray(feats).std(0) > 0.05  # eps 1e-5 bends the nearly constant ones
  assert varying.sum() >= 8
  np.testing.assert_allclose(normed.mean(0)[varying], 0.0, atol=1e-3)
  np.testing.assert_allclose(normed.std(0)[varying], 1.0, atol=1e-2)
  # Only the statistics change.
  np.testing.assert_array_equal(
    np.asarray(calibrated['params']['patch2query']['kernel']),
    np.asarray(variables['params']['patch2query']['kernel']),
  )
  # Without the option the model has no patch_norm and calibrate changes nothing.
  config.model.patch_feature_norm = False
  plain = build_model(config.model)
  plain_vars = init_variables(plain, jax.random.PRNGKey(0))
  assert 'patch_norm' not in plain_vars['batch_stats']
  assert task.calibrate(plain, plain_vars) is plain_vars


def _batchnorm_outputs(model, variables, images, padding_mask):
  """{FrozenBatchNorm path: its output [n_valid_pixels, C]} of the backbone on images."""
  import flax.linen as nn

  from updetr_jax.models.resnet import FrozenBatchNorm, downsample_mask

  out = {}

  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if isinstance(context.module, FrozenBatchNorm):
      valid = ~np.asarray(downsample_mask(jnp.asarray(padding_mask), y.shape[1:3]))
      out[tuple(context.module.path)] = np.asarray(y)[valid]
    return y

  with nn.intercept_methods(record):
    model.apply(variables, images, method=lambda m, x: m.body(x))
  return out


def test_backbone_calibration_standardises_every_batchnorm_on_the_training_images():
  from updetr_jax.tasks import pretrain as task_module

  config = _mosaic_tiny_config()
  config.model.patch_feature_norm = False
  config.init.calibrate_backbone_bn = True
  config.data.scales = (48, 64)  # some images padded in their 64 x 80 bucket
  task = task_module.PatchTask(config, NamedSharding(sharding.make_mesh(), P('data')))
  model = build_model(config.model)
  variables = init_variables(model, jax.random.PRNGKey(0))
  calibrated = task.calibrate(model, variables)
  it, _ = task.train_data(0)
  batches = [
    model_batch(next(it), config.data, True) for _ in range(task_module.CALIBRATION_BATCHES)
  ]
  it.close()
  images = np.concatenate([b['images'] for b in batches])
  mask = np.concatenate([b['padding_mask'] for b in batches])
  assert mask.any()  # padded pixels are in the batches, and must be left out
  before = _batchnorm_outputs(model, variables, images, mask)
  after = _batchnorm_outputs(model, calibrated, images, mask)
  # resnet_tiny: the stem, then 4 blocks of 3 plus a downsample each.
  assert len(after) == 17 and set(after) == set(before)
  for path, y in after.items():
    # Every layer's output, on the valid pixels of the calibration images: centred
    # and of unit variance per channel (scale 1, bias 0 at init), up to the
    # per-batch averaging.
    np.testing.assert_allclose(y.mean(0), 0.0, atol=0.15, err_msg=str(path))
    np.testing.assert_allclose(y.std(0), 1.0, atol=0.15, err_msg=str(path))
  # The random CNN was far from that before.
  last = max(before, key=lambda p: np.abs(before[p].mean(0)).max())
  assert np.abs(before[last].mean(0)).max() > 0.5
  np.testing.assert_array_equal(  # only statistics change
    np.asarray(calibrated['params']['body']['conv1']['kernel']),
    np.asarray(variables['params']['body']['conv1']['kernel']),
  )
  config.init.calibrate_backbone_bn = False
  assert task.calibrate(model, variables) is variables


def _eval_ious(scale_patch2query: float):
  from updetr_jax.tasks import pretrain as task_module

  config = tiny_config()
  model = build_model(config.model)
  variables = init_variables(model, jax.random.PRNGKey(0))
  p2q = variables['params']['patch2query']
  params = dict(
    variables['params'],
    patch2query={k: v * scale_patch2query for k, v in p2q.items()},
  )
  variables = dict(variables, params=params)
  batch = fixed_batch()
  ious, _ = task_module.make_eval_step(model, config.model.num_patches)(variables, batch)
  return {k: np.asarray(v) for k, v in ious.items()}


def test_wrong_patch_control_scores_the_answer_with_other_images_patches():
  # A model that ignores its patches gives the same answer with any patches.
  ious = _eval_ious(0.0)
  np.testing.assert_array_equal(ious['group_top_wrong_patches'], ious['group_top'])
  np.testing.assert_array_equal(ious['group_best_wrong_patches'], ious['group_best'])
  # One whose queries are driven by the patches does not.
  ious = _eval_ious(300.0)
  assert np.abs(ious['group_top_wrong_patches'] - ious['group_top']).max() > 1e-3
  assert np.abs(ious['group_best_wrong_patches'] - ious['group_best']).max() > 1e-3


def test_one_shot_init_refuses_patch2query_without_its_statistics():
  from updetr_jax import pretrained

  config = tiny_config()
  config.model.patch_feature_norm = True
  source = init_variables(build_model(config.model), jax.random.PRNGKey(0))
  config.model.update(patch_feature_norm=False, num_patches=1, feature_head=False)
  target = init_variables(build_model(config.model), jax.random.PRNGKey(1))
  with pytest.raises(ValueError, match='patch_feature_norm=True'):
    pretrained.init_from_pretrained(target, dict(config.model), source, None)
  # With the option on both sides the statistics come along.
  config.model.patch_feature_norm = True
  target = init_variables(build_model(config.model), jax.random.PRNGKey(1))
  out, _ = pretrained.init_from_pretrained(target, dict(config.model), source, None)
  assert 'patch_norm' in out['batch_stats']


def test_pretraining_makes_the_answer_depend_on_the_patches(tmp_path):
  """On 'ramp' images (colour = position: the patch alone gives its box), a short
  pre-training must make each patch's answer (group_top) better with the image's own
  patches than with other images' patches. A model whose patch features never reach
  its queries cannot: both are its box prior."""
  from updetr_jax import train

  config = _mosaic_tiny_config()
  config.data.update(mosaic_style='ramp', mosaic_count=64, mosaic_eval_count=16)
  config.examples_per_epoch = 64
  config.model.patch_query_drop = 0.0
  config.matcher.group_matching = True
  config.optim.lr = 1e-3
  config.num_train_steps = RAMP_STEPS
  config.checkpoint_every_steps = RAMP_STEPS
  config.log_every_steps = RAMP_STEPS
  config.eval.update(num_batches=4, every_steps=0)
  summary = train.run(config, str(tmp_path))
  before, after = summary['patch_eval_before'], summary['patch_eval_after']
  assert abs(before['group_top'] - before['group_top_wrong_patches']) < 0.02
  # Measured: 0.368 vs 0.303 after 300 steps; exactly equal with the patches unused.
  assert after['group_top'] > after['group_top_wrong_patches'] + 0.03, after
  # The run ends with its reading guide, on this run's final figures.
  assert (
    f'matched {after["matched"]:.3f}, group_top {after["group_top"]:.3f}' in (summary['reading'][2])
  )


@pytest.mark.parametrize('pre_norm', [True, False])
def test_value_pos_puts_positions_into_the_cross_attention_values_only(pre_norm):
  args, variables, plain, with_pos = _plain_and_with(dict(pre_norm=pre_norm), value_pos=True)
  assert with_pos.pre_norm == pre_norm and with_pos.value_pos
  # Same parameters: a checkpoint loads either way.
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
    init_variables(with_pos, jax.random.PRNGKey(0))
  )
  a, b = plain.apply(variables, *args), with_pos.apply(variables, *args)
  assert np.abs(np.asarray(a['pred_boxes']) - np.asarray(b['pred_boxes'])).max() > 1e-4

  # The encoder (memory) is untouched: only the decoder's values change.
  def memory(m):
    src, padding, pos = m.encode_image(args[0], args[1])
    queries = jnp.broadcast_to(
      m.query_embed.embedding, (src.shape[0],) + m.query_embed.embedding.shape
    )
    return m.transformer(src, padding, pos, queries)[1]

  np.testing.assert_array_equal(
    np.asarray(plain.apply(variables, method=memory)),
    np.asarray(with_pos.apply(variables, method=memory)),
  )


def test_patch_content_starts_the_decoder_content_with_the_patch_queries():
  import flax.linen as nn
  from updetr_jax.models import transformer

  args, variables, plain, with_content = _plain_and_with(patch_content=True)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
    init_variables(with_content, jax.random.PRNGKey(0))
  )

  def decoder_input(model):
    seen = []

    def record(next_fun, a, kw, context):
      if isinstance(context.module, transformer.Decoder) and context.method_name == '__call__':
        seen.append(np.asarray(a[0]))
      return next_fun(*a, **kw)

    with nn.intercept_methods(record):
      model.apply(variables, *args)
    return seen[0]

  def patch_queries(m, patches):
    q = m.patch2query(m.patch_features(patches))
    return jnp.repeat(q, m.num_queries // m.num_patches, axis=1)

  expected = np.asarray(with_content.apply(variables, args[2], method=patch_queries))
  k = args[2].shape[1]
  np.testing.assert_array_equal(decoder_input(plain), 0.0)  # the release: zeros
  np.testing.assert_allclose(decoder_input(with_content), expected, 1e-6)
  assert decoder_input(with_content).shape[1] == k * (plain.num_queries // plain.num_patches)


def test_wrong_patch_control_gives_each_image_other_images_patches():
  from updetr_jax.tasks import pretrain as task_module

  seen = []

  class Recorder:
    """Stands in for the model: records the patches of each call."""

    def apply(self, variables, images, padding_mask, patches, train=False):
      seen.append(patches)
      b = images.shape[0]
      return {'pred_logits': jnp.zeros((b, 4, 3)), 'pred_boxes': jnp.full((b, 4, 4), 0.5)}

  batch = fixed_batch(batch=4, num_patches=2)
  step = task_module.make_eval_step(Recorder(), 2)
  with jax.disable_jit():
    step(None, batch)
  own, wrong = (np.asarray(p) for p in seen)
  np.testing.assert_array_equal(own, batch['patches'])
  for i in range(len(own)):
    for k in range(own.shape[1]):
      # Image i's k-th wrong patch is a patch of another image, never one of its own.
      assert not any(np.array_equal(wrong[i, k], own[i, j]) for j in range(own.shape[1]))
      assert any(np.array_equal(wrong[i, k], own[i2, k]) for i2 in range(len(own)) if i2 != i)


def _pretraining_and_one_shot(field: str):
  """A tiny pre-training with ``field`` True and a one-shot model with it False:
  (pre-trained variables, their model config, one-shot variables, its config)."""
  config = tiny_config()
  config.model[field] = True
  source = init_variables(build_model(config.model), jax.random.PRNGKey(0))
  source_config = dict(config.model)
  config.model.update({field: False, 'num_patches': 1, 'feature_head': False})
  target = init_variables(build_model(config.model), jax.random.PRNGKey(1))
  return source, source_config, target, config


def test_fine_tuning_refuses_a_pretraining_of_other_value_pos():
  from updetr_jax import pretrained

  source, source_config, target, config = _pretraining_and_one_shot('value_pos')
  with pytest.raises(ValueError, match='value_pos'):
    pretrained.init_from_pretrained(target, dict(config.model), source, source_config)
  # A config written before the field existed means value_pos=False.
  del source_config['value_pos']
  pretrained.init_from_pretrained(target, dict(config.model), source, source_config)


def test_one_shot_init_refuses_a_pretraining_of_other_patch_content():
  from updetr_jax import pretrained

  source, source_config, target, config = _pretraining_and_one_shot('patch_content')
  with pytest.raises(ValueError, match='patch_content: pre-trained True vs model False'):
    pretrained.init_from_pretrained(target, dict(config.model), source, source_config)
  config.model.patch_content = True
  pretrained.init_from_pretrained(target, dict(config.model), source, source_config)
  # DETR fine-tuning has no patches: the pre-training's patch_content does not matter.
  detr = tiny_config()
  detr.model.update(num_patches=0, feature_recon=False)
  target = init_variables(build_model(detr.model), jax.random.PRNGKey(2))
  detr_config = {k: v for k, v in dict(detr.model).items() if k != 'patch_content'}
  pretrained.init_from_pretrained(target, detr_config, source, source_config)
