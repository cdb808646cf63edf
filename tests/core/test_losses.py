import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conret_jax.core import losses
from conret_jax.core.constants import IGNORE


def np_focal(x, t, alpha=0.25, gamma=2.0):
  """The paper's / torchvision's definition, float64, one element at a time."""
  out = np.zeros(x.shape)
  for i in np.ndindex(x.shape):
    p = 1.0 / (1.0 + math.exp(-float(x[i])))
    # log-sigmoid written stably so extreme logits stay finite in the reference too
    ce = max(x[i], 0) - x[i] * t[i] + math.log1p(math.exp(-abs(float(x[i]))))
    p_t = p * t[i] + (1 - p) * (1 - t[i])
    w = 1.0 if alpha is None else alpha * t[i] + (1 - alpha) * (1 - t[i])
    out[i] = w * ce * (1 - p_t) ** gamma
  return out


def np_smooth_l1(x, beta):
  return np.array(
    [
      abs(v) if beta == 0 else (0.5 * v * v / beta if abs(v) < beta else abs(v) - 0.5 * beta)
      for v in np.asarray(x, np.float64).ravel()
    ]
  ).reshape(np.shape(x))


def test_focal_matches_reference():
  rng = np.random.default_rng(0)
  x = rng.normal(0, 4, (5, 7)).astype(np.float32)
  x[0, :4] = [-30.0, 30.0, 0.0, 15.0]
  t = (rng.uniform(size=(5, 7)) > 0.7).astype(np.float32)
  for alpha, gamma in [(0.25, 2.0), (None, 2.0), (0.5, 0.0), (-1.0, 1.5)]:
    got = np.asarray(jax.jit(losses.sigmoid_focal_loss, static_argnums=(2, 3))(x, t, alpha, gamma))
    want = np_focal(x, t, None if alpha is None or alpha < 0 else alpha, gamma)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_focal_gradient_finite_for_extreme_logits_and_bf16():
  x = jnp.array([-100.0, -20.0, 0.0, 20.0, 100.0])
  for t in (jnp.zeros(5), jnp.ones(5)):
    g = jax.grad(lambda z: losses.sigmoid_focal_loss(z, t).sum())(x)
    assert np.isfinite(np.asarray(g)).all()
  out = losses.sigmoid_focal_loss(x.astype(jnp.bfloat16), jnp.ones(5))
  assert out.dtype == jnp.float32


@pytest.mark.parametrize('beta', [0.0, 0.11, 1.0 / 9, 1.0])
def test_smooth_l1(beta):
  x = np.array([-3.0, -0.1, -0.05, 0.0, 0.05, 0.1, 0.11, 0.5, 2.0], np.float32)
  np.testing.assert_allclose(
    np.asarray(jax.jit(losses.smooth_l1)(x, beta)), np_smooth_l1(x, beta), rtol=1e-6, atol=1e-7
  )
  g = jax.grad(lambda v: losses.smooth_l1(v, beta).sum())(jnp.asarray(x))
  assert np.isfinite(np.asarray(g)).all()
  if beta == 0.0:  # L1: gradient is the sign
    np.testing.assert_array_equal(np.asarray(g)[x != 0], np.sign(x[x != 0]))


def test_classification_loss_sum_skips_ignored():
  rng = np.random.default_rng(1)
  logits = rng.normal(-2, 2, (2, 6, 3)).astype(np.float32)
  labels = np.array([[0, -1, 2, -2, -1, 1], [-2, -2, -2, -2, -2, -2]], np.int32)
  want = 0.0
  for b in range(2):
    for a in range(6):
      if labels[b, a] == -2:
        continue
      t = np.zeros(3)
      if labels[b, a] >= 0:
        t[labels[b, a]] = 1
      want += np_focal(logits[b, a], t).sum()
  fn = jax.jit(lambda x, y: losses.classification_loss(x, y, alpha=0.25, gamma=2.0))
  np.testing.assert_allclose(float(fn(logits, labels)), want, rtol=1e-5)
  # vmap over images gives the per-image sums.
  per_image = jax.vmap(lambda x, y: losses.classification_loss(x[None], y[None], alpha=0.25, gamma=2.0))(logits, labels)
  assert float(per_image[1]) == 0.0
  np.testing.assert_allclose(float(per_image.sum()), want, rtol=1e-5)


def test_box_loss_sum_over_positives():
  rng = np.random.default_rng(2)
  deltas = rng.normal(0, 1, (2, 5, 4)).astype(np.float32)
  targets = rng.normal(0, 1, (2, 5, 4)).astype(np.float32)
  positive = np.array([[True, False, True, False, False], [False] * 5])
  for beta in (0.0, 0.11):
    want = sum(np_smooth_l1(deltas[b, a] - targets[b, a], beta).sum() for b, a in zip(*np.nonzero(positive)))
    got = jax.jit(lambda d, t, p: losses.box_loss(d, t, p, beta=beta))(deltas, targets, positive)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    per = jax.vmap(lambda d, t, p: losses.box_loss(d, t, p, beta=beta))(deltas, targets, positive)
    np.testing.assert_allclose(np.asarray(per), [want, 0.0], rtol=1e-5)
  g = jax.grad(lambda d: losses.box_loss(d, targets, positive, beta=0.11))(jnp.asarray(deltas))
  assert np.all(np.asarray(g)[~positive] == 0)


def test_normalizer():
  np.testing.assert_array_equal(np.asarray(jax.jit(losses.normalizer)(jnp.array([0.0, 0.5, 3.0]))), [1, 1, 3])
  assert float(losses.normalizer(7)) == 7.0


def test_focal_parts_match_reference_for_both_targets():
  rng = np.random.default_rng(3)
  x = rng.normal(0, 4, (4, 6)).astype(np.float32)
  x[0, :4] = [-30.0, 30.0, 0.0, 15.0]
  for alpha, gamma in [(0.25, 2.0), (None, 2.0), (0.5, 0.0)]:
    pos, neg = jax.jit(losses.focal_loss_parts, static_argnums=(1, 2))(x, alpha, gamma)
    np.testing.assert_allclose(pos, np_focal(x, np.ones_like(x), alpha, gamma), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(neg, np_focal(x, np.zeros_like(x), alpha, gamma), rtol=1e-4, atol=1e-7)
    assert np.all(np.isfinite(jax.grad(lambda v: sum(map(jnp.sum, losses.focal_loss_parts(v, alpha, gamma))))(x)))


def test_classification_losses_equal_separate_terms():
  """Several label sets on one prediction (Eq. 1): each sum equals its own classification_loss."""
  rng = np.random.default_rng(4)
  logits = rng.normal(-1, 2, (2, 30, 5)).astype(np.float32)
  sets = [rng.integers(-2, 5, (2, 30)).astype(np.int32) for _ in range(3)]
  sums = jax.jit(lambda lg, s: losses.classification_losses(lg, s, alpha=0.25, gamma=2.0))(logits, sets)
  for labels, got in zip(sets, sums):
    onehot = (labels[..., None] == np.arange(5)).astype(np.float32)
    want = np.sum(np_focal(logits, onehot) * (labels >= -1)[..., None])
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def np_focal_derivative(x, t, alpha, gamma, h=1e-6):
  """d np_focal / dx elementwise by central differences in float64."""
  x = np.asarray(x, np.float64)
  return (np_focal(x + h, t, alpha, gamma) - np_focal(x - h, t, alpha, gamma)) / (2 * h)


@pytest.mark.parametrize('alpha, gamma', [(0.25, 2.0), (None, 2.0), (0.5, 0.0), (0.25, 1.5)])
def test_classification_losses_gradient_matches_numpy(alpha, gamma):
  """The hand-written gradient of the summed focal terms: weighted sets, ignored anchors, extreme logits."""
  rng = np.random.default_rng(5)
  logits = rng.normal(-1, 3, (2, 12, 4)).astype(np.float32)
  logits[0, 0] = [-40.0, 40.0, 0.0, 17.0]
  sets = [rng.integers(IGNORE, 4, (2, 12)).astype(np.int32) for _ in range(2)]
  for labels in sets:
    labels[1, :2] = IGNORE  # ignored by every set: no gradient
  weights = (1.0, 0.7)

  def total(lg):
    sums = losses.classification_losses(lg, sets, alpha=alpha, gamma=gamma)
    return sum(w * s for w, s in zip(weights, sums))

  got = np.asarray(jax.jit(jax.grad(total))(logits))
  want = np.zeros(logits.shape)
  for w, labels in zip(weights, sets):
    onehot = (labels[..., None] == np.arange(4)).astype(np.float64)
    want += w * (labels != IGNORE)[..., None] * np_focal_derivative(logits, onehot, alpha, gamma)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert np.all(got[1, :2] == 0)


def test_classification_losses_bfloat16_logits():
  """bf16 logits: float32 sums, a bf16 gradient equal to the float32 one up to bf16 rounding."""
  rng = np.random.default_rng(6)
  logits = rng.normal(-1, 2, (1, 20, 3)).astype(np.float32)
  labels = [rng.integers(IGNORE, 3, (1, 20)).astype(np.int32)]
  f = lambda lg: losses.classification_losses(lg, labels, alpha=0.25, gamma=2.0)[0]
  bf = jnp.asarray(logits, jnp.bfloat16)
  assert f(bf).dtype == jnp.float32
  g16, g32 = jax.grad(f)(bf), jax.grad(f)(jnp.asarray(bf, jnp.float32))
  assert g16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(g16, np.float32), np.asarray(g32), rtol=1e-2, atol=1e-3)


def test_classification_losses_equal_autodiff_reference():
  """Values and gradients of the hand-written focal gradient against autodiff of focal_loss_parts."""
  rng = np.random.default_rng(7)
  logits = rng.normal(-2, 3, (2, 50, 6)).astype(np.float32)
  sets = [rng.integers(IGNORE, 6, (2, 50)).astype(np.int32) for _ in range(2)]
  for alpha, gamma in [(0.25, 2.0), (None, 1.0), (0.25, 0.5)]:
    kw = dict(alpha=alpha, gamma=gamma)
    hand = jax.jit(jax.value_and_grad(lambda lg: sum(losses.classification_losses(lg, sets, **kw)) / 100))
    auto = jax.jit(jax.value_and_grad(lambda lg: sum(losses.classification_losses_autodiff(lg, sets, **kw)) / 100))
    (v1, g1), (v2, g2) = hand(logits), auto(logits)
    # Different formulas for the same values: float32 rounding (~1e-7 relative) apart, any bug O(1).
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), rtol=1e-4, atol=1e-7)
