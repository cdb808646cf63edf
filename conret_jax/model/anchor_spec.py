"""RetinaNet's anchors of a config (config.model.fpn levels and config.model.anchors), read once:
AnchorSpec.from_config.

core.anchors computes anchors from plain arguments; this adapter holds them for a model and answers the three
questions its users ask: the anchors of an input size, the anchors per level (post-processing), and the anchors per
feature-map cell (the head's output channels).
"""

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp

from conret_jax.core import anchors as anchor_ops


@dataclasses.dataclass(frozen=True)
class AnchorSpec:
  min_level: int = 3
  max_level: int = 7
  base_scale: float = 4.0
  scales_per_octave: int = 3
  aspect_ratios: tuple = (0.5, 1.0, 2.0)
  sizes: tuple = ()
  offset: float = 0.5
  round_base: bool = False

  @classmethod
  def from_config(cls, model_config) -> 'AnchorSpec':
    """From config.model."""
    a, f = model_config.anchors, model_config.fpn
    return cls(
      min_level=int(f.min_level),
      max_level=int(f.max_level),
      base_scale=float(a.base_scale),
      scales_per_octave=int(a.scales_per_octave),
      aspect_ratios=tuple(a.aspect_ratios),
      sizes=tuple(tuple(s) for s in a.sizes),
      offset=float(a.offset),
      round_base=bool(a.round_base),
    )

  def anchors(self, image_hw: Sequence[int]) -> jnp.ndarray:
    """[A, 4] float32 x1y1x2y2 for an input of image_hw (order: core/anchors.py)."""
    return anchor_ops.generate_anchors(image_hw, **dataclasses.asdict(self))

  @property
  def per_location(self) -> int:
    return anchor_ops.anchors_per_location(
      self.min_level, self.max_level, self.base_scale, self.scales_per_octave, self.aspect_ratios, self.sizes
    )

  def level_counts(self, image_hw: Sequence[int]) -> tuple[int, ...]:
    return anchor_ops.level_counts(image_hw, self.min_level, self.max_level, self.per_location)
