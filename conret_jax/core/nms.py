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
so the batch is simply vmapped. In `postprocess` the largest intermediate is one level's flattened scores
[B, A_level * K] for the top-k (about the size of the logits; measured in bench/core_ops.py).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from conret_jax.core.boxes import clip_boxes, pairwise_iou

TILE_SIZE = 256


def _nms_one(boxes, scores, classes, valid, iou_threshold, max_output, tile):
  """One image: boxes [N, 4], scores/classes/valid [N] -> (indices [D] int32, valid [D] bool)."""
  n = boxes.shape[0]
  if n == 0:
    return jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool)
  valid = valid & ~jnp.isnan(scores)
  # Ascending stable sort of -score: best first, ties by index, invalid last (-0.0 folded into 0.0, so that a
  # sort that orders signed zeros cannot split a tie).
  key = jnp.where(valid, jnp.where(scores == 0.0, 0.0, -scores), jnp.inf)
  order = jnp.argsort(key, stable=True).astype(jnp.int32)
  num_valid = jnp.sum(valid)
  tile = max(1, min(tile, n))
  padded = -(-n // tile) * tile
  pad = padded - n
  s_boxes = jnp.pad(boxes[order], ((0, pad), (0, 0)))
  s_classes = jnp.pad(classes[order], (0, pad))
  s_valid = jnp.pad(valid[order], (0, pad))
  s_index = jnp.pad(order, (0, pad))
  ar = jnp.arange(tile)
  earlier = ar[None, :] < ar[:, None]  # [i, j]: j precedes i

  def cond(carry):
    t, count = carry[0], carry[4]
    return (t * tile < num_valid) & (count < max_output)

  def body(carry):
    t, kept_boxes, kept_classes, kept_index, count = carry
    start = t * tile
    tb = jax.lax.dynamic_slice_in_dim(s_boxes, start, tile)
    tc = jax.lax.dynamic_slice_in_dim(s_classes, start, tile)
    tv = jax.lax.dynamic_slice_in_dim(s_valid, start, tile)
    ti = jax.lax.dynamic_slice_in_dim(s_index, start, tile)
    # Suppression by the boxes kept in earlier tiles.
    by_kept = ((pairwise_iou(tb, kept_boxes) > iou_threshold) & (tc[:, None] == kept_classes[None, :])
               & (jnp.arange(max_output)[None, :] < count))
    candidate = tv & ~jnp.any(by_kept, axis=1)
    # Within the tile: overlaps[i, j] means an earlier j of the same class would suppress i if kept.
    overlaps = (pairwise_iou(tb, tb) > iou_threshold) & (tc[:, None] == tc[None, :]) & earlier

    def step(state):
      keep, _, it = state
      new = candidate & ~jnp.any(overlaps & keep[None, :], axis=1)
      return new, jnp.any(new != keep), it + 1

    # Converges within `tile` steps (position i is final after i + 1 of them); the cap only guards the loop.
    keep, _, _ = jax.lax.while_loop(lambda s: s[1] & (s[2] <= tile), step, (candidate, jnp.array(True), 0))
    slot = jnp.where(keep, count + jnp.cumsum(keep) - 1, max_output)  # slot max_output (and beyond) is dropped
    kept_boxes = kept_boxes.at[slot].set(tb, mode='drop')
    kept_classes = kept_classes.at[slot].set(tc, mode='drop')
    kept_index = kept_index.at[slot].set(ti, mode='drop')
    return t + 1, kept_boxes, kept_classes, kept_index, count + jnp.sum(keep)

  init = (jnp.array(0), jnp.zeros((max_output, 4), boxes.dtype), jnp.zeros((max_output,), classes.dtype),
          jnp.zeros((max_output,), jnp.int32), jnp.array(0))
  _, _, _, kept_index, count = jax.lax.while_loop(cond, body, init)
  out_valid = jnp.arange(max_output) < count
  return jnp.where(out_valid, kept_index, 0), out_valid


def batched_nms(boxes, scores, classes, valid, *, iou_threshold: float, max_output: int,
                tile_size: int = TILE_SIZE):
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


def postprocess(cls_logits, boxes, level_counts: Sequence[int], image_hw: Sequence[int], *,
                score_threshold: float = 0.05, topk_per_level: int = 1000, nms_iou: float = 0.5,
                max_detections: int = 100) -> dict:
  """Detections from decoded boxes and class logits (torchvision's RetinaNet postprocess_detections).

  Per level: sigmoid scores of all anchors x classes of that level, flattened; the top `topk_per_level` of those
  above `score_threshold` become candidates (anchor = index // K, class = index % K). Candidate boxes are clipped
  to the image, then class-aware NMS keeps the best `max_detections`.

  Args:
    cls_logits: [B, A, K]; boxes: [B, A, 4] decoded x1y1x2y2; level_counts: anchors per level (sum = A).
    image_hw: the (static) model input size boxes are clipped to.
  Returns dict: boxes [B, D, 4] float32, scores [B, D] float32, classes [B, D] int32, valid [B, D] bool, by
    descending score; zeros where not valid.
  """
  num_classes = cls_logits.shape[-1]
  boxes = jnp.asarray(boxes, jnp.float32)
  if sum(level_counts) != cls_logits.shape[1]:
    raise ValueError(f'level_counts sum to {sum(level_counts)}, logits have {cls_logits.shape[1]} anchors')
  cand_boxes, cand_scores, cand_classes, cand_valid = [], [], [], []
  start = 0
  for count in level_counts:
    logits = jnp.asarray(cls_logits[:, start:start + count], jnp.float32)
    scores = jax.nn.sigmoid(logits).reshape(logits.shape[0], -1)  # [B, count * K]
    above = scores > score_threshold
    k = min(topk_per_level, scores.shape[1])
    top, idx = jax.lax.top_k(jnp.where(above, scores, -1.0), k)
    anchor = start + idx // num_classes
    cand_boxes.append(jnp.take_along_axis(boxes, anchor[..., None], axis=1))
    cand_scores.append(top)
    cand_classes.append((idx % num_classes).astype(jnp.int32))
    cand_valid.append(top > score_threshold)
    start += count
  cand_boxes = clip_boxes(jnp.concatenate(cand_boxes, axis=1), image_hw)
  cand_scores = jnp.concatenate(cand_scores, axis=1)
  cand_classes = jnp.concatenate(cand_classes, axis=1)
  keep, valid = batched_nms(cand_boxes, cand_scores, cand_classes, jnp.concatenate(cand_valid, axis=1),
                            iou_threshold=nms_iou, max_output=max_detections)
  gather = lambda x: jnp.take_along_axis(x, keep, axis=1)
  return dict(
      boxes=jnp.where(valid[..., None], jnp.take_along_axis(cand_boxes, keep[..., None], axis=1), 0.0),
      scores=jnp.where(valid, gather(cand_scores), 0.0),
      classes=jnp.where(valid, gather(cand_classes), 0),
      valid=valid,
  )
