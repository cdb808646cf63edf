"""The stages of consistent optimization (the paper, Section 4), shared by every detector family and by training and
inference alike.

Stage 0 holds the regular anchors (RetinaNet's, or SSD's default boxes), matched at the family's thresholds with
low-quality matches. Stage s > 0 takes the anchors of stage s-1 moved by regression s-1 (`refine`: decoded, then
`stop_gradient`, since a target is a constant and no gradient may flow through the anchor a label was computed from),
and matches them again at the stage's own, stricter IoU thresholds (mu_pos=0.6, mu_neg=0.5 for stage 1; 0.7/0.6 for
stage 2, as in Table 3). Inference applies the regressions in the same order (`Stages.decode`).

`Stages.from_config` reads config.consistent, config.model.box_weights / box_clamp and
config.loss.allow_low_quality_matches once; a family's network (one box conv per regression stage), its loss and
its decoding all take this value, so none of them reads config.consistent itself.
"""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from conret_jax.core import boxes as box_ops
from conret_jax.core import targets as target_ops
from conret_jax.core.constants import BOX_DELTA_CLAMP
from conret_jax.errors import ConfigError


def num_terms(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(classification terms, regression terms); the plain detector is (1, 1)."""
  c = config.consistent
  if not c.enabled:
    return 1, 1
  return int(c.num_cls_terms), int(c.num_reg_terms)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the key when config.consistent cannot work."""
  c = config.consistent
  n_cls, n_reg = num_terms(config)
  if n_cls < 1 or n_reg < 1:
    raise ConfigError(f'config.consistent.num_cls_terms={n_cls} and num_reg_terms={n_reg} must be >= 1')
  if n_cls > n_reg + 1:
    raise ConfigError(
      f'config.consistent.num_cls_terms={n_cls} needs at least {n_cls - 1} regression terms to '
      f'refine its anchors, but num_reg_terms={n_reg}'
    )
  stages = max(n_cls, n_reg)
  for key in ('pos_iou_thresholds', 'neg_iou_thresholds'):
    if len(c[key]) < stages:
      raise ConfigError(f'config.consistent.{key} has {len(c[key])} entries; {stages} stages need one each')
  for s in range(stages):
    pos, neg = c.pos_iou_thresholds[s], c.neg_iou_thresholds[s]
    if not 0.0 < neg <= pos <= 1.0:
      raise ConfigError(f'stage {s + 1}: need 0 < neg_iou ({neg}) <= pos_iou ({pos}) <= 1 in config.consistent')
  if c.alpha < 0:
    raise ConfigError(f'config.consistent.alpha={c.alpha} must be >= 0')
  if not 0 <= c.inference_reg_steps <= n_reg:
    raise ConfigError(f'config.consistent.inference_reg_steps={c.inference_reg_steps} must be in [0, {n_reg}]')


def refine(anchors: jax.Array, deltas: jax.Array, *, box_weights, clamp: float) -> jax.Array:
  """Anchors moved by one regression, as constants for the next stage's matching.

  Args:
    anchors: [A, 4] or [B, A, 4] float32, x1y1x2y2.
    deltas: [B, A, 4] predicted offsets of this stage.
  Returns:
    [B, A, 4] float32 refined anchors, with no gradient.
  """
  decoded = box_ops.decode(deltas.astype(jnp.float32), anchors, box_weights, clamp)
  return jax.lax.stop_gradient(decoded)


@dataclasses.dataclass(frozen=True)
class Stages:
  """The stages of a config: how many terms, each stage's thresholds, the box coding, the inference regressions.

  Thresholds are per stage, stage 0 first. `alpha` weights every refined classification term (Eq. 1).
  """

  num_cls_terms: int = 1
  num_reg_terms: int = 1
  alpha: float = 1.0
  pos_iou: tuple = (0.5, 0.6, 0.7)
  neg_iou: tuple = (0.4, 0.5, 0.6)
  allow_low_quality_matches: bool = True  # stage 0 only; refined stages match on quality alone
  low_quality_rule: str = 'promote'  # core.matching's: 'promote' (RetinaNet), 'assign' (SSD: set by its loss)
  box_weights: tuple = (1.0, 1.0, 1.0, 1.0)
  box_clamp: float = BOX_DELTA_CLAMP
  inference_steps: int = 1  # regressions applied at inference (Table 3's "2*" applies 1 of 2)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'Stages':
    validate(config)
    n_cls, n_reg = num_terms(config)
    c, m = config.consistent, config.model
    return cls(
      num_cls_terms=n_cls,
      num_reg_terms=n_reg,
      alpha=float(c.alpha),
      pos_iou=tuple(float(v) for v in c.pos_iou_thresholds),
      neg_iou=tuple(float(v) for v in c.neg_iou_thresholds),
      allow_low_quality_matches=bool(config.loss.allow_low_quality_matches),
      box_weights=tuple(float(v) for v in m.box_weights),
      box_clamp=float(m.box_clamp),
      inference_steps=int(c.inference_reg_steps) or n_reg,
    )

  @property
  def num_stages(self) -> int:
    """Stages that need targets: one per classification or regression term, whichever is more."""
    return max(self.num_cls_terms, self.num_reg_terms)

  def targets(self, anchors: jax.Array, box_deltas: Sequence[jax.Array], batch) -> list[dict]:
    """Targets of every stage: stage 0 on the regular anchors, stage s on anchors refined s times.

    Args:
      anchors: [A, 4] regular anchors.
      box_deltas: per regression stage, [B, A, 4].
      batch: a Batch (conret_jax/batch.py) or mapping with boxes [B, M, 4], classes [B, M], valid [B, M], crowd [B, M].
    Returns:
      One dict per stage from `core.targets.assign` (cls_labels [B, A], positive [B, A], box_targets [B, A, 4],
      num_positives [B]), plus 'anchors' ([A, 4] or [B, A, 4]).
    """
    gt_valid = batch['valid'] & ~batch['crowd']  # crowd regions never make a positive
    result = []
    stage_anchors = anchors
    for s in range(self.num_stages):
      if s > 0:
        stage_anchors = refine(stage_anchors, box_deltas[s - 1], box_weights=self.box_weights, clamp=self.box_clamp)
      t = target_ops.assign(
        stage_anchors,
        batch['boxes'],
        batch['classes'],
        gt_valid,
        pos_iou=self.pos_iou[s],
        neg_iou=self.neg_iou[s],
        allow_low_quality_matches=self.allow_low_quality_matches and s == 0,
        box_weights=self.box_weights,
        low_quality_rule=self.low_quality_rule,
      )
      result.append(dict(t, anchors=stage_anchors))
    return result

  def decode(self, outputs: dict, anchors: jax.Array, steps: int | None = None) -> tuple[jax.Array, jax.Array]:
    """The first `steps` regressions (default: `inference_steps`) applied in turn, and the scores of the classifier
    that goes with them.

    Args:
      outputs: a network's dict(cls_logits=tuple of [B, A, K'], box_deltas=tuple of [B, A, 4]).
      anchors: [A, 4] float32 x1y1x2y2.
    Returns:
      (logits [B, A, K'], boxes [B, A, 4] float32 x1y1x2y2, unclipped): boxes = decode(deltas[0], anchors), then
      decode(deltas[s], boxes) for s = 1..steps-1; the logits of classifier min(steps, len) - 1.
    """
    steps = self.inference_steps if steps is None else steps
    deltas = outputs['box_deltas']
    boxes = jnp.broadcast_to(anchors, deltas[0].shape)
    for s in range(steps):
      boxes = box_ops.decode(deltas[s], boxes, self.box_weights, clamp=self.box_clamp)
    logits = outputs['cls_logits'][min(steps, len(outputs['cls_logits'])) - 1]
    return logits, boxes
