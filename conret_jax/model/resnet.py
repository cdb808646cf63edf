"""ResNet v1 backbone (NHWC, flax.linen) returning C3, C4, C5, and the normalization layers it uses.

We use flax.linen rather than nnx: its pure `init`/`apply` and plain variable pytrees are what a sharded, jitted,
functional train step and orbax checkpoints want.

Module names follow torchvision's (`conv1`, `norm1`, `layer1`..`layer4`, `block<j>`, `downsample_conv`), so the
weight importers map names mechanically (conret_jax/weights.py).

Normalization (config.model.backbone.norm):
  'frozen_bn'  affine batch norm with fixed scale/bias/mean/var in the 'frozen' collection: not trained, not counted
               as parameters (Detectron's default; torchvision's FrozenBatchNorm2d).
  'bn'         trainable scale/bias in 'params', running mean/var in 'batch_stats'. In training mode the statistics
               are means over the batch axis of the array the layer sees; under `jax.jit` over a global array sharded
               on the mesh's data axis that is the GLOBAL batch, i.e. cross-replica (sync) batch norm: XLA inserts the
               all-reduce. Apply with `mutable=['batch_stats']` when train=True.
  'gn'         GroupNorm with 32 groups, or the largest divisor of the channel count below 32 when channels are few.

freeze_at (0..5): 0 trains everything; 1 freezes the stem; k >= 2 freezes the stem and res2..res<k>. The output of
the frozen prefix goes through `stop_gradient`, so no gradient reaches those parameters, and their norms always run
in inference mode (a frozen 'bn' layer uses its running statistics). The train step ALSO masks their updates (weight
decay would move them otherwise): see `conret_jax.model.detector.trainable_mask`.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from conret_jax.model.conv_lowering import conv_function

BN_EPS = 1e-5  # torchvision BatchNorm2d / FrozenBatchNorm2d
GN_EPS = 1e-5

# depth -> (block kind, blocks per stage res2..res5)
DEPTHS = {
  18: ('basic', (2, 2, 2, 2)),
  34: ('basic', (3, 4, 6, 3)),
  50: ('bottleneck', (3, 4, 6, 3)),
  101: ('bottleneck', (3, 4, 23, 3)),
  152: ('bottleneck', (3, 8, 36, 3)),
}
NORMS = ('frozen_bn', 'bn', 'gn')

# torchvision's ResNet init: kaiming normal, fan_out, ReLU gain.
_kaiming_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def group_count(channels: int, max_groups: int = 32) -> int:
  """GroupNorm groups: max_groups when it divides `channels`, else the largest divisor of `channels` below it."""
  return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


def stage_channels(depth: int, width: int) -> tuple[int, int, int, int]:
  """Output channels of res2..res5 (C2..C5)."""
  kind, _ = DEPTHS[depth]
  expansion = 4 if kind == 'bottleneck' else 1
  return tuple(width * m * expansion for m in (1, 2, 4, 8))


def frozen_module_names(freeze_at: int) -> tuple[str, ...]:
  """Names of the backbone's top-level modules frozen by `freeze_at` (stem = conv1+norm1, layer<k> = res<k+1>)."""
  if not 0 <= freeze_at <= 5:
    raise ValueError(f'backbone.freeze_at must be in 0..5, got {freeze_at}')
  names = ('conv1', 'norm1') if freeze_at >= 1 else ()
  return names + tuple(f'layer{k}' for k in range(1, freeze_at))


def conv(
  features: int,
  kernel: int,
  stride: int,
  dtype,
  name: str,
  use_bias: bool = False,
  kernel_init=_kaiming_fan_out,
  bias_init=nn.initializers.zeros,
  precision=None,
  lowering: str = 'xla',
) -> nn.Conv:
  """A square conv with torchvision's symmetric padding (k // 2 each side), float32 params. `precision` is the
  matmul precision of the convolution (None: the platform's default; see model.matmul_precision); `lowering` how it
  reaches the compiler ('xla' | 'matmul', resolved from model.conv_lowering; conret_jax/model/conv_lowering.py)."""
  pad = kernel // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    (stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=kernel_init,
    bias_init=bias_init,
    precision=precision,
    conv_general_dilated=conv_function(lowering),
    name=name,
  )


class Norm(nn.Module):
  """frozen_bn | bn | gn over the channel axis; statistics in float32, output in the input's dtype.

  Variables: frozen_bn -> 'frozen': scale, bias, mean, var; bn -> 'params': scale, bias and 'batch_stats': mean,
  var; gn -> 'params': scale, bias.
  """

  kind: str
  frozen: bool = False  # part of the frozen prefix: always inference mode
  momentum: float = 0.9  # running = momentum * running + (1 - momentum) * batch (torch momentum 0.1)

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    ones = lambda: jnp.ones((c,), jnp.float32)
    zeros = lambda: jnp.zeros((c,), jnp.float32)
    if self.kind == 'frozen_bn':
      scale = self.variable('frozen', 'scale', ones).value
      bias = self.variable('frozen', 'bias', zeros).value
      mean = self.variable('frozen', 'mean', zeros).value
      var = self.variable('frozen', 'var', ones).value
    elif self.kind == 'bn':
      scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
      bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
      ra_mean = self.variable('batch_stats', 'mean', zeros)
      ra_var = self.variable('batch_stats', 'var', ones)
      if train and not self.frozen:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(xf - mean), axis=(0, 1, 2))
        if not self.is_initializing():  # running var uses the biased batch var (torch: unbiased; negligible)
          ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
          ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
      else:
        mean, var = ra_mean.value, ra_var.value
    elif self.kind == 'gn':
      scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
      bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
      g = group_count(c)
      xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (g, c // g))
      mean = jnp.mean(xf, axis=(1, 2, 4), keepdims=True)
      var = jnp.mean(jnp.square(xf - mean), axis=(1, 2, 4), keepdims=True)
      xf = ((xf - mean) * jax.lax.rsqrt(var + GN_EPS)).reshape(x.shape)
      return (xf * scale + bias).astype(x.dtype)
    else:
      raise ValueError(f'unknown norm {self.kind!r}; expected one of {NORMS}')
    # Fold into one multiply-add, computed in float32 then cast to the compute dtype.
    mult = scale * jax.lax.rsqrt(var + BN_EPS)
    shift = bias - mean * mult
    return x * mult.astype(x.dtype) + shift.astype(x.dtype)


class BasicBlock(nn.Module):
  """ResNet-18/34 block: 3x3 (stride) -> 3x3, identity or 1x1 projection shortcut. Output `features` channels."""

  features: int
  stride: int
  norm: str
  dtype: Any
  frozen: bool = False
  stride_in_1x1: bool = False  # unused: a basic block has no 1x1
  precision: Any = None
  conv_lowering: str = 'xla'  # 'xla' | 'matmul' (conret_jax/model/conv_lowering.py)

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda name: Norm(self.norm, self.frozen, name=name)
    mk = lambda f, k, s, name: conv(f, k, s, self.dtype, name, precision=self.precision, lowering=self.conv_lowering)
    y = nn.relu(norm('norm1')(mk(self.features, 3, self.stride, 'conv1')(x), train))
    y = norm('norm2')(mk(self.features, 3, 1, 'conv2')(y), train)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = norm('downsample_norm')(mk(self.features, 1, self.stride, 'downsample_conv')(x), train)
    return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
  """ResNet-50+ block: 1x1 -> 3x3 -> 1x1 (x4 channels). The stride sits on the 3x3 (torchvision, "ResNet v1.5")
  or on the first 1x1 (stride_in_1x1: Caffe2/Detectron MSRA weights)."""

  features: int
  stride: int
  norm: str
  dtype: Any
  frozen: bool = False
  stride_in_1x1: bool = False
  precision: Any = None
  conv_lowering: str = 'xla'  # 'xla' | 'matmul' (conret_jax/model/conv_lowering.py)

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda name: Norm(self.norm, self.frozen, name=name)
    s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
    out = self.features * 4
    mk = lambda f, k, s, name: conv(f, k, s, self.dtype, name, precision=self.precision, lowering=self.conv_lowering)
    y = nn.relu(norm('norm1')(mk(self.features, 1, s1, 'conv1')(x), train))
    y = nn.relu(norm('norm2')(mk(self.features, 3, s3, 'conv2')(y), train))
    y = norm('norm3')(mk(out, 1, 1, 'conv3')(y), train)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != out:
      shortcut = norm('downsample_norm')(mk(out, 1, self.stride, 'downsample_conv')(x), train)
    return nn.relu(y + shortcut)


class ResNetStage(nn.Module):
  """One stage res<k>: `num_blocks` blocks, the first one strided."""

  block: str
  num_blocks: int
  features: int
  stride: int
  norm: str
  dtype: Any
  frozen: bool
  stride_in_1x1: bool
  precision: Any = None
  conv_lowering: str = 'xla'  # 'xla' | 'matmul' (conret_jax/model/conv_lowering.py)

  @nn.compact
  def __call__(self, x, train: bool):
    cls = Bottleneck if self.block == 'bottleneck' else BasicBlock
    for j in range(self.num_blocks):
      x = cls(
        self.features,
        self.stride if j == 0 else 1,
        self.norm,
        self.dtype,
        self.frozen,
        self.stride_in_1x1,
        precision=self.precision,
        conv_lowering=self.conv_lowering,
        name=f'block{j}',
      )(x, train)
    return x


class ResNet(nn.Module):
  """ResNet v1 trunk without the classifier.

  __call__(x [B, H, W, 3] (normalized pixels, compute dtype), train) -> (C3, C4, C5) with strides 8, 16, 32 and
  channels `stage_channels(depth, width)[1:]`.
  """

  depth: int = 50
  width: int = 64
  norm: str = 'frozen_bn'
  freeze_at: int = 2
  stride_in_1x1: bool = False
  dtype: Any = jnp.float32
  precision: Any = None
  conv_lowering: str = 'xla'  # 'xla' | 'matmul' (conret_jax/model/conv_lowering.py)

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.depth not in DEPTHS:
      raise ValueError(f'backbone.depth must be one of {sorted(DEPTHS)}, got {self.depth}')
    frozen = frozen_module_names(self.freeze_at)
    block, counts = DEPTHS[self.depth]
    x = conv(self.width, 7, 2, self.dtype, 'conv1', precision=self.precision, lowering=self.conv_lowering)(x)
    x = nn.relu(Norm(self.norm, 'norm1' in frozen, name='norm1')(x, train))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
    if self.freeze_at >= 1:
      x = jax.lax.stop_gradient(x)
    outputs = []
    for i, n in enumerate(counts):
      name = f'layer{i + 1}'
      x = ResNetStage(
        block,
        n,
        self.width * 2**i,
        1 if i == 0 else 2,
        self.norm,
        self.dtype,
        name in frozen,
        self.stride_in_1x1,
        precision=self.precision,
        conv_lowering=self.conv_lowering,
        name=name,
      )(x, train)
      if name in frozen:
        x = jax.lax.stop_gradient(x)
      outputs.append(x)
    return tuple(outputs[1:])


def resnet_from_config(backbone_config, dtype, precision=None, conv_lowering='xla') -> ResNet:
  """The ResNet of config.model.backbone."""
  b = backbone_config
  if b.norm not in NORMS:
    raise ValueError(f'backbone.norm must be one of {NORMS}, got {b.norm!r}')
  return ResNet(
    depth=b.depth,
    width=b.width,
    norm=b.norm,
    freeze_at=b.freeze_at,
    stride_in_1x1=b.stride_in_1x1,
    dtype=dtype,
    precision=precision,
    conv_lowering=conv_lowering,
    name='backbone',
  )


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
