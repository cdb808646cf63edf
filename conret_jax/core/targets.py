"""Training targets of every anchor: class labels, box regression offsets and positive counts.

`assign` is RetinaNet's label_anchors: match anchors to ground truth (core.matching), then give each positive anchor
its gt's class and the encoded offset from the anchor to that gt. It works for the regular anchors [A, 4] and for
per-image refined anchors [B, A, 4] (the consistent-optimization stages), with that stage's IoU thresholds.
"""

from collections.abc import Sequence

import jax.numpy as jnp

from conret_jax.core.boxes import encode
from conret_jax.core.constants import BACKGROUND, IGNORE
from conret_jax.core.matching import match


def assign(
  anchors,
  gt_boxes,
  gt_classes,
  gt_valid,
  *,
  pos_iou: float,
  neg_iou: float,
  allow_low_quality_matches: bool,
  box_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
  low_quality_rule: str = 'promote',
) -> dict:
  """Per-anchor targets.

  Args:
    anchors: [A, 4] or [B, A, 4] float32 x1y1x2y2.
    gt_boxes: [B, G, 4] float32 x1y1x2y2.
    gt_classes: [B, G] int32 class index 0..K-1.
    gt_valid: [B, G] bool; False for padding and crowd rows.
    low_quality_rule: core.matching's rule for low-quality matches: 'promote' (RetinaNet) or 'assign' (SSD).
  Returns dict:
    cls_labels: [B, A] int32: class index (>= 0) for positives, BACKGROUND (-1) or IGNORE (-2).
    positive: [B, A] bool.
    box_targets: [B, A, 4] float32 encoded offsets anchor -> matched gt; zero where not positive.
    num_positives: [B] float32.
  """
  anchors = jnp.asarray(anchors, jnp.float32)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  matches = match(
    anchors,
    gt_boxes,
    gt_valid,
    pos_iou=pos_iou,
    neg_iou=neg_iou,
    allow_low_quality_matches=allow_low_quality_matches,
    low_quality_rule=low_quality_rule,
  )
  positive, matched_gt = matches.positive, matches.matched_gt
  classes = jnp.take_along_axis(jnp.asarray(gt_classes, jnp.int32), matched_gt, axis=1)
  cls_labels = jnp.where(positive, classes, jnp.where(matches.negative, BACKGROUND, IGNORE)).astype(jnp.int32)

  anchors_b = jnp.broadcast_to(anchors, positive.shape + (4,))
  matched_boxes = jnp.take_along_axis(gt_boxes, matched_gt[..., None], axis=1)  # [B, A, 4]
  # Non-positive anchors encode against themselves: padding rows (zero boxes) would otherwise give log(0).
  matched_boxes = jnp.where(positive[..., None], matched_boxes, anchors_b)
  box_targets = jnp.where(positive[..., None], encode(matched_boxes, anchors_b, box_weights), 0.0)
  return dict(
    cls_labels=cls_labels,
    positive=positive,
    box_targets=box_targets,
    num_positives=jnp.sum(positive, axis=1).astype(jnp.float32),
  )
