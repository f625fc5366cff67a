"""Helpers shared by the data-pipeline tests."""

import numpy as np


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
