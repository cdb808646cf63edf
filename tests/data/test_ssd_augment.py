"""SSD augmentation: each step against a NumPy reference, the crop's rules on hand-built cases, and the whole chain
in tf.data (static shapes, determinism, boxes that stay on their pixels)."""

import colorsys

import numpy as np
import pytest
import tensorflow as tf

from conret_jax.data import decode
from conret_jax.data import ssd_augment as sa

MEAN = (123.675, 116.28, 103.53)


def _seed(i, j=0):
  return tf.constant([i, j], tf.int64)


def _gt(boxes, classes=None, crowd=None, max_boxes=6):
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  classes = np.arange(1, len(boxes) + 1) if classes is None else classes
  crowd = np.zeros(len(boxes), bool) if crowd is None else crowd
  return decode.pad_ground_truth(tf.constant(boxes), tf.constant(classes, tf.int32), tf.constant(crowd), max_boxes)


# Photometric distortion -------------------------------------------------------------------------------------------


def _np_photometric(image, p):
  """torchvision RandomPhotometricDistort's formulas on the 0..255 scale (hue through colorsys)."""

  def gray(x):
    return (x * np.array(sa.GRAY, np.float64)).sum(-1, keepdims=True)

  def blend(x, other, factor):
    return np.clip(factor * x + (1 - factor) * other, 0, 255)

  x = np.clip(image.astype(np.float64) * p['brightness'], 0, 255)
  if p['contrast_first']:
    x = blend(x, gray(x).mean(), p['contrast'])
  x = blend(x, gray(x), p['saturation'])
  hsv = [colorsys.rgb_to_hsv(*(px / 255)) for px in x.reshape(-1, 3)]
  x = np.array([colorsys.hsv_to_rgb((h + p['hue']) % 1.0, s, v) for h, s, v in hsv]).reshape(x.shape) * 255
  if not p['contrast_first']:
    x = blend(x, gray(x).mean(), p['contrast'])
  return x[..., p['permutation']]


@pytest.mark.parametrize('seed', range(8))
def test_photometric_matches_numpy_reference(seed):
  image = np.random.RandomState(seed).randint(0, 256, (5, 7, 3)).astype(np.uint8)
  params = {k: v.numpy() for k, v in sa.photometric_params(_seed(seed)).items()}
  if seed == 0:  # every operation on, whatever the draw
    params = dict(brightness=1.1, contrast=0.7, saturation=1.4, hue=0.04, contrast_first=False, permutation=[2, 0, 1])
  out = sa.apply_photometric(tf.constant(image), {k: tf.constant(v) for k, v in params.items()}).numpy()
  np.testing.assert_allclose(out, _np_photometric(image, params), atol=0.02)


def test_photometric_draws_each_operation_about_half_the_time_within_its_range():
  draws = [{k: v.numpy() for k, v in sa.photometric_params(_seed(7, i)).items()} for i in range(400)]
  for name, bounds, identity in [
    ('brightness', sa.BRIGHTNESS, 1.0),
    ('contrast', sa.CONTRAST, 1.0),
    ('saturation', sa.SATURATION, 1.0),
    ('hue', sa.HUE, 0.0),
  ]:
    values = np.array([d[name] for d in draws])
    on = values != identity
    assert 0.4 < on.mean() < 0.6, name
    assert (values[on] >= bounds[0]).all() and (values[on] <= bounds[1]).all(), name
  assert 0.4 < np.mean([d['contrast_first'] for d in draws]) < 0.6
  perms = np.array([d['permutation'] for d in draws])
  assert (np.sort(perms, axis=1) == [0, 1, 2]).all()
  assert 0.3 < (perms != [0, 1, 2]).any(axis=1).mean() < 0.55  # p 0.5 times the 5/6 of permutations that move


# Zoom-out ----------------------------------------------------------------------------------------------------------


def test_zoom_out_fills_the_canvas_with_the_mean_and_moves_boxes_exactly():
  image = np.random.RandomState(0).randint(0, 256, (13, 17, 3)).astype(np.uint8)
  boxes = np.array([[1.5, 2.25, 9, 12], [0, 0, 17, 13]], np.float32)
  ratios = []
  for i in range(100):
    canvas, moved, placed = (t.numpy() for t in sa.zoom_out(tf.constant(image), tf.constant(boxes), _seed(3, i), MEAN))
    x1, y1, x2, y2 = placed
    assert (x2 - x1, y2 - y1) == (17, 13) and x1 >= 0 and y1 >= 0
    assert x2 <= canvas.shape[1] and y2 <= canvas.shape[0] and canvas.shape[:2] <= (13 * 4, 17 * 4)
    np.testing.assert_array_equal(canvas[y1:y2, x1:x2], image)
    fill = np.ones(canvas.shape[:2], bool)
    fill[y1:y2, x1:x2] = False
    np.testing.assert_array_equal(canvas[fill], np.broadcast_to(np.float32(MEAN), (fill.sum(), 3)))
    np.testing.assert_array_equal(moved, boxes + np.float32([x1, y1, x1, y1]))
    ratios.append(canvas.shape[1] / 17)
  ratios = np.array(ratios)
  zoomed = ratios > 1
  assert 0.35 < zoomed.mean() < 0.65
  assert 2.0 < ratios[zoomed].mean() < 3.0  # U[1, 4], floored


def _np_resize_bilinear(image, out_h, out_w):
  """Half-pixel-centre bilinear resize (tf.image.resize, torch interpolate align_corners=False), no antialiasing."""

  def taps(n_in, n_out):
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    return lo, np.minimum(lo + 1, n_in - 1), src - lo

  y0, y1, fy = taps(image.shape[0], out_h)
  x0, x1, fx = taps(image.shape[1], out_w)
  rows = image[y0] * (1 - fy)[:, None, None] + image[y1] * fy[:, None, None]
  return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


@pytest.mark.parametrize(
  'window',
  [(0, 0, 20, 15), (5, 3, 9, 7), (1, 1, 6, 12), (10, 8, 20, 15), (0, 0, 3, 2), (14, 0, 20, 15), (2, 11, 19, 15)],
)
def test_render_matches_resizing_the_built_canvas(window):
  """Image 7x9 at x 3..12, y 2..9 of a 15x20 canvas: windows inside it, across its edges, around it, beside it.
  At the window's own size render copies the canvas exactly; at other sizes (up and down) it is the half-pixel
  bilinear resize of the built window (NumPy reference, and tf.image.resize)."""
  image = np.random.RandomState(1).uniform(0, 255, (7, 9, 3)).astype(np.float32)
  canvas = np.broadcast_to(np.float32(MEAN), (15, 20, 3)).copy()
  canvas[2:9, 3:12] = image
  x1, y1, x2, y2 = window
  crop = canvas[y1:y2, x1:x2]
  placed = tf.constant([3, 2, 12, 9])
  got = sa.render(tf.constant(image), placed, tf.constant(window), (y2 - y1, x2 - x1), MEAN)
  np.testing.assert_array_equal(got.numpy(), crop)
  for out_hw in [(11, 23), (4, 3), (64, 64)]:
    got = sa.render(tf.constant(image), placed, tf.constant(window), out_hw, MEAN).numpy()
    np.testing.assert_allclose(got, _np_resize_bilinear(crop.astype(np.float64), *out_hw), atol=1e-3)
    np.testing.assert_allclose(got, tf.image.resize(crop, out_hw).numpy(), atol=1e-3)


# The min-IoU crop ---------------------------------------------------------------------------------------------------


def _np_iou(boxes, window):
  lo, hi = np.maximum(boxes[:, :2], window[:2]), np.minimum(boxes[:, 2:], window[2:])
  inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
  area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
  return inter / (area + np.prod(window[2:] - window[:2]) - inter)


def _np_centre_inside(boxes, window):
  c = (boxes[:, :2] + boxes[:, 2:]) / 2
  return (window[:2] < c).all(axis=1) & (c < window[2:]).all(axis=1)


def _np_accept(boxes, eligible, windows, min_iou):
  boxes, windows = np.asarray(boxes, np.float64), np.asarray(windows, np.float64)
  return np.array([(eligible & _np_centre_inside(boxes, w) & (_np_iou(boxes, w) >= min_iou)).any() for w in windows])


# Window (10, 10, 50, 40), area 1200.
BOXES = np.array(
  [
    [20, 15, 40, 35],  # 0 inside: IoU 400/1200 = 0.333
    [0, 0, 30, 30],  # 1 cut, centre (15, 15) inside: IoU 400/1300 = 0.308
    [40, 0, 100, 60],  # 2 cut, centre (70, 30) outside: IoU 300/4500
    [10, 10, 50, 40],  # 3 the window itself (IoU 1), crowd
    [5, 5, 50, 100],  # 4 centre (27.5, 52.5) outside, IoU 900/4125 = 0.218
    [0, 0, 0, 0],  # 5 padding
  ],
  np.float32,
)
VALID = np.array([1, 1, 1, 1, 1, 0], bool)
CROWD = np.array([0, 0, 0, 1, 0, 0], bool)
WINDOW = np.array([10, 10, 50, 40], np.int32)


@pytest.mark.parametrize(
  'eligible,min_iou,want',
  [
    (VALID & ~CROWD, 0.3, True),  # boxes 0 and 1
    (VALID & ~CROWD, 0.34, False),  # the crowd box (IoU 1) does not count
    (VALID, 0.9, True),  # ... it would if it were not crowd
    (np.array([0, 0, 1, 0, 1, 0], bool), 0.0, False),  # centres outside: not even 'any'
    (np.array([0, 0, 0, 0, 1, 0], bool), 0.2, False),  # box 4's IoU 0.218 would pass Caffe's rule, not the centre's
    (np.zeros(6, bool), 0.0, False),  # no objects
    (VALID & ~CROWD, np.inf, False),  # the no-crop option
  ],
)
def test_crop_acceptance_matches_numpy_on_hand_built_cases(eligible, min_iou, want):
  got = sa.crop_acceptance(tf.constant(BOXES), tf.constant(eligible), tf.constant(WINDOW[None]), min_iou).numpy()
  assert got.tolist() == [want] == _np_accept(BOXES, eligible, WINDOW[None], min_iou).tolist()


def test_crop_ground_truth_keeps_centres_inside_clips_and_invalidates():
  boxes, keep = sa.crop_ground_truth(tf.constant(BOXES), tf.constant(VALID), tf.constant(WINDOW), tf.constant(True))
  boxes, keep = boxes.numpy(), keep.numpy()
  # NumPy reference: centre strictly inside (before clipping), then shifted and clipped, degenerate rows dropped.
  want_keep = VALID & _np_centre_inside(BOXES, WINDOW.astype(np.float32))
  want = np.clip(BOXES - np.float32([10, 10, 10, 10]), 0, np.float32([40, 30, 40, 30]))
  assert keep.tolist() == want_keep.tolist() == [True, True, False, True, False, False]
  np.testing.assert_array_equal(boxes[keep], want[keep])
  np.testing.assert_array_equal(boxes[1], [0, 0, 20, 20])  # the cut box, clipped
  # Not cropped: the window is the whole canvas and every valid, non-degenerate row stays.
  degenerate = np.concatenate([BOXES[:5], [[3, 3, 3, 9]]]).astype(np.float32)
  valid = np.array([1, 1, 1, 1, 1, 1], bool)
  boxes, keep = sa.crop_ground_truth(tf.constant(degenerate), tf.constant(valid), tf.constant([0, 0, 100, 100]), False)
  assert keep.numpy().tolist() == [True] * 5 + [False]
  np.testing.assert_array_equal(boxes.numpy()[:5], degenerate[:5])


@pytest.mark.parametrize(
  'case',
  ['objects', 'small_object', 'no_objects'],
)
def test_random_iou_crop_takes_the_first_accepted_candidate_or_none(case):
  """random_iou_crop = the first usable candidate of crop_candidates accepted under the drawn option (NumPy
  acceptance), or the whole canvas when none is: always so without an eligible box (no objects, or crowd only)."""
  canvas_hw = np.array([90, 120], np.int32)
  boxes = {
    'objects': BOXES,
    'small_object': np.array([[50, 40, 56, 47]] + [[0, 0, 0, 0]] * 5, np.float32),
    'no_objects': np.zeros((6, 4), np.float32),
  }[case]
  eligible = {'objects': VALID & ~CROWD, 'small_object': np.eye(6, dtype=bool)[0]}.get(case, np.zeros(6, bool))
  outcomes = set()
  for i in range(40):
    seed = _seed(11, i)
    window, cropped = sa.random_iou_crop(tf.constant(boxes), tf.constant(eligible), tf.constant(canvas_hw), seed)
    option_seed, trial_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    option = tf.random.stateless_uniform([], seed=option_seed, maxval=len(sa.MIN_IOUS), dtype=tf.int32).numpy()
    windows, usable = (t.numpy() for t in sa.crop_candidates(tf.constant(canvas_hw), trial_seed))
    accepted = usable & _np_accept(boxes, eligible, windows, sa.MIN_IOUS[option])
    want = windows[np.argmax(accepted)] if accepted.any() else [0, 0, 120, 90]
    assert bool(cropped) == accepted.any()
    np.testing.assert_array_equal(window.numpy(), want)
    outcomes.add((sa.MIN_IOUS[option], bool(cropped)))
  if case == 'no_objects':
    assert not any(c for _, c in outcomes)
  else:  # both paths seen, including a real option whose every trial was rejected
    assert any(c for _, c in outcomes) and any(not c and np.isfinite(m) for m, c in outcomes)


def test_crop_candidates_respect_scale_aspect_and_canvas():
  windows, usable = (t.numpy() for t in sa.crop_candidates(tf.constant([90, 120]), _seed(5), trials=2000))
  w, h = windows[:, 2] - windows[:, 0], windows[:, 3] - windows[:, 1]
  assert (windows[:, :2] >= 0).all() and (windows[:, 2] <= 120).all() and (windows[:, 3] <= 90).all()
  assert (w >= np.floor(0.3 * 120)).all() and (w <= 120).all() and (h >= np.floor(0.3 * 90)).all() and (h <= 90).all()
  np.testing.assert_array_equal(usable, (w / h >= 0.5) & (w / h <= 2))
  assert 0.5 < usable.mean() < 1.0  # canvas aspect 4/3: some draws exceed [0.5, 2]


# Flip and resize -----------------------------------------------------------------------------------------------------


def test_random_flip_mirrors_about_half_the_time():
  image = np.arange(2 * 5 * 3, dtype=np.float32).reshape(2, 5, 3)
  boxes = np.array([[0.5, 0, 2, 1], [3, 1, 5, 2]], np.float32)
  flips = 0
  for i in range(200):
    out, out_boxes, flipped = sa.random_flip(tf.constant(image), tf.constant(boxes), _seed(2, i))
    want_image, want_boxes = (image[:, ::-1], [[3, 0, 4.5, 1], [0, 1, 2, 2]]) if flipped else (image, boxes)
    np.testing.assert_array_equal(out.numpy(), want_image)
    np.testing.assert_array_equal(out_boxes.numpy(), want_boxes)
    flips += bool(flipped)
  assert 70 < flips < 130


@pytest.mark.parametrize('hw', [(37, 61), (120, 45), (300, 300)])
def test_stretch_resize_and_eval_path(hw):
  rng = np.random.RandomState(hw[0])
  image = rng.randint(0, 256, (*hw, 3)).astype(np.uint8)
  boxes = np.array([[1.5, 2, 30, 20.25], [0, 0, hw[1], hw[0]], [0, 0, 0, 0]], np.float32)
  gt = _gt(boxes[:2], max_boxes=3)
  out, got, scale = sa.ssd_eval_resize(tf.constant(image), gt, size=300)
  assert out.shape == (300, 300, 3) and out.dtype == tf.float32
  np.testing.assert_allclose(out.numpy(), _np_resize_bilinear(image.astype(np.float64), 300, 300), atol=0.01)
  sy, sx = np.float32(300) / np.float32(hw[0]), np.float32(300) / np.float32(hw[1])
  np.testing.assert_array_equal(scale.numpy(), [sy, sx])
  np.testing.assert_array_equal(got['boxes'].numpy(), boxes * np.array([sx, sy, sx, sy], np.float32))
  np.testing.assert_allclose(got['boxes'].numpy() / [sx, sy, sx, sy], boxes, rtol=1e-6)  # scale maps them back
  assert got['valid'].numpy().tolist() == [True, True, False]


# The whole chain ----------------------------------------------------------------------------------------------------


def _augment(image, gt, seed, size=64):
  return sa.ssd_train_augment(tf.constant(image), gt, seed=seed, size=size, mean=MEAN)


def test_same_seed_same_output_different_seeds_differ():
  image = np.random.RandomState(4).randint(0, 256, (48, 64, 3)).astype(np.uint8)
  gt = _gt([[5, 5, 30, 40], [20, 10, 60, 30]])
  first = _augment(image, gt, _seed(1, 2))
  again = _augment(image, gt, _seed(1, 2))
  for a, b in zip(tf.nest.flatten(first), tf.nest.flatten(again)):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  images = [_augment(image, gt, _seed(1, i))[0].numpy() for i in range(3, 9)]
  assert all(np.abs(a - b).max() > 1 for k, a in enumerate(images) for b in images[k + 1 :])


@pytest.mark.parametrize('dtype', [tf.uint8, tf.float32])
def test_static_shapes_inside_tf_data_map(dtype):
  gt = _gt([[5, 5, 30, 40], [20, 10, 60, 30], [0, 0, 10, 10]], crowd=[False, False, True], max_boxes=8)

  def example(i):
    hw = tf.stack([40 + tf.cast(i, tf.int32) * 7, 50 + tf.cast(i, tf.int32) * 3, 3])
    image = tf.cast(tf.random.stateless_uniform(hw, seed=tf.stack([i, i]), maxval=255), dtype)
    return sa.ssd_train_augment(image, gt, seed=tf.stack([tf.constant(9, tf.int64), i]), size=300, mean=MEAN)

  ds = tf.data.Dataset.range(6).map(example, num_parallel_calls=2, deterministic=True)
  image_spec, gt_spec, scale_spec = ds.element_spec
  assert image_spec.shape == (300, 300, 3) and image_spec.dtype == tf.float32
  assert {k: tuple(s.shape) for k, s in gt_spec.items()} == {
    'boxes': (8, 4),
    'classes': (8,),
    'crowd': (8,),
    'valid': (8,),
  }
  assert scale_spec.shape == (2,)
  for i, (image, out, scale) in enumerate(ds.as_numpy_iterator()):
    assert 0 <= image.min() and image.max() <= 255
    np.testing.assert_allclose(scale, [300 / (40 + 7 * i), 300 / (50 + 3 * i)], rtol=1e-6)


def test_boxes_stay_on_their_pixels():
  """Through zoom-out, crop, flip and stretch: one white rectangle on black (gray survives every photometric step as
  bright on dark; the mean fill is black here). Inside its box, 4 px in: bright; 4-5 px outside it: dark."""
  rng, checked = np.random.RandomState(0), 0
  for i in range(40):
    h, w = rng.randint(60, 100), rng.randint(60, 100)
    bw, bh = rng.randint(w // 6, w // 2), rng.randint(h // 6, h // 2)
    x1, y1 = rng.randint(0, w - bw), rng.randint(0, h - bh)
    image = np.zeros((h, w, 3), np.uint8)
    image[y1 : y1 + bh, x1 : x1 + bw] = 255
    gt = _gt([[x1, y1, x1 + bw, y1 + bh]], max_boxes=2)
    out, got, _ = sa.ssd_train_augment(tf.constant(image), gt, seed=_seed(5, i), size=64, mean=(0, 0, 0))
    out = out.numpy().max(-1)
    assert got['valid'].numpy().tolist() == [True, False]  # the crop keeps the only object's centre
    x1, y1, x2, y2 = got['boxes'].numpy()[0]
    assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
    if x2 - x1 < 12 or y2 - y1 < 12:
      continue
    assert out[int(y1) + 4 : int(np.ceil(y2)) - 4, int(x1) + 4 : int(np.ceil(x2)) - 4].min() > 60, i
    ym, xm = int((y1 + y2) / 2), int((x1 + x2) / 2)
    for y, x in ((ym, int(x1) - 5), (ym, int(np.ceil(x2)) + 4), (int(y1) - 5, xm), (int(np.ceil(y2)) + 4, xm)):
      if 0 <= y < 64 and 0 <= x < 64:
        assert out[y, x] < 60, (i, y, x)
    checked += 1
  assert checked > 20


def test_dropped_rows_are_invalid_and_zero():
  """Several objects: crops drop some (centre outside); dropped and padding rows are zero, kept rows non-empty and
  inside the output."""
  rng, dropped = np.random.RandomState(1), 0
  for i in range(40):
    h, w = rng.randint(60, 100), rng.randint(60, 100)
    corners = rng.uniform(0, 1, (5, 2, 2)) * [w, h]
    boxes = np.concatenate([corners.min(1), corners.max(1) + 1], axis=1).astype(np.float32)
    gt = _gt(boxes, max_boxes=7)
    _, got, _ = _augment(np.zeros((h, w, 3), np.uint8), gt, _seed(8, i))
    valid, out = got['valid'].numpy(), got['boxes'].numpy()
    assert not valid[5:].any()
    dropped += 5 - valid.sum()
    assert not out[~valid].any() and not got['classes'].numpy()[~valid].any() and not got['crowd'].numpy().any()
    assert (got['classes'].numpy()[valid] > 0).all()
    assert (out[valid, :2] >= 0).all() and (out[valid, 2:] <= 64).all() and (out[valid, 2:] > out[valid, :2]).all()
  assert dropped > 10


def test_crowd_rows_follow_the_centre_rule_and_images_without_objects_pass():
  """A crowd-only image is never cropped (its small crowd box, which most crops would drop, is always kept); an image
  without objects is augmented without error and gives no boxes."""
  image = np.full((50, 70, 3), 90, np.uint8)
  crowd = _gt([[0, 0, 70, 50], [10, 10, 20, 20]], crowd=[True, True])
  empty = _gt(np.zeros((0, 4)))
  for i in range(30):
    _, got, _ = _augment(image, crowd, _seed(6, i))
    assert got['valid'].numpy().tolist()[:3] == [True, True, False]
    assert got['crowd'].numpy().tolist()[:3] == [True, True, False]
    out, got, _ = _augment(image, empty, _seed(6, i))
    assert out.shape == (64, 64, 3) and not got['valid'].numpy().any() and not got['boxes'].numpy().any()
