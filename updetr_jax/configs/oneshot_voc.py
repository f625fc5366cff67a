r"""One-shot detection on PASCAL VOC (CoAE protocol), from an UP-DETR pre-training.

The method: docs/method.md, 'One-shot detection'.

  python -m updetr_jax.main --config=configs/oneshot_voc.py --workdir=/tmp/oneshot_voc \
      --config.init.pretrained=/tmp/updetr_pretrain   # workdir or the release's .pth

Train on VOC07+12 trainval images with a seen class (unseen boxes become background),
test on VOC07 test: every (image, class present) pair is a trial whose query crop
comes from another image, five query runs (``eval.query_seeds``); reports per-class
AP50 and the means over the 16 seen and the 4 unseen classes (cow, sheep, cat,
aeroplane), per run and mean +- std (TensorBoard, eval.jsonl and
workdir/eval/oneshot_step<step>.json). Reads TFDS ``voc/2007`` and ``voc/2012``.

The model is the pre-training's (pre-norm R50, N=100) with one query patch added to
all queries, a binary class head and no feature_align (tasks/oneshot.py);
``init.pretrained`` keeps every weight but the class head, patch2query included (a DETR
checkpoint has none: it starts fresh). Optimiser and schedule: DETR's VOC fine-tuning
(configs/finetune_voc.py). Variants: default ``150ep`` (lr drop at 100), ``300ep``.

Your own data: ``--config.data.source=coco_json --config.data.ann_file=train.json
--config.data.image_dir=img/ --config.data.eval_ann_file=test.json
--config.data.eval_image_dir=img/ --config.data.unseen_classes="('dog','horse')"``
(names, or category ids as ints); the other classes are seen.
Miniature demo (CPU, pre-trained vs scratch over seeds): configs/compare.py:oneshot.
"""

import ml_collections

from updetr_jax.configs import finetune_coco, pretrain

# VOC 2007 + 2012 trainval images with a seen class (of 16,551): counted by the
# pipeline at start (OneShotInfo.num_trials); -1 takes that count.
EXAMPLES_PER_EPOCH = -1


def oneshot_model(**overrides) -> ml_collections.ConfigDict:
  """UP-DETR's model with one query patch on all N queries and a binary class head."""
  return pretrain.model_config(
    **{
      **dict(
        num_classes=1,  # label 0 = "is the query's class"; 2 logits with "no object"
        num_patches=1,  # one group: the query feature goes to all N queries, no mask
        feature_recon=False,
        feature_head=False,  # no feature_align
        patch_query_drop=0.0,  # the query is the task's input: never dropped
      ),
      **overrides,
    }
  )


def oneshot_config(variant: str, data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """DETR's VOC fine-tuning recipe around the one-shot model and data."""
  config = finetune_coco.finetune_config(
    variant, name='oneshot_voc', num_classes=1, examples_per_epoch=16551, data=data
  )
  config.task = 'oneshot'
  config.model = oneshot_model()
  config.examples_per_epoch = EXAMPLES_PER_EPOCH
  config.eval.update(
    query_seeds=(0, 1, 2, 3, 4),  # five query runs (the literature's protocol)
    # + a control run with queries of another class (AP50_*_other_class_query): does
    # the detector use its query? (one pass more per evaluation; False to skip)
    other_class_queries=True,
    best_metric='AP50_seen',  # model selection never looks at the unseen classes
    picture_threshold=0.5,
  )
  del config.eval['voc07']
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  from updetr_jax.data.oneshot import oneshot_data_config

  return oneshot_config(arg or '150ep', oneshot_data_config())
