"""MFU helpers: the peak table, XLA's FLOP count of a step, the utilisation formula."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from updetr_jax import mfu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 1e12


@pytest.mark.parametrize(
  'kind, dtype, peak',
  [
    ('TPU v4', 'bfloat16', 275 * T),
    ('TPU v4', 'float32', 275 * T),  # float32 matmuls are bf16 MXU passes
    ('TPU v5 lite', 'bf16', 197 * T),
    ('TPU v5e', 'bfloat16', 197 * T),
    ('TPU v5', 'bfloat16', 459 * T),  # v5p reports 'TPU v5'
    ('TPU v5p', 'bfloat16', 459 * T),
    ('TPU v6 lite', 'bfloat16', 918 * T),
    ('tpu v6e', 'BF16', 918 * T),
    ('NVIDIA A100-SXM4-80GB', 'bfloat16', 312 * T),
    ('NVIDIA A100-SXM4-80GB', 'float32', 19.5 * T),
    ('NVIDIA A100-SXM4-80GB', 'tf32', 156 * T),
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989 * T),
    ('NVIDIA H100 80GB HBM3', 'fp32', 67 * T),
    ('NVIDIA H100 80GB HBM3', 'tf32', 494 * T),
    ('NVIDIA H100 PCIe', 'bfloat16', 756 * T),
    ('NVIDIA H200', 'bfloat16', 989 * T),
    ('NVIDIA H200', 'float32', 67 * T),
    ('NVIDIA H200', 'tf32', 494 * T),
  ],
)
def test_peak_table(kind, dtype, peak):
  assert mfu.device_peak_flops(kind, dtype) == pytest.approx(peak)


def test_peak_dtype_objects_and_unknowns():
  assert mfu.device_peak_flops('TPU v4', jnp.bfloat16) == 275 * T
  assert mfu.device_peak_flops('NVIDIA H100 80GB HBM3', jnp.float32) == 67 * T
  for kind in ('cpu', 'TPU v4 lite', 'TPU7x', 'Tesla T4', ''):
    assert mfu.device_peak_flops(kind, 'bfloat16') is None, kind
  assert mfu.device_peak_flops('TPU v4', 'tf32') is None
  assert mfu.device_peak_flops('TPU v5 lite', 'float16') is None
  assert mfu.device_peak_flops('NVIDIA H100 80GB HBM3', 'int4') is None
  assert mfu.device_peak_flops(jax.devices()[0].device_kind, 'bfloat16') is None  # CPU
  assert mfu.device_generation('TPU v5 lite') == 'tpu_v5e'


def test_mfu_arithmetic():
  # 4 devices of 100 TFLOP/s for 0.5 s = 200 TFLOP possible; 50 TFLOP done.
  assert mfu.mfu(50 * T, 0.5, 4, 100 * T) == pytest.approx(0.25)
  assert mfu.mfu(None, 0.5, 4, 100 * T) is None
  assert mfu.mfu(50 * T, 0.5, 4, None) is None
  assert mfu.mfu(50 * T, 0.0, 4, 100 * T) is None


def test_step_flops_of_a_matmul():
  m, k, n = 64, 48, 32
  f = jax.jit(lambda a, b: a @ b)
  lowered = f.lower(jnp.ones((m, k)), jnp.ones((k, n)))
  for stage in (lowered, lowered.compile()):
    assert mfu.step_flops(stage) == pytest.approx(2 * m * n * k, rel=0.01)


def test_step_flops_result_formats():
  class Stage:
    def __init__(self, analysis):
      self.analysis = analysis

    def cost_analysis(self):
      if self.analysis is NotImplementedError:
        raise NotImplementedError
      return self.analysis

  assert mfu.step_flops(Stage({'flops': 12.0, 'bytes accessed': 3.0})) == 12.0
  assert mfu.step_flops(Stage([{'flops': 7.0}])) == 7.0  # older jax: a list of dicts
  for analysis in (None, [], {}, {'bytes accessed': 1.0}, {'flops': -1.0}, NotImplementedError):
    assert mfu.step_flops(Stage(analysis)) is None


def test_step_flops_over_a_mesh_counts_all_devices():
  """Compiled (per-device program) and Lowered (whole program) agree on 8 devices."""
  code = textwrap.dedent("""
      import json, os
      os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from updetr_jax import mfu
      mesh = Mesh(np.array(jax.devices()), ('data',))
      a = jax.device_put(jnp.ones((256, 128)), NamedSharding(mesh, P('data')))
      b = jax.device_put(jnp.ones((128, 64)), NamedSharding(mesh, P()))
      lowered = jax.jit(lambda a, b: a @ b).lower(a, b)
      compiled = lowered.compile()
      raw = compiled.cost_analysis()
      raw = raw[0] if isinstance(raw, (list, tuple)) else raw
      print(json.dumps(dict(
          devices=jax.device_count(), lowered=mfu.step_flops(lowered),
          compiled=mfu.step_flops(compiled), per_device=float(raw['flops']))))
  """)
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  out = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=120, check=True
  ).stdout
  got = json.loads(out.strip().splitlines()[-1])
  full = 2 * 256 * 128 * 64
  assert got['devices'] == 8
  assert got['per_device'] == pytest.approx(full / 8, rel=0.01)
  assert got['lowered'] == pytest.approx(full, rel=0.01)
  assert got['compiled'] == pytest.approx(full, rel=0.01)
