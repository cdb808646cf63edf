import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_reference import flat_topk_candidates, flat_topk_postprocess, np_greedy_nms
from hypothesis import given, settings
from hypothesis import strategies as st

from conret_jax.core.nms import batched_nms, postprocess, select_candidates

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
  idx, ok = _nms(boxes, scores, np.arange(8, dtype=np.int32)[None], valid, iou_threshold=0.5, max_output=8, tile_size=4)
  assert np.asarray(idx)[0][np.asarray(ok)[0]].tolist() == [4, 5, 6, 7, 0, 1, 2]


def test_iou_exactly_at_threshold_is_kept():
  # IoU of the pair is exactly 0.5: greedy NMS suppresses only IoU > threshold, so both stay.
  boxes = np.array([[[0, 0, 10, 10], [0, 0, 10, 5], [0, 0, 10, 4.9]]], np.float32)
  idx, ok = _nms(
    boxes,
    np.array([[0.9, 0.8, 0.7]], np.float32),
    np.zeros((1, 3), np.int32),
    np.ones((1, 3), bool),
    iou_threshold=0.5,
    max_output=3,
    tile_size=256,
  )
  assert np.asarray(idx)[0][np.asarray(ok)[0]].tolist() == [0, 1]


def test_no_candidates():
  idx, ok = batched_nms(
    np.zeros((2, 0, 4)),
    np.zeros((2, 0)),
    np.zeros((2, 0), np.int32),
    np.zeros((2, 0), bool),
    iou_threshold=0.5,
    max_output=3,
  )
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
@given(
  hnp.arrays(np.float32, (1, 40, 4), elements=_grid),
  hnp.arrays(np.float32, (1, 40), elements=st.sampled_from([0.1, 0.2, 0.3, 0.7])),
  hnp.arrays(np.int32, (1, 40), elements=st.integers(0, 1)),
  hnp.arrays(bool, (1, 40)),
)
def test_hypothesis_ties_on_a_grid(raw, scores, classes, valid):
  # Integer boxes on a small grid and four score values: many exact ties in IoU and in score.
  boxes = np.concatenate([np.minimum(raw[..., :2], raw[..., 2:]), np.maximum(raw[..., :2], raw[..., 2:])], -1)
  check_nms(boxes, scores, classes, valid, 0.5, 12, 8)


def np_postprocess(logits, boxes, counts, hw, thr, k, nms_iou, det):
  """torchvision postprocess_detections for one image, with ties broken by index, and boxes clipped to the image
  (hw) before candidates are chosen: an anchor whose clipped box is empty is never one."""
  num_classes = logits.shape[-1]
  scores = np.asarray(jax.nn.sigmoid(jnp.asarray(logits)))  # same float32 sigmoid as the code under test
  boxes = np.asarray(boxes, np.float32).copy()
  boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, hw[1])
  boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, hw[0])
  empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
  cb, cs, cc = [], [], []
  start = 0
  for n in counts:
    s = scores[start : start + n].ravel()
    usable = lambda i, start=start: not empty[start + i // num_classes]
    cand = [i for i in sorted(range(len(s)), key=lambda i: (-s[i], i)) if s[i] > thr and usable(i)][:k]
    for i in cand:
      box = boxes[start + i // num_classes]
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
  one = lambda lg, x: postprocess(lg[None], x[None], counts, hw, topk_per_level=20, max_detections=15)
  per = jax.jit(jax.vmap(one))(logits, boxes)
  for key in out:
    np.testing.assert_array_equal(np.asarray(per[key])[:, 0], np.asarray(out[key]))


def test_postprocess_clips_to_each_images_own_size():
  """Images of different true sizes in one padded batch: boxes are clipped to each image's size before candidates
  are chosen, so a box in the padding never takes a candidate or detection slot, and none comes out empty."""
  rng = np.random.default_rng(5)
  counts, num_classes = (60, 20), 3
  sizes = np.array([[40, 50], [64, 96], [13, 77]], np.int32)
  a = sum(counts)
  logits = rng.normal(-2, 2, (3, a, num_classes)).astype(np.float32)
  centres = rng.uniform(0, 96, (3, a, 2))
  wh = rng.uniform(2, 30, (3, a, 2))
  boxes = np.concatenate([centres - wh / 2, centres + wh / 2], -1).astype(np.float32)
  logits[0, :10] = 6.0  # the best scores of image 0 ...
  boxes[0, :10] = [60.0, 45.0, 90.0, 60.0]  # ... lie wholly in its padding
  out = jax.jit(lambda lg, b, hw: postprocess(lg, b, counts, hw, topk_per_level=25, max_detections=12))(
    logits, boxes, sizes
  )
  for b in range(3):
    wb, ws, wc = np_postprocess(logits[b], boxes[b], counts, tuple(sizes[b]), 0.05, 25, 0.5, 12)
    n = len(ws)
    assert np.asarray(out['valid'][b]).tolist() == [True] * n + [False] * (12 - n)
    np.testing.assert_allclose(np.asarray(out['boxes'][b])[:n], wb, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out['scores'][b])[:n], ws)
    np.testing.assert_array_equal(np.asarray(out['classes'][b])[:n], wc)
    got = np.asarray(out['boxes'][b])[:n]
    assert np.all(got[:, 2] > got[:, 0]) and np.all(got[:, 3] > got[:, 1])  # no empty box
    assert np.all(got[:, 2] <= sizes[b, 1]) and np.all(got[:, 3] <= sizes[b, 0])
  assert float(np.asarray(out['scores'][0]).max()) < float(jax.nn.sigmoid(6.0))  # the padding's boxes are gone


def test_postprocess_rejects_bad_counts():
  with pytest.raises(ValueError):
    postprocess(np.zeros((1, 10, 2), np.float32), np.zeros((1, 10, 4), np.float32), (4, 5), (32, 32))


# select_candidates against the full top-k over each level's anchors x classes (flat_topk_candidates): the same
# candidates slot for slot, exactly.


def hard_logits(rng, n, num_classes):
  """[4, n, K]: 0 random (some above 0.05); 1 exact ties within and across anchors and classes, including equal
  scores from different logits (sigmoid of 20, 25 and 30 is 1.0 in float32); 2 all below the threshold
  (background); 3 only three pairs above it."""
  x = rng.normal(-3, 2, (4, n, num_classes)).astype(np.float32)
  x[1] = rng.choice(np.array([-9, -2, 0, 1, 20, 25, 30], np.float32), (n, num_classes))
  x[2] = rng.uniform(-12, -3, (n, num_classes))  # sigmoid(-3) = 0.047
  x[3] = -9.0
  x[3].flat[rng.choice(n * num_classes, 3, replace=False)] = [0.5, 0.5, 2.0]
  return x


_select = jax.jit(select_candidates, static_argnums=(1, 2, 3))
_flat = jax.jit(flat_topk_candidates, static_argnums=(1, 2, 3))


def assert_same_candidates(logits, topk, thr=0.05, counts=None):
  counts = counts or (logits.shape[1],)
  got, want = _select(logits, counts, topk, thr), _flat(logits, counts, topk, thr)
  for g, w in zip(got, want):
    assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  return got


@pytest.mark.parametrize(
  'counts, num_classes, topk',
  [
    ((60,), 1, 10),  # K = 1
    ((60,), 1, 60),  # topk = n: the level keeps every anchor
    ((40,), 7, 12),
    ((25,), 4, 24),  # topk just below n
    ((30,), 91, 20),  # COCO's 91 classes
    ((12,), 5, 100),  # topk > n * K: every pair, k = 60
    ((40, 9, 0, 13), 3, 12),  # levels above and below topk, and an empty one
  ],
)
def test_select_candidates_match_flat_topk(counts, num_classes, topk):
  n = sum(counts)
  logits = hard_logits(np.random.default_rng(n * num_classes + topk), n, num_classes)
  scores, _, _, valid = assert_same_candidates(logits, topk, counts=counts)
  assert scores.shape == (4, sum(min(topk, c * num_classes) for c in counts))
  assert not np.asarray(valid[2]).any() and 0 < np.asarray(valid[3]).sum() <= 3


@pytest.mark.parametrize('n, num_classes, topk', [(40, 7, 12), (30, 91, 20)])
def test_select_candidates_bf16_logits(n, num_classes, topk):
  logits = jnp.asarray(hard_logits(np.random.default_rng(3), n, num_classes), jnp.bfloat16)
  assert_same_candidates(logits, topk)


def test_equal_scores_from_different_logits():
  # Scores of 1.0 from logits 20, 30, 40: the tie goes to the lower flattened index, not the larger logit, so the
  # anchors 2 (best logit) and 1 must not push out anchor 0.
  logits = np.array([[[20, -9], [-9, 30], [40, 40], [-9, -9]]], np.float32)
  scores, anchors, classes, valid = assert_same_candidates(logits, 2)
  assert anchors.tolist() == [[0, 1]] and classes.tolist() == [[0, 1]] and scores.tolist() == [[1.0, 1.0]]
  assert np.asarray(valid).all()


@pytest.mark.parametrize('thr', [0.05, 0.0, -1.0])
def test_nan_logits_never_score(thr):
  # A NaN logit scores -1 (invalid) as in the full top-k; with a negative threshold every other pair is valid,
  # even at score 0 (logits -200, -inf), and an all-NaN anchor (0, 3) still ranks last.
  nan, inf = np.nan, np.inf
  logits = np.array([[[nan, nan], [-200, nan], [-inf, -300], [nan, nan], [nan, -250]]], np.float32)
  scores, anchors, classes, valid = assert_same_candidates(logits, 2, thr)
  if thr < 0:
    assert anchors.tolist() == [[1, 2]] and classes.tolist() == [[0, 0]] and scores.tolist() == [[0.0, 0.0]]
  assert np.asarray(valid).all() == (thr < 0)


def test_sigmoid_monotone_where_scores_change():
  # select_candidates ranks anchors by sigmoid(max logit): exact only if float32 sigmoid never decreases.
  # bench/sigmoid_monotone.py checks every float32; here, 2**16 consecutive floats around the sensitive places:
  # zero, the 0.05 threshold (logit -2.944), saturation to 1.0 (~17.3), exp overflow (-88.7), denormals (-103).
  windows = []
  for centre in (0.0, -0.0, -2.944, 8.0, 17.3, -88.7, -103.0):
    bits = np.float32(centre).view(np.uint32).astype(np.int64)
    low = max(bits - 2**15, bits & 0x80000000)  # stay on the centre's side of zero (both sides for +-0)
    windows.append(np.arange(low, low + 2**16).astype(np.uint32).view(np.float32))
  x = np.sort(np.concatenate(windows))
  y = np.asarray(jax.jit(jax.nn.sigmoid)(x))
  assert not np.isnan(x).any() and np.all(np.diff(y) >= 0)


def batch_boxes(rng, b, a):
  centres = rng.uniform(0, 100, (b, a, 2))
  wh = rng.uniform(2, 60, (b, a, 2))
  return np.concatenate([centres - wh / 2, centres + wh / 2], -1).astype(np.float32)  # many leave the image


@pytest.mark.parametrize(
  'counts, num_classes, topk, dtype',
  [
    ((150, 40, 9), 6, 20, jnp.float32),  # P3, P4 preselect anchors; P5 (9 <= 20) takes every pair
    ((150, 40, 9), 6, 20, jnp.bfloat16),
    ((40, 10), 91, 25, jnp.float32),
  ],
)
def test_postprocess_matches_flat_topk_reference(counts, num_classes, topk, dtype):
  rng = np.random.default_rng(4)
  logits = np.concatenate([hard_logits(rng, n, num_classes) for n in counts], axis=1)
  logits = jnp.asarray(logits, dtype)
  boxes = batch_boxes(rng, 4, sum(counts))
  kw = dict(topk_per_level=topk, max_detections=15)
  got = jax.jit(lambda lg, b: postprocess(lg, b, counts, (64, 96), **kw))(logits, boxes)
  want = jax.jit(lambda lg, b: flat_topk_postprocess(lg, b, counts, (64, 96), **kw))(logits, boxes)
  for key in want:
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)
  kept = np.asarray(got['valid']).sum(1)
  assert kept[2] == 0 and 0 < kept[3] <= 3 * len(counts)  # background; three candidates per level
