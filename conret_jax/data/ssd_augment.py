"""SSD's training augmentation (Liu et al. 2016, Sec. 2.2 "Data augmentation") as TensorFlow ops for a tf.data map.

Training, in this order (ssd_train_augment):
  1 photometric distortion   torchvision's RandomPhotometricDistort (the parity reference for SSD): each with
                             probability 0.5, brightness x[0.875, 1.125], contrast x[0.5, 1.5] (before or after the
                             next two, by a coin), saturation x[0.5, 1.5], hue +-0.05 of the colour circle, then a
                             random channel permutation. Caffe SSD's distort_param has the same contrast and saturation,
                             brightness +-32 levels (additive; 32/255 ~ 0.125), hue +-18 in OpenCV's 0..180 hue scale
                             and no channel permutation (random_order_prob 0.0).
  2 zoom-out ("expand")      p 0.5: a canvas floor(r * (H, W)), r ~ U[1, 4], filled with the pixel mean, the image at
                             a random integer offset (Caffe expand_param, torchvision RandomZoomOut).
  3 min-IoU random crop      one of 7 options, uniformly: no crop, min IoU 0.1 / 0.3 / 0.5 / 0.7 / 0.9, 'any'. TRIALS
                             candidates (Caffe's max_trials 50) of side scales in [0.3, 1] and aspect w/h in [0.5, 2],
                             drawn at once; the first accepted one is taken, none accepted: no crop (torchvision draws
                             another option instead; the static graph cannot loop, hence Caffe's larger trial count).
  4 horizontal flip          p 0.5; done on the S x S output, the same as before step 5 (its sampling is
                             mirror-symmetric) on fewer pixels.
  5 resize                   stretched to S x S, bilinear with half-pixel centres like tf.image.resize (SSD's WARP
                             resize), no padding.

Crop acceptance (torchvision's RandomIoUCrop rule): some box that is valid and not crowd has its centre strictly
inside the crop and IoU >= the option's minimum with it ('any' is minimum 0: a centre inside is enough). Caffe asks
the IoU of any box, centre inside or not; "the minimum jaccard overlap with the objects" of the paper is this
threshold, not a minimum over boxes. Crowd boxes never make a crop acceptable: a crop chosen for a crowd region alone
holds no positives. After the crop every box (crowd too) is kept when its centre is strictly inside and clipped to
the crop; the others, and any box left with zero width or height, become invalid rows (valid False, zeroed). An image
without a valid non-crowd box is never cropped (torchvision's loop ends the same way, at the no-crop option).

The canvas is never built: steps 2-3 only move boxes and choose a window of the canvas, and `render` samples that
window straight to S x S, reading only the image rows and columns it samples (a 4x canvas has 16x the image's
pixels).

The returned scale (sy, sx) is S / (H, W) of the ORIGINAL image. At evaluation (ssd_eval_resize: step 5 alone) it maps
boxes back to the image (x / sx, y / sy); in training, after zoom-out and crop, no scale maps boxes back, and nothing
reads it (it is returned so training and evaluation rows have one layout).

Randomness: tf.random.stateless_* with seeds split from one [2] seed, so one seed gives one augmentation anywhere.
Ground truth `gt` is decode.pad_ground_truth's dict: boxes float32 [M, 4] x1y1x2y2 pixels, classes int32 [M], crowd
bool [M], valid bool [M]; M is static and kept.
"""

import math

import tensorflow as tf

TRIALS = 50
MIN_IOUS = (math.inf, 0.1, 0.3, 0.5, 0.7, 0.9, 0.0)  # the 7 options: no crop (nothing reaches inf), ..., 'any'
CROP_SCALE = (0.3, 1.0)  # each side, as a fraction of the canvas side
CROP_ASPECT = (0.5, 2.0)  # width / height in pixels
ZOOM_RATIO = (1.0, 4.0)
BRIGHTNESS = (0.875, 1.125)
CONTRAST = (0.5, 1.5)
SATURATION = (0.5, 1.5)
HUE = (-0.05, 0.05)
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (ITU-R 601)


def _split(seed, n):
  return tf.unstack(tf.random.experimental.stateless_split(seed, n))


def _lerp(bounds, u):
  return bounds[0] + (bounds[1] - bounds[0]) * u


def photometric_params(seed) -> dict:
  """Draws for photometric_distort; an operation not drawn (p 0.5 each) gets its identity value.

  Returns scalars brightness, contrast, saturation (factors), hue (turns), contrast_first (bool), permutation [3]."""
  coin_seed, value_seed, perm_seed = _split(seed, 3)
  coin = tf.random.stateless_uniform([6], seed=coin_seed) < 0.5
  u = tf.random.stateless_uniform([4], seed=value_seed)
  return {
    'brightness': tf.where(coin[0], _lerp(BRIGHTNESS, u[0]), 1.0),
    'contrast': tf.where(coin[1], _lerp(CONTRAST, u[1]), 1.0),
    'saturation': tf.where(coin[2], _lerp(SATURATION, u[2]), 1.0),
    'hue': tf.where(coin[3], _lerp(HUE, u[3]), 0.0),
    'contrast_first': coin[4],
    'permutation': tf.where(coin[5], tf.argsort(tf.random.stateless_uniform([3], seed=perm_seed)), tf.range(3)),
  }


def _blend(image, other, factor):
  """torchvision's _blend on the 0..255 scale."""
  return tf.clip_by_value(factor * image + (1.0 - factor) * other, 0.0, 255.0)


def _gray(image):
  r, g, b = tf.unstack(image, axis=-1)
  return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b)[..., None]


def apply_photometric(image, params: dict) -> tf.Tensor:
  """image [H, W, 3] (0..255) -> float32 [H, W, 3] (0..255): torchvision's order and formulas, clipped after each
  step; a step whose parameter is the identity is skipped. Contrast blends with the image's mean gray level,
  saturation with each pixel's gray, hue rotates the HSV hue."""

  def step(x, on, fn):
    return tf.cond(on, lambda: fn(x), lambda: x)

  def contrast(x):
    return _blend(x, tf.reduce_mean(_gray(x)), params['contrast'])

  x = tf.cast(image, tf.float32)
  x = step(x, params['brightness'] != 1.0, lambda x: tf.clip_by_value(x * params['brightness'], 0.0, 255.0))
  on, first = params['contrast'] != 1.0, params['contrast_first']
  x = step(x, on & first, contrast)
  x = step(x, params['saturation'] != 1.0, lambda x: _blend(x, _gray(x), params['saturation']))
  x = step(x, params['hue'] != 0.0, lambda x: tf.image.adjust_hue(x / 255.0, params['hue']) * 255.0)
  x = step(x, on & ~first, contrast)
  permute = tf.reduce_any(params['permutation'] != tf.range(3))
  return step(x, permute, lambda x: tf.gather(x, params['permutation'], axis=-1))


def photometric_distort(image, seed) -> tf.Tensor:
  """Step 1: image [H, W, 3] uint8 or float (0..255) -> float32 [H, W, 3]."""
  return apply_photometric(image, photometric_params(seed))


def zoom_out_placement(hw, seed):
  """Step 2's geometry. hw [2] int32 image (H, W) -> (placed int32 [4] x1y1x2y2: the image's pixels on the canvas,
  canvas_hw int32 [2]); p 0.5 of no zoom (placed = (0, 0, W, H), canvas = hw)."""
  coin_seed, ratio_seed, offset_seed = _split(seed, 3)
  zoom = tf.random.stateless_uniform([], seed=coin_seed) < 0.5
  ratio = tf.where(zoom, _lerp(ZOOM_RATIO, tf.random.stateless_uniform([], seed=ratio_seed)), 1.0)
  canvas_hw = tf.maximum(tf.cast(tf.floor(tf.cast(hw, tf.float32) * ratio), tf.int32), hw)
  free = tf.cast(canvas_hw - hw, tf.float32)
  top, left = tf.unstack(tf.cast(tf.floor(free * tf.random.stateless_uniform([2], seed=offset_seed)), tf.int32))
  return tf.stack([left, top, left + hw[1], top + hw[0]]), canvas_hw


def _taps(n_out, start, n_window, image_start, n_image):
  """One axis of a bilinear resize of the window [start, start + n_window) of the canvas to n_out samples, with
  tf.image.resize's half-pixel centres and clamping at the window's edges. -> (index0, index1 int32 [n_out]: the two
  taps as image indices, clamped; on0, on1 bool [n_out]: the tap is on the image, not the fill; frac [n_out])."""
  src = (tf.range(n_out, dtype=tf.float32) + 0.5) * (tf.cast(n_window, tf.float32) / tf.cast(n_out, tf.float32)) - 0.5
  base = tf.cast(tf.floor(src), tf.int32)
  frac = src - tf.floor(src)
  taps = [tf.maximum(base, 0), tf.minimum(base + 1, n_window - 1)]
  taps = [t + start - image_start for t in taps]
  on = [(t >= 0) & (t < n_image) for t in taps]
  return [tf.clip_by_value(t, 0, n_image - 1) for t in taps], on, frac


def _lerp_axis(image, taps, on, frac, axis, mean):
  """Gathers the two taps along `axis` (0 rows, 1 columns), the fill where a tap is off the image, and blends."""
  shape = [-1, 1, 1] if axis == 0 else [1, -1, 1]
  a, b = (tf.where(tf.reshape(o, shape), tf.gather(image, t, axis=axis), mean) for t, o in zip(taps, on))
  return a + (b - a) * tf.reshape(frac, shape)


def render(image, placed, window, out_hw, mean) -> tf.Tensor:
  """Bilinear resize to out_hw (h, w) of `window` (int32 [4] x1y1x2y2, canvas pixels) of a canvas filled with `mean`
  (3 floats, RGB 0..255) holding image [H, W, 3] at `placed` (int32 [4]), without building the canvas: the same
  pixels as tf.image.resize of the built window (up to float rounding). -> float32 [h, w, 3]. The window may reach
  outside the image or miss it; with out_hw the window's own size it is an exact copy of the canvas."""
  image = tf.cast(image, tf.float32)
  mean = tf.convert_to_tensor(mean, tf.float32)
  hw = tf.shape(image)[:2]
  rows = _taps(out_hw[0], window[1], window[3] - window[1], placed[1], hw[0])
  cols = _taps(out_hw[1], window[0], window[2] - window[0], placed[0], hw[1])
  return _lerp_axis(_lerp_axis(image, *rows, 0, mean), *cols, 1, mean)


def _scale_boxes(boxes, from_hw, size):
  """boxes [M, 4] in pixels of an image from_hw (h, w) stretched to S x S. -> (boxes [M, 4], scale [2] (sy, sx))."""
  scale = size / tf.cast(from_hw, tf.float32)
  return boxes * tf.tile(scale[::-1], [2]), scale


def zoom_out(image, boxes, seed, mean):
  """Step 2 alone, canvas built: image [H, W, 3] -> (canvas float32 [H', W', 3], boxes [M, 4] moved with the
  image, placed int32 [4])."""
  placed, canvas_hw = zoom_out_placement(tf.shape(image)[:2], seed)
  canvas = render(image, placed, tf.stack([0, 0, canvas_hw[1], canvas_hw[0]]), canvas_hw, mean)
  return canvas, boxes + tf.cast(tf.tile(placed[:2], [2]), tf.float32), placed


def crop_candidates(canvas_hw, seed, trials: int = TRIALS):
  """Step 3's trials, torchvision's draw: sides floor(U[0.3, 1] * (H', W')), offsets floor(U[0, 1) * free space).
  -> (windows int32 [T, 4] x1y1x2y2 inside the canvas, usable bool [T]: non-empty and aspect w/h in [0.5, 2])."""
  u = tf.random.stateless_uniform([trials, 4], seed=seed)
  hw = tf.cast(canvas_hw, tf.float32)
  size = tf.cast(tf.floor(hw * _lerp(CROP_SCALE, u[:, :2])), tf.int32)  # [T, 2] (h, w)
  top_left = tf.cast(tf.floor(tf.cast(canvas_hw - size, tf.float32) * u[:, 2:]), tf.int32)
  y1, x1 = tf.unstack(top_left, axis=1)
  h, w = tf.unstack(size, axis=1)
  aspect = tf.cast(w, tf.float32) / tf.cast(tf.maximum(h, 1), tf.float32)
  usable = (h > 0) & (w > 0) & (aspect >= CROP_ASPECT[0]) & (aspect <= CROP_ASPECT[1])
  return tf.stack([x1, y1, x1 + w, y1 + h], axis=1), usable


def _centres_inside(boxes, windows):
  """boxes [M, 4], windows float [T, 4] -> [T, M]: the box centre strictly inside the window."""
  cx = (boxes[:, 0] + boxes[:, 2]) / 2
  cy = (boxes[:, 1] + boxes[:, 3]) / 2
  w = windows[:, :, None]
  return (w[:, 0] < cx) & (cx < w[:, 2]) & (w[:, 1] < cy) & (cy < w[:, 3])


def crop_acceptance(boxes, eligible, windows, min_iou) -> tf.Tensor:
  """boxes [M, 4], eligible bool [M] (valid and not crowd), windows [T, 4] x1y1x2y2, min_iou scalar -> accepted
  bool [T]: some eligible box has its centre strictly inside and IoU >= min_iou with the window."""
  windows = tf.cast(windows, tf.float32)
  lo = tf.maximum(windows[:, None, :2], boxes[None, :, :2])
  hi = tf.minimum(windows[:, None, 2:], boxes[None, :, 2:])
  inter = tf.reduce_prod(tf.maximum(hi - lo, 0.0), axis=-1)  # [T, M]
  area_w = tf.reduce_prod(windows[:, 2:] - windows[:, :2], axis=-1)
  area_b = tf.reduce_prod(tf.maximum(boxes[:, 2:] - boxes[:, :2], 0.0), axis=-1)
  iou = tf.math.divide_no_nan(inter, area_w[:, None] + area_b[None, :] - inter)
  return tf.reduce_any(eligible[None, :] & _centres_inside(boxes, windows) & (iou >= min_iou), axis=1)


def random_iou_crop(boxes, eligible, canvas_hw, seed, trials: int = TRIALS):
  """Step 3's choice: the option, then the first usable and accepted of `trials` candidates.
  -> (window int32 [4] x1y1x2y2 on the canvas, the whole canvas when none is accepted; cropped bool)."""
  option_seed, trial_seed = _split(seed, 2)
  option = tf.random.stateless_uniform([], seed=option_seed, maxval=len(MIN_IOUS), dtype=tf.int32)
  windows, usable = crop_candidates(canvas_hw, trial_seed, trials)
  accepted = usable & crop_acceptance(boxes, eligible, windows, tf.gather(tf.constant(MIN_IOUS, tf.float32), option))
  cropped = tf.reduce_any(accepted)
  whole = tf.stack([0, 0, canvas_hw[1], canvas_hw[0]])
  return tf.where(cropped, windows[tf.argmax(tf.cast(accepted, tf.int32))], whole), cropped


def crop_ground_truth(boxes, valid, window, cropped):
  """boxes [M, 4] on the canvas -> (boxes [M, 4] in the window's pixels, clipped to it; keep bool [M]: valid, the
  centre strictly inside the window when `cropped`, and non-zero width and height after clipping)."""
  window = tf.cast(window, tf.float32)
  size = window[2:] - window[:2]
  inside = _centres_inside(boxes, window[None])[0]  # before clipping, which moves the centres of cut boxes
  boxes = tf.clip_by_value(boxes - tf.tile(window[:2], [2]), 0.0, tf.tile(size, [2]))
  keep = valid & (inside | tf.logical_not(cropped)) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  return boxes, keep


def random_flip(image, boxes, seed):
  """Step 4: image [H, W, C] and boxes [M, 4] mirrored about the vertical axis with p 0.5. -> (image, boxes,
  flipped bool)."""
  flipped = tf.random.stateless_uniform([], seed=seed) < 0.5
  width = tf.cast(tf.shape(image)[1], tf.float32)
  x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
  image = tf.cond(flipped, lambda: tf.reverse(image, axis=[1]), lambda: image)
  return image, tf.where(flipped, tf.stack([width - x2, y1, width - x1, y2], axis=-1), boxes), flipped


def stretch_resize(image, boxes, size: int):
  """Step 5 (evaluation): image [..., H, W, 3] (a batch of one H x W too) -> (float32 [..., S, S, 3] by
  tf.image.resize, bilinear, not aspect-preserving; boxes [M, 4] times (S / W, S / H); scale float32 [2] (S / H,
  S / W))."""
  boxes, scale = _scale_boxes(boxes, tf.shape(image)[-3:-1], size)
  image = tf.image.resize(tf.cast(image, tf.float32), [size, size], method='bilinear')
  image.set_shape(image.shape[:-3].concatenate([size, size, 3]))
  return image, boxes, scale


def _finish(gt, boxes, keep):
  return {
    'boxes': tf.where(keep[:, None], boxes, 0.0),
    'classes': tf.where(keep, gt['classes'], 0),
    'crowd': gt['crowd'] & keep,
    'valid': keep,
  }


def ssd_train_augment(image, gt: dict, *, seed, size: int, mean, trials: int = TRIALS):
  """Steps 1-5. image [H, W, 3] uint8 or float32 (RGB, 0..255), gt (module docstring), seed [2] int, mean 3 floats
  (the zoom-out fill, RGB 0..255). -> (image float32 [S, S, 3], gt with boxes in output pixels and the rows the crop
  dropped invalidated and zeroed, scale float32 [2] = S / original (H, W), unused in training)."""
  photo_seed, zoom_seed, crop_seed, flip_seed = _split(seed, 4)
  hw = tf.shape(image)[:2]
  image = photometric_distort(image, photo_seed)
  placed, canvas_hw = zoom_out_placement(hw, zoom_seed)
  boxes = gt['boxes'] + tf.cast(tf.tile(placed[:2], [2]), tf.float32)
  window, cropped = random_iou_crop(boxes, gt['valid'] & ~gt['crowd'], canvas_hw, crop_seed, trials)
  boxes, keep = crop_ground_truth(boxes, gt['valid'], window, cropped)
  image = render(image, placed, window, (size, size), mean)  # steps 2, 3 and 5's pixels in one pass
  image.set_shape([size, size, 3])
  boxes, _ = _scale_boxes(boxes, tf.stack([window[3] - window[1], window[2] - window[0]]), size)
  image, boxes, _ = random_flip(image, boxes, flip_seed)
  return image, _finish(gt, boxes, keep), size / tf.cast(hw, tf.float32)


def ssd_eval_resize(image, gt: dict, *, size: int):
  """Step 5 alone (evaluation): -> (image float32 [S, S, 3], gt with boxes times (S / W, S / H), scale [2] (S / H,
  S / W) that maps them back). Rows with zero width or height become invalid, as in preprocess_example."""
  image, boxes, scale = stretch_resize(image, gt['boxes'], size)
  keep = gt['valid'] & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  return image, _finish(gt, boxes, keep), scale


def stretch(image, gt: dict, data_config, *, train: bool, seed, mean):
  """The 'stretch' resize of preprocess_example: SSD augmentation with train (preprocess passes it for
  config.data.augment='ssd' in training), else the plain S x S resize; S = data_config.image_size. -> (image
  [S, S, 3], gt, scale [2] (sy, sx))."""
  size = int(data_config.image_size)
  if train:
    return ssd_train_augment(image, gt, seed=seed, size=size, mean=mean)
  return ssd_eval_resize(image, gt, size=size)
