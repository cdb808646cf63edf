"""Softmax class scores as per-class logits, so that one post-processing (sigmoid scores, core/nms.py) serves a
softmax detector (SSD: K + 1 logits, index 0 the background) and a sigmoid one (RetinaNet) alike.

For foreground class k (softmax index k + 1), x_k = log p_k - log(1 - p_k), so sigmoid(x_k) = p_k exactly in real
arithmetic. Computed stably from the logits z: with m = max z and e_j = exp(z_j - m) (the largest is 1),
  x_k = (z_k - m) - log(sum_{j != k} e_j).
For every k but the first argmax the sum over the others is S - e_k (S = sum_j e_j), which is >= 1 (the argmax's 1
is in it), so the subtraction loses at most a couple of ulps. For the argmax it can be tiny (p near 1), so it is
never a difference: it is summed relative to the largest of the others, m2, as (m2 - m) + log(sum_{j != k}
exp(z_j - m2)), which neither cancels nor underflows. Logits of -inf give probability 0 (x = -inf); NaN stays NaN.
"""

import jax
import jax.numpy as jnp


def foreground_logits(logits) -> jax.Array:
  """Per-class logits of a softmax classifier.

  Args:
    logits: [..., K + 1] softmax logits, index 0 the background.
  Returns:
    [..., K] float32 x with sigmoid(x[..., k]) = softmax(logits)[..., k + 1].
  """
  z = jnp.asarray(logits, jnp.float32)
  m = jnp.max(z, axis=-1, keepdims=True)
  shifted = z - m
  e = jnp.exp(shifted)
  first_max = jax.nn.one_hot(jnp.argmax(z, axis=-1), z.shape[-1], dtype=bool)
  rest = jnp.where(first_max, -jnp.inf, z)  # the others of the argmax
  m2 = jnp.max(rest, axis=-1, keepdims=True)
  safe_m2 = jnp.where(jnp.isneginf(m2), 0.0, m2)  # all others -inf: their sum is 0, log -inf, x = +inf
  log_rest = (m2 - m) + jnp.log(jnp.sum(jnp.exp(rest - safe_m2), axis=-1, keepdims=True))
  log_others = jnp.where(first_max, log_rest, jnp.log(jnp.sum(e, axis=-1, keepdims=True) - e))
  return (shifted - log_others)[..., 1:]
