"""Target masks follow ``valid``: the padding rows of an evaluation pass and the rows of
an image that fails to decode in the pipeline (replaced by a gray image) carry no
targets, in the pre-training and the detection pipelines."""

import os
import shutil

import numpy as np

from conftest import importorskip  # fails instead of skipping under CI=true

tf = importorskip('tensorflow')

from updetr_jax import data  # noqa: E402
import test_data  # noqa: E402
import test_detection_data  # noqa: E402

# The tiny image folder and the tiny COCO set (module-scoped fixtures).
folder = test_data.folder
coco = test_detection_data.coco


def _break(path):
  """Overwrites an image (fine when indexed) with bytes no decoder accepts."""
  with open(path, 'wb') as f:
    f.write(np.random.default_rng(1).bytes(800))


def _check_masks(batches, stats, key, victim):
  """Checks that mask is False on every row whose valid is False, that ``victim``'s
  rows are all invalid and counted as decode_failed, and that there are padding
  rows. Returns the ``key`` (example index / image id) of the invalid rows."""
  invalid, n_victim = [], 0
  for b in batches:
    valid, mask = b['valid'], b['targets']['mask']
    assert valid.shape == mask.shape[:1]
    assert not mask[~valid].any(), (b[key], valid, mask)
    invalid += b[key][~valid].tolist()
    n_victim += int((b[key] == victim).sum())
    assert not valid[b[key] == victim].any()
  padding = [k for k in invalid if k != victim]
  assert padding and n_victim >= 1  # both kinds of invalid row are exercised
  assert stats.as_dict()['decode_failed'] == n_victim
  return invalid


def test_pretrain_mask_false_on_padding_and_replaced_rows(folder, tmp_path):
  root = str(tmp_path / 'images')
  shutil.copytree(folder, root)
  it, stats = data.make_pretrain_dataset(
    test_data.cfg_for(root), global_batch_size=4, num_patches=3, train=False
  )
  victim = data.list_image_files(root).index(os.path.join(root, 'img2.png'))
  _break(os.path.join(root, 'img2.png'))  # after indexing: found at load time
  batches = list(it)
  for b in batches:  # every patch of a valid row is a target
    assert b['targets']['mask'][b['valid']].all()
  invalid = _check_masks(batches, stats, 'index', victim)
  rows = sum(len(b['valid']) for b in batches)
  assert rows - len(invalid) == 13  # 14 usable images, one replaced


def test_detection_mask_false_on_padding_and_replaced_rows(coco, tmp_path):
  ann, image_dir = coco
  root = str(tmp_path / 'img')
  shutil.copytree(image_dir, root)
  it, stats, _ = data.make_detection_dataset(
    test_detection_data.cfg_for((ann, root)), global_batch_size=3, train=False
  )
  victim = 25
  _break(os.path.join(root, f'{victim:04d}.jpg'))
  batches = list(it)
  for b in batches:
    m = b['targets']['mask']
    for i in np.flatnonzero(b['valid']):
      k = len(test_detection_data.expected_targets(int(b['image_id'][i]))[0])
      assert m[i, :k].all() and not m[i, k:].any()
  invalid = _check_masks(batches, stats, 'image_id', victim)
  # Not vacuous: the images behind the invalid rows have targets.
  assert all(len(test_detection_data.expected_targets(i)[0]) for i in invalid)
  valid_ids = sorted(i for b in batches for i in b['image_id'][b['valid']].tolist())
  assert valid_ids == sorted(set(test_detection_data.IMAGES) - {victim})
