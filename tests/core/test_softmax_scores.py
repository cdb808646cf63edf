"""foreground_logits: the sigmoid of each per-class logit is that class's softmax probability (index 0 the background),
to float32 precision, against float64 NumPy, also where a class takes all the mass or none."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conret_jax.core.softmax_scores import foreground_logits


def softmax64(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize('spread', [0.1, 3.0, 30.0])
def test_sigmoid_is_the_softmax_probability(spread):
  rng = np.random.default_rng(0)
  z = (rng.standard_normal((3, 500, 8)) * spread).astype(np.float32)
  x = jax.jit(foreground_logits)(z)
  assert x.shape == (3, 500, 7) and x.dtype == jnp.float32
  got = np.asarray(jax.nn.sigmoid(x), np.float64)
  want = softmax64(z)[..., 1:]
  # float32 precision: a few ulps of each probability, and the rounding of its logit (exp turns an error of one ulp
  # of x into a relative one of |x| * 2**-24: 60 for p = 1e-26 gives 4e-6), or the smallest normal where it underflows.
  tolerance = 2**-24 * (8 + 2 * np.abs(np.asarray(x, np.float64))) * want + 1e-37
  assert np.all(np.abs(got - want) <= tolerance), np.max(np.abs(got - want) / tolerance)
  # The logit itself, log(p / (1 - p)) = z_k - log(sum_{j != k} exp z_j) in float64, to float32 rounding of the
  # logits' size: no cancellation where p is near 1.
  z64 = z.astype(np.float64)
  others = [np.log(np.sum(np.exp(np.delete(z64, k, axis=-1)), axis=-1)) for k in range(1, 8)]
  logit = z64[..., 1:] - np.stack(others, axis=-1)
  np.testing.assert_allclose(np.asarray(x, np.float64), logit, rtol=0, atol=2**-21 * max(4.0, np.abs(z).max()))


def test_extremes():
  z = np.array(
    [
      [0.0, 200.0, 0.0, 0.0],  # class 0 takes all the mass: p = 1 in float32, logit 200 - log 3 (not inf)
      [0.0, 0.0, 0.0, 0.0],  # uniform: p = 1/4, logit log(1/3)
      [50.0, 50.0, -50.0, 10.0],  # a tie for the maximum with the background
      [-1e4, 3.0, -1e4, 3.0],  # dead units (the importer's class 0) are exactly 0
    ],
    np.float32,
  )
  x = np.asarray(foreground_logits(z))
  np.testing.assert_allclose(x[0, 0], 200.0 - np.log(3), rtol=1e-6)
  np.testing.assert_allclose(x[1], np.log(1 / 3), rtol=1e-6)
  np.testing.assert_allclose(x[2, 0], 0.0, atol=1e-6)  # p = 1/2 against the background's equal logit
  assert np.asarray(jax.nn.sigmoid(x[3, 1])) == 0.0 and np.isclose(float(jax.nn.sigmoid(x[3, 0])), 0.5)
  got = np.asarray(jax.nn.sigmoid(jnp.asarray(x)), np.float64)
  np.testing.assert_allclose(got, softmax64(z)[:, 1:], rtol=4e-6, atol=1e-37)
  assert np.isnan(np.asarray(foreground_logits(np.array([[0.0, np.nan, 1.0]], np.float32)))).any()
  # Logits of -inf: probability 0 (x = -inf), and the one class left takes all (x = +inf).
  assert np.asarray(foreground_logits(np.array([[-np.inf, 5.0, -np.inf]], np.float32))).tolist() == [[np.inf, -np.inf]]
