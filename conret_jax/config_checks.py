"""Start-up checks of a config: every inconsistency fails here, with the key named, before anything compiles.

Unknown keys are already refused by ml_collections when a flag names them (`--config.trian.seed=1`); these checks
cover values that are individually valid but cannot work together.
"""

import ml_collections

from conret_jax import detectors
from conret_jax.coco_metrics import BACKENDS
from conret_jax.data import sizes
from conret_jax.defaults import schedule_steps
from conret_jax.errors import ConfigError
from conret_jax.model.conv_lowering import CONV_LOWERINGS
from conret_jax.model.layers import COMPUTE_DTYPES, MATMUL_PRECISIONS

_RESIZE = sizes.RESIZE_MODES
_AUGMENTS = ('none', 'ssd')  # data/preprocess.py (which imports TensorFlow)
_CLASS_LAYOUTS = ('contiguous', 'category_id')
_SOURCES = ('tfds', 'coco_json', 'tfrecord', 'shapes')  # data/sources.py (which imports TensorFlow)
_COCO_BACKENDS = ('auto',) + BACKENDS


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (a ValueError) naming the offending config key."""
  _check_model(config.model)
  detectors.validate(config)  # the family's own keys and config.consistent
  _check_data(config.data)
  _check_augment(config.data)
  _check_input_size(config)
  _check_train(config.train)
  _check_schedule(config.train)
  _check_eval(config)


def _check_model(m) -> None:
  """The keys every family reads."""
  _check(m.num_classes >= 1, f'config.model.num_classes={m.num_classes} must be >= 1')
  _check(
    m.class_layout in _CLASS_LAYOUTS, f'config.model.class_layout={m.class_layout!r} must be one of {_CLASS_LAYOUTS}'
  )
  dtypes = tuple(sorted(COMPUTE_DTYPES))
  _check(m.compute_dtype in dtypes, f'config.model.compute_dtype={m.compute_dtype!r} must be one of {dtypes}')
  _check(
    m.matmul_precision in MATMUL_PRECISIONS,
    f'config.model.matmul_precision={m.matmul_precision!r} must be one of {tuple(MATMUL_PRECISIONS)}',
  )
  _check(m.pad_pixels in ('mean', 'black'), f"config.model.pad_pixels={m.pad_pixels!r} must be 'mean' or 'black'")
  _check(
    m.conv_lowering in CONV_LOWERINGS,
    f'config.model.conv_lowering={m.conv_lowering!r} must be one of {CONV_LOWERINGS}',
  )


def _check_data(d) -> None:
  _check(d.resize in _RESIZE, f'config.data.resize={d.resize!r} must be one of {_RESIZE}')
  for split in ('train', 'eval'):
    _check(d[split].source in _SOURCES, f'config.data.{split}.source={d[split].source!r} must be one of {_SOURCES}')
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


def _check_augment(d) -> None:
  """SSD's augmentation needs its stretch resize; settings it would ignore or repeat are refused."""
  _check(d.augment in _AUGMENTS, f'config.data.augment={d.augment!r} must be one of {_AUGMENTS}')
  _check(
    d.augment != 'ssd' or d.resize == 'stretch',
    f"config.data.augment='ssd' needs config.data.resize='stretch' (SSD's warp to image_size x image_size), "
    f'not {d.resize!r}',
  )
  _check(
    d.resize != 'stretch' or tuple(d.scale_jitter) == (1.0, 1.0),
    f"config.data.scale_jitter={tuple(d.scale_jitter)} would do nothing with config.data.resize='stretch' (every "
    f"image is warped to image_size x image_size); augment='ssd' varies the scale by its zoom-out and crop",
  )
  _check(
    d.augment != 'ssd' or not d.random_flip,
    "config.data.random_flip=True with config.data.augment='ssd' would flip twice (the SSD augmentation flips "
    'itself, p 0.5): set config.data.random_flip=False',
  )


def _check_input_size(config: ml_collections.ConfigDict) -> None:
  """Every padded shape the pipeline produces must be one the detector takes."""
  d = config.data
  rule = detectors.input_size(config)  # from the config alone: no network, no JAX backend before distributed start-up
  _check(
    d.resize != 'short_side' or sizes.PAD_MULTIPLE % rule.multiple == 0,
    f"config.data.resize=short_side pads to multiples of {sizes.PAD_MULTIPLE}, which the detector's input "
    f'multiple {rule.multiple} must divide',
  )
  for name, hw in sizes.padded_shapes(d).items():
    problem = rule.problem(hw)
    if problem and d.resize in ('square', 'stretch') and not rule.fixed:
      side = max(rule.multiple, d.image_size // rule.multiple * rule.multiple)
      problem = f'{problem}; try {side}'
    _check(not problem, f'config.data.image_size={d.image_size} ({d.resize}, {name} inputs): {problem}')


def _check_train(t) -> None:
  _check(t.global_batch_size >= 1, f'config.train.global_batch_size={t.global_batch_size} must be >= 1')
  _check(t.num_steps >= 1, f'config.train.num_steps={t.num_steps} must be >= 1')
  _check(t.learning_rate > 0, f'config.train.learning_rate={t.learning_rate} must be > 0')
  _check(t.log_every_steps >= 1, f'config.train.log_every_steps={t.log_every_steps} must be >= 1')
  _check(t.skip_nonfinite_steps >= 0, f'config.train.skip_nonfinite_steps={t.skip_nonfinite_steps} must be >= 0')


def _check_eval(config: ml_collections.ConfigDict) -> None:
  k, e = config.checkpoint, config.eval
  _check(k.every_steps >= 1, f'config.checkpoint.every_steps={k.every_steps} must be >= 1')
  _check(k.keep >= 1, f'config.checkpoint.keep={k.keep} must be >= 1')
  _check(e.every_steps >= 0, f'config.eval.every_steps={e.every_steps} must be >= 0')
  _check(e.visualize >= 0, f'config.eval.visualize={e.visualize} must be >= 0')
  _check(e.topk_per_class >= 0, f'config.eval.topk_per_class={e.topk_per_class} must be >= 0 (0: per level)')
  _check(e.num_images >= 0, f'config.eval.num_images={e.num_images} must be >= 0 (0: every image)')
  _check(e.global_batch_size >= 1, f'config.eval.global_batch_size={e.global_batch_size} must be >= 1')
  _check(
    0.0 <= e.visualize_score_threshold <= 1.0,
    f'config.eval.visualize_score_threshold={e.visualize_score_threshold} must be in [0, 1]',
  )
  _check(
    e.coco_backend in _COCO_BACKENDS, f'config.eval.coco_backend={e.coco_backend!r} must be one of {_COCO_BACKENDS}'
  )


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


def _check_jitter_reaches_below_the_cap(d) -> None:
  """short_side scales an image of short side a, long side b by min(s / a, max_size / b) (preprocess.base_scale),
  with s one of short_side_scales in training. b >= a, so every s >= max_size gives max_size / b: when all the
  jitter's short sides are >= max_size, they all give the same scale and the jitter does nothing. A training check
  only: evaluating or resuming such a run (it pads more than it needs, nothing worse) stays possible."""
  if d.resize != 'short_side' or tuple(d.scale_jitter) == (1.0, 1.0):
    return
  scales = sizes.short_side_scales(d)
  _check(
    min(scales) < d.max_size,
    f'config.data.scale_jitter={tuple(d.scale_jitter)} would do nothing: its short sides {min(scales)}-{max(scales)} '
    f'are all >= config.data.max_size={d.max_size}, whose long-side cap then sets every scale; raise max_size '
    'or lower image_size',
  )


def validate_training(config: ml_collections.ConfigDict) -> None:
  """Start-up checks of a training run, on top of `validate`: no silently random frozen backbone, no scale jitter
  that the long-side cap undoes."""
  validate(config)
  _check_jitter_reaches_below_the_cap(config.data)
  detectors.validate_training(config)
