"""model.conv_lowering: 1x1 convolutions as matrix products, and padded stride-1 convolutions with their kernel
gradient on a pre-padded input, give the convolution (against a float64 NumPy one), the gradients of
lax.conv_general_dilated (and of a float64 NumPy reference), and a bottleneck block's and the FPN's outputs and
gradients; every other convolution is left to XLA."""

import jax
import jax.numpy as jnp
import model_reference as ref
import numpy as np
import pytest
from jax.extend import core as jex_core

from conret_jax import config_checks
from conret_jax.errors import ConfigError
from conret_jax.model import conv_lowering, resnet
from conret_jax.model import fpn as fpn_lib
from conret_jax.model.layers import Compute

DN = ('NHWC', 'HWIO', 'NHWC')


def _lax_dn(rank=4):
  return jax.lax.conv_dimension_numbers((1,) * rank, (1,) * rank, DN)


def _conv(fn, x, w, stride):
  k = w.shape[0]
  return fn(x, w, (stride, stride), ((k // 2, k // 2), (k // 2, k // 2)), dimension_numbers=_lax_dn())


# (kernel, stride, H, W): odd and even sides, so a strided 1x1 keeps the last row; stride-1 3x3 and 5x5 take the
# padded-input kernel gradient; strided 3x3 and 7x7 pass through to XLA.
CASES = [(1, 1, 9, 8), (1, 2, 9, 8), (1, 2, 8, 8), (3, 2, 9, 8), (7, 2, 11, 10), (3, 1, 9, 8), (5, 1, 7, 9)]


@pytest.mark.parametrize('kernel,stride,h,w', CASES)
def test_matmul_conv_is_the_convolution(kernel, stride, h, w):
  rng = np.random.default_rng(kernel * 10 + stride)
  x = rng.normal(size=(2, h, w, 5)).astype(np.float32)
  k = rng.normal(size=(kernel, kernel, 5, 6)).astype(np.float32)
  got = _conv(conv_lowering.matmul_conv, jnp.asarray(x), jnp.asarray(k), stride)
  want = ref.conv(x, np.transpose(k, (3, 2, 0, 1)), stride=stride)  # the reference takes torch's OIHW
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kernel,stride,h,w', CASES)
def test_matmul_conv_gradients_match_xla(kernel, stride, h, w):
  rng = np.random.default_rng(kernel * 10 + stride + 1)
  x = jnp.asarray(rng.normal(size=(2, h, w, 5)).astype(np.float32))
  k = jnp.asarray(rng.normal(size=(kernel, kernel, 5, 6)).astype(np.float32))
  cot = jnp.asarray(rng.normal(size=_conv(jax.lax.conv_general_dilated, x, k, stride).shape).astype(np.float32))

  def grads(fn):
    _, vjp = jax.vjp(lambda x, k: _conv(fn, x, k, stride), x, k)
    return vjp(cot)

  for got, want in zip(grads(conv_lowering.matmul_conv), grads(jax.lax.conv_general_dilated)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def _primitives(jaxpr):
  for eqn in _equations(jaxpr):
    yield eqn.primitive.name


def _equations(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs inside it."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jex_core.jaxprs_in_params(eqn.params):
      yield from _equations(sub)


def _lowered_to(call, x, k):
  """The conv and matrix-product primitives of call(x, k) and of its gradients."""
  grad = jax.grad(lambda x, k: jnp.sum(call(x, k)), argnums=(0, 1))
  names = set(_primitives(jax.make_jaxpr(grad)(x, k).jaxpr))
  return names & {'conv_general_dilated', 'dot_general'}


def test_which_convolutions_are_lowered():
  """Unpadded 1x1 convolutions (any stride): matrix products only, forward and backward. Everything else:
  lax.conv_general_dilated alone."""
  x, k = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
  dn, none = _lax_dn(), ((0, 0), (0, 0))
  mc = conv_lowering.matmul_conv
  for stride in (1, 2):
    assert _lowered_to(lambda x, k: mc(x, k[:1, :1], (stride, stride), none, dimension_numbers=dn), x, k) == {
      'dot_general'
    }
  unchanged = [
    lambda x, k: mc(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn),
    lambda x, k: mc(x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=dn),
    lambda x, k: mc(x, k[:1, :1], (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn),
    lambda x, k: mc(x, k[:1, :1], (2, 2), none, rhs_dilation=(2, 2), dimension_numbers=dn),
    lambda x, k: mc(x, k[:1, :1, :2], (1, 1), none, feature_group_count=2, dimension_numbers=dn),
    lambda x, k: mc(x, k[:1, :1], (1, 1), 'SAME', dimension_numbers=dn),
  ]
  for call in unchanged:
    assert _lowered_to(call, x, k) == {'conv_general_dilated'}


def test_products_are_two_dimensional():
  """The 1x1 products, forward and in both gradients, are 2-D: one contracting dimension each. XLA:CPU runs the
  kernel gradient of a 4-D product (B, H, W contracted) behind a transpose, about 3x slower (bench/RESULTS.md)."""
  x, k = jnp.ones((2, 6, 5, 4)), jnp.ones((1, 1, 4, 3))
  for stride in (1, 2):
    call = lambda x, k, s=stride: conv_lowering.matmul_conv(x, k, (s, s), ((0, 0), (0, 0)), dimension_numbers=_lax_dn())
    grad = jax.grad(lambda x, k: jnp.sum(call(x, k)), argnums=(0, 1))
    dots = [e for e in _equations(jax.make_jaxpr(grad)(x, k).jaxpr) if e.primitive.name == 'dot_general']
    assert len(dots) == 3  # forward, input gradient, kernel gradient
    for eqn in dots:
      (lhs_contract, rhs_contract), _ = eqn.params['dimension_numbers']
      assert [v.aval.ndim for v in eqn.invars] == [2, 2]
      assert len(lhs_contract) == len(rhs_contract) == 1


def _numpy_kernel_gradient(x, g, kernel, pads):
  """float64 dW[i, j, c, o] = sum_{b,y,x} x_pad[b, y+i, x+j, c] g[b, y, x, o] of a stride-1 convolution."""
  (top, bottom), (left, right) = pads
  xp = np.pad(x.astype(np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)))
  _, h, w, _ = g.shape
  return np.stack(
    [
      np.stack([np.einsum('byxc,byxo->co', xp[:, i : i + h, j : j + w], g.astype(np.float64)) for j in range(kernel)])
      for i in range(kernel)
    ]
  )


@pytest.mark.parametrize(
  'kernel,pads', [(3, ((1, 1), (1, 1))), (3, ((0, 0), (0, 0))), (3, ((2, 0), (1, 2))), (1, ((1, 1), (0, 1)))]
)
def test_padded_stride_1_kernel_gradient(kernel, pads):
  """Stride-1 convolutions with any non-negative padding (symmetric, none, uneven): the custom kernel gradient is a
  float64 NumPy one's, and the input gradient is lax's; the kernel gradient is a convolution with no padding of its
  own (what makes it fast on XLA:CPU), its input padded before it."""
  rng = np.random.default_rng(kernel + sum(map(sum, pads)))
  x = rng.normal(size=(2, 7, 6, 5)).astype(np.float32)
  k = rng.normal(size=(kernel, kernel, 5, 4)).astype(np.float32)
  call = lambda fn, x, k: fn(x, k, (1, 1), pads, dimension_numbers=_lax_dn())
  out = call(jax.lax.conv_general_dilated, jnp.asarray(x), jnp.asarray(k))
  g = rng.normal(size=out.shape).astype(np.float32)

  def grads(fn):
    return jax.vjp(lambda x, k: call(fn, x, k), jnp.asarray(x), jnp.asarray(k))[1](jnp.asarray(g))

  (dx, dk), (dx_lax, _) = grads(conv_lowering.matmul_conv), grads(jax.lax.conv_general_dilated)
  np.testing.assert_allclose(np.asarray(dk), _numpy_kernel_gradient(x, g, kernel, pads), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_lax), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(call(conv_lowering.matmul_conv, jnp.asarray(x), jnp.asarray(k))), out)

  grad_k = jax.grad(lambda k: jnp.sum(call(conv_lowering.matmul_conv, jnp.asarray(x), k) * g))
  jaxpr = jax.make_jaxpr(grad_k)(jnp.asarray(k)).jaxpr
  kernel_grads = [
    e for e in _equations(jaxpr) if e.primitive.name == 'conv_general_dilated' and e.outvars[0].aval.shape == k.shape
  ]
  assert len(kernel_grads) == 1
  assert all(tuple(p) == (0, 0) for p in kernel_grads[0].params['padding'])
  assert 'pad' in set(_primitives(jaxpr))


def test_padded_stride_1_keeps_bfloat16():
  """In bfloat16 the custom gradients keep the dtypes of lax's and agree with them to bfloat16 rounding."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 16)), jnp.bfloat16)
  k = jnp.asarray(rng.normal(size=(3, 3, 16, 8)) * 0.1, jnp.bfloat16)
  call = lambda fn, x, k: fn(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_lax_dn())
  g = jnp.asarray(rng.normal(size=(2, 8, 8, 8)), jnp.bfloat16)
  got = jax.vjp(lambda x, k: call(conv_lowering.matmul_conv, x, k), x, k)[1](g)
  want = jax.vjp(lambda x, k: call(jax.lax.conv_general_dilated, x, k), x, k)[1](g)
  for a, b in zip(got, want):
    assert a.dtype == b.dtype == jnp.bfloat16
    np.testing.assert_allclose(
      np.asarray(a, np.float32),
      np.asarray(b, np.float32),
      rtol=2e-2,
      atol=2e-2 * float(jnp.max(jnp.abs(b.astype(jnp.float32)))),
    )


def test_resolve():
  assert conv_lowering.resolve('auto', 'cpu') == 'matmul'
  assert conv_lowering.resolve('auto', 'gpu') == 'xla'
  assert conv_lowering.resolve('auto', 'tpu') == 'xla'
  assert conv_lowering.resolve('xla', 'cpu') == 'xla'
  assert conv_lowering.resolve('matmul', 'gpu') == 'matmul'
  with pytest.raises(ValueError, match='conv_lowering'):
    conv_lowering.resolve('im2col')
  with pytest.raises(ConfigError, match='config.model.conv_lowering'):
    config_checks.validate(ref.tiny_config(**{'model.conv_lowering': 'im2col'}))


def _block_and_fpn(lowering):
  """A strided bottleneck block (1x1 convs, a strided 1x1 projection shortcut) feeding the FPN's 1x1 laterals."""
  block = resnet.Bottleneck(8, 2, 'bn', Compute(lowering=lowering))
  fpn = fpn_lib.FPN(channels=16, min_level=3, max_level=5, compute=Compute(lowering=lowering))

  def apply(variables, x):
    c3 = block.apply(variables['block'], x, train=False)
    c4, c5 = c3[:, ::2, ::2], c3[:, ::4, ::4]
    return fpn.apply(variables['fpn'], (c3, c4, c5))

  def init(key, x):
    block_vars = block.init(key, x, train=False)
    c3 = block.apply(block_vars, x, train=False)
    return {'block': block_vars, 'fpn': fpn.init(key, (c3, c3[:, ::2, ::2], c3[:, ::4, ::4]))}

  return init, apply


def test_layers_are_the_same_under_both_lowerings():
  """Same parameter tree (a checkpoint loads under either lowering: flax's Conv makes the parameters, the lowering
  only computes with them), same outputs and gradients up to float summation order."""
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 16))
  init, apply = {}, {}
  for low in ('xla', 'matmul'):
    init[low], apply[low] = _block_and_fpn(low)
  variables = init['xla'](jax.random.key(0), x)
  assert jax.tree.structure(jax.eval_shape(lambda: init['matmul'](jax.random.key(0), x))) == jax.tree.structure(
    variables
  )

  def loss(variables, low):
    return sum(jnp.mean(jnp.sin(p)) for p in apply[low](variables, x))

  got = {low: jax.jit(jax.value_and_grad(loss), static_argnums=1)(variables, low) for low in ('xla', 'matmul')}
  np.testing.assert_allclose(float(got['matmul'][0]), float(got['xla'][0]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got['matmul'][1]), jax.tree.leaves(got['xla'][1])):
    scale = float(jnp.max(jnp.abs(b))) + 1e-12
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-4 * scale, (float(jnp.max(jnp.abs(a - b))), scale)
