"""Per-example preprocessing on the host (tf.data): decode, random flip, resize + pad, ground truth padding.
Resize 'stretch' warps to S x S instead (data/ssd_augment.py), with SSD's augmentation in training when
config.data.augment='ssd'.

Input is a "raw example" (every source produces this layout; M = config.data.max_boxes):
  image_data string (encoded bytes), image_id int64, height/width int32, boxes [M, 4] float32 x1y1x2y2 in original
  pixels, classes [M] int32, crowd [M] bool, valid [M] bool, index int64 (global example index), example_valid bool.
Output is one row of a batch in the batch layout of conret_jax/data/__init__.py.

Randomness is stateless, seeded by (seed, index): the same example at the same global position gets the same flip
and jitter whichever host decodes it and however often the pipeline is restarted. The key splits into four seeds:
flip, scale jitter and crop (square, short_side), then SSD's augmentation; a split's first rows do not depend on
how many are drawn, so the first three are those of the three-way split that came before SSD (test_preprocess
checks it).
"""

import tensorflow as tf

from conret_jax.data import decode, ssd_augment
from conret_jax.data.sizes import padded_shapes, short_side_scales


def orientation(height, width) -> tf.Tensor:
  """Bucket of an image for short_side batching: 0 landscape (w >= h), 1 portrait."""
  return tf.cast(width < height, tf.int64)


def _uniform(seed, lo=0.0, hi=1.0):
  return tf.random.stateless_uniform([], seed=seed, minval=lo, maxval=hi)


def flip_horizontal(image, boxes, width):
  """image [H, W, C] and boxes [M, 4] x1y1x2y2 mirrored about the vertical axis of an image `width` wide."""
  x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
  return tf.reverse(image, axis=[1]), tf.stack([width - x2, y1, width - x1, y2], axis=-1)


def _resize(image, scale):
  """image [..., H, W, 3] -> float32 [..., round(H*scale), round(W*scale), 3] (bilinear)."""
  hw = tf.cast(tf.shape(image)[-3:-1], tf.float32)
  new_hw = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), 1)
  return tf.image.resize(image, new_hw, method='bilinear'), new_hw


def pad_to(image, hw, fill):
  """image [..., h, w, 3] at the top left of an [..., H, W, 3] canvas filled with `fill` (RGB, or a scalar).
  Returns (canvas, (h, w)). The fill is exact: normalized by a mean equal to it, padding is exactly zero."""
  image_hw = tf.shape(image)[-3:-1]
  inside = tf.pad(tf.ones(image_hw, tf.bool), [[0, hw[0] - image_hw[0]], [0, hw[1] - image_hw[1]]])
  lead = [[0, 0]] * (image.shape.rank - 3)  # batch dimensions, if any
  canvas = tf.pad(image, lead + [[0, hw[0] - image_hw[0]], [0, hw[1] - image_hw[1]], [0, 0]])
  fill = tf.broadcast_to(tf.cast(fill, image.dtype), tf.shape(canvas))
  return tf.where(inside[..., None], canvas, fill), image_hw


def base_scale(hw, data_config, short=None):
  """The resize factor of an image of hw = (h, w) float32 before any jitter: 'square' S / its long side;
  'short_side' min(short / its short side, max_size / its long side), short = image_size unless given."""
  h, w = hw[0], hw[1]
  if data_config.resize == 'square':
    return float(data_config.image_size) / tf.maximum(h, w)
  short = float(data_config.image_size) if short is None else short
  return tf.minimum(short / tf.minimum(h, w), float(data_config.max_size) / tf.maximum(h, w))


def bucket_of(hw, data_config):
  """Index into `padded_shapes(data_config).values()` of an image of hw = (h, w): 0 for 'square' and 'stretch';
  for 'short_side' `orientation` (0 landscape, 1 portrait)."""
  return orientation(hw[0], hw[1]) if data_config.resize == 'short_side' else tf.constant(0, tf.int64)


def eval_resize(image, data_config, fill):
  """The evaluation's resize: image [..., H, W, 3] (any dtype; a batch shares one H x W) resized by `base_scale`
  (bilinear) and padded at the bottom/right with `fill` (RGB) to its padded shape (`bucket_of`); 'stretch' warps it
  to S x S (ssd_augment.stretch_resize) and pads nothing.
  Returns (float32 [..., Hp, Wp, 3], scale float32 [2] (sy, sx) = resized / original, as Batch.scale, (h, w) int32
  [2] of the resized image inside)."""
  if data_config.resize == 'stretch':
    resized, _, scale = ssd_augment.stretch_resize(image, tf.zeros([0, 4]), int(data_config.image_size))
    return resized, scale, tf.shape(resized)[-3:-1]
  hw = tf.cast(tf.shape(image)[-3:-1], tf.float32)
  scale = base_scale(hw, data_config)
  resized, _ = _resize(image, scale)
  shapes = tf.constant(list(padded_shapes(data_config).values()), tf.int32)
  canvas, image_hw = pad_to(resized, shapes[bucket_of(hw, data_config)], fill)
  return canvas, tf.stack([scale, scale]), image_hw


def _square(image, boxes, data_config, *, train, scale_seed, crop_seed, fill):
  """Long side to S (times the jitter), a random S x S window when jitter makes it larger, padded to S x S with
  `fill`. Returns (image [S, S, 3], boxes, scale, the image's size inside the padding)."""
  size = int(data_config.image_size)
  scale = base_scale(tf.cast(tf.shape(image)[:2], tf.float32), data_config)
  lo, hi = (float(v) for v in data_config.scale_jitter)
  if train and (lo, hi) != (1.0, 1.0):
    scale = scale * _uniform(scale_seed, lo, hi)
  image, new_hw = _resize(image, scale)
  boxes = boxes * scale
  # Scale jitter above 1 makes the image larger than S: take a random S x S window and clip boxes to it.
  excess = tf.maximum(new_hw - size, 0)
  offset = tf.cast(
    tf.floor(tf.random.stateless_uniform([2], seed=crop_seed) * tf.cast(excess + 1, tf.float32)), tf.int32
  )
  offset = tf.minimum(offset, excess)
  crop_hw = tf.minimum(new_hw, size)
  image = image[offset[0] : offset[0] + crop_hw[0], offset[1] : offset[1] + crop_hw[1]]
  off = tf.cast(tf.stack([offset[1], offset[0], offset[1], offset[0]]), tf.float32)
  limit = tf.cast(tf.stack([crop_hw[1], crop_hw[0], crop_hw[1], crop_hw[0]]), tf.float32)
  boxes = tf.clip_by_value(boxes - off, 0.0, limit)
  image, image_hw = pad_to(image, (size, size), fill)
  image.set_shape([size, size, 3])
  return image, boxes, scale, image_hw


def _short_side(image, boxes, data_config, *, train, scale_seed, fill):
  """Short side to S (one of short_side_scales in training), long side at most max_size, padded to the landscape
  or portrait bucket with `fill`. Returns (image, boxes, scale, the image's size inside the padding)."""
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  short = None
  scales = short_side_scales(data_config)
  if train and len(scales) > 1:  # Detectron's multi-scale training: one short side per image
    pick = tf.random.stateless_uniform([], seed=scale_seed, maxval=len(scales), dtype=tf.int32)
    short = tf.cast(tf.gather(tf.constant(scales), pick), tf.float32)
  scale = base_scale(hw, data_config, short)
  image, _ = _resize(image, scale)
  shapes = tf.constant(list(padded_shapes(data_config).values()), tf.int32)
  image, image_hw = pad_to(image, shapes[bucket_of(hw, data_config)], fill)
  return image, boxes * scale, scale, image_hw


def _stretch(image, raw, boxes, data_config, *, train, seed, mean):
  """S x S, aspect not kept (ssd_augment.stretch): SSD's augmentation when training with augment='ssd', else the
  plain resize. Returns (image [S, S, 3], boxes, valid (rows the crop dropped are invalid), scale [2] (sy, sx))."""
  gt = {'boxes': boxes, 'classes': raw['classes'], 'crowd': raw['crowd'], 'valid': raw['valid']}
  augment = train and data_config.augment == 'ssd'
  image, gt, scale = ssd_augment.stretch(image, gt, data_config, train=augment, seed=seed, mean=mean)
  return image, gt['boxes'], gt['valid'], scale


def preprocess_example(
  raw: dict,
  data_config,
  *,
  train: bool,
  seed: int,
  class_table=None,
  pad_value=(0.0, 0.0, 0.0),
  pixel_mean=(0.0, 0.0, 0.0),
) -> dict:
  """raw example (layout above) -> one batch row; train enables flip and scale jitter (or SSD's augmentation).
  `class_table` [C] int32 maps the source's contiguous category numbers to the model's classes
  (data.info.ClassLayout.model_class; None: as is). `pad_value`: the RGB value padding takes (`pad_value_of`: the
  model's pixel mean, which it normalizes to zero). `pixel_mean`: RGB 0..255, the fill of SSD's zoom-out canvas
  (config.model.pixel_mean, as Caffe and torchvision fill it)."""
  image = decode.decode_image(raw['image_data'])
  hw = tf.shape(image)[:2]
  boxes, valid = raw['boxes'], raw['valid']
  key = tf.stack([tf.cast(seed, tf.int64), raw['index']])
  flip_seed, scale_seed, crop_seed, ssd_seed = tf.unstack(tf.random.experimental.stateless_split(key, 4))
  if train and data_config.random_flip:
    image, boxes = tf.cond(
      _uniform(flip_seed) < 0.5,
      lambda: flip_horizontal(image, boxes, tf.cast(hw[1], tf.float32)),
      lambda: (image, boxes),
    )
  if data_config.resize == 'stretch':
    image, boxes, valid, scale = _stretch(image, raw, boxes, data_config, train=train, seed=ssd_seed, mean=pixel_mean)
    image_hw = tf.shape(image)[:2]
  elif data_config.resize == 'square':
    image, boxes, scale, image_hw = _square(
      image, boxes, data_config, train=train, scale_seed=scale_seed, crop_seed=crop_seed, fill=pad_value
    )
  else:
    image, boxes, scale, image_hw = _short_side(
      image, boxes, data_config, train=train, scale_seed=scale_seed, fill=pad_value
    )

  classes = raw['classes'] if class_table is None else tf.gather(tf.constant(class_table, tf.int32), raw['classes'])
  # Boxes cropped away entirely (zero area) stop being ground truth; padding rows stay zero.
  valid = valid & ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
  boxes = tf.where(valid[:, None], boxes, 0.0)
  return {
    'images': image,
    'boxes': boxes,
    'classes': tf.where(valid, classes, 0),
    'valid': valid,
    'crowd': raw['crowd'] & valid,
    'image_id': tf.where(raw['example_valid'], tf.cast(raw['image_id'], tf.int32), -1),
    'orig_hw': tf.cast(hw, tf.int32),
    'scale': tf.broadcast_to(tf.cast(scale, tf.float32), [2]),  # (sy, sx); one factor repeated but for 'stretch'
    'input_hw': tf.cast(image_hw, tf.int32),
    'example_valid': raw['example_valid'],
  }
