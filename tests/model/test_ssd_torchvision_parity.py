"""Parity with torchvision's ssd300_vgg16 (skipped without torch): seeded random weights, imported with
from_torchvision_ssd into configs/ssd300_torchvision.py's network, give torchvision's raw head outputs (to float32
noise), its detections, through torchvision's whole pipeline (GeneralizedRCNNTransform's fixed 300 x 300 resize
and normalization, the head, SSD.postprocess_detections) against ours (detect: the same scaling, softmax as sigmoid
logits, per-class top 400 above 0.01, NMS 0.45, 200 detections), and its training loss (matching, hard negatives,
both terms) against conret_jax/multibox.py's."""

import importlib.util
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

from conret_jax import detectors, inference, weights  # noqa: E402 (after the importorskip above)

SIZE = 300
_CONFIGS = os.path.join(os.path.dirname(__file__), '..', '..', 'configs')


def ssd300_config():
  spec = importlib.util.spec_from_file_location('ssd300_torchvision', os.path.join(_CONFIGS, 'ssd300_torchvision.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.matmul_precision = 'highest'  # float32 convolutions, as torch's on CPU
  return config


def _torchvision_model():
  """Seeded random weights with the head conditioned so that detections are non-trivial and uncapped: random VGG
  features give near-uniform softmax scores (about 1/91, at the 0.01 threshold), so the class convs' weights are
  scaled down (feature-driven logits of spread ~1) and their biases set to 6 for the background and N(-2.8, 0.6) per
  (box, class): about 170 detections per image above 0.01 over 7 classes, below the 200 cap. The box convs are
  scaled to deltas of a few tenths."""
  torch.manual_seed(0)
  model = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=91)
  with torch.no_grad():
    for conv in model.head.classification_head.module_list:
      conv.weight.mul_(0.15)
      bias = conv.bias.view(-1, 91)
      bias.normal_(-2.8, 0.6)
      bias[:, 0] = 6.0
    for conv in model.head.regression_head.module_list:
      conv.weight.mul_(0.3)
  return model.eval()


def _images(seed):
  rng = np.random.default_rng(seed)  # a smooth random image (upsampled noise): structured features, not pure noise
  return np.kron(rng.uniform(0, 255, (2, SIZE // 10, SIZE // 10, 3)), np.ones((1, 10, 10, 1))).astype(np.float32)


def _as_torch(images):
  return [torch.from_numpy(im).permute(2, 0, 1) / 255.0 for im in images]


@pytest.fixture(scope='module')
def imported():
  model = _torchvision_model()
  config = ssd300_config()
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  return model, config, weights.from_torchvision_ssd(state_dict, config)


def test_head_outputs_match_torchvision(imported):
  tv_model, config, variables = imported
  images = _images(0)
  with torch.no_grad():
    normalized, _ = tv_model.transform(_as_torch(images))
    want = tv_model.head(list(tv_model.backbone(normalized.tensors).values()))
  got = detectors.build_model(config).apply(variables, images)
  logits = np.asarray(got['cls_logits'][0])
  ours = {'cls_logits': np.delete(logits, 1, axis=-1), 'bbox_regression': np.asarray(got['box_deltas'][0])}
  assert logits.shape == (2, 8732, 92) and np.all(logits[..., 1] < -1e3)  # class 0 (no category) never scores
  for key, value in ours.items():
    theirs = want[key].numpy()
    err = np.abs(value - theirs)
    scale = np.abs(theirs).max()
    print(
      f'{key}: max |diff| {err.max():.3g} ({err.max() / scale:.2g} of the largest), rel L2 '
      f'{np.linalg.norm(value - theirs) / np.linalg.norm(theirs):.2g}'
    )
    # Float32 noise of two summation orders through 15 convolutions: ~1e-6 relative (a wrong weight or layer is O(1)).
    assert err.max() <= 2e-5 * scale and np.linalg.norm(value - theirs) <= 1e-5 * np.linalg.norm(theirs)


def _iou(a, b):
  lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
  union = area(a)[:, None] + area(b)[None] - inter
  return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def test_detections_match_torchvision(imported):
  tv_model, config, variables = imported
  images = _images(1)
  with torch.no_grad():
    want = tv_model(_as_torch(images))
  got = inference.detect(detectors.build_model(config), variables, images, config)
  for i, w in enumerate(want):
    w_boxes, w_scores, w_labels = (w[k].numpy() for k in ('boxes', 'scores', 'labels'))
    n = int(got['valid'][i].sum())
    g_boxes, g_scores, g_labels = (np.asarray(got[k][i, :n]) for k in ('boxes', 'scores', 'classes'))
    assert 50 <= len(w_scores) < config.eval.max_detections, 'the comparison needs non-trivial, uncapped output'
    iou = _iou(w_boxes, g_boxes)
    match = (w_labels[:, None] == g_labels[None]) & (iou >= 0.99) & (np.abs(w_scores[:, None] - g_scores[None]) <= 2e-3)
    found, ours_found = match.any(axis=1).mean(), match.any(axis=0).mean()
    print(
      f'image {i}: {len(w_scores)} torchvision / {n} our detections over {len(set(w_labels))} classes; found '
      f'{found:.2%} of theirs, {ours_found:.2%} of ours; max score difference of matches '
      f'{np.abs(w_scores[:, None] - g_scores[None])[match].max():.2e}'
    )
    assert found >= 0.99 and ours_found >= 0.99


def test_import_cli_writes_the_same_variables(imported, tmp_path):
  """conret-import --format torchvision_ssd of a torch.save'd state dict, with its default config
  (configs/ssd300_torchvision.py)."""
  from conret_jax.cli import import_weights
  from conret_jax.train import checkpoint

  tv_model, _, variables = imported
  torch.save(tv_model.state_dict(), tmp_path / 'ssd.pth')
  out = tmp_path / 'imported'
  assert (
    import_weights.main(['--format', 'torchvision_ssd', '--input', str(tmp_path / 'ssd.pth'), '--output', str(out)])
    == 0
  )
  loaded = dict(_leaves(checkpoint.load_variables(str(out))))
  expected = dict(_leaves(variables))
  assert sorted(loaded) == sorted(expected)
  for path, value in expected.items():
    np.testing.assert_array_equal(np.asarray(loaded[path]), value, err_msg=path)


def _leaves(tree):
  import jax

  return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def test_training_loss_matches_torchvision(imported):
  """torchvision's SSD training loss (its SSDMatcher, 3:1 hard negatives, smooth L1, both over N) against ours on
  the same images, boxes and labels. The boxes include small objects beside larger ones whose best default box
  overlaps the larger object more: SSD gives that box to the small object ('assign'), where RetinaNet's rule
  ('promote') would keep it on the larger one, and the test checks that this case occurs."""
  import dataclasses

  import jax.numpy as jnp

  from conret_jax.multibox import MultiBoxLoss

  tv_model, config, variables = imported
  images = _images(2)
  boxes = np.array(
    [
      [[100, 100, 110, 110], [96, 98, 120, 122], [30, 40, 150, 200], [200, 20, 290, 90]],
      [[60, 60, 69, 71], [57, 55, 80, 79], [150, 150, 280, 290], [10, 200, 120, 260]],
    ],
    np.float32,
  )
  labels = np.array([[1, 3, 18, 62], [44, 1, 5, 90]], np.int64)  # COCO category ids (torchvision's labels)
  targets = [{'boxes': torch.from_numpy(b), 'labels': torch.from_numpy(c)} for b, c in zip(boxes, labels)]
  tv_model.train()
  try:
    with torch.no_grad():
      want = {k: float(v) for k, v in tv_model(_as_torch(images), targets).items()}
  finally:
    tv_model.eval()
  detector = detectors.from_config(config)
  outputs = detector.module.apply(variables, images)
  batch = dict(
    boxes=jnp.asarray(boxes),
    classes=jnp.asarray(labels, jnp.int32),  # class_layout 'category_id': a class index is its category id
    valid=jnp.ones(labels.shape, bool),
    crowd=jnp.zeros(labels.shape, bool),
  )
  loss = MultiBoxLoss.from_config(config)
  anchors = detector.anchors((SIZE, SIZE))
  _, got = loss(outputs, anchors, batch)
  print(f'torchvision {want}; ours cls {float(got["cls_loss_0"]):.6f} box {float(got["box_loss_0"]):.6f}')
  np.testing.assert_allclose(float(got['cls_loss_0']), want['classification'], rtol=1e-4)
  np.testing.assert_allclose(float(got['box_loss_0']), want['bbox_regression'], rtol=1e-4)
  promote = dataclasses.replace(loss, stages=dataclasses.replace(loss.stages, low_quality_rule='promote'))
  _, other = promote(outputs, anchors, batch)
  assert abs(float(other['cls_loss_0']) - want['classification']) > 1e-3 * want['classification']
