"""Times the PyTorch UP-DETR pre-training step, run the way the release runs it.

  python benchmarks/torch_train_step.py --batch 2 --image-size 320 [--repeats 5] [--threads N]

Counterpart of benchmarks/train_step.py (JAX) for comparison. Prints one JSON line:
images_per_s, step_s (median), batch, image_size, device, framework, torch_threads,
times_s, loss.

Model: tests/torch_reference.py UP-DETR (R50 body with FrozenBatchNorm, pre-norm
transformer, N=100 queries, M=10 patches), in train mode (dropout 0.1, query-patch
dropout active) with every backbone parameter frozen (requires_grad False, as with
lr_backbone = 0). One timed step is: forward on images [B,3,S,S] (all-False padding
mask) and patches [B,10,3,P,P]; set criterion on the last decoder layer and the 5
auxiliary ones, each with its own Hungarian matching done on the host (one cross-batch
cost matrix on torch, moved to the CPU, split per image, scipy linear_sum_assignment);
weighted CE (no-object weight 0.1) + 5 * L1 + 2 * GIoU + 1 * feature loss; backward;
gradient-norm clipping at 0.1; AdamW (lr 1e-4, weight decay 1e-4) on the trainable
parameters. Synthetic inputs are drawn as in train_step.py (same seed, NHWC arrays
transposed to NCHW), so both benchmarks see the same data.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))

from torch_reference import build_updetr, randomize_  # noqa: E402

# Same names as updetr_jax.models.resnet.RESNET_VARIANTS (kept local: no JAX import here).
BACKBONES = {
  'resnet50': ((3, 4, 6, 3), 64),
  'resnet101': ((3, 4, 23, 3), 64),
  'resnet_tiny': ((1, 1, 1, 1), 8),
  'resnet_small': ((1, 1, 1, 1), 16),
  'resnet26_narrow': ((2, 2, 2, 2), 16),
}

NUM_CLASSES = 2  # label 1 = patch; index 2 = no object
NUM_PATCHES = 10
NUM_QUERIES = 100
EOS_COEF = 0.1
COST_CLASS, COST_BBOX, COST_GIOU = 1.0, 5.0, 2.0
W_CE, W_BBOX, W_GIOU, W_FEATURE = 1.0, 5.0, 2.0, 1.0
LR, WEIGHT_DECAY, CLIP_MAX_NORM = 1e-4, 1e-4, 0.1


def synthetic_batch(batch, size, num_patches, patch_size, seed=0):
  """Same draws as benchmarks/train_step.py, converted to torch NCHW tensors."""
  rng = np.random.default_rng(seed)
  wh = rng.uniform(0.1, 0.5, (batch, num_patches, 2))
  c = rng.uniform(wh / 2, 1 - wh / 2)
  images = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
  patches = rng.standard_normal((batch, num_patches, patch_size, patch_size, 3)).astype(np.float32)
  boxes = np.concatenate([c, wh], -1).astype(np.float32)
  targets = [
    {'boxes': torch.from_numpy(boxes[b]), 'labels': torch.ones(num_patches, dtype=torch.int64)}
    for b in range(batch)
  ]
  return (
    torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
    torch.zeros(batch, size, size, dtype=torch.bool),
    torch.from_numpy(patches).permute(0, 1, 4, 2, 3).contiguous(),
    targets,
  )


# ------------------------------------------------------------------------------------
# Box helpers
# ------------------------------------------------------------------------------------
def cxcywh_to_xyxy(b):
  cx, cy, w, h = b.unbind(-1)
  return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def pairwise_giou(a, b):
  """a [n,4], b [m,4] in xyxy -> [n,m] generalized IoU."""
  area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
  area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  lo = torch.max(a[:, None, :2], b[None, :, :2])
  hi = torch.min(a[:, None, 2:], b[None, :, 2:])
  inter = (hi - lo).clamp(min=0).prod(-1)
  union = area_a[:, None] + area_b[None, :] - inter
  iou = inter / union
  enc_lo = torch.min(a[:, None, :2], b[None, :, :2])
  enc_hi = torch.max(a[:, None, 2:], b[None, :, 2:])
  enclosing = (enc_hi - enc_lo).clamp(min=0).prod(-1)
  return iou - (enclosing - union) / enclosing


def paired_giou(a, b):
  """Elementwise GIoU of matched rows a[i], b[i] (xyxy) -> [n]."""
  area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
  area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
  inter = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
  union = area_a + area_b - inter
  enclosing = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
  return inter / union - (enclosing - union) / enclosing


# ------------------------------------------------------------------------------------
# Matching (host) and criterion
# ------------------------------------------------------------------------------------
@torch.no_grad()
def hungarian_match(logits, boxes, targets):
  """One cost matrix over the whole batch, then per-image assignment on the CPU."""
  bs, n = logits.shape[:2]
  prob = logits.flatten(0, 1).softmax(-1)  # [B*N, C+1]
  pred = boxes.flatten(0, 1)  # [B*N, 4]
  tgt_labels = torch.cat([t['labels'] for t in targets])  # [sum M]
  tgt_boxes = torch.cat([t['boxes'] for t in targets])  # [sum M, 4]
  cost = (
    COST_BBOX * torch.cdist(pred, tgt_boxes, p=1)
    - COST_CLASS * prob[:, tgt_labels]
    - COST_GIOU * pairwise_giou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(tgt_boxes))
  )
  cost = cost.view(bs, n, -1).cpu()
  sizes = [len(t['boxes']) for t in targets]
  out = []
  for b, block in enumerate(cost.split(sizes, -1)):
    rows, cols = linear_sum_assignment(block[b].numpy())
    out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
  return out


def layer_loss(out, targets, num_boxes, class_weight):
  logits, boxes = out['pred_logits'], out['pred_boxes']
  matches = hungarian_match(logits, boxes, targets)
  batch_idx = torch.cat([torch.full_like(r, b) for b, (r, _) in enumerate(matches)])
  query_idx = torch.cat([r for r, _ in matches])

  target_classes = torch.full(
    logits.shape[:2], NUM_CLASSES, dtype=torch.int64, device=logits.device
  )
  target_classes[batch_idx, query_idx] = torch.cat(
    [t['labels'][c] for t, (_, c) in zip(targets, matches)]
  )
  loss_ce = F.cross_entropy(logits.transpose(1, 2), target_classes, weight=class_weight)

  src_boxes = boxes[batch_idx, query_idx]
  tgt_boxes = torch.cat([t['boxes'][c] for t, (_, c) in zip(targets, matches)])
  loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction='none').sum() / num_boxes
  loss_giou = (
    1 - paired_giou(cxcywh_to_xyxy(src_boxes), cxcywh_to_xyxy(tgt_boxes))
  ).sum() / num_boxes

  src_feat = F.normalize(out['pred_feature'][batch_idx, query_idx], dim=1)
  tgt_feat = torch.cat([out['gt_feature'][b, c] for b, (_, c) in enumerate(matches)])
  tgt_feat = F.normalize(tgt_feat, dim=1)
  loss_feature = (src_feat - tgt_feat).pow(2).sum() / num_boxes

  return W_CE * loss_ce + W_BBOX * loss_bbox + W_GIOU * loss_giou + W_FEATURE * loss_feature


def criterion(outputs, targets, class_weight):
  num_boxes = max(float(sum(len(t['labels']) for t in targets)), 1.0)
  total = layer_loss(outputs, targets, num_boxes, class_weight)
  for aux in outputs['aux_outputs']:
    total = total + layer_loss(aux, targets, num_boxes, class_weight)
  return total


# ------------------------------------------------------------------------------------
def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--image-size', type=int, default=320)
  p.add_argument('--patch-size', type=int, default=128)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--backbone', default='resnet50', choices=sorted(BACKBONES))
  p.add_argument(
    '--threads', type=int, default=None, help='torch.set_num_threads (default: torch default)'
  )
  args = p.parse_args()

  if args.threads is not None:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)

  blocks, width = BACKBONES[args.backbone]
  model = build_updetr(
    blocks=blocks,
    width=width,
    pre_norm=True,
    num_classes=NUM_CLASSES,
    num_patches=NUM_PATCHES,
    num_queries=NUM_QUERIES,
    dropout=0.1,
    aux_loss=True,
  )
  randomize_(model, seed=0)
  for prm in model.backbone.parameters():
    prm.requires_grad_(False)
  model.train()
  trainable = [prm for prm in model.parameters() if prm.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
  class_weight = torch.ones(NUM_CLASSES + 1)
  class_weight[-1] = EOS_COEF

  images, mask, patches, targets = synthetic_batch(
    args.batch, args.image_size, NUM_PATCHES, args.patch_size
  )

  def step():
    outputs = model(images, mask, patches)
    loss = criterion(outputs, targets, class_weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, CLIP_MAX_NORM)
    opt.step()
    return loss.item()

  loss = step()  # warm-up
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  print(
    json.dumps(
      {
        'images_per_s': round(args.batch / step_s, 3),
        'step_s': round(step_s, 4),
        'batch': args.batch,
        'image_size': args.image_size,
        'patch_size': args.patch_size,
        'device': 'cpu',
        'framework': 'torch',
        'backbone': args.backbone,
        'torch_threads': torch.get_num_threads(),
        'torch_version': torch.__version__,
        'times_s': [round(t, 4) for t in times],
        'loss': loss,
      }
    )
  )


if __name__ == '__main__':
  main()
