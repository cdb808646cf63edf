"""ResNet v1 backbone (NHWC, flax.linen) returning C3, C4, C5 (or any run of C2..C5).

Module names follow torchvision's (`conv1`, `norm1`, `layer1`..`layer4`, `block<j>`, `downsample_conv`), so the
weight importers map names mechanically (conret_jax/weights).

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
decay would move them otherwise): see `trainable_mask`.
"""

import math

import flax.linen as nn
import jax

from conret_jax.model.layers import NORMS, Compute, Norm

# depth -> (block kind, blocks per stage res2..res5)
DEPTHS = {
  18: ('basic', (2, 2, 2, 2)),
  34: ('basic', (3, 4, 6, 3)),
  50: ('bottleneck', (3, 4, 6, 3)),
  101: ('bottleneck', (3, 4, 23, 3)),
  152: ('bottleneck', (3, 8, 36, 3)),
}


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


class BasicBlock(nn.Module):
  """ResNet-18/34 block: 3x3 (stride) -> 3x3, identity or 1x1 projection shortcut. Output `features` channels."""

  features: int
  stride: int
  norm: str
  compute: Compute = Compute()
  frozen: bool = False
  stride_in_1x1: bool = False  # unused: a basic block has no 1x1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda name: Norm(self.norm, self.frozen, name=name)
    conv = self.compute.conv
    y = nn.relu(norm('norm1')(conv(self.features, 3, self.stride, name='conv1')(x), train))
    y = norm('norm2')(conv(self.features, 3, 1, name='conv2')(y), train)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = norm('downsample_norm')(conv(self.features, 1, self.stride, name='downsample_conv')(x), train)
    return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
  """ResNet-50+ block: 1x1 -> 3x3 -> 1x1 (x4 channels). The stride sits on the 3x3 (torchvision, "ResNet v1.5")
  or on the first 1x1 (stride_in_1x1: Caffe2/Detectron MSRA weights)."""

  features: int
  stride: int
  norm: str
  compute: Compute = Compute()
  frozen: bool = False
  stride_in_1x1: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda name: Norm(self.norm, self.frozen, name=name)
    conv = self.compute.conv
    s1, s3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
    out = self.features * 4
    y = nn.relu(norm('norm1')(conv(self.features, 1, s1, name='conv1')(x), train))
    y = nn.relu(norm('norm2')(conv(self.features, 3, s3, name='conv2')(y), train))
    y = norm('norm3')(conv(out, 1, 1, name='conv3')(y), train)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != out:
      shortcut = norm('downsample_norm')(conv(out, 1, self.stride, name='downsample_conv')(x), train)
    return nn.relu(y + shortcut)


class ResNetStage(nn.Module):
  """One stage res<k>: `num_blocks` blocks, the first one strided."""

  block: str
  num_blocks: int
  features: int
  stride: int
  norm: str
  compute: Compute = Compute()
  frozen: bool = False
  stride_in_1x1: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    cls = Bottleneck if self.block == 'bottleneck' else BasicBlock
    for j in range(self.num_blocks):
      stride = self.stride if j == 0 else 1
      block = cls(self.features, stride, self.norm, self.compute, self.frozen, self.stride_in_1x1, name=f'block{j}')
      x = block(x, train)
    return x


class ResNet(nn.Module):
  """ResNet v1 trunk without the classifier.

  __call__(x [B, H, W, 3] (normalized pixels, compute dtype), train) -> (C2, C3, C4, C5)[first_output - 2:] with
  strides 4, 8, 16, 32 and channels `stage_channels(depth, width)`; by default (C3, C4, C5), what an FPN takes.
  `num_stages` < 4 stops after res<num_stages + 1> (an SSD backbone that ends at C4); `last_stage_stride` = 1 takes
  the stride out of that last stage (SSD-ResNet's conv4_x, which keeps stride 8: model/ssd_resnet.py).
  """

  depth: int = 50
  width: int = 64
  norm: str = 'frozen_bn'
  freeze_at: int = 2
  stride_in_1x1: bool = False
  compute: Compute = Compute()
  first_output: int = 3  # the first C<k> returned
  num_stages: int = 4
  last_stage_stride: int = 2

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.depth not in DEPTHS:
      raise ValueError(f'backbone.depth must be one of {sorted(DEPTHS)}, got {self.depth}')
    frozen = frozen_module_names(self.freeze_at)
    block, counts = DEPTHS[self.depth]
    x = self.compute.conv(self.width, 7, 2, name='conv1')(x)
    x = nn.relu(Norm(self.norm, 'norm1' in frozen, name='norm1')(x, train))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
    if self.freeze_at >= 1:
      x = jax.lax.stop_gradient(x)
    outputs = []
    for i, n in enumerate(counts[: self.num_stages]):
      name = f'layer{i + 1}'
      stride = 1 if i == 0 else self.last_stage_stride if i == self.num_stages - 1 else 2
      stage = ResNetStage(
        block, n, self.width * 2**i, stride, self.norm, self.compute, name in frozen, self.stride_in_1x1, name=name
      )
      x = stage(x, train)
      if name in frozen:
        x = jax.lax.stop_gradient(x)
      outputs.append(x)
    return tuple(outputs[self.first_output - 2 :])


def resnet_from_config(backbone_config, compute: Compute) -> ResNet:
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
    compute=compute,
    name='backbone',
  )


def trainable_mask(params, freeze_at: int, backbone: str = 'backbone'):
  """Pytree of bool like `params`: False for the frozen prefix (stem, res2, ... per freeze_at) of the ResNet named
  `backbone` at the top of the tree.

  The forward pass already stops gradients at the end of the frozen prefix; the train step must also mask the
  optimizer update with this (e.g. optax.masked), or weight decay would still move those parameters.
  """
  frozen = frozen_module_names(freeze_at)

  def keep(path, _):
    keys = [getattr(p, 'key', None) for p in path]
    return not (len(keys) > 1 and keys[0] == backbone and keys[1] in frozen)

  return jax.tree_util.tree_map_with_path(keep, params)


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
