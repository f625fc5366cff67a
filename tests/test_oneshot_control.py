"""The one-shot task's control run: through ``OneShotTask.evaluate`` every trial of the
control run (``eval.other_class_queries``) is run with a query crop of another class,
while the normal runs' queries are of the trial's class.

The batches checked are the ones the task's evaluation consumes: the evaluation
iterator that ``make_oneshot_dataset`` builds for the task is wrapped to record them,
and the detector is replaced by one that records the query patches it is given. The
query's class is looked up in the json (``_Truth``), and the patch given to the
detector is checked to be that box's crop.
"""

import jax
import numpy as np

from conftest import importorskip  # fails instead of skipping under CI=true

importorskip('tensorflow')

from test_oneshot import _data_sharding, tiny_oneshot_config  # noqa: E402
from test_oneshot_protocol import UNSEEN, _make_oneshot_set, _pil_crop, _Truth  # noqa: E402
from updetr_jax.data import augment  # noqa: E402
from updetr_jax.tasks import oneshot as oneshot_task  # noqa: E402


class _RecordingIterator:
  """The task's evaluation iterator; records each pass's batches, in order."""

  def __init__(self, it):
    self.it, self.passes = it, []

  def use_query_seed(self, *args, **kwargs):
    self.it.use_query_seed(*args, **kwargs)
    self.passes.append([])

  def __iter__(self):
    for batch in self.it:
      self.passes[-1].append(batch)
      yield batch


def test_control_run_gives_every_trial_a_query_of_another_class(tmp_path, monkeypatch):
  ann, image_dir = _make_oneshot_set(str(tmp_path / 'data'))
  truth = _Truth(ann, image_dir)
  config = tiny_oneshot_config(ann, image_dir)
  config.data.unseen_classes = UNSEEN
  config.eval.query_seeds = (0, 1)
  assert config.eval.other_class_queries  # the release's setting: the control runs

  made = []  # the evaluation iterators the task builds
  real = oneshot_task.make_oneshot_dataset

  def make_dataset(*args, **kwargs):
    it, stats, info = real(*args, **kwargs)
    if not kwargs['train']:
      it = _RecordingIterator(it)
      made.append(it)
    return it, stats, info

  monkeypatch.setattr(oneshot_task, 'make_oneshot_dataset', make_dataset)
  task = oneshot_task.OneShotTask(config, _data_sharding())

  fed = []  # the query patches given to the detector, per call
  n = config.model.num_queries

  def detect(variables, images, padding_mask, orig_size, patches):
    fed.append(np.asarray(jax.device_get(patches)))
    b = images.shape[0]
    boxes = np.tile(np.array([0, 0, 8, 8], np.float32), (b, n, 1))
    return np.zeros((b, n), np.float32), None, boxes

  task.detect = detect
  metrics = task.evaluate(None, {}, step=1, workdir=str(tmp_path / 'run'))
  assert 'AP50_seen_other_class_query' in metrics

  assert len(made) == 1
  passes = made[0].passes
  assert len(passes) == 3  # query seeds 0 and 1, then the control run
  assert len(fed) == sum(len(p) for p in passes)
  mean, std = np.asarray(augment.MEAN), np.asarray(augment.STD)
  run, _ = truth.trials()
  calls = iter(fed)
  for k, batches in enumerate(passes):
    control = k == 2
    trials = []
    for batch in batches:
      patches = next(calls)
      for r in np.flatnonzero(batch['valid']):
        iid, c = int(batch['image_id'][r]), int(batch['label'][r])
        qid, q_box = int(batch['query_image_id'][r]), batch['query_box'][r]
        trials.append((iid, c))
        assert qid != iid
        # the query box's class, from the json
        q_class = [cc for cc, b in truth.boxes[qid] if np.allclose(b, q_box, atol=1e-4)]
        assert len(q_class) == 1, (iid, c, qid)
        if control:
          assert q_class[0] != c, f'control run: trial {(iid, c)} got a query of its class'
        else:
          assert q_class[0] == c, f'run {k}: trial {(iid, c)} got a query of class {q_class}'
        # the patch the detector was given is that box's crop from the query image
        want = _pil_crop(truth.path[qid], q_box, config.data.patch_size)
        got = patches[r, 0] * std + mean
        assert np.abs(got - want).mean() < 0.5 / 255, (k, iid, c, qid)
    assert sorted(trials) == sorted(run), f'pass {k}: not every trial exactly once'
