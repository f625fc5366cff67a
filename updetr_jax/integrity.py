"""Checkpoint integrity: what a save records, and the checks a restore runs on it.

A checkpoint written by ``updetr_jax.checkpoints`` carries two records:

* **Array record** (in the step's Orbax metadata, ``_CHECKPOINT_METADATA``, written
  inside the same atomic commit as the arrays): every array's path, shape, dtype and
  a 64-bit checksum of its bytes, plus the model / optimizer config that wrote it.
  The checksum is computed on device (``array_checksums``: a position-keyed sum of
  murmur3-mixed 32-bit words, exact integer arithmetic, so the same on CPU, GPU and
  TPU and for any sharding). It detects corruption, not tampering: any change of one
  element changes it, several changes go unnoticed with probability ~2^-64.
* **File record** (``integrity.json`` in the step directory, written once the step has
  committed): the size of every file, and the SHA-256 of every file that describes the
  arrays (Orbax / OCDBT metadata, everything outside the ``d/`` data folders, which the
  array checksums cover).

A restore checks, in order: Orbax's commit marker, the file record (missing, resized
or changed files, by name), the array record against the arrays the caller expects
(another shape or dtype is another configuration, not damage: ``config_diff`` names
the config fields that differ), then the restored values against their checksums.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from updetr_jax import files
from updetr_jax.models import fields

VERSION = 1
RECORD_KEY = 'updetr_integrity'  # key of the array record in Orbax's custom metadata
FILES_RECORD = 'integrity.json'  # the file record, in the step directory
COMMIT_MARKER = 'commit_success.txt'  # written by Orbax when a step commits
STEP_METADATA = '_CHECKPOINT_METADATA'  # Orbax's step metadata (holds the array record)
CONFIG_SECTIONS = ('task', 'model', 'optim')  # config fields recorded with the arrays


class CheckpointError(ValueError):
  """A checkpoint that cannot be used; ``problems`` lists the reasons, one per line."""

  def __init__(self, what: str, problems: list[str], headline: str):
    self.what, self.problems = what, list(problems)
    shown = self.problems[:20] + (
      [f'... and {len(self.problems) - 20} more'] if len(self.problems) > 20 else []
    )
    super().__init__(f'{what} {headline}:\n  ' + '\n  '.join(shown))


class CorruptCheckpointError(CheckpointError):
  """Damaged, incomplete or unreadable: its bytes are not those that were saved."""

  def __init__(self, what: str, problems: list[str]):
    super().__init__(what, problems, 'is corrupt or incomplete')


class ConfigMismatchError(CheckpointError):
  """Intact, but written by another model / optimizer configuration."""

  def __init__(self, what: str, problems: list[str]):
    super().__init__(what, problems, 'was written by another model/optimizer configuration')


# ---------------------------------------------------------------------- Array checksums
def _fmix32(h):
  """murmur3's 32-bit finaliser (a bijection of uint32 that mixes all bits)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x) -> jax.Array:
  """The bytes of ``x`` as a flat uint32 vector (one word per 1/2/4-byte element,
  two per 8-byte element)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = jnp.dtype(x.dtype).itemsize
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


@jax.jit
def _checksum(x) -> jax.Array:
  """[2] uint32: two independently seeded sums of mix(word, position)."""
  w = _words(x)
  i = jnp.arange(w.shape[0], dtype=jnp.uint32)
  return jnp.stack(
    [
      jnp.sum(_fmix32(w ^ _fmix32(i + jnp.uint32(seed))), dtype=jnp.uint32)
      for seed in (0x9E3779B9, 0x7F4A7C15)
    ]
  )


def leaf_paths(tree) -> dict[str, object]:
  """{'a/b/c': leaf} with the names Flax's ``flatten_dict`` would give."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[
      '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k)))) for k in path)
    ] = leaf
  return out


def array_checksums(tree) -> dict[str, str]:
  """{path: 16 hex digits} for every array of ``tree`` (jax or numpy arrays, any
  sharding; a collective when arrays span processes)."""
  sums = {p: _checksum(x) for p, x in leaf_paths(tree).items()}
  return {
    p: ''.join(f'{int(v):08x}' for v in np.asarray(jax.device_get(s))) for p, s in sums.items()
  }


# ---------------------------------------------------------------------- Array record
def config_record(config) -> dict:
  """The config sections that decide the arrays' layout, as plain JSON values."""
  if config is None:
    return {}
  if hasattr(config, 'to_json_best_effort'):
    config = json.loads(config.to_json_best_effort())
  return {k: config[k] for k in CONFIG_SECTIONS if k in config}


def make_record(tree, config=None) -> dict:
  """The array record of ``tree``: {'version', 'arrays': {path: {shape, dtype,
  checksum}}, 'config'}. Reads the arrays on device (blocks until they exist)."""
  sums = array_checksums(tree)
  arrays = {
    p: {'shape': list(np.shape(x)), 'dtype': str(jnp.dtype(x.dtype)), 'checksum': sums[p]}
    for p, x in leaf_paths(tree).items()
  }
  return {'version': VERSION, 'arrays': arrays, 'config': config_record(config)}


def _flat_config(d, prefix='') -> dict:
  out = {}
  for k, v in (d or {}).items():
    if isinstance(v, dict):
      out.update(_flat_config(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_diff(recorded: dict, config) -> list[str]:
  """'field: checkpoint X vs this run Y' for each recorded config field that differs
  (a model field that a config lacks, e.g. saved before it existed, is at its default)."""
  ours = _flat_config(_filled(config_record(config)))
  theirs = _flat_config(_filled(recorded))
  keys = sorted(
    k
    for k in set(ours) | set(theirs)
    if k.split('.')[0] in recorded and ours.get(k) != theirs.get(k)
  )
  return [
    f'config.{k}: checkpoint {theirs.get(k, "(absent)")!r} vs this run {ours.get(k, "(absent)")!r}'
    for k in keys
  ]


def _filled(record: dict) -> dict:
  """``record`` with its model section (when it has one) through ``fields.fill``."""
  if 'model' not in (record or {}):
    return record
  return {**record, 'model': fields.fill(record['model'])}


def structure_diff(record: dict, target) -> list[str]:
  """Arrays that ``target`` (arrays or ShapeDtypeStructs) expects and the record does
  not have with that shape and dtype. ``target`` may be a subset (partial restore)."""
  problems = []
  arrays = record['arrays']
  for path, leaf in leaf_paths(target).items():
    if path not in arrays:
      problems.append(f'{path}: expected {tuple(leaf.shape)}, not in the checkpoint')
      continue
    shape, dtype = tuple(arrays[path]['shape']), arrays[path]['dtype']
    if shape != tuple(leaf.shape) or dtype != str(jnp.dtype(leaf.dtype)):
      problems.append(
        f'{path}: checkpoint {shape} {dtype} vs expected '
        f'{tuple(leaf.shape)} {jnp.dtype(leaf.dtype)}'
      )
  return problems


def value_diff(record: dict, restored) -> list[str]:
  """Restored arrays whose checksum is not the recorded one."""
  got = array_checksums(restored)
  return [
    f'{p}: values differ from those saved (checksum {got[p]}, recorded '
    f'{record["arrays"][p]["checksum"]})'
    for p in sorted(got)
    if got[p] != record['arrays'][p]['checksum']
  ]


def read_record(step_dir: str, what: str) -> dict:
  """The array record of a checkpoint directory (from Orbax's step metadata file,
  read directly: Orbax's ``metadata()`` also parses every array's metadata).
  Raises CorruptCheckpointError when it is missing or unreadable."""
  path = os.path.join(step_dir, STEP_METADATA)
  try:
    record = files.read_json(path).get('custom_metadata', {}).get(RECORD_KEY)
  except FileNotFoundError:
    raise CorruptCheckpointError(what, [f'{STEP_METADATA} is missing']) from None
  except (ValueError, UnicodeDecodeError, AttributeError) as e:
    raise CorruptCheckpointError(what, [f'{STEP_METADATA} is unreadable ({e})']) from None
  if not isinstance(record, dict) or not isinstance(record.get('arrays'), dict):
    raise CorruptCheckpointError(
      what, [f'no integrity record in {STEP_METADATA} (not written by updetr_jax.checkpoints)']
    )
  return record


# ---------------------------------------------------------------------- File record
def _is_data(rel: str) -> bool:
  return 'd' in rel.split('/')[:-1]  # OCDBT data files: covered by the array checksums


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with files.open_file(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def write_file_record(step_dir: str) -> None:
  """Writes ``step_dir/integrity.json``: size of every file, SHA-256 of the
  metadata files. Call once the step has committed (its files are final)."""
  record = {}
  for rel, size in files.walk_files(step_dir):
    if rel == FILES_RECORD:
      continue
    record[rel] = {'size': size}
    if not _is_data(rel):
      record[rel]['sha256'] = _sha256(os.path.join(step_dir, rel))
  files.write_json(os.path.join(step_dir, FILES_RECORD), {'version': VERSION, 'files': record})


def check_files(step_dir: str) -> list[str]:
  """Problems of ``step_dir`` against its commit marker and file record (when it has
  one: a step killed between commit and record has none; its arrays are still
  checked against the array record)."""
  problems = []
  if not files.exists(os.path.join(step_dir, COMMIT_MARKER)):
    problems.append(f'{COMMIT_MARKER} is missing: the save never committed')
  path = os.path.join(step_dir, FILES_RECORD)
  if not files.exists(path):
    return problems
  try:
    record = files.read_json(path)['files']
  except (ValueError, KeyError, UnicodeDecodeError) as e:
    return problems + [f'{FILES_RECORD} is unreadable ({e})']
  present = dict(files.walk_files(step_dir))
  for rel, want in sorted(record.items()):
    if rel not in present:
      problems.append(f'{rel}: file missing')
    elif present[rel] != want['size']:
      problems.append(f'{rel}: {present[rel]} bytes now, {want["size"]} bytes when saved')
    elif 'sha256' in want and _sha256(os.path.join(step_dir, rel)) != want['sha256']:
      problems.append(f'{rel}: contents changed since the save (SHA-256)')
  return problems
