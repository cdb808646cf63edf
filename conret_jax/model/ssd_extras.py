"""SSD's extra feature layers (Liu et al. 2016, Fig. 2): after the base network, each extra layer is a 1x1 conv that
halves (or quarters) the channels, then a 3x3 (or 4x4) conv that shrinks the map, each followed by a ReLU; every
extra layer's output is one more source of predictions.

The layout of each base network is a tuple of ExtraLayer (model/vgg.py's tables for VGG-16, model/ssd_resnet.py's
for the ResNets); `extra_sizes` gives the map sides they produce, which the default boxes need before any tracing.
Names continue the paper's: extra layer k (0-based) is conv<8+k>_1 and conv<8+k>_2 (conv8_2 .. conv11_2 in
SSD300, conv12_2 in SSD512), with norm<8+k>_1 / norm<8+k>_2 when normalized.

norm='' : biased convs, no normalization (torchvision's and Caffe's VGG extras); 'bn' | 'gn': convs without bias,
each followed by that normalization before its ReLU (NVIDIA's SSD-ResNet extras use batch norm). Init: xavier
uniform, zero biases (torchvision's and NVIDIA's SSD).
"""

import typing

import flax.linen as nn

from conret_jax.model.layers import Compute, Norm

EXTRA_NORMS = ('', 'bn', 'gn')
FIRST_INDEX = 8  # the first extra layer is conv8_x


class ExtraLayer(typing.NamedTuple):
  mid: int  # channels of the 1x1 conv
  out: int  # channels of the source this layer produces
  kernel: int  # the second conv's kernel (3, or 4 for SSD512's last layer)
  stride: int
  padding: int


def extra_sizes(side: int, layers) -> tuple[int, ...]:
  """The sides of the extra layers' outputs, starting from a map of `side` (square)."""
  out = []
  for layer in layers:
    side = (side + 2 * layer.padding - layer.kernel) // layer.stride + 1
    out.append(side)
  return tuple(out)


def layer_names(k: int) -> tuple[str, str]:
  """(1x1 conv, second conv) names of extra layer k (0-based)."""
  return f'conv{FIRST_INDEX + k}_1', f'conv{FIRST_INDEX + k}_2'


class Extras(nn.Module):
  """__call__(x [B, H, W, C] the base network's last source, train) -> tuple of [B, h_k, w_k, out_k // divisor]."""

  layers: tuple
  norm: str = ''
  width_divisor: int = 1
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.norm not in EXTRA_NORMS:
      raise ValueError(f'extra layer norm must be one of {EXTRA_NORMS}, got {self.norm!r}')
    xavier = nn.initializers.xavier_uniform()
    outputs = []
    for k, layer in enumerate(self.layers):
      for name, channels, kernel, stride, padding in zip(
        layer_names(k), (layer.mid, layer.out), (1, layer.kernel), (1, layer.stride), (0, layer.padding)
      ):
        conv = self.compute.conv(
          channels // self.width_divisor,
          kernel,
          stride,
          name=name,
          use_bias=not self.norm,
          kernel_init=xavier,
          padding=padding,
        )
        x = conv(x)
        if self.norm:
          x = Norm(self.norm, name=name.replace('conv', 'norm'))(x, train)
        x = nn.relu(x)
      outputs.append(x)
    return tuple(outputs)
