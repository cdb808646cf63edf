"""How the network's convolutions reach the compiler (config.model.conv_lowering).

A 1x1 convolution is a matrix product: y = x[:, ::s, ::s] @ W, with W the kernel as a [C, O] matrix. XLA:CPU
computes its kernel gradient as a convolution whose window is the whole feature map, which is slow; as a matrix
product it is fast. On the 2-core AMD EPYC dev box (2026-12-02), a 1x1 256->512 convolution at 64x64, batch 2,
forward and both gradients: 62 ms as an XLA convolution, 23 ms as a matrix product; at 128x128 with stride 2, 149 ms
and 45 ms. R50-FPN RetinaNet, whose bottlenecks are two-thirds 1x1 convolutions, takes about 18% less time per
training step at 512x512 (bench/RESULTS.md); making the product 2-D ([B*H*W, C] @ [C, O]) took another 10-13% off
that step, because XLA:CPU runs the kernel gradient of a 4-D product behind a transpose of the output gradient.
Lowering the strided 3x3 convolutions too (im2col) was measured and made both that step and the shapes demo's
slower, so they, like every other convolution, stay XLA convolutions.

Lowerings:
  'xla'     every convolution is lax.conv_general_dilated (what GPUs and TPUs want: cuDNN / the TPU's conv units)
  'matmul'  1x1 convolutions as matrix products, every other one lax.conv_general_dilated
  'auto'    'matmul' on the CPU backend, 'xla' elsewhere (resolved when the model is built)
The result is the same convolution; only the order of float additions differs, as between any two conv algorithms.
Parameters and their layout do not change, so a checkpoint or imported weights work under every lowering.
"""

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


def _is_plain_1x1(rhs, dimension_numbers, padding, lhs_dilation, rhs_dilation, feature_group_count) -> bool:
  """True for what this module lowers: an NHWC/HWIO 1x1 convolution without padding, dilation or groups."""
  dn = dimension_numbers
  if dn is None or (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) != tuple(_NHWC):
    return False
  unpadded = not isinstance(padding, str) and all(tuple(p) == (0, 0) for p in padding)
  undilated = all(d == 1 for d in (lhs_dilation or ())) and all(d == 1 for d in (rhs_dilation or ()))
  return rhs.shape[:2] == (1, 1) and unpadded and undilated and feature_group_count == 1


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
  """lax.conv_general_dilated's signature (flax's Conv calls it so), with 1x1 convolutions as matrix products.

  lhs [B, H, W, C] (NHWC), rhs [1, 1, C, O] (HWIO) -> [B, ceil(H / sh), ceil(W / sw), O]. Every other convolution
  (larger kernels, padding, other layouts, dilation, groups) goes to lax.conv_general_dilated unchanged.
  """
  if not _is_plain_1x1(rhs, dimension_numbers, padding, lhs_dilation, rhs_dilation, feature_group_count):
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
