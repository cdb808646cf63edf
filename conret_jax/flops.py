"""FLOPs of a function, counted from its traced computation: the same number on every platform and device count.

XLA's own counts are not usable for utilization: on GPU the compiled cost analysis leaves out the cuDNN convolutions
(0.038 TFLOP for a train step of about 9) and the lowered one reports nothing, and a sharded program's counts are
per device. So we count what dominates a convolutional detector's arithmetic ourselves: every convolution and
matrix product in the jaxpr of the function applied to the GLOBAL inputs, at two FLOPs per multiply-add (the
convention of MLPerf and of vendors' peak numbers). Backward passes appear in the jaxpr of a value_and_grad as
convolutions of their own, so a train step's count includes them. Elementwise work (activations, norms, the losses,
matching) is left out: for R50-FPN it is well under 1% of the total. Loops are counted by their trip count where
it is static (scan) and once where it is not (while: NMS, which has no convolutions).
"""

import math
from collections.abc import Callable

import jax
from jax.extend import core as jex_core


def _conv_flops(eqn) -> float:
  """2 x MACs of one conv_general_dilated: every output element sums kernel window x input features per group."""
  out = eqn.outvars[0].aval.shape
  rhs = eqn.invars[1].aval.shape
  rhs_spec = eqn.params['dimension_numbers'].rhs_spec  # (out feature, in feature, spatial...)
  window = math.prod(rhs[d] for d in rhs_spec[2:])
  in_per_group = rhs[rhs_spec[1]]  # the kernel's input-feature dim already is the per-group count
  # The input gradient of a strided convolution is a convolution over the output gradient with zeros inserted between
  # its elements (lhs_dilation = stride): only 1 in prod(lhs_dilation) of its window positions multiplies a value.
  inserted_zeros = math.prod(eqn.params.get('lhs_dilation') or (1,))
  return 2.0 * math.prod(out) * window * in_per_group / inserted_zeros


def _dot_flops(eqn) -> float:
  """2 x MACs of one dot_general: batch x free dims of both sides x contracted dims."""
  (lhs_contract, _), (lhs_batch, _) = eqn.params['dimension_numbers']
  lhs = eqn.invars[0].aval.shape
  contracted = math.prod(lhs[d] for d in lhs_contract)
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted


def jaxpr_flops(jaxpr) -> float:
  """FLOPs of the convolutions and matrix products of a jaxpr, sub-computations included."""
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    elif name == 'dot_general':
      total += _dot_flops(eqn)
    inner = sum(jaxpr_flops(sub) for sub in jex_core.jaxprs_in_params(eqn.params))
    total += inner * (eqn.params.get('length', 1) if name == 'scan' else 1)
  return total


def count_flops(fn: Callable, *args) -> float:
  """FLOPs of `fn(*args)` (see the module docstring). Nothing runs or compiles: args may be arrays or
  jax.ShapeDtypeStruct, and should be the global (unsharded) inputs."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
