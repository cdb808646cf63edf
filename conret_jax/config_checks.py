"""Start-up checks of a config: every inconsistency fails here, with the key named, before anything compiles.

Unknown keys are already refused by ml_collections when a flag names them (`--config.trian.seed=1`); these checks
cover values that are individually valid but cannot work together.
"""

import ml_collections

from conret_jax import stages
from conret_jax.coco_metrics import BACKENDS
from conret_jax.data import sizes
from conret_jax.defaults import schedule_steps
from conret_jax.detectors import FAMILIES
from conret_jax.errors import ConfigError
from conret_jax.model.conv_lowering import CONV_LOWERINGS
from conret_jax.model.detector import COMPUTE_DTYPES as _DTYPES
from conret_jax.model.detector import MATMUL_PRECISIONS
from conret_jax.model.heads import VARIANTS as _VARIANTS
from conret_jax.model.resnet import DEPTHS
from conret_jax.model.resnet import NORMS as _NORMS

_DEPTHS = tuple(sorted(DEPTHS))
_RESIZE = sizes.RESIZE_MODES
_CLASS_LAYOUTS = ('contiguous', 'category_id')
_FAMILIES = tuple(sorted(FAMILIES))
_SOURCES = ('tfds', 'coco_json', 'tfrecord', 'shapes')  # data/sources.py (which imports TensorFlow)
_COCO_BACKENDS = ('auto',) + BACKENDS


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the offending config key."""
  m, d = config.model, config.data
  _check(m.family in _FAMILIES, f'config.model.family={m.family!r} must be one of {_FAMILIES}')
  _check(m.num_classes >= 1, f'config.model.num_classes={m.num_classes} must be >= 1')
  _check(m.backbone.depth in _DEPTHS, f'config.model.backbone.depth={m.backbone.depth} must be one of {_DEPTHS}')
  _check(m.backbone.norm in _NORMS, f'config.model.backbone.norm={m.backbone.norm!r} must be one of {_NORMS}')
  _check(0 <= m.backbone.freeze_at <= 5, f'config.model.backbone.freeze_at={m.backbone.freeze_at} must be in [0, 5]')
  _check(m.head.variant in _VARIANTS, f'config.model.head.variant={m.head.variant!r} must be one of {_VARIANTS}')
  _check(m.compute_dtype in _DTYPES, f'config.model.compute_dtype={m.compute_dtype!r} must be one of {sorted(_DTYPES)}')
  _check(
    m.matmul_precision in MATMUL_PRECISIONS,
    f'config.model.matmul_precision={m.matmul_precision!r} must be one of {tuple(MATMUL_PRECISIONS)}',
  )
  _check(
    m.conv_lowering in CONV_LOWERINGS,
    f'config.model.conv_lowering={m.conv_lowering!r} must be one of {CONV_LOWERINGS}',
  )
  _check(
    3 <= m.fpn.min_level <= 5 <= m.fpn.max_level,
    f'config.model.fpn levels P{m.fpn.min_level}-P{m.fpn.max_level}: need 3 <= min_level <= 5 <= max_level '
    '(C3-C5 feed the pyramid)',
  )
  _check(d.resize in _RESIZE, f'config.data.resize={d.resize!r} must be one of {_RESIZE}')
  for split in ('train', 'eval'):
    _check(d[split].source in _SOURCES, f'config.data.{split}.source={d[split].source!r} must be one of {_SOURCES}')
  stride = 2**m.fpn.max_level
  _check(
    sizes.PAD_MULTIPLE % stride == 0,
    f'config.model.fpn.max_level={m.fpn.max_level}: the input pipeline pads to multiples of {sizes.PAD_MULTIPLE}, '
    f'which the stride {stride} must divide',
  )
  if d.resize == 'square':
    _check(
      d.image_size % stride == 0,
      f'config.data.image_size={d.image_size} cannot be tiled by the anchors: the padded side must be a '
      f'multiple of the largest stride {stride} (P{m.fpn.max_level}); '
      f'try {max(stride, d.image_size // stride * stride)}',
    )
  _check(
    m.class_layout in _CLASS_LAYOUTS, f'config.model.class_layout={m.class_layout!r} must be one of {_CLASS_LAYOUTS}'
  )
  _check(len(d.scale_jitter) == 2, f'config.data.scale_jitter={tuple(d.scale_jitter)} must be (low, high)')
  lo, hi = d.scale_jitter
  _check(0 < lo <= hi, f'config.data.scale_jitter={tuple(d.scale_jitter)} must satisfy 0 < low <= high')
  if d.resize == 'short_side' and (lo, hi) != (1.0, 1.0):
    _check(
      hi <= 1.0,
      f'config.data.scale_jitter={tuple(d.scale_jitter)}: with resize=short_side the short side is '
      f'drawn below image_size={d.image_size} (high <= 1); raise image_size for larger scales',
    )
    scales = sizes.short_side_scales(d)
    _check(
      len(scales) > 1,
      f'config.data.scale_jitter={tuple(d.scale_jitter)} would do nothing: no short side '
      f'other than {scales[0]} lies in steps of {sizes.SCALE_STEP} from image_size={d.image_size} within the range',
    )
  _check(d.max_boxes >= 1, f'config.data.max_boxes={d.max_boxes} must be >= 1')
  t = config.train
  _check(t.global_batch_size >= 1, f'config.train.global_batch_size={t.global_batch_size} must be >= 1')
  _check(t.num_steps >= 1, f'config.train.num_steps={t.num_steps} must be >= 1')
  _check(t.learning_rate > 0, f'config.train.learning_rate={t.learning_rate} must be > 0')
  _check_schedule(t)
  _check(t.log_every_steps >= 1, f'config.train.log_every_steps={t.log_every_steps} must be >= 1')
  _check(
    config.checkpoint.every_steps >= 1, f'config.checkpoint.every_steps={config.checkpoint.every_steps} must be >= 1'
  )
  _check(config.checkpoint.keep >= 1, f'config.checkpoint.keep={config.checkpoint.keep} must be >= 1')
  _check(config.eval.every_steps >= 0, f'config.eval.every_steps={config.eval.every_steps} must be >= 0')
  _check(t.skip_nonfinite_steps >= 0, f'config.train.skip_nonfinite_steps={t.skip_nonfinite_steps} must be >= 0')
  e = config.eval
  _check(e.visualize >= 0, f'config.eval.visualize={e.visualize} must be >= 0')
  _check(
    0.0 <= e.visualize_score_threshold <= 1.0,
    f'config.eval.visualize_score_threshold={e.visualize_score_threshold} must be in [0, 1]',
  )
  _check(
    e.coco_backend in _COCO_BACKENDS, f'config.eval.coco_backend={e.coco_backend!r} must be one of {_COCO_BACKENDS}'
  )
  stages.validate(config)


def _check_schedule(t) -> None:
  """Absolute warm-up and decay steps inside the run: one outside it would silently do nothing."""
  _check(t.warmup_steps >= -1, f'config.train.warmup_steps={t.warmup_steps} must be >= 0, or -1 for warmup_fraction')
  _check(0 <= t.warmup_fraction < 1, f'config.train.warmup_fraction={t.warmup_fraction} must be in [0, 1)')
  _check(
    all(0 < f < 1 for f in t.decay_fractions),
    f'config.train.decay_fractions={tuple(t.decay_fractions)} must lie in (0, 1)',
  )
  _, decays = schedule_steps(t)
  _check(
    t.warmup_steps < t.num_steps,
    f'config.train.warmup_steps={t.warmup_steps} does not end within '
    f'config.train.num_steps={t.num_steps}; leave it at -1 to warm up for warmup_fraction of the run',
  )
  _check(list(decays) == sorted(decays), f'decay steps {decays} must be increasing')
  late = [b for b in t.decay_steps if not 0 < b < t.num_steps]
  _check(
    not late,
    f'config.train.decay_steps={tuple(t.decay_steps)}: {late} lie outside (0, num_steps='
    f'{t.num_steps}) and would never apply; leave decay_steps empty to decay at decay_fractions of the run',
  )


def frozen_layers(config: ml_collections.ConfigDict) -> str:
  """What the backbone keeps frozen, in words ('' if nothing): frozen_bn statistics, and layers below freeze_at."""
  b = config.model.backbone
  parts = []
  if b.norm == 'frozen_bn':
    parts.append("norm='frozen_bn'")
  if b.freeze_at > 0:
    parts.append(f'freeze_at={b.freeze_at}')
  return ', '.join(parts)


def validate_training(config: ml_collections.ConfigDict) -> None:
  """Start-up checks of a training run, on top of `validate`: no silently random frozen backbone."""
  validate(config)
  frozen = frozen_layers(config)
  if frozen and not config.init_from and not config.model.backbone.allow_random_frozen:
    depth = config.model.backbone.depth
    raise ConfigError(
      f'config.model.backbone has frozen layers ({frozen}) but config.init_from is empty: they would keep '
      f'their random initial values for the whole run. Import ImageNet weights first, e.g. '
      f'`conret-import --format=torchvision_resnet --input=resnet{depth}.pth --output=weights/r{depth}` '
      f"(or --format=detectron_resnet --input=R-{depth}.pkl, the paper's weights), then pass "
      f'--config.init_from=weights/r{depth}. To train anyway, set --config.model.backbone.allow_random_frozen=true.'
    )
