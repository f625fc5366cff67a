r"""UP-DETR pre-training vs scratch (``python -m updetr_jax.compare``).

  python -m updetr_jax.compare --config=configs/compare.py:mini --workdir=workdir/compare
  python -m updetr_jax.compare --config=configs/compare.py:demo --workdir=workdir/finetune_demo

Variants (``:name``):
  ``mini`` (default): the built-in miniature benchmark of real pixels (docs/miniature.md):
      stage-0 SimCLR CNN on the unlabeled pool, pre-training of two arms'
      transformers (UP-DETR; UP-DETR without feature reconstruction), fine-tuning of
      those and of scratch on the labelled set, 3 seeds; ``make compare-mini`` (about
      45 min on 2 cores). ``--config.seeds=(0,1,2,3,4)`` for the figures of
      docs/results/pretraining_vs_scratch.md (the 3-seed runs are reused),
      ``--config.label_fractions=(0.1,1.0)`` for fewer labels,
      ``--config.arms=(...,'updetr_trainable_cnn',...)`` for the frozen-CNN ablation,
      ``'updetr_patch_options'`` (pre-training with configs/pretrain.py PATCH_OPTIONS,
      the regime that learns the pretext on the learnability benchmark, fine-tuned
      with its ``value_pos``) with ``'scratch_value_pos'`` (scratch with that decoder).
  ``lookup``: ``mini``'s data and budgets with arms updetr (the release's pre-training),
      updetr_lookup (the pre-training on the learnability benchmark's lookup, where the
      pretext is learned), scratch and scratch_value_pos (scratch with the lookup arm's
      decoder), 5 seeds, paired differences against both baselines
      (docs/results/pretraining_vs_scratch.md).
  ``demo``: its short form (``make finetune-demo``, about 7 min): UP-DETR vs scratch,
      3 seeds, short budgets (early fine-tuning only: read its noise level).
  ``oneshot``: one-shot detection (configs/oneshot_voc.py's task) on the miniature,
      its classes split into seen and unseen (``ONESHOT_UNSEEN``: coin and seven never
      trained on), UP-DETR vs scratch, 3 seeds, AP50 seen / unseen over 5 query runs
      (``make oneshot-demo``); ``--config.arms="('updetr','updetr_single_query','scratch')"``
      adds single-query pre-training (M = 1, every query gets the patch, as in one-shot);
      ``'updetr_single_query_patch_options'``: the same with the options.

Your own data: ``--config.miniature.enabled=False`` and the data fields of the two
stages, as in configs/pretrain.py and configs/finetune_coco.py, e.g.
``--config.pretrain.data.folder=/unlabeled --config.pretrain.data.eval_folder=/heldout
--config.finetune.data.ann_file=train.json --config.finetune.data.image_dir=img/
--config.finetune.data.eval_ann_file=val.json --config.finetune.data.eval_image_dir=img/``,
and a CNN (``--config.backbone_checkpoint=swav.pth``, or stage 0 on your pool with
``--config.stage0.data.folder=/unlabeled``). The model of both stages is
``config.pretrain.model`` / ``config.finetune.model`` (they must match).
"""

import ml_collections

from updetr_jax.configs import common, finetune_coco, oneshot_voc, pretrain, ssl_backbone

VARIANTS = ('mini', 'demo', 'oneshot', 'lookup')
# The miniature's classes never trained on in the one-shot variant (a non-digit and a
# digit); face, zero, one and four are seen.
ONESHOT_UNSEEN = ('coin', 'seven')

# Image geometry of the miniature (128-px scenes): both stages.
_PRETRAIN_DATA = dict(
  scales=(96, 112, 128),
  max_size=160,
  eval_scale=128,
  buckets=((128, 160),),
  patch_size=32,
  cache_decoded=True,
  index_cache_dir=None,
)
_FINETUNE_DATA = dict(
  scales=(96, 112, 128),
  max_size=160,
  eval_scale=128,
  crop_resize_scales=(112, 128, 144),
  crop_size=(80, 128),
  buckets=((128, 160),),
  cache_decoded=True,
  index_cache_dir=None,
  max_targets=16,
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'mini'
  if variant not in VARIANTS:
    raise ValueError(f'configs/compare.py: unknown variant {variant!r} (choose one of {VARIANTS})')
  from updetr_jax.data import detection_data_config  # noqa: PLC0415

  config = ml_collections.ConfigDict()
  config.arms = ('updetr', 'updetr_no_feature_recon', 'scratch')
  config.seeds = (0, 1, 2)
  config.label_fractions = (1.0,)
  config.metrics = ('AP', 'AP50')  # of the fine-tuning evaluation, compared over seeds
  # More paired differences (a - b per seed) than each arm - scratch, e.g.
  # (('updetr_lookup', 'scratch_value_pos'), ('updetr_lookup', 'updetr')).
  config.pairs = ()
  config.compilation_cache_dir = ''  # e.g. WORKDIR/.xla_cache: runs share compiled steps
  # The CNN of every run: a torchvision-layout .pth / .npz, or '' for stage 0's.
  config.backbone_checkpoint = ''
  config.miniature = ml_collections.ConfigDict(
    dict(
      enabled=True,
      directory='',  # '' = WORKDIR/data
      seed=0,
      num_pool=2000,
      num_train=600,
      num_eval=450,
    )
  )
  # Stage 0: the CNN trained with SimCLR (configs/ssl_backbone.py; data.folder '' = the
  # miniature's pool, model.backbone = the pre-training's); enabled False: no stage 0.
  config.stage0 = ssl_backbone.get_config()
  config.stage0.update(enabled=True, num_train_steps=600)

  # Stage 2: UP-DETR pre-training (the demo model of configs/pretrain.py).
  p = pretrain.get_config('demo')
  # The release's patch path (arm 'updetr', docs/results/pretraining_vs_scratch.md);
  # the options arms (updetr_jax.compare ARMS) turn PATCH_OPTIONS on.
  pretrain.use_patch_options(p, on=False)
  p.data.update(source='folder', folder='', eval_folder='', demo_repeats=1, **_PRETRAIN_DATA)
  p.examples_per_epoch = 2000
  p.batch_size = 16
  p.num_train_steps = 2000
  p.optim.update(lr=5e-4, lr_backbone=5e-5, lr_drop_epochs=())  # as fine-tuning's
  p.checkpoint_every_steps = 500
  p.log_every_steps = 100
  p.eval.update(num_batches=8, every_steps=0)
  p.eval.reference = None  # the demo's reference figures are not this run's
  config.pretrain = p

  # Stage 3: DETR fine-tuning, the same architecture (no patches).
  f = finetune_coco.finetune_config(
    '150ep',
    name='compare',
    num_classes=-1,
    examples_per_epoch=-1,
    data=detection_data_config(**_FINETUNE_DATA),
  )
  f.model.update(**common.DEMO_ARCHITECTURE)
  f.batch_size = 8
  f.loss_replicas = 1
  f.num_train_steps = 3000
  # The CNN stays frozen in fine-tuning as in pre-training (CPU budget; identical
  # for every arm); the transformer and heads train, at a higher lr than the
  # release's 1e-4 (a 64-d transformer; DETR's AP here stays near 0 for 1000s of steps).
  f.optim.update(lr=5e-4, lr_drop_epochs=(), frozen=(r'^body/',))
  f.eval.update(every_steps=750, batch_size=50, num_pictures=2, picture_threshold=0.3)
  f.checkpoint_every_steps = 750
  f.keep_checkpoints = 1
  f.log_every_steps = 100
  config.finetune = f

  if variant == 'oneshot':
    from updetr_jax.data.oneshot import oneshot_data_config  # noqa: PLC0415

    config.arms = ('updetr', 'scratch')
    config.metrics = ('AP50_seen', 'AP50_unseen')
    config.stage0.num_train_steps = 200
    p.num_train_steps = 1000
    o = oneshot_voc.oneshot_config(
      '150ep',
      oneshot_data_config(
        **_FINETUNE_DATA, source='coco_json', patch_size=32, unseen_classes=ONESHOT_UNSEEN
      ),
    )
    o.model.update(**common.DEMO_ARCHITECTURE)
    for k in ('batch_size', 'loss_replicas', 'log_every_steps', 'keep_checkpoints'):
      o[k] = f[k]
    o.num_train_steps = 1000
    o.optim.update(lr=5e-4, lr_drop_epochs=(), frozen=(r'^body/',))  # as the detection runs
    o.eval.update(every_steps=500, batch_size=50, num_pictures=2, picture_threshold=0.3)
    o.checkpoint_every_steps = 500
    config.finetune = o
  if variant == 'lookup':
    # Does a pre-training that learned its pretext (the lookup) help fine-tuning?
    # Against the release's pre-training and scratch, each with its decoder, 5 seeds.
    config.arms = ('updetr', 'updetr_lookup', 'scratch', 'scratch_value_pos')
    config.seeds = (0, 1, 2, 3, 4)
    config.pairs = (('updetr_lookup', 'scratch_value_pos'), ('updetr_lookup', 'updetr'))
  if variant == 'demo':
    config.arms = ('updetr', 'scratch')
    config.stage0.num_train_steps = 200
    p.num_train_steps = 500
    f.num_train_steps = 600
    f.eval.every_steps = 300
    f.checkpoint_every_steps = 300
  return config
