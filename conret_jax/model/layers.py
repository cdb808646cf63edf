"""How a layer computes, as one value every module takes once: `Compute` (the convolutions' dtype, matmul precision
and lowering), its convolution constructor, and the normalization layers the backbones and heads share.

We use flax.linen rather than nnx: its pure `init`/`apply` and plain variable pytrees are what a sharded, jitted,
functional train step and orbax checkpoints want.

Mixed precision: params are float32; convolutions compute in `Compute.dtype` ('float32' | 'bfloat16' in
config.model.compute_dtype); normalization statistics are computed in float32.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from conret_jax.model import conv_lowering, pooling

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# model.matmul_precision -> the precision of every convolution. 'default' leaves the platform's choice: on GPU a float32
# convolution then runs in TF32, which a torchvision fp32 reference does not; 'highest' asks for full float32.
MATMUL_PRECISIONS = {'default': None, 'high': jax.lax.Precision.HIGH, 'highest': jax.lax.Precision.HIGHEST}
NORMS = ('frozen_bn', 'bn', 'gn')
BN_EPS = 1e-5  # torchvision BatchNorm2d / FrozenBatchNorm2d
GN_EPS = 1e-5

# torchvision's ResNet / VGG conv init: kaiming normal, fan_out, ReLU gain.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


@dataclasses.dataclass(frozen=True)
class Compute:
  """dtype: the convolutions' compute dtype; precision: their matmul precision (None: the platform's default);
  lowering: 'xla' | 'matmul', how they reach the compiler (resolved from model.conv_lowering, see conv_lowering.py).
  Frozen and hashable, so modules holding it stay hashable and jitted callers cache by them."""

  dtype: Any = jnp.float32
  precision: Any = None
  lowering: str = 'xla'

  @classmethod
  def from_config(cls, model_config) -> 'Compute':
    """From config.model's compute_dtype, matmul_precision and conv_lowering ('auto' resolved for this backend)."""
    m = model_config
    if m.compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f'model.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {m.compute_dtype!r}')
    if m.matmul_precision not in MATMUL_PRECISIONS:
      raise ValueError(f'model.matmul_precision must be one of {sorted(MATMUL_PRECISIONS)}, got {m.matmul_precision!r}')
    return cls(
      dtype=COMPUTE_DTYPES[m.compute_dtype],
      precision=MATMUL_PRECISIONS[m.matmul_precision],
      lowering=conv_lowering.resolve(m.conv_lowering),
    )

  def conv(
    self,
    features: int,
    kernel: int,
    stride: int = 1,
    *,
    name: str,
    use_bias: bool = False,
    kernel_init=kaiming_fan_out,
    bias_init=nn.initializers.zeros,
    dilation: int = 1,
    padding: int | None = None,
  ) -> nn.Conv:
    """A square conv with float32 params, computing as this value says. Padding is torch's symmetric
    `dilation * (kernel // 2)` each side unless given (e.g. 0 for SSD's unpadded extra layers)."""
    pad = dilation * (kernel // 2) if padding is None else padding
    return nn.Conv(
      features,
      (kernel, kernel),
      (stride, stride),
      padding=((pad, pad), (pad, pad)),
      kernel_dilation=(dilation, dilation),
      use_bias=use_bias,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=kernel_init,
      bias_init=bias_init,
      precision=self.precision,
      conv_general_dilated=conv_lowering.conv_function(self.lowering),
      name=name,
    )

  def max_pool(self, x, window: int, stride: int, padding):
    """nn.max_pool of x [B, H, W, C] with a square window and stride and -inf padding ((top, bottom), (left,
    right)); under the 'matmul' lowering with the gradient XLA:CPU runs faster (model/pooling.py)."""
    return pooling.max_pool_function(self.lowering)(x, window, stride, padding)


def group_count(channels: int, max_groups: int = 32) -> int:
  """GroupNorm groups: max_groups when it divides `channels`, else the largest divisor of `channels` below it."""
  return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


class Norm(nn.Module):
  """frozen_bn | bn | gn over the channel axis; statistics in float32, output in the input's dtype.

  Variables: frozen_bn -> 'frozen': scale, bias, mean, var; bn -> 'params': scale, bias and 'batch_stats': mean,
  var; gn -> 'params': scale, bias. With 'bn' the training statistics are means over the batch axis of the array the
  layer sees; under `jax.jit` over a global array sharded on the mesh's data axis that is the GLOBAL batch
  (cross-replica batch norm: XLA inserts the all-reduce).
  """

  kind: str
  frozen: bool = False  # part of a frozen prefix: always inference mode
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


def normalize(images, pixel_mean, pixel_std, dtype) -> jax.Array:
  """Pixels to the network's input: (images - mean) / std in float32, then cast to the compute dtype.

  images [B, H, W, 3] float32 RGB 0..255 -> [B, H, W, 3] `dtype`."""
  mean = jnp.asarray(pixel_mean, jnp.float32)
  std = jnp.asarray(pixel_std, jnp.float32)
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)
