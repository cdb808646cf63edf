import hypothesis.extra.numpy as hnp
import jax
import numpy as np
import pytest
from core_reference import np_iou, np_match, random_boxes
from hypothesis import given, settings
from hypothesis import strategies as st

from conret_jax.core import anchors as anchors_lib
from conret_jax.core import matching
from conret_jax.core.matching import match

KW = dict(pos_iou=0.5, neg_iou=0.4, allow_low_quality_matches=True)
_match = jax.jit(match, static_argnames=('pos_iou', 'neg_iou', 'allow_low_quality_matches', 'low_quality_rule'))


def near_tie_anchors(anchors, gt, valid, pos, neg, low_quality, tol):
  """Anchors whose label or match hinges on a last-bit IoU difference (XLA may fuse a multiply-add into an FMA)."""
  iou = np_iou(anchors, gt)
  iou[:, ~valid] = -1.0
  eps = tol * np.maximum(np.abs(iou), 1e-30)
  srt = np.sort(iou, axis=1)
  best = srt[:, -1]
  out = np.zeros(len(anchors), bool)
  if len(gt) > 1:
    out |= (best - srt[:, -2] <= eps.max(1)) & (best > 0)  # two gts nearly tie for this anchor
  out |= (np.abs(best - pos) <= tol) | (np.abs(best - neg) <= tol)
  if low_quality:
    top = iou.max(0)
    near = (np.abs(iou - top[None]) <= eps) & valid[None] & (top[None] > 0)
    group = near & (near.sum(0) > 1)[None]  # several anchors nearly tie for a gt's best
    out |= group.any(1)
  return out


def check(anchors, gt, valid, tol=1e-6, matcher=_match, **kw):
  """Compare `matcher` (default: jitted `match`) with the loop reference; with tol > 0, skip anchors decided by a
  last-bit difference."""
  matched, labels = matcher(anchors, gt, valid, **kw)
  matched, labels = np.asarray(matched), np.asarray(labels)
  args = (kw['pos_iou'], kw['neg_iou'], kw['allow_low_quality_matches'])
  rule = kw.get('low_quality_rule', 'promote')
  for b in range(gt.shape[0]):
    a = anchors if anchors.ndim == 2 else anchors[b]
    want_m, want_l = np_match(a, gt[b], valid[b], *args, rule=rule)
    sure = ~near_tie_anchors(a, gt[b], valid[b], *args, tol) if tol else np.ones(len(a), bool)
    assert sure.mean() > 0.9
    np.testing.assert_array_equal(labels[b][sure], want_l[sure])
    pos = (want_l == 1) & sure
    np.testing.assert_array_equal(matched[b][pos], want_m[pos])
    if kw['allow_low_quality_matches']:  # every valid gt that overlaps an anchor promotes one of its best
      iou = np_iou(a, gt[b])
      for g in np.flatnonzero(valid[b] & (iou.max(0) > 0)):
        best = np.flatnonzero(iou[:, g] >= iou[:, g].max() * (1 - 1e-6))
        assert np.any(labels[b][best] == 1)
        if rule == 'assign':  # ... and is matched to it unless another gt overlaps that anchor as much or more
          assert np.any(iou[best, matched[b][best]] >= iou[best, g] * (1 - 1e-6))
          if not np.any(matched[b][best] == g):
            assert np.all(iou[best, matched[b][best]] > iou[best, g] * (1 - 1e-6))
  return matched, labels


@pytest.mark.parametrize('low_quality,rule', [(True, 'promote'), (True, 'assign'), (False, 'promote')])
def test_random_images_with_padding(low_quality, rule):
  rng = np.random.default_rng(0)
  anchors = np.asarray(anchors_lib.generate_anchors((64, 64), min_level=3, max_level=5))  # 84 * 9 anchors
  gt = np.stack([random_boxes(rng, 6, hi=60, min_size=4, max_size=40) for _ in range(3)])
  valid = np.ones((3, 6), bool)
  valid[0, 4:] = False  # padding rows
  valid[1, 1] = False  # a crowd row in the middle
  gt[0, 4:] = 0.0
  kw = dict(pos_iou=0.5, neg_iou=0.4, allow_low_quality_matches=low_quality, low_quality_rule=rule)
  _, labels = check(anchors, gt, valid, **kw)
  assert (labels == 1).sum() > 0 and (labels == -1).sum() > 0 and (labels == 0).sum() > 0


def test_assign_rule_gives_each_gt_its_best_anchor():
  """SSD's rule against RetinaNet's on a hand-built image: gt 0 (small) has its best IoU (0.16) at anchor 0, which
  gt 1 overlaps more (0.77); gt 2 and gt 3 share their best anchor 2 (IoU 0.91 and 0.73), which goes to gt 2."""
  anchors = np.array([[0, 0, 10, 10], [0, 0, 10, 14], [50, 50, 60, 60], [200, 200, 210, 210]], np.float32)
  gt = np.array([[[0, 0, 4, 4], [0, 0, 10, 13], [50, 50, 60, 61], [52, 50, 61, 60]]], np.float32)
  valid = np.ones((1, 4), bool)
  kw = dict(pos_iou=0.5, neg_iou=0.5, allow_low_quality_matches=True)
  matched, labels = _match(anchors, gt, valid, **kw, low_quality_rule='assign')
  np.testing.assert_array_equal(np.asarray(labels)[0], [1, 1, 1, 0])
  np.testing.assert_array_equal(np.asarray(matched)[0, :3], [0, 1, 2])
  matched, labels = _match(anchors, gt, valid, **kw, low_quality_rule='promote')
  np.testing.assert_array_equal(np.asarray(labels)[0], [1, 1, 1, 0])
  np.testing.assert_array_equal(np.asarray(matched)[0, :3], [1, 1, 2])  # anchor 0 keeps its own best gt
  for rule in ('promote', 'assign'):
    want_m, want_l = np_match(anchors, gt[0], valid[0], 0.5, 0.5, True, rule=rule)
    got_m, got_l = _match(anchors, gt, valid, **kw, low_quality_rule=rule)
    np.testing.assert_array_equal(np.asarray(got_l)[0], want_l)
    np.testing.assert_array_equal(np.asarray(got_m)[0][want_l == 1], want_m[want_l == 1])
  with pytest.raises(ValueError, match='low_quality_rule'):
    match(anchors, gt, valid, **kw, low_quality_rule='ssd')


def test_per_image_anchors():
  rng = np.random.default_rng(1)
  anchors = np.stack([random_boxes(rng, 300, hi=80, min_size=2, max_size=30) for _ in range(2)])
  gt = np.stack([random_boxes(rng, 5, hi=80, min_size=5, max_size=30) for _ in range(2)])
  valid = np.array([[True] * 5, [True, True, False, True, False]])
  check(anchors, gt, valid, pos_iou=0.6, neg_iou=0.5, allow_low_quality_matches=False)
  check(anchors, gt, valid, **KW)


def test_no_ground_truth_and_all_padding():
  anchors = np.asarray(anchors_lib.generate_anchors((64, 64), min_level=3, max_level=5))
  gt = np.zeros((2, 4, 4), np.float32)
  gt[1] = [10, 10, 30, 30]  # real-looking boxes, but every row is padding/crowd
  matched, labels = _match(anchors, gt, np.zeros((2, 4), bool), **KW)
  assert np.all(np.asarray(labels) == 0)
  # No gt rows at all (G = 0).
  matched, labels = match(anchors, np.zeros((2, 0, 4), np.float32), np.zeros((2, 0), bool), **KW)
  assert labels.shape == (2, anchors.shape[0]) and np.all(np.asarray(labels) == 0)


def test_exact_thresholds():
  anchors = np.array([[0, 0, 10, 10], [100, 100, 110, 110], [200, 200, 210, 210], [300, 300, 310, 310]], np.float32)
  gt = np.array(
    [
      [
        [0, 0, 10, 5],  # IoU exactly 0.5 with anchor 0 -> positive
        [100, 100, 110, 104],  # exactly 0.4 with anchor 1 -> ignored (not negative)
        [200, 200, 210, 203.9],  # 0.39 -> negative
        [300, 300, 310, 306],
      ]
    ],
    np.float32,
  )  # 0.6 -> positive
  _, labels = match(anchors, gt, np.ones((1, 4), bool), pos_iou=0.5, neg_iou=0.4, allow_low_quality_matches=False)
  np.testing.assert_array_equal(np.asarray(labels)[0], [1, -1, 0, 1])
  check(anchors, gt, np.ones((1, 4), bool), tol=0.0, pos_iou=0.5, neg_iou=0.4, allow_low_quality_matches=False)
  # Exactly at 0.6 with pos = neg = 0.6: positive; no ignore band.
  _, labels = match(anchors, gt, np.ones((1, 4), bool), pos_iou=0.6, neg_iou=0.6, allow_low_quality_matches=False)
  np.testing.assert_array_equal(np.asarray(labels)[0], [0, 0, 0, 1])


def test_low_quality_ties_and_degenerate_gt():
  # Two anchors tie for the best IoU (0.2) with the gt: both become positive; the others stay negative.
  anchors = np.array([[0, 0, 10, 20], [20, 0, 30, 20], [100, 100, 120, 120], [0, 0, 80, 80]], np.float32)
  gt = np.array([[[5, 0, 25, 20], [200, 200, 200, 210], [500, 500, 520, 520]]], np.float32)
  valid = np.array([[True, True, True]])  # row 1 has zero area, row 2 lies outside every anchor
  matched, labels = match(anchors, gt, valid, **KW)
  np.testing.assert_array_equal(np.asarray(labels)[0], [1, 1, 0, 0])
  assert np.asarray(matched)[0, 0] == 0 and np.asarray(matched)[0, 1] == 0
  check(anchors, gt, valid, tol=0.0, **KW)


def test_gt_larger_than_image_and_tiny_gt():
  anchors = np.asarray(anchors_lib.generate_anchors((64, 64), min_level=3, max_level=5))
  gt = np.array([[[-30, -30, 200, 150], [31.0, 31.0, 31.5, 31.25], [0, 0, 64, 64]]], np.float32)
  _, labels = check(anchors, gt, np.ones((1, 3), bool), **KW)
  assert (np.asarray(labels) == 1).sum() >= 3  # every gt got at least its best anchor


def test_vmap_over_extra_axis():
  rng = np.random.default_rng(2)
  anchors = random_boxes(rng, 100, hi=60, min_size=3, max_size=30)
  gt = np.stack([[random_boxes(rng, 4, hi=60, min_size=5, max_size=30) for _ in range(2)] for _ in range(3)])
  valid = rng.uniform(size=(3, 2, 4)) > 0.3
  fn = lambda g, v: match(anchors, g, v, **KW)
  matched, labels = jax.jit(jax.vmap(fn))(gt, valid)
  for i in range(3):
    m2, l2 = _match(anchors, gt[i], valid[i], **KW)
    np.testing.assert_array_equal(np.asarray(labels[i]), np.asarray(l2))
    np.testing.assert_array_equal(np.asarray(matched[i]), np.asarray(m2))


def test_bad_shapes():
  with pytest.raises(ValueError):
    match(np.zeros((2, 5, 4)), np.zeros((3, 1, 4)), np.ones((3, 1), bool), **KW)
  with pytest.raises(ValueError):
    match(
      np.zeros((5, 4)),
      np.zeros((1, 1, 4)),
      np.ones((1, 1), bool),
      pos_iou=0.4,
      neg_iou=0.5,
      allow_low_quality_matches=False,
    )


_coord = st.integers(0, 24).map(float)


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.float32, (1, 6, 4), elements=_coord), hnp.arrays(bool, (1, 6)), st.booleans())
def test_hypothesis_integer_boxes_with_ties(raw, valid, low_quality):
  # Small integer grids produce many exact IoU ties and threshold hits; anchors fixed, so one compile per flag.
  gt = np.concatenate([np.minimum(raw[..., :2], raw[..., 2:]), np.maximum(raw[..., :2], raw[..., 2:])], -1)
  anchors = np.array(
    [[x, y, x + s, y + s] for s in (4, 8) for y in range(0, 24, 4) for x in range(0, 24, 4)], np.float32
  )
  check(anchors, gt, valid, tol=0.0, pos_iou=0.5, neg_iou=0.4, allow_low_quality_matches=low_quality)


def test_chunks_of_images_match_like_one_image_at_a_time(monkeypatch):
  """Images go through one vmap per chunk that fits IOU_BYTES_PER_CHUNK; the chunking never changes a result."""
  assert matching.images_per_chunk(16, 100, 76_725) == 8  # 30.7 MB per image: two chunks of eight at 640x640
  assert matching.images_per_chunk(16, 16, 12_276) == 16  # the shapes demo: the whole batch at once
  assert matching.images_per_chunk(6, 100, 10**9) == 1  # nothing fits: one at a time
  rng = np.random.default_rng(3)
  anchors = np.concatenate([rng.uniform(0, 60, (100, 2)), rng.uniform(70, 128, (100, 2))], 1).astype(np.float32)
  gt = np.concatenate([rng.uniform(0, 60, (6, 5, 2)), rng.uniform(70, 128, (6, 5, 2))], -1).astype(np.float32)
  valid = rng.uniform(size=(6, 5)) < 0.7
  results = []
  for budget in (1, 2 * 4 * 5 * 100, 10**9):  # chunks of 1, 2 and 6 images
    monkeypatch.setattr(matching, 'IOU_BYTES_PER_CHUNK', budget)
    per_image = matching.match(anchors, gt, valid, pos_iou=0.5, neg_iou=0.4, allow_low_quality_matches=True)
    refined = matching.match(
      np.broadcast_to(anchors, (6, 100, 4)), gt, valid, pos_iou=0.5, neg_iou=0.4, allow_low_quality_matches=False
    )
    results.append(jax.tree.map(np.asarray, (per_image, refined)))
  for other in results[1:]:
    jax.tree.map(np.testing.assert_array_equal, other, results[0])


def test_full_optimization_keeps_one_iou_per_pair():
  """The equality tests read one IoU per pair even where XLA:CPU compiles at its full level (the suite compiles at
  level 0): a recomputed, differently rounded IoU would leave a positive anchor's best gt unmatched (it would fall
  to the last row) and a gt's best anchor unpromoted."""
  rng = np.random.default_rng(7)
  anchors = np.stack([random_boxes(rng, 2000, hi=280, min_size=4, max_size=120) for _ in range(2)])  # refined
  gt = np.stack([random_boxes(rng, 16, hi=280, min_size=8, max_size=120) for _ in range(2)])
  valid = np.ones((2, 16), bool)
  fn = jax.jit(lambda a, g, v: match(a, g, v, **KW))
  compiled = fn.lower(anchors, gt, valid).compile(compiler_options={'xla_backend_optimization_level': 3})
  _, labels = check(anchors, gt, valid, matcher=lambda a, g, v, **_: compiled(a, g, v), **KW)
  assert (labels == 1).sum(axis=1).min() > 30
