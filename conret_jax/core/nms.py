"""Class-aware non-maximum suppression and RetinaNet post-processing, in jnp with static shapes (runs in jit).

Greedy NMS, exactly: candidates are visited by descending score (equal scores: lower candidate index first); a
candidate is kept unless an already kept candidate of the same class overlaps it with IoU > iou_threshold. The
output is the first `max_output` kept candidates in that order.

Design (the padded NMS used on TPUs, specialised to a small output): the sorted candidates are processed in tiles of
`tile_size` with a while_loop that stops once `max_output` boxes are kept or the valid candidates run out. Every
box kept so far is among the first max_output kept ones, so they fit a [max_output] buffer, and a tile is suppressed
by that buffer with one [tile, max_output] IoU. Inside the tile, suppression among its own boxes is resolved by
iterating keep_i = candidate_i & not any_j<i(keep_j & overlap_ji) to its fixed point; the dependency is strictly
triangular, so the fixed point is unique and equals the greedy answer (and is reached in at most tile_size
iterations, usually a handful). Class awareness is by masking pairs of different classes, not by coordinate
offsets, so IoUs are computed on the original coordinates (offsets of class * image size would cost float32
precision on small boxes and move IoUs near the threshold).
Memory per image is O(N + tile * (tile + max_output)): a 5000-candidate image never builds a 5000 x 5000 matrix,
so the batch is simply vmapped.

`postprocess` selects each level's candidates without sorting all of its anchors x classes (`select_candidates`,
RetinaNet's), or each class's over all anchors (`select_candidates_per_class`, SSD's).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from conret_jax.core.boxes import pairwise_iou

TILE_SIZE = 256


def _sorted_tiles(boxes, scores, classes, valid, tile: int):
  """Candidates sorted best first (ties by index, invalid last), padded to whole tiles: (boxes [P, 4], classes [P],
  valid [P], original index [P] int32, number of valid candidates)."""
  n = boxes.shape[0]
  # Ascending stable sort of -score: best first, ties by index, invalid last (-0.0 folded into 0.0, so that a
  # sort that orders signed zeros cannot split a tie).
  key = jnp.where(valid, jnp.where(scores == 0.0, 0.0, -scores), jnp.inf)
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  pad = -(-n // tile) * tile - n
  sort = lambda x, width: jnp.pad(x[order], ((0, pad),) + ((0, 0),) * width)
  return sort(boxes, 1), sort(classes, 0), sort(valid, 0), jnp.pad(order, (0, pad)), jnp.sum(valid)


def _suppress_tile(tb, tc, tv, kept_boxes, kept_classes, count, iou_threshold, max_output):
  """keep [tile] bool of one tile of sorted candidates: not suppressed by a box kept in earlier tiles, nor by an
  earlier kept candidate of the same tile (the fixed point of keep_i = candidate_i & not any_j<i(keep_j & overlap_ji),
  unique because the dependency is triangular; reached in at most `tile` iterations, usually a handful)."""
  tile = tb.shape[0]
  by_kept = (
    (pairwise_iou(tb, kept_boxes) > iou_threshold)
    & (tc[:, None] == kept_classes[None, :])
    & (jnp.arange(max_output)[None, :] < count)
  )
  candidate = tv & ~jnp.any(by_kept, axis=1)
  ar = jnp.arange(tile)
  earlier = ar[None, :] < ar[:, None]  # [i, j]: j precedes i
  overlaps = (pairwise_iou(tb, tb) > iou_threshold) & (tc[:, None] == tc[None, :]) & earlier

  def step(state):
    keep, _, it = state
    new = candidate & ~jnp.any(overlaps & keep[None, :], axis=1)
    return new, jnp.any(new != keep), it + 1

  # Position i is final after i + 1 iterations; the cap only guards the loop.
  keep, _, _ = jax.lax.while_loop(lambda s: s[1] & (s[2] <= tile), step, (candidate, jnp.array(True), 0))
  return keep


def _nms_one(boxes, scores, classes, valid, iou_threshold, max_output, tile):
  """One image: boxes [N, 4], scores/classes/valid [N] -> (indices [D] int32, valid [D] bool)."""
  n = boxes.shape[0]
  if n == 0:
    return jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool)
  tile = max(1, min(tile, n))
  s_boxes, s_classes, s_valid, s_index, num_valid = _sorted_tiles(
    boxes, scores, classes, valid & ~jnp.isnan(scores), tile
  )

  def cond(carry):
    t, count = carry[0], carry[4]
    return (t * tile < num_valid) & (count < max_output)

  def body(carry):
    t, kept_boxes, kept_classes, kept_index, count = carry
    start = t * tile
    part = lambda x: jax.lax.dynamic_slice_in_dim(x, start, tile)
    tb, tc, ti = part(s_boxes), part(s_classes), part(s_index)
    keep = _suppress_tile(tb, tc, part(s_valid), kept_boxes, kept_classes, count, iou_threshold, max_output)
    slot = jnp.where(keep, count + jnp.cumsum(keep) - 1, max_output)  # slot max_output (and beyond) is dropped
    kept_boxes = kept_boxes.at[slot].set(tb, mode='drop')
    kept_classes = kept_classes.at[slot].set(tc, mode='drop')
    kept_index = kept_index.at[slot].set(ti, mode='drop')
    return t + 1, kept_boxes, kept_classes, kept_index, count + jnp.sum(keep)

  init = (
    jnp.array(0),
    jnp.zeros((max_output, 4), boxes.dtype),
    jnp.zeros((max_output,), classes.dtype),
    jnp.zeros((max_output,), jnp.int32),
    jnp.array(0),
  )
  _, _, _, kept_index, count = jax.lax.while_loop(cond, body, init)
  out_valid = jnp.arange(max_output) < count
  return jnp.where(out_valid, kept_index, 0), out_valid


def batched_nms(boxes, scores, classes, valid, *, iou_threshold: float, max_output: int, tile_size: int = TILE_SIZE):
  """Class-aware greedy NMS over a batch.

  Args:
    boxes: [B, N, 4] x1y1x2y2; scores: [B, N]; classes: [B, N] int; valid: [B, N] bool (invalid never kept).
  Returns:
    indices: [B, max_output] int32 into N, kept candidates by descending score (0 where not valid).
    valid: [B, max_output] bool.
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  scores = jnp.asarray(scores, jnp.float32)
  classes = jnp.asarray(classes, jnp.int32)
  valid = jnp.asarray(valid, bool)
  fn = lambda b, s, c, v: _nms_one(b, s, c, v, iou_threshold, max_output, tile_size)
  return jax.vmap(fn)(boxes, scores, classes, valid)


def _masked_scores(logits, score_threshold: float):
  """float32 sigmoid scores, -1 where not above the threshold (NaN included): what candidates are ranked by."""
  scores = jax.nn.sigmoid(logits.astype(jnp.float32))
  return jnp.where(scores > score_threshold, scores, -1.0)


def select_candidates(cls_logits, level_counts: Sequence[int], topk: int, score_threshold: float, usable=None):
  """Per level, the first k = min(topk, n * K) of its n anchors x K classes in the order (masked score descending,
  flattened index anchor * K + class ascending), masked score = sigmoid(logit) if above the threshold, else -1.
  That is one lax.top_k over the level's n * K pairs (lax.top_k puts the lower index first among equal values);
  this function gets the same pairs without sorting them all:

  1. Rank the level's anchors by their best masked score, sigmoid(max over K of the logits), and keep the first
     topk (equal keys: lower anchor first). Every pair of the answer lies on a kept anchor: each anchor ranked
     before a pair's anchor has a pair scoring at least as high (sigmoid is monotone; bench/sigmoid_monotone.py
     checks every float32 input), so topk anchors ranked before it would put topk pairs before it.
  2. Sort the kept anchors by index and gather their logits, [B, topk, K]: their pairs keep their relative order,
     so lax.top_k over these topk * K pairs breaks ties exactly as over all n * K.
  The candidates are the full top-k's slot for slot, ties and invalid slots included; tests/core/test_nms.py
  compares the two. The work per level is a top-k over n keys and one over topk * K pairs, instead of a sort of
  n * K pairs (5.2 M on P3 at 640x640 with 91 classes).

  Args:
    cls_logits: [B, A, K] (any float dtype; scored in float32); level_counts: anchors per level (sum = A).
    usable: optional [B, A] bool; an anchor that is not (its box lies outside the image) scores -1 in every class.
  Returns, concatenated over the levels (sum of k = min(topk, n * K) candidates):
    scores [B, N] float32 (-1 where not valid), anchors [B, N] int32 in 0..A-1, classes [B, N] int32,
    valid [B, N] bool (score > score_threshold).
  """
  cls_logits = jnp.asarray(cls_logits)
  b, _, num_classes = cls_logits.shape
  # fmax skips NaN logits (they score -1, so they must not be an anchor's best); an all-NaN anchor gets -inf. As a
  # reduction it reads the logits in place; a jnp.where before jnp.max is written out whole by XLA CPU (10x slower).
  best = jax.lax.reduce(cls_logits, jnp.array(-jnp.inf, cls_logits.dtype), jnp.fmax, (2,))
  key = _masked_scores(best, score_threshold)  # [B, A]
  if score_threshold < 0:  # sigmoid(-inf) = 0 passes a negative threshold: an all-NaN anchor's key is -1
    key = jnp.where(jnp.any(~jnp.isnan(cls_logits), axis=-1), key, -1.0)
  if usable is not None:
    key = jnp.where(usable, key, -1.0)
  parts = []
  start = 0
  for n in level_counts:
    if topk < n:
      _, rows = jax.lax.top_k(key[:, start : start + n], topk)
      rows = start + jnp.sort(rows, axis=-1)
    else:
      rows = jnp.broadcast_to(start + jnp.arange(n, dtype=jnp.int32), (b, n))
    pairs = _masked_scores(jnp.take_along_axis(cls_logits, rows[..., None], axis=1), score_threshold)
    if usable is not None:
      pairs = jnp.where(jnp.take_along_axis(usable, rows, axis=1)[..., None], pairs, -1.0)
    top, idx = jax.lax.top_k(pairs.reshape(b, -1), min(topk, n * num_classes))
    parts.append(
      (
        top,
        jnp.take_along_axis(rows, idx // num_classes, axis=1),
        (idx % num_classes).astype(jnp.int32),
        top > score_threshold,
      )
    )
    start += n
  return tuple(jnp.concatenate(p, axis=1) for p in zip(*parts))


def select_candidates_per_class(cls_logits, topk: int, score_threshold: float, usable=None):
  """Per class, the first k = min(topk, A) anchors in the order (masked score descending, anchor ascending), masked
  score = sigmoid(logit) if above the threshold, else -1: torchvision's SSD postprocess_detections (per class, the
  scores above the threshold, then their top-k), with static shapes and equal scores taken lower anchor first
  (lax.top_k's order).

  Args:
    cls_logits: [B, A, K] (any float dtype; scored in float32).
    usable: optional [B, A] bool; an anchor that is not scores -1 in every class.
  Returns, class by class (class 0's k candidates first; K * k in all):
    scores [B, N] float32 (-1 where not valid), anchors [B, N] int32 in 0..A-1, classes [B, N] int32,
    valid [B, N] bool (score > score_threshold).
  """
  scores = _masked_scores(cls_logits, score_threshold)  # [B, A, K]
  if usable is not None:
    scores = jnp.where(usable[..., None], scores, -1.0)
  b, a, num_classes = scores.shape
  top, anchors = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), min(topk, a))  # [B, K, k]: per class, over anchors
  classes = jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32)[None, :, None], top.shape)
  flat = lambda x: x.reshape(b, -1)
  # A masked score (-1) is never valid, whatever the threshold.
  return flat(top), flat(anchors).astype(jnp.int32), flat(classes), flat((top > score_threshold) & (top >= 0))


def clip_to_images(boxes, image_sizes) -> jax.Array:
  """boxes [B, N, 4] x1y1x2y2 clamped to each image: x to [0, W_b], y to [0, H_b]; image_sizes [B, 2] (h, w) or one
  static (h, w) for all."""
  sizes = jnp.broadcast_to(jnp.asarray(image_sizes, jnp.float32), (boxes.shape[0], 2))
  limits = jnp.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], axis=-1)[:, None, :]
  return jnp.clip(jnp.asarray(boxes, jnp.float32), 0.0, limits)


def detections_from_candidates(boxes, scores, classes, valid, *, nms_iou: float, max_detections: int) -> dict:
  """Class-aware NMS of candidate boxes [B, N, 4] (already clipped): postprocess's outputs (see there)."""
  keep, kept = batched_nms(boxes, scores, classes, valid, iou_threshold=nms_iou, max_output=max_detections)
  gather = lambda x: jnp.take_along_axis(x, keep, axis=1)
  return dict(
    boxes=jnp.where(kept[..., None], jnp.take_along_axis(boxes, keep[..., None], axis=1), 0.0),
    scores=jnp.where(kept, gather(scores), 0.0),
    classes=jnp.where(kept, gather(classes), 0),
    valid=kept,
  )


def postprocess(
  cls_logits,
  boxes,
  level_counts: Sequence[int],
  image_sizes,
  *,
  score_threshold: float = 0.05,
  topk_per_level: int = 1000,
  nms_iou: float = 0.5,
  max_detections: int = 100,
  topk_per_class: int = 0,
) -> dict:
  """Detections from decoded boxes and class logits (torchvision's RetinaNet postprocess_detections).

  Boxes are first clipped to each image's own size, so padding never holds a detection: an anchor whose box lies
  outside the image (empty once clipped) takes no candidate slot. Per level: the top `topk_per_level` (anchor, class)
  pairs by sigmoid score among those above `score_threshold` become candidates; equal scores are taken in flattened
  order (anchor * K + class), lower first (`select_candidates`: the same pairs as one top-k over all anchors x
  classes, without sorting them all). Then class-aware NMS keeps the best `max_detections`.
  With `topk_per_class` > 0 the candidates are instead each class's top `topk_per_class` anchors over all levels
  (`select_candidates_per_class`: torchvision's SSD); `topk_per_level` is then unused.

  Args:
    cls_logits: [B, A, K] (float32 or bfloat16); boxes: [B, A, 4] decoded x1y1x2y2; level_counts: anchors per
      level (sum = A).
    image_sizes: [B, 2] int (h, w) of each image inside the (padded) input, or one static (h, w) for all.
  Returns dict: boxes [B, D, 4] float32, scores [B, D] float32 (the sigmoid of the logit), classes [B, D] int32,
    valid [B, D] bool, by descending score; zeros where not valid.
  """
  if sum(level_counts) != cls_logits.shape[1]:
    raise ValueError(f'level_counts sum to {sum(level_counts)}, logits have {cls_logits.shape[1]} anchors')
  boxes = clip_to_images(boxes, image_sizes)
  usable = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
  if topk_per_class > 0:
    scores, anchors, classes, valid = select_candidates_per_class(cls_logits, topk_per_class, score_threshold, usable)
  else:
    scores, anchors, classes, valid = select_candidates(
      cls_logits, level_counts, topk_per_level, score_threshold, usable
    )
  boxes = jnp.take_along_axis(boxes, anchors[..., None], axis=1)
  return detections_from_candidates(boxes, scores, classes, valid, nms_iou=nms_iou, max_detections=max_detections)
