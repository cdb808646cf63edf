"""Max pooling for the CPU lowering (model.conv_lowering='matmul'): XLA's forward, a gradient XLA:CPU runs cheaply.

lax differentiates a max pool into select_and_scatter, which XLA:CPU rewrites into a reduce-window over (value,
index) tuples with one index array (iota) per spatial dimension and more, then a scatter. On the SSD300 VGG-16
network (pool3 at 75x75x256, pool4, pool5) the gradient here makes forward + backward a few percent faster on CPU
(bench/max_pool_gradient.py; its figures in bench/RESULTS.md).

The gradient routes each output's gradient to the first maximum of its window in row-major order, the element
select_and_scatter picks (lax's max pool selects with >=, keeping the earlier element on ties): for each of the
k x k window offsets, a strided slice of the -inf-padded input is compared with the maximum of those same slices,
and the gradients it takes are put back in the input's shape by a strided lax.pad. Same values; the same gradient
to the bit when windows do not overlap (stride >= window: every input gets at most one term), else up to float
summation order. A window with a NaN passes no gradient (select_and_scatter routes it somewhere; a non-finite step
is dropped anyway).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _forward(x, window: int, stride: int, padding):
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, window: int, stride: int, padding):
  """x [B, H, W, C] -> [B, H', W', C]: nn.max_pool with a square window and stride, padding ((top, bottom), (left,
  right)) of -inf; the gradient as the module docstring says."""
  return _forward(x, window, stride, padding)


def _max_pool_fwd(x, window, stride, padding):
  return _forward(x, window, stride, padding), x


def _max_pool_bwd(window, stride, padding, x, g):
  (top, bottom), (left, right) = padding
  xp = lax.pad(x, jnp.array(-jnp.inf, x.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
  b, hp, wp, c = xp.shape
  _, ho, wo, _ = g.shape
  span_h, span_w = stride * (ho - 1) + 1, stride * (wo - 1) + 1  # rows and columns one offset's slice covers
  offsets = [(i, j) for i in range(window) for j in range(window)]
  values = [lax.slice(xp, (0, i, j, 0), (b, i + span_h, j + span_w, c), (1, stride, stride, 1)) for i, j in offsets]
  # Each window's maximum from these same slices, not the forward's output: XLA may recompute x (a norm and a ReLU,
  # say) in each fusion that reads it, with different rounding, and a window whose forward maximum equals none of the
  # values seen here would pass no gradient.
  y = functools.reduce(jnp.maximum, values)
  zero = jnp.array(0, g.dtype)
  taken = jnp.zeros(g.shape, bool)
  dxp = None
  for (i, j), v in zip(offsets, values):
    hit = (v == y) & ~taken
    taken = taken | hit
    back = ((0, 0, 0), (i, hp - i - span_h, stride - 1), (j, wp - j - span_w, stride - 1), (0, 0, 0))
    term = lax.pad(jnp.where(hit, g, zero), zero, back)
    dxp = term if dxp is None else dxp + term
  return (dxp[:, top : top + x.shape[1], left : left + x.shape[2]],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_function(lowering: str):
  """max_pool(x, window, stride, padding) for a resolved conv lowering: this module's under 'matmul' (CPU),
  nn.max_pool's under 'xla' (GPUs and TPUs differentiate it well as it is)."""
  return {'xla': _forward, 'matmul': max_pool}[lowering]
