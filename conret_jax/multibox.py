"""SSD's MultiBox loss (Liu et al. 2016, "Training objective") with consistent optimization (Section 4, Table 5).

The stages are conret_jax/stages.py, as for RetinaNet (conret_jax/consistent.py): stage 0 matches the default boxes
at IoU 0.5, and each ground truth's best default box is matched to that ground truth (SSD's matching: pos_iou =
neg_iou = 0.5 and low-quality matches by core.matching's 'assign' rule, where RetinaNet's 'promote' would keep the
box's own best ground truth), stage s >= 1 matches the boxes refined by regression s - 1 at that stage's thresholds
(0.6 / 0.5).

  L_cls = 1/N * sum_s w_s sum_{i in Pos_s + Neg_s} CE(c_i, c^s_i),  w_0 = 1, w_s = alpha      (the paper's Eq. 1)
  L_reg = sum_s 1/N_s * sum_{i in Pos_s} smoothL1(t^s_i - t^s*_i)                          (Eq. 2)

CE is softmax cross-entropy over K + 1 logits (index 0 = background, class k -> k + 1). Every classification term
scores the same prediction c_i (one classifier; a model with one classifier per stage scores its own, as in
consistent.py). N is the number of stage-0 positives in the whole batch (SSD's N; the paper normalizes every
classification term by the positive original anchors), N_s the positives of stage s. Neg_s are hard negatives
(core/hard_negatives.py): per image the BACKGROUND anchors of largest background loss, neg_pos_ratio per positive.

How mining applies to a refined term is not said in the paper. Default (`refined_negatives='per_stage'`): each
stage mines its own, among its own BACKGROUND anchors, neg_pos_ratio per positive of that stage. The refined term is
then SSD's classification loss with the refined boxes as default boxes (over stage 0's N, times alpha), the way
RetinaNet's refined term is its focal loss on the refined labels, and the 3:1 balance holds for that stage. With one
classifier the ranked losses are the same in both choices (an anchor's background loss does not depend on the
stage); the stage decides which anchors may be negatives and how many. An anchor that was positive at stage 0 and
whose regression drifted off its object is background at stage 1 with a high background loss: exactly the
misaligned, confidently wrong box the refined term exists to penalize (Section 3.1), and only 'per_stage' can mine
it. 'stage0' reuses stage 0's mined negatives in every term (those still BACKGROUND in the refined stage): the
refined term keeps its own positives, but its negatives are the ones stage 0 already pushes to background. On the
shapes demo the two score alike (bench/RESULTS.md, "The shapes demos read two ways").

`MultiBoxLoss.from_config` reads the config once; the loss itself takes plain values.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from conret_jax.core import losses
from conret_jax.core.constants import BACKGROUND
from conret_jax.core.hard_negatives import mine_hard_negatives
from conret_jax.errors import ConfigError
from conret_jax.stages import Stages

REFINED_NEGATIVES = ('per_stage', 'stage0')

# SSD's matching at stage 0 (0.5 / 0.5 with low-quality matches), Table 3's stricter refined stages, and
# torchvision's SSD box coder (10, 10, 5, 5; Caffe SSD's variances 0.1 and 0.2).
SSD_STAGES = Stages(
  pos_iou=(0.5, 0.6, 0.7), neg_iou=(0.5, 0.5, 0.6), box_weights=(10.0, 10.0, 5.0, 5.0), low_quality_rule='assign'
)


def softmax_cross_entropy(logits, labels) -> tuple[jax.Array, jax.Array]:
  """Per-anchor softmax cross-entropy of each anchor's label, and of background, float32.

  Args:
    logits: [B, A, K + 1]; index 0 is background.
    labels: [B, A] int32 cls_labels: class k >= 0 (target index k + 1), BACKGROUND (index 0) or IGNORE (scored as
      background here; callers mask it out).
  Returns:
    (label_loss [B, A], background_loss [B, A]).
  """
  x = jnp.asarray(logits, jnp.float32)
  lse = jax.nn.logsumexp(x, axis=-1)  # one [B, A] normalizer instead of a [B, A, K + 1] log-softmax
  target = jnp.maximum(labels + 1, 0)
  picked = jnp.take_along_axis(x, target[..., None], axis=-1)[..., 0]
  return lse - picked, lse - x[..., 0]


def validate(config: ml_collections.ConfigDict) -> None:
  """ConfigError naming the key when config.loss's keys of this loss cannot work."""
  lc = config.loss
  problems = [
    (lc.neg_pos_ratio > 0, f'config.loss.neg_pos_ratio={lc.neg_pos_ratio} must be > 0'),
    (lc.min_negatives >= 0, f'config.loss.min_negatives={lc.min_negatives} must be >= 0'),
    (
      lc.refined_negatives in REFINED_NEGATIVES,
      f'config.loss.refined_negatives={lc.refined_negatives!r} must be one of {REFINED_NEGATIVES}',
    ),
    (lc.smooth_l1_beta >= 0, f'config.loss.smooth_l1_beta={lc.smooth_l1_beta} must be >= 0'),
  ]
  for ok, message in problems:
    if not ok:
      raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class MultiBoxLoss:
  """SSD's loss over the stages of consistent optimization (plain SSD when `stages` has one term of each)."""

  stages: Stages = SSD_STAGES
  neg_pos_ratio: float = 3.0
  min_negatives: int = 0  # per image, also without objects; torchvision and Caffe SSD: 0
  refined_negatives: str = 'per_stage'  # or 'stage0'; see the module docstring
  smooth_l1_beta: float = 1.0  # torchvision's SSD: F.smooth_l1_loss's default beta
  box_loss_weight: float = 1.0

  def __post_init__(self):
    if self.refined_negatives not in REFINED_NEGATIVES:
      raise ValueError(f'refined_negatives={self.refined_negatives!r} must be one of {REFINED_NEGATIVES}')
    if self.neg_pos_ratio <= 0 or self.min_negatives < 0:
      raise ValueError(f'need neg_pos_ratio > 0 and min_negatives >= 0, got {self.neg_pos_ratio}, {self.min_negatives}')

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'MultiBoxLoss':
    lc = config.loss
    return cls(
      stages=dataclasses.replace(Stages.from_config(config), low_quality_rule='assign'),
      neg_pos_ratio=float(lc.neg_pos_ratio),
      min_negatives=int(lc.min_negatives),
      refined_negatives=str(lc.refined_negatives),
      smooth_l1_beta=float(lc.smooth_l1_beta),
      box_loss_weight=float(lc.box_loss_weight),
    )

  def __call__(self, outputs: dict, anchors: jax.Array, batch) -> tuple[jax.Array, dict]:
    """The loss of the model's outputs on a batch.

    Args:
      outputs: {'cls_logits': tuple of [B, A, K + 1] (softmax, index 0 = background), 'box_deltas': tuple of
        [B, A, 4] per regression stage}.
      anchors: [A, 4] default boxes of the input size, x1y1x2y2 pixels.
      batch: the training batch (boxes, classes, valid, crowd; see `Stages.targets`).
    Returns:
      (scalar float32 loss, metrics): cls_loss_<s> and box_loss_<s> (normalized and weighted as they enter the
      loss), num_pos_<s> (global positives) and num_neg_<s> (global mined negatives of classification term s), loss.
    """
    st = self.stages
    cls_logits, box_deltas = outputs['cls_logits'], outputs['box_deltas']
    if len(box_deltas) < st.num_reg_terms:
      raise ValueError(f'the model predicts {len(box_deltas)} regression stages; the loss needs {st.num_reg_terms}')
    per_stage = st.targets(anchors, box_deltas, batch)
    metrics = {f'num_pos_{s}': jnp.sum(t['num_positives']) for s, t in enumerate(per_stage)}
    total = jnp.zeros((), jnp.float32)
    n_cls_norm = losses.normalizer(metrics['num_pos_0'])
    stage0_negatives = None
    for s in range(st.num_cls_terms):
      t = per_stage[s]
      # Term s scores classifier s, or the last one: all terms share it when the model has one (Figure 4(d)).
      label_loss, background_loss = softmax_cross_entropy(cls_logits[min(s, len(cls_logits) - 1)], t['cls_labels'])
      background = t['cls_labels'] == BACKGROUND
      if s == 0 or self.refined_negatives == 'per_stage':
        negatives = mine_hard_negatives(
          background_loss,
          t['positive'],
          background,
          neg_pos_ratio=self.neg_pos_ratio,
          min_negatives=self.min_negatives,
        )
      else:
        negatives = stage0_negatives & background
      if s == 0:
        stage0_negatives = negatives
      term_sum = jnp.sum(jnp.where(t['positive'] | negatives, label_loss, 0.0))
      metrics[f'cls_loss_{s}'] = (1.0 if s == 0 else st.alpha) * term_sum / n_cls_norm
      metrics[f'num_neg_{s}'] = jnp.sum(negatives, dtype=jnp.float32)
      total = total + metrics[f'cls_loss_{s}']
    for s in range(st.num_reg_terms):
      t = per_stage[s]
      metrics[f'box_loss_{s}'] = (
        self.box_loss_weight
        * losses.box_loss(box_deltas[s].astype(jnp.float32), t['box_targets'], t['positive'], beta=self.smooth_l1_beta)
        / losses.normalizer(jnp.sum(t['num_positives']))
      )
      total = total + metrics[f'box_loss_{s}']
    metrics['loss'] = total
    return total, metrics
