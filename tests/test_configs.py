"""Config files: release hyper-parameters and the fine-tuning parameter groups."""

import pytest

from updetr_jax.configs import finetune_coco, finetune_voc, pretrain
from updetr_jax import optim
from updetr_jax.models import build_model
from updetr_jax.models import variable_shapes


def test_release_defaults():
  p = pretrain.get_config()
  assert (p.model.pre_norm, p.model.num_queries, p.model.num_patches, p.model.num_classes) == (
    True,
    100,
    10,
    2,
  )
  assert p.optim.lr == 1e-4 and p.optim.clip_max_norm == 0.1 and p.batch_size == 256
  assert pretrain.get_config('single_query').model.num_patches == 1
  c = finetune_coco.get_config()
  assert (c.model.pre_norm, c.model.num_classes, c.optim.lr_backbone) == (True, 91, 5e-5)
  assert finetune_coco.get_config('150ep').optim.lr_drop_epochs == (100,)
  assert finetune_voc.get_config().model.num_classes == 20
  for module in (pretrain, finetune_coco, finetune_voc):
    with pytest.raises(ValueError, match='unknown variant'):
      module.get_config('nope')


def _patch_options(config):
  m = config.model
  return (m.patch_feature_norm, m.patch_content, m.value_pos, config.matcher.group_matching)


def test_patch_options_are_the_demos_and_off_in_the_release_configs():
  from updetr_jax.configs import compare  # noqa: PLC0415

  assert _patch_options(pretrain.get_config('demo')) == (True,) * 4
  for variant in ('imagenet', 'single_query', 'mosaics'):
    assert _patch_options(pretrain.get_config(variant)) == (False,) * 4, variant
  # The comparison pre-trains the demo's model with the release's patch path.
  for variant in compare.VARIANTS:
    assert _patch_options(compare.get_config(variant).pretrain) == (False,) * 4, variant


def test_finetune_freezes_exactly_stem_and_stage1():
  config = finetune_coco.get_config()
  config.model.update(enc_layers=1, dec_layers=1)
  params = variable_shapes(build_model(config.model))['params']
  trainable, frozen = optim.partition_params(params, config.optim.frozen)
  frozen_modules = {k for k in frozen['body']}
  assert frozen_modules == {'conv1', 'layer1_0', 'layer1_1', 'layer1_2'}
  assert {'layer2_0', 'layer3_5', 'layer4_2'} <= set(trainable['body'])
  assert 'transformer' in trainable and 'transformer' not in frozen


def test_random_real_size_cnn_is_refused(tmp_path):
  """A resnet50/101 run that would keep a random CNN stops before anything runs."""
  from updetr_jax import initial_weights, train  # noqa: PLC0415

  for config in (
    pretrain.get_config(),
    pretrain.get_config('single_query'),
    finetune_coco.get_config(),
    finetune_voc.get_config(),
  ):
    with pytest.raises(ValueError, match=r'init\.backbone_checkpoint.*SwAV.*random_backbone'):
      initial_weights.check_backbone_init(config, resuming=False)
    initial_weights.check_backbone_init(config, resuming=True)  # a resumed run has its weights
    for field, value in (
      ('backbone_checkpoint', 'swav.pth'),
      ('pretrained', '/w'),
      ('checkpoint', '/v'),
      ('random_backbone', True),
    ):
      c = config.copy_and_resolve_references()
      c.init[field] = value
      initial_weights.check_backbone_init(c, resuming=False)
  initial_weights.check_backbone_init(pretrain.get_config('demo'), resuming=False)  # small CNN
  with pytest.raises(ValueError, match='random weights'):  # the loop refuses it first
    train.run(pretrain.get_config(), str(tmp_path / 'w'))


def test_coco_epoch_is_every_train2017_image():
  """The pipeline keeps images without boxes (as the release), so an epoch is all
  118,287 train2017 images; the lr drop epoch is computed from that count."""
  c = finetune_coco.get_config()
  assert c.examples_per_epoch == 118287
  steps_per_epoch = 118287 // 16
  assert c.eval.every_steps == 5 * steps_per_epoch


def test_pretraining_evaluation_images_are_never_trained_on():
  from updetr_jax.data import eval_data_config  # noqa: PLC0415

  demo = pretrain.get_config('demo')
  cfg, held_out = eval_data_config(demo.data)
  assert held_out and cfg['demo_images'] == tuple(demo.data.eval_demo_images)
  assert not set(cfg['demo_images']) & set(demo.data.demo_images)
  assert demo.examples_per_epoch == len(demo.data.demo_images) * demo.data.demo_repeats
  cfg, held_out = eval_data_config(pretrain.get_config().data)  # ImageNet
  assert held_out and (cfg['tfds_split'], cfg['tfds_name']) == ('validation', 'imagenet2012')
  folder = dict(source='folder', folder='/train')
  assert eval_data_config(folder) == (eval_data_config(folder)[0], False)
  cfg, held_out = eval_data_config(dict(folder, eval_folder='/val'))
  assert held_out and cfg['folder'] == '/val'
  with pytest.raises(ValueError, match='share'):
    eval_data_config(dict(demo.data.to_dict(), eval_demo_images=('astronaut',)))
