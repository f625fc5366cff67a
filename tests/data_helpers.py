"""Helpers shared by the tests: data pipelines, and checkpoints damaged on purpose.

The checkpoint damage is injected where its effect does not depend on where Orbax put
the bytes (``updetr_jax.integrity`` describes what a restore checks):

* ``flip_bytes``: other bytes in a file the file record hashes (metadata): the record
  names it, whatever the bytes meant.
* ``zero_data_files``: every file of the OCDBT data folders (``d/``, sized but not
  hashed by the file record) zeroed, same size: no b-tree node decodes, so Orbax
  cannot read any array (a decode failure, never other values).
* ``change_saved_values``: one array rewritten with other values through Orbax's own
  storage, every file consistent: Orbax reads it back, and only the array checksums
  recorded at save time can tell (values differ, never a decode failure).
"""

import os

import numpy as np
import tensorstore as ts

from updetr_jax import integrity


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  """Nested dicts of arrays are identical."""
  assert a.keys() == b.keys()
  for k in a:
    if isinstance(a[k], dict):
      assert_same(a[k], b[k])
    else:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------------- Damaged checkpoints
def flip_bytes(path: str, n: int = 16) -> None:
  """Inverts ``n`` bytes in the middle of ``path`` (same size, every one of them other)."""
  offset = os.path.getsize(path) // 2
  with open(path, 'r+b') as f:
    f.seek(offset)
    flipped = bytes(b ^ 0xFF for b in f.read(n))
    f.seek(offset)
    f.write(flipped)


def data_files(checkpoint_dir: str) -> list[str]:
  """Every file in an Orbax checkpoint's OCDBT data folders (``d/``): b-tree nodes and
  array chunks."""
  return sorted(
    os.path.join(root, name)
    for root, _, names in os.walk(checkpoint_dir)
    if os.path.basename(root) == 'd'
    for name in names
  )


def zero_data_files(checkpoint_dir: str) -> list[str]:
  """Zeroes every data file of a checkpoint, keeping its size (a torn copy, a bad disk).

  Sizes and metadata stay as the file record has them; every OCDBT b-tree node must
  start with OCDBT's magic bytes, so Orbax cannot read any array. Returns the files.
  """
  paths = data_files(checkpoint_dir)
  assert paths, f'no OCDBT data files under {checkpoint_dir}'
  for path in paths:
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
      f.write(bytes(size))
  return paths


def _ocdbt_root(checkpoint_dir: str) -> str:
  """The directory of the checkpoint's (merged) OCDBT database: ``default/`` of a
  training step (a CheckpointManager item), the checkpoint itself otherwise."""
  for d in (os.path.join(checkpoint_dir, 'default'), checkpoint_dir):
    if os.path.exists(os.path.join(d, 'manifest.ocdbt')):
      return d
  raise AssertionError(f'no OCDBT database in {checkpoint_dir}')


def change_saved_values(checkpoint_dir: str, under: str = '') -> str:
  """Rewrites one array of a checkpoint written by ``updetr_jax.checkpoints`` with
  other values (every element + 1): the largest float32 array whose path starts with
  ``under`` (ties: the first by name).

  The array is written through Orbax's own storage (its zarr array in the checkpoint's
  OCDBT database, by TensorStore), and the file record (when there is one) is written
  again for the files as they are now, as if the bytes had changed in place: every file
  is consistent and readable, only the array record (checksums at save time) differs.
  Returns the array's path, as the record and the errors name it.
  """
  arrays = integrity.read_record(checkpoint_dir, checkpoint_dir)['arrays']
  candidates = sorted(
    (-int(np.prod(a['shape'])), p)
    for p, a in arrays.items()
    if p.startswith(under) and a['dtype'] == 'float32'
  )
  assert candidates, f'no float32 array under {under!r} in {checkpoint_dir}'
  path = candidates[0][1]
  kvstore = {
    'driver': 'ocdbt',
    'base': f'file://{_ocdbt_root(checkpoint_dir)}/',
    'path': path.replace('/', '.') + '/',  # Orbax's name of the array
  }
  array = ts.open({'driver': 'zarr', 'kvstore': kvstore}, open=True).result()
  values = array.read().result()
  array.write(values + np.float32(1)).result()
  assert not np.array_equal(array.read().result(), values), path
  if os.path.exists(os.path.join(checkpoint_dir, integrity.FILES_RECORD)):
    integrity.write_file_record(checkpoint_dir)
  return path


def model_batch(batch: dict, data_config, train: bool) -> dict:
  """A pre-training host batch (uint8 images, patch rectangles, seeds) as the model
  sees it: ``device_augment.batch_preparer`` run (jitted) on it; numpy, with the
  batch's other entries kept (the images become float32 normalised)."""
  import jax  # noqa: PLC0415

  from updetr_jax import device_augment  # noqa: PLC0415
  from updetr_jax.data import resolve_config  # noqa: PLC0415
  from updetr_jax.sharding import model_inputs  # noqa: PLC0415

  prepare = jax.jit(device_augment.batch_preparer(resolve_config(data_config), train))
  return {**batch, **jax.device_get(prepare(model_inputs(batch)))}
