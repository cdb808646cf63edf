"""Input sizes, as plain Python (no TensorFlow): the padded shapes a config produces and its training scales.

The model compiles one program per padded shape, so every batch must come in one of a small fixed set:
  square      {'square': (S, S)}: the long side resized to S (times the scale jitter), padded to S x S
  short_side  {'landscape': (S', L'), 'portrait': (L', S')}: the short side resized to S, the long side capped
              at max_size (Detectron), both padded up to multiples of PAD_MULTIPLE (S', L')
  stretch     {'square': (S, S)}: warped to S x S, aspect not kept, nothing padded (SSD's resize); the bucket is
              named by its shape, as for 'square', since the model and the batching see the same S x S input
Scale jitter in training: 'square' multiplies the scale by a random factor in scale_jitter (and crops what falls
outside S x S); 'short_side' draws each image's short side from `short_side_scales` (Detectron's multi-scale
training, e.g. 640..800 in steps of 32 for scale 800 and jitter (0.8, 1.0)), so its buckets stay those of S;
'stretch' takes none (config.data.augment='ssd' varies scale and framing by its own zoom-out and crop).
"""

import math

PAD_MULTIPLE = 128  # padded sides are multiples of the largest FPN stride (2**7)
SCALE_STEP = 32  # short_side jitter: training short sides are image_size - k * 32 (Detectron's SCALES)
RESIZE_MODES = ('square', 'short_side', 'stretch')


def round_up(x: int, multiple: int = PAD_MULTIPLE) -> int:
  return int(math.ceil(x / multiple) * multiple)


def padded_shapes(data_config) -> dict:
  """The static input shapes this config produces: {'square': (S, S)} or {'landscape': .., 'portrait': ..}."""
  if data_config.resize in ('square', 'stretch'):
    return {'square': (int(data_config.image_size), int(data_config.image_size))}
  if data_config.resize == 'short_side':
    short, long = round_up(int(data_config.image_size)), round_up(int(data_config.max_size))
    return {'landscape': (short, long), 'portrait': (long, short)}
  raise ValueError(f'config.data.resize must be one of {RESIZE_MODES}, got {data_config.resize!r}')


def short_side_scales(data_config) -> tuple[int, ...]:
  """Training short sides for 'short_side' resizing, ascending: image_size - k * SCALE_STEP for every k >= 0 with
  the result in [low, high] * image_size (scale_jitter = (low, high), high <= 1). (image_size,) without jitter."""
  size = int(data_config.image_size)
  low, high = (float(v) for v in data_config.scale_jitter)
  scales = [s for s in range(size, 0, -SCALE_STEP) if low * size - 1e-6 <= s <= high * size + 1e-6]
  return tuple(sorted(scales)) or (size,)


def pad_value_of(model_config) -> tuple:
  """The RGB value (0..255) padding takes: config.model.pad_pixels 'mean' is the normalization's mean, which the
  network sees as zero (torchvision and Detectron pad the normalized image with zeros); 'black' is 0, what runs
  trained before the key existed saw."""
  return tuple(float(v) for v in model_config.pixel_mean) if model_config.pad_pixels == 'mean' else (0.0, 0.0, 0.0)
