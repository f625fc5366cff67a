"""Config files: release hyper-parameters and the fine-tuning parameter groups."""
import pytest

from configs import finetune_coco, finetune_voc, pretrain
from updetr_jax import optim
from updetr_jax.models import build_model
from updetr_jax.torch_import import variable_shapes


def test_release_defaults():
  p = pretrain.get_config()
  assert (p.model.pre_norm, p.model.num_queries, p.model.num_patches, p.model.num_classes) == (
      True, 100, 10, 2)
  assert p.optim.lr == 1e-4 and p.optim.clip_max_norm == 0.1 and p.batch_size == 256
  assert pretrain.get_config('single_query').model.num_patches == 1
  c = finetune_coco.get_config()
  assert (c.model.pre_norm, c.model.num_classes, c.optim.lr_backbone) == (True, 91, 5e-5)
  assert finetune_coco.get_config('150ep').optim.lr_drop_epochs == (100,)
  assert finetune_voc.get_config().model.num_classes == 20
  for module in (pretrain, finetune_coco, finetune_voc):
    with pytest.raises(ValueError, match='unknown variant'):
      module.get_config('nope')


def test_finetune_freezes_exactly_stem_and_stage1():
  config = finetune_coco.get_config()
  config.model.update(enc_layers=1, dec_layers=1)
  params = variable_shapes(build_model(config.model))['params']
  trainable, frozen = optim.partition_params(params, config.optim.frozen)
  frozen_modules = {k for k in frozen['body']}
  assert frozen_modules == {'conv1', 'layer1_0', 'layer1_1', 'layer1_2'}
  assert {'layer2_0', 'layer3_5', 'layer4_2'} <= set(trainable['body'])
  assert 'transformer' in trainable and 'transformer' not in frozen
