"""detect: jitted, batched, bfloat16; detections equal a NumPy reference of decode + torchvision post-processing."""

import jax
import jax.numpy as jnp
import ml_collections
import model_reference as ref
import numpy as np
import pytest
from test_retinanet import np_decode

from conret_jax import detectors, inference
from conret_jax.model import anchor_spec as anchor_ops


def _config(**overrides):
  c = ref.tiny_config(
    **{'eval.topk_per_level': 40, 'eval.max_detections': 25, 'eval.score_threshold': 0.3, **overrides}
  )
  return c


@pytest.fixture(scope='module')
def setup():
  config = _config()
  model = detectors.build_model(config)
  shapes = jax.eval_shape(lambda: detectors.init_variables(model, jax.random.key(0), (128, 128)))
  variables = ref.random_like(shapes, seed=3)
  images = np.random.default_rng(4).uniform(0, 255, (2, 128, 128, 3)).astype(np.float32)
  return config, model, variables, images


def np_iou(a, b):
  lt, rb = np.maximum(a[:2], b[:, :2]), np.minimum(a[2:], b[:, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  union = area(a) + area(b) - inter
  return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def np_postprocess(logits, boxes, level_counts, hw, e):
  """torchvision RetinaNet.postprocess_detections for one image, in NumPy, with its clipping moved before the
  candidates are chosen: an anchor whose box is empty once clipped to the image is never a candidate."""
  k = logits.shape[1]
  boxes = boxes.copy()
  boxes[:, 0::2] = boxes[:, 0::2].clip(0, hw[1])
  boxes[:, 1::2] = boxes[:, 1::2].clip(0, hw[0])
  usable = np.repeat((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]), k)
  cand_boxes, cand_scores, cand_classes = [], [], []
  start = 0
  for count in level_counts:
    scores = (1 / (1 + np.exp(-logits[start : start + count].astype(np.float64)))).ravel()
    idx = np.nonzero((scores > e.score_threshold) & usable[start * k : (start + count) * k])[0]
    idx = idx[np.argsort(-scores[idx], kind='stable')][: e.topk_per_level]
    cand_scores.append(scores[idx])
    cand_classes.append(idx % k)
    cand_boxes.append(boxes[start + idx // k])
    start += count
  b, s, c = (np.concatenate(x) for x in (cand_boxes, cand_scores, cand_classes))
  order = np.argsort(-s, kind='stable')
  keep = []
  for i in order:
    # Suppress only on IoU > threshold; a zero-area box (IoU 0/0) suppresses nothing, as in torchvision's nms.
    if not any(c[j] == c[i] and np_iou(b[i], b[j : j + 1])[0] > e.nms_iou for j in keep):
      keep.append(i)
  keep = keep[: e.max_detections]
  return b[keep], s[keep], c[keep]


def test_detect_matches_numpy_reference(setup):
  config, model, variables, images = setup
  out = inference.detect(model, variables, images, config)
  assert out['boxes'].shape == (2, 25, 4) and out['classes'].dtype == jnp.int32 and out['valid'].dtype == jnp.bool_
  raw = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  spec = anchor_ops.AnchorSpec.from_config(config.model)
  anchors = np.asarray(spec.anchors((128, 128)), np.float64)
  counts = spec.level_counts((128, 128))
  for i in range(2):
    boxes = np_decode(np.asarray(raw['box_deltas'][0][i], np.float64), anchors)
    want_b, want_s, want_c = np_postprocess(np.asarray(raw['cls_logits'][0][i]), boxes, counts, (128, 128), config.eval)
    n = int(out['valid'][i].sum())
    assert n == len(want_s) > 5
    np.testing.assert_array_equal(out['classes'][i, :n], want_c)
    np.testing.assert_allclose(out['scores'][i, :n], want_s, rtol=1e-5)
    np.testing.assert_allclose(out['boxes'][i, :n], want_b, rtol=1e-4, atol=1e-3)
    assert not np.any(out['scores'][i, n:])


def test_detect_is_jitted_batched_and_cached(setup):
  config, model, variables, images = setup
  batch = inference.detect(model, variables, images, config)
  singles = [inference.detect(model, variables, images[i : i + 1], config) for i in range(2)]
  for i, single in enumerate(singles):
    for key in batch:
      np.testing.assert_allclose(batch[key][i], single[key][0], rtol=1e-5, atol=1e-4)
  hits = inference._detect_fn.cache_info().hits
  _, fn = inference._detect_fn(model, ml_collections.FrozenConfigDict(config))
  assert inference._detect_fn.cache_info().hits == hits + 1  # same jitted function for an equal config
  assert fn._cache_size() == 2  # traced once per input shape (batch 2, batch 1), not per call


def test_detect_bfloat16(setup):
  config, _, variables, images = setup
  c16 = _config(**{'model.compute_dtype': 'bfloat16'})
  model16 = detectors.build_model(c16)
  out = inference.detect(model16, variables, images, c16)
  assert out['boxes'].dtype == jnp.float32 and out['scores'].dtype == jnp.float32
  assert int(out['valid'].sum()) > 5
  out32 = inference.detect(detectors.build_model(config), variables, images, config)
  # The best detection survives bfloat16 compute (scores are sigmoids of O(1) logits here).
  np.testing.assert_allclose(out['scores'][:, 0], out32['scores'][:, 0], atol=0.03)


def test_detect_rejects_bad_sizes(setup):
  config, model, variables, _ = setup
  with pytest.raises(ValueError, match='not divisible by 128'):
    inference.detect(model, variables, np.zeros((1, 128, 192, 3), np.float32), config)
  with pytest.raises(ValueError, match=r'\[B, H, W, 3\]'):
    inference.detect(model, variables, np.zeros((128, 128, 3), np.float32), config)


def test_per_image_postprocessing_is_the_batched_one_to_the_bit(setup):
  """detection_fn(per_image=True), the form conret_jax/export converts, gives the detections of detect, bit for bit,
  with each image's own size (a smaller second image: its padding holds no detection)."""
  config, model, variables, images = setup
  detector = detectors.from_config(config, model)
  sizes = np.array([[128, 128], [96, 80]], np.int32)
  batched = inference.detect(model, variables, images, config, image_sizes=sizes)
  per_image = jax.jit(inference.detection_fn(detector, config, per_image=True))(variables, images, sizes)
  assert int(batched['valid'][1].sum()) > 0
  for key in batched:
    np.testing.assert_array_equal(np.asarray(per_image[key]), np.asarray(batched[key]), err_msg=key)
