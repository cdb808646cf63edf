"""model/layers.py: the convolution a `Compute` builds, and the normalization layers."""

import jax
import jax.numpy as jnp
import model_reference as ref
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conret_jax.model import conv_lowering, layers
from conret_jax.model.layers import Compute, Norm


@pytest.mark.parametrize('kernel,stride,dilation', [(3, 1, 1), (3, 2, 1), (1, 1, 1), (3, 1, 6), (1, 2, 1)])
def test_compute_conv_matches_lax(kernel, stride, dilation):
  """Torch's symmetric padding dilation * (k // 2), the dtype and precision asked for, under either lowering."""
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 4))
  for lowering in ('xla', 'matmul'):
    conv = Compute(precision=jax.lax.Precision.HIGHEST, lowering=lowering).conv(
      8, kernel, stride, name='c', dilation=dilation, use_bias=True
    )
    variables = conv.init(jax.random.key(1), x)
    pad = dilation * (kernel // 2)
    want = jax.lax.conv_general_dilated(
      x,
      variables['params']['kernel'],
      (stride, stride),
      ((pad, pad), (pad, pad)),
      rhs_dilation=(dilation, dilation),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST,
    )
    np.testing.assert_allclose(conv.apply(variables, x), want + variables['params']['bias'], rtol=1e-5, atol=1e-5)


def test_compute_from_config():
  m = ref.tiny_config(**{'model.compute_dtype': 'bfloat16', 'model.matmul_precision': 'highest'}).model
  c = Compute.from_config(m)
  assert (c.dtype, c.precision, c.lowering) == (jnp.bfloat16, jax.lax.Precision.HIGHEST, conv_lowering.resolve('auto'))
  conv = c.conv(4, 3, name='c')
  y, v = conv.init_with_output(jax.random.key(0), jnp.ones((1, 8, 8, 2)))
  assert y.dtype == jnp.bfloat16 and v['params']['kernel'].dtype == jnp.float32
  assert hash(c) == hash(Compute.from_config(m))  # modules holding it stay hashable (jit caches by them)


def test_sync_batch_norm_uses_global_batch_statistics():
  """Under jit over a batch sharded on 8 devices, training BN normalizes with the whole batch's statistics."""
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((8, 3, 3, 4)) * np.arange(1, 9)[:, None, None, None] + 2).astype(np.float32)
  norm = Norm('bn')
  variables = norm.init(jax.random.key(0), x, train=False)
  mesh = jax.make_mesh((8,), ('data',))
  xs = jax.device_put(x, NamedSharding(mesh, P('data')))
  y, updates = jax.jit(lambda v, x: norm.apply(v, x, train=True, mutable=['batch_stats']))(variables, xs)
  mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
  ref.assert_close(y, (x - mean) / np.sqrt(var + 1e-5))
  ref.assert_close(updates['batch_stats']['mean'], 0.1 * mean)
  ref.assert_close(updates['batch_stats']['var'], 0.9 + 0.1 * var)


@pytest.mark.parametrize('channels,groups', [(64, 32), (8, 8), (12, 12), (48, 24)])
def test_group_norm(channels, groups):
  assert layers.group_count(channels) == groups
  rng = np.random.default_rng(channels)
  x = (rng.standard_normal((2, 4, 4, channels)) * 3 + 1).astype(np.float32)
  v = {
    'params': {
      'scale': rng.uniform(0.5, 2, channels).astype(np.float32),
      'bias': rng.standard_normal(channels).astype(np.float32),
    }
  }
  got = Norm('gn').apply(v, x, train=True)
  ref.assert_close(got, ref.group_norm(x, v['params']['scale'], v['params']['bias'], groups))
