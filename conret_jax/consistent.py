"""The loss of consistent optimization (the paper, Section 4): Eq. 1 and Eq. 2 over every stage's targets.

The stages themselves (counts, thresholds, refined anchors and their targets) are conret_jax/stages.py, which SSD's
loss shares. With the targets of stage 0 on the regular anchors and of stage s on the anchors refined s times:

  L_cls = 1/N_cls * sum_i [ L(c_i, c*_i) + alpha * L(c_i, c†_i) (+ alpha * one term per further stage) ]   (Eq. 1)
  L_reg = sum_s 1/N_reg^s * sum_i L^s_reg(t^s_i, t^s*_i)                                                     (Eq. 2)

Every classification term scores the same prediction c_i (one shared classifier, Figure 4(d)); the cascade
variants of Table 1 have one classifier per stage and each scores its own stage. N_cls is the number of positive
original anchors; each regression term is normalized by its own stage's positives. The counts are sums over the
whole global batch: inside the jitted step the batch axis is one logical axis however it is sharded, so the sums are
global (XLA inserts the all-reduce), which is what synchronous SGD on one big batch would compute.

`ConsistentLoss.from_config` reads the config once; the loss itself takes plain values.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from conret_jax.core import losses
from conret_jax.stages import Stages


@dataclasses.dataclass(frozen=True)
class ConsistentLoss:
  """Eq. 1 + Eq. 2 (RetinaNet's loss when `stages` has one term of each)."""

  stages: Stages = Stages()
  focal_alpha: float = 0.25
  focal_gamma: float = 2.0
  smooth_l1_beta: float = 0.11
  box_loss_weight: float = 1.0

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'ConsistentLoss':
    lc = config.loss
    return cls(
      stages=Stages.from_config(config),
      focal_alpha=float(lc.focal_alpha),
      focal_gamma=float(lc.focal_gamma),
      smooth_l1_beta=float(lc.smooth_l1_beta),
      box_loss_weight=float(lc.box_loss_weight),
    )

  def __call__(self, outputs: dict, anchors: jax.Array, batch) -> tuple[jax.Array, dict]:
    """The loss of the model's outputs on a batch.

    Args:
      outputs: the model's {'cls_logits': tuple of [B, A, K], 'box_deltas': tuple of [B, A, 4]} (float32).
      anchors: [A, 4] regular anchors of the input size.
      batch: the training batch (boxes, classes, valid, crowd; see `Stages.targets`).
    Returns:
      (scalar float32 loss, metrics): cls_loss_<s>, box_loss_<s> (each already normalized and weighted as it enters
      the loss) and num_pos_<s> (global positive counts) per stage, and loss.
    """
    st = self.stages
    cls_logits, box_deltas = outputs['cls_logits'], outputs['box_deltas']
    if len(box_deltas) < st.num_reg_terms:
      raise ValueError(f'the model predicts {len(box_deltas)} regression stages; the loss needs {st.num_reg_terms}')
    per_stage = st.targets(anchors, box_deltas, batch)
    metrics = {f'num_pos_{s}': jnp.sum(t['num_positives']) for s, t in enumerate(per_stage)}
    total = jnp.zeros((), jnp.float32)
    n_cls_norm = losses.normalizer(metrics['num_pos_0'])
    # Terms that score the same classifier share one focal-loss evaluation (Figure 4(d): all of them).
    classifier_of = [min(s, len(cls_logits) - 1) for s in range(st.num_cls_terms)]
    for c in sorted(set(classifier_of)):
      terms = [s for s in range(st.num_cls_terms) if classifier_of[s] == c]
      sums = losses.classification_losses(
        cls_logits[c].astype(jnp.float32),
        [per_stage[s]['cls_labels'] for s in terms],
        alpha=self.focal_alpha,
        gamma=self.focal_gamma,
      )
      for s, term_sum in zip(terms, sums):
        metrics[f'cls_loss_{s}'] = (1.0 if s == 0 else st.alpha) * term_sum / n_cls_norm
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
