"""Workdir files behave the same on a local disk and on a remote filesystem (TF's
in-memory ram:// stands in for gs://)."""

import os
import uuid

import matplotlib.pyplot as plt
import pytest

from updetr_jax import files


@pytest.mark.parametrize('remote', [False, True])
def test_workdir_files_local_and_remote(tmp_path, remote):
  # ram:// lives as long as the process: a fresh root per call (a rerun in the same
  # process must not append to the last one's metrics.jsonl)
  root = f'ram://files_test_{uuid.uuid4().hex}' if remote else str(tmp_path)
  d = files.join(root, 'run', 'eval')
  files.makedirs(d)
  files.makedirs(d)  # exists: fine
  assert files.isdir(d) and files.is_remote(d) == remote
  log = files.join(d, 'metrics.jsonl')
  for line in ('{"step": 1}', '{"step": 2}'):
    files.append_line(log, line)
  with files.open_file(log) as f:
    assert f.read() == '{"step": 1}\n{"step": 2}\n'
  summary = files.join(d, 'summary.json')
  files.write_json(summary, {'AP': 0.5})
  files.write_json(summary, {'AP': 0.25})  # a rewrite replaces, never appends
  assert files.read_json(summary) == {'AP': 0.25}
  fig = plt.figure()
  files.save_figure(fig, files.join(d, 'curve.png'))
  plt.close(fig)
  with files.open_file(files.join(d, 'curve.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert sorted(files.listdir(d)) == ['curve.png', 'metrics.jsonl', 'summary.json']
  assert files.abspath(d) == (d if remote else os.path.abspath(d))
