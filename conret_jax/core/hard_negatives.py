"""SSD's hard negative mining (Liu et al. 2016, Section 2.2 "Hard negative mining"), with static shapes.

Most default boxes are background; SSD scores only the negatives of highest background loss, at most neg_pos_ratio
(3) per positive in each image. Per image, k = max(ceil(neg_pos_ratio * num_pos), min_negatives), and the mined
negatives are the k eligible anchors of largest loss, or all of them when fewer are eligible. Eligible means a
BACKGROUND label: IGNORE anchors and positives never count.

No data-dependent shape: every image's eligible losses are sorted in descending order (ineligible anchors last) and
an anchor is mined when its rank is below k. Ties are broken by anchor index, lower first (a stable sort of the
negated loss), so the mask is deterministic.

Images without objects: k = ceil(ratio * 0) = 0 mines nothing, as in torchvision's SSD and Caffe SSD (MAX_NEGATIVE
mining), so such an image adds no classification loss. `min_negatives` > 0 keeps that many of its hardest negatives
instead (torchvision has this, commented out, as at least neg_pos_ratio negatives per image); it defaults to 0.
"""

import jax
import jax.numpy as jnp


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
  losses = jax.lax.stop_gradient(jnp.asarray(neg_losses, jnp.float32))
  eligible = jnp.asarray(eligible, bool)
  num_pos = jnp.sum(positive, axis=1, dtype=jnp.float32)
  k = jnp.maximum(neg_pos_ratio * num_pos, float(min_negatives))[:, None]  # [B, 1]
  # Ascending stable sort of -loss: largest loss first, equal losses in anchor order, ineligible anchors last.
  key = jnp.where(eligible, -losses, jnp.inf)
  order = jnp.argsort(key, axis=1, stable=True)
  rank = jnp.argsort(order, axis=1)  # the inverse permutation: each anchor's place in `order`
  return eligible & (rank < k)
