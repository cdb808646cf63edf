"""Box geometry: IoU, the anchor-relative box coder, clipping and format conversion.

Boxes are x1y1x2y2 float32 pixels. Width is x2 - x1 (no +1) and the centre is x1 + w / 2, as torchvision's BoxCoder
and detectron2's Box2BoxTransform. Every function computes in float32 whatever the input dtype (bfloat16 deltas
from a mixed-precision head would otherwise lose the offsets' low bits).
"""

from collections.abc import Sequence

import jax.numpy as jnp

from conret_jax.core.constants import BOX_DELTA_CLAMP


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def area(boxes) -> jnp.ndarray:
  """[..., 4] -> [...]; degenerate boxes (x2 < x1 or y2 < y1) have area 0."""
  b = _f32(boxes)
  return jnp.maximum(b[..., 2] - b[..., 0], 0.0) * jnp.maximum(b[..., 3] - b[..., 1], 0.0)


def pairwise_iou(boxes1, boxes2) -> jnp.ndarray:
  """IoU of every pair: boxes1 [..., N, 4], boxes2 [..., M, 4] -> [..., N, M] float32.

  Leading dimensions broadcast. A pair whose union is empty (two zero-area boxes) has IoU 0, never NaN.
  """
  b1 = _f32(boxes1)[..., :, None, :]
  b2 = _f32(boxes2)[..., None, :, :]
  iw = jnp.maximum(jnp.minimum(b1[..., 2], b2[..., 2]) - jnp.maximum(b1[..., 0], b2[..., 0]), 0.0)
  ih = jnp.maximum(jnp.minimum(b1[..., 3], b2[..., 3]) - jnp.maximum(b1[..., 1], b2[..., 1]), 0.0)
  inter = iw * ih
  union = area(b1) + area(b2) - inter
  return jnp.where(union > 0.0, inter / jnp.where(union > 0.0, union, 1.0), 0.0)


def _centre_size(b):
  w = b[..., 2] - b[..., 0]
  h = b[..., 3] - b[..., 1]
  return b[..., 0] + 0.5 * w, b[..., 1] + 0.5 * h, w, h


def encode(boxes, anchors, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> jnp.ndarray:
  """Regression targets that take `anchors` to `boxes`: both [..., 4] (broadcast) -> deltas [..., 4].

  dx = wx * (cx - cx_a) / w_a, dy likewise, dw = ww * log(w / w_a), dh likewise. Anchors must have positive
  width and height; boxes too (a zero-size box gives -inf: encode only matched, real boxes).
  """
  wx, wy, ww, wh = weights
  cx, cy, w, h = _centre_size(_f32(boxes))
  ax, ay, aw, ah = _centre_size(_f32(anchors))
  return jnp.stack([wx * (cx - ax) / aw, wy * (cy - ay) / ah, ww * jnp.log(w / aw), wh * jnp.log(h / ah)], axis=-1)


def decode(
  deltas, anchors, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), clamp: float = BOX_DELTA_CLAMP
) -> jnp.ndarray:
  """Boxes from deltas relative to anchors: both [..., 4] (broadcast) -> boxes [..., 4] x1y1x2y2 float32.

  dw and dh are clamped from above at `clamp` before exp() so a wild prediction cannot overflow.
  """
  wx, wy, ww, wh = weights
  d = _f32(deltas)
  ax, ay, aw, ah = _centre_size(_f32(anchors))
  dw = jnp.minimum(d[..., 2] / ww, clamp)
  dh = jnp.minimum(d[..., 3] / wh, clamp)
  cx = d[..., 0] / wx * aw + ax
  cy = d[..., 1] / wy * ah + ay
  half_w = 0.5 * jnp.exp(dw) * aw
  half_h = 0.5 * jnp.exp(dh) * ah
  return jnp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)


def clip_boxes(boxes, image_hw: Sequence[int]) -> jnp.ndarray:
  """Clamp x to [0, W] and y to [0, H]: [..., 4] -> [..., 4] float32."""
  h, w = image_hw
  b = _f32(boxes)
  hi = jnp.asarray([w, h, w, h], jnp.float32)
  return jnp.clip(b, 0.0, hi)


def xyxy_to_xywh(boxes) -> jnp.ndarray:
  """x1y1x2y2 -> x, y (top-left corner), w, h (COCO's bbox format): [..., 4] -> [..., 4]."""
  b = _f32(boxes)
  return jnp.concatenate([b[..., :2], b[..., 2:] - b[..., :2]], axis=-1)


def xywh_to_xyxy(boxes) -> jnp.ndarray:
  """x, y (top-left corner), w, h -> x1y1x2y2: [..., 4] -> [..., 4]."""
  b = _f32(boxes)
  return jnp.concatenate([b[..., :2], b[..., :2] + b[..., 2:]], axis=-1)
