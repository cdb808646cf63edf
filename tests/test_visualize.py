"""Drawing detections: box outlines in the class colour, thresholds, and the PNG grid layout."""

import numpy as np
import pytest
from PIL import Image

from conret_jax import visualize


def _drawn(image, **kwargs):
  defaults = dict(
    boxes=np.array([[10, 30, 40, 60]], np.float32),
    scores=np.array([0.9]),
    classes=np.array([1]),
    class_names=['cat', 'dog'],
  )
  defaults.update(kwargs)
  return np.asarray(visualize.draw_detections(image, **defaults))


def test_box_outline_label_and_untouched_pixels():
  image = np.zeros((80, 64, 3), np.float32)
  out = _drawn(image)
  colour = visualize.PALETTE[1]
  assert out.shape == (80, 64, 3) and out.dtype == np.uint8
  for x, y in ((10, 45), (40, 45), (25, 30), (25, 60)):  # the four edges
    assert tuple(out[y, x]) == colour, (x, y)
  assert tuple(out[45, 25]) == (0, 0, 0)  # inside the box
  assert tuple(out[75, 60]) == (0, 0, 0)  # outside
  label_rows = out[:30, 10:40]  # the label sits above the box, on a filled colour patch
  assert (label_rows == colour).all(axis=-1).sum() > 20
  assert image.max() == 0  # the input is not modified


def test_threshold_and_valid_skip_boxes():
  image = np.zeros((80, 64, 3), np.uint8)
  assert _drawn(image, scores=np.array([0.2]), score_threshold=0.5).max() == 0
  assert _drawn(image, valid=np.array([False])).max() == 0
  # Classes wrap around the palette; an unknown class index still draws (labelled by number).
  out = _drawn(image, classes=np.array([len(visualize.PALETTE) + 3]), class_names=['a'])
  assert tuple(out[45, 10]) == visualize.PALETTE[3]


def test_save_grid_layout(tmp_path):
  rs = np.random.RandomState(0)
  images = rs.uniform(0, 255, (5, 32, 48, 3)).astype(np.float32)
  dets = {
    'boxes': np.tile(np.array([[4, 4, 30, 20]], np.float32), (5, 1, 1)),
    'scores': np.full((5, 1), 0.8, np.float32),
    'classes': np.arange(5)[:, None] % 2,
    'valid': np.ones((5, 1), bool),
  }
  path = str(tmp_path / 'grid.png')
  visualize.save_grid(images, dets, ['a', 'b'], path, max_images=8)
  grid = np.asarray(Image.open(path).convert('RGB'))
  assert grid.shape == (2 * 32, 3 * 48, 3)  # 5 images: 3 columns, 2 rows
  tile4 = np.asarray(
    visualize.draw_detections(
      images[4], dets['boxes'][4], dets['scores'][4], dets['classes'][4], ['a', 'b'], score_threshold=0.3
    )
  )
  np.testing.assert_array_equal(grid[32:64, 48:96], tile4)  # row 1, column 1
  assert (grid[32:, 96:] == 255).all()  # the empty sixth cell stays white

  visualize.save_grid(images, dets, ['a', 'b'], path, max_images=2)
  assert Image.open(path).size == (2 * 48, 32)
  with pytest.raises(ValueError):
    visualize.save_grid(images[:0], dets, ['a'], path)
