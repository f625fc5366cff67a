"""The ``('data',)`` mesh and host <-> global arrays. TF-free.

make_mesh: the 1-D data-parallel mesh over every device of every process
to_global: host-local numpy batch -> global jax.Arrays split over the data axis
model_inputs / prefetch_to_device: the entries of a host batch the step reads, put
  on the devices ahead of the step
process_gather: host-local rows -> the global batch's rows on every process
"""

from __future__ import annotations

import collections

import jax
import numpy as np


def make_mesh() -> jax.sharding.Mesh:
  """1-D data-parallel mesh over every device of every process."""
  return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def to_global(batch, sharding):
  """Host-local numpy batch -> global jax.Arrays split over the data axis."""
  return jax.tree_util.tree_map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
  )


# (pre-training sends image_size, patch_boxes and patch_seeds instead of padding_mask
# and patches: device_augment.prepare_batch; SimCLR view_flips too: tasks/simclr.py)
MODEL_INPUTS = (
  'images',
  'padding_mask',
  'patches',
  'image_size',
  'patch_boxes',
  'patch_seeds',
  'view_flips',
  'targets',
)


def model_inputs(batch: dict) -> dict:
  """The entries of a host batch the train step reads (ids, sizes and flags stay home)."""
  return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def prefetch_to_device(iterator, sharding, size: int = 2):
  """Host batches -> global device batches, ``size`` ahead (double buffering).

  Each batch is put on the devices (``to_global`` of its ``model_inputs``) while
  the step on an earlier one runs: JAX dispatches the step asynchronously, so the
  host's next batch and its transfer overlap the device's work.
  """
  queue = collections.deque()

  def put():
    try:
      queue.append(to_global(model_inputs(next(iterator)), sharding))
    except StopIteration:
      pass

  for _ in range(size):
    put()
  while queue:
    yield queue.popleft()
    put()


def process_gather(x: np.ndarray) -> np.ndarray:
  """Host-local rows -> the global batch's rows (in process order) on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))
