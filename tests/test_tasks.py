"""Every task registered in ``tasks.TASKS`` has every member of the interface that
``train.run`` uses (``tasks.Task``), and the defaults of ``tasks.base.TaskBase`` are
the documented ones (no device preparation, no calibration, no evaluation at step 0)."""

import ast
import inspect

from conftest import importorskip  # fails instead of skipping under CI=true

importorskip('tensorflow')  # the task modules load their data code

from updetr_jax import tasks, train  # noqa: E402
from updetr_jax.tasks.base import TaskBase  # noqa: E402


def _interface() -> dict[str, bool]:
  """{member of ``tasks.Task``: whether it is a method}."""
  out = {name: False for name in tasks.Task.__annotations__}
  for name, value in vars(tasks.Task).items():
    if inspect.isfunction(value) and not name.startswith('_'):
      out[name] = True
  return out


def _missing(cls) -> list[str]:
  """The members of the interface that the class ``cls`` (or its bases) lacks."""
  return [
    name
    for name, is_method in _interface().items()
    if not hasattr(cls, name) or (is_method and not callable(getattr(cls, name)))
  ]


def test_the_interface_is_what_the_loop_uses():
  with open(train.__file__) as f:
    tree = ast.parse(f.read())
  used = {
    node.attr
    for node in ast.walk(tree)
    if isinstance(node, ast.Attribute)
    and isinstance(node.value, ast.Name)
    and node.value.id == 'task'
  }
  assert used == set(_interface())
  attributes = {m for m, is_method in _interface().items() if not is_method}
  assert attributes == {'evaluate_at_start', 'trains_batch_stats'}


def test_every_registered_task_provides_the_interface():
  for name in tasks.TASKS:
    cls = tasks.get_task(name)
    assert issubclass(cls, TaskBase), name
    assert not _missing(cls), f'task {name!r} ({cls.__name__}) lacks {_missing(cls)}'


def test_a_task_without_a_method_is_found():
  class NoEvaluate(TaskBase):
    def train_data(self, start):
      return iter(()), None

    def finish(self, metrics, step, workdir):
      return {}

  assert _missing(NoEvaluate) == ['evaluate']


def test_the_defaults():
  task = TaskBase(config=None, data_sharding=None)
  variables = {'params': {}, 'batch_stats': {}}
  assert task.calibrate(None, variables) is variables
  assert task.device_inputs(train=True) is None and task.device_inputs(train=False) is None
  assert TaskBase.evaluate_at_start is False
