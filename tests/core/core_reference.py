"""References for the core tests: plain NumPy (loops, float32 where exact agreement matters), and frozen copies of
earlier jnp implementations that a faster one must reproduce exactly."""

import jax
import jax.numpy as jnp
import numpy as np

from conret_jax.core.nms import clip_to_images, detections_from_candidates


def np_iou(b1, b2):
  """[N, 4] x [M, 4] -> [N, M] float32, same float32 operation order as the jnp version (exact on ties)."""
  p = np.asarray(b1, np.float32)[:, None, :]
  q = np.asarray(b2, np.float32)[None, :, :]
  zero = np.float32(0)
  a1 = np.maximum(p[..., 2] - p[..., 0], zero) * np.maximum(p[..., 3] - p[..., 1], zero)
  a2 = np.maximum(q[..., 2] - q[..., 0], zero) * np.maximum(q[..., 3] - q[..., 1], zero)
  iw = np.maximum(np.minimum(p[..., 2], q[..., 2]) - np.maximum(p[..., 0], q[..., 0]), zero)
  ih = np.maximum(np.minimum(p[..., 3], q[..., 3]) - np.maximum(p[..., 1], q[..., 1]), zero)
  inter = iw * ih
  union = a1 + a2 - inter
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(union > 0, inter / union, zero).astype(np.float32)


def np_match(anchors, gt, valid, pos, neg, low_quality, rule='promote'):
  """One image, loops: torchvision's Matcher ('promote', RetinaNet) or its SSDMatcher ('assign', SSD) for the
  low-quality matches. Returns (matched [A], labels [A])."""
  num_a = len(anchors)
  matched = np.zeros(num_a, np.int32)
  labels = np.zeros(num_a, np.int32)
  cols = [g for g in range(len(gt)) if valid[g]]
  if not cols:
    return matched, labels
  iou = np_iou(anchors, gt)
  for a in range(num_a):
    best, arg = -1.0, 0
    for g in cols:
      if iou[a, g] > best:
        best, arg = iou[a, g], g
    matched[a] = arg
    labels[a] = 1 if best >= pos else (0 if best < neg else -1)
  if low_quality:
    claims = {}  # 'assign': anchor -> the gts whose first best anchor it is
    for g in cols:
      top = max(iou[a, g] for a in range(num_a))
      if top <= 0:
        continue
      for a in range(num_a):
        if iou[a, g] == top:
          labels[a] = 1
          if rule == 'assign':
            claims.setdefault(a, []).append(g)
            break
    for a, gs in claims.items():  # the claimant that overlaps the anchor most, the first on ties
      matched[a] = max(gs, key=lambda g: (iou[a, g], -g))
  return matched, labels


def np_encode(box, anchor, weights=(1.0, 1.0, 1.0, 1.0)):
  box = np.asarray(box, np.float64)
  anchor = np.asarray(anchor, np.float64)
  wx, wy, ww, wh = weights
  w, h = box[2] - box[0], box[3] - box[1]
  aw, ah = anchor[2] - anchor[0], anchor[3] - anchor[1]
  cx, cy = box[0] + w / 2, box[1] + h / 2
  ax, ay = anchor[0] + aw / 2, anchor[1] + ah / 2
  return np.array([wx * (cx - ax) / aw, wy * (cy - ay) / ah, ww * np.log(w / aw), wh * np.log(h / ah)])


def np_greedy_nms(boxes, scores, classes, valid, thr, max_out):
  """Greedy class-aware NMS: visit by (-score, index), keep unless a kept same-class box has IoU > thr."""
  iou = np_iou(boxes, boxes)
  order = sorted((i for i in range(len(scores)) if valid[i]), key=lambda i: (-float(scores[i]), i))
  keep = []
  for i in order:
    if all(not (classes[j] == classes[i] and iou[j, i] > thr) for j in keep):
      keep.append(i)
  return keep[:max_out]


def random_boxes(rng, n, lo=0.0, hi=100.0, min_size=1.0, max_size=50.0):
  xy = rng.uniform(lo, hi, (n, 2))
  wh = rng.uniform(min_size, max_size, (n, 2))
  return np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)


def flat_topk_candidates(cls_logits, level_counts, topk, score_threshold, usable=None):
  """core.nms.postprocess's candidates up to commit ce92a47 (frozen, do not optimise): per level, one lax.top_k
  over all its anchors x classes flattened; pairs of anchors that are not `usable` [B, A] score -1. Same arguments
  and outputs as core.nms.select_candidates."""
  num_classes = cls_logits.shape[-1]
  parts = []
  start = 0
  for count in level_counts:
    logits = jnp.asarray(cls_logits[:, start : start + count], jnp.float32)
    scores = jax.nn.sigmoid(logits).reshape(logits.shape[0], -1)  # [B, count * K]
    above = scores > score_threshold
    if usable is not None:
      above &= jnp.repeat(usable[:, start : start + count], num_classes, axis=1)
    k = min(topk, scores.shape[1])
    top, idx = jax.lax.top_k(jnp.where(above, scores, -1.0), k)
    parts.append((top, start + idx // num_classes, (idx % num_classes).astype(jnp.int32), top > score_threshold))
    start += count
  return tuple(jnp.concatenate(p, axis=1) for p in zip(*parts))


def flat_topk_postprocess(
  cls_logits,
  boxes,
  level_counts,
  image_hw,
  *,
  score_threshold=0.05,
  topk_per_level=1000,
  nms_iou=0.5,
  max_detections=100,
):
  """core.nms.postprocess with flat_topk_candidates for select_candidates: boxes clipped to each image first,
  anchors whose box is then empty never candidates, and the class-aware NMS of detections_from_candidates."""
  boxes = clip_to_images(boxes, image_hw)
  usable = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
  scores, anchors, classes, valid = flat_topk_candidates(
    cls_logits, level_counts, topk_per_level, score_threshold, usable
  )
  boxes = jnp.take_along_axis(boxes, anchors[..., None], axis=1)
  return detections_from_candidates(boxes, scores, classes, valid, nms_iou=nms_iou, max_detections=max_detections)
