r"""UP-DETR pre-training (random query patch detection) on unlabeled images.

  python -m updetr_jax.main --config=configs/pretrain.py --workdir=/tmp/updetr_pretrain \
      --config.init.backbone_checkpoint=swav_800ep_pretrain.pth.tar
  python -m updetr_jax.main --config=configs/pretrain.py:single_query --workdir=... \
      --config.init.backbone_checkpoint=swav_800ep_pretrain.pth.tar
  python -m updetr_jax.main --config=configs/pretrain.py:demo --workdir=workdir/demo

Variants (``:name``): default ``imagenet`` = the release's ImageNet run (ResNet-50
frozen, pre-norm, N=100 queries, M=10 patches, batch 256, 60 epochs, lr drop at 40);
``single_query`` = M=1; ``demo`` = a small model on scikit-image's photos (CPU, minutes),
with the options of ``use_patch_options``;
``mosaics`` = the learnability benchmark: the demo's model on random mosaics whose
pixels say where each patch came from (``benchmarks/pretext_learnability.py``).
"""

import ml_collections

from updetr_jax.configs import common
from updetr_jax.models import fields


def model_config(**overrides) -> ml_collections.ConfigDict:
  """The release's UP-DETR pre-training model: DETR R50 with pre-norm and patches.

  UP-DETR's fields (``fields.PATCH_FIELDS``) but feature_head (True when absent) are
  spelt out; those not set here are at their default, the options not in the release's
  default command off (see models/updetr.py and
  docs/results/pretext_learnability.md).
  """
  patch = {k: f.default for k, f in fields.PATCH_FIELDS.items() if k != 'feature_head'}
  return common.detr_model(
    **{
      **patch,
      **dict(
        pre_norm=True,
        num_classes=2,  # label 1 = "is the patch"; 3 logits with "no object"
        num_patches=10,
        feature_recon=True,
      ),
      **overrides,
    }
  )


VARIANTS = ('imagenet', 'single_query', 'demo', 'mosaics')

# What `make demo` gives at its last step (docs/results/demo.md, where the command is).
DEMO_REFERENCE = dict(
  source='docs/results/demo.md',
  seeds='0-7',
  machine="this project's 2-core x86-64 CPU machine",
  note='At this scale (a random frozen CNN, 2,000 steps) the model learns where patches '
  'tend to be, a box prior, and its answer depends only a little on the patch.',
  figures=(
    ('matched', 0.394, 0.026),
    ('group_top', 0.221, 0.023),
    ('group_top_wrong_patches', 0.210, 0.024),
    ('own_group', 0.343, 0.037),
  ),
)


# The options beyond the release that let the query patch reach and steer its queries
# (all off in the release configs; docs/method.md, 'Options beyond the release', and
# docs/results/pretext_learnability.md), as flattened config fields: standardised patch
# features and matching within a patch's group, then the patch as the decoder's content
# and positions in the cross-attention values.
_PATCHNORM_GROUPMATCH = {'model.patch_feature_norm': True, 'matcher.group_matching': True}
_CONTENT_VALUE_POS = {'model.patch_content': True, 'model.value_pos': True}
PATCH_OPTIONS = tuple({**_PATCHNORM_GROUPMATCH, **_CONTENT_VALUE_POS})

# A value of PRETEXT_ARMS: the run's model.num_patches (pretext_arm puts it in).
ONE_QUERY_PER_PATCH = '<model.num_patches>'
_ALL_OPTIONS = dict.fromkeys(PATCH_OPTIONS, True)
_ONE_QUERY = {'model.num_queries': ONE_QUERY_PER_PATCH}
_DROP200 = {'optim.lr_drop_epochs': (200,)}

# Pre-training arms: name -> overrides of this file's config (flattened fields). The
# learnability benchmark's (benchmarks/pretext_learnability.py), and the pre-trainings
# of the comparison's options arms (updetr_jax.compare). 'release': the release's
# behaviour; the others the options alone and combined, named by what they turn on:
# patchnorm_groupmatch = model.patch_feature_norm + matcher.group_matching; _content,
# _value_pos = model.patch_content, model.value_pos (with both: every PATCH_OPTIONS);
# _one_query = model.num_queries = M; _lrX = optim.lr; _drop200 = lr x 0.1 from epoch 200.
PRETEXT_ARMS = {
  'release': {},
  'patch_norm': {'model.patch_feature_norm': True},
  'group_matching': {'matcher.group_matching': True},
  'query_shuffle': {'model.query_shuffle': True},
  'patchnorm_groupmatch': _PATCHNORM_GROUPMATCH,
  'patchnorm_groupmatch_lr1e-3': {**_PATCHNORM_GROUPMATCH, 'optim.lr': 1e-3},
  'patchnorm_groupmatch_value_pos': {**_PATCHNORM_GROUPMATCH, 'model.value_pos': True},
  'patchnorm_groupmatch_content': {**_PATCHNORM_GROUPMATCH, 'model.patch_content': True},
  'patchnorm_groupmatch_content_value_pos': _ALL_OPTIONS,
  'patchnorm_groupmatch_content_value_pos_lr4e-4': {**_ALL_OPTIONS, 'optim.lr': 4e-4},
  'patchnorm_groupmatch_content_value_pos_lr4e-4_drop200': {
    **_ALL_OPTIONS,
    'optim.lr': 4e-4,
    **_DROP200,
  },
  # One query per patch: each group's answer is its only query, so group_top =
  # group_best and no ranking within a group is learned. num_queries is an architecture
  # field: such a pre-training initialises only detectors with as many queries.
  'patchnorm_groupmatch_content_value_pos_one_query': {**_ALL_OPTIONS, **_ONE_QUERY},
  # ... with a higher learning rate (the demo's 2e-4 learns the lookup slowly).
  'patchnorm_groupmatch_content_value_pos_one_query_lr4e-4': {
    **_ALL_OPTIONS,
    **_ONE_QUERY,
    'optim.lr': 4e-4,
  },
  'patchnorm_groupmatch_content_value_pos_one_query_lr1e-3': {
    **_ALL_OPTIONS,
    **_ONE_QUERY,
    'optim.lr': 1e-3,
  },
  # ... and the learning rate x 0.1 from epoch 200 (step 10,000 of the 400-image,
  # batch-8 mosaics), as the release drops it for its last third.
  'patchnorm_groupmatch_content_value_pos_one_query_lr4e-4_drop200': {
    **_ALL_OPTIONS,
    **_ONE_QUERY,
    'optim.lr': 4e-4,
    **_DROP200,
  },
  'patchnorm_groupmatch_content_value_pos_one_query_lr1e-3_drop200': {
    **_ALL_OPTIONS,
    **_ONE_QUERY,
    'optim.lr': 1e-3,
    **_DROP200,
  },
  # The frozen random CNN's BatchNorm statistics re-estimated on the training images.
  'patchnorm_groupmatch_calibrated_cnn': {
    **_PATCHNORM_GROUPMATCH,
    'init.calibrate_backbone_bn': True,
  },
  'patchnorm_groupmatch_calibrated_cnn_value_pos': {
    **_PATCHNORM_GROUPMATCH,
    'init.calibrate_backbone_bn': True,
    'model.value_pos': True,
  },
  # Diagnostic, not the method (the CNN is frozen in UP-DETR): are the frozen random
  # CNN's features what holds the decoder back?
  'patchnorm_groupmatch_trainable_cnn': {
    **_PATCHNORM_GROUPMATCH,
    'optim.lr_backbone': 2e-4,
    'optim.frozen': ('^position/',),
  },
}


def pretext_arm(name: str, num_patches: int) -> dict:
  """PRETEXT_ARMS[name] for a run with ``num_patches`` patches (M)."""
  return {k: num_patches if v == ONE_QUERY_PER_PATCH else v for k, v in PRETEXT_ARMS[name].items()}


def use_patch_options(config: ml_collections.ConfigDict, on: bool = True) -> None:
  """Turns PATCH_OPTIONS on (or, on=False, off: the release's patch path)."""
  config.update_from_flattened_dict({f: on for f in PATCH_OPTIONS})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or 'imagenet'
  if variant not in VARIANTS:
    raise ValueError(f'configs/pretrain.py: unknown variant {variant!r} (choose one of {VARIANTS})')
  from updetr_jax.data import default_data_config, demo_data_config, mosaic_data_config

  config = ml_collections.ConfigDict()
  config.task = 'pretrain'
  config.seed = 0
  config.model = model_config()
  config.matcher = common.matcher()
  # True: patch j is matched only to the queries of its own group (the release
  # matches it among all N queries); matching.hungarian_match(num_groups).
  config.matcher.group_matching = False
  config.loss = ml_collections.ConfigDict(
    dict(eos_coef=0.1, weight_ce=1.0, weight_bbox=5.0, weight_giou=2.0, weight_feature=1.0)
  )
  # The release normalises the loss per GPU (8 GPUs x 32 images): keeping that count
  # fixed makes the loss identical whatever mesh the run uses.
  config.loss_replicas = 8
  config.data = default_data_config()
  config.batch_size = 256  # global
  config.examples_per_epoch = 1281167  # ImageNet train
  config.num_epochs = 60
  config.num_train_steps = -1  # > 0 overrides num_epochs
  config.optim = ml_collections.ConfigDict(
    dict(
      lr=1e-4,
      lr_backbone=0.0,
      weight_decay=1e-4,
      clip_max_norm=0.1,
      lr_drop_epochs=(40,),
      # The whole backbone is frozen in pre-training: the CNN and, as in the release
      # (lr_backbone 0), a learned position embedding.
      frozen=(r'^(body|position)/',),
    )
  )
  config.init = ml_collections.ConfigDict(
    dict(
      # torchvision-layout ResNet .pth (the release: SwAV 800 epochs, 'module.' prefix).
      backbone_checkpoint='',
      checkpoint='',  # an Orbax variables checkpoint (python -m updetr_jax.torch_import)
      pretrained='',  # fine-tuning only (configs/finetune_coco.py)
      # A resnet50/101 run without any of the above is refused unless this is True.
      random_backbone=False,
      # Not in the release: re-estimate the frozen CNN's BatchNorm statistics on the
      # first training batches before training (tasks/pretrain.py PatchTask.calibrate;
      # a random CNN's features are otherwise all alike). Kept in the checkpoint.
      calibrate_backbone_bn=False,
    )
  )
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.log_every_steps = 50
  config.compilation_cache_dir = ''  # e.g. ~/.cache/updetr_jax/xla: reuse compiled steps
  # Query patches of evaluation images (data.eval_tfds_split / eval_folder /
  # eval_demo_images: images never trained on; data.eval_data_config):
  # num_batches batches every every_steps (0: at the end only);
  # best_metric: keep workdir/best ('' = no) by e.g. 'patch_iou_matched'.
  config.eval = ml_collections.ConfigDict(dict(num_batches=0, every_steps=0, best_metric=''))
  # Figures a run of this config is read against, printed beside its own at the end
  # (None: none): source, seeds, machine, note and figures ((name, mean, std), ...).
  config.eval.reference = None

  if variant == 'single_query':
    config.model.num_patches = 1
  elif variant == 'demo':
    # Runs on 2 CPU cores in minutes on scikit-image's photographs; the CNN is random
    # and frozen (common.DEMO_ARCHITECTURE): random convolution features keep enough
    # colour and texture to find a patch.
    config.model.update(num_patches=4, **common.DEMO_ARCHITECTURE)
    # The options that learn the pretext where the pixels decide it (learnability
    # benchmark); on these photos they make the answer depend on the patch a little.
    use_patch_options(config)
    config.data = demo_data_config()
    config.batch_size = 8
    config.loss_replicas = 1
    config.examples_per_epoch = 160  # 10 training photos x demo_repeats 16
    config.num_train_steps = 2000
    config.optim.update(lr=4e-4, lr_drop_epochs=())
    config.checkpoint_every_steps = 1000
    config.log_every_steps = 250
    config.eval.update(num_batches=8, every_steps=1000)
    config.eval.reference = ml_collections.ConfigDict(DEMO_REFERENCE)
  elif variant == 'mosaics':
    # The learnability benchmark (benchmarks/pretext_learnability.py): the demo's
    # model and sizes on random mosaics whose pixels say where each patch is
    # (data/mosaics.py), no patch augmentation, 64 held-out mosaics evaluated
    # every 500 steps.
    config.model.update(num_patches=4, **common.DEMO_ARCHITECTURE)
    config.data = mosaic_data_config()
    config.batch_size = 8
    config.loss_replicas = 1
    config.examples_per_epoch = config.data.mosaic_count
    config.num_train_steps = 3000
    config.optim.update(lr=2e-4, lr_drop_epochs=())
    config.checkpoint_every_steps = 1000
    config.log_every_steps = 250
    config.eval.update(num_batches=8, every_steps=500)
  return config
