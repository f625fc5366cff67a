"""Workdir files on a local disk or a remote filesystem (``gs://...``), one API.

Every file a run writes besides checkpoints (Orbax handles those) goes through here,
so a ``gs://`` workdir shared by the hosts of a TPU slice works like a local one.
Remote paths use ``tf.io.gfile``; local paths use plain Python.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np


def is_remote(path: str) -> bool:
  return '://' in str(path)


def _gfile():
  import tensorflow as tf

  return tf.io.gfile


def join(*parts: str) -> str:
  return os.path.join(*[str(p) for p in parts])


def abspath(path: str) -> str:
  """Absolute local path; remote paths unchanged."""
  return str(path) if is_remote(path) else os.path.abspath(os.path.expanduser(str(path)))


def makedirs(path: str) -> None:
  if is_remote(path):
    _gfile().makedirs(path)
  else:
    os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
  return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list[str]:
  if is_remote(path):
    return [p.rstrip('/') for p in _gfile().listdir(path)]
  return os.listdir(path)


def walk_files(path: str) -> list[tuple[str, int]]:
  """(path relative to ``path`` with '/' separators, size in bytes) of every file below."""
  if is_remote(path):
    walk, size = _gfile().walk, lambda p: _gfile().stat(p).length
  else:
    walk, size = os.walk, os.path.getsize
  out = []
  for root, _, names in walk(path):
    for name in names:
      full = join(root, name)
      out.append((os.path.relpath(full, path).replace(os.sep, '/'), size(full)))
  return sorted(out)


def rename(src: str, dst: str) -> None:
  """Moves a file or directory (on an object store: each file copied, then the
  source removed)."""
  if not is_remote(src):
    os.rename(src, dst)
    return
  gfile = _gfile()
  if not gfile.isdir(src):
    gfile.rename(src, dst)
    return
  for rel, _ in walk_files(src):
    gfile.makedirs(os.path.dirname(join(dst, rel)))
    gfile.copy(join(src, rel), join(dst, rel))
  gfile.rmtree(src)


def open_file(path: str, mode: str = 'r'):
  return _gfile().GFile(path, mode) if is_remote(path) else open(path, mode)


def write_file(path: str, data: str | bytes) -> None:
  """Writes a whole file: ``data`` to ``path.tmp<pid>``, then renamed over ``path``
  (readers never see half a file)."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open_file(tmp, 'wb' if isinstance(data, bytes) else 'w') as f:
    f.write(data)
  if is_remote(path):
    _gfile().rename(tmp, path, overwrite=True)
  else:
    os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open_file(path, 'r') as f:
    return json.load(f)


def write_json(path: str, obj: Any, indent: int | None = 2) -> None:
  write_file(path, json.dumps(obj, indent=indent))


def append_line(path: str, line: str) -> None:
  """Appends ``line`` + newline. Object stores cannot append: a remote file is
  rewritten whole (fine for the small logs written here)."""
  if not is_remote(path):
    with open(path, 'a') as f:
      f.write(line + '\n')
    return
  old = ''
  if exists(path):
    with open_file(path, 'r') as f:
      old = f.read()
  write_file(path, old + line + '\n')


def write_npz(path: str, arrays: dict) -> None:
  """numpy arrays -> ``path`` (.npz), written whole."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)  # in memory: the zip writer seeks, a remote file cannot
  write_file(path, buf.getvalue())


def read_npz(path: str) -> dict:
  """``write_npz``'s arrays (no pickles)."""
  with open_file(path, 'rb') as f:
    z = np.load(io.BytesIO(f.read()), allow_pickle=False)
    return {k: z[k] for k in z.files}


def save_figure(fig, path: str, **kwargs) -> None:
  """matplotlib figure -> PNG at ``path`` (local or remote)."""
  with open_file(path, 'wb') as f:
    fig.savefig(f, format='png', **kwargs)
