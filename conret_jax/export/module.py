"""The SavedModel's tf.Module: a trained run's whole inference as TensorFlow functions.

  serving_default(images: uint8 [B, H, W, 3])    RGB, one H x W per call (any)
  serving_bytes(image_bytes: string [B])          encoded JPEG / PNG / GIF / BMP, each decoded at its own size
    -> boxes float32 [B, D, 4] x1y1x2y2 in each input image's own pixels, scores float32 [B, D], classes int64
       [B, D] the dataset's category ids (as in detections.json), num_detections int32 [B]; the first
       num_detections rows of each image hold its detections by descending score, the rest are 0 (classes -1).
  labels() -> {'category_ids': int64 [C], 'names': string [C]}   the classes the model names, as tf constants

The graph is the predictor's inference (conret_jax/predictor.py) step for step: data.preprocess.eval_resize (the
eval pipeline's scale rule and bilinear resize; 'stretch' warps to S x S) pads each image with the run's pad value;
the network, the decoding of every regression stage, top-k and NMS are `inference.detection_fn` of the run's config
(config.eval.*) converted by jax2tf; boxes are divided by the scale (sy, sx) and clipped to the image as
`evaluation.to_image_coords` does, and classes that stand for no category are dropped as `Predictor.predict` drops
them.

The network's convolutions carry config.model.matmul_precision themselves ('default': the backend's choice, as in
conret_jax.detect), so no jax.default_matmul_precision context is needed when TensorFlow traces them.

Shapes: the batch is symbolic, the padded input is not. Anchors, the FPN's levels and the per-level top-k are
computed from the input's static shape when the network is traced, so each padded shape is one converted function
(jax2tf cannot trace them with a symbolic height and width). 'square' and 'stretch' resizing have one padded shape;
'short_side' has two, landscape and portrait (data.sizes.padded_shapes): each image goes to its orientation's
function, and a serving_bytes batch that mixes orientations is split between them and put back together in order.
"""

import jax
import numpy as np
import tensorflow as tf
from jax.experimental import jax2tf

from conret_jax import detectors, inference
from conret_jax.data import decode, preprocess, sizes
from conret_jax.data.sizes import pad_value_of

OUTPUTS = ('boxes', 'scores', 'classes', 'num_detections')


def _variables(variables) -> tuple[list, object]:
  """The run's variables as named, non-trainable tf.Variables (a flat list) and the tree structure to rebuild."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  named = [
    tf.Variable(np.asarray(v), trainable=False, name='/'.join(str(getattr(k, 'key', k)) for k in path))
    for path, v in leaves
  ]
  return named, treedef


def _model_functions(predictor, weights, treedef, platforms) -> list:
  """Per padded shape (h, w): a TF function (images float32 [b, h, w, 3], sizes int32 [b, 2]) -> the raw
  detections of inference.detection_fn, in model-input pixels. Post-processing runs per image (jax.lax.map): a
  batched lax.top_k does not convert with a symbolic batch."""
  detector = detectors.from_config(predictor.config, predictor.model)
  run = jax.jit(inference.detection_fn(detector, predictor.config, per_image=True))
  functions = []
  for h, w in sizes.padded_shapes(predictor.config.data).values():
    converted = jax2tf.convert(
      run,
      polymorphic_shapes=[None, f'(b, {h}, {w}, 3)', '(b, 2)'],
      with_gradient=False,
      native_serialization_platforms=platforms,
    )
    spec = [tf.TensorSpec([None, h, w, 3], tf.float32), tf.TensorSpec([None, 2], tf.int32)]
    model = tf.function(
      lambda images, image_sizes, converted=converted: converted(
        jax.tree_util.tree_unflatten(treedef, weights), images, image_sizes
      ),
      input_signature=spec,
      autograph=False,
    )
    functions.append((model, (h, w)))
  return functions


def _empty(max_detections: int) -> dict:
  """Raw detections of no image: what a padded shape's function returns for a batch of 0 (not called then)."""
  d = max_detections
  return {
    'boxes': tf.zeros([0, d, 4], tf.float32),
    'scores': tf.zeros([0, d], tf.float32),
    'classes': tf.zeros([0, d], tf.int32),
    'valid': tf.zeros([0, d], tf.bool),
  }


def _run(functions, images, bucket, image_sizes, max_detections: int) -> dict:
  """Raw detections of padded images [B, >= h, >= w, 3], each image by its padded shape's function (bucket [B]
  indexes `functions`), in the input's order."""
  if len(functions) == 1:
    ((model, (h, w)),) = functions
    return model(tf.ensure_shape(images, [None, h, w, 3]), image_sizes)
  parts = tf.dynamic_partition(tf.range(tf.shape(images)[0]), tf.cast(bucket, tf.int32), len(functions))
  outputs = []
  for (model, (h, w)), part in zip(functions, parts):

    def run(model=model, part=part, h=h, w=w):  # only for a part that holds images: tf.cond runs one branch
      part_images = tf.ensure_shape(tf.gather(images, part)[:, :h, :w], [None, h, w, 3])
      return model(part_images, tf.gather(image_sizes, part))

    outputs.append(tf.cond(tf.size(part) > 0, run, lambda: _empty(max_detections)))
  return {k: tf.dynamic_stitch(parts, [o[k] for o in outputs]) for k in outputs[0]}


def _in_image(raw: dict, scale, image_hw, category_of) -> dict:
  """The signatures' outputs from raw detections: x / sx and y / sy of each image's scale [B, 2] (sy, sx), clipped
  to its image_hw [B, 2] (evaluation.to_image_coords), classes as category ids (category_of [K] int64, -1: none),
  the kept detections first (those whose class is a category, in score order)."""
  hw = tf.cast(image_hw, tf.float32)
  limits = tf.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], axis=-1)[:, None, :]
  factor = tf.stack([scale[:, 1], scale[:, 0], scale[:, 1], scale[:, 0]], axis=-1)[:, None, :]
  boxes = tf.clip_by_value(raw['boxes'] / factor, 0.0, limits)
  categories = tf.gather(category_of, raw['classes'])
  keep = raw['valid'] & (categories >= 0)
  order = tf.argsort(tf.cast(~keep, tf.int32), axis=1, stable=True)
  keep, take = tf.gather(keep, order, batch_dims=1), lambda x: tf.gather(x, order, batch_dims=1)
  return {
    'boxes': tf.where(keep[..., None], take(boxes), 0.0),
    'scores': tf.where(keep, take(raw['scores']), 0.0),
    'classes': tf.where(keep, take(categories), tf.constant(-1, tf.int64)),
    'num_detections': tf.reduce_sum(tf.cast(keep, tf.int32), axis=1),
  }


def _decoded(image_bytes, data_config, pad_value, canvas_hw) -> tuple:
  """Encoded images [B] -> (images float32 [B, *canvas_hw, 3] resized and padded (each to its padded shape, then
  to the canvas, which holds every padded shape), bucket [B], scale [B, 2] (sy, sx), size inside [B, 2], image size
  [B, 2])."""

  def one(data):
    image = decode.decode_image(data)
    hw = tf.shape(image)[:2]
    padded, scale, inside = preprocess.eval_resize(image, data_config, pad_value)
    canvas, _ = preprocess.pad_to(padded, canvas_hw, pad_value)
    bucket = preprocess.bucket_of(tf.cast(hw, tf.float32), data_config)
    return tf.ensure_shape(canvas, [*canvas_hw, 3]), bucket, scale, inside, hw

  spec = (
    tf.TensorSpec([*canvas_hw, 3], tf.float32),
    tf.TensorSpec([], tf.int64),
    tf.TensorSpec([2], tf.float32),
    tf.TensorSpec([2], tf.int32),
    tf.TensorSpec([2], tf.int32),
  )
  return tf.map_fn(one, image_bytes, fn_output_signature=spec)


def _resized(images, data_config, pad_value) -> tuple:
  """uint8 images [B, H, W, 3] of one size -> the same five as `_decoded` (the images in their padded shape)."""
  padded, scale, inside = preprocess.eval_resize(images, data_config, pad_value)
  b, hw = tf.shape(images)[0], tf.shape(images)[1:3]
  bucket = preprocess.bucket_of(tf.cast(hw, tf.float32), data_config)
  tile = lambda x: tf.tile(x[None], [b] + [1] * x.shape.rank)
  return padded, tile(bucket), tile(scale), tile(inside), tile(hw)


def build(predictor, platforms=None) -> tf.Module:
  """The tf.Module of `predictor` (a conret_jax.load Predictor): its variables, `serving_default`, `serving_bytes`
  and `labels` (module docstring). platforms: jax2tf's native_serialization_platforms (default: this backend).
  Trace it (signatures()) with export.stablehlo.portable_serialization active."""
  config = predictor.config
  module = tf.Module(name='conret_jax_detector')
  module.weights_list, treedef = _variables(jax.device_get(predictor.variables))
  functions = _model_functions(predictor, module.weights_list, treedef, platforms)
  pad_value, max_detections = pad_value_of(config.model), int(config.eval.max_detections)
  canvas_hw = tuple(max(hw[i] for _, hw in functions) for i in (0, 1))
  category_of = tf.constant(predictor.classes.category_of, tf.int64)

  def detections(images, bucket, scale, inside, image_hw):
    raw = _run(functions, images, bucket, inside, max_detections)
    return _in_image(raw, scale, image_hw, category_of)

  # A signature called with another dtype fails on the input_signature; with another shape, on the ensure_shape
  # (a concrete function checks dtypes only): "Shape of tensor images [64,64,3] is not compatible with expected
  # shape [?,?,?,3]".
  images_spec = tf.TensorSpec([None, None, None, 3], tf.uint8, name='images')
  module.serve_images = tf.function(
    lambda images: detections(*_resized(tf.ensure_shape(images, images_spec.shape), config.data, pad_value)),
    input_signature=[images_spec],
    autograph=False,
  )
  bytes_spec = tf.TensorSpec([None], tf.string, name='image_bytes')
  module.serve_bytes = tf.function(
    lambda image_bytes: detections(
      *_decoded(tf.ensure_shape(image_bytes, bytes_spec.shape), config.data, pad_value, canvas_hw)
    ),
    input_signature=[bytes_spec],
    autograph=False,
  )
  named = predictor.classes.category_of >= 0
  labels = {
    'category_ids': tf.constant(predictor.classes.category_of[named], tf.int64),
    'names': tf.constant(np.asarray(predictor.classes.class_names, object)[named].astype(str), tf.string),
  }
  module.labels = tf.function(lambda: labels, input_signature=[], autograph=False)
  return module


def signatures(module: tf.Module) -> dict:
  """The SavedModel's serving signatures of a `build` module: tf.functions with input signatures, which
  tf.saved_model.save traces (once, in its saving context; traced before, they would be traced again)."""
  return {'serving_default': module.serve_images, 'serving_bytes': module.serve_bytes}
