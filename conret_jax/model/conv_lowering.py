"""How the network's convolutions reach the compiler (config.model.conv_lowering).

Two rewrites help XLA:CPU, each giving the same convolution and gradients up to float summation order (measured in
bench/RESULTS.md, "Train step": the R50 step and each convolution, before and after each rewrite):

- A 1x1 convolution is a matrix product: y = x[:, ::s, ::s] @ W, with W the kernel as a [C, O] matrix. XLA:CPU
  computes its kernel gradient as a convolution whose window is the whole feature map, which is slow; as a 2-D
  matrix product ([B*H*W, C] @ [C, O]) it is a plain GEMM (a 4-D product's kernel gradient runs behind a transpose
  of the output gradient).
- A padded stride-1 convolution (the 3x3s of the head, the FPN and the bottlenecks) keeps XLA's forward and input
  gradient, but its kernel gradient is computed on the input padded beforehand: a convolution with a whole-map
  window and no padding of its own, which XLA:CPU runs faster than the same convolution applying the padding, with
  the same result to the bit. Strided convolutions gained nothing this way and stay as they are.
Other rewrites were measured and not kept (im2col for strided convolutions, their backward as stride-1 convolutions
on the input's phases), so every other convolution stays an XLA convolution.

Lowerings:
  'xla'     every convolution is lax.conv_general_dilated (what GPUs and TPUs want: cuDNN / the TPU's conv units)
  'matmul'  the CPU lowering: both rewrites above, every other convolution lax.conv_general_dilated
  'auto'    'matmul' on the CPU backend, 'xla' elsewhere (resolved when the model is built)
Parameters and their layout do not change, so a checkpoint or imported weights work under every lowering.
"""

import functools
from collections.abc import Sequence

import jax
from jax import lax

CONV_LOWERINGS = ('auto', 'xla', 'matmul')
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def resolve(lowering: str, backend: str | None = None) -> str:
  """'xla' or 'matmul' for config.model.conv_lowering on `backend` (default: jax.default_backend())."""
  if lowering not in CONV_LOWERINGS:
    raise ValueError(f'model.conv_lowering must be one of {CONV_LOWERINGS}, got {lowering!r}')
  if lowering != 'auto':
    return lowering
  return 'matmul' if (backend or jax.default_backend()) == 'cpu' else 'xla'


def _rewritable(dimension_numbers, padding, lhs_dilation, rhs_dilation, feature_group_count) -> bool:
  """NHWC/HWIO, explicit non-negative padding, no dilation or groups: the convolutions this module may rewrite."""
  dn = dimension_numbers
  if dn is None or (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) != tuple(_NHWC):
    return False
  if isinstance(padding, str) or any(lo < 0 or hi < 0 for lo, hi in padding):
    return False
  undilated = all(d == 1 for d in (lhs_dilation or ())) and all(d == 1 for d in (rhs_dilation or ()))
  return undilated and feature_group_count == 1


def _xla_conv(lhs, rhs, padding, precision):
  return lax.conv_general_dilated(lhs, rhs, (1, 1), padding, dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_padded_kernel_grad(lhs, rhs, padding, precision):
  """lhs [B, H, W, C], rhs [kh, kw, C, O] -> [B, H', W', O]: XLA's stride-1 convolution; see the custom gradient."""
  return _xla_conv(lhs, rhs, padding, precision)


def _conv_padded_kernel_grad_fwd(lhs, rhs, padding, precision):
  return _xla_conv(lhs, rhs, padding, precision), (lhs, rhs)


def _conv_padded_kernel_grad_bwd(padding, precision, residuals, g):
  """Input gradient as XLA differentiates it; kernel gradient dW[i, j, c, o] = sum_{b,y,x} x_pad[b, y+i, x+j, c]
  g[b, y, x, o] as a convolution of the padded input (batch dim C, feature dim B) by g (window H' x W') with no
  padding of its own, which XLA:CPU runs faster (module docstring)."""
  lhs, rhs = residuals
  # The transpose of the (linear in lhs) convolution, not jax.vjp: a vjp would trace the forward convolution again,
  # dead under jit but counted by conret_jax.flops.
  (d_lhs,) = jax.linear_transpose(lambda x: _xla_conv(x, rhs, padding, precision), lhs)(g)
  pad_h, pad_w = padding
  x_pad = lax.pad(lhs, lax.full((), 0, lhs.dtype), ((0, 0, 0), (*pad_h, 0), (*pad_w, 0), (0, 0, 0)))
  d_rhs = lax.conv_general_dilated(
    x_pad,
    g,
    (1, 1),
    'VALID',
    dimension_numbers=lax.ConvDimensionNumbers(lhs_spec=(3, 0, 1, 2), rhs_spec=(3, 0, 1, 2), out_spec=(2, 3, 0, 1)),
    precision=precision,
  )
  return d_lhs, d_rhs.astype(rhs.dtype)


_conv_padded_kernel_grad.defvjp(_conv_padded_kernel_grad_fwd, _conv_padded_kernel_grad_bwd)


def matmul_conv(
  lhs,
  rhs,
  window_strides: Sequence[int],
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count: int = 1,
  precision=None,
  preferred_element_type=None,
):
  """lax.conv_general_dilated's signature (flax's Conv calls it so), lowered for XLA:CPU (module docstring).

  lhs [B, H, W, C] (NHWC), rhs [kh, kw, C, O] (HWIO) -> [B, H', W', O]. Unpadded 1x1 convolutions are matrix
  products; padded stride-1 ones get the padded-input kernel gradient; every other convolution (strides, other
  layouts, dilation, groups) goes to lax.conv_general_dilated unchanged.
  """
  if _rewritable(dimension_numbers, padding, lhs_dilation, rhs_dilation, feature_group_count):
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if rhs.shape[:2] == (1, 1) and padding == ((0, 0), (0, 0)):
      return _matmul_1x1(lhs, rhs, window_strides, precision, preferred_element_type)
    if tuple(window_strides) == (1, 1) and preferred_element_type is None and lhs.dtype == rhs.dtype:
      return _conv_padded_kernel_grad(lhs, rhs, padding, precision)
  return lax.conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )


def _matmul_1x1(lhs, rhs, window_strides, precision, preferred_element_type):
  """lhs [B, H, W, C], rhs [1, 1, C, O] -> [B, ceil(H / sh), ceil(W / sw), O] as one 2-D matrix product."""
  sh, sw = window_strides
  x = lhs[:, ::sh, ::sw] if (sh, sw) != (1, 1) else lhs
  # A 2-D product, not a 4-D one: the kernel gradient is then x^T g with one contracting dimension, for which
  # XLA:CPU emits a plain GEMM; with (B, H, W) contracted it first transposed g, about 3x slower (RESULTS.md).
  y = lax.dot_general(
    x.reshape(-1, x.shape[3]),
    rhs.reshape(rhs.shape[2], rhs.shape[3]),
    (((1,), (0,)), ((), ())),
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  return y.reshape(x.shape[:3] + (rhs.shape[3],))


def conv_function(lowering: str):
  """The function flax's Conv should call for a resolved lowering ('xla' or 'matmul')."""
  return {'xla': lax.conv_general_dilated, 'matmul': matmul_conv}[lowering]
