"""ResNet v1.5 backbone (torchvision layout, NHWC), its normalisation an argument.

``norm='frozen'`` (the detector's): BatchNorm statistics and affine terms live in the
``batch_stats`` collection (never trained, never in the optimizer); convolution
kernels are ``params``. ``norm='batch'`` (the self-supervised CNN's training,
``tasks/simclr.py``): flax BatchNorm, batch statistics in training with running
averages (torch's momentum 0.1) in ``batch_stats``, affine terms in ``params``; in
evaluation the same function as the frozen network given those values.

Module names mirror torchvision's state-dict keys (``conv1``, ``bn1``, ``layer1_0``
for ``layer1.0``, ``downsample_0``/``downsample_1``) so the PyTorch importer is a
mechanical rename.

Mixed precision: ``dtype`` is the convolutions' compute dtype (the input is cast
to it); kernels and the frozen statistics stay float32. ``remat`` recomputes each
bottleneck block's activations in the backward pass (same parameter names).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

# name -> (blocks per stage, base width). Out channels of the last stage: 32 * width.
RESNET_VARIANTS = {
  'resnet50': ((3, 4, 6, 3), 64),
  'resnet101': ((3, 4, 23, 3), 64),
  # Narrow, short variants for tests and the CPU demo (same topology).
  'resnet_tiny': ((1, 1, 1, 1), 8),
  'resnet_small': ((1, 1, 1, 1), 16),
  'resnet26_narrow': ((2, 2, 2, 2), 16),
}


def resnet_spec(name: str) -> tuple[tuple[int, ...], int]:
  if name not in RESNET_VARIANTS:
    raise ValueError(f'model.backbone={name!r} is unknown; choose one of {sorted(RESNET_VARIANTS)}')
  return RESNET_VARIANTS[name]


def _conv_init(fan_out_mode=True):
  # torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu').
  return nn.initializers.variance_scaling(2.0, 'fan_out' if fan_out_mode else 'fan_in', 'normal')


class FrozenBatchNorm(nn.Module):
  """BatchNorm with fixed statistics: y = x * scale' + shift' (eps 1e-5)."""

  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.variable('batch_stats', 'scale', lambda: jnp.ones((c,), jnp.float32)).value
    bias = self.variable('batch_stats', 'bias', lambda: jnp.zeros((c,), jnp.float32)).value
    mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32)).value
    var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32)).value
    s = scale * (1.0 / jnp.sqrt(var + self.eps))
    shift = bias - mean * s
    return x * s.astype(x.dtype) + shift.astype(x.dtype)


NORMS = ('frozen', 'batch')
BN_MOMENTUM = 0.9  # flax convention: torch's BatchNorm momentum 0.1


def norm_layer(norm: str, train: bool, name: str) -> nn.Module:
  """The normalisation ``norm`` (one of NORMS) named ``name``; ``train``: batch
  statistics (and running-average updates) for 'batch'."""
  if norm == 'frozen':
    return FrozenBatchNorm(name=name)
  if norm == 'batch':
    return nn.BatchNorm(
      use_running_average=not train, momentum=BN_MOMENTUM, epsilon=1e-5, name=name
    )
  raise ValueError(f'norm={norm!r}: expected one of {NORMS}')


def _conv(features, kernel, stride=1, dilation=1, name=None, dtype=jnp.float32):
  pad = dilation * (kernel - 1) // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    kernel_dilation=(dilation, dilation),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    kernel_init=_conv_init(),
    name=name,
    dtype=dtype,
  )


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4), residual, ReLU."""

  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: jnp.dtype = jnp.float32
  norm: str = 'frozen'
  train: bool = False

  @nn.compact
  def __call__(self, x):
    def bn(name):
      return norm_layer(self.norm, self.train, name)

    out = _conv(self.planes, 1, name='conv1', dtype=self.dtype)(x)
    out = nn.relu(bn('bn1')(out))
    out = _conv(self.planes, 3, self.stride, self.dilation, name='conv2', dtype=self.dtype)(out)
    out = nn.relu(bn('bn2')(out))
    out = _conv(self.planes * 4, 1, name='conv3', dtype=self.dtype)(out)
    out = bn('bn3')(out)
    if self.downsample:
      x = bn('downsample_1')(
        _conv(self.planes * 4, 1, self.stride, name='downsample_0', dtype=self.dtype)(x)
      )
    return nn.relu(out + x)


class ResNet(nn.Module):
  """Returns the last stage (C5) feature map.

  Args (call): x [B, H, W, 3] float; train: batch statistics for ``norm='batch'``
    (with ``mutable=['batch_stats']`` to update the running averages).
  Returns: [B, ceil(H/32), ceil(W/32), 32 * width] in ``dtype`` (stride 16 with
  ``dilation``).
  """

  blocks: Sequence[int]
  width: int = 64
  dilation: bool = False  # DC5: last stage stride 1, dilation 2.
  dtype: jnp.dtype = jnp.float32
  remat: bool = False  # nn.remat around every Bottleneck
  norm: str = 'frozen'  # NORMS

  @property
  def num_channels(self) -> int:
    return self.width * 8 * 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    x = nn.Conv(
      self.width,
      (7, 7),
      strides=(2, 2),
      padding=((3, 3), (3, 3)),
      use_bias=False,
      kernel_init=_conv_init(),
      name='conv1',
      dtype=self.dtype,
    )(x)
    x = nn.relu(norm_layer(self.norm, train, 'bn1')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    block_cls = nn.remat(Bottleneck) if self.remat else Bottleneck
    for name, kw in block_layout(self.blocks, self.width, self.dilation):
      x = block_cls(dtype=self.dtype, norm=self.norm, train=train, name=name, **kw)(x)
    return x


def block_layout(blocks: Sequence[int], width: int, dilation: bool):
  """The bottleneck blocks of a ResNet, in order: [(name, kwargs)], name as torchvision
  (``layer2_0`` for ``layer2.0``), kwargs planes / stride / dilation / downsample."""
  layout = []
  in_ch = width
  cur_dilation = 1
  for stage, n in enumerate(blocks):
    planes = width * 2**stage
    stride = 1 if stage == 0 else 2
    prev_dilation = cur_dilation
    if stage == 3 and dilation:
      cur_dilation *= stride
      stride = 1
    for i in range(n):
      layout.append(
        (
          f'layer{stage + 1}_{i}',
          dict(
            planes=planes,
            stride=stride if i == 0 else 1,
            # torchvision: the first block keeps the previous dilation.
            dilation=prev_dilation if i == 0 else cur_dilation,
            downsample=(i == 0 and (stride != 1 or in_ch != planes * 4)),
          ),
        )
      )
      in_ch = planes * 4
  return layout


def build_resnet(
  name: str, dilation: bool = False, dtype=jnp.float32, remat: bool = False, norm: str = 'frozen'
) -> ResNet:
  blocks, width = resnet_spec(name)
  return ResNet(blocks=blocks, width=width, dilation=dilation, dtype=dtype, remat=remat, norm=norm)


def downsample_mask(mask, out_hw: tuple[int, int]):
  """Nearest-neighbour resize of a padding mask, as torch ``F.interpolate``.

  Args: mask bool [B, H, W]; out_hw (h, w) static. Returns bool [B, h, w].
  """
  h_in, w_in = mask.shape[1:3]
  h, w = out_hw
  # torch 'nearest': src = floor(dst * (in / out)) computed in float32.
  ys = np.minimum(np.floor(np.arange(h, dtype=np.float32) * np.float32(h_in / h)), h_in - 1)
  xs = np.minimum(np.floor(np.arange(w, dtype=np.float32) * np.float32(w_in / w)), w_in - 1)
  return mask[:, ys.astype(np.int32)][:, :, xs.astype(np.int32)]


def estimate_batchnorm_statistics(backbone_apply, images, padding_mask):
  """Every FrozenBatchNorm's input mean and variance on ``images`` (precise BN).

  The backbone runs once with each FrozenBatchNorm normalising by its own input's
  statistics (then its affine ``scale`` / ``bias``), so each layer's statistics are
  those its input has once the layers before it are re-estimated too: the data-
  dependent statistics a BatchNorm network would have had in training mode.
  Padded pixels (``padding_mask`` downsampled to each layer) are left out.

  Args:
    backbone_apply: images -> C5 map, running the ResNet (e.g. ``model.apply`` with
      a method calling ``body``), traced under the interceptor.
    images: [B, H, W, 3] normalised; padding_mask: bool [B, H, W] (True = padding).

  Returns:
    {module path tuple (e.g. ('body', 'layer1_0', 'bn1')): (mean [C], var [C])},
    float32; path as in the variables' ``batch_stats`` collection.
  """
  stats = {}

  def interceptor(next_fun, args, kwargs, context):
    if not isinstance(context.module, FrozenBatchNorm) or context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    x = args[0].astype(jnp.float32)
    valid = ~downsample_mask(padding_mask, x.shape[1:3])
    w = valid[..., None].astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    mean = (x * w).sum((0, 1, 2)) / n
    var = (jnp.square(x - mean) * w).sum((0, 1, 2)) / n
    stats[tuple(context.module.path)] = (mean, var)
    m = context.module
    scale = m.get_variable('batch_stats', 'scale')
    bias = m.get_variable('batch_stats', 'bias')
    y = (x - mean) * (scale / jnp.sqrt(var + m.eps)) + bias
    return y.astype(args[0].dtype)

  with nn.intercept_methods(interceptor):
    backbone_apply(images)
  return stats
