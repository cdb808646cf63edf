"""SSD / ConSSD (Liu et al. 2016; the paper's Table 5): pixel normalization -> base network (model/vgg.py or
model/ssd_resnet.py) -> extra layers (model/ssd_extras.py) -> one 3x3 conv per source and output, and what its
family entry (conret_jax/detectors.py) needs of it: the network of a config, its default boxes and config checks.

`model.apply(variables, images [B, S, S, 3] float32 RGB 0..255, train=False)`, S = config.model.ssd.image_size (300
or 512), returns dict(cls_logits=(one [B, A, K + 1] float32,), box_deltas=tuple of [B, A, 4] float32): softmax
logits with index 0 the background and class k at k + 1 (multibox.py's convention), one box regression per
regression stage. A is the default boxes' count (8732 at 300, 24564 at 512) in their order (source, row, column, box
in location: core/default_boxes.py), which is each conv's [B, h, w, n * C] output reshaped to [B, h * w * n, C].

Head: per source i, `cls<i>` (n_i * (K + 1) outputs) and, per regression stage s, `box<s>_<i>` (n_i * 4). Consistent
optimization adds only box1_<i> (and box2_<i> for a third stage): the offset from the box refined by box0 to its
ground truth, on the same source features, like the consistent RetinaNet head (Fig. 4(d)); the classifier is shared
by every classification term. Init: xavier uniform, zero bias (torchvision's SSD).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from conret_jax.core.default_boxes import DefaultBoxSpec, boxes_per_location, ssd_scales
from conret_jax.errors import ConfigError
from conret_jax.model import resnet, ssd_resnet, vgg
from conret_jax.model.layers import NORMS, Compute, normalize
from conret_jax.model.ssd_extras import EXTRA_NORMS, Extras, extra_sizes

BACKBONES = ('vgg16', 'resnet18', 'resnet34', 'resnet50')
IMAGE_SIZES = (300, 512)


def _flatten(x, per_box: int):
  """[B, h, w, n * per_box] -> [B, h * w * n, per_box] float32."""
  b, h, w, c = x.shape
  return x.reshape(b, h * w * (c // per_box), per_box).astype(jnp.float32)


class SSDHead(nn.Module):
  """__call__(sources: tuple of [B, h_i, w_i, C_i]) -> dict(cls_logits, box_deltas); see the module docstring."""

  num_classes: int  # K, without the background
  boxes_per_location: tuple  # n_i per source
  num_stages: int = 1
  compute: Compute = Compute()

  def _conv(self, outputs: int, name: str):
    return self.compute.conv(outputs, 3, name=name, use_bias=True, kernel_init=nn.initializers.xavier_uniform())

  @nn.compact
  def __call__(self, sources):
    if len(sources) != len(self.boxes_per_location):
      raise ValueError(f'{len(sources)} sources, but default boxes for {len(self.boxes_per_location)}')
    k1 = self.num_classes + 1
    logits, deltas = [], [[] for _ in range(self.num_stages)]
    for i, (x, n) in enumerate(zip(sources, self.boxes_per_location)):
      logits.append(_flatten(self._conv(n * k1, f'cls{i}')(x), k1))
      for s in range(self.num_stages):
        deltas[s].append(_flatten(self._conv(n * 4, f'box{s}_{i}')(x), 4))
    return {
      'cls_logits': (jnp.concatenate(logits, axis=1),),
      'box_deltas': tuple(jnp.concatenate(d, axis=1) for d in deltas),
    }


class SSD(nn.Module):
  """Normalize pixels, then base network -> extra layers -> head. `from_config` builds it from a config."""

  backbone: nn.Module  # images -> tuple of its sources (VGG: conv4_3 normalized, fc7; ResNet: conv4_x)
  extras: Extras
  head: SSDHead
  pixel_mean: tuple
  pixel_std: tuple
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = normalize(images, self.pixel_mean, self.pixel_std, self.dtype)
    sources = tuple(self.backbone(x, train))
    return self.head(sources + self.extras(sources[-1], train))

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_stages: int) -> 'SSD':
    """The network of config.model (its `ssd` section) with `num_stages` box convs per source."""
    m = config.model
    s = m.ssd
    compute = Compute.from_config(m)
    if s.backbone == 'vgg16':
      backbone = vgg.VGG16(s.width_divisor, s.freeze_at, compute, name='backbone')
    else:
      backbone = ssd_resnet.trunk(_resnet_depth(s.backbone), s.width_divisor, s.norm, s.freeze_at, compute)
    return cls(
      backbone=backbone,
      extras=Extras(extra_layers(s), s.extra_norm, s.width_divisor, compute, name='extras'),
      head=SSDHead(m.num_classes, default_box_spec(s).per_location(), num_stages, compute, name='head'),
      pixel_mean=tuple(float(v) for v in m.pixel_mean),
      pixel_std=tuple(float(v) for v in m.pixel_std),
      dtype=compute.dtype,
    )


def _resnet_depth(backbone: str) -> int:
  return int(backbone[len('resnet') :])


def extra_layers(ssd_config) -> tuple:
  """The ExtraLayers of config.model.ssd's base network and input size."""
  table = vgg.VGG_EXTRAS if ssd_config.backbone == 'vgg16' else ssd_resnet.RESNET_EXTRAS
  return table[int(ssd_config.image_size)]


def source_sizes(ssd_config) -> tuple[int, ...]:
  """Sides of every source map (base network, then extra layers), computed without tracing the network."""
  size = int(ssd_config.image_size)
  base = vgg.source_sizes(size) if ssd_config.backbone == 'vgg16' else (ssd_resnet.source_size(size),)
  return base + extra_sizes(base[-1], extra_layers(ssd_config))


def default_box_spec(ssd_config) -> DefaultBoxSpec:
  """The default boxes of config.model.ssd: its sources' sizes, steps, aspect ratios and Caffe SSD's scales."""
  s = ssd_config
  sizes = source_sizes(s)
  return DefaultBoxSpec(
    image_size=int(s.image_size),
    feature_sizes=sizes,
    steps=tuple(float(v) for v in s.steps),
    scales=ssd_scales(len(sizes), int(s.min_ratio), int(s.max_ratio), int(s.first_ratio)),
    aspect_ratios=tuple(tuple(float(a) for a in r) for r in s.aspect_ratios),
    clip=bool(s.clip),
  )


def boxes_per_source(ssd_config) -> tuple[int, ...]:
  return tuple(boxes_per_location(r) for r in ssd_config.aspect_ratios)


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def validate(model_config) -> None:
  """ConfigError naming the key when config.model.ssd cannot work."""
  s = model_config.ssd
  key = 'config.model.ssd'
  _check(s.backbone in BACKBONES, f'{key}.backbone={s.backbone!r} must be one of {BACKBONES}')
  _check(s.image_size in IMAGE_SIZES, f'{key}.image_size={s.image_size} must be one of {IMAGE_SIZES}')
  _check(
    s.width_divisor >= 1 and 64 % s.width_divisor == 0,
    f'{key}.width_divisor={s.width_divisor} must divide 64 (every channel count is a multiple of 64)',
  )
  is_vgg = s.backbone == 'vgg16'
  norms = ('',) if is_vgg else NORMS
  _check(s.norm in norms, f'{key}.norm={s.norm!r} must be one of {norms} for backbone={s.backbone!r}')
  _check(s.extra_norm in EXTRA_NORMS, f'{key}.extra_norm={s.extra_norm!r} must be one of {EXTRA_NORMS}')
  top = len(vgg.VGG16_BLOCKS) if is_vgg else ssd_resnet.NUM_STAGES + 1
  what = 'VGG blocks conv1..conv<k>' if is_vgg else 'the stem, then res2..res<k>'
  _check(0 <= s.freeze_at <= top, f'{key}.freeze_at={s.freeze_at} must be in [0, {top}] ({what})')
  n = len(source_sizes(s))
  for name in ('aspect_ratios', 'steps'):
    _check(
      len(s[name]) == n,
      f'{key}.{name} has {len(s[name])} entries; the {n} sources of {s.backbone} at {s.image_size} need one each',
    )
  _check(all(v > 0 for v in s.steps), f'{key}.steps={tuple(s.steps)} must be > 0')
  _check(
    all(len(r) and all(a > 0 for a in r) for r in s.aspect_ratios),
    f'{key}.aspect_ratios={tuple(s.aspect_ratios)}: every source needs ratios > 0',
  )
  _check(
    0 < s.first_ratio and 0 < s.min_ratio < s.max_ratio,
    f'{key}: need 0 < first_ratio ({s.first_ratio}) and 0 < min_ratio ({s.min_ratio}) < max_ratio ({s.max_ratio})',
  )


def frozen_layers(ssd_config) -> str:
  """What the base network keeps frozen, in words ('' if nothing)."""
  s = ssd_config
  parts = ["norm='frozen_bn'"] if s.norm == 'frozen_bn' else []
  return ', '.join(parts + ([f'freeze_at={s.freeze_at}'] if s.freeze_at > 0 else []))


def validate_training(config: ml_collections.ConfigDict) -> None:
  """ConfigError when a frozen base network would train from random weights (no config.init_from)."""
  s = config.model.ssd
  frozen = frozen_layers(s)
  if not frozen or config.init_from or s.allow_random_frozen:
    return
  fmt, name = ('torchvision_vgg16', 'vgg16') if s.backbone == 'vgg16' else ('torchvision_resnet', s.backbone)
  raise ConfigError(
    f'config.model.ssd has frozen layers ({frozen}) but config.init_from is empty: they would keep their random '
    f'initial values for the whole run. Import ImageNet weights first, e.g. `conret-import --format={fmt} '
    f'--input={name}.pth --output=weights/{name}_ssd --config=<this config>`, then pass '
    f'--config.init_from=weights/{name}_ssd. To train anyway, set --config.model.ssd.allow_random_frozen=true.'
  )


def trainable_mask(params, ssd_config):
  """Pytree of bool like `params`: False for the frozen prefix of the base network (named 'backbone')."""
  if ssd_config.backbone != 'vgg16':
    return resnet.trainable_mask(params, int(ssd_config.freeze_at))
  frozen = vgg.frozen_module_names(int(ssd_config.freeze_at))

  def keep(path, _):
    keys = [getattr(p, 'key', None) for p in path]
    return not (len(keys) > 1 and keys[0] == 'backbone' and keys[1] in frozen)

  return jax.tree_util.tree_map_with_path(keep, params)
