"""Hard negative mining against a per-image NumPy loop: counts, ties, ignored anchors, images without objects, the
signs and sizes of losses the radix select must order."""

import math

import jax
import numpy as np
import pytest

from conret_jax.core.hard_negatives import mine_hard_negatives

_mine = jax.jit(mine_hard_negatives, static_argnames=('neg_pos_ratio', 'min_negatives'))


def np_mine(losses, positive, eligible, neg_pos_ratio=3.0, min_negatives=0):
  """Per image: sort the eligible anchors by loss (largest first, lower index first on ties), keep the first
  min(ceil(max(ratio * positives, min_negatives)), eligible) of them."""
  out = np.zeros(losses.shape, bool)
  for b in range(losses.shape[0]):
    candidates = [a for a in range(losses.shape[1]) if eligible[b, a]]
    candidates.sort(key=lambda a: (-losses[b, a], a))
    k = math.ceil(max(neg_pos_ratio * positive[b].sum(), min_negatives))
    out[b, candidates[:k]] = True
  return out


def check(losses, positive, eligible, **kw):
  got = np.asarray(_mine(losses, positive, eligible, **kw))
  np.testing.assert_array_equal(got, np_mine(losses, positive, eligible, **kw))
  assert not np.any(got & ~eligible)
  return got


@pytest.mark.parametrize('ratio,min_negatives', [(3.0, 0), (2.5, 0), (3.0, 5), (0.4, 0)])
def test_random_batches_with_ties(ratio, min_negatives):
  rng = np.random.default_rng(0)
  B, A = 6, 60
  losses = np.round(rng.exponential(1.0, (B, A)), 1).astype(np.float32)  # one decimal: many ties
  label = rng.choice(3, (B, A), p=[0.1, 0.7, 0.2])  # 0 positive, 1 background, 2 ignore
  positive, eligible = label == 0, label == 1
  positive[1] = False  # an image without objects
  positive[2], eligible[2] = False, False  # more negatives wanted than available: 40 positives, 10 eligible
  positive[2, 20:], eligible[2, :10] = True, True
  losses[label != 1] += 100.0  # positives and ignored anchors score high: they must still never be mined
  got = check(losses, positive, eligible, neg_pos_ratio=ratio, min_negatives=min_negatives)
  assert got[1].sum() == min(min_negatives, eligible[1].sum())
  assert got[2].sum() == 10 and np.all(got[2, :10])  # every eligible one (ratio x 40 >= 16 > 10)


def test_counts():
  losses = np.arange(20, dtype=np.float32)[None].repeat(3, 0)
  positive = np.zeros((3, 20), bool)
  positive[0, :2] = True  # 2 positives -> 6 negatives
  positive[1, :1] = True  # 1 positive -> 3
  eligible = ~positive
  got = check(losses, positive, eligible)
  assert got.sum(1).tolist() == [6, 3, 0]
  assert np.flatnonzero(got[0]).tolist() == list(range(14, 20))  # the largest losses


def test_ties_go_to_the_lower_index():
  losses = np.ones((1, 10), np.float32)
  positive = np.zeros((1, 10), bool)
  positive[0, 4] = True
  eligible = ~positive
  eligible[0, 0] = False
  got = check(losses, positive, eligible, neg_pos_ratio=3.0)
  assert np.flatnonzero(got[0]).tolist() == [1, 2, 3]


def test_all_ignored_image_mines_nothing():
  losses = np.random.default_rng(1).uniform(0, 5, (2, 12)).astype(np.float32)
  positive = np.zeros((2, 12), bool)
  positive[:, 0] = True
  eligible = np.zeros((2, 12), bool)  # every non-positive anchor ignored
  eligible[1, 5:] = True
  got = check(losses, positive, eligible, min_negatives=4)
  assert got[0].sum() == 0 and got[1].sum() == 4


def test_image_without_objects():
  losses = np.asarray([[0.5, 3.0, 1.0, 2.0, 0.1]], np.float32)
  positive = np.zeros((1, 5), bool)
  eligible = np.ones((1, 5), bool)
  assert check(losses, positive, eligible).sum() == 0  # torchvision's and Caffe's: ratio * 0
  got = check(losses, positive, eligible, min_negatives=2)
  assert np.flatnonzero(got[0]).tolist() == [1, 3]


def test_more_positives_than_negatives_available():
  losses = np.linspace(0, 1, 8, dtype=np.float32)[None]
  positive = np.asarray([[True] * 5 + [False] * 3])
  eligible = ~positive
  got = check(losses, positive, eligible)
  assert np.flatnonzero(got[0]).tolist() == [5, 6, 7]


def test_negative_and_signed_zero_losses_order_as_numbers():
  # The select orders the losses' bits: negative floats reverse, -0.0 ties with 0.0 (then index order decides).
  losses = np.asarray([[-2.0, 0.0, -0.0, -1e-30, 1e-30, -3.5, 7.0, -0.0, 2.0, -1.0]], np.float32)
  positive = np.zeros((1, 10), bool)
  eligible = np.ones((1, 10), bool)
  for m in range(11):
    got = check(losses, positive, eligible, min_negatives=m)
    assert got.sum() == m
  got = check(losses, positive, eligible, min_negatives=5)
  assert np.flatnonzero(got[0]).tolist() == [1, 2, 4, 6, 8]  # 7, 2, 1e-30, then 0.0 and -0.0 (indices 1, 2)


def test_full_size_batch_with_ties():
  # SSD300's 8732 default boxes, losses with many exact ties and tiny gaps, k up to thousands.
  rng = np.random.default_rng(3)
  B, A = 4, 8732
  losses = rng.choice(rng.exponential(2.0, 400), (B, A)).astype(np.float32)
  losses[0, ::7] = np.nextafter(losses[0, ::7], np.float32(np.inf))
  positive = rng.uniform(size=(B, A)) < [[0.002], [0.02], [0.1], [0.0]]
  eligible = ~positive & (rng.uniform(size=(B, A)) < 0.9)
  got = check(losses, positive, eligible, min_negatives=3)
  assert got.sum(1).tolist()[3] == 3


def test_nan_losses_are_mined_last():
  losses = np.asarray([[np.nan, 1.0, np.nan, 3.0, 2.0]], np.float32)
  positive = np.zeros((1, 5), bool)
  eligible = np.ones((1, 5), bool)
  for m, expected in [(3, [1, 3, 4]), (4, [0, 1, 3, 4]), (5, [0, 1, 2, 3, 4])]:
    got = np.asarray(_mine(losses, positive, eligible, min_negatives=m))
    assert np.flatnonzero(got[0]).tolist() == expected
