"""Image decoding inside tf.data: JPEG, PNG, GIF, BMP whatever the file extension says.

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
      lambda: tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8))
  image.set_shape([None, None, 3])
  return image


def image_shape(data: tf.Tensor) -> tf.Tensor:
  """[2] int32 (height, width) of an encoded image; reads only the header for JPEG, decodes other formats."""
  return tf.cond(
      tf.io.is_jpeg(data),
      lambda: tf.image.extract_jpeg_shape(data, tf.int32)[:2],
      lambda: tf.shape(decode_image(data), tf.int32)[:2])
