"""Batched, jitted inference: images -> detections.

  detect(model, variables, images [B, H, W, 3] float32 RGB 0..255, config)
    -> dict(boxes [B, D, 4] float32 x1y1x2y2 in input pixels, scores [B, D] float32, classes [B, D] int32,
            valid [B, D] bool), D = config.eval.max_detections, sorted by score; zeros where not valid.

H and W may be any size the detector takes (`Detector.input_size`: RetinaNet's multiples of 2**fpn.max_level, 128
for P3-P7); anchors follow the input's static shape. The jitted function is cached per (model, config), so repeated
calls with the same image shape do not retrace.
Decoding is the detector's (conret_jax/detectors.py), then core.nms.postprocess with config.eval.*.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from conret_jax import detectors
from conret_jax.core import nms


def check_image_shape(shape, detector: detectors.Detector) -> None:
  """ValueError unless `shape` is [B, H, W, 3] with an H x W the detector takes."""
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f'images must be [B, H, W, 3] RGB, got shape {tuple(shape)}')
  problem = detector.input_size.problem(shape[1:3])
  if problem:
    raise ValueError(f'image size {problem}')


def decode(detector: detectors.Detector, variables, images):
  """The network on images [B, H, W, 3] and the detector's decoding; traceable. Returns (anchors [A, 4],
  logits [B, A, K], boxes [B, A, 4] x1y1x2y2 after the inference regressions, unclipped)."""
  outputs = detector.module.apply(variables, images.astype(jnp.float32), train=False)
  anchors = detector.anchors(images.shape[1:3])
  logits, boxes = detector.decode(outputs, anchors)
  return anchors, logits, boxes


def postprocess(detector: detectors.Detector, logits, boxes, image_hw, eval_config) -> dict:
  """Detections (the module docstring's dict) from a detector's decoded logits [B, A, K] and boxes [B, A, 4]:
  core.nms.postprocess with config.eval's score threshold, top-k, NMS IoU and max detections. Traceable."""
  e = eval_config
  return nms.postprocess(
    logits,
    boxes,
    detector.level_counts(image_hw),
    image_hw,
    score_threshold=e.score_threshold,
    topk_per_level=e.topk_per_level,
    nms_iou=e.nms_iou,
    max_detections=e.max_detections,
  )


@functools.lru_cache(maxsize=16)
def _detect_fn(model, config: ml_collections.FrozenConfigDict):
  detector = detectors.from_config(config, model)

  def run(variables, images):
    _, logits, boxes = decode(detector, variables, images)
    return postprocess(detector, logits, boxes, images.shape[1:3], config.eval)

  return detector, jax.jit(run)


def detect(model, variables, images, config) -> dict:
  """Detections for a batch of images; see the module docstring."""
  frozen = config if isinstance(config, ml_collections.FrozenConfigDict) else ml_collections.FrozenConfigDict(config)
  detector, run = _detect_fn(model, frozen)
  check_image_shape(jnp.shape(images), detector)
  return run(variables, images)
