"""SSD's hard negative mining (Liu et al. 2016, Section 2.2 "Hard negative mining"), with static shapes.

Most default boxes are background; SSD scores only the negatives of highest background loss, at most neg_pos_ratio
(3) per positive in each image. Per image, k = max(ceil(neg_pos_ratio * num_pos), min_negatives), and the mined
negatives are the k eligible anchors of largest loss, or all of them when fewer are eligible. Eligible means a
BACKGROUND label: IGNORE anchors and positives never count. Ties are broken by anchor index, lower first, so the mask
is deterministic: it is the first k of a stable descending sort of the eligible losses.

No data-dependent shape and no sort: each image's k-th largest eligible loss is found by a radix select over the
losses' bits (32 counting passes over [B, A], each a fused compare-and-sum), the anchors above it are mined, and of
the ties at it the lowest indices until k, found the same way over the index bits. A sort and its inverse
permutation gave the same mask, and on XLA:CPU cost more than the rest of the SSD loss together
(bench/hard_negative_mining.py; its figures in bench/RESULTS.md). Both selects are fori_loops, and the ties are
not counted with a cumulative sum: unrolled passes and the sum each cost XLA:CPU more compile time (RESULTS.md).

Images without objects: k = ceil(ratio * 0) = 0 mines nothing, as in torchvision's SSD and Caffe SSD (MAX_NEGATIVE
mining), so such an image adds no classification loss. `min_negatives` > 0 keeps that many of its hardest negatives
instead (torchvision has this, commented out, as at least neg_pos_ratio negatives per image); it defaults to 0.
"""

import jax
import jax.numpy as jnp
import numpy as np

_SIGN = np.uint32(1 << 31)


def _ordered_bits(x) -> jax.Array:
  """float32 [...] -> uint32 [...] in the floats' order (-0.0 and 0.0 equal; NaN below every number)."""
  x = jnp.where(jnp.isnan(x), -jnp.inf, jnp.where(x == 0, 0.0, x))
  u = jax.lax.bitcast_convert_type(x, jnp.uint32)
  # Non-negative floats order as their bits; negative ones in reverse, below them.
  return jnp.where(u >= _SIGN, ~u, u | _SIGN)


def mine_hard_negatives(
  neg_losses, positive, eligible, *, neg_pos_ratio: float = 3.0, min_negatives: int = 0
) -> jax.Array:
  """The mined negatives of each image.

  Args:
    neg_losses: [B, A] float per-anchor loss if the anchor were background (softmax cross-entropy of class 0).
    positive: [B, A] bool positives; their count sets each image's k.
    eligible: [B, A] bool anchors that may be mined (cls_labels == BACKGROUND).
    neg_pos_ratio: negatives per positive; k = ceil(ratio * positives) in float32 (exact for whole ratios), as
      torchvision's `rank < ratio * num_pos`.
    min_negatives: lower bound on k per image (0: an image without positives mines none).
  Returns:
    [B, A] bool: per image the min(k, num eligible) eligible anchors of largest loss, lower index first on ties.
  """
  key = _ordered_bits(jax.lax.stop_gradient(jnp.asarray(neg_losses, jnp.float32)))
  eligible = jnp.asarray(eligible, bool)
  num_pos = jnp.sum(positive, axis=1, dtype=jnp.float32)
  k = jnp.ceil(jnp.maximum(neg_pos_ratio * num_pos, float(min_negatives))).astype(jnp.int32)[:, None]  # [B, 1]

  def count_at_least(t):
    return jnp.sum(eligible & (key >= t), axis=1, keepdims=True, dtype=jnp.int32)

  # The largest t with at least k eligible keys >= t, built from the top bit down: each image's k-th largest key
  # (0 when fewer than k are eligible; all ones when k = 0, which no loss maps to).
  def try_bit(i, t):  # pass i sets bit 31 - i where enough keys stay at or above it
    candidate = t | jnp.left_shift(np.uint32(1), (31 - i).astype(jnp.uint32))
    return jnp.where(count_at_least(candidate) >= k, candidate, t)

  t = jax.lax.fori_loop(0, 32, try_bit, jnp.zeros(k.shape, jnp.uint32))
  above = eligible & (key > t)
  ties = eligible & (key == t)
  quota = k - jnp.sum(above, axis=1, keepdims=True, dtype=jnp.int32)  # how many of the ties to take
  # The ties below index j, for the largest j that keeps at most `quota` of them: the first `quota` ties.
  index = jnp.arange(key.shape[1], dtype=jnp.int32)
  bits = key.shape[1].bit_length()

  def try_index_bit(i, j):
    candidate = j | jnp.left_shift(1, bits - 1 - i)
    return jnp.where(jnp.sum(ties & (index < candidate), axis=1, keepdims=True) <= quota, candidate, j)

  j = jax.lax.fori_loop(0, bits, try_index_bit, jnp.zeros(k.shape, jnp.int32))
  return above | (ties & (index < j))
