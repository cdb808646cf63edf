import jax
import numpy as np
from core_reference import np_encode, np_iou, np_match, random_boxes

from conret_jax.core import anchors as anchors_lib
from conret_jax.core.targets import assign

KW = dict(pos_iou=0.5, neg_iou=0.4, allow_low_quality_matches=True, box_weights=(1.0, 1.0, 1.0, 1.0))
_assign = jax.jit(assign, static_argnames=tuple(KW))


def np_assign(anchors, gt, classes, valid, pos, neg, low_quality, weights):
  """Loop reference for one image."""
  matched, labels = np_match(anchors, gt, valid, pos, neg, low_quality)
  cls = np.where(labels == 1, classes[matched], np.where(labels == 0, -1, -2))
  tgt = np.zeros((len(anchors), 4))
  for a in np.flatnonzero(labels == 1):
    tgt[a] = np_encode(gt[matched[a]], anchors[a], weights)
  return cls, tgt


def check(anchors, gt, classes, valid, **kw):
  out = _assign(anchors, gt, classes, valid, **kw)
  for b in range(gt.shape[0]):
    a = anchors if anchors.ndim == 2 else anchors[b]
    cls, tgt = np_assign(
      a, gt[b], classes[b], valid[b], kw['pos_iou'], kw['neg_iou'], kw['allow_low_quality_matches'], kw['box_weights']
    )
    np.testing.assert_array_equal(np.asarray(out['cls_labels'][b]), cls)
    np.testing.assert_array_equal(np.asarray(out['positive'][b]), cls >= 0)
    np.testing.assert_allclose(np.asarray(out['box_targets'][b]), tgt, rtol=1e-4, atol=1e-4)
    assert float(out['num_positives'][b]) == (cls >= 0).sum()
  assert np.isfinite(np.asarray(out['box_targets'])).all()
  return out


def integer_anchors():
  # Integer coordinates keep every IoU exact, so the reference and XLA agree bit for bit (ties included).
  return np.array(
    [[x, y, x + s, y + r * s] for s in (8, 16) for r in (1, 2) for y in range(0, 64, 8) for x in range(0, 64, 8)],
    np.float32,
  )


def test_random_with_padding_crowd_and_weights():
  rng = np.random.default_rng(0)
  anchors = integer_anchors()
  gt = np.round(np.stack([random_boxes(rng, 8, hi=56, min_size=6, max_size=30) for _ in range(3)]))
  classes = rng.integers(0, 5, (3, 8)).astype(np.int32)
  valid = np.ones((3, 8), bool)
  valid[0, 5:] = False
  gt[0, 5:] = 0.0  # zero padding rows must not leak log(0) into the targets
  classes[0, 5:] = 0
  valid[1, 2] = False  # crowd
  out = check(anchors, gt, classes, valid, **KW)
  assert out['cls_labels'].dtype == np.int32 and out['box_targets'].dtype == np.float32
  assert set(np.unique(np.asarray(out['cls_labels']))) >= {-2, -1}
  check(anchors, gt, classes, valid, **dict(KW, box_weights=(10.0, 10.0, 5.0, 5.0), allow_low_quality_matches=False))


def test_per_image_refined_anchors():
  rng = np.random.default_rng(1)
  anchors = np.round(np.stack([random_boxes(rng, 200, hi=60, min_size=4, max_size=30) for _ in range(2)]))
  anchors[0, :3] = [[5, 5, 5, 9], [7, 7, 7, 7], [30, 30, 20, 20]]  # refined anchors can collapse or invert
  gt = np.round(np.stack([random_boxes(rng, 4, hi=60, min_size=6, max_size=30) for _ in range(2)]))
  classes = np.array([[3, 1, 2, 0], [7, 7, 1, 2]], np.int32)
  valid = np.array([[True, True, True, False], [True, False, True, True]])
  check(anchors, gt, classes, valid, **dict(KW, pos_iou=0.6, neg_iou=0.5, allow_low_quality_matches=False))


def test_no_ground_truth_is_all_background():
  anchors = np.asarray(anchors_lib.generate_anchors((64, 64), min_level=3, max_level=5))
  out = _assign(anchors, np.zeros((2, 3, 4), np.float32), np.zeros((2, 3), np.int32), np.zeros((2, 3), bool), **KW)
  assert np.all(np.asarray(out['cls_labels']) == -1)
  assert np.all(np.asarray(out['box_targets']) == 0) and np.all(np.asarray(out['num_positives']) == 0)


def test_large_and_tiny_gt_real_anchors():
  anchors = np.asarray(anchors_lib.generate_anchors((128, 128), min_level=3, max_level=7))
  gt = np.array([[[-40, -20, 300, 200], [60.0, 60.0, 61.0, 60.5], [8, 8, 40, 72]]], np.float32)
  out = _assign(anchors, gt, np.array([[1, 2, 3]], np.int32), np.ones((1, 3), bool), **KW)
  labels = np.asarray(out['cls_labels'][0])
  pos = labels >= 0
  # Every gt, even the tiny one inside the huge one, makes its best anchor positive (low-quality match); that
  # anchor keeps its own best gt, which for the tiny gt is the huge one (torchvision / detectron2 semantics).
  assert np.all(pos[np_iou(anchors, gt[0]).argmax(0)])
  want, _ = np_match(anchors, gt[0], np.ones(3, bool), 0.5, 0.4, True)
  tgt = np.stack([np_encode(gt[0][want[a]], anchors[a]) for a in np.flatnonzero(pos)])
  np.testing.assert_allclose(np.asarray(out['box_targets'][0])[pos], tgt, rtol=1e-4, atol=1e-4)


def test_vmap():
  rng = np.random.default_rng(2)
  anchors = integer_anchors()
  gt = np.round(np.stack([[random_boxes(rng, 3, hi=56, min_size=6, max_size=30)] for _ in range(2)]))
  classes = rng.integers(0, 4, (2, 1, 3)).astype(np.int32)
  valid = np.ones((2, 1, 3), bool)
  out = jax.jit(jax.vmap(lambda g, c, v: assign(anchors, g, c, v, **KW)))(gt, classes, valid)
  for i in range(2):
    single = _assign(anchors, gt[i], classes[i], valid[i], **KW)
    for key in single:
      np.testing.assert_array_equal(np.asarray(out[key][i]), np.asarray(single[key]))
