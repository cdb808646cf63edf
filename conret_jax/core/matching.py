"""Anchor-to-ground-truth matching by IoU (torchvision's / detectron2's Matcher semantics, vectorized).

For each anchor, the matched ground truth is the valid gt of highest IoU (first index on ties). With that IoU q, its
verdict (core.constants) is:
  q >= pos_iou            -> MATCH_POSITIVE (1)
  q <  neg_iou            -> MATCH_NEGATIVE (0)
  neg_iou <= q < pos_iou  -> MATCH_IGNORED (-1)
An anchor exactly at pos_iou is positive and one exactly at neg_iou is ignored (Detectron's convention).

Low-quality matches (allow_low_quality_matches), by one of two rules (low_quality_rule):
  'promote'  RetinaNet's (torchvision's and detectron2's Matcher): for every valid gt, all anchors whose IoU with it
             equals that gt's highest IoU (ties included) become positive, whatever their label, and keep their own
             best gt as matched_gt (not necessarily the gt they were promoted for).
  'assign'   SSD's (Liu et al. 2016; torchvision's SSDMatcher): each valid gt's best anchor (the first on ties) is
             positive and matched to that gt, so every object gets a default box even where a neighbour overlaps that
             box more. Where several gts share a best anchor, the one that overlaps it most takes it (the first row
             on ties), which is that anchor's own match; torchvision's index assignment gives it to the last row.
One deliberate difference from torchvision in both: a gt whose best IoU is 0 (degenerate or outside every anchor)
promotes nothing, where torchvision would promote anchors with IoU 0 to it; the two agree whenever every valid gt
overlaps some anchor.

Rows with gt_valid False (padding and crowd rows; the caller passes valid & ~crowd) never match; an image without
valid gt gets all negatives.

Memory: the [G, A] IoU matrix is the big intermediate (about 196k anchors x 100 gt = 78 MB at 1024x1024). A vmap over
a whole batch would hold one per image; one image at a time (jax.lax.map) runs the batch as a sequence of small
programs, which on a GPU costs more than the matching itself (bench/RESULTS.md, "Measurements that used to live in
docstrings"). So images go in chunks: as many per vmap as fit IOU_BYTES_PER_CHUNK of IoU matrices. The result is the
same whatever the chunking: every image is matched on its own.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from conret_jax.core.boxes import pairwise_iou
from conret_jax.core.constants import MATCH_IGNORED, MATCH_NEGATIVE, MATCH_POSITIVE

IOU_BYTES_PER_CHUNK = 256 * 2**20  # float32 [chunk, G, A] IoU matrices matched in one vmap
LOW_QUALITY_RULES = ('promote', 'assign')


class MatchResult(NamedTuple):
  """What matching says of each anchor; unpacks as (matched_gt, labels).

  matched_gt: [B, A] int32 index into the G ground-truth rows (meaningful where positive).
  labels: [B, A] int32 verdicts, MATCH_POSITIVE / MATCH_NEGATIVE / MATCH_IGNORED.
  """

  matched_gt: jax.Array
  labels: jax.Array

  @property
  def positive(self) -> jax.Array:
    return self.labels == MATCH_POSITIVE

  @property
  def negative(self) -> jax.Array:
    return self.labels == MATCH_NEGATIVE


def match_image(
  anchors,
  gt_boxes,
  gt_valid,
  *,
  pos_iou: float,
  neg_iou: float,
  allow_low_quality_matches: bool,
  low_quality_rule: str = 'promote',
):
  """One image: anchors [A, 4], gt_boxes [G, 4], gt_valid [G] -> (matched_gt [A] int32, labels [A] int32)."""
  num_anchors = anchors.shape[0]
  if gt_boxes.shape[0] == 0:
    return jnp.zeros((num_anchors,), jnp.int32), jnp.full((num_anchors,), MATCH_NEGATIVE, jnp.int32)
  valid = gt_valid.astype(bool)
  # Laid out [G, A] (anchors on the fast axis: measured faster than [A, G] for both reductions on CPU).
  # Invalid rows get IoU -1: they are never the best gt and never reach a threshold.
  iou = jnp.where(valid[:, None], pairwise_iou(gt_boxes, anchors), -1.0)
  # Materialize the IoU once: XLA would otherwise recompute it inside each consumer's fusion, possibly with
  # different instruction choices (FMA or not), and the equality tests below need one value per pair. XLA:CPU drops
  # the barrier before fusing (model/pooling.py met that); there the division keeps the IoU in one fusion, as XLA
  # does not duplicate a division (tests/core/test_matching.py checks the matches at full optimization).
  iou = jax.lax.optimization_barrier(iou)
  best = jnp.max(iou, axis=0)  # [A]
  # First gt reaching the best IoU (argmax's tie rule); two plain reductions are cheaper than argmax on CPU.
  num_gt = gt_boxes.shape[0]
  rows = jnp.arange(num_gt, dtype=jnp.int32)[:, None]
  matched_gt = jnp.min(jnp.where(iou == best[None, :], rows, num_gt - 1), axis=0).astype(jnp.int32)
  labels = jnp.where(best >= pos_iou, MATCH_POSITIVE, jnp.where(best < neg_iou, MATCH_NEGATIVE, MATCH_IGNORED)).astype(
    jnp.int32
  )
  if allow_low_quality_matches:
    best_per_gt = jnp.max(iou, axis=1)  # [G]
    promotes = valid & (best_per_gt > 0.0)
    at_best = (iou == best_per_gt[:, None]) & promotes[:, None]  # [G, A]
    if low_quality_rule == 'promote':
      labels = jnp.where(jnp.any(at_best, axis=0), MATCH_POSITIVE, labels)
    else:  # 'assign': each gt claims its first best anchor; of several claimants the best-overlapping one wins
      columns = jnp.arange(num_anchors, dtype=jnp.int32)
      first_best = jnp.min(jnp.where(at_best, columns[None, :], num_anchors), axis=1)  # [G]; A where none
      claims = columns[None, :] == first_best[:, None]  # [G, A]
      claim_iou = jnp.max(jnp.where(claims, iou, -1.0), axis=0)  # [A]
      claimant = jnp.min(jnp.where(claims & (iou == claim_iou[None, :]), rows, num_gt), axis=0)  # [A]; G: none
      matched_gt = jnp.where(claimant < num_gt, claimant, matched_gt).astype(jnp.int32)
      labels = jnp.where(claimant < num_gt, MATCH_POSITIVE, labels)
  return matched_gt, labels


def match(
  anchors,
  gt_boxes,
  gt_valid,
  *,
  pos_iou: float,
  neg_iou: float,
  allow_low_quality_matches: bool,
  low_quality_rule: str = 'promote',
) -> MatchResult:
  """Match a batch of images.

  Args:
    anchors: [A, 4] shared by all images, or [B, A, 4] per image (refined anchors), float32 x1y1x2y2.
    gt_boxes: [B, G, 4] float32 x1y1x2y2.
    gt_valid: [B, G] bool; False for padding and crowd rows.
    low_quality_rule: 'promote' (RetinaNet's) or 'assign' (SSD's); see the module docstring.
  Returns:
    MatchResult: matched_gt [B, A] int32 index into G (meaningful where positive), labels [B, A] int32 verdicts.
  """
  if neg_iou > pos_iou:
    raise ValueError(f'neg_iou {neg_iou} > pos_iou {pos_iou}')
  if low_quality_rule not in LOW_QUALITY_RULES:
    raise ValueError(f'low_quality_rule={low_quality_rule!r} must be one of {LOW_QUALITY_RULES}')
  kw = dict(
    pos_iou=pos_iou,
    neg_iou=neg_iou,
    allow_low_quality_matches=allow_low_quality_matches,
    low_quality_rule=low_quality_rule,
  )
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
  gt_valid = jnp.asarray(gt_valid, bool)
  anchors = jnp.asarray(anchors, jnp.float32)
  chunk = images_per_chunk(gt_boxes.shape[0], gt_boxes.shape[1], anchors.shape[-2])
  if anchors.ndim == 2:
    per_image = lambda x: match_image(anchors, x[0], x[1], **kw)
    return MatchResult(*jax.lax.map(per_image, (gt_boxes, gt_valid), batch_size=chunk))
  if anchors.ndim != 3 or anchors.shape[0] != gt_boxes.shape[0]:
    raise ValueError(f'anchors must be [A, 4] or [B, A, 4] with B = {gt_boxes.shape[0]}, got {anchors.shape}')
  per_image = lambda x: match_image(x[0], x[1], x[2], **kw)
  return MatchResult(*jax.lax.map(per_image, (anchors, gt_boxes, gt_valid), batch_size=chunk))


def images_per_chunk(batch: int, num_gt: int, num_anchors: int) -> int:
  """Images matched together: the largest divisor of `batch` whose IoU matrices fit IOU_BYTES_PER_CHUNK."""
  fits = max(1, IOU_BYTES_PER_CHUNK // max(1, 4 * num_gt * num_anchors))
  return max(d for d in range(1, batch + 1) if batch % d == 0 and d <= fits)
