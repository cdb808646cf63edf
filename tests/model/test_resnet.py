"""ResNet backbone: published parameter counts, block semantics, norms, freezing, mixed precision."""

import jax
import jax.numpy as jnp
import model_reference as ref
import numpy as np
import pytest

from conret_jax.model import resnet
from conret_jax.model.layers import Compute
from conret_jax.model.resnet import Bottleneck, ResNet, count_params

# torchvision's published totals minus the ImageNet classifier (fc: C5 * 1000 + 1000).
TRUNK_PARAMS = {
  18: 11_689_512 - 513_000,
  34: 21_797_672 - 513_000,
  50: 25_557_032 - 2_049_000,  # 23,508,032
  101: 44_549_160 - 2_049_000,
  152: 60_192_808 - 2_049_000,
}


def _shapes(module, x_shape=(1, 64, 64, 3)):
  return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(x_shape), train=False))


@pytest.mark.parametrize('depth', sorted(TRUNK_PARAMS))
def test_published_parameter_counts(depth):
  assert count_params(_shapes(ResNet(depth=depth, norm='bn'))['params']) == TRUNK_PARAMS[depth]


def test_frozen_bn_is_not_a_parameter():
  bn = _shapes(ResNet(depth=50, norm='bn'))
  frozen = _shapes(ResNet(depth=50, norm='frozen_bn'))
  assert set(frozen) == {'params', 'frozen'}
  bn_channels = count_params(bn['batch_stats']) // 2
  assert bn_channels == 26_560  # sum of BN channels in ResNet-50
  assert count_params(frozen['params']) == TRUNK_PARAMS[50] - 2 * bn_channels
  assert count_params(frozen['frozen']) == 4 * bn_channels


def test_output_strides_and_channels():
  shapes = jax.eval_shape(
    lambda: ResNet(depth=50, width=8).init_with_output(jax.random.key(0), jnp.zeros((2, 128, 96, 3)), train=False)
  )[0]
  assert [s.shape for s in shapes] == [(2, 16, 12, 64), (2, 8, 6, 128), (2, 4, 3, 256)]
  assert resnet.stage_channels(50, 8)[1:] == (64, 128, 256)


@pytest.mark.parametrize('stride_in_1x1', [False, True])
def test_bottleneck_matches_numpy(stride_in_1x1):
  rng = np.random.default_rng(0)
  sd = {}
  for t, (o, i, k) in enumerate([(4, 8, 1), (4, 4, 3), (16, 4, 1)], 1):
    sd[f'conv{t}.weight'] = ref._conv_w(rng, o, i, k)
    ref._bn(rng, sd, f'bn{t}', o)
  sd['downsample.0.weight'] = ref._conv_w(rng, 16, 8, 1)
  ref._bn(rng, sd, 'downsample.1', 16)
  x = rng.standard_normal((2, 10, 10, 8)).astype(np.float32)

  block = Bottleneck(features=4, stride=2, norm='frozen_bn', stride_in_1x1=stride_in_1x1)
  v = {'params': {}, 'frozen': {}}
  for ours, theirs in [('conv1', 'conv1'), ('conv2', 'conv2'), ('conv3', 'conv3'), ('downsample_conv', 'downsample.0')]:
    v['params'][ours] = {'kernel': sd[theirs + '.weight'].transpose(2, 3, 1, 0)}
  for ours, theirs in [('norm1', 'bn1'), ('norm2', 'bn2'), ('norm3', 'bn3'), ('downsample_norm', 'downsample.1')]:
    v['frozen'][ours] = {
      k: sd[f'{theirs}.{t}']
      for k, t in [('scale', 'weight'), ('bias', 'bias'), ('mean', 'running_mean'), ('var', 'running_var')]
    }
  got = block.apply(v, x, train=False)

  s1, s3 = (2, 1) if stride_in_1x1 else (1, 2)
  y = ref.relu(ref.batch_norm(ref.conv(x, sd['conv1.weight'], stride=s1), sd, 'bn1'))
  y = ref.relu(ref.batch_norm(ref.conv(y, sd['conv2.weight'], stride=s3), sd, 'bn2'))
  y = ref.batch_norm(ref.conv(y, sd['conv3.weight']), sd, 'bn3')
  want = ref.relu(y + ref.batch_norm(ref.conv(x, sd['downsample.0.weight'], stride=2), sd, 'downsample.1'))
  ref.assert_close(got, want)


def test_freeze_at_stops_gradients_and_mask():
  model = ResNet(depth=18, width=8, norm='gn', freeze_at=2)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
  v = ref.random_like(_shapes(model, x.shape))

  def loss(params):
    return sum(jnp.sum(o**2) for o in model.apply({'params': params}, x, train=True))

  grads = jax.jit(jax.grad(loss))(v['params'])
  norms = {k: float(sum(jnp.sum(g**2) for g in jax.tree.leaves(t))) for k, t in grads.items()}
  assert norms['conv1'] == norms['norm1'] == norms['layer1'] == 0.0
  assert norms['layer2'] > 0 and norms['layer4'] > 0
  assert resnet.frozen_module_names(0) == ()
  assert resnet.frozen_module_names(3) == ('conv1', 'norm1', 'layer1', 'layer2')
  with pytest.raises(ValueError, match='freeze_at'):
    resnet.frozen_module_names(6)


def test_frozen_prefix_bn_keeps_running_stats_in_training():
  model = ResNet(depth=18, width=8, norm='bn', freeze_at=2)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3)) + 3, jnp.float32)
  v = ref.random_like(_shapes(model, x.shape))
  _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(v, x)
  same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), v['batch_stats'], updates['batch_stats'])
  assert all(jax.tree.leaves(same['layer1'])) and all(jax.tree.leaves(same['norm1']))
  assert not all(jax.tree.leaves(same['layer2']))


def test_bfloat16_compute_keeps_float32_params():
  model = ResNet(depth=18, width=8, compute=Compute(dtype=jnp.bfloat16))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 64, 64, 3)), jnp.float32)
  shapes = _shapes(model, x.shape)
  assert {a.dtype for a in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}  # params stay float32
  v = ref.random_like(shapes)
  c3, c4, c5 = jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x)
  assert c5.dtype == jnp.bfloat16
  f32 = jax.jit(lambda v, x: ResNet(depth=18, width=8).apply(v, x, train=False))(v, x)[2]
  np.testing.assert_allclose(np.asarray(c5, np.float32), f32, rtol=0.1, atol=0.1 * float(jnp.abs(f32).max()))
