"""RetinaNet / ConRetinaNet: pixel normalization -> ResNet -> FPN -> RetinaNet head, and what its family entry
(conret_jax/detectors.py) needs of it: the network of a config, its config checks and the sizes it takes.

`model.apply(variables, images [B, H, W, 3] float32 RGB 0..255, train=False)` returns
dict(cls_logits=tuple of [B, A, K] float32, box_deltas=tuple of [B, A, 4] float32) (layout in model/heads.py). With
backbone.norm='bn' and train=True pass `mutable=['batch_stats']`. H and W must be multiples of 2**fpn.max_level.
"""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from conret_jax.defaults import IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from conret_jax.errors import ConfigError
from conret_jax.model import resnet
from conret_jax.model.anchor_spec import AnchorSpec
from conret_jax.model.fpn import FPN, fpn_from_config
from conret_jax.model.heads import VARIANTS, RetinaHead
from conret_jax.model.layers import Compute, normalize


class RetinaNet(nn.Module):
  """Normalize pixels, then backbone -> FPN -> head. `from_config` builds it from a config; the module itself holds
  only its parts and plain values (hashable, so jitted callers cache by it)."""

  backbone: resnet.ResNet
  fpn: FPN
  head: RetinaHead
  pixel_mean: tuple = IMAGENET_PIXEL_MEAN
  pixel_std: tuple = IMAGENET_PIXEL_STD
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = normalize(images, self.pixel_mean, self.pixel_std, self.dtype)
    return self.head(self.fpn(self.backbone(x, train)))

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, num_stages: int) -> 'RetinaNet':
    """The network of config.model with `num_stages` box convs (one per regression stage)."""
    m = config.model
    compute = Compute.from_config(m)
    h = m.head
    head = RetinaHead(
      num_classes=m.num_classes,
      num_anchors=AnchorSpec.from_config(m).per_location,
      num_convs=h.num_convs,
      channels=h.channels,
      norm=h.norm,
      prior_prob=h.prior_prob,
      variant=h.variant,
      num_stages=num_stages,
      compute=compute,
    )
    return cls(
      backbone=resnet.resnet_from_config(m.backbone, compute),
      fpn=fpn_from_config(m.fpn, compute),
      head=head,
      pixel_mean=tuple(float(v) for v in m.pixel_mean),
      pixel_std=tuple(float(v) for v in m.pixel_std),
      dtype=compute.dtype,
    )


def size_multiple(model_config) -> int:
  """Input sides must be multiples of the largest stride, 2**fpn.max_level (128 for P3-P7)."""
  return 2 ** int(model_config.fpn.max_level)


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def validate(model_config) -> None:
  """ConfigError naming the key when config.model's RetinaNet sections (backbone, fpn, head) cannot work."""
  m = model_config
  b, f, h = m.backbone, m.fpn, m.head
  depths, norms = tuple(sorted(resnet.DEPTHS)), resnet.NORMS
  _check(b.depth in depths, f'config.model.backbone.depth={b.depth} must be one of {depths}')
  _check(b.norm in norms, f'config.model.backbone.norm={b.norm!r} must be one of {norms}')
  _check(0 <= b.freeze_at <= 5, f'config.model.backbone.freeze_at={b.freeze_at} must be in [0, 5]')
  _check(h.variant in VARIANTS, f'config.model.head.variant={h.variant!r} must be one of {VARIANTS}')
  _check(
    h.variant != 'gated_cascade' or h.channels == f.channels,
    f'config.model.head.channels={h.channels}: gated_cascade adds tower features to FPN features, so it must '
    f'equal config.model.fpn.channels={f.channels}',
  )
  _check(
    3 <= f.min_level <= 5 <= f.max_level,
    f'config.model.fpn levels P{f.min_level}-P{f.max_level}: need 3 <= min_level <= 5 <= max_level '
    '(C3-C5 feed the pyramid)',
  )


def frozen_layers(backbone_config) -> str:
  """What a ResNet backbone keeps frozen, in words ('' if nothing): frozen_bn statistics, and layers below freeze_at."""
  b = backbone_config
  parts = ["norm='frozen_bn'"] if b.norm == 'frozen_bn' else []
  return ', '.join(parts + ([f'freeze_at={b.freeze_at}'] if b.freeze_at > 0 else []))


def validate_training(config: ml_collections.ConfigDict) -> None:
  """ConfigError when a frozen ResNet backbone would train from random weights (no config.init_from)."""
  b = config.model.backbone
  frozen = frozen_layers(b)
  if frozen and not config.init_from and not b.allow_random_frozen:
    raise ConfigError(
      f'config.model.backbone has frozen layers ({frozen}) but config.init_from is empty: they would keep '
      f'their random initial values for the whole run. Import ImageNet weights first, e.g. '
      f'`conret-import --format=torchvision_resnet --input=resnet{b.depth}.pth --output=weights/r{b.depth}` '
      f"(or --format=detectron_resnet --input=R-{b.depth}.pkl, the paper's weights), then pass "
      f'--config.init_from=weights/r{b.depth}. To train anyway, set --config.model.backbone.allow_random_frozen=true.'
    )
