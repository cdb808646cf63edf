"""FLOPs counted from the traced computation (conret_jax/flops.py): exact for single ops, within 15% of an analytic
count of R50-FPN RetinaNet, the same for a step on 1 and on 4 devices."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np

import conret_jax
from conret_jax import flops
from conret_jax import mesh as mesh_lib
from conret_jax.model import conv_lowering
from conret_jax.train import bench
from conret_jax.train import state as state_lib

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def _config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_a_convolution_and_a_matrix_product_count_two_flops_per_multiply_add():
  x, w = jnp.zeros((2, 16, 12, 8)), jnp.zeros((3, 3, 8, 32))
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (2, 2), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  assert flops.count_flops(conv, x, w) == 2 * (2 * 8 * 6 * 32) * (3 * 3 * 8)  # outputs x window x in-features
  grouped = lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=4
  )
  assert flops.count_flops(grouped, x, jnp.zeros((3, 3, 2, 32))) == 2 * (2 * 16 * 12 * 32) * (3 * 3 * 2)
  a, b = jnp.zeros((5, 7, 3)), jnp.zeros((5, 3, 4))
  assert flops.count_flops(lambda a, b: jnp.einsum('bik,bkj->bij', a, b), a, b) == 2 * 5 * 7 * 4 * 3
  # A static loop multiplies its body; the backward pass of a product is two more products.
  scanned = lambda a: jax.lax.scan(lambda c, _: (c @ c, None), a, None, length=6)[0]
  assert flops.count_flops(scanned, jnp.zeros((4, 4))) == 6 * 2 * 4 * 4 * 4
  assert flops.count_flops(jax.grad(lambda a, b: jnp.sum(a @ b), (0, 1)), jnp.zeros((4, 6)), jnp.zeros((6, 5))) == (
    3 * 2 * 4 * 6 * 5
  )


def test_a_strided_convolution_counts_its_multiplies_forward_and_backward():
  """Forward, input gradient and kernel gradient of a stride-2 conv: three times the forward's multiply-adds. XLA
  writes the input gradient as a convolution over a zero-dilated output gradient: its zeros are not counted. A 1x1
  lowered to matrix products (model.conv_lowering='matmul') counts the same as the convolution."""
  x = jnp.zeros((2, 16, 12, 8))
  dn = jax.lax.conv_dimension_numbers(x.shape, (3, 3, 8, 32), ('NHWC', 'HWIO', 'NHWC'))
  for k, fn in ((3, jax.lax.conv_general_dilated), (1, jax.lax.conv_general_dilated), (1, conv_lowering.matmul_conv)):
    pad = ((k // 2, k // 2), (k // 2, k // 2))
    loss = lambda x, w: jnp.sum(fn(x, w, (2, 2), pad, dimension_numbers=dn))
    forward_macs = (2 * 8 * 6 * 32) * (k * k * 8)
    assert flops.count_flops(jax.grad(loss, (0, 1)), x, jnp.zeros((k, k, 8, 32))) == 3 * 2 * forward_macs, (k, fn)


def test_a_stride_1_convolution_counts_three_times_its_forward_under_either_lowering():
  """Forward, input gradient and kernel gradient of a padded stride-1 3x3 conv: three times the forward's
  multiply-adds, also under the CPU lowering, whose custom gradient must not add a convolution of its own."""
  x = jnp.zeros((2, 16, 12, 8))
  dn = jax.lax.conv_dimension_numbers(x.shape, (3, 3, 8, 32), ('NHWC', 'HWIO', 'NHWC'))
  forward_macs = (2 * 16 * 12 * 32) * (3 * 3 * 8)
  for fn in (jax.lax.conv_general_dilated, conv_lowering.matmul_conv):
    loss = lambda x, w: jnp.sum(fn(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn))
    assert flops.count_flops(jax.grad(loss, (0, 1)), x, jnp.zeros((3, 3, 8, 32))) == 3 * 2 * forward_macs, fn


def _r50_fpn_retinanet_macs(size: int, num_classes: int, anchors: int = 9) -> int:
  """Multiply-adds of torchvision's R50-FPN RetinaNet at size x size, counted layer by layer from its definition."""
  r = size // 2
  macs = r * r * 64 * 7 * 7 * 3  # stem conv, then the max pool halves r
  r //= 2
  cin = 64
  for i, (blocks, mid) in enumerate(((3, 64), (4, 128), (6, 256), (3, 512))):
    for j in range(blocks):
      r_out = r // 2 if (i > 0 and j == 0) else r
      macs += r * r * cin * mid + r_out * r_out * 9 * mid * mid + r_out * r_out * mid * 4 * mid
      if j == 0:
        macs += r_out * r_out * cin * 4 * mid  # projection shortcut
      cin, r = 4 * mid, r_out
  levels = [size // 2**k for k in range(3, 8)]
  for res, c in zip(levels[:3], (512, 1024, 2048)):  # lateral 1x1 and output 3x3 convs
    macs += res * res * c * 256 + res * res * 9 * 256 * 256
  macs += sum(res * res * 9 * 256 * 256 for res in levels[3:])  # P6 and P7
  for res in levels:  # two towers of four 3x3 convs, then the class and box convs
    macs += res * res * 9 * 256 * (8 * 256 + anchors * num_classes + anchors * 4)
  return macs


def test_r50_fpn_forward_is_within_15_percent_of_the_analytic_count():
  """R50-FPN RetinaNet, torchvision layout, 640x640, 91 classes: about 194 GFLOP per image."""
  config = _config('retinanet_torchvision')
  model = conret_jax.build_model(config)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 128, 128, 3))))
  images = jax.ShapeDtypeStruct((1, 640, 640, 3), jnp.float32)
  counted = flops.count_flops(lambda v, x: model.apply(v, x), variables, images)
  analytic = 2 * _r50_fpn_retinanet_macs(640, 91)
  assert abs(counted / analytic - 1) < 0.15, (counted / 1e9, analytic / 1e9)
  assert 180e9 < counted < 210e9


def _tiny(consistent=True):
  config = _config('shapes_demo', f'consistent={str(consistent).lower()}')
  config.model.backbone.width, config.model.fpn.channels, config.model.head.channels = 8, 16, 16
  config.train.global_batch_size = config.eval.global_batch_size = 4
  return config


def test_step_flops_are_global_and_the_same_on_one_and_four_devices():
  counts = []
  for devices in (jax.devices()[:1], jax.devices()[:4]):
    config = _tiny()
    model = conret_jax.build_model(config)
    abstract = state_lib.abstract_state(model, config, mesh_lib.make_mesh(config, devices))
    batch = bench.synthetic_batch(config, (128, 128), np.random.default_rng(0))
    counts.append(bench.step_flops(model, config, abstract, batch))
  assert counts[0] == counts[1] > 0
  config = _tiny(consistent=False)
  model = conret_jax.build_model(config)
  abstract = state_lib.abstract_state(model, config, mesh_lib.make_mesh(config, jax.devices()[:1]))
  retinanet = bench.step_flops(
    model, config, abstract, bench.synthetic_batch(config, (128, 128), np.random.default_rng(0))
  )
  assert counts[0] > retinanet  # the consistent head's extra box conv, forward and backward
