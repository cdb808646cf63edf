"""Feature pyramid network: C3..C5 -> P<min_level>..P<max_level> (flax.linen, NHWC).

  lateral<l>  1x1 conv on C<l> (l = min_level..5)
  top-down    P5' = lateral5(C5); P<l>' = lateral<l>(C<l>) + nearest-2x-upsample(P<l+1>')
  output<l>   3x3 conv on P<l>' gives P<l>
  p6          3x3 stride-2 conv on C5 (p6_from='c5': the paper / Detectron) or on P5 ('p5': torchvision v1)
  p<l>, l>6   3x3 stride-2 conv on relu(P<l-1>)
All convs have a bias and torchvision's init (kaiming uniform with a=1, i.e. variance 1/fan_in; zero bias).
"""

import flax.linen as nn
import jax.numpy as jnp

from conret_jax.model.layers import Compute

_kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')


def _upsample2x(x):
  """Nearest-neighbour 2x upsampling [B, H, W, C] -> [B, 2H, 2W, C] (torch F.interpolate 'nearest' at scale 2)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class FPN(nn.Module):
  """__call__(features: (C3, C4, C5)) -> tuple (P<min_level>, ..., P<max_level>), each [B, H_l, W_l, channels]."""

  channels: int = 256
  min_level: int = 3
  max_level: int = 7
  p6_from: str = 'c5'
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, features):
    if not 3 <= self.min_level <= 5 or self.max_level < 5:
      raise ValueError(
        f'fpn levels must satisfy 3 <= min_level <= 5 <= max_level, got {self.min_level}..{self.max_level}'
      )
    if self.p6_from not in ('c5', 'p5'):
      raise ValueError(f"fpn.p6_from must be 'c5' or 'p5', got {self.p6_from!r}")
    mk = lambda k, s, name: self.compute.conv(
      self.channels, k, s, name=name, use_bias=True, kernel_init=_kaiming_uniform_a1
    )
    c = dict(zip((3, 4, 5), features))
    outputs = {}
    inner = None
    for level in range(5, self.min_level - 1, -1):
      lateral = mk(1, 1, f'lateral{level}')(c[level])
      if inner is not None:
        up = _upsample2x(inner)
        if up.shape != lateral.shape:
          raise ValueError(
            f'FPN level {level}: {lateral.shape[1:3]} is not twice {inner.shape[1:3]}; image sides '
            f'must be divisible by 2**max_level'
          )
        lateral = lateral + up
      inner = lateral
      outputs[level] = mk(3, 1, f'output{level}')(inner)
    for level in range(6, self.max_level + 1):
      if level == 6:
        x = c[5] if self.p6_from == 'c5' else outputs[5]
      else:
        x = nn.relu(outputs[level - 1])
      outputs[level] = mk(3, 2, f'p{level}')(x)
    return tuple(outputs[level] for level in range(self.min_level, self.max_level + 1))


def fpn_from_config(fpn_config, compute: Compute) -> FPN:
  f = fpn_config
  return FPN(
    channels=f.channels, min_level=f.min_level, max_level=f.max_level, p6_from=f.p6_from, compute=compute, name='fpn'
  )
