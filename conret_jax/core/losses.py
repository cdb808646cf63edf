"""RetinaNet losses: sigmoid focal loss for classification, smooth-L1 for box regression, summed.

Losses are SUMS; the caller divides by normalizer(number of positives), as RetinaNet does (the paper's Eq. 1-2 use
the same normalization for every term). Everything is computed in float32 whatever the logits' dtype.

The focal loss is the paper's (Lin et al.) and torchvision.ops.sigmoid_focal_loss's: alpha_t = alpha for
targets 1 and 1 - alpha for targets 0, times (1 - p_t)^gamma. Training uses `focal_loss_parts` (log-sigmoids, stable
for extreme logits), which evaluates each logit once for both targets, so the terms of Eq. 1 that score the same
logits share it (`classification_losses`). `sigmoid_focal_loss` (optax's, for soft targets too) is the same
function elementwise; the tests check one against the other.
"""

import jax
import jax.numpy as jnp
import optax

from conret_jax.core.constants import IGNORE


def sigmoid_focal_loss(logits, targets, alpha: float | None = 0.25, gamma: float = 2.0) -> jnp.ndarray:
  """Elementwise focal loss: logits and targets (0/1, or soft in [0, 1]) of the same shape -> float32 loss.

  alpha None (or negative, torchvision's convention) disables the alpha weighting.
  """
  if alpha is not None and alpha < 0:
    alpha = None
  logits = jnp.asarray(logits, jnp.float32)
  return optax.sigmoid_focal_loss(logits, jnp.asarray(targets, jnp.float32), alpha=alpha, gamma=gamma)


def smooth_l1(x, beta: float) -> jnp.ndarray:
  """Elementwise smooth-L1: 0.5 x^2 / beta where |x| < beta, else |x| - 0.5 beta. beta = 0 gives |x| (L1)."""
  x = jnp.asarray(x, jnp.float32)
  ax = jnp.abs(x)
  # The safe divisor keeps the unused branch (and its gradient) finite when beta is 0.
  safe_beta = jnp.where(beta > 0, beta, 1.0)
  return jnp.where(ax < beta, 0.5 * x * x / safe_beta, ax - 0.5 * beta)


def focal_loss_parts(logits, alpha: float | None = 0.25, gamma: float = 2.0) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Elementwise focal loss of each logit if its target were 1 (pos) and if it were 0 (neg), float32.

  Same values as sigmoid_focal_loss with 0/1 targets; log-sigmoids keep it finite for extreme logits.
  """
  x = jnp.asarray(logits, jnp.float32)
  log_p, log_q = jax.nn.log_sigmoid(x), jax.nn.log_sigmoid(-x)  # log p, log (1 - p)
  a_pos, a_neg = (1.0, 1.0) if alpha is None or alpha < 0 else (alpha, 1.0 - alpha)
  pos = -a_pos * jnp.exp(gamma * log_q) * log_p
  neg = -a_neg * jnp.exp(gamma * log_p) * log_q
  return pos, neg


def classification_losses(logits, label_sets, *, alpha: float, gamma: float) -> list[jnp.ndarray]:
  """Focal-loss sums of ONE prediction against several label sets, one scalar per set.

  The consistent terms of Eq. 1 score the same logits against the labels of the regular and of the refined
  anchors: the exponentials and logarithms are computed once and each set only selects and sums.

  Args:
    logits: [B, A, K] class logits.
    label_sets: sequence of [B, A] int32: class index for positives, BACKGROUND (all-zero target) or IGNORE.
  Returns: list of scalar float32 sums over the non-ignored anchors and all classes.
  """
  num_classes = logits.shape[-1]
  pos, neg = focal_loss_parts(logits, alpha, gamma)
  sums = []
  for cls_labels in label_sets:
    onehot = cls_labels[..., None] == jnp.arange(num_classes, dtype=cls_labels.dtype)
    sums.append(jnp.sum(jnp.where((cls_labels != IGNORE)[..., None], jnp.where(onehot, pos, neg), 0.0)))
  return sums


def classification_loss(logits, cls_labels, *, alpha: float, gamma: float) -> jnp.ndarray:
  """Focal loss summed over all classes of the non-ignored anchors.

  Args:
    logits: [B, A, K] class logits.
    cls_labels: [B, A] int32: class index for positives, BACKGROUND (all-zero target) or IGNORE.
  Returns: scalar float32 sum.
  """
  return classification_losses(logits, [cls_labels], alpha=alpha, gamma=gamma)[0]


def box_loss(deltas, box_targets, positive, *, beta: float) -> jnp.ndarray:
  """Smooth-L1 between predicted and target offsets summed over the positive anchors.

  deltas, box_targets: [B, A, 4]; positive: [B, A] bool. Returns scalar float32 sum.
  """
  diff = jnp.asarray(deltas, jnp.float32) - jnp.asarray(box_targets, jnp.float32)
  return jnp.sum(jnp.where(positive[..., None], smooth_l1(diff, beta), 0.0))


def normalizer(count) -> jnp.ndarray:
  """The loss divisor: max(count, 1), so an image batch without positives does not divide by zero."""
  return jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)
