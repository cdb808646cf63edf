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


def test_gradient_with_its_input_computed_in_the_same_program():
  """Under jit x's producer (a GroupNorm and a ReLU here, a stem's layers) is fused into each of x's readers,
  and XLA:CPU may round it differently in each. The gradient must still reach every window's maximum: a version
  that compared x with the forward's output lost a third or more of the stem's parameter gradients here."""
  from conret_jax.model import layers

  class Stem(nn.Module):
    pool: object

    @nn.compact
    def __call__(self, x):
      x = nn.Conv(16, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False)(x)
      x = nn.relu(layers.Norm('gn', False)(x, True))
      return self.pool(x, 3, 2, ((1, 1), (1, 1)))

  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.uniform(-2, 2, (1, 100, 100, 3)).astype(np.float32))
  g = jnp.asarray(rng.normal(size=(1, 25, 25, 16)).astype(np.float32))
  lax_pool = pooling.max_pool_function('xla')  # nn.max_pool: lax's gradient
  params = Stem(lax_pool).init(jax.random.PRNGKey(0), x)

  def gradient(pool):
    module = Stem(pool)
    fn = jax.jit(lambda p: jax.vjp(lambda q: module.apply(q, x), p)[1](g)[0])
    # At XLA's full optimization, as real runs compile (the suite's level 0 does not round the fusions apart).
    return fn.lower(params).compile(compiler_options={'xla_backend_optimization_level': 3})(params)

  ours, reference = gradient(pooling.max_pool), gradient(lax_pool)
  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(reference)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))
