"""The stages of consistent optimization (the paper, Section 4), as config.consistent sets them.

Stage 0 is RetinaNet: the regular anchors, matched at 0.5/0.4 with low-quality matches. Stage s > 0 takes the
anchors of stage s-1 moved by regression s-1 (`refine`: decoded, then `stop_gradient`, since a target is a constant
and no gradient may flow through the anchor a label was computed from), and matches them again at the stage's own,
stricter IoU thresholds (mu_pos=0.6, mu_neg=0.5 for stage 1; 0.7/0.6 for stage 2, as in Table 3).

The model (one box conv per regression stage), the loss (conret_jax/consistent.py) and inference (the regressions it
applies) all read the stage counts here, so none of them imports another.
"""

import jax
import jax.numpy as jnp
import ml_collections

from conret_jax.core import boxes as box_ops
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
  """Raises ConfigError naming the key when the consistent section cannot work."""
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
