"""model/pooling.py's max pool: nn.max_pool's values, and a gradient that routes to each window's first maximum."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conret_jax.model import pooling


def numpy_max_pool_grad(x, g, window, stride, padding):
  """dL/dx of a -inf-padded max pool, each output's gradient sent to its window's first maximum (row-major)."""
  (top, bottom), (left, right) = padding
  xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=-np.inf)
  dxp = np.zeros_like(xp, dtype=np.float64)
  b, ho, wo, c = g.shape
  for n in range(b):
    for oy in range(ho):
      for ox in range(wo):
        for ch in range(c):
          win = xp[n, oy * stride : oy * stride + window, ox * stride : ox * stride + window, ch]
          iy, ix = np.unravel_index(np.argmax(win), win.shape)  # argmax: the first maximum, row-major
          dxp[n, oy * stride + iy, ox * stride + ix, ch] += g[n, oy, ox, ch]
  return dxp[:, top : top + x.shape[1], left : left + x.shape[2]]


CASES = [  # window, stride, padding, input height and width
  (2, 2, ((0, 0), (0, 0)), 6, 8),  # VGG's pools
  (2, 2, ((0, 1), (0, 1)), 7, 5),  # ceil mode: an odd side padded at the end
  (3, 1, ((1, 1), (1, 1)), 5, 6),  # SSD's pool5: overlapping windows
  (3, 2, ((1, 1), (1, 1)), 9, 7),  # the ResNet stem's
]


@pytest.mark.parametrize('window,stride,padding,h,w', CASES)
def test_values_and_gradient_match_numpy(window, stride, padding, h, w):
  rng = np.random.default_rng(0)
  x = rng.integers(-3, 4, size=(2, h, w, 3)).astype(np.float32)  # few values: many ties within a window
  y = pooling.max_pool(jnp.asarray(x), window, stride, padding)
  np.testing.assert_array_equal(y, nn.max_pool(jnp.asarray(x), (window, window), (stride, stride), padding))
  g = rng.normal(size=y.shape).astype(np.float32)
  _, vjp = jax.vjp(lambda v: pooling.max_pool(v, window, stride, padding), jnp.asarray(x))
  (dx,) = vjp(jnp.asarray(g))
  np.testing.assert_allclose(dx, numpy_max_pool_grad(x, g, window, stride, padding), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('window,stride,padding,h,w', CASES)
def test_gradient_equals_lax_on_distinct_values(window, stride, padding, h, w):
  """Without ties the maximum is unique, so lax's select_and_scatter and ours must agree; to the bit when windows do
  not overlap (one term per input)."""
  x = jnp.asarray(np.random.default_rng(1).permutation(2 * h * w * 3).reshape(2, h, w, 3).astype(np.float32))
  fn = lambda v: nn.max_pool(v, (window, window), (stride, stride), padding)  # noqa: E731
  y, lax_vjp = jax.vjp(fn, x)
  g = jnp.asarray(np.random.default_rng(2).normal(size=y.shape).astype(np.float32))
  _, our_vjp = jax.vjp(lambda v: pooling.max_pool(v, window, stride, padding), x)
  if stride >= window:
    np.testing.assert_array_equal(our_vjp(g)[0], lax_vjp(g)[0])
  else:
    np.testing.assert_allclose(our_vjp(g)[0], lax_vjp(g)[0], rtol=1e-6, atol=1e-6)


def test_bfloat16_keeps_its_dtype():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 4, 4, 2)), jnp.bfloat16)
  dx = jax.grad(lambda v: pooling.max_pool(v, 2, 2, ((0, 0), (0, 0))).astype(jnp.float32).sum())(x)
  assert dx.dtype == jnp.bfloat16 and float(dx.astype(jnp.float32).sum()) == 8.0  # one unit per window and channel


def test_lowering_picks_the_function():
  assert pooling.max_pool_function('matmul') is pooling.max_pool
  x = jnp.ones((1, 2, 2, 1))
  assert pooling.max_pool_function('xla')(x, 2, 2, ((0, 0), (0, 0))).shape == (1, 1, 1, 1)
  with pytest.raises(KeyError):
    pooling.max_pool_function('cudnn')
