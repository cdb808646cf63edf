"""Flip / resize / crop / pad keep boxes on their pixels; decoding handles what real files contain."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conret_jax.data import decode, pipeline, preprocess, sizes
from tests.data.conftest import COLOURS, small_config


def _check_boxes_on_pixels(batch):
  """Inside every valid box: one of the rectangle colours; 2 px outside each side: not that colour."""
  checked = 0
  for b in range(len(batch['images'])):
    image = batch['images'][b]
    for (x1, y1, x2, y2), ok in zip(batch['boxes'][b], batch['valid'][b]):
      if not ok or x2 - x1 < 6 or y2 - y1 < 6:
        continue
      inner = image[int(np.ceil(y1)) + 2 : int(y2) - 2, int(np.ceil(x1)) + 2 : int(x2) - 2].reshape(-1, 3)
      colour = inner[0]
      assert min(np.abs(np.subtract(COLOURS, colour)).max(axis=1)) < 3, colour
      assert np.abs(inner - colour).max() < 3
      ym, xm = int((y1 + y2) / 2), int((x1 + x2) / 2)
      for y, x in ((ym, int(x1) - 2), (ym, int(np.ceil(x2)) + 2), (int(y1) - 2, xm), (int(np.ceil(y2)) + 2, xm)):
        if 0 <= y < image.shape[0] and 0 <= x < image.shape[1]:
          assert np.abs(image[y, x] - colour).max() > 50, (b, y, x)
      checked += 1
  return checked


@pytest.mark.parametrize('resize,jitter', [('square', (1.0, 1.0)), ('square', (0.5, 1.8)), ('short_side', (1, 1))])
def test_train_augmentation_keeps_boxes_aligned(rect_dataset, resize, jitter):
  config = small_config(*rect_dataset[:2], image_size=128, batch=4)
  config.data.resize, config.data.scale_jitter, config.data.max_size = resize, jitter, 200
  it = pipeline.host_batches(config, train=True)
  checked = sum(_check_boxes_on_pixels(next(it)) for _ in range(6))
  assert checked > 20


def test_eval_boxes_match_numpy_reference(rect_dataset):
  annotation_file, image_dir, truth = rect_dataset
  config = small_config(annotation_file, image_dir, image_size=128, eval_batch=4)
  seen = 0
  for batch in pipeline.host_batches(config, train=False):
    for b in np.nonzero(batch['example_valid'])[0]:
      h, w = batch['orig_hw'][b]
      scale = 128 / max(h, w)
      np.testing.assert_allclose(batch['scale'][b], scale, rtol=1e-6)
      rects = truth[int(batch['image_id'][b])]
      want = np.array([r[:4] for r in rects], np.float32) * scale
      np.testing.assert_allclose(batch['boxes'][b, : len(rects)], want, rtol=1e-5, atol=1e-4)
      assert not batch['valid'][b, len(rects) :].any() and batch['valid'][b, : len(rects)].all()
      assert not batch['boxes'][b, len(rects) :].any()
      # Padding (bottom/right) is zero; the image occupies the top-left round(h*s) x round(w*s).
      nh, nw = round(h * scale), round(w * scale)
      assert not batch['images'][b, nh:].any() and not batch['images'][b, :, nw:].any()
      seen += 1
  assert seen == 12


def test_flip_horizontal_matches_numpy():
  image = np.arange(2 * 5 * 1, dtype=np.float32).reshape(2, 5, 1)
  boxes = np.array([[0.5, 0, 2, 1], [3, 1, 5, 2]], np.float32)
  out_image, out_boxes = preprocess.flip_horizontal(tf.constant(image), tf.constant(boxes), 5.0)
  np.testing.assert_array_equal(out_image.numpy(), image[:, ::-1])
  np.testing.assert_allclose(out_boxes.numpy(), [[3, 0, 4.5, 1], [0, 1, 2, 2]])


def test_short_side_jitter_draws_several_scales_within_the_range(rect_dataset):
  """Detectron's multi-scale training: each image's short side is one of image_size - k * 32 within the range,
  while the padded shapes stay the two buckets of image_size; evaluation keeps image_size."""
  config = small_config(*rect_dataset[:2], image_size=128, batch=4)
  config.data.resize, config.data.max_size, config.data.scale_jitter = 'short_side', 1000, (0.5, 1.0)
  assert sizes.short_side_scales(config.data) == (64, 96, 128)
  buckets = set(sizes.padded_shapes(config.data).values())
  shorts = set()
  it = pipeline.host_batches(config, train=True)
  for _ in range(6):
    batch = next(it)
    assert batch['images'].shape[1:3] in buckets
    shorts |= {round(float(min(hw)) * float(s)) for hw, s in zip(batch['orig_hw'], batch['scale'])}
  assert len(shorts) >= 2 and shorts <= {64, 96, 128}, shorts
  for batch in pipeline.host_batches(config, train=False):
    for hw, s, ok in zip(batch['orig_hw'], batch['scale'], batch['example_valid']):
      assert not ok or round(float(min(hw)) * float(s)) == 128


def test_class_layout_numbers_the_boxes(rect_dataset):
  """class_layout=category_id labels each box with its category id itself (here 2, 5, 9), contiguous with its
  rank among the dataset's ids; the two describe the same boxes."""
  config = small_config(*rect_dataset[:2], image_size=128, batch=4)
  contiguous = next(pipeline.host_batches(config, train=False))
  config.model.class_layout, config.model.num_classes = 'category_id', 10
  by_id = next(pipeline.host_batches(config, train=False))
  valid = contiguous['valid']
  assert set(contiguous['classes'][valid].tolist()) <= {0, 1, 2}
  assert set(by_id['classes'][valid].tolist()) <= {2, 5, 9}
  np.testing.assert_array_equal(np.array([2, 5, 9])[contiguous['classes'][valid]], by_id['classes'][valid])


def test_padded_shapes_are_multiples_of_128():
  config = small_config('a', 'b')
  config.data.resize, config.data.image_size, config.data.max_size = 'short_side', 800, 1333
  assert preprocess.padded_shapes(config.data) == {'landscape': (896, 1408), 'portrait': (1408, 896)}
  config.data.resize = 'square'
  config.data.image_size = 640
  assert preprocess.padded_shapes(config.data) == {'square': (640, 640)}


def _encode(array, fmt, mode=None):
  buf = io.BytesIO()
  (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buf, fmt)
  return buf.getvalue()


def test_decode_formats():
  rng = np.random.RandomState(0)
  rgb = rng.randint(0, 255, (9, 7, 3), np.uint8)
  np.testing.assert_array_equal(decode.decode_image(tf.constant(_encode(rgb, 'PNG'))).numpy(), rgb)
  gray = rng.randint(0, 255, (9, 7), np.uint8)
  np.testing.assert_array_equal(
    decode.decode_image(tf.constant(_encode(gray, 'PNG'))).numpy(), np.repeat(gray[..., None], 3, -1)
  )
  cmyk = _encode(rng.randint(0, 255, (16, 16, 4), np.uint8), 'JPEG', 'CMYK')
  want = np.asarray(Image.open(io.BytesIO(cmyk)).convert('RGB'), np.float32)
  got = decode.decode_image(tf.constant(cmyk)).numpy().astype(np.float32)
  assert got.shape == (16, 16, 3) and np.abs(got - want).mean() < 3
  np.testing.assert_array_equal(decode.image_shape(tf.constant(cmyk)).numpy(), [16, 16])
  np.testing.assert_array_equal(decode.image_shape(tf.constant(_encode(rgb, 'PNG'))).numpy(), [9, 7])
