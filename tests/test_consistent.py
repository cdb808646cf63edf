"""The consistent loss (Eq. 1-2) against a NumPy RetinaNet reference, the paper's Figure 2 case, and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conret_jax import consistent, defaults, stages
from conret_jax.stages import Stages

K = 3  # classes


def _config(enabled=True, n_cls=2, n_reg=2, alpha=1.0, beta=0.11):
  c = defaults.base_config()
  c.model.num_classes = K
  c.consistent.enabled = enabled
  c.consistent.num_cls_terms = n_cls
  c.consistent.num_reg_terms = n_reg
  c.consistent.alpha = alpha
  c.loss.smooth_l1_beta = beta
  return c


# ---------------- NumPy reference of RetinaNet's loss (loops are fine here) ----------------


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
  return np.array([(bx - ax) / aw, (by - ay) / ah, np.log(bw / aw), np.log(bh / ah)])


def _np_retinanet_loss(logits, deltas, anchors, gt, gt_cls, gt_valid, pos=0.5, neg=0.4, beta=0.11):
  B, A, _ = logits.shape
  cls_sum, box_sum, npos = 0.0, 0.0, 0
  for b in range(B):
    gts = [g for g in range(gt.shape[1]) if gt_valid[b, g]]
    iou = np.array([[_iou(anchors[a], gt[b, g]) for g in gts] for a in range(A)]).reshape(A, len(gts))
    labels = np.full(A, -1)  # -1 bg, -2 ignore, else gt row
    for a in range(A):
      if not gts:
        continue
      j = int(np.argmax(iou[a]))
      m = iou[a, j]
      labels[a] = gts[j] if m >= pos else (-1 if m < neg else -2)
    for jj, g in enumerate(gts):  # low-quality matches, ties included
      best = iou[:, jj].max()
      if best > 0:
        for a in range(A):
          if iou[a, jj] == best:
            labels[a] = gts[int(np.argmax(iou[a]))]
    for a in range(A):
      if labels[a] == -2:
        continue
      target = np.zeros(K)
      if labels[a] >= 0:
        target[gt_cls[b, labels[a]]] = 1.0
        npos += 1
        d = deltas[b, a] - _encode(gt[b, labels[a]], anchors[a])
        ad = np.abs(d)
        box_sum += np.sum(np.where(ad < beta, 0.5 * d * d / beta, ad - 0.5 * beta))
      p = 1 / (1 + np.exp(-logits[b, a]))
      pt = np.where(target == 1, p, 1 - p)
      at = np.where(target == 1, 0.25, 0.75)
      cls_sum += np.sum(-at * (1 - pt) ** 2 * np.log(pt))
  n = max(npos, 1)
  return cls_sum / n + box_sum / n


def _random_case(seed, B=2, A=40, G=4):
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0, 80, (A, 2))
  wh = rng.uniform(8, 40, (A, 2))
  anchors = np.concatenate([xy, xy + wh], 1).astype(np.float32)
  # Ground truth near some anchors so there are positives, negatives and ignored anchors.
  picks = rng.choice(A, (B, G))
  gt = anchors[picks] + rng.normal(0, 2.0, (B, G, 4)).astype(np.float32)
  gt[..., 2:] = np.maximum(gt[..., 2:], gt[..., :2] + 4)
  gt_cls = rng.integers(0, K, (B, G)).astype(np.int32)
  gt_valid = np.ones((B, G), bool)
  gt_valid[1, -1] = False  # a padding row
  logits = rng.normal(-2, 1.5, (B, A, K)).astype(np.float32)
  deltas = [rng.normal(0, 0.2, (B, A, 4)).astype(np.float32) for _ in range(3)]
  batch = dict(
    boxes=jnp.asarray(gt), classes=jnp.asarray(gt_cls), valid=jnp.asarray(gt_valid), crowd=jnp.zeros((B, G), bool)
  )
  return anchors, gt, gt_cls, gt_valid, logits, deltas, batch


@pytest.mark.parametrize('enabled,n_cls,n_reg,alpha', [(False, 2, 2, 1.0), (True, 1, 1, 1.0), (True, 2, 1, 0.0)])
def test_plain_retinanet_loss_is_reproduced(enabled, n_cls, n_reg, alpha):
  anchors, gt, gt_cls, gt_valid, logits, deltas, batch = _random_case(0)
  config = _config(enabled, n_cls, n_reg, alpha)
  outputs = {'cls_logits': (jnp.asarray(logits),), 'box_deltas': tuple(jnp.asarray(d) for d in deltas[:n_reg])}
  loss, metrics = jax.jit(lambda o: consistent.ConsistentLoss.from_config(config)(o, jnp.asarray(anchors), batch))(
    outputs
  )
  want = _np_retinanet_loss(logits, deltas[0], anchors, gt, gt_cls, gt_valid)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert float(metrics['num_pos_0']) > 0
  if alpha == 0.0:
    assert float(metrics['cls_loss_1']) == 0.0


def test_refined_term_uses_refined_labels_on_the_same_prediction():
  anchors, gt, gt_cls, gt_valid, logits, deltas, batch = _random_case(1)
  config = _config(True, 2, 2, alpha=0.5)
  outputs = {'cls_logits': (jnp.asarray(logits),), 'box_deltas': (jnp.asarray(deltas[0]), jnp.asarray(deltas[1]))}
  loss, metrics = consistent.ConsistentLoss.from_config(config)(outputs, jnp.asarray(anchors), batch)
  per_stage = Stages.from_config(config).targets(jnp.asarray(anchors), outputs['box_deltas'], batch)
  refined = np.asarray(per_stage[1]['anchors'])
  aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
  cx, cy = anchors[:, 0] + aw / 2 + deltas[0][..., 0] * aw, anchors[:, 1] + ah / 2 + deltas[0][..., 1] * ah
  w, h = aw * np.exp(deltas[0][..., 2]), ah * np.exp(deltas[0][..., 3])
  want_refined = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
  np.testing.assert_allclose(refined, want_refined, rtol=1e-5, atol=1e-4)
  # The refined classification term is the NumPy focal loss of the refined labels, normalized by stage-0 positives.
  labels1 = np.asarray(per_stage[1]['cls_labels'])
  n0 = max(float(metrics['num_pos_0']), 1.0)
  p = 1 / (1 + np.exp(-logits))
  onehot = (labels1[..., None] == np.arange(K)).astype(np.float64)
  pt = np.where(onehot == 1, p, 1 - p)
  at = np.where(onehot == 1, 0.25, 0.75)
  focal = -at * (1 - pt) ** 2 * np.log(pt)
  want = 0.5 * np.sum(focal * (labels1 >= -1)[..., None]) / n0
  np.testing.assert_allclose(float(metrics['cls_loss_1']), want, rtol=1e-5)
  total = sum(float(v) for k, v in metrics.items() if k.startswith(('cls_loss', 'box_loss')))
  np.testing.assert_allclose(float(loss), total, rtol=1e-6)


def test_figure2_occlusion_changes_the_refined_label():
  """Figure 2: a bicycle occluded by a person. Anchor 0 matches the bicycle, but its regression moves it onto the
  person, so its refined label becomes person. Anchor 1 starts as a negative (IoU < 0.4 with the bicycle) and its
  regression lands on the bicycle: the refined stage makes it a positive bicycle (misalignment (b), Section 3.1)."""
  bicycle, person = 0, 2
  gt = np.array([[[20, 40, 80, 90], [50, 10, 90, 90]]], np.float32)  # bicycle, person (overlapping)
  anchors = np.array(
    [
      [22, 38, 78, 92],  # IoU 0.9 with the bicycle
      [0, 0, 40, 60],  # IoU < 0.4 with both
      [150, 150, 190, 190],
    ],
    np.float32,
  )  # far away: background in both stages
  config = _config(True, 2, 2)
  config.loss.allow_low_quality_matches = False
  # Deltas that move anchor 0 exactly onto the person and anchor 1 exactly onto the bicycle.
  d0 = np.zeros((1, 3, 4), np.float32)
  d0[0, 0] = _encode(gt[0, 1], anchors[0])
  d0[0, 1] = _encode(gt[0, 0], anchors[1])
  batch = dict(
    boxes=jnp.asarray(gt),
    classes=jnp.asarray([[bicycle, person]], jnp.int32),
    valid=jnp.ones((1, 2), bool),
    crowd=jnp.zeros((1, 2), bool),
  )
  per_stage = Stages.from_config(config).targets(jnp.asarray(anchors), (jnp.asarray(d0), jnp.zeros_like(d0)), batch)
  assert np.asarray(per_stage[0]['cls_labels'])[0].tolist() == [bicycle, -1, -1]
  assert np.asarray(per_stage[1]['cls_labels'])[0].tolist() == [person, bicycle, -1]
  # The second regression's targets start from the refined anchors: they land exactly, so the offsets are zero.
  np.testing.assert_allclose(np.asarray(per_stage[1]['box_targets'])[0, :2], 0.0, atol=1e-5)


def test_crowd_and_padding_never_make_positives():
  gt = np.array([[[10, 10, 50, 50], [60, 60, 100, 100], [0, 0, 0, 0]]], np.float32)
  anchors = np.array([[10, 10, 50, 50], [60, 60, 100, 100], [0, 0, 1, 1]], np.float32)
  batch = dict(
    boxes=jnp.asarray(gt),
    classes=jnp.zeros((1, 3), jnp.int32),
    valid=jnp.asarray([[True, True, False]]),
    crowd=jnp.asarray([[False, True, False]]),
  )
  config = _config(True, 2, 2)
  zeros = jnp.zeros((1, 3, 4))
  per_stage = Stages.from_config(config).targets(jnp.asarray(anchors), (zeros, zeros), batch)
  for t in per_stage:
    assert np.asarray(t['positive'])[0].tolist() == [True, False, False]


def test_no_gradient_flows_through_the_refined_anchors():
  anchors, _, _, _, logits, deltas, batch = _random_case(2)
  config = _config(True, 2, 2)
  config.loss.box_loss_weight = 1.0

  def refined_terms(d0, d1):
    outputs = {'cls_logits': (jnp.asarray(logits),), 'box_deltas': (d0, d1)}
    _, m = consistent.ConsistentLoss.from_config(config)(outputs, jnp.asarray(anchors), batch)
    return m['cls_loss_1'] + m['box_loss_1']

  d0 = jnp.asarray(0.05 * deltas[0])  # small first regression: the refined stage keeps positives
  _, m = consistent.ConsistentLoss.from_config(config)(
    {'cls_logits': (jnp.asarray(logits),), 'box_deltas': (d0, jnp.asarray(deltas[1]))},
    jnp.asarray(anchors),
    batch,
  )
  assert float(m['num_pos_1']) > 0
  g0, g1 = jax.grad(refined_terms, argnums=(0, 1))(d0, jnp.asarray(deltas[1]))
  assert float(jnp.abs(g0).max()) == 0.0  # the refined anchors depend on d0, but only as constants
  assert float(jnp.abs(g1).max()) > 0.0


def test_normalizers_are_global_over_the_batch():
  """Per-image positives differ; every term divides by the batch total, not a per-image count."""
  anchors, gt, gt_cls, gt_valid, logits, deltas, batch = _random_case(3)
  config = _config(False)
  outputs = {'cls_logits': (jnp.asarray(logits),), 'box_deltas': (jnp.asarray(deltas[0]),)}
  loss, m = consistent.ConsistentLoss.from_config(config)(outputs, jnp.asarray(anchors), batch)
  whole = _np_retinanet_loss(logits, deltas[0], anchors, gt, gt_cls, gt_valid)
  np.testing.assert_allclose(float(loss), whole, rtol=1e-5)


@pytest.mark.parametrize(
  'key,value,match',
  [
    ('num_cls_terms', 3, 'regression terms'),
    ('num_reg_terms', 4, 'pos_iou_thresholds'),
    ('alpha', -1.0, 'alpha'),
    ('inference_reg_steps', 3, 'inference_reg_steps'),
  ],
)
def test_validate_names_the_key(key, value, match):
  config = _config(True, 2, 2)
  if key == 'num_cls_terms':
    config.consistent.num_reg_terms = 1
  config.consistent[key] = value
  with pytest.raises(ValueError, match=match):
    stages.validate(config)


def test_inference_steps():
  config = _config(True, 2, 2)
  assert Stages.from_config(config).inference_steps == 2
  config.consistent.inference_reg_steps = 1
  assert Stages.from_config(config).inference_steps == 1
  assert Stages.from_config(_config(False)).inference_steps == 1
