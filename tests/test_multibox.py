"""SSD's MultiBox loss with consistent optimization against a NumPy SSD loss (softmax cross-entropy with 3:1 hard
negative mining + smooth L1, over N), a hand-built case where refined anchors change label, images without objects,
and gradients."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conret_jax import defaults
from conret_jax.multibox import SSD_STAGES, MultiBoxLoss

K = 3  # classes; logits have K + 1 columns, column 0 background
WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def _loss(n_cls=1, n_reg=1, alpha=1.0, **kw):
  stages = dataclasses.replace(SSD_STAGES, num_cls_terms=n_cls, num_reg_terms=n_reg, alpha=alpha)
  return MultiBoxLoss(stages=stages, **kw)


# ---------------- NumPy reference of SSD's loss (loops, float64) ----------------


def _iou(a, b):
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def _encode(box, anchor):
  aw, ah = anchor[2] - anchor[0], anchor[3] - anchor[1]
  ax, ay = anchor[0] + aw / 2, anchor[1] + ah / 2
  bw, bh = box[2] - box[0], box[3] - box[1]
  bx, by = box[0] + bw / 2, box[1] + bh / 2
  d = [(bx - ax) / aw, (by - ay) / ah, np.log(bw / aw), np.log(bh / ah)]
  return np.array(d) * np.array(WEIGHTS)


def _decode(deltas, anchors):
  d = np.asarray(deltas, np.float64) / np.array(WEIGHTS)
  aw, ah = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
  cx, cy = anchors[..., 0] + aw / 2 + d[..., 0] * aw, anchors[..., 1] + ah / 2 + d[..., 1] * ah
  w, h = aw * np.exp(d[..., 2]), ah * np.exp(d[..., 3])
  return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def np_match(anchors, gt, gt_valid, pos, neg, low_quality):
  """[B, A]: the matched gt row for positives, -1 background, -2 ignored. anchors [A, 4] or [B, A, 4]."""
  B = gt.shape[0]
  A = anchors.shape[-2]
  out = np.full((B, A), -1)
  for b in range(B):
    anc = anchors if anchors.ndim == 2 else anchors[b]
    gts = [g for g in range(gt.shape[1]) if gt_valid[b, g]]
    if not gts:
      continue
    iou = np.array([[_iou(anc[a], gt[b, g]) for g in gts] for a in range(A)])
    for a in range(A):
      j = int(np.argmax(iou[a]))
      out[b, a] = gts[j] if iou[a, j] >= pos else (-1 if iou[a, j] < neg else -2)
    if low_quality:  # SSD: each gt's best anchor (the first) goes to the gt; a shared one to the best-overlapping
      claims = {}
      for jj in range(len(gts)):
        if iou[:, jj].max() > 0:
          claims.setdefault(int(np.argmax(iou[:, jj])), []).append(jj)
      for a, js in claims.items():
        out[b, a] = gts[max(js, key=lambda j: (iou[a, j], -j))]
  return out


def np_ce(logits, target):
  """Softmax cross-entropy of column `target` per anchor: logits [..., K + 1], target [...] ints."""
  x = np.asarray(logits, np.float64)
  m = x.max(-1, keepdims=True)
  lse = np.log(np.exp(x - m).sum(-1)) + m[..., 0]
  return lse - np.take_along_axis(x, target[..., None], -1)[..., 0]


def np_mine(bg_loss, positive, eligible, ratio=3.0):
  mined = np.zeros(bg_loss.shape, bool)
  for b in range(bg_loss.shape[0]):
    cands = sorted(np.flatnonzero(eligible[b]), key=lambda a: (-bg_loss[b, a], a))
    mined[b, cands[: math.ceil(ratio * positive[b].sum())]] = True
  return mined


def np_cls_sum(logits, matched, gt_cls, negatives=None):
  """Sum of the cross-entropy over positives and mined negatives; and the negatives (mined here if not given)."""
  positive = matched >= 0
  target = np.where(positive, np.take_along_axis(gt_cls, np.maximum(matched, 0), 1) + 1, 0)
  if negatives is None:
    negatives = np_mine(np_ce(logits, np.zeros(matched.shape, int)), positive, matched == -1)
  negatives = negatives & (matched == -1)
  ce = np_ce(logits, target)
  return float(np.sum(ce[positive | negatives])), negatives


def np_box_sum(deltas, anchors, gt, matched, beta=1.0):
  total = 0.0
  for b, a in zip(*np.nonzero(matched >= 0)):
    anc = anchors[a] if anchors.ndim == 2 else anchors[b, a]
    d = deltas[b, a] - _encode(gt[b, matched[b, a]], anc)
    ad = np.abs(d)
    total += np.sum(np.where(ad < beta, 0.5 * d * d / beta, ad - 0.5 * beta))
  return total


def np_ssd_loss(logits, deltas, anchors, gt, gt_cls, gt_valid):
  """torchvision's SSD loss: (CE over positives and 3:1 mined negatives + smooth L1 over positives) / N."""
  matched = np_match(anchors, gt, gt_valid, 0.5, 0.5, True)
  cls_sum, _ = np_cls_sum(logits, matched, gt_cls)
  n = max((matched >= 0).sum(), 1)
  return (cls_sum + np_box_sum(deltas, anchors, gt, matched)) / n


def _random_case(seed, B=3, A=60, G=4):
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0, 80, (A, 2))
  wh = rng.uniform(8, 40, (A, 2))
  anchors = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  gt = anchors[rng.choice(A, (B, G))] + rng.normal(0, 2.0, (B, G, 4)).astype(np.float32)
  gt[..., 2:] = np.maximum(gt[..., 2:], gt[..., :2] + 4)
  gt_cls = rng.integers(0, K, (B, G)).astype(np.int32)
  gt_valid = np.ones((B, G), bool)
  gt_valid[1, -1] = False  # a padding row
  logits = rng.normal(0, 1.5, (B, A, K + 1)).astype(np.float32)
  deltas = [rng.normal(0, 1.0, (B, A, 4)).astype(np.float32) for _ in range(2)]
  batch = dict(
    boxes=jnp.asarray(gt), classes=jnp.asarray(gt_cls), valid=jnp.asarray(gt_valid), crowd=jnp.zeros((B, G), bool)
  )
  return anchors, gt, gt_cls, gt_valid, logits, deltas, batch


def _outputs(logits, deltas):
  return {'cls_logits': (jnp.asarray(logits),), 'box_deltas': tuple(jnp.asarray(d) for d in deltas)}


@pytest.mark.parametrize('n_cls,n_reg,alpha', [(1, 1, 1.0), (2, 1, 0.0)])
def test_plain_ssd_loss_is_reproduced(n_cls, n_reg, alpha):
  anchors, gt, gt_cls, gt_valid, logits, deltas, batch = _random_case(0)
  loss_fn = _loss(n_cls, n_reg, alpha)
  loss, m = jax.jit(lambda o: loss_fn(o, jnp.asarray(anchors), batch))(_outputs(logits, deltas[:n_reg]))
  np.testing.assert_allclose(float(loss), np_ssd_loss(logits, deltas[0], anchors, gt, gt_cls, gt_valid), rtol=1e-5)
  assert float(m['num_pos_0']) > 0 and float(m['num_neg_0']) == 3 * float(m['num_pos_0'])
  if alpha == 0.0:
    assert float(m['cls_loss_1']) == 0.0


def test_each_object_gets_its_best_default_box():
  """SSD's matching: a small object's best default box overlaps a large neighbour more, and still goes to the small
  object (with its class and box target), where RetinaNet's rule would leave the small object no positive."""
  anchors = np.array([[0, 0, 10, 10], [0, 0, 10, 14], [50, 50, 60, 60]], np.float32)
  gt = np.array([[[0, 0, 4, 4], [0, 0, 10, 13]]], np.float32)  # IoU with box 0: 0.16 and 0.77; box 1: 0.11, 0.93
  gt_cls = np.array([[1, 2]], np.int32)
  gt_valid = np.ones((1, 2), bool)
  np.testing.assert_array_equal(np_match(anchors, gt, gt_valid, 0.5, 0.5, True), [[0, 1, -1]])
  stages = dataclasses.replace(SSD_STAGES, num_cls_terms=1, num_reg_terms=1)
  t = stages.targets(
    jnp.asarray(anchors),
    (jnp.zeros((1, 3, 4)),),
    dict(
      boxes=jnp.asarray(gt), classes=jnp.asarray(gt_cls), valid=jnp.asarray(gt_valid), crowd=jnp.zeros((1, 2), bool)
    ),
  )[0]
  np.testing.assert_array_equal(np.asarray(t['cls_labels']), [[1, 2, -1]])
  np.testing.assert_allclose(np.asarray(t['box_targets'])[0, 0], _encode(gt[0, 0], anchors[0]), rtol=1e-5)
  promote = dataclasses.replace(stages, low_quality_rule='promote').targets(
    jnp.asarray(anchors),
    (jnp.zeros((1, 3, 4)),),
    dict(
      boxes=jnp.asarray(gt), classes=jnp.asarray(gt_cls), valid=jnp.asarray(gt_valid), crowd=jnp.zeros((1, 2), bool)
    ),
  )[0]
  np.testing.assert_array_equal(np.asarray(promote['cls_labels']), [[2, 2, -1]])  # the small object has no positive


def test_the_config_loss_matches_as_ssd():
  loss = MultiBoxLoss.from_config(defaults.ssd_config(300))
  assert loss.stages.low_quality_rule == 'assign' and loss.stages.allow_low_quality_matches


@pytest.mark.parametrize('mode', ['per_stage', 'stage0'])
def test_refined_terms_against_numpy(mode):
  anchors, gt, gt_cls, gt_valid, logits, deltas, batch = _random_case(1)
  loss, m = _loss(2, 2, alpha=0.5, refined_negatives=mode)(_outputs(logits, deltas), jnp.asarray(anchors), batch)
  matched0 = np_match(anchors, gt, gt_valid, 0.5, 0.5, True)
  refined = _decode(deltas[0], anchors.astype(np.float64))
  matched1 = np_match(refined, gt, gt_valid, 0.6, 0.5, False)
  assert np.any((matched0 >= 0) != (matched1 >= 0)) and np.any(matched1 == -2)  # labels do change; some ignored
  sum0, neg0 = np_cls_sum(logits, matched0, gt_cls)
  sum1, neg1 = np_cls_sum(logits, matched1, gt_cls, negatives=None if mode == 'per_stage' else neg0)
  n0, n1 = max((matched0 >= 0).sum(), 1), max((matched1 >= 0).sum(), 1)
  assert float(m['num_pos_1']) == (matched1 >= 0).sum() and float(m['num_neg_1']) == neg1.sum()
  np.testing.assert_allclose(float(m['cls_loss_0']), sum0 / n0, rtol=1e-5)
  np.testing.assert_allclose(float(m['cls_loss_1']), 0.5 * sum1 / n0, rtol=1e-5)  # normalized by stage 0's N
  np.testing.assert_allclose(float(m['box_loss_1']), np_box_sum(deltas[1], refined, gt, matched1) / n1, rtol=1e-4)
  total = sum(float(v) for k, v in m.items() if k.startswith(('cls_loss', 'box_loss')))
  np.testing.assert_allclose(float(loss), total, rtol=1e-6)


@pytest.mark.parametrize('mode', ['per_stage', 'stage0'])
def test_refined_label_changes_on_the_same_prediction(mode):
  """Figure 2 with SSD: anchor 0 matches the bicycle and regresses onto the person, anchor 1 starts as background
  and regresses onto the bicycle. Anchors 1-6 are background at stage 0 (3 mined: the largest background losses),
  2-6 at stage 1 (2 positives: up to 6 mined, or stage 0's that are still background)."""
  bicycle, person = 0, 2
  gt = np.array([[[20, 40, 80, 90], [50, 10, 90, 90]]], np.float32)
  far = [[150 + 10 * i, 150, 190 + 10 * i, 190] for i in range(5)]
  anchors = np.array([[22, 38, 78, 92], [0, 0, 40, 60]] + far, np.float32)
  d0 = np.zeros((1, 7, 4), np.float32)
  d0[0, 0] = _encode(gt[0, 1], anchors[0])
  d0[0, 1] = _encode(gt[0, 0], anchors[1])
  bg_logit = [1.0, 2.0, -1.0, 0.5, 3.0, -0.5]  # anchors 1..6
  logits = np.zeros((1, 7, K + 1), np.float32)
  logits[0, 0] = [0.0, 2.0, 0.0, 1.0]
  logits[0, 1] = [1.0, 0.5, 0.0, 0.0]
  logits[0, 2:, 0] = bg_logit[1:]
  batch = dict(
    boxes=jnp.asarray(gt),
    classes=jnp.asarray([[bicycle, person]], jnp.int32),
    valid=jnp.ones((1, 2), bool),
    crowd=jnp.zeros((1, 2), bool),
  )
  outputs = {'cls_logits': (jnp.asarray(logits),), 'box_deltas': (jnp.asarray(d0), jnp.zeros_like(d0))}
  _, m = _loss(2, 2, alpha=0.5, refined_negatives=mode)(outputs, jnp.asarray(anchors), batch)

  def ce(a, column):
    return float(np_ce(logits[0, a], np.array(column)))

  # Background losses of anchors 1..6: 0.851, 0.341, 2.214, 1.037, 0.139, 1.783 -> stage 0 mines 3, 6, 4.
  assert float(m['num_pos_0']) == 1 and float(m['num_neg_0']) == 3
  np.testing.assert_allclose(float(m['cls_loss_0']), ce(0, bicycle + 1) + ce(3, 0) + ce(6, 0) + ce(4, 0), rtol=1e-5)
  # Stage 1 scores the same logits: anchor 0 as person, anchor 1 as bicycle.
  refined_pos = ce(0, person + 1) + ce(1, bicycle + 1)
  negatives = [2, 3, 4, 5, 6] if mode == 'per_stage' else [3, 4, 6]
  assert float(m['num_pos_1']) == 2 and float(m['num_neg_1']) == len(negatives)
  want = 0.5 * (refined_pos + sum(ce(a, 0) for a in negatives)) / 1.0  # over stage 0's N = 1
  np.testing.assert_allclose(float(m['cls_loss_1']), want, rtol=1e-5)


def test_images_without_objects():
  anchors, gt, gt_cls, gt_valid, logits, deltas, batch = _random_case(2, B=2)
  gt_valid[0] = False  # image 0 has no object
  batch = dict(batch, valid=jnp.asarray(gt_valid))
  loss, m = _loss()(_outputs(logits, deltas[:1]), jnp.asarray(anchors), batch)
  np.testing.assert_allclose(float(loss), np_ssd_loss(logits, deltas[0], anchors, gt, gt_cls, gt_valid), rtol=1e-5)
  assert float(m['num_neg_0']) == 3 * float(m['num_pos_0'])  # all from image 1: image 0 mines none
  # A batch without any object: no positives, no negatives, loss 0 and a zero gradient.
  empty = dict(batch, valid=jnp.zeros_like(batch['valid']))
  grad_fn = jax.value_and_grad(lambda o: _loss(2, 2)(o, jnp.asarray(anchors), empty)[0])
  value, grads = grad_fn(_outputs(logits, deltas))
  assert float(value) == 0.0
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
  # min_negatives keeps the hardest background anchors of each image; N = max(0, 1).
  _, m = _loss(min_negatives=2)(_outputs(logits, deltas[:1]), jnp.asarray(anchors), empty)
  bg = np_ce(logits, np.zeros(logits.shape[:2], int))
  np.testing.assert_allclose(float(m['cls_loss_0']), np.sort(bg, 1)[:, -2:].sum(), rtol=1e-5)


def test_gradient_is_finite_jitted_and_only_on_scored_anchors():
  anchors, _, _, _, logits, deltas, batch = _random_case(3)
  loss_fn = _loss(2, 2, alpha=1.0)

  @jax.jit
  def grads(o):
    return jax.grad(lambda o: loss_fn(o, jnp.asarray(anchors), batch)[0])(o)

  g = grads(_outputs(logits, deltas))
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(g))
  assert float(jnp.abs(g['box_deltas'][1]).max()) > 0
  # One stage: only positives and mined negatives get a classification gradient.
  single = _loss()
  g1, m = jax.grad(lambda o: single(o, jnp.asarray(anchors), batch), has_aux=True)(_outputs(logits, deltas[:1]))
  scored = np.asarray(jnp.abs(g1['cls_logits'][0]).max(-1) > 0)
  assert scored.sum() == float(m['num_pos_0']) + float(m['num_neg_0'])
  # bfloat16 logits are scored in float32.
  low = {'cls_logits': (jnp.asarray(logits, jnp.bfloat16),), 'box_deltas': (jnp.asarray(deltas[0]),)}
  assert single(low, jnp.asarray(anchors), batch)[0].dtype == jnp.float32


def test_from_config_and_validation():
  c = defaults.base_config()
  c.model.num_classes = K
  c.consistent.neg_iou_thresholds = (0.5, 0.5, 0.6)
  c.model.box_weights = WEIGHTS
  c.loss.smooth_l1_beta = 1.0
  c.loss.neg_pos_ratio = 3.0
  c.loss.min_negatives = 0
  c.loss.refined_negatives = 'stage0'
  loss = MultiBoxLoss.from_config(c)
  assert loss.stages.neg_iou[:2] == (0.5, 0.5) and loss.stages.box_weights == WEIGHTS
  assert loss.neg_pos_ratio == 3.0 and loss.min_negatives == 0 and loss.smooth_l1_beta == 1.0
  assert loss.refined_negatives == 'stage0'
  with pytest.raises(ValueError, match='refined_negatives'):
    MultiBoxLoss(refined_negatives='shared')
  with pytest.raises(ValueError, match='neg_pos_ratio'):
    MultiBoxLoss(neg_pos_ratio=0.0)
