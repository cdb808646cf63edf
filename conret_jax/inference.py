"""Batched, jitted inference: images -> detections.

  detect(model, variables, images [B, H, W, 3] float32 RGB 0..255, config, image_sizes=None [B, 2] (h, w))
    -> dict(boxes [B, D, 4] float32 x1y1x2y2 in input pixels, scores [B, D] float32, classes [B, D] int32,
            valid [B, D] bool), D = config.eval.max_detections, sorted by score; zeros where not valid.

H and W may be any size the detector takes (`Detector.input_size`: RetinaNet's multiples of 2**fpn.max_level, 128
for P3-P7); anchors follow the input's static shape. Images smaller than that are padded at the bottom/right; given
their true sizes (`image_sizes`), the padding is filled with the value the model was trained with
(config.model.pad_pixels: the normalization's mean, which the network sees as zero) whatever the caller put there,
and boxes are clipped to each image before post-processing, so the padding holds no detection. The jitted function
is cached per (model, config), so repeated calls with the same image shape do not retrace. Decoding is the
detector's (conret_jax/detectors.py), then core.nms.postprocess with config.eval.*.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from conret_jax import detectors
from conret_jax.core import nms
from conret_jax.data.sizes import pad_value_of


def check_image_shape(shape, detector: detectors.Detector) -> None:
  """ValueError unless `shape` is [B, H, W, 3] with an H x W the detector takes."""
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f'images must be [B, H, W, 3] RGB, got shape {tuple(shape)}')
  problem = detector.input_size.problem(shape[1:3])
  if problem:
    raise ValueError(f'image size {problem}')


def fill_padding(images, image_sizes, value) -> jax.Array:
  """images [B, H, W, 3] with every pixel outside each image's own (h, w) (image_sizes [B, 2]) set to `value` (RGB)."""
  h, w = images.shape[1:3]
  rows = jnp.arange(h)[None, :, None] < image_sizes[:, 0, None, None]
  cols = jnp.arange(w)[None, None, :] < image_sizes[:, 1, None, None]
  return jnp.where((rows & cols)[..., None], images, jnp.asarray(value, images.dtype))


def decode(detector: detectors.Detector, variables, images):
  """The network on images [B, H, W, 3] and the detector's decoding; traceable. Returns (anchors [A, 4],
  logits [B, A, K], boxes [B, A, 4] x1y1x2y2 after the inference regressions, unclipped)."""
  outputs = detector.module.apply(variables, images.astype(jnp.float32), train=False)
  anchors = detector.anchors(images.shape[1:3])
  logits, boxes = detector.decode(outputs, anchors)
  return anchors, logits, boxes


def postprocess(detector: detectors.Detector, logits, boxes, input_hw, eval_config, image_sizes=None) -> dict:
  """Detections (the module docstring's dict) from a detector's decoded logits [B, A, K] and boxes [B, A, 4] for an
  input of input_hw: core.nms.postprocess with config.eval's score threshold, top-k (per level, or per class when
  topk_per_class > 0), NMS IoU and max detections, boxes clipped to image_sizes [B, 2] (default: the whole input).
  Traceable."""
  e = eval_config
  return nms.postprocess(
    logits,
    boxes,
    detector.level_counts(input_hw),
    input_hw if image_sizes is None else image_sizes,
    score_threshold=e.score_threshold,
    topk_per_level=e.topk_per_level,
    topk_per_class=e.topk_per_class,
    nms_iou=e.nms_iou,
    max_detections=e.max_detections,
  )


def detection_fn(detector: detectors.Detector, config, *, per_image: bool = False):
  """The traceable inference of `config` (its eval settings and padding value): a function
  (variables, images [B, H, W, 3], image_sizes [B, 2] int32 (h, w)) -> the module docstring's detections.

  per_image: post-processing runs one image at a time (jax.lax.map over the batch). The detections are the same to
  the bit; it is the form jax2tf converts with a symbolic batch size, where a batched lax.top_k does not lower
  (conret_jax/export).
  """
  pad_value = pad_value_of(config.model)

  def run(variables, images, image_sizes):
    images = fill_padding(images.astype(jnp.float32), image_sizes, pad_value)
    _, logits, boxes = decode(detector, variables, images)
    hw = images.shape[1:3]
    if not per_image:
      return postprocess(detector, logits, boxes, hw, config.eval, image_sizes)

    def one(args):  # one image's logits [A, K], boxes [A, 4], size [2]
      dets = postprocess(detector, args[0][None], args[1][None], hw, config.eval, args[2][None])
      return jax.tree.map(lambda v: v[0], dets)

    return jax.lax.map(one, (logits, boxes, image_sizes))

  return run


@functools.lru_cache(maxsize=16)
def _detect_fn(model, config: ml_collections.FrozenConfigDict):
  detector = detectors.from_config(config, model)
  return detector, jax.jit(detection_fn(detector, config))


def detect(model, variables, images, config, image_sizes=None) -> dict:
  """Detections for a batch of images; see the module docstring. image_sizes: [B, 2] int (h, w) of each image inside
  its padded input, when the caller knows them (default: each image fills the whole input)."""
  frozen = config if isinstance(config, ml_collections.FrozenConfigDict) else ml_collections.FrozenConfigDict(config)
  detector, run = _detect_fn(model, frozen)
  shape = jnp.shape(images)
  check_image_shape(shape, detector)
  if image_sizes is None:
    image_sizes = np.broadcast_to(np.asarray(shape[1:3], np.int32), (shape[0], 2))
  return run(variables, images, image_sizes)
