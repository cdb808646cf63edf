"""Softmax class scores as per-class logits, so that one post-processing (sigmoid scores, core/nms.py) serves a
softmax detector (SSD: K + 1 logits, index 0 the background) and a sigmoid one (RetinaNet) alike.

For foreground class k (softmax index k + 1), x_k = log p_k - log(1 - p_k), so sigmoid(x_k) = p_k exactly in real
arithmetic. Computed stably from the logits z: with m = max z and e_j = exp(z_j - m) (the largest is 1),
  x_k = (z_k - m) - log(sum_{j != k} e_j).
The sum over the others is S - e_k (S = sum_j e_j) for every k but the first argmax, where it is summed without
that term instead: S - e_k >= 1 elsewhere (the argmax's 1 is in it), so the subtraction loses at most a couple of
ulps, and the argmax's own sum, which can be tiny, is never a difference. A class that takes all the mass
(p = 1 in float32) gets +inf, one with none -inf (sigmoid 1 and 0); NaN stays NaN.
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
  shifted = z - jnp.max(z, axis=-1, keepdims=True)
  e = jnp.exp(shifted)
  first_max = jax.nn.one_hot(jnp.argmax(z, axis=-1), z.shape[-1], dtype=bool)
  others_of_max = jnp.sum(jnp.where(first_max, 0.0, e), axis=-1, keepdims=True)
  others = jnp.where(first_max, others_of_max, jnp.sum(e, axis=-1, keepdims=True) - e)
  return (shifted - jnp.log(others))[..., 1:]
