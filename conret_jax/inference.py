"""Batched, jitted inference: images -> detections.

  detect(model, variables, images [B, H, W, 3] float32 RGB 0..255, config)
    -> dict(boxes [B, D, 4] float32 x1y1x2y2 in input pixels, scores [B, D] float32, classes [B, D] int32,
            valid [B, D] bool), D = config.eval.max_detections, sorted by score; zeros where not valid.

H and W may be anything divisible by 2**fpn.max_level (128 for P3-P7); anchors follow the input's static shape. The
jitted function is cached per (model, config), so repeated calls with the same image shape do not retrace.
Decoding is the detector's (conret_jax/detectors.py), then core.nms.postprocess with config.eval.*.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections

from conret_jax import detectors
from conret_jax.core import nms


def check_image_shape(shape, config) -> None:
  """ValueError unless `shape` is [B, H, W, 3] with H, W divisible by 2**max_level."""
  stride = 2**config.model.fpn.max_level
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f'images must be [B, H, W, 3] RGB, got shape {tuple(shape)}')
  if shape[1] % stride or shape[2] % stride:
    raise ValueError(
      f'image size {shape[1]}x{shape[2]} is not divisible by {stride} (2**fpn.max_level); pad the '
      f'images at the bottom/right to a multiple of {stride}'
    )


@functools.lru_cache(maxsize=16)
def _detect_fn(model, config: ml_collections.FrozenConfigDict):
  detector = detectors.from_config(config, model)
  e = config.eval

  def run(variables, images):
    hw = images.shape[1:3]
    outputs = detector.module.apply(variables, images.astype(jnp.float32), train=False)
    logits, boxes = detector.decode(outputs, detector.anchors(hw))
    return nms.postprocess(
      logits,
      boxes,
      detector.level_counts(hw),
      hw,
      score_threshold=e.score_threshold,
      topk_per_level=e.topk_per_level,
      nms_iou=e.nms_iou,
      max_detections=e.max_detections,
    )

  return jax.jit(run)


def detect(model, variables, images, config) -> dict:
  """Detections for a batch of images; see the module docstring."""
  check_image_shape(jnp.shape(images), config)
  frozen = config if isinstance(config, ml_collections.FrozenConfigDict) else ml_collections.FrozenConfigDict(config)
  return _detect_fn(model, frozen)(variables, images)
