"""The learnability mosaics through the data config (seed, cell counts, frozen pixels,
the rotated frame), the comparison harness's refusal of bad ``config.pairs`` before
any run, and the FLOPs ``train.run`` reports for a step with a device-side patch loop."""

import hashlib
import json
import os
import sys
import time

import numpy as np
import pytest
from scipy import ndimage

from updetr_jax import compare, device_augment, mfu, train
from updetr_jax.configs import compare as compare_config
from updetr_jax.data import mosaic_data_config, mosaics, resolve_config, sources

sys.path.insert(0, os.path.dirname(__file__))
from test_pretext import _mosaic_tiny_config  # noqa: E402

SIZE = (48, 64)  # (H, W) of the mosaics below: large enough for 10 visible cells

# sha256 of the uint8 bytes of the first 3 'train' images of each style, rendered from
# the default mosaic fields at 16 x 20 (only mosaic_size, mosaic_count and
# mosaic_style set). A change of these is a change of the benchmark's images.
GOLDEN = {
  'cells': '42bf599b0def305e6c7de94121d3933841918d11a641671b9435f261eb15e4cb',
  'ramp': '883d57cdf83f5cc53785e873257f4327297de15fa6302dfbeaecc0f984d95346',
  'rotated_ramp': '6862fbac158f8143a50f945ac3fc5274c85c18f0108a84db3aeec622a537665c',
}


def mosaic_images(count: int, **fields) -> list[np.ndarray]:
  """The first ``count`` images of the mosaic source built from the default mosaic data
  config with ``fields`` overridden (``data.source='mosaics'``)."""
  cfg = resolve_config(dict(mosaic_data_config(), mosaic_count=count, **fields))
  src = sources.make_source(cfg)
  return [np.asarray(src.python_load(i)) for i in range(count)]


def count_regions(img: np.ndarray, threshold: float = 30.0, least: int = 4) -> int:
  """Regions of ``img`` separated by colour steps of more than ``threshold`` (RGB
  distance, 0..255) between neighbouring pixels, of at least ``least`` pixels: the
  cells of a 'cells' mosaic (their colours differ by 0.25 * 255; the shading and the
  noise change a pixel's neighbour by far less)."""
  f = img.astype(float)
  dx = np.linalg.norm(np.diff(f, axis=1), axis=-1) > threshold
  dy = np.linalg.norm(np.diff(f, axis=0), axis=-1) > threshold
  edge = np.zeros(img.shape[:2], bool)
  edge[:, 1:] |= dx
  edge[:, :-1] |= dx
  edge[1:] |= dy
  edge[:-1] |= dy
  labels, _ = ndimage.label(~edge)
  sizes = np.bincount(labels.ravel())[1:]
  return int((sizes >= least).sum())


# ----------------------------------------------------------------------- the mosaics


@pytest.mark.parametrize('style', mosaics.STYLES)
def test_mosaic_seed_picks_the_images(style):
  """data.mosaic_seed: the same seed renders the same pixels, another seed other images
  (every one of them)."""
  a = mosaic_images(3, mosaic_seed=0, mosaic_size=(16, 20), mosaic_style=style)
  again = mosaic_images(3, mosaic_seed=0, mosaic_size=(16, 20), mosaic_style=style)
  other = mosaic_images(3, mosaic_seed=1, mosaic_size=(16, 20), mosaic_style=style)
  assert all(np.array_equal(x, y) for x, y in zip(a, again))
  for x in a:
    assert not any(np.array_equal(x, y) for y in other)


def test_mosaic_cells_draws_both_ends_of_its_range():
  """data.mosaic_cells = (least, most), both inclusive: over 16 images the counts stay
  in the range and reach both ends; (k, k) gives every image exactly k cells."""
  counts = {}
  for cells in ((2, 3), (6, 10), (4, 4)):
    imgs = mosaic_images(16, mosaic_size=SIZE, mosaic_cells=cells)
    counts[cells] = [count_regions(x) for x in imgs]
  assert set(counts[(2, 3)]) == {2, 3}, counts
  assert min(counts[(6, 10)]) == 6 and max(counts[(6, 10)]) == 10, counts
  assert set(counts[(4, 4)]) == {4}, counts


def test_default_mosaics_do_not_change():
  """The default mosaics, pixel for pixel (GOLDEN: sha256 of the uint8 bytes)."""
  for style, digest in GOLDEN.items():
    imgs = mosaic_images(3, mosaic_size=(16, 20), mosaic_style=style)
    assert all(x.shape == (16, 20, 3) and x.dtype == np.uint8 for x in imgs)
    h = hashlib.sha256()
    for x in imgs:
      h.update(x.tobytes())
    assert h.hexdigest() == digest, style


def test_rotated_ramp_frame_is_a_rotation_or_reflection():
  """'rotated_ramp': red and green are (0.5 + ROTATED_SCALE * u, 0.5 + ROTATED_SCALE
  * v) with (u, v) an orthogonal transform (rotation, reflection) of the shifted
  position in image fractions: the least-squares plane's 2 x 2 matrix is
  ROTATED_SCALE times an orthogonal one, so a colour gives one position in its image,
  and the frames differ between images (reflected ones among them)."""
  h, w = 24, 32
  imgs = mosaic_images(8, mosaic_size=(h, w), mosaic_style='rotated_ramp')
  yy, xx = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing='ij')
  design = np.stack([xx.ravel(), yy.ravel(), np.ones(xx.size)], 1)
  frames = []
  for img in imgs:
    rg = img[..., :2].reshape(-1, 2).astype(float) / 255.0
    coef, *_ = np.linalg.lstsq(design, rg, rcond=None)
    m = coef[:2].T / mosaics.ROTATED_SCALE  # colour (r, g) per unit of (x, y)
    np.testing.assert_allclose(m @ m.T, np.eye(2), atol=0.03)
    frames.append(m)
  dets = np.sign([np.linalg.det(m) for m in frames])
  assert set(dets) == {-1.0, 1.0}, dets  # rotations and reflections both drawn
  assert not np.allclose(frames[0], frames[1], atol=0.05)
  # One colour, one place: pixels of (nearly) the same red and green lie close together.
  img = imgs[0][..., :2].reshape(-1, 2).astype(float)
  pos = np.stack([xx.ravel() * w, yy.ravel() * h], 1)
  colour_gap = np.linalg.norm(img[:, None] - img[None], axis=-1)
  pixel_gap = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
  assert pixel_gap[colour_gap <= 2.0].max() < 0.25 * max(h, w)


# ----------------------------------------------------------------------- the harness


@pytest.mark.parametrize(
  'pairs',
  [
    (('updetr',),),
    (('updetr', 'scratch', 'updetr_no_feature_recon'),),
    (('updetr', 'updetr_lookup'),),  # not one of config.arms
    (('updetr', 'scratch'), ('scratch', 'nope')),
    ('updetr', 'scratch'),  # names, not pairs
  ],
)
def test_compare_refuses_bad_pairs_before_any_run(pairs, tmp_path, monkeypatch):
  """A config.pairs entry that is not two of config.arms stops the harness at once: no
  data, no stage 0, no pre-training or fine-tuning, no run directory."""

  def no_stage(*args, **kwargs):
    raise AssertionError('a stage ran before config.pairs was checked')

  for name in ('prepare_data', 'prepare_backbone', '_run'):
    monkeypatch.setattr(compare, name, no_stage)
  monkeypatch.setattr(train, 'run', no_stage)
  config = compare_config.get_config('mini')
  config.arms = ('updetr', 'updetr_no_feature_recon', 'scratch')
  config.pairs = pairs
  workdir = str(tmp_path / 'cmp')
  t0 = time.time()
  with pytest.raises(ValueError, match=r'config\.pairs: .* is not two of config\.arms'):
    compare.run(config, workdir)
  assert time.time() - t0 < 10
  assert not os.path.exists(workdir)


# ----------------------------------------------------------------------- the FLOPs


def test_train_run_reports_the_patch_loop_flops(tmp_path, monkeypatch):
  """data.patch_chunk=1 with 4 examples: the step's patch loop runs 4 times, XLA's
  cost analysis counts its body once. The FLOPs train.run reports (summary.json's
  flops_per_step, the TFLOP/s of metrics.jsonl) are XLA's count of the step plus the
  preparer's uncounted_flops, not XLA's count alone."""
  counted, uncounted, inside = [], [], [False]
  step_flops, uncounted_flops = mfu.step_flops, device_augment.Preparer.uncounted_flops

  def spy_step_flops(stage):
    flops = step_flops(stage)
    if not inside[0]:
      counted.append(flops)
    return flops

  def spy_uncounted(self, batch):
    inside[0] = True
    try:
      flops = uncounted_flops(self, batch)
    finally:
      inside[0] = False
    uncounted.append((self.chunk, flops))
    return flops

  monkeypatch.setattr(mfu, 'step_flops', spy_step_flops)
  monkeypatch.setattr(device_augment.Preparer, 'uncounted_flops', spy_uncounted)

  config = _mosaic_tiny_config()
  config.model.patch_feature_norm = False  # no calibration pass
  config.data.update(mosaic_count=4, mosaic_eval_count=0, augment_patches=True, patch_chunk=1)
  config.update(
    examples_per_epoch=4,
    num_train_steps=2,
    checkpoint_every_steps=2,
    log_every_steps=1,
    report_flops=True,
  )
  config.eval.update(num_batches=0, every_steps=0)
  summary = train.run(config, str(tmp_path))

  assert len(counted) == 1 and counted[0] > 0, counted
  assert [c for c, _ in uncounted] == [1], uncounted
  extra = uncounted[0][1]
  assert extra > 0  # 3 of the loop's 4 bodies
  reported = summary['flops_per_step']
  assert reported == pytest.approx(counted[0] + extra, rel=1e-9)
  assert reported > counted[0]
  with open(tmp_path / 'summary.json') as f:
    assert json.load(f)['flops_per_step'] == pytest.approx(reported, rel=1e-9)
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f if line.strip()]
  for r in records:
    assert r['achieved_tflops_per_sec'] == pytest.approx(
      reported * r['steps_per_sec'] / 1e12, rel=1e-6
    )
