"""Multi-host start-up: JAX's multi-controller runtime, only when the job has it.

Every process of a multi-host job runs the same program; ``maybe_initialize``
connects them (``jax.distributed.initialize``) so that ``jax.devices()`` lists the
devices of all hosts and ``jax.process_index()`` / ``jax.process_count()`` tell each
process its share of the input. It must run before anything touches the XLA
backend (``jax.devices``, ``jax.device_put``, any computation, a PRNG key ...):
JAX refuses to initialise the distributed runtime after that.

The job is multi-process when

* the caller names it: ``coordinator_address``, ``num_processes`` and
  ``process_id`` (all three, e.g. from ``main``'s flags);
* or the environment does: ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` +
  ``JAX_PROCESS_ID``; a SLURM step or an Open MPI job with more than one task; a
  Cloud TPU pod slice (``TPU_WORKER_HOSTNAMES`` / ``TPU_PROCESS_ADDRESSES`` with
  more than one host, or a multi-slice ``MEGASCALE_COORDINATOR_ADDRESS``), where
  JAX's own cluster detection fills in the arguments.

Anything else (a plain single host, with one or many local devices) is left alone:
``maybe_initialize`` returns False without touching the backend.

Example, two processes with 4 CPU devices each on one machine::

  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
    python -m updetr_jax.main ... --coordinator_address=127.0.0.1:12345 \
    --num_processes=2 --process_id=0   # and --process_id=1 in a second shell
"""

from __future__ import annotations

import glob
from absl import logging
import os
import urllib.request
from typing import Sequence

import jax

_ENV_ADDRESS, _ENV_COUNT, _ENV_ID = (
  'JAX_COORDINATOR_ADDRESS',
  'JAX_NUM_PROCESSES',
  'JAX_PROCESS_ID',
)
_SLURM_VARS = (
  'SLURM_JOB_ID',
  'SLURM_STEP_NODELIST',
  'SLURM_NTASKS',
  'SLURM_PROCID',
  'SLURM_LOCALID',
)  # what JAX's SLURM detection reads
_OMPI_URI = 'OMPI_MCA_orte_hnp_uri'

_initialized = False


def _int_env(name: str, env) -> int:
  try:
    return int(env[name])
  except ValueError:
    raise ValueError(f'environment variable {name}={env[name]!r} is not an integer') from None


def _hosts(value: str | None) -> int:
  return len([h for h in (value or '').split(',') if h.strip()])


def _on_tpu_vm() -> bool:
  """TPU chips on this machine's PCI bus (a file scan; the backend is not touched)."""
  try:
    from jax._src import hardware_utils

    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except (ImportError, AttributeError, OSError):
    return bool(glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*'))


def _tpu_vm_workers(timeout: float = 10.0) -> int:
  """Number of workers of this Cloud TPU VM's slice (GCE metadata), 0 if unknown."""
  host = os.environ.get('GCE_METADATA_IP', 'metadata.google.internal')
  request = urllib.request.Request(
    f'http://{host}/computeMetadata/v1/instance/attributes/worker-network-endpoints',
    headers={'Metadata-Flavor': 'Google'},
  )
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return _hosts(response.read().decode())
  except (OSError, ValueError) as e:
    logging.warning('distributed: TPU VM metadata unreadable (%s); assuming one host', e)
    return 0


def _cluster_from_env(env) -> str | None:
  """The name of the multi-process cluster the environment describes, else None."""
  if env.get('SLURM_NTASKS') and all(v in env for v in _SLURM_VARS):
    if _int_env('SLURM_NTASKS', env) > 1:
      return 'slurm'
  if _OMPI_URI in env and env.get('OMPI_COMM_WORLD_SIZE'):
    if _int_env('OMPI_COMM_WORLD_SIZE', env) > 1:
      return 'ompi'
  if env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'tpu multi-slice'
  hosts = env.get('TPU_PROCESS_ADDRESSES') or env.get('TPU_WORKER_HOSTNAMES')
  if _hosts(hosts) > 1:
    return 'tpu pod slice'
  if hosts is None and 'TPU_SKIP_MDS_QUERY' not in env and _on_tpu_vm() and _tpu_vm_workers() > 1:
    return 'tpu pod slice'
  return None


def _arguments(coordinator_address, num_processes, process_id, env):
  """(kwargs for jax.distributed.initialize, description) or (None, reason)."""
  given = {
    'coordinator_address': coordinator_address,
    'num_processes': num_processes,
    'process_id': process_id,
  }
  if any(v is not None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise ValueError(
        'multi-process run: give coordinator_address, num_processes and '
        f'process_id together (missing: {", ".join(missing)})'
      )
    source = 'arguments'
  elif any(env.get(k) for k in (_ENV_COUNT, _ENV_ID)):
    names = (_ENV_ADDRESS, _ENV_COUNT, _ENV_ID)
    missing = [k for k in names if not env.get(k)]
    if missing:
      raise ValueError(
        f'multi-process run: set {", ".join(names)} together (missing: {", ".join(missing)})'
      )
    given['coordinator_address'] = env[_ENV_ADDRESS]
    num_processes, process_id = _int_env(_ENV_COUNT, env), _int_env(_ENV_ID, env)
    source = 'environment'
  else:
    cluster = _cluster_from_env(env)
    if cluster is None:
      return None, 'single process (no coordinator given, no multi-host environment)'
    return {}, f'{cluster} (detected by JAX)'  # JAX's cluster detection fills them in
  num_processes, process_id = int(num_processes), int(process_id)
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f'process_id={process_id} must be in [0, num_processes={num_processes})')
  if num_processes == 1:
    return None, f'single process (num_processes=1 from the {source})'
  return dict(given, num_processes=num_processes, process_id=process_id), source


def maybe_initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: Sequence[int] | None = None,
) -> bool:
  """Starts JAX's multi-controller runtime when this job is multi-process.

  Call it first thing in the program, before any other JAX call that touches the
  backend. A second call (or one after somebody else initialised the runtime) is a
  no-op.

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator service; with
      ``num_processes`` and ``process_id``, all three or none. None: taken from
      the environment (see the module docstring) or single process.
    num_processes: number of processes of the job.
    process_id: this process's index in ``[0, num_processes)``.
    local_device_ids: optional: restrict this process to these local devices
      (e.g. one GPU per process).
  Returns:
    True when the runtime is initialised (now or before), False for a
    single-process job (the backend was not touched).
  Raises:
    ValueError: some but not all of the three arguments (or of the
      ``JAX_*`` variables) are given, or the process id is out of range.
    RuntimeError: the backend was initialised before this call.
  """
  global _initialized
  if _initialized or jax.distributed.is_initialized():
    _initialized = True
    return True
  kwargs, source = _arguments(coordinator_address, num_processes, process_id, os.environ)
  if kwargs is None:
    logging.info('distributed: %s; not initialising the multi-controller runtime', source)
    return False
  if local_device_ids is not None:
    kwargs['local_device_ids'] = [int(i) for i in local_device_ids]
  # Cross-process collectives on CPU need an implementation (JAX's default is
  # gloo over TCP); make sure nobody switched it off.
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(**kwargs)
  except RuntimeError as e:
    if 'before any JAX calls' in str(e) or 'already initialized' in str(e):
      raise RuntimeError(
        f'distributed.maybe_initialize must be called before anything touches the JAX backend: {e}'
      ) from e
    raise
  _initialized = True
  logging.info(
    'distributed (%s): process %d of %d, %d local of %d global devices (%s)',
    source,
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.default_backend(),
  )
  return True
