"""Small building blocks shared by the detector heads and the transformer."""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def _uniform_bias(fan_in: int) -> Callable:
  """torch.nn.Linear / Conv bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / max(fan_in, 1) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# torch.nn.Linear default weight init (kaiming_uniform, a=sqrt(5)) = U(+-1/sqrt(fan_in)).
TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def linear(
  features: int, in_features: int, name: str, kernel_init=TORCH_KERNEL_INIT, dtype=jnp.float32
) -> nn.Dense:
  """A Dense layer initialised like torch.nn.Linear (unless kernel_init is given)."""
  return nn.Dense(
    features, kernel_init=kernel_init, bias_init=_uniform_bias(in_features), name=name, dtype=dtype
  )


class MLP(nn.Module):
  """Linear layers with ReLU between them (DETR's ``MLP``); names ``layers_i``.

  Call: x [..., in_dim]. Returns [..., output_dim].
  """

  hidden_dim: int
  output_dim: int
  num_layers: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dims = [self.hidden_dim] * (self.num_layers - 1) + [self.output_dim]
    for i, d in enumerate(dims):
      x = linear(d, x.shape[-1], name=f'layers_{i}', dtype=self.dtype)(x)
      if i < self.num_layers - 1:
        x = nn.relu(x)
    return x


layer_norm = functools.partial(nn.LayerNorm, epsilon=1e-5)  # torch default eps
