"""resize='stretch' and augment='ssd' through the real pipeline: the eval warp against tf.image.resize and NumPy, and
SSD's augmented training batches (static shapes, determinism per (seed, index), the pixel_mean canvas)."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conret_jax import evaluation
from conret_jax.data import pipeline
from tests.data.conftest import small_config

SIZE = 96


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_stretch_eval_example_is_the_plain_warp(rect_dataset):
  """Each eval image is tf.image.resize of the decoded image to S x S, its boxes the annotations times (S/W, S/H),
  scale (S/H, S/W) and input_hw (S, S); to_image_coords takes the boxes back to the annotations."""
  annotation_file, image_dir, truth = rect_dataset
  config = small_config(annotation_file, image_dir, image_size=SIZE, eval_batch=4)
  config.data.resize = 'stretch'
  seen = 0
  for batch in pipeline.host_batches(config, train=False):
    assert batch['images'].shape == (4, SIZE, SIZE, 3)
    for b in np.flatnonzero(batch['example_valid']):
      image_id = int(batch['image_id'][b])
      decoded = np.asarray(Image.open(os.path.join(image_dir, f'im{image_id - 100:03d}.png')))
      h, w = decoded.shape[:2]
      want = tf.image.resize(decoded.astype(np.float32), [SIZE, SIZE], method='bilinear').numpy()
      np.testing.assert_array_equal(batch['images'][b], want)
      sy, sx = np.float32(SIZE) / np.float32(h), np.float32(SIZE) / np.float32(w)
      np.testing.assert_array_equal(batch['scale'][b], [sy, sx])
      np.testing.assert_array_equal(batch['input_hw'][b], [SIZE, SIZE])
      np.testing.assert_array_equal(batch['orig_hw'][b], [h, w])
      rects = np.array([r[:4] for r in truth[image_id]], np.float32)
      n = len(rects)
      np.testing.assert_allclose(batch['boxes'][b, :n], rects * [sx, sy, sx, sy], rtol=1e-6)
      assert batch['valid'][b, :n].all() and not batch['valid'][b, n:].any() and not batch['boxes'][b, n:].any()
      back = evaluation.to_image_coords(batch['boxes'][b, :n], batch['scale'][b], (h, w))
      np.testing.assert_allclose(back, rects, atol=1e-4)
      seen += 1
  assert seen == 12


@pytest.fixture(scope='module')
def shapes_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('shapes'))


def _ssd_config(cache_dir):
  """8 synthetic shapes images (160..320 px, any aspect), SSD's resize and augmentation at S = 96."""
  config = small_config('', '', image_size=SIZE, batch=4, eval_batch=4)
  for section in (config.data.train, config.data.eval):
    section.source, section.cache_dir, section.num_examples = 'shapes', cache_dir, 8
  config.model.num_classes = 5
  config.data.resize, config.data.augment, config.data.random_flip = 'stretch', 'ssd', False
  return config


def _assert_same(a, b):
  for x, y in zip(a, b, strict=True):
    for k in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_ssd_training_batches_are_static_deterministic_and_augmented(shapes_dir):
  """Static shapes for the compiler; two pipeline builds (and a resume at step 2) give the same augmentation for the
  same (seed, index); every augmented image differs from the plain warp of the same example, which is what
  evaluation (and training with augment='none') sees; ground truth rows stay well formed."""
  config = _ssd_config(shapes_dir)
  spec = pipeline.host_dataset(config).element_spec
  assert spec['images'].shape == (4, SIZE, SIZE, 3) and spec['boxes'].shape == (4, 8, 4)
  assert spec['scale'].shape == (4, 2) and spec['input_hw'].shape == (4, 2)
  first = _take(pipeline.host_batches(config), 3)  # 2 batches per epoch: crosses into the second epoch
  _assert_same(first, _take(pipeline.host_batches(config), 3))
  _assert_same(first[2:], [next(pipeline.host_batches(config, start_step=2))])
  for batch in first:
    assert batch['images'].shape == (4, SIZE, SIZE, 3) and batch['images'].dtype == np.float32
    assert (batch['input_hw'] == SIZE).all()
    np.testing.assert_array_equal(batch['scale'], np.float32(SIZE) / batch['orig_hw'].astype(np.float32))
    boxes, valid = batch['boxes'], batch['valid']
    assert valid.any(axis=1).sum() >= 2  # crops keep objects in most images
    assert (boxes[valid][:, 2:] > boxes[valid][:, :2]).all() and (boxes[valid] >= 0).all()
    assert (boxes[valid] <= SIZE * (1 + 1e-6)).all()  # a box clipped to the crop, scaled by S / side: S in float32
    assert not boxes[~valid].any() and not batch['classes'][~valid].any()

  eval_ssd = list(pipeline.host_batches(config, train=False))
  config.data.augment = 'none'
  plain = _take(pipeline.host_batches(config), 3)
  for augmented, warped in zip(first, plain):
    np.testing.assert_array_equal(augmented['image_id'], warped['image_id'])  # the order is the seed's alone
    assert all(not np.array_equal(a, p) for a, p in zip(augmented['images'], warped['images']))
  _assert_same(eval_ssd, list(pipeline.host_batches(config, train=False)))  # evaluation only resizes


def test_zoom_out_canvas_takes_the_model_pixel_mean(shapes_dir):
  """The zoom-out canvas is filled with config.model.pixel_mean, exactly (the same value on both taps of every
  bilinear sample): two means give the same images except on the canvas, which holds each mean exactly."""
  config = _ssd_config(shapes_dir)
  means = [(1.25, 250.5, 7.75), (200.0, 3.5, 90.25)]
  masks = []
  for mean in means:
    config.model.pixel_mean = mean
    images = np.concatenate([b['images'] for b in _take(pipeline.host_batches(config), 2)])
    masks.append((images == np.float32(mean)).all(axis=-1))
  np.testing.assert_array_equal(masks[0], masks[1])
  assert masks[0].mean(axis=(1, 2)).max() > 0.1  # some image was zoomed out, its canvas left in view
