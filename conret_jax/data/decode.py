"""Decoding inside tf.data, shared by every source: images (JPEG, PNG, GIF, BMP, WebP whatever the file extension says)
and ground truth padded to a fixed number of rows. coco_json.check_image_file drops at start-up what this cannot
decode or would misread (other formats, animated WebP, palette/compressed/low-bit BMP).

Facts checked on tf 2.21: decode_jpeg(channels=3) converts CMYK/YCCK JPEGs to RGB (within ~1 level of PIL's
conversion) and grayscale to 3 channels; decode_image(channels=3, expand_animations=False) does the same for PNG
(including 16-bit, scaled to uint8) and takes the first frame of a GIF. A JPEG cut short raises in decode_image, so
JPEGs go through decode_jpeg(try_recover_truncated=True), which returns what it could decode (the start-up check in
coco_json.py already drops files without an end marker).
"""

import tensorflow as tf


def decode_image(data: tf.Tensor) -> tf.Tensor:
  """data: scalar tf.string of encoded bytes -> [H, W, 3] uint8 RGB."""
  image = tf.cond(
    tf.io.is_jpeg(data),
    lambda: tf.io.decode_jpeg(data, channels=3, try_recover_truncated=True, acceptable_fraction=0.1),
    lambda: tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8),
  )
  image.set_shape([None, None, 3])
  return image


def image_shape(data: tf.Tensor) -> tf.Tensor:
  """[2] int32 (height, width) of an encoded image; reads only the header for JPEG, decodes other formats."""
  return tf.cond(
    tf.io.is_jpeg(data),
    lambda: tf.image.extract_jpeg_shape(data, tf.int32)[:2],
    lambda: tf.shape(decode_image(data), tf.int32)[:2],
  )


def pad_ground_truth(boxes, classes, crowd, max_boxes):
  """Ragged gt [k, ...] -> fixed [M, ...] rows plus the valid mask (rows beyond M are dropped)."""
  k = tf.minimum(tf.shape(classes)[0], max_boxes)
  pad = max_boxes - k
  return {
    'boxes': tf.pad(boxes[:k], [[0, pad], [0, 0]]),
    'classes': tf.pad(tf.cast(classes[:k], tf.int32), [[0, pad]]),
    'crowd': tf.pad(tf.cast(crowd[:k], tf.bool), [[0, pad]]),
    'valid': tf.range(max_boxes) < k,
  }
