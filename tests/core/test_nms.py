import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_reference import np_greedy_nms
from hypothesis import given, settings
from hypothesis import strategies as st

from conret_jax.core.nms import batched_nms, postprocess

_nms = jax.jit(batched_nms, static_argnames=('iou_threshold', 'max_output', 'tile_size'))


def check_nms(boxes, scores, classes, valid, thr, max_out, tile):
  idx, ok = _nms(boxes, scores, classes, valid, iou_threshold=thr, max_output=max_out, tile_size=tile)
  idx, ok = np.asarray(idx), np.asarray(ok)
  assert idx.dtype == np.int32 and idx.shape == ok.shape == (boxes.shape[0], max_out)
  for b in range(boxes.shape[0]):
    want = np_greedy_nms(boxes[b], scores[b], classes[b], valid[b], thr, max_out)
    assert idx[b][ok[b]].tolist() == want  # same keep set, same order
    assert ok[b].tolist() == [True] * len(want) + [False] * (max_out - len(want))
    assert np.all(idx[b][~ok[b]] == 0)


def clustered(rng, b, n, num_classes):
  """Boxes in a few clusters (plenty of overlaps), some zero-area and out-of-image ones."""
  centres = rng.uniform(0, 200, (b, 6, 2))
  pick = rng.integers(0, 6, (b, n))
  c = np.take_along_axis(centres, pick[..., None], axis=1) + rng.normal(0, 6, (b, n, 2))
  wh = rng.uniform(8, 40, (b, n, 2))
  boxes = np.concatenate([c - wh / 2, c + wh / 2], -1).astype(np.float32)
  boxes[:, :5] = [[0, 0, 0, 0], [10, 10, 10, 30], [-50, -50, -20, -20], [300, 300, 400, 380], [-100, -100, 500, 500]]
  scores = rng.uniform(0, 1, (b, n)).astype(np.float32)
  classes = rng.integers(0, num_classes, (b, n)).astype(np.int32)
  return boxes, scores, classes


@pytest.mark.parametrize('tile', [16, 256])
def test_matches_greedy_reference(tile):
  rng = np.random.default_rng(0)
  boxes, scores, classes = clustered(rng, 3, 300, 3)
  valid = rng.uniform(size=(3, 300)) > 0.1
  valid[2] = False  # an image without candidates
  check_nms(boxes, scores, classes, valid, 0.5, 40, tile)
  check_nms(boxes, scores, classes, valid, 0.3, 300, tile)  # max_output large: every kept box


def test_score_ties_and_identical_boxes():
  # Identical boxes, equal scores: the lowest index survives; other class copies survive too (class-aware).
  boxes = np.tile(np.array([[10, 10, 50, 50]], np.float32), (1, 8, 1))
  boxes[0, 6] = [100, 100, 120, 120]
  scores = np.array([[0.5, 0.9, 0.9, 0.9, 0.5, 0.9, 0.9, 0.1]], np.float32)
  classes = np.array([[0, 1, 0, 0, 1, 1, 0, 0]], np.int32)
  valid = np.ones((1, 8), bool)
  idx, ok = _nms(boxes, scores, classes, valid, iou_threshold=0.5, max_output=5, tile_size=4)
  assert np.asarray(idx)[0][np.asarray(ok)[0]].tolist() == [1, 2, 6]
  check_nms(boxes, scores, classes, valid, 0.5, 5, 4)
  check_nms(boxes, scores, classes, valid, 0.5, 5, 256)
  # Signed zero scores tie with each other (index order), and a NaN score is never kept.
  scores = np.array([[0.0, -0.0, 0.0, np.nan, 0.5, 0.5, 0.5, 0.5]], np.float32)
  idx, ok = _nms(boxes, scores, np.arange(8, dtype=np.int32)[None], valid, iou_threshold=0.5, max_output=8,
                 tile_size=4)
  assert np.asarray(idx)[0][np.asarray(ok)[0]].tolist() == [4, 5, 6, 7, 0, 1, 2]


def test_iou_exactly_at_threshold_is_kept():
  # IoU of the pair is exactly 0.5: greedy NMS suppresses only IoU > threshold, so both stay.
  boxes = np.array([[[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 4.9]]], np.float32)
  idx, ok = _nms(boxes, np.array([[0.9, 0.8, 0.7]], np.float32), np.zeros((1, 3), np.int32),
                 np.ones((1, 3), bool), iou_threshold=0.5, max_output=3, tile_size=256)
  assert np.asarray(idx)[0][np.asarray(ok)[0]].tolist() == [0, 1]


def test_no_candidates():
  idx, ok = batched_nms(np.zeros((2, 0, 4)), np.zeros((2, 0)), np.zeros((2, 0), np.int32), np.zeros((2, 0), bool),
                        iou_threshold=0.5, max_output=3)
  assert idx.shape == (2, 3) and not np.asarray(ok).any()


def test_vmap_and_batch_agree():
  rng = np.random.default_rng(1)
  boxes, scores, classes = clustered(rng, 4, 64, 2)
  valid = np.ones((4, 64), bool)
  fn = lambda *a: batched_nms(*(x[None] for x in a), iou_threshold=0.5, max_output=10, tile_size=16)
  idx_v, ok_v = jax.jit(jax.vmap(fn))(boxes, scores, classes, valid)
  idx, ok = _nms(boxes, scores, classes, valid, iou_threshold=0.5, max_output=10, tile_size=16)
  np.testing.assert_array_equal(np.asarray(idx_v)[:, 0], np.asarray(idx))
  np.testing.assert_array_equal(np.asarray(ok_v)[:, 0], np.asarray(ok))


_grid = st.integers(0, 12).map(float)


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.float32, (1, 40, 4), elements=_grid), hnp.arrays(np.float32, (1, 40), elements=st.sampled_from(
    [0.1, 0.2, 0.3, 0.7])), hnp.arrays(np.int32, (1, 40), elements=st.integers(0, 1)), hnp.arrays(bool, (1, 40)))
def test_hypothesis_ties_on_a_grid(raw, scores, classes, valid):
  # Integer boxes on a small grid and four score values: many exact ties in IoU and in score.
  boxes = np.concatenate([np.minimum(raw[..., :2], raw[..., 2:]), np.maximum(raw[..., :2], raw[..., 2:])], -1)
  check_nms(boxes, scores, classes, valid, 0.5, 12, 8)


def np_postprocess(logits, boxes, counts, hw, thr, k, nms_iou, det):
  """torchvision postprocess_detections for one image, with ties broken by index."""
  num_classes = logits.shape[-1]
  scores = np.asarray(jax.nn.sigmoid(jnp.asarray(logits)))  # same float32 sigmoid as the code under test
  cb, cs, cc = [], [], []
  start = 0
  for n in counts:
    s = scores[start:start + n].ravel()
    cand = [i for i in sorted(range(len(s)), key=lambda i: (-s[i], i)) if s[i] > thr][:k]
    for i in cand:
      box = boxes[start + i // num_classes].copy()
      box[0::2] = np.clip(box[0::2], 0, hw[1])
      box[1::2] = np.clip(box[1::2], 0, hw[0])
      cb.append(box)
      cs.append(s[i])
      cc.append(i % num_classes)
    start += n
  if not cs:
    return np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)
  cb, cs, cc = np.array(cb, np.float32), np.array(cs, np.float32), np.array(cc)
  keep = np_greedy_nms(cb, cs, cc, np.ones(len(cs), bool), nms_iou, det)
  return cb[keep], cs[keep], cc[keep]


def test_postprocess_matches_reference():
  rng = np.random.default_rng(2)
  counts, num_classes, hw = (48, 12, 3), 4, (64, 96)
  a = sum(counts)
  logits = rng.normal(-3, 2, (2, a, num_classes)).astype(np.float32)
  logits[0, :5] = 2.0  # score ties across anchors and classes
  logits[1] = -10.0  # nothing above the threshold in image 1 ...
  logits[1, 50, 2] = 0.0  # ... except one candidate
  centres = rng.uniform(0, 100, (2, a, 2))
  wh = rng.uniform(2, 60, (2, a, 2))
  boxes = np.concatenate([centres - wh / 2, centres + wh / 2], -1).astype(np.float32)  # many leave the image
  fn = jax.jit(postprocess, static_argnums=(2, 3), static_argnames=('topk_per_level', 'max_detections'))
  out = fn(logits, boxes, counts, hw, topk_per_level=20, max_detections=15)
  assert out['boxes'].shape == (2, 15, 4) and out['classes'].dtype == jnp.int32
  for b in range(2):
    wb, ws, wc = np_postprocess(logits[b], boxes[b], counts, hw, 0.05, 20, 0.5, 15)
    n = len(ws)
    ok = np.asarray(out['valid'][b])
    assert ok.tolist() == [True] * n + [False] * (15 - n)
    np.testing.assert_allclose(np.asarray(out['boxes'][b])[:n], wb, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out['scores'][b])[:n], ws)
    np.testing.assert_array_equal(np.asarray(out['classes'][b])[:n], wc)
    assert np.all(np.asarray(out['boxes'][b])[n:] == 0) and np.all(np.asarray(out['scores'][b])[n:] == 0)
  assert int(np.asarray(out['valid'][1]).sum()) == 1
  # Per image under vmap: the same result.
  per = jax.jit(jax.vmap(lambda l, x: postprocess(l[None], x[None], counts, hw, topk_per_level=20,
                                                  max_detections=15)))(logits, boxes)
  for key in out:
    np.testing.assert_array_equal(np.asarray(per[key])[:, 0], np.asarray(out[key]))


def test_postprocess_rejects_bad_counts():
  with pytest.raises(ValueError):
    postprocess(np.zeros((1, 10, 2), np.float32), np.zeros((1, 10, 4), np.float32), (4, 5), (32, 32))
