"""Consistent optimization (the paper, Section 4): refined anchors and the multi-stage loss of Eq. 1 and 2.

Stage 0 is RetinaNet: the regular anchors, matched at 0.5/0.4 with low-quality matches. Stage s > 0 takes the
anchors of stage s-1 moved by regression s-1 (decoded, then `stop_gradient`: a target is a constant, and no gradient
may flow through the anchor a label was computed from), and matches them again at the stage's own, stricter IoU
thresholds (mu_pos=0.6, mu_neg=0.5 for stage 1; 0.7/0.6 for stage 2, as in Table 3).

  L_cls = 1/N_cls * sum_i [ L(c_i, c*_i) + alpha * L(c_i, c†_i) (+ alpha * one term per further stage) ]   (Eq. 1)
  L_reg = sum_s 1/N_reg^s * sum_i L^s_reg(t^s_i, t^s*_i)                                                     (Eq. 2)

Every classification term scores the same prediction c_i (one shared classifier, Figure 4(d)); the cascade
variants of Table 1 have one classifier per stage and each scores its own stage. N_cls is the number of positive
original anchors; each regression term is normalized by its own stage's positives. The counts are sums over the
whole global batch: inside the jitted step the batch axis is one logical axis however it is sharded, so the sums are
global (XLA inserts the all-reduce), which is what synchronous SGD on one big batch would compute.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from conret_jax.core import boxes as box_ops
from conret_jax.core import losses, targets
from conret_jax.errors import ConfigError


def num_terms(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(classification terms, regression terms); plain RetinaNet is (1, 1)."""
  c = config.consistent
  if not c.enabled:
    return 1, 1
  return int(c.num_cls_terms), int(c.num_reg_terms)


def num_regression_stages(config: ml_collections.ConfigDict) -> int:
  """Box convs in the head: one per regression term."""
  return num_terms(config)[1]


def inference_steps(config: ml_collections.ConfigDict) -> int:
  """Regressions applied at inference (Table 3's "2*" applies 1 of 2)."""
  trained = num_regression_stages(config)
  steps = int(config.consistent.inference_reg_steps) or trained
  if not 1 <= steps <= trained:
    raise ConfigError(f'config.consistent.inference_reg_steps={steps} but the model has {trained} regression stages')
  return steps


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key when the consistent section cannot work."""
  c = config.consistent
  n_cls, n_reg = num_terms(config)
  if n_cls < 1 or n_reg < 1:
    raise ConfigError(f'config.consistent.num_cls_terms={n_cls} and num_reg_terms={n_reg} must be >= 1')
  if n_cls > n_reg + 1:
    raise ConfigError(f'config.consistent.num_cls_terms={n_cls} needs at least {n_cls - 1} regression terms to '
                     f'refine its anchors, but num_reg_terms={n_reg}')
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


def refine(anchors: jax.Array, deltas: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
  """Anchors moved by one regression, as constants for the next stage's matching.

  Args:
    anchors: [A, 4] or [B, A, 4] float32, x1y1x2y2.
    deltas: [B, A, 4] predicted offsets of this stage.
  Returns:
    [B, A, 4] float32 refined anchors, with no gradient.
  """
  decoded = box_ops.decode(deltas.astype(jnp.float32), anchors, config.model.box_weights, config.model.box_clamp)
  return jax.lax.stop_gradient(decoded)


def stage_targets(anchors: jax.Array, box_deltas: Sequence[jax.Array], batch: dict,
                  config: ml_collections.ConfigDict) -> list[dict]:
  """Targets of every stage: stage 0 on the regular anchors, stage s on anchors refined s times.

  Args:
    anchors: [A, 4] regular anchors.
    box_deltas: per regression stage, [B, A, 4].
    batch: holds boxes [B, M, 4], classes [B, M], valid [B, M], crowd [B, M].
  Returns:
    One dict per stage from `targets.assign`, plus 'anchors' ([A, 4] or [B, A, 4]).
  """
  n_cls, n_reg = num_terms(config)
  gt_valid = batch['valid'] & ~batch['crowd']  # crowd regions never make a positive
  result = []
  stage_anchors = anchors
  for s in range(max(n_cls, n_reg)):
    if s > 0:
      stage_anchors = refine(stage_anchors, box_deltas[s - 1], config)
    t = targets.assign(
        stage_anchors, batch['boxes'], batch['classes'], gt_valid,
        pos_iou=config.consistent.pos_iou_thresholds[s], neg_iou=config.consistent.neg_iou_thresholds[s],
        allow_low_quality_matches=bool(config.loss.allow_low_quality_matches) and s == 0,
        box_weights=config.model.box_weights)
    result.append(dict(t, anchors=stage_anchors))
  return result


def loss(outputs: dict, anchors: jax.Array, batch: dict,
         config: ml_collections.ConfigDict) -> tuple[jax.Array, dict]:
  """The consistent loss of Eq. 1 + Eq. 2 (RetinaNet's loss when consistent.enabled is False).

  Args:
    outputs: the model's {'cls_logits': tuple of [B, A, K], 'box_deltas': tuple of [B, A, 4]} (float32).
    anchors: [A, 4] regular anchors of the input size.
    batch: the training batch (layout in conret_jax/data/__init__.py: boxes, classes, valid, crowd).
  Returns:
    (scalar float32 loss, metrics): cls_loss_<s>, box_loss_<s> (each already normalized and weighted as it enters
    the loss) and num_pos_<s> (global positive counts) per stage, and loss.
  """
  n_cls, n_reg = num_terms(config)
  cls_logits, box_deltas = outputs['cls_logits'], outputs['box_deltas']
  if len(box_deltas) < n_reg:
    raise ValueError(f'the model predicts {len(box_deltas)} regression stages; the loss needs {n_reg}')
  per_stage = stage_targets(anchors, box_deltas, batch, config)
  metrics = {}
  total = jnp.zeros((), jnp.float32)
  n_cls_norm = losses.normalizer(jnp.sum(per_stage[0]['num_positives']))
  for s, t in enumerate(per_stage):
    metrics[f'num_pos_{s}'] = jnp.sum(t['num_positives'])
  # Terms that score the same classifier share one focal-loss evaluation (Figure 4(d): all of them).
  classifier_of = [min(s, len(cls_logits) - 1) for s in range(n_cls)]
  for c in sorted(set(classifier_of)):
    terms = [s for s in range(n_cls) if classifier_of[s] == c]
    sums = losses.classification_losses(
        cls_logits[c].astype(jnp.float32), [per_stage[s]['cls_labels'] for s in terms],
        alpha=config.loss.focal_alpha, gamma=config.loss.focal_gamma)
    for s, term_sum in zip(terms, sums):
      weight = 1.0 if s == 0 else config.consistent.alpha
      metrics[f'cls_loss_{s}'] = weight * term_sum / n_cls_norm
      total = total + metrics[f'cls_loss_{s}']
  for s in range(n_reg):
    t = per_stage[s]
    term = config.loss.box_loss_weight * losses.box_loss(
        box_deltas[s].astype(jnp.float32), t['box_targets'], t['positive'],
        beta=config.loss.smooth_l1_beta) / losses.normalizer(jnp.sum(t['num_positives']))
    metrics[f'box_loss_{s}'] = term
    total = total + term
  metrics['loss'] = total
  return total, metrics
