"""Model-level checks that need no PyTorch: group mask, shapes, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from updetr_jax import build_model
from updetr_jax.models import group_attention_mask


@pytest.mark.parametrize('n', [12, 100])
def test_group_mask_for_every_divisor(n):
  for m in [d for d in range(1, n + 1) if n % d == 0]:
    mask = group_attention_mask(n, m)
    if m == 1:
      assert mask is None  # single-query pre-training: no mask
      continue
    g = n // m
    expected = np.kron(np.eye(m, dtype=bool), np.ones((g, g), bool))
    np.testing.assert_array_equal(mask, expected, err_msg=f'N={n} M={m}')


def test_group_mask_rejects_non_divisor():
  with pytest.raises(ValueError, match='num_queries=10 must be divisible by .*num_patches=3'):
    group_attention_mask(10, 3)


def _tiny(**kw):
  cfg = dict(
    backbone='resnet_tiny',
    dilation=False,
    position_embedding='sine',
    hidden_dim=16,
    nheads=2,
    enc_layers=1,
    dec_layers=2,
    dim_feedforward=32,
    dropout=0.1,
    num_queries=8,
    pre_norm=True,
    num_classes=2,
    aux_loss=True,
    num_patches=4,
  )
  cfg.update(kw)
  return cfg


def test_groups_do_not_see_each_other():
  """Changing patch 1 leaves the predictions of the other groups unchanged."""
  model = build_model(_tiny())
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((1, 64, 64, 3)), jnp.float32)
  mask = jnp.zeros((1, 64, 64), bool)
  patches = rng.standard_normal((1, 4, 32, 32, 3)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), images, mask, jnp.asarray(patches))
  a = model.apply(variables, images, mask, jnp.asarray(patches))
  patches[0, 1] += 1.0
  b = model.apply(variables, images, mask, jnp.asarray(patches))
  changed = np.abs(np.asarray(a['pred_boxes']) - np.asarray(b['pred_boxes'])).max(-1)[0] > 1e-6
  np.testing.assert_array_equal(changed, [False, False, True, True, False, False, False, False])


def test_training_mode_drops_patch_queries_with_rng():
  model = build_model(_tiny(dropout=0.0, patch_query_drop=0.5))
  images = jnp.ones((2, 64, 64, 3))
  mask = jnp.zeros((2, 64, 64), bool)
  patches = jnp.ones((2, 4, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), images, mask, patches)
  run = lambda k: model.apply(
    variables, images, mask, patches, train=True, rngs={'dropout': jax.random.PRNGKey(k)}
  )['pred_boxes']
  assert not np.allclose(run(1), run(2))  # a different keep mask per rng
  with pytest.raises(Exception):
    model.apply(variables, images, mask, patches, train=True)  # needs a dropout rng

  def train_out(drop, p):
    m = build_model(_tiny(dropout=0.0, patch_query_drop=drop))
    return np.asarray(
      m.apply(variables, images, mask, p, train=True, rngs={'dropout': jax.random.PRNGKey(1)})[
        'pred_boxes'
      ]
    )

  other = patches * 3.0 - 1.0
  # Every patch feature dropped: the patches no longer change the predictions.
  np.testing.assert_allclose(train_out(1.0, patches), train_out(1.0, other), atol=1e-6)
  # None dropped: training mode (dropout 0) predicts as evaluation mode does.
  np.testing.assert_allclose(
    train_out(0.0, patches),
    np.asarray(model.apply(variables, images, mask, patches)['pred_boxes']),
    atol=1e-6,
  )
  assert not np.allclose(train_out(0.0, patches), train_out(0.0, other))


def test_bad_inputs_name_the_problem():
  model = build_model(_tiny())
  images = jnp.ones((1, 64, 64, 3))
  variables = model.init(
    jax.random.PRNGKey(0), images, jnp.zeros((1, 64, 64), bool), jnp.ones((1, 4, 32, 32, 3))
  )
  with pytest.raises(ValueError, match='padding_mask must be'):
    model.apply(variables, images, jnp.zeros((1, 32, 32), bool), jnp.ones((1, 4, 32, 32, 3)))
  with pytest.raises(ValueError, match='K <= model.num_patches=4'):
    model.apply(variables, images, jnp.zeros((1, 64, 64), bool), jnp.ones((1, 5, 32, 32, 3)))
  with pytest.raises(ValueError, match='model.backbone'):
    build_model(_tiny(backbone='resnet7')).init(
      jax.random.PRNGKey(0), images, jnp.zeros((1, 64, 64), bool), jnp.ones((1, 4, 32, 32, 3))
    )
