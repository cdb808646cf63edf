"""How the network's convolutions reach the compiler (config.model.conv_lowering).

XLA:CPU runs a stride-1 kxk convolution well in all three directions (forward, input gradient, kernel gradient),
but two kinds slowly: the kernel gradient of a 1x1 convolution, which it treats as a convolution with a window as
large as the feature map, and every gradient of a strided convolution. Both are plain matrix products in disguise:

  1x1, stride s   y = x[:, ::s, ::s] @ W                         (W: [C, O])
  kxk, stride s   y = patches(x) @ W,  patches: [B, Ho, Wo, k*k*C] (im2col: the k*k shifted, strided views of x)

and their gradients are matrix products too (plus the transpose of slicing, which is padding). On the 2-core AMD EPYC
dev box, 2026-12-02, forward + both gradients at batch 2, float32 (`bench/conv_lowering.py` prints this table):

  conv                              XLA conv   as matmul
  1x1 256->512, 64x64, stride 1       62 ms      23 ms
  1x1 256->512, 128x128, stride 2    149 ms      45 ms
  3x3 128->128, 128x128, stride 2     79 ms      50 ms
  3x3 512->512, 32x32, stride 2       35 ms      24 ms
  3x3 256->256, 64x64, stride 1      106 ms     135 ms   (left to XLA)

Lowerings:
  'xla'     every convolution is lax.conv_general_dilated (what GPUs and TPUs want: cuDNN / the TPU's conv units)
  'matmul'  1x1 and strided convolutions as matrix products as above; stride-1 kxk ones stay XLA convolutions
  'auto'    'matmul' on the CPU backend, 'xla' elsewhere (resolved when the model is built)
The result is the same convolution; only the order of float additions differs, as between any two conv algorithms.
Parameters and their layout do not change, so a checkpoint or imported weights work under every lowering.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
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


def _is_plain(dimension_numbers, lhs_dilation, rhs_dilation, feature_group_count, padding) -> bool:
  """True for the convolutions this module lowers: NHWC/HWIO, no dilation, no groups, explicit padding."""
  dn = dimension_numbers
  nhwc = dn is not None and tuple(dn.lhs_spec) == _NHWC.lhs_spec and tuple(dn.rhs_spec) == _NHWC.rhs_spec
  nhwc = nhwc and tuple(dn.out_spec) == _NHWC.out_spec
  undilated = all(d == 1 for d in (lhs_dilation or ())) and all(d == 1 for d in (rhs_dilation or ()))
  return nhwc and undilated and feature_group_count == 1 and not isinstance(padding, str)


def _patches(x, kernel_hw, strides, padding):
  """im2col of NHWC `x`: [B, Ho, Wo, kh*kw*C], taps in the kernel's (row, column) order, channels last."""
  (kh, kw), (sh, sw) = kernel_hw, strides
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  taps = [x[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw] for i in range(kh) for j in range(kw)]
  return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


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
  """lax.conv_general_dilated's signature (flax's Conv calls it so), with 1x1 and strided convolutions computed as
  matrix products.

  lhs [B, H, W, C] (NHWC), rhs [kh, kw, C, O] (HWIO) -> [B, Ho, Wo, O]. Anything else (other layouts, dilation,
  groups, string padding) and stride-1 convolutions larger than 1x1 go to lax.conv_general_dilated unchanged.
  """
  kh, kw = rhs.shape[:2] if rhs.ndim == 4 else (0, 0)
  strided = any(s != 1 for s in window_strides)
  if not _is_plain(dimension_numbers, lhs_dilation, rhs_dilation, feature_group_count, padding) or not (
    (kh, kw) == (1, 1) or strided
  ):
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
  patches = _patches(lhs, (kh, kw), tuple(window_strides), padding)
  kernel = rhs.reshape(kh * kw * rhs.shape[2], rhs.shape[3])
  return lax.dot_general(
    patches,
    kernel,
    (((3,), (0,)), ((), ())),
    precision=precision,
    preferred_element_type=preferred_element_type,
  )


def conv_function(lowering: str):
  """The function flax's Conv should call for a resolved lowering ('xla' or 'matmul')."""
  return {'xla': lax.conv_general_dilated, 'matmul': matmul_conv}[lowering]
