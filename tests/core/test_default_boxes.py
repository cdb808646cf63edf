"""SSD default boxes against the paper's formulas (float64 loops), a float32 replica of torchvision's
DefaultBoxGenerator, and boxes derived by hand."""

import math

import numpy as np
import pytest

from conret_jax.core import default_boxes as db

TV_SSD300_SCALES = [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]  # torchvision ssd300_vgg16's literal list


def paper_boxes(image_hw, feature_hw, steps, scales, ratios, clip=True):
  """Section 2.2 in float64 loops: level, y, x, then (s_k), (s'_k), and per ratio the wide and the tall box."""
  out = []
  for k, ((fh, fw), step, level_ratios) in enumerate(zip(feature_hw, steps, ratios)):
    s = scales[k]
    sizes = [(s, s), (math.sqrt(s * scales[k + 1]),) * 2]
    for a in level_ratios:
      sizes += [(s * math.sqrt(a), s / math.sqrt(a)), (s / math.sqrt(a), s * math.sqrt(a))]
    for y in range(fh):
      for x in range(fw):
        cx, cy = (x + 0.5) * step, (y + 0.5) * step  # pixels
        for w, h in sizes:
          if clip:
            w, h = min(w, 1.0), min(h, 1.0)
          w, h = w * image_hw[1], h * image_hw[0]
          out.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
  return np.array(out)


def torchvision_boxes(image_size, feature_sizes, steps, scales, ratios):
  """torchvision's DefaultBoxGenerator (square input, clip=True) re-enacted in float32: rows [cx, cy, w, h] of
  relative values, width-height pairs clamped to [0, 1], then corners and a scale to pixels."""
  rows = []
  for k, (f, step) in enumerate(zip(feature_sizes, steps)):
    s = scales[k]
    pairs = [[s, s], [math.sqrt(s * scales[k + 1])] * 2]
    for a in ratios[k]:
      pairs += [[s * math.sqrt(a), s / math.sqrt(a)], [s / math.sqrt(a), s * math.sqrt(a)]]
    pairs = np.clip(np.array(pairs, np.float32), 0, 1)
    cells = np.float32(image_size / step)
    for j in range(f):
      for i in range(f):
        cx, cy = (np.float32(i) + np.float32(0.5)) / cells, (np.float32(j) + np.float32(0.5)) / cells
        rows.extend(np.array([cx, cy, w, h], np.float32) for w, h in pairs)
  r = np.stack(rows)
  corners = np.concatenate([r[:, :2] - np.float32(0.5) * r[:, 2:], r[:, :2] + np.float32(0.5) * r[:, 2:]], axis=1)
  return corners * np.float32(image_size)


def test_scales_of_caffe_rule():
  assert db.ssd_scales(6, 15, 90, 7) == tuple(TV_SSD300_SCALES)
  assert db.SSD300.scales == tuple(TV_SSD300_SCALES)
  # SSD512 on COCO: s_min 0.1, 0.04 on conv4_3 (SSD paper, Section 3.4), s_max 0.9, step 16.
  assert db.SSD512.scales == (0.04, 0.10, 0.26, 0.42, 0.58, 0.74, 0.90, 1.06)
  with pytest.raises(ValueError, match='3 levels'):
    db.ssd_scales(2, 15, 90, 7)


def test_counts():
  assert db.boxes_per_location((2,)) == 4 and db.boxes_per_location((2, 3)) == 6
  assert db.SSD300.per_location() == (4, 6, 6, 6, 4, 4)
  assert db.SSD300.counts() == (5776, 2166, 600, 150, 36, 4)
  assert sum(db.SSD300.counts()) == 8732 == db.SSD300.boxes().shape[0]
  assert sum(db.SSD512.counts()) == 24564 == db.SSD512.boxes().shape[0]
  assert db.level_counts([(3, 5)], [(2, 3)]) == (90,)


@pytest.mark.parametrize('spec', [db.SSD300, db.SSD512], ids=['ssd300', 'ssd512'])
def test_matches_the_paper_formulas(spec):
  got = np.asarray(spec.boxes())
  assert got.dtype == np.float32
  hw = [(f, f) for f in spec.feature_sizes]
  want = paper_boxes((spec.image_size,) * 2, hw, spec.steps, spec.scales, spec.aspect_ratios)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)


def test_matches_torchvision_bit_for_bit():
  s = db.SSD300
  want = torchvision_boxes(s.image_size, s.feature_sizes, s.steps, s.scales, s.aspect_ratios)
  np.testing.assert_array_equal(np.asarray(s.boxes()), want)


def test_unclipped_and_non_square():
  ratios = ((2,), (2, 3))
  scales = (0.2, 0.6, 1.2)
  got = np.asarray(db.generate_default_boxes((64, 128), [(4, 8), (2, 4)], (16, 32), scales, ratios, clip=False))
  want = paper_boxes((64, 128), [(4, 8), (2, 4)], (16, 32), scales, ratios, clip=False)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)
  assert got[:, 2].max() - got[:, 0].min() > 128  # unclipped: wider than the image
  clipped = np.asarray(db.generate_default_boxes((64, 128), [(4, 8), (2, 4)], (16, 32), scales, ratios))
  np.testing.assert_allclose(clipped, paper_boxes((64, 128), [(4, 8), (2, 4)], (16, 32), scales, ratios), atol=1e-4)


def test_boxes_derived_by_hand():
  b = np.asarray(db.SSD300.boxes())
  # Level 0, cell (0, 0): centre 4 px. Square of 0.07 * 300 = 21 px.
  np.testing.assert_allclose(b[0], [-6.5, -6.5, 14.5, 14.5], atol=1e-4)
  # s' = sqrt(0.07 * 0.15) * 300 = 30.7409 px.
  np.testing.assert_allclose(b[1], [4 - 15.37043, 4 - 15.37043, 4 + 15.37043, 4 + 15.37043], atol=1e-4)
  # Ratio 2, wide: 21 * sqrt(2) = 29.6985 by 21 / sqrt(2) = 14.8492; then the tall one.
  np.testing.assert_allclose(b[2], [4 - 14.84924, 4 - 7.42462, 4 + 14.84924, 4 + 7.42462], atol=1e-4)
  np.testing.assert_allclose(b[3], [4 - 7.42462, 4 - 14.84924, 4 + 7.42462, 4 + 14.84924], atol=1e-4)
  # Level 0, cell (y=0, x=1): the next 4 boxes, centre x = 12.
  np.testing.assert_allclose(b[4], [1.5, -6.5, 22.5, 14.5], atol=1e-4)
  # First box of level 1 (after 38 * 38 * 4): centre 8, 0.15 * 300 = 45 px.
  np.testing.assert_allclose(b[5776], [-14.5, -14.5, 30.5, 30.5], atol=1e-4)
  # The 1x1 level, centre 150: 0.87 * sqrt(2) = 1.23 is clipped to the whole side; 0.87 / sqrt(2) * 300 = 184.555.
  np.testing.assert_allclose(b[-2], [0.0, 150 - 92.27743, 300.0, 150 + 92.27743], atol=1e-4)
  np.testing.assert_allclose(b[-1], [150 - 92.27743, 0.0, 150 + 92.27743, 300.0], atol=1e-4)
  # SSD512, level 0, cell (0, 0): 0.04 * 512 = 20.48 px around 4.
  np.testing.assert_allclose(np.asarray(db.SSD512.boxes())[0], [-6.24, -6.24, 14.24, 14.24], atol=1e-4)


def test_level_order_lines_up_with_a_head_layout():
  """Boxes of level k reshaped [H, W, n, 4] (the head's [B, H, W, n * C] -> [B, H * W * n, C]) have centres on
  row y, column x."""
  s = db.SSD300
  b = np.asarray(s.boxes())
  start = 0
  for f, step, n, count in zip(s.feature_sizes, s.steps, s.per_location(), s.counts()):
    level = b[start : start + count].reshape(f, f, n, 4)
    centre = (level[..., :2] + level[..., 2:]) / 2
    want_x = (np.arange(f) + 0.5) * step
    np.testing.assert_allclose(centre[..., 0], np.broadcast_to(want_x[None, :, None], (f, f, n)), atol=1e-3)
    np.testing.assert_allclose(centre[..., 1], np.broadcast_to(want_x[:, None, None], (f, f, n)), atol=1e-3)
    start += count


def test_mismatched_lengths_are_refused():
  with pytest.raises(ValueError, match='2 levels need 2 steps'):
    db.generate_default_boxes(300, (38, 19), (8,), (0.1, 0.2, 0.3), ((2,), (2,)))
  with pytest.raises(ValueError, match='3 scales'):
    db.generate_default_boxes(300, (38, 19), (8, 16), (0.1, 0.2), ((2,), (2,)))
