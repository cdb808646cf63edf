"""Per-class candidates (core.nms.postprocess with topk_per_class > 0: torchvision's SSD post-processing) against a
NumPy reference of torchvision's SSD.postprocess_detections: per class, the scores above the threshold, their top k
(equal scores: lower anchor first), then class-aware greedy NMS and the best max_detections."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from core_reference import np_greedy_nms

from conret_jax.core.nms import postprocess, select_candidates, select_candidates_per_class


def np_per_class_postprocess(logits, boxes, hw, thr, k, nms_iou, det):
  """One image: boxes clipped to hw first (an anchor whose clipped box is empty is never a candidate), then class by
  class the anchors scoring above thr, best k of them (ties: lower anchor), then NMS over the class-major list."""
  scores = np.asarray(jax.nn.sigmoid(jnp.asarray(logits)))  # the same float32 sigmoid as the code under test
  boxes = np.asarray(boxes, np.float32).copy()
  boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, hw[1])
  boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, hw[0])
  usable = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  cb, cs, cc = [], [], []
  for c in range(scores.shape[1]):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i, c], i))
    for i in [i for i in order if scores[i, c] > thr and usable[i]][:k]:
      cb.append(boxes[i])
      cs.append(scores[i, c])
      cc.append(c)
  if not cs:
    return np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)
  cb, cs, cc = np.array(cb, np.float32), np.array(cs, np.float32), np.array(cc)
  keep = np_greedy_nms(cb, cs, cc, np.ones(len(cs), bool), nms_iou, det)
  return cb[keep], cs[keep], cc[keep]


def _case(seed, b=2, a=90, num_classes=4):
  rng = np.random.default_rng(seed)
  logits = rng.normal(-3, 2, (b, a, num_classes)).astype(np.float32)
  centres = rng.uniform(0, 100, (b, a, 2))
  wh = rng.uniform(2, 60, (b, a, 2))
  boxes = np.concatenate([centres - wh / 2, centres + wh / 2], -1).astype(np.float32)
  return logits, boxes


@pytest.mark.parametrize('topk', [1, 7, 200])
def test_per_class_postprocess_matches_reference(topk):
  logits, boxes = _case(0)
  logits[0, 10:20, 1] = 2.0  # equal scores on ten anchors of one class: lower anchors first
  boxes[0, 10:20] = boxes[0, 10] + np.arange(10, dtype=np.float32)[:, None] * 3  # overlapping, so NMS decides
  logits[1] = -10.0  # nothing above the threshold in image 1 ...
  logits[1, 50, 2] = 0.0  # ... except one candidate
  boxes[1, 50] = [10, 10, 30, 30]
  counts, hw = (60, 30), (64, 96)  # the levels play no part in the per-class mode
  fn = jax.jit(
    lambda lg, x: postprocess(
      lg, x, counts, hw, score_threshold=0.05, topk_per_class=topk, nms_iou=0.45, max_detections=12
    )
  )
  out = fn(logits, boxes)
  for b in range(2):
    wb, ws, wc = np_per_class_postprocess(logits[b], boxes[b], hw, 0.05, topk, 0.45, 12)
    n = len(ws)
    assert np.asarray(out['valid'][b]).tolist() == [True] * n + [False] * (12 - n)
    np.testing.assert_allclose(np.asarray(out['boxes'][b])[:n], wb, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out['scores'][b])[:n], ws)
    np.testing.assert_array_equal(np.asarray(out['classes'][b])[:n], wc)
    assert np.all(np.asarray(out['scores'][b])[n:] == 0)
  assert int(np.asarray(out['valid'][1]).sum()) == 1


def test_candidates_are_each_classes_top_k_with_ties_by_anchor():
  logits = np.full((1, 6, 2), -5.0, np.float32)
  logits[0, [4, 1, 3], 0] = 1.0  # three equal scores: anchors 1, 3, 4 in that order
  logits[0, 5, 0] = 2.0
  logits[0, 2, 1] = 0.5
  scores, anchors, classes, valid = select_candidates_per_class(logits, 3, 0.05)
  assert scores.shape == anchors.shape == classes.shape == valid.shape == (1, 6)  # K * k, class-major
  assert np.asarray(anchors)[0, :3].tolist() == [5, 1, 3] and np.asarray(classes)[0].tolist() == [0, 0, 0, 1, 1, 1]
  assert np.asarray(valid)[0].tolist() == [True, True, True, True, False, False]
  assert np.asarray(anchors)[0, 3] == 2
  # An unusable anchor is never a candidate, and a masked slot is invalid whatever the threshold.
  usable = np.ones((1, 6), bool)
  usable[0, 5] = False
  _, anchors, _, valid = select_candidates_per_class(logits, 3, -5.0, usable)
  assert np.asarray(anchors)[0, :3].tolist() == [1, 3, 4] and 5 not in np.asarray(anchors)[0][np.asarray(valid)[0]]


def test_per_level_path_is_unchanged_by_default():
  logits, boxes = _case(3)
  counts, hw = (60, 30), (64, 96)
  kw = dict(score_threshold=0.05, topk_per_level=20, max_detections=15)
  default = postprocess(logits, boxes, counts, hw, **kw)
  explicit = postprocess(logits, boxes, counts, hw, topk_per_class=0, **kw)
  for key in default:
    np.testing.assert_array_equal(np.asarray(default[key]), np.asarray(explicit[key]))
  assert select_candidates(logits, counts, 20, 0.05)[0].shape == (2, 40)
