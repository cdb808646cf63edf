"""RetinaNet losses: sigmoid focal loss for classification, smooth-L1 for box regression, summed.

Losses are SUMS; the caller divides by normalizer(number of positives), as RetinaNet does (the paper's Eq. 1-2 use
the same normalization for every term). Everything is computed in float32 whatever the logits' dtype.

The focal loss is the paper's (Lin et al.) and torchvision.ops.sigmoid_focal_loss's: alpha_t = alpha for
targets 1 and 1 - alpha for targets 0, times (1 - p_t)^gamma. Training uses `classification_losses`: each logit's
exponential and logarithm are evaluated once for both targets, so the terms of Eq. 1 that score the same logits
share them, and its gradient is written by hand, one elementwise pass, where autodiff left a chain of [B, A, K]
intermediates that XLA recomputed inside each consumer (measured: bench/RESULTS.md, "Focal loss with a hand-written
gradient"). `focal_loss_parts` (log-sigmoids, autodiff) and `sigmoid_focal_loss` (optax's, for soft targets
too) are the same function elementwise; the tests check them against each other and against NumPy.
"""

import functools

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


def _focal_terms(x, alpha: float | None, gamma: float, slopes: bool):
  """Per-logit focal losses if the target were 1 and if it were 0, or (slopes=True) their derivatives, float32.

  One exp and one log1p per logit: e = exp(-|x|) gives both p = sigmoid(x) and 1 - p without cancellation, and
  log p = min(x, 0) - log1p(e), log(1 - p) = min(-x, 0) - log1p(e). With L1 = -a1 (1-p)^g log p and
  L0 = -a0 p^g log(1-p), and dp/dx = p (1-p):
    dL1/dx = a1 (1-p)^g (g p log p - (1-p)),   dL0/dx = a0 p^g (p - g (1-p) log(1-p)).
  """
  a_pos, a_neg = (1.0, 1.0) if alpha is None or alpha < 0 else (alpha, 1.0 - alpha)
  e = jnp.exp(-jnp.abs(x))
  r = 1.0 / (1.0 + e)
  nonneg = x >= 0
  p, q = jnp.where(nonneg, r, e * r), jnp.where(nonneg, e * r, r)
  log1p_e = jnp.log1p(e)
  log_p, log_q = jnp.minimum(x, 0.0) - log1p_e, jnp.minimum(-x, 0.0) - log1p_e
  if float(gamma).is_integer():  # the usual gamma = 2: products, not pow
    q_g, p_g = jax.lax.integer_pow(q, int(gamma)), jax.lax.integer_pow(p, int(gamma))
  else:
    q_g, p_g = jnp.power(q, gamma), jnp.power(p, gamma)
  if slopes:
    return a_pos * q_g * (gamma * p * log_p - q), a_neg * p_g * (p - gamma * q * log_q)
  return -a_pos * q_g * log_p, -a_neg * p_g * log_q


def _select(pos, neg, cls_labels):
  """[B, A, K] pos where the label is the class, neg elsewhere, 0 on IGNORE anchors."""
  onehot = cls_labels[..., None] == jnp.arange(pos.shape[-1], dtype=cls_labels.dtype)
  return jnp.where((cls_labels != IGNORE)[..., None], jnp.where(onehot, pos, neg), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _focal_sums(logits, label_sets, alpha, gamma):
  pos, neg = _focal_terms(logits.astype(jnp.float32), alpha, gamma, slopes=False)
  return tuple(jnp.sum(_select(pos, neg, labels)) for labels in label_sets)


def _focal_sums_fwd(logits, label_sets, alpha, gamma):
  return _focal_sums(logits, label_sets, alpha, gamma), (logits, label_sets)


def _focal_sums_bwd(alpha, gamma, residuals, cotangents):
  # The gradient is one elementwise pass from the logits, so it is written once and read by the head's backward,
  # instead of autodiff's chain of exp/log intermediates that XLA recomputes inside each consumer.
  logits, label_sets = residuals
  d_pos, d_neg = _focal_terms(logits.astype(jnp.float32), alpha, gamma, slopes=True)
  grad = sum(c * _select(d_pos, d_neg, labels) for c, labels in zip(cotangents, label_sets))
  return grad.astype(logits.dtype), tuple(None for _ in label_sets)


_focal_sums.defvjp(_focal_sums_fwd, _focal_sums_bwd)


def classification_losses(logits, label_sets, *, alpha: float, gamma: float) -> list[jnp.ndarray]:
  """Focal-loss sums of ONE prediction against several label sets, one scalar per set.

  The consistent terms of Eq. 1 score the same logits against the labels of the regular and of the refined
  anchors: the exponential and logarithm are computed once per logit (forward, and again for the gradient) and
  each set only selects and sums. The gradient is written by hand (`_focal_terms`); tests compare it with
  autodiff of `focal_loss_parts`.

  Args:
    logits: [B, A, K] class logits (any float dtype; computed in float32, gradient in the logits' dtype).
    label_sets: sequence of [B, A] int32: class index for positives, BACKGROUND (all-zero target) or IGNORE.
  Returns: list of scalar float32 sums over the non-ignored anchors and all classes.
  """
  return list(_focal_sums(logits, tuple(label_sets), alpha, gamma))


def classification_losses_autodiff(logits, label_sets, *, alpha: float, gamma: float) -> list[jnp.ndarray]:
  """`classification_losses` through autodiff of `focal_loss_parts`: the reference its hand-written gradient is
  tested against, and the baseline of bench/focal_gradient.py. Same arguments and values."""
  pos, neg = focal_loss_parts(logits, alpha, gamma)
  return [jnp.sum(_select(pos, neg, labels)) for labels in label_sets]


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
