"""A detector family as every caller sees it: the only module that knows which families exist.

  detector = detectors.from_config(config)     config.model.family's detector (config checked); from_config(config,
                                               module) reuses a built network
  outputs = detector.module.apply(variables, images, train=...)
  anchors = detector.anchors(image_hw)                            [A, 4]
  loss, metrics = detector.loss(outputs, anchors, batch)          training
  logits, boxes = detector.decode(outputs, anchors)               inference: [B, A, K], [B, A, 4] before NMS
  detector.level_counts(image_hw)                                 anchors per level (post-processing)
  detector.trainable_mask(params)                                 False for the frozen prefix
  detector.input_size                                             the input sizes the network takes
  detector.name                                                   e.g. 'ConRetinaNet', for reports
  detectors.input_size(config)                                    the same, from the config alone (no JAX)

  detectors.validate(config)            the family's own config checks (config_checks.validate calls them)
  detectors.validate_training(config)   and those of training (e.g. a frozen backbone needs init_from)
  detectors.build_model(config)     the network; init_variables(model, rng, image_hw) its fresh variables

No caller names a family or reads a family's own config keys (tests/test_seam.py checks it). Adding a family means
adding its modules (network, loss, anchors) and one entry in FAMILIES below. A key that only other families own,
set away from its default, would do nothing: `validate` refuses it.

`decode` returns logits whose sigmoid is each class's score for every family, so post-processing is one code path:
a softmax family (SSD) turns its K + 1 softmax logits into K such logits (core/softmax_scores.py).
"""

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from conret_jax import consistent, defaults, multibox
from conret_jax.core.softmax_scores import foreground_logits
from conret_jax.errors import ConfigError
from conret_jax.model import resnet, retinanet, ssd
from conret_jax.model.anchor_spec import AnchorSpec
from conret_jax.stages import Stages


@dataclasses.dataclass(frozen=True)
class InputSize:
  """The input sizes a network takes: sides that are multiples of `multiple`, and, if `fixed` is not empty, square
  inputs of exactly one of those sides (SSD's 300 or 512)."""

  multiple: int = 1
  fixed: tuple = ()

  def problem(self, hw) -> str:
    """'' if an input of hw = (height, width) is accepted, else what is wrong with it."""
    h, w = (int(v) for v in hw)
    if self.fixed and not (h == w and h in self.fixed):
      return f'{h}x{w} is not one of the square sizes {self.fixed} this detector takes'
    if h % self.multiple or w % self.multiple:
      return f'{h}x{w} is not divisible by {self.multiple}; pad images at the bottom/right to a multiple of it'
    return ''

  def smallest(self) -> tuple[int, int]:
    """The smallest accepted (height, width): parameters do not depend on the size, so initialization uses it."""
    side = min(self.fixed) if self.fixed else self.multiple
    return side, side


@dataclasses.dataclass(frozen=True)
class Detector:
  module: nn.Module  # apply(variables, images [B, H, W, 3] float32 RGB 0..255, train) -> outputs
  anchors: Callable  # image_hw -> [A, 4] float32 x1y1x2y2
  level_counts: Callable  # image_hw -> anchors per level, in the anchors' order
  loss: Callable  # (outputs, anchors [A, 4], batch) -> (scalar loss, metrics)
  decode: Callable  # (outputs, anchors) -> (logits [B, A, K], boxes [B, A, 4]) for post-processing
  trainable_mask: Callable  # params -> pytree of bool like params, False where frozen
  input_size: InputSize
  name: str


@dataclasses.dataclass(frozen=True)
class Family:
  """One entry of FAMILIES: how to build the family's detector and check its config, and the config keys that are
  the family's own (dotted prefixes under config): only its modules read them."""

  build: Callable  # (config, module or None) -> Detector; the config is already validated
  validate: Callable  # config -> None, ConfigError naming the key
  validate_training: Callable  # config -> None, the checks only training needs
  input_size: Callable  # config -> InputSize, without building anything (start-up checks run before JAX starts)
  own_keys: tuple = ()


def _retinanet(config: ml_collections.ConfigDict, module: nn.Module | None) -> Detector:
  stages = Stages.from_config(config)
  spec = AnchorSpec.from_config(config.model)
  return Detector(
    module=module or retinanet.RetinaNet.from_config(config, stages.num_reg_terms),
    anchors=spec.anchors,
    level_counts=spec.level_counts,
    loss=consistent.ConsistentLoss.from_config(config),
    decode=stages.decode,
    trainable_mask=functools.partial(resnet.trainable_mask, freeze_at=int(config.model.backbone.freeze_at)),
    input_size=_retinanet_input_size(config),
    name='ConRetinaNet' if config.consistent.enabled else 'RetinaNet',
  )


def _retinanet_input_size(config: ml_collections.ConfigDict) -> InputSize:
  return InputSize(multiple=retinanet.size_multiple(config.model))


def _ssd(config: ml_collections.ConfigDict, module: nn.Module | None) -> Detector:
  stages = Stages.from_config(config)
  spec = ssd.default_box_spec(config.model.ssd)
  side = spec.image_size

  def anchors(image_hw):
    if tuple(int(v) for v in image_hw) != (side, side):
      raise ValueError(f'SSD{side} has default boxes for {side}x{side} inputs, not {tuple(image_hw)}')
    return spec.boxes()

  def decode(outputs, default_boxes):
    logits, boxes = stages.decode(outputs, default_boxes)
    return foreground_logits(logits), boxes

  return Detector(
    module=module or ssd.SSD.from_config(config, stages.num_reg_terms),
    anchors=anchors,
    level_counts=lambda image_hw: spec.counts(),
    loss=multibox.MultiBoxLoss.from_config(config),
    decode=decode,
    trainable_mask=functools.partial(ssd.trainable_mask, ssd_config=config.model.ssd),
    input_size=_ssd_input_size(config),
    name='ConSSD' if config.consistent.enabled else 'SSD',
  )


def _ssd_input_size(config: ml_collections.ConfigDict) -> InputSize:
  return InputSize(fixed=(int(config.model.ssd.image_size),))


def _validate_ssd(config: ml_collections.ConfigDict) -> None:
  ssd.validate(config.model)
  multibox.validate(config)


FAMILIES = {
  'retinanet': Family(
    build=_retinanet,
    validate=lambda c: retinanet.validate(c.model),
    validate_training=retinanet.validate_training,
    input_size=_retinanet_input_size,
    own_keys=(
      'model.backbone',
      'model.fpn',
      'model.head',
      'model.anchors',
      'loss.focal_alpha',
      'loss.focal_gamma',
      'loss.smooth_l1_beta',
    ),
  ),
  'ssd': Family(
    build=_ssd,
    validate=_validate_ssd,
    validate_training=ssd.validate_training,
    input_size=_ssd_input_size,
    own_keys=(
      'model.ssd',
      'loss.neg_pos_ratio',
      'loss.min_negatives',
      'loss.refined_negatives',
      'loss.smooth_l1_beta',
    ),
  ),
}


def family_of(config: ml_collections.ConfigDict) -> Family:
  family = config.model.family
  if family not in FAMILIES:
    raise ConfigError(f'config.model.family={family!r} must be one of {tuple(sorted(FAMILIES))}')
  return FAMILIES[family]


def _plain(value):
  """A config value as plain, comparable Python: ConfigDicts as dicts, lists as tuples (a json round trip's)."""
  if isinstance(value, (ml_collections.ConfigDict, dict)):
    return {k: _plain(v) for k, v in dict(value).items()}
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def _changed(value, default, key: str):
  """(dotted key, value) of the first leaf under `key` that differs from its default, or None."""
  if isinstance(default, dict):
    for name in default:
      found = _changed(value[name], default[name], f'{key}.{name}')
      if found:
        return found
    return None
  return None if value == default else (key, value)


def _check_other_families_keys(config: ml_collections.ConfigDict) -> None:
  """ConfigError for a key owned only by other families and set away from its default: it would do nothing."""
  family = config.model.family
  mine = set(FAMILIES[family].own_keys)
  base = _plain(defaults.base_config())
  plain = _plain(config)
  for name, other in FAMILIES.items():
    for key in other.own_keys:
      if name == family or key in mine:
        continue
      section, leaf = key.split('.', 1)
      found = _changed(plain[section][leaf], base[section][leaf], f'config.{key}')
      if found:
        raise ConfigError(
          f'{found[0]}={found[1]!r} does nothing for config.model.family={family!r}: only the {name!r} family reads '
          f'it; leave it at its default'
        )


def validate(config: ml_collections.ConfigDict) -> None:
  """The family's checks of its own config keys, and of config.consistent, which every family reads; other
  families' keys must keep their defaults."""
  family_of(config).validate(config)
  _check_other_families_keys(config)
  Stages.from_config(config)


def validate_training(config: ml_collections.ConfigDict) -> None:
  family_of(config).validate_training(config)


def input_size(config: ml_collections.ConfigDict) -> InputSize:
  """The input sizes the config's network takes, read from the config alone."""
  return family_of(config).input_size(config)


def from_config(config: ml_collections.ConfigDict, module: nn.Module | None = None) -> Detector:
  """The detector of `config` (config.model.family), around `module` if given (it must be that config's network)."""
  validate(config)
  return family_of(config).build(config, module)


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  """The network of `config`, whatever its family (the public `conret_jax.build_model`)."""
  return from_config(config).module


def init_variables(model: nn.Module, rng, image_hw, batch_size: int = 1) -> dict:
  """Fresh variables of a network: {'params': ..., and its other collections ('frozen', 'batch_stats')}, float32.

  Shapes do not depend on image_hw (any size the network takes); use jax.eval_shape on this to get shapes without
  computing.
  """
  images = jnp.zeros((batch_size, *image_hw, 3), jnp.float32)
  return dict(jax.jit(lambda r, x: model.init(r, x, train=False))(rng, images))
