import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
from core_reference import np_encode, np_iou, random_boxes
from hypothesis import given, settings
from hypothesis import strategies as st

from conret_jax.core import boxes
from conret_jax.defaults import BOX_DELTA_CLAMP


def loop_iou(b1, b2):
  """float64 loop IoU, independent of the vectorized references."""
  out = np.zeros((len(b1), len(b2)))
  for i, p in enumerate(np.asarray(b1, np.float64)):
    for j, q in enumerate(np.asarray(b2, np.float64)):
      iw = max(min(p[2], q[2]) - max(p[0], q[0]), 0)
      ih = max(min(p[3], q[3]) - max(p[1], q[1]), 0)
      union = max(p[2] - p[0], 0) * max(p[3] - p[1], 0) + max(q[2] - q[0], 0) * max(q[3] - q[1], 0) - iw * ih
      out[i, j] = iw * ih / union if union > 0 else 0.0
  return out


def np_decode(d, anchor, weights=(1.0, 1.0, 1.0, 1.0), clamp=BOX_DELTA_CLAMP):
  d = np.asarray(d, np.float64)
  wx, wy, ww, wh = weights
  aw, ah = anchor[2] - anchor[0], anchor[3] - anchor[1]
  ax, ay = anchor[0] + aw / 2, anchor[1] + ah / 2
  cx, cy = d[0] / wx * aw + ax, d[1] / wy * ah + ay
  w, h = math.exp(min(d[2] / ww, clamp)) * aw, math.exp(min(d[3] / wh, clamp)) * ah
  return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def edge_boxes():
  return np.array(
    [
      [0, 0, 0, 0],  # zero area at the origin
      [5, 5, 5, 20],  # zero width
      [10, 10, 20, 20],
      [10, 10, 20, 20],  # identical
      [-50, -50, 500, 500],  # larger than the image, partly outside
      [300, 300, 310, 320],  # outside a 256 image
      [0.01, 0.01, 0.02, 0.03],  # very small
      [0, 0, 4000, 3000],  # very large
      [20, 20, 10, 10],  # degenerate (x2 < x1)
    ],
    np.float32,
  )


def test_pairwise_iou_random_and_edges():
  rng = np.random.default_rng(0)
  b1 = np.concatenate([random_boxes(rng, 20), edge_boxes()])
  b2 = np.concatenate([edge_boxes(), random_boxes(rng, 15)])
  got = np.asarray(boxes.pairwise_iou(b1, b2))
  assert got.dtype == np.float32 and not np.isnan(got).any()
  np.testing.assert_allclose(got, loop_iou(b1, b2), rtol=1e-4, atol=1e-6)
  assert got[len(b1) - 7, 3] == 1.0  # identical boxes
  assert got[20, 0] == 0.0  # two zero-area boxes: 0, not NaN


def test_pairwise_iou_batched_jit_vmap():
  rng = np.random.default_rng(1)
  b1 = np.stack([random_boxes(rng, 7) for _ in range(3)])
  b2 = np.stack([random_boxes(rng, 5) for _ in range(3)])
  want = np.stack([np_iou(x, y) for x, y in zip(b1, b2)])
  np.testing.assert_allclose(np.asarray(jax.jit(boxes.pairwise_iou)(b1, b2)), want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.vmap(boxes.pairwise_iou)(b1, b2)), want, rtol=1e-6)
  # bfloat16 input is computed in float32.
  assert boxes.pairwise_iou(b1.astype(jnp.bfloat16), b2).dtype == jnp.float32


def test_encode_decode_against_reference():
  rng = np.random.default_rng(2)
  anchors = random_boxes(rng, 50, min_size=0.5, max_size=600)
  gt = np.concatenate(
    [
      random_boxes(rng, 45, min_size=0.5, max_size=600),
      [[0.01, 0.01, 0.03, 0.02], [0, 0, 5000, 4000], [-100, -100, 900, 900], [10, 10, 20, 20], [3, 4, 5, 6]],
    ]
  ).astype(np.float32)
  for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
    enc = np.asarray(jax.jit(boxes.encode, static_argnums=2)(gt, anchors, weights))
    want = np.stack([np_encode(g, a, weights) for g, a in zip(gt, anchors)])
    np.testing.assert_allclose(enc, want, rtol=1e-4, atol=1e-4)
    dec = np.asarray(boxes.decode(enc, anchors, weights, clamp=100.0))
    # float32 round trip: error relative to the larger of the box and its anchor.
    scale = np.maximum(np.abs(gt).max(-1), np.abs(anchors).max(-1))[:, None]
    assert np.all(np.abs(dec - gt) <= 1e-5 * scale + 1e-5), np.abs(dec - gt).max()
    deltas = rng.normal(0, 2, (50, 4)).astype(np.float32)
    want = np.stack([np_decode(d, a, weights) for d, a in zip(deltas, anchors)])
    np.testing.assert_allclose(np.asarray(boxes.decode(deltas, anchors, weights)), want, rtol=1e-4, atol=1e-3)


def test_decode_clamp_and_dtype():
  anchor = np.array([[0, 0, 16, 16]], np.float32)
  huge = jnp.array([[0, 0, 50.0, 50.0]], jnp.bfloat16)
  out = boxes.decode(huge, anchor)
  assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
  side = 16 * math.exp(BOX_DELTA_CLAMP)  # = 1000
  np.testing.assert_allclose(np.asarray(out)[0], [8 - side / 2, 8 - side / 2, 8 + side / 2, 8 + side / 2], rtol=1e-5)
  # Very negative deltas are not clamped from below: the box shrinks towards its centre.
  tiny = np.asarray(boxes.decode(np.array([[0, 0, -30.0, -30.0]], np.float32), anchor))[0]
  np.testing.assert_allclose(tiny, [8, 8, 8, 8], atol=1e-5)


def test_decode_broadcasts_and_vmaps():
  rng = np.random.default_rng(3)
  anchors = random_boxes(rng, 6, min_size=4, max_size=40)
  deltas = rng.normal(0, 0.5, (2, 6, 4)).astype(np.float32)
  want = np.stack([[np_decode(d, a) for d, a in zip(db, anchors)] for db in deltas])
  np.testing.assert_allclose(np.asarray(boxes.decode(deltas, anchors)), want, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(jax.vmap(boxes.decode, (0, None))(deltas, anchors)), want, rtol=1e-5, atol=1e-4)
  enc = jax.vmap(boxes.encode, (0, None))(want.astype(np.float32), anchors)
  np.testing.assert_allclose(np.asarray(enc), deltas, atol=1e-4)


def test_clip_convert_area():
  b = edge_boxes()
  clipped = np.asarray(jax.jit(boxes.clip_boxes, static_argnums=1)(b, (256, 128)))
  want = b.copy()
  want[:, 0::2] = np.clip(want[:, 0::2], 0, 128)
  want[:, 1::2] = np.clip(want[:, 1::2], 0, 256)
  np.testing.assert_array_equal(clipped, want)
  xywh = np.asarray(jax.vmap(boxes.xyxy_to_xywh)(b))
  np.testing.assert_allclose(xywh, np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], -1))
  np.testing.assert_allclose(np.asarray(boxes.xywh_to_xyxy(xywh)), b, rtol=1e-6, atol=1e-6)
  areas = np.asarray(jax.jit(boxes.area)(b))
  want_area = [max(x2 - x1, 0) * max(y2 - y1, 0) for x1, y1, x2, y2 in b.astype(np.float64)]
  np.testing.assert_allclose(areas, want_area, rtol=1e-5)


# Coordinates on a 1/64-pixel grid: boxes are pixels, and far below a pixel float32 products underflow (XLA:CPU also
# flushes subnormals to zero), which a float64 reference does not do: IoU 0 against 1 for a 1e-43-wide box.
_PIXELS = st.integers(0, 64_000).map(lambda v: v / 64)


@settings(max_examples=40, deadline=None)
@given(
  hnp.arrays(np.float32, (8, 4), elements=_PIXELS),
  hnp.arrays(np.float32, (8, 4), elements=st.floats(-3.0, 3.0, width=32)),
)
def test_hypothesis_iou_bounds_and_roundtrip(raw, deltas):
  b = np.concatenate([np.minimum(raw[:, :2], raw[:, 2:]), np.maximum(raw[:, :2], raw[:, 2:])], -1)
  iou = np.asarray(boxes.pairwise_iou(b, b))
  assert np.all((iou >= 0) & (iou <= 1))
  np.testing.assert_allclose(iou, loop_iou(b, b), atol=1e-5)
  anchors = b + np.array([0, 0, 1, 1], np.float32)  # positive size
  back = np.asarray(boxes.encode(boxes.decode(deltas, anchors), anchors))
  np.testing.assert_allclose(back, deltas, atol=2e-3)
