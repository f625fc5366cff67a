r"""Device benchmark suite: the UP-DETR pre-training and DETR fine-tuning steps, one command.

Usage on the GPU machine (one NVIDIA H200), from the repository root:

  PYTHONUNBUFFERED=1 bash benchmarks/device_suite.sh --out $OUT/device_suite.jsonl

  device tool: run(command=<that line>, timeout_s=540), no carry. The repository is
  copied there and is all the suite needs: it imports jax (CUDA), flax, optax,
  orbax-checkpoint, absl-py, numpy and scipy, all installed on that machine
  (python3), and never TensorFlow, tensorflow-datasets, clu or ml_collections (none
  is there); no wheel to carry. It ends within 8 minutes, compilation included
  (--budget-s 450, see "Budget"; hard stop at --deadline-s, default budget + 15 s).
  Some cases only: --cases pretrain_bf16_fused,finetune_bf16_fused (--list names them).
  On a CPU, every case with a tiny model (about 1.5 minutes on 2 cores):
  bash benchmarks/device_suite.sh --tiny

Output: one JSON object per line on stdout (and in --out FILE): one per case in the
order run (``status`` 'ok', 'skipped' with a ``reason``, or 'error' with the
exception), then a summary (``"summary": true``: device, versions, a table of every
case, the matching shares). Progress and warnings go to stderr. Exit status 1 if a
case failed with an error, else 0 (cases skipped for the budget included).

Cases, most important first (the release step as it runs today, then the baselines
of both tasks, then the mixed-precision and fused-attention variants):

  1 pretrain_f32_einsum    2 pretrain_matching      3 finetune_f32_einsum
  4 finetune_matching      5 pretrain_bf16_einsum   6 pretrain_bf16_fused
  7 finetune_bf16_einsum   8 finetune_bf16_fused    9 pretrain_f32_fused
  10 finetune_f32_fused

pretrain: the release UP-DETR model (ResNet-50 frozen with the position embedding,
pre-norm, 6 + 6 layers, hidden 256, 8 heads, FFN 2048, 100 queries, M=10 patches;
AdamW on the transformer and heads) on 32 images per device of 448x576 (the middle
one of the release's pre-training buckets; its 14x18 feature map has an even
length, which cuDNN's attention needs with a mask in training) and 10 patches of
128 px each. finetune: DETR with 91+1 classes, the same architecture (pre-norm, as
fine-tuning from UP-DETR uses it), stem and layer1 frozen, the rest of the CNN at
lr_backbone; 32 images per device of 800x1088 (the release's middle fine-tuning
bucket, 25x34 features), targets padded to 100 per image with 1..20 real ones.
Synthetic inputs (random images, boxes, no padding; the padding mask is still
applied). Dropout is the release's 0.1.

f32 / bf16: ``model.dtype`` 'float32' (matmuls at JAX's default precision: TF32 on
the tensor cores of A100 and later GPUs) or 'bfloat16' (activations and matmuls,
float32 parameters, logits, softmax and losses). einsum / fused: ``model.attention``
'einsum' (the release's attention, dropout on the probabilities included) or the
fused ``jax.nn.dot_product_attention``: 'cudnn' (cuDNN flash attention) on a GPU in
bfloat16, else 'dot_product' (XLA's implementation; cuDNN's kernel takes no
float32), recorded as ``attention`` with a note. A cuDNN case that fails to lower
or compile is rerun with 'dot_product' and the error kept in ``attention_note``.
The fused kernels apply no dropout to attention probabilities
(``attention_dropout_applied``: false); residual and FFN dropout stay.

A step case: the jitted update step of updetr_jax/train_step.py (forward, the loss
with on-device Hungarian matching of all 6 decoder layers, backward, AdamW, state
donated) is lowered, compiled and run ``warmup`` times, then timed ``repeats`` times
(wall clock to the end of the step, outputs ready); ``step_s`` is the median.
Reported: images_per_s (global batch / step_s), lower_s, compile_s (XLA compile and
autotuning), first_step_s, xla_flops_per_step (XLA's cost analysis of this very
program), model_flops_per_step (the same count for the einsum program of the same
task and dtype: XLA does not count FLOPs inside cuDNN's custom calls, so fused
cases are measured against the einsum count), achieved_tflops_per_s
(model FLOPs / step_s), peak_dtype and peak_tflops_per_device (updetr_jax/mfu.py:
'tf32' for float32 on GPUs at the default precision, 'bfloat16' for bfloat16; H200:
494 and 989 TFLOP/s dense) and mfu (null where the peak is unknown, e.g. CPU).

Matching share: a matching case times the jitted ``hungarian_match`` alone, as the
loss calls it (cost matrices and exact assignment for the 6 decoder layers in one
batched call) on the step's shapes: the step batch's targets and random
predictions [6, B, 100, C+1] / [6, B, 100, 4]. Each later step case of that task
reports ``matching_share`` = matching_s / step_s, and the summary lists them all.
The matching sits on the loss's critical path (nothing else runs beside it), so
this is the step time matching takes, up to the overlap XLA may find.

Budget (--budget-s, counted from the start of the process, imports included):
before each case the suite estimates what it will take (1.15 x the slowest case
of that task so far; a fine-tuning case before any has run: 1.5 x the slowest
pre-training case; a matching case: 1.5 x the last one; with nothing to go by it
runs) and records it as skipped ("budget: ...") when that would end past the
budget. A watchdog thread enforces it: at --deadline-s (default budget + 15 s) it
prints the case in progress and the remaining ones as skipped, then the summary,
and ends the process (exit status 0). Not yet measured on a GPU; expected on an
H200: about 1 min per pre-training case and 1.5 min per fine-tuning case,
compilation dominating, so the budget fits about the first 6-8 cases; the summary
lists the skipped ones: rerun them with --cases.

--tiny: a CPU-sized version of every case (ResNet tiny, 1 encoder + 2 decoder
layers, hidden 32, 20 queries, 2 images per device of 64x96 / 96x128, 32-px
patches, 8 target slots, 1 warm-up, 2 repeats), compiled with most XLA
optimisations off (jax_disable_most_optimizations): it shows that every case runs,
its timings mean nothing.
"""

from __future__ import annotations

import time

_T0 = time.monotonic()  # the budget counts from here, before JAX is imported

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Callable  # noqa: E402

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from updetr_jax import device_augment, mfu, sharding, train_step  # noqa: E402
from updetr_jax.matching import hungarian_match  # noqa: E402
from updetr_jax.models import build_model  # noqa: E402

# --------------------------------------------------------------------------------------
# Configs: the release's, without ml_collections
# --------------------------------------------------------------------------------------


class Config(dict):
  """A dict with attribute access: what train_step reads of an ml_collections config."""

  def __getattr__(self, name: str) -> Any:
    try:
      return self[name]
    except KeyError as e:
      raise AttributeError(name) from e


def _config(d: dict) -> Config:
  return Config({k: _config(v) if isinstance(v, dict) else v for k, v in d.items()})


# The release model and training settings, as updetr_jax/configs/common.py,
# pretrain.py and finetune_coco.py define them. Written out here because those files
# need ml_collections (not installed on the GPU machines); tests/test_device_suite.py
# checks that the two agree.
RELEASE_MODEL = dict(
  backbone='resnet50',
  dilation=False,
  position_embedding='sine',
  hidden_dim=256,
  nheads=8,
  enc_layers=6,
  dec_layers=6,
  dim_feedforward=2048,
  dropout=0.1,
  num_queries=100,
  pre_norm=True,
  aux_loss=True,
  dtype='float32',
  remat='',
  attention='einsum',
  value_pos=False,
)
RELEASE = {
  'pretrain': dict(
    model=dict(
      RELEASE_MODEL,
      num_classes=2,
      num_patches=10,
      feature_recon=True,
      patch_query_drop=0.1,
      patch_feature_norm=False,
      query_shuffle=False,
      patch_content=False,
    ),
    matcher=dict(group_matching=False),
    loss=dict(eos_coef=0.1, weight_ce=1.0, weight_bbox=5.0, weight_giou=2.0, weight_feature=1.0),
    optim=dict(
      lr=1e-4,
      lr_backbone=0.0,
      weight_decay=1e-4,
      clip_max_norm=0.1,
      lr_drop_epochs=(40,),
      frozen=(r'^(body|position)/',),
    ),
  ),
  'finetune': dict(
    model=dict(RELEASE_MODEL, num_classes=91),
    loss=dict(eos_coef=0.1, weight_ce=1.0, weight_bbox=5.0, weight_giou=2.0),
    optim=dict(
      lr=1e-4,
      lr_backbone=5e-5,
      weight_decay=1e-4,
      clip_max_norm=0.1,
      lr_drop_epochs=(200,),
      frozen=(r'^body/(conv1|bn1|layer1_\d+)/',),
    ),
  ),
}
RELEASE_MATCHER = dict(solver='exact', cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)
# --tiny: the same topology, CPU-sized (num_queries stays divisible by num_patches=10).
TINY_MODEL = dict(
  backbone='resnet_tiny',
  hidden_dim=32,
  nheads=4,
  enc_layers=1,
  dec_layers=2,
  dim_feedforward=64,
  num_queries=20,
)
TASKS = tuple(RELEASE)


def step_config(
  task: str, *, tiny: bool = False, batch_size: int = 32, **model_overrides
) -> Config:
  """The train-step config of ``task`` ('pretrain' or 'finetune').

  Args:
    task: 'pretrain' (UP-DETR, configs/pretrain.py) or 'finetune' (DETR on COCO,
      configs/finetune_coco.py).
    tiny: the --tiny model (TINY_MODEL) instead of the release's.
    batch_size: global batch size.
    **model_overrides: model fields, e.g. dtype='bfloat16', attention='cudnn'.

  Returns:
    A Config with model, loss, matcher, optim, init (nothing to load),
    loss_replicas=1 and batch_size: what ``train_step.init_train_state`` and
    ``train_step.criterion`` read.
  """
  if task not in RELEASE:
    raise ValueError(f'unknown task {task!r}; expected one of {TASKS}')
  release = RELEASE[task]
  model = dict(release['model'], **(TINY_MODEL if tiny else {}), **model_overrides)
  return _config(
    dict(
      task=task,
      model=model,
      loss=release['loss'],
      matcher=dict(RELEASE_MATCHER, **release.get('matcher', {})),
      optim=release['optim'],
      loss_replicas=1,
      batch_size=batch_size,
      init=dict(backbone_checkpoint='', checkpoint='', pretrained='', random_backbone=True),
    )
  )


# --------------------------------------------------------------------------------------
# Synthetic batches
# --------------------------------------------------------------------------------------


def _hw(size) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _random_boxes(rng, shape) -> np.ndarray:
  """Random cxcywh boxes inside the unit square: [*shape, 4] float32."""
  wh = rng.uniform(0.1, 0.5, shape + (2,))
  c = rng.uniform(wh / 2, 1 - wh / 2)
  return np.concatenate([c, wh], -1).astype(np.float32)


def synthetic_batch(batch: int, size, num_patches: int, patch_size: int, seed: int = 0) -> dict:
  """A random UP-DETR pre-training batch as the host sends it (numpy): the patches are
  cut and augmented on the device (``release_preparer``, in the train step).

  Args:
    batch: images B. size: image side (int) or (H, W). num_patches: M.
    patch_size: P (unused here: the device's). seed: numpy seed.

  Returns:
    images uint8 [B, H, W, 3], image_size int32 [B, 2] (no padding), patch_boxes
    float32 [B, M, 4] (x, y, w, h pixels, as the targets), patch_seeds uint32 [B, 2],
    targets: boxes [B, M, 4] (cxcywh), labels [B, M] int32 (1 = "is the patch"),
    mask [B, M] bool (all real).
  """
  del patch_size
  h, w = _hw(size)
  rng = np.random.default_rng(seed)
  boxes = _random_boxes(rng, (batch, num_patches))
  cx, cy, bw, bh = np.moveaxis(boxes, -1, 0)
  rect = np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, bw * w, bh * h], -1)
  return {
    'images': rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8),
    'image_size': np.tile(np.int32([h, w]), (batch, 1)),
    'patch_boxes': rect.astype(np.float32),
    'patch_seeds': np.stack([np.full(batch, 7), np.arange(batch)], 1).astype(np.uint32),
    'targets': {
      'boxes': boxes,
      'labels': np.ones((batch, num_patches), np.int32),
      'mask': np.ones((batch, num_patches), bool),
    },
  }


def release_preparer(patch_size: int, sharding=None) -> device_augment.Preparer:
  """The release's device-side patch pipeline (crop, the release's augmentation at its
  default probabilities, normalisation) for P = patch_size, one example at a time on
  each device of ``sharding`` (``data.patch_chunk`` = 1): host batch -> model batch.
  Its ``uncounted_flops(batch)`` are what XLA's count of the step misses."""
  aug = dict(kernel_size=device_augment.blur_kernel_size(patch_size))
  return device_augment.patch_preparer(patch_size, aug, sharding)


def synthetic_detection_batch(
  batch: int, size, max_targets: int, max_real: int, num_classes: int, seed: int = 0
) -> dict:
  """A random detection batch, targets padded as the COCO pipeline pads them (host numpy).

  Args:
    batch: images B. size: image side (int) or (H, W). max_targets: T, the padded
    target count. max_real: real targets per image drawn from 1..max_real (<= T).
    num_classes: labels drawn from 1..num_classes - 1. seed: numpy seed.

  Returns:
    images [B, H, W, 3] float32, padding_mask [B, H, W] bool (no padding),
    targets: boxes [B, T, 4] (cxcywh, zeros on padding), labels [B, T] int32,
    mask [B, T] bool (True on the real targets).
  """
  h, w = _hw(size)
  rng = np.random.default_rng(seed)
  n_real = rng.integers(1, min(max_real, max_targets) + 1, size=(batch,))
  mask = np.arange(max_targets)[None] < n_real[:, None]
  labels = rng.integers(1, max(num_classes, 2), size=(batch, max_targets))
  return {
    'images': rng.standard_normal((batch, h, w, 3)).astype(np.float32),
    'padding_mask': np.zeros((batch, h, w), bool),
    'targets': {
      'boxes': np.where(mask[..., None], _random_boxes(rng, (batch, max_targets)), 0.0).astype(
        np.float32
      ),
      'labels': np.where(mask, labels, 0).astype(np.int32),
      'mask': mask,
    },
  }


# --------------------------------------------------------------------------------------
# Timing and cost
# --------------------------------------------------------------------------------------


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int) -> tuple[Any, list[float]]:
  """Calls ``fn`` warmup times, then times ``repeats`` calls to their outputs being ready.

  Returns:
    (the last call's output, [repeats] seconds).
  """
  out = None
  for _ in range(warmup):
    out = jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return out, times


def peak_info(dtype: str, device=None) -> tuple[str, float | None]:
  """(the mfu.PEAK_FLOPS column a ``dtype`` step runs at on ``device``, its FLOP/s or None)."""
  device = device or jax.devices()[0]
  name = mfu.peak_dtype(dtype, device)
  return name, mfu.device_peak_flops(device.device_kind, name)


def fused_attention_choice(dtype: str, platform_name: str) -> tuple[str, str]:
  """The ``model.attention`` of a fused case and why: cuDNN where it can run."""
  if platform_name == 'gpu' and dtype in ('bfloat16', 'float16'):
    return 'cudnn', 'cuDNN flash attention (jax.nn.dot_product_attention)'
  why = 'no GPU' if platform_name != 'gpu' else f'cuDNN attention takes no {dtype}'
  return 'dot_product', f'XLA implementation of jax.nn.dot_product_attention ({why})'


def _round(x, digits=4):
  return None if x is None else float(f'{x:.{digits}g}')


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Shapes and repetitions of the cases (per device batch; the mesh multiplies it)."""

  batch_per_device: int = 32
  pretrain_hw: tuple[int, int] = (448, 576)
  patch_size: int = 128
  finetune_hw: tuple[int, int] = (800, 1088)
  max_targets: int = 100
  max_real_targets: int = 20
  warmup: int = 2
  repeats: int = 10


TINY_SIZES = Sizes(
  batch_per_device=2,
  pretrain_hw=(64, 96),
  patch_size=32,
  finetune_hw=(96, 128),
  max_targets=8,
  max_real_targets=3,
  warmup=1,
  repeats=2,
)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  kind: str  # 'step' | 'matching'
  task: str
  dtype: str = 'float32'
  attention: str = 'einsum'  # 'einsum' | 'fused'


def _step(task, dtype, attention):
  short = {'float32': 'f32', 'bfloat16': 'bf16'}[dtype]
  return Case(f'{task}_{short}_{attention}', 'step', task, dtype, attention)


CASES = (
  _step('pretrain', 'float32', 'einsum'),
  Case('pretrain_matching', 'matching', 'pretrain'),
  _step('finetune', 'float32', 'einsum'),
  Case('finetune_matching', 'matching', 'finetune'),
  _step('pretrain', 'bfloat16', 'einsum'),
  _step('pretrain', 'bfloat16', 'fused'),
  _step('finetune', 'bfloat16', 'einsum'),
  _step('finetune', 'bfloat16', 'fused'),
  _step('pretrain', 'float32', 'fused'),
  _step('finetune', 'float32', 'fused'),
)
CASE_NAMES = tuple(c.name for c in CASES)


@dataclasses.dataclass
class TaskSetup:
  """What every case of one task shares: config, initial state (host), batch, loss."""

  config: Config
  host_state: Any
  constants: Any
  tx: Any
  batch: dict
  loss_fn: Callable
  setup_s: float


class Suite:
  """Runs the cases in order under the budget and prints one JSON record per case."""

  def __init__(self, args, sizes: Sizes, out_file=None):
    self.args = args
    self.sizes = sizes
    self.out_file = out_file
    self.device = jax.devices()[0]
    self.platform = self.device.platform
    self.num_devices = jax.device_count()
    self.mesh = sharding.make_mesh()
    self.data_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec('data'))
    self.repl = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.setups: dict[str, TaskSetup] = {}
    self.costs: dict[str, list[float]] = {t: [] for t in TASKS}  # seconds per step case
    self.match_costs: list[float] = []  # seconds per matching case
    self.matching_s: dict[str, float] = {}
    self.ref_flops: dict[tuple[str, str], float | None] = {}
    self.records: list[dict] = []
    self.lock = threading.Lock()
    self.pending: list[Case] = []
    self.current: tuple[Case, float] | None = None
    self.finished = False

  # ------------------------------------------------------------------ output
  def log(self, msg: str) -> None:
    print(f'[device_suite {time.monotonic() - _T0:6.1f}s] {msg}', file=sys.stderr, flush=True)

  def emit(self, record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if self.out_file:
      self.out_file.write(line + '\n')
      self.out_file.flush()
    if not record.get('summary'):
      self.records.append(record)

  def elapsed(self) -> float:
    return time.monotonic() - _T0

  def _base(self, case: Case) -> dict:
    return {
      'case': case.name,
      'kind': case.kind,
      'task': case.task,
      **({'dtype': case.dtype} if case.kind == 'step' else {}),
    }

  def skip(self, case: Case, reason: str) -> None:
    self.emit({**self._base(case), 'status': 'skipped', 'reason': reason})

  # ------------------------------------------------------------------ budget
  def estimate(self, case: Case) -> float | None:
    """Seconds the case is expected to take (None: nothing to go by, run it)."""
    if case.kind == 'matching':
      return 1.5 * max(self.match_costs) if self.match_costs else None
    if self.costs[case.task]:
      return 1.15 * max(self.costs[case.task])
    if case.task == 'finetune' and self.costs['pretrain']:
      return 1.5 * max(self.costs['pretrain'])
    return None

  def watchdog(self) -> None:
    """At the hard deadline: the case in progress and the rest are skipped, then exit."""
    with self.lock:
      if self.finished:
        return
      try:
        stop = f'the watchdog stopped the run at {self.elapsed():.0f} s'
        if self.current is not None:
          case, started = self.current
          self.skip(case, f'budget: {stop}, {time.monotonic() - started:.0f} s into the case')
        for case in self.pending:
          self.skip(case, f'budget: not started, {stop}')
        self.emit(self.summary(watchdog=True))
      finally:  # whatever printing did (e.g. a closed pipe), the process ends here
        for stream in (sys.stdout, sys.stderr):
          try:
            stream.flush()
          except Exception:  # noqa: BLE001
            pass
        os._exit(0)

  # ------------------------------------------------------------------ setup
  def setup(self, task: str) -> TaskSetup:
    if task in self.setups:
      return self.setups[task]
    t0 = time.perf_counter()
    sz = self.sizes
    batch_size = sz.batch_per_device * self.num_devices
    config = step_config(task, tiny=self.args.tiny, batch_size=batch_size)
    model = build_model(config.model)
    _, state, constants, tx, _ = train_step.init_train_state(
      config, model, jax.random.PRNGKey(0), steps_per_epoch=1000
    )
    host_state = jax.device_get(state)
    constants = jax.device_put(constants, self.repl)
    if task == 'pretrain':
      batch = synthetic_batch(batch_size, sz.pretrain_hw, config.model.num_patches, sz.patch_size)
    else:
      batch = synthetic_detection_batch(
        batch_size, sz.finetune_hw, sz.max_targets, sz.max_real_targets, config.model.num_classes
      )
    batch = sharding.to_global(batch, self.data_sharding)
    setup = TaskSetup(
      config,
      host_state,
      constants,
      tx,
      batch,
      train_step.criterion(config),
      time.perf_counter() - t0,
    )
    self.setups[task] = setup
    self.log(f'{task}: initialised in {setup.setup_s:.1f} s')
    return setup

  def shapes(self, task: str) -> dict:
    sz = self.sizes
    out = {'batch': sz.batch_per_device * self.num_devices, 'batch_per_device': sz.batch_per_device}
    if task == 'pretrain':
      return {
        **out,
        'image_hw': list(sz.pretrain_hw),
        'num_patches': RELEASE['pretrain']['model']['num_patches'],
        'patch_size': sz.patch_size,
      }
    return {
      **out,
      'image_hw': list(sz.finetune_hw),
      'max_targets': sz.max_targets,
      'max_real_targets': sz.max_real_targets,
    }

  # ------------------------------------------------------------------ step cases
  def _lower(self, setup: TaskSetup, dtype: str, attention: str, state):
    model = build_model(dict(setup.config.model, dtype=dtype, attention=attention))
    prepare = self._preparer(setup)
    step = jax.jit(
      train_step.make_train_step(model, setup.tx, setup.loss_fn, prepare),
      donate_argnums=(0,),
      out_shardings=(self.repl, self.repl),
    )
    return step.lower(state, setup.constants, setup.batch, jax.random.PRNGKey(1))

  def _preparer(self, setup: TaskSetup):
    if 'patch_seeds' not in setup.batch:
      return None
    return release_preparer(self.sizes.patch_size, self.data_sharding)

  def _flops(self, lowered, setup: TaskSetup) -> float | None:
    """XLA's count of the lowered step, plus what it misses of the patch loop."""
    flops = mfu.step_flops(lowered)
    prepare = self._preparer(setup)
    if flops and prepare is not None:
      flops += prepare.uncounted_flops(setup.batch)
    return flops

  def model_flops(self, case: Case, setup: TaskSetup) -> float | None:
    """XLA's FLOP count of the einsum step of this task and dtype (lowered only)."""
    key = (case.task, case.dtype)
    if key not in self.ref_flops:
      state = jax.eval_shape(lambda: setup.host_state)
      self.ref_flops[key] = self._flops(self._lower(setup, case.dtype, 'einsum', state), setup)
    return self.ref_flops[key]

  def measure_step(self, case: Case, setup: TaskSetup, attention: str) -> dict:
    sz = self.sizes
    state = jax.device_put(setup.host_state, self.repl)
    rng = jax.random.PRNGKey(1)
    t0 = time.perf_counter()
    lowered = self._lower(setup, case.dtype, attention, state)
    lower_s = time.perf_counter() - t0
    xla_flops = self._flops(lowered, setup)
    if attention == 'einsum':
      self.ref_flops.setdefault((case.task, case.dtype), xla_flops)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, setup.constants, setup.batch, rng))
    first_step_s = time.perf_counter() - t0
    holder = {'state': state}

    def call():
      holder['state'], m = compiled(holder['state'], setup.constants, setup.batch, rng)
      return holder['state'], m

    (_, metrics), times = time_calls(call, max(sz.warmup - 1, 0), sz.repeats)
    step_s = statistics.median(times)
    batch = sz.batch_per_device * self.num_devices
    model_flops = self.model_flops(case, setup)
    peak_name, peak = peak_info(case.dtype, self.device)
    util = mfu.mfu(model_flops, step_s, self.num_devices, peak)
    return {
      'images_per_s': _round(batch / step_s),
      'step_s': _round(step_s),
      'times_s': [_round(t) for t in times],
      'warmup': sz.warmup,
      'repeats': sz.repeats,
      'lower_s': round(lower_s, 2),
      'compile_s': round(compile_s, 2),
      'first_step_s': round(first_step_s, 3),
      'xla_flops_per_step': xla_flops,
      'model_flops_per_step': model_flops,
      'achieved_tflops_per_s': _round(model_flops / step_s / 1e12) if model_flops else None,
      'peak_dtype': peak_name,
      'peak_tflops_per_device': None if peak is None else peak / 1e12,
      'mfu': _round(util),
      'loss': float(metrics['loss']),
      'finite': bool(metrics['finite']),
    }

  def run_step(self, case: Case) -> dict:
    t_case = time.monotonic()
    setup = self.setup(case.task)
    m = setup.config.model
    record = {
      **self._base(case),
      'status': 'ok',
      **self.shapes(case.task),
      'model': {
        k: m[k]
        for k in (
          'backbone',
          'enc_layers',
          'dec_layers',
          'hidden_dim',
          'nheads',
          'dim_feedforward',
          'num_queries',
          'num_classes',
        )
      },
    }
    if case.attention == 'einsum':
      attention, note = 'einsum', 'the release attention (two einsums and a softmax)'
    else:
      attention, note = fused_attention_choice(case.dtype, self.platform)
    try:
      result = self.measure_step(case, setup, attention)
    except Exception as e:  # noqa: BLE001  (cuDNN refuses some shapes / setups)
      if attention != 'cudnn':
        raise
      note = (
        f'cuDNN failed ({type(e).__name__}: {str(e)[:300]}); rerun with the XLA '
        'implementation of jax.nn.dot_product_attention'
      )
      self.log(f'{case.name}: {note}')
      attention = 'dot_product'
      result = self.measure_step(case, setup, attention)
    dropout = setup.config.model.dropout
    record.update(
      attention=attention,
      attention_note=note,
      attention_dropout_applied=attention == 'einsum' and dropout > 0,
      dropout=dropout,
      **result,
    )
    if case.task in self.matching_s:
      record['matching_share'] = _round(self.matching_s[case.task] / result['step_s'])
    record['setup_s'] = round(setup.setup_s, 2)
    record['case_s'] = round(time.monotonic() - t_case, 2)
    self.costs[case.task].append(time.monotonic() - t_case)
    return record

  # ------------------------------------------------------------------ matching
  def run_matching(self, case: Case) -> dict:
    t_case = time.monotonic()
    setup = self.setup(case.task)
    m = setup.config.model
    targets = setup.batch['targets']
    b = targets['labels'].shape[0]
    layers, n, c1 = m.dec_layers, m.num_queries, m.num_classes + 1
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((layers, b, n, c1)).astype(np.float32)
    centre = rng.uniform(0.2, 0.8, (layers, b, n, 2))
    wh = rng.uniform(0.05, 0.4, (layers, b, n, 2))
    boxes = np.concatenate([centre, wh], -1).astype(np.float32)
    sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, 'data'))
    logits, boxes = jax.device_put((logits, boxes), sharding)
    solver = setup.config.matcher.solver
    match = jax.jit(
      lambda lg, bx, tg: hungarian_match({'pred_logits': lg, 'pred_boxes': bx}, tg, solver=solver)
    )
    t0 = time.perf_counter()
    compiled = match.lower(logits, boxes, targets).compile()
    compile_s = time.perf_counter() - t0
    _, times = time_calls(
      lambda: compiled(logits, boxes, targets), self.sizes.warmup, self.sizes.repeats
    )
    matching_s = statistics.median(times)
    self.matching_s[case.task] = matching_s
    shares = {
      r['case']: _round(matching_s / r['step_s'])
      for r in self.records
      if r.get('task') == case.task and r.get('kind') == 'step' and r.get('step_s')
    }
    self.match_costs.append(time.monotonic() - t_case)
    return {
      **self._base(case),
      'status': 'ok',
      'method': 'jitted hungarian_match alone (cost matrices + exact solver, all decoder '
      "layers in one call, as set_criterion calls it) on the step's shapes: "
      "its batch's targets, random predictions; share = matching_s / step_s",
      'solver': solver,
      'layers': layers,
      'batch': b,
      'queries': n,
      'target_slots': int(targets['labels'].shape[1]),
      'logits': c1,
      'matching_s': _round(matching_s),
      'times_s': [_round(t) for t in times],
      'compile_s': round(compile_s, 2),
      'matching_share': shares,
      'case_s': round(time.monotonic() - t_case, 2),
    }

  # ------------------------------------------------------------------ driver
  def run(self, cases: list[Case]) -> int:
    self.pending = list(cases)
    timer = threading.Timer(max(self.args.deadline_s - self.elapsed(), 0), self.watchdog)
    timer.daemon = True
    timer.start()
    errors = 0
    while True:
      with self.lock:
        if not self.pending:
          break
        case = self.pending.pop(0)
        left = self.args.budget_s - self.elapsed()
        need = self.estimate(case)
        if left <= 0 or (need is not None and need > left):
          self.skip(
            case,
            f'budget: estimated {need or 0:.0f} s, {max(left, 0):.0f} s of the '
            f'{self.args.budget_s:.0f} s budget left',
          )
          continue
        self.current = (case, time.monotonic())
      self.log(
        f'{case.name}: start ({left:.0f} s of budget left'
        + (f', estimate {need:.0f} s)' if need is not None else ')')
      )
      try:
        record = self.run_step(case) if case.kind == 'step' else self.run_matching(case)
      except Exception as e:  # noqa: BLE001  (one failing case must not stop the suite)
        errors += 1
        tb = traceback.format_exc()
        self.log(f'{case.name}: error\n{tb}')
        record = {
          **self._base(case),
          'status': 'error',
          'error': f'{type(e).__name__}: {str(e)[:1000]}',
          'traceback_tail': tb[-1500:],
        }
      with self.lock:
        self.current = None
        self.emit(record)
      self.log(
        f'{case.name}: {record["status"]}'
        + (f', step {record["step_s"]:.4g} s' if record.get('step_s') else '')
      )
    with self.lock:
      self.finished = True
      timer.cancel()
      self.emit(self.summary(watchdog=False))
    return 1 if errors else 0

  def summary(self, watchdog: bool) -> dict:
    status = {}
    for r in self.records:
      status.setdefault(r['status'], []).append(r['case'])
    table = []
    for r in self.records:
      row = {'case': r['case'], 'status': r['status']}
      for k in (
        'attention',
        'images_per_s',
        'step_s',
        'achieved_tflops_per_s',
        'mfu',
        'compile_s',
        'matching_s',
      ):
        if r.get(k) is not None:
          row[k] = r[k]
      table.append(row)
    shares = {}
    for r in self.records:
      if r.get('kind') == 'step' and r.get('step_s') and r['task'] in self.matching_s:
        shares[r['case']] = _round(self.matching_s[r['task']] / r['step_s'])
    return {
      'summary': True,
      'device': str(self.device),
      'device_kind': self.device.device_kind,
      'platform': self.platform,
      'num_devices': self.num_devices,
      'jax_version': jax.__version__,
      'versions': _versions(),
      'default_matmul_precision': jax.config.jax_default_matmul_precision,
      'tiny': self.args.tiny,
      'sizes': dataclasses.asdict(self.sizes),
      'budget_s': self.args.budget_s,
      'elapsed_s': round(self.elapsed(), 1),
      'stopped_by_watchdog': watchdog,
      'complete': not watchdog and not status.get('skipped') and not status.get('error'),
      'ok': status.get('ok', []),
      'skipped': status.get('skipped', []),
      'error': status.get('error', []),
      'matching_share': shares,
      'peaks': {
        d: dict(zip(('peak_dtype', 'peak_flops_per_device'), peak_info(d, self.device)))
        for d in ('float32', 'bfloat16')
      },
      'table': table,
    }


def _versions() -> dict:
  out = {'python': platform.python_version()}
  for name in ('jaxlib', 'flax', 'optax', 'numpy'):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  try:  # private API: the cuDNN JAX was built against, on CUDA builds only
    from jax._src.lib import cuda_versions  # noqa: PLC0415

    out['cudnn'] = cuda_versions.cudnn_get_version() if cuda_versions else None
  except Exception:  # noqa: BLE001
    out['cudnn'] = None
  return out


def select_cases(spec: str) -> list[Case]:
  """'all' or a comma-separated list of case names (run in CASES' order)."""
  if spec == 'all':
    return list(CASES)
  wanted = [s.strip() for s in spec.split(',') if s.strip()]
  unknown = sorted(set(wanted) - set(CASE_NAMES))
  if unknown:
    raise SystemExit(f'unknown case(s) {unknown}; choose from {list(CASE_NAMES)}')
  return [c for c in CASES if c.name in wanted]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument(
    '--tiny',
    action='store_true',
    help='CPU-sized model and inputs: the whole suite in about a minute',
  )
  p.add_argument('--cases', default='all', help=f'comma-separated, of {list(CASE_NAMES)}')
  p.add_argument('--list', action='store_true', help='print the case names and exit')
  p.add_argument(
    '--budget-s',
    type=float,
    default=450.0,
    help='cases that would end later (from process start) are skipped',
  )
  p.add_argument(
    '--deadline-s',
    type=float,
    default=None,
    help='the watchdog ends the run at this many seconds from process start (default: budget + 15)',
  )
  p.add_argument('--batch-per-device', type=int, default=None)
  p.add_argument('--repeats', type=int, default=None)
  p.add_argument('--warmup', type=int, default=None)
  p.add_argument('--finetune-hw', default=None, help='e.g. 800x1088 (H x W)')
  p.add_argument('--pretrain-hw', default=None, help='e.g. 448x576 (H x W)')
  p.add_argument('--out', default='', help='also write the JSON lines to this file')
  args = p.parse_args(argv)
  if args.deadline_s is None:
    args.deadline_s = args.budget_s + 15.0
  if args.list:
    print('\n'.join(CASE_NAMES))
    return 0
  if args.tiny:  # compile fast: the tiny timings only show that every case runs
    jax.config.update('jax_disable_most_optimizations', True)
  sizes = TINY_SIZES if args.tiny else Sizes()
  overrides = {
    k: getattr(args, k)
    for k in ('batch_per_device', 'repeats', 'warmup')
    if getattr(args, k) is not None
  }
  for k in ('finetune_hw', 'pretrain_hw'):
    if getattr(args, k):
      overrides[k] = tuple(int(v) for v in getattr(args, k).lower().split('x'))
  sizes = dataclasses.replace(sizes, **overrides)
  cases = select_cases(args.cases)
  out_file = open(args.out, 'w') if args.out else None  # noqa: SIM115
  try:
    suite = Suite(args, sizes, out_file)
    suite.log(
      f'{len(cases)} case(s) on {suite.num_devices} x {suite.device.device_kind}, '
      f'jax {jax.__version__}, budget {args.budget_s:.0f} s'
    )
    if suite.platform == 'cpu' and not args.tiny:
      suite.log(
        'warning: the release-size cases on a CPU take far longer than the budget; '
        'use --tiny for a CPU run'
      )
    return suite.run(cases)
  finally:
    if out_file:
      out_file.close()


if __name__ == '__main__':
  sys.exit(main())
