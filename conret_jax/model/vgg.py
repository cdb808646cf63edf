"""VGG-16 as SSD's base network (Liu et al. 2016, Section 3 "Base network"), as torchvision's ssd300_vgg16 builds it.

  conv1_1 .. conv5_3   VGG-16's thirteen 3x3 convs + ReLU in five blocks (64, 128, 256, 512, 512 channels);
                       2x2 stride-2 max pools after blocks 1-4, the third with ceil_mode (300 -> 150 -> 75 -> 38,
                       the paper's 38x38 conv4_3; torchvision patches it so)
  conv4_3_norm         L2 normalization of conv4_3 over channels with a learned per-channel scale initialized to 20
                       (ParseNet; the SSD paper: conv4_3's feature scale differs from the later layers')
  pool5                3x3 stride 1, padding 1 (instead of 2x2 stride 2: fc7 keeps conv5's resolution)
  fc6                  3x3 conv, dilation 6 (a trous), 1024 channels + ReLU; fc7: 1x1 conv, 1024 channels + ReLU

__call__ returns the two sources the head reads, (normalized conv4_3 [B, S/8, S/8, 512], fc7 [B, S/16, S/16, 1024])
for an input side S (38 and 19 at 300, 64 and 32 at 512); the extra layers (model/ssd_extras.py) continue from fc7.
`width_divisor` divides every channel count (narrow demo models). `freeze_at` = k freezes blocks conv1 .. conv<k>
(torchvision's ssd300_vgg16 with ImageNet weights, trainable_backbone_layers=4, freezes conv1: k = 1; Caffe SSD freezes
conv1 and conv2: k = 2).

Module names are the paper's; torchvision's `features.<i>` indices follow from VGG16_BLOCKS (each conv is followed
by its ReLU, each block by its pool), which is how conret_jax/weights maps them.
Init (random weights): torchvision's VGG (kaiming normal, fan_out) for the VGG convs, xavier uniform for fc6 / fc7
(torchvision's SSD), zero biases.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from conret_jax.model.layers import Compute
from conret_jax.model.ssd_extras import ExtraLayer

VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
FC_CHANNELS = 1024
L2_NORM_INIT = 20.0
L2_NORM_EPS = 1e-12  # torch.nn.functional.normalize's
CEIL_POOL_BLOCK = 3  # the pool after conv3_3 rounds up


def conv_names(block: int) -> tuple[str, ...]:
  """Names of block b's convs (1-based): conv<b>_1, conv<b>_2, ..."""
  return tuple(f'conv{block}_{i + 1}' for i in range(len(VGG16_BLOCKS[block - 1])))


def source_sizes(image_size: int) -> tuple[int, int]:
  """Sides of (conv4_3, fc7) for a square input of image_size: pools 1, 2, 4 round down, pool 3 up."""
  side = image_size
  for block in (1, 2, 3):
    side = -(-side // 2) if block == CEIL_POOL_BLOCK else side // 2
  return side, side // 2


def _max_pool(compute: Compute, x, ceil: bool):
  """2x2 stride 2; ceil pads the bottom/right with -inf when a side is odd (torch's ceil_mode)."""
  pad = ((0, x.shape[1] % 2 if ceil else 0), (0, x.shape[2] % 2 if ceil else 0))
  return compute.max_pool(x, 2, 2, pad)


class L2Norm(nn.Module):
  """x / max(||x||_2 over channels, 1e-12) * scale, scale [C] learned (init 20); computed in float32."""

  init_scale: float = L2_NORM_INIT

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.constant(self.init_scale), (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
    return (xf / jnp.maximum(norm, L2_NORM_EPS) * scale).astype(x.dtype)


class VGG16(nn.Module):
  """SSD's VGG-16 base network: images (normalized, compute dtype) -> (conv4_3 L2-normalized, fc7); see module doc."""

  width_divisor: int = 1
  freeze_at: int = 0
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no batch statistics
    div = self.width_divisor
    conv = lambda c, name: self.compute.conv(c // div, 3, name=name, use_bias=True)
    sources = []
    for b, channels in enumerate(VGG16_BLOCKS, start=1):
      for c, name in zip(channels, conv_names(b)):
        x = nn.relu(conv(c, name)(x))
      if b <= self.freeze_at:
        x = jax.lax.stop_gradient(x)
      if b == 4:
        sources.append(L2Norm(name='conv4_3_norm')(x))
      if b < 5:
        x = _max_pool(self.compute, x, ceil=b == CEIL_POOL_BLOCK)
    x = self.compute.max_pool(x, 3, 1, ((1, 1), (1, 1)))  # pool5
    xavier = nn.initializers.xavier_uniform()
    x = nn.relu(self.compute.conv(FC_CHANNELS // div, 3, name='fc6', use_bias=True, kernel_init=xavier, dilation=6)(x))
    x = nn.relu(self.compute.conv(FC_CHANNELS // div, 1, name='fc7', use_bias=True, kernel_init=xavier)(x))
    return sources[0], x


def frozen_module_names(freeze_at: int) -> tuple[str, ...]:
  """The convs that `freeze_at` freezes: those of blocks 1 .. freeze_at."""
  if not 0 <= freeze_at <= len(VGG16_BLOCKS):
    raise ValueError(f'a VGG-16 freeze_at must be in 0..{len(VGG16_BLOCKS)}, got {freeze_at}')
  return tuple(name for b in range(1, freeze_at + 1) for name in conv_names(b))


# The extra layers after fc7 (model/ssd_extras.py). SSD300 (torchvision's ssd300_vgg16 and Caffe SSD): conv8_2 and
# conv9_2 halve the map, conv10_2 and conv11_2 are unpadded 3x3s: 19 -> 10 -> 5 -> 3 -> 1. SSD512 (Caffe's
# ssd_pascal_512.py, the paper's footnote "we add extra conv12_2"): four 3x3 stride-2 layers and a 4x4 one with
# padding 1: 32 -> 16 -> 8 -> 4 -> 2 -> 1, the maps core/default_boxes.SSD512 expects. (torchvision's unused
# `highres` branch keeps conv10_2 / conv11_2 unpadded and gives 8 -> 6 -> 4 -> 1 instead.)
VGG_EXTRAS = {
  300: (
    ExtraLayer(256, 512, 3, 2, 1),
    ExtraLayer(128, 256, 3, 2, 1),
    ExtraLayer(128, 256, 3, 1, 0),
    ExtraLayer(128, 256, 3, 1, 0),
  ),
  512: (
    ExtraLayer(256, 512, 3, 2, 1),
    ExtraLayer(128, 256, 3, 2, 1),
    ExtraLayer(128, 256, 3, 2, 1),
    ExtraLayer(128, 256, 3, 2, 1),
    ExtraLayer(128, 256, 4, 1, 1),
  ),
}
