"""A detector as the train step, inference and evaluation see it: a network, its anchors, its loss, its decoding.

  detector = detectors.from_config(config)        (or from_config(config, module) to reuse a built network)
  outputs = detector.module.apply(variables, images, train=...)
  anchors = detector.anchors(image_hw)                            [A, 4]
  loss, metrics = detector.loss(outputs, anchors, batch)          training
  logits, boxes = detector.decode(outputs, anchors)               inference: [B, A, K], [B, A, 4] before NMS
  detector.level_counts(image_hw)                                 anchors per pyramid level (post-processing)

None of these callers names a family. A family (config.model.family) is a model module, a loss module and a
config; adding one means adding those and its entry in FAMILIES below, not editing the step.
"""

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import ml_collections

from conret_jax import consistent, stages
from conret_jax.model import detector as retinanet
from conret_jax.model.anchor_spec import AnchorSpec


@dataclasses.dataclass(frozen=True)
class Detector:
  module: nn.Module  # apply(variables, images [B, H, W, 3] float32 RGB 0..255, train) -> outputs
  anchors: Callable  # image_hw -> [A, 4] float32 x1y1x2y2
  level_counts: Callable  # image_hw -> anchors per level, in the anchors' order
  loss: Callable  # (outputs, anchors [A, 4], batch) -> (scalar loss, metrics)
  decode: Callable  # (outputs, anchors) -> (logits [B, A, K], boxes [B, A, 4]) for post-processing


def _retinanet(config: ml_collections.ConfigDict, module: nn.Module | None) -> Detector:
  spec = AnchorSpec.from_config(config.model)
  m = config.model
  steps, weights, clamp = stages.inference_steps(config), tuple(m.box_weights), float(m.box_clamp)

  def decode(outputs, anchors):
    return retinanet.decode_stages(outputs, anchors, steps=steps, box_weights=weights, clamp=clamp)

  return Detector(
    module=module or retinanet.RetinaNet.from_config(config),
    anchors=spec.anchors,
    level_counts=spec.level_counts,
    loss=consistent.ConsistentLoss.from_config(config),
    decode=decode,
  )


FAMILIES = {'retinanet': _retinanet}


def from_config(config: ml_collections.ConfigDict, module: nn.Module | None = None) -> Detector:
  """The detector of `config` (config.model.family), around `module` if given (it must be that config's network)."""
  family = config.model.family
  if family not in FAMILIES:
    raise ValueError(f'config.model.family={family!r} must be one of {sorted(FAMILIES)}')
  return FAMILIES[family](config, module)
