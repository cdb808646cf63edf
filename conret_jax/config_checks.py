"""Start-up checks of a config: every inconsistency fails here, with the key named, before anything compiles.

Unknown keys are already refused by ml_collections when a flag names them (`--config.trian.seed=1`); these checks
cover values that are individually valid but cannot work together.
"""

import ml_collections

from conret_jax import consistent
from conret_jax.data.preprocess import PAD_MULTIPLE
from conret_jax.model.detector import COMPUTE_DTYPES as _DTYPES
from conret_jax.model.heads import VARIANTS as _VARIANTS
from conret_jax.model.resnet import DEPTHS, NORMS as _NORMS

_DEPTHS = tuple(sorted(DEPTHS))
_RESIZE = ('square', 'short_side')


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the offending config key."""
  m, d = config.model, config.data
  _check(m.num_classes >= 1, f'config.model.num_classes={m.num_classes} must be >= 1')
  _check(m.backbone.depth in _DEPTHS, f'config.model.backbone.depth={m.backbone.depth} must be one of {_DEPTHS}')
  _check(m.backbone.norm in _NORMS, f'config.model.backbone.norm={m.backbone.norm!r} must be one of {_NORMS}')
  _check(0 <= m.backbone.freeze_at <= 5, f'config.model.backbone.freeze_at={m.backbone.freeze_at} must be in [0, 5]')
  _check(m.head.variant in _VARIANTS, f'config.model.head.variant={m.head.variant!r} must be one of {_VARIANTS}')
  _check(m.compute_dtype in _DTYPES,
         f'config.model.compute_dtype={m.compute_dtype!r} must be one of {sorted(_DTYPES)}')
  _check(3 <= m.fpn.min_level <= 5 <= m.fpn.max_level,
         f'config.model.fpn levels P{m.fpn.min_level}-P{m.fpn.max_level}: need 3 <= min_level <= 5 <= max_level '
         '(C3-C5 feed the pyramid)')
  _check(d.resize in _RESIZE, f'config.data.resize={d.resize!r} must be one of {_RESIZE}')
  stride = 2 ** m.fpn.max_level
  _check(PAD_MULTIPLE % stride == 0,
         f'config.model.fpn.max_level={m.fpn.max_level}: the input pipeline pads to multiples of {PAD_MULTIPLE}, '
         f'which the stride {stride} must divide')
  if d.resize == 'square':
    _check(d.image_size % stride == 0,
           f'config.data.image_size={d.image_size} cannot be tiled by the anchors: the padded side must be a '
           f'multiple of the largest stride {stride} (P{m.fpn.max_level}); try {max(stride, d.image_size // stride * stride)}')
  lo, hi = d.scale_jitter
  _check(0 < lo <= hi, f'config.data.scale_jitter={tuple(d.scale_jitter)} must satisfy 0 < low <= high')
  _check(d.max_boxes >= 1, f'config.data.max_boxes={d.max_boxes} must be >= 1')
  t = config.train
  _check(t.global_batch_size >= 1, f'config.train.global_batch_size={t.global_batch_size} must be >= 1')
  _check(t.num_steps >= 1, f'config.train.num_steps={t.num_steps} must be >= 1')
  _check(t.learning_rate > 0, f'config.train.learning_rate={t.learning_rate} must be > 0')
  _check(t.log_every_steps >= 1, f'config.train.log_every_steps={t.log_every_steps} must be >= 1')
  _check(config.checkpoint.every_steps >= 1,
         f'config.checkpoint.every_steps={config.checkpoint.every_steps} must be >= 1')
  _check(config.checkpoint.keep >= 1, f'config.checkpoint.keep={config.checkpoint.keep} must be >= 1')
  _check(config.eval.every_steps >= 0, f'config.eval.every_steps={config.eval.every_steps} must be >= 0')
  consistent.validate(config)
