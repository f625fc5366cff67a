"""Model FLOPs utilisation (MFU): the FLOPs XLA counts in a step against the peak.

  flops = mfu.step_flops(train_step.lower(state, batch))   # or the .compile()d step
  peak = mfu.device_peak_flops(jax.devices()[0].device_kind, 'bfloat16')
  util = mfu.mfu(flops, seconds_per_step, jax.device_count(), peak)  # 0.0 .. 1.0
  cost = mfu.step_cost(train_step, (state, constants, batch, rng), 'bfloat16')  # both, logged

Peak table. Dense FLOP/s per JAX device from the vendors' published figures (no
structured sparsity). On TPU v4, v5e, v5p and v6e a JAX device is one chip (v4 and
v5p join their two TensorCores as one "megacore" device); on TPU v2 and v3 a JAX
device is one TensorCore, half a chip, so their entries are half the chip figure.

  device (device_kind)        bfloat16  float32   tf32    (TFLOP/s)
  TPU v2  ('TPU v2')            22.5      22.5     -      per core (45 per chip)
  TPU v3  ('TPU v3')            61.5      61.5     -      per core (123 per chip)
  TPU v4  ('TPU v4')           275       275       -
  TPU v5e ('TPU v5 lite')      197       197       -
  TPU v5p ('TPU v5')           459       459       -
  TPU v6e ('TPU v6 lite')      918       918       -      Trillium
  A100 (SXM4 / PCIe, 40/80GB)  312        19.5   156
  H100 SXM ('H100 80GB HBM3')  989        67     494      GH200: the same
  H100 PCIe                    756        51     378
  H100 NVL, H200 NVL           835        60     417
  H200 (SXM)                   989        67     494      H100 SXM compute

'float16' is the bfloat16 figure on these GPUs and unknown (None) on TPUs.

float32 on TPUs: the MXU only multiplies bfloat16; XLA runs a float32 matmul as 1
(precision DEFAULT, JAX's default on TPU), 3 ('high') or 6 ('highest') bfloat16
passes. The table gives the MXU peak (= bfloat16) for 'float32', so an MFU with
'highest' precision reads at most about 1/6: the lost throughput is real.
float32 on GPUs: 'float32' is the plain FP32 (CUDA core) peak, which is what
``precision='highest'`` gets; at JAX's default precision float32 matmuls on A100 and
later run as TF32 on the tensor cores, so compare them with 'tf32'.

FLOP counts under SPMD. ``Lowered.cost_analysis()`` analyses the program before it
is partitioned: the 'flops' of the whole step over all devices. After compilation
over a mesh, ``Compiled.cost_analysis()`` analyses the partitioned per-device
program. Measured with jax 0.10.2 on 8 host-platform CPU devices, a jitted
[256, 128] @ [128, 64] matmul (2*M*N*K = 4,194,304 FLOPs):
  unsharded, 1 device                    compiled 4,194,304
  rows sharded over 8 devices            compiled   524,288 (1/8); lowered 4,194,304
  contraction sharded (+ all-reduce)     compiled   540,672 (1/8 + the reduction adds)
  everything replicated on 8 devices     compiled 4,194,304 (each device does it all)
``step_flops`` returns the whole step's FLOPs either way: a Lowered count as it
is, a Compiled count times the number of devices the executable runs on (from its
shardings). Both match for sharded work; work replicated on every device (e.g. an
optimizer update of replicated parameters) counts once in the Lowered figure and
once per device in the Compiled one, so pass the Lowered stage when that matters.
Older JAX versions return a list with one dict per HLO module from
``cost_analysis()``; the first is used.
"""

from __future__ import annotations

from typing import Any

import jax
from absl import logging
import numpy as np

__all__ = [
  'PEAK_FLOPS',
  'device_generation',
  'device_peak_flops',
  'peak_dtype',
  'step_flops',
  'step_cost',
  'mfu',
]

_T = 1e12

# Dense peak FLOP/s per JAX device and dtype (see the module docstring).
PEAK_FLOPS: dict[str, dict[str, float]] = {
  'tpu_v2': dict(bfloat16=22.5 * _T, float32=22.5 * _T),
  'tpu_v3': dict(bfloat16=61.5 * _T, float32=61.5 * _T),
  'tpu_v4': dict(bfloat16=275 * _T, float32=275 * _T),
  'tpu_v5e': dict(bfloat16=197 * _T, float32=197 * _T),
  'tpu_v5p': dict(bfloat16=459 * _T, float32=459 * _T),
  'tpu_v6e': dict(bfloat16=918 * _T, float32=918 * _T),
  'a100': dict(bfloat16=312 * _T, float16=312 * _T, tf32=156 * _T, float32=19.5 * _T),
  'h100_sxm': dict(bfloat16=989 * _T, float16=989 * _T, tf32=494 * _T, float32=67 * _T),
  'h100_pcie': dict(bfloat16=756 * _T, float16=756 * _T, tf32=378 * _T, float32=51 * _T),
  'h100_nvl': dict(bfloat16=835 * _T, float16=835 * _T, tf32=417 * _T, float32=60 * _T),
}
PEAK_FLOPS['h200'] = PEAK_FLOPS['h100_sxm']

# (substring of the lower-cased device_kind, generation); the first match wins, so
# the longer names come before their prefixes. None: known, but not in the table.
_KIND_PATTERNS: tuple[tuple[str, str | None], ...] = (
  ('tpu v2', 'tpu_v2'),
  ('tpu v3', 'tpu_v3'),
  ('tpu v4 lite', None),  # v4i, inference chip
  ('tpu v4', 'tpu_v4'),
  ('tpu v5 lite', 'tpu_v5e'),
  ('tpu v5e', 'tpu_v5e'),
  ('tpu v5p', 'tpu_v5p'),
  ('tpu v5', 'tpu_v5p'),
  ('tpu v6 lite', 'tpu_v6e'),
  ('tpu v6e', 'tpu_v6e'),
  ('a100', 'a100'),
  ('h100 pcie', 'h100_pcie'),
  ('h100 nvl', 'h100_nvl'),
  ('h200 nvl', 'h100_nvl'),
  ('gh200', 'h100_sxm'),
  ('h100', 'h100_sxm'),
  ('h200', 'h200'),
)

_DTYPE_ALIASES = {
  'bf16': 'bfloat16',
  'fp32': 'float32',
  'f32': 'float32',
  'fp16': 'float16',
  'f16': 'float16',
  'half': 'float16',
}


def device_generation(device_kind: str) -> str | None:
  """The PEAK_FLOPS key of a ``jax.Device.device_kind``, None when unknown.

  Args:
    device_kind: e.g. 'TPU v4', 'TPU v5 lite', 'NVIDIA H100 80GB HBM3', 'cpu';
      matched case-insensitively by substring.

  Returns:
    The generation key ('tpu_v4', 'a100', ...) or None (CPU, unknown hardware).
  """
  kind = ' '.join(device_kind.lower().split())
  for pattern, generation in _KIND_PATTERNS:
    if pattern in kind:
      return generation
  return None


def _dtype_name(dtype: Any) -> str:
  name = dtype.lower() if isinstance(dtype, str) else np.dtype(dtype).name
  return _DTYPE_ALIASES.get(name, name)


def device_peak_flops(device_kind: str, dtype: Any = 'bfloat16') -> float | None:
  """Dense peak FLOP/s of one JAX device of this kind for this dtype.

  Args:
    device_kind: ``jax.devices()[0].device_kind``.
    dtype: 'bfloat16' (or 'bf16'), 'float32' ('fp32'), 'tf32', 'float16', or a
      numpy / jax dtype.

  Returns:
    FLOP/s, or None when the device or the dtype is not in the table.
  """
  generation = device_generation(device_kind)
  if generation is None:
    return None
  return PEAK_FLOPS[generation].get(_dtype_name(dtype))


def peak_dtype(dtype: str, device) -> str:
  """The PEAK_FLOPS column a step of ``dtype`` matmuls runs at on ``device``: float32
  on GPUs at JAX's default matmul precision runs on the tensor cores as TF32."""
  if dtype != 'float32':
    return dtype
  precision = jax.config.jax_default_matmul_precision
  if device.platform == 'gpu' and precision in (None, 'default', 'fastest', 'tensorfloat32'):
    return 'tf32'
  return 'float32'


def _num_devices(compiled: Any) -> int:
  """Devices a Compiled executable runs on, from its input and output shardings."""
  shardings = []
  for attr in ('input_shardings', 'output_shardings'):
    try:
      shardings += jax.tree.leaves(getattr(compiled, attr))
    except Exception:  # noqa: BLE001  (not every stage exposes them)
      pass
  return max([len(s.device_set) for s in shardings if hasattr(s, 'device_set')] or [1])


def step_flops(stage: Any) -> float | None:
  """FLOPs of one call of a jitted function, from XLA's cost analysis.

  Args:
    stage: ``jitted.lower(*args)`` (a ``jax.stages.Lowered``) or
      ``jitted.lower(*args).compile()`` (a ``jax.stages.Compiled``).

  Returns:
    The FLOPs of the whole call summed over all devices (see the module docstring
    for how a Compiled count over a mesh is scaled), or None when the backend
    gives no cost analysis.
  """
  try:
    analysis = stage.cost_analysis()
  except NotImplementedError:
    return None
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per HLO module
    analysis = analysis[0] if analysis else None
  if not analysis or analysis.get('flops') is None:
    return None
  flops = float(analysis['flops'])
  if flops < 0:
    return None
  if isinstance(stage, jax.stages.Compiled):
    flops *= _num_devices(stage)
  return flops


def mfu(
  flops_per_step: float | None,
  step_seconds: float | None,
  num_devices: int,
  peak_per_device: float | None,
) -> float | None:
  """Model FLOPs utilisation: achieved FLOP/s over the peak of all devices.

  Args:
    flops_per_step: FLOPs of one step over all devices (``step_flops``).
    step_seconds: wall time of one step.
    num_devices: devices the step runs on (``jax.device_count()``).
    peak_per_device: ``device_peak_flops(...)``.

  Returns:
    flops_per_step / (step_seconds * num_devices * peak_per_device), a fraction
    (0.4 = 40 %), or None when an input is missing or not positive.
  """
  if flops_per_step is None or step_seconds is None or peak_per_device is None:
    return None
  if flops_per_step <= 0 or step_seconds <= 0 or num_devices <= 0 or peak_per_device <= 0:
    return None
  return flops_per_step / (step_seconds * num_devices * peak_per_device)


def step_cost(train_step, args, dtype: str, prepare=None) -> dict:
  """FLOPs of one train step (XLA's cost analysis of the lowered step, all devices)
  and the peak FLOP/s of the job's devices (None when the device is not in
  ``PEAK_FLOPS``; the dtype column from ``peak_dtype``). ``prepare``: the
  step's ``device_augment.Preparer``, whose loop over the examples the analysis
  counts once (its ``uncounted_flops`` are added)."""
  flops = step_flops(train_step.lower(*args))
  if flops and hasattr(prepare, 'uncounted_flops'):
    flops += prepare.uncounted_flops(args[2])
  device = jax.devices()[0]
  kind = device.device_kind
  dtype_column = peak_dtype(dtype, device)
  peak = device_peak_flops(kind, dtype_column)
  total_peak = peak * jax.device_count() if peak else None
  logging.info(
    'train step: %s GFLOP (XLA cost analysis, first batch shape); %d x %s, peak %s',
    f'{flops / 1e9:,.1f}' if flops else '?',
    jax.device_count(),
    kind,
    f'{total_peak / 1e12:,.0f} TFLOP/s ({dtype_column})' if total_peak else 'unknown (no MFU)',
  )
  return {'flops_per_step': flops, 'peak_flops': total_peak}
