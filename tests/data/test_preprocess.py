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
      np.testing.assert_allclose(batch['scale'][b], [scale, scale], rtol=1e-6)  # (sy, sx): one factor, twice
      rects = truth[int(batch['image_id'][b])]
      want = np.array([r[:4] for r in rects], np.float32) * scale
      np.testing.assert_allclose(batch['boxes'][b, : len(rects)], want, rtol=1e-5, atol=1e-4)
      assert not batch['valid'][b, len(rects) :].any() and batch['valid'][b, : len(rects)].all()
      assert not batch['boxes'][b, len(rects) :].any()
      # Padding (bottom/right) is the pixel mean (pad_pixels='mean'); the image is the top-left round(h*s) x round(w*s).
      nh, nw = round(h * scale), round(w * scale)
      pad = np.float32(config.model.pixel_mean)
      assert (batch['images'][b, nh:] == pad).all() and (batch['images'][b, :, nw:] == pad).all()
      assert (batch['images'][b, nh - 1, : nw - 1] != pad).any(axis=-1).any()
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
    shorts |= {round(float(min(hw)) * float(s)) for hw, (s, _) in zip(batch['orig_hw'], batch['scale'])}
  assert len(shorts) >= 2 and shorts <= {64, 96, 128}, shorts
  for batch in pipeline.host_batches(config, train=False):
    for hw, (s, _), ok in zip(batch['orig_hw'], batch['scale'], batch['example_valid']):
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


def _raw(image, boxes, index):
  """preprocess_example's input (the layout of preprocess.py's docstring) for one uint8 image and its boxes."""
  gt = decode.pad_ground_truth(tf.constant(boxes), tf.range(len(boxes)), tf.zeros(len(boxes), tf.bool), 8)
  return dict(
    gt,
    image_data=tf.constant(_encode(image, 'PNG')),
    image_id=tf.constant(1, tf.int64),
    height=image.shape[0],
    width=image.shape[1],
    index=tf.constant(index, tf.int64),
    example_valid=tf.constant(True),
  )


@pytest.mark.parametrize('resize', ['square', 'short_side'])
def test_retinanet_draws_are_those_of_the_three_way_split(resize):
  """The key (seed, index) now splits four ways (the fourth seeds SSD's augmentation); square and short_side still
  take the flip and the jitter from the first two seeds of the three-way split they used before, so their batches
  are unchanged: the scale is S / long side times the jitter (short_side: the drawn short side / short side),
  repeated as (sy, sx), and the boxes are flipped exactly when the flip seed's draw is below 0.5. Jitter at most 1
  keeps the image inside S x S, so nothing is cropped and every box is the reference's."""
  config = small_config('a', 'b', image_size=64)
  config.data.resize, config.data.max_size, config.data.scale_jitter = resize, 100, (0.5, 1.0)
  image = np.zeros((40, 70, 3), np.uint8)
  box = np.array([[10, 5, 30, 20]], np.float32)
  flips = []
  for index in range(8):
    out = preprocess.preprocess_example(_raw(image, box, index), config.data, train=True, seed=3)
    flip_seed, scale_seed, _ = tf.random.experimental.stateless_split(tf.constant([3, index], tf.int64), 3)
    if resize == 'square':
      u = tf.random.stateless_uniform([], seed=scale_seed, minval=0.5, maxval=1.0).numpy()
      want = np.float32(64) / np.float32(70) * u
    else:
      scales = sizes.short_side_scales(config.data)
      pick = int(tf.random.stateless_uniform([], seed=scale_seed, maxval=len(scales), dtype=tf.int32))
      want = min(np.float32(scales[pick]) / np.float32(40), np.float32(100) / np.float32(70))
    np.testing.assert_array_equal(out['scale'].numpy(), [want, want])
    flips.append(bool(tf.random.stateless_uniform([], seed=flip_seed) < 0.5))
    x1, y1, x2, y2 = box[0]
    moved = np.array([70 - x2, y1, 70 - x1, y2], np.float32) if flips[-1] else box[0]
    np.testing.assert_allclose(out['boxes'].numpy()[0], moved * want, rtol=1e-6)
  assert set(flips) == {False, True}


def test_stretch_has_one_square_bucket():
  config = small_config('a', 'b')
  config.data.resize, config.data.image_size = 'stretch', 300
  assert sizes.padded_shapes(config.data) == {'square': (300, 300)}
  assert pipeline.num_buckets(config.data) == 1
