"""Parity with torchvision's retinanet_resnet50_fpn (skipped without torch): random seeded weights, imported with
from_torchvision_retinanet, give the same detections as torchvision's backbone/head/anchors/postprocess on the same
normalized input (torchvision's GeneralizedRCNNTransform, which resizes, is bypassed), for images that fill the input
and for images padded at the bottom/right (torchvision pads the normalized image with zeros and clips boxes to each
image's own size). By design a box that lies wholly in the padding (empty once clipped) is no detection here, where
torchvision may keep it as an empty box: those are left out of the comparison."""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

from test_retinanet import torchvision_config  # noqa: E402 (after the importorskip above)

from conret_jax import (  # noqa: E402
  detectors,  # noqa: E402
  inference,
  weights,
)

SIZE = 256


def _normalize(images):
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
  return (torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0 - mean) / std


def _torchvision_model(images):
  """Seeded random weights, conditioned so that detections are non-trivial: BN statistics measured on `images`
  (then a random affine), head convs at a ReLU-preserving scale, class logits around -6.5 with unit spread (about a
  hundred detections above 0.05 per image, below the 300 cap), box deltas of about 0.2."""
  torch.manual_seed(0)
  model = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration pass
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
    model.train()
    model.backbone(_normalize(images))
    head = model.head
    fan_in = 9 * 256
    for block in list(head.classification_head.conv) + list(head.regression_head.conv):
      block[0].weight.normal_(0, (2 / fan_in) ** 0.5)
    head.classification_head.cls_logits.weight.normal_(0, 0.4 / fan_in**0.5)
    head.classification_head.cls_logits.bias.normal_(-6.5, 0.3)
    head.regression_head.bbox_reg.weight.normal_(0, 0.08 / fan_in**0.5)
  return model.eval()


def _torchvision_detect(model, images, image_hw=None):
  """images [B, H, W, 3] float 0..255 -> list of torchvision detections, via the model's own parts. image_hw: the
  images' true (h, w) inside the input; the rest is zero after normalization, as torchvision pads."""
  from torchvision.models.detection.image_list import ImageList

  x = _normalize(images)
  sizes = [tuple(x.shape[-2:])] * x.shape[0] if image_hw is None else [tuple(image_hw)] * x.shape[0]
  if image_hw is not None:
    x[:, :, image_hw[0] :] = 0.0
    x[:, :, :, image_hw[1] :] = 0.0
  with torch.no_grad():
    features = list(model.backbone(x).values())
    head_outputs = model.head(features)
    anchors = model.anchor_generator(ImageList(x, sizes), features)
    per_level = [f.shape[2] * f.shape[3] * 9 for f in features]
    split_outputs = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
    split_anchors = [list(a.split(per_level)) for a in anchors]
    return model.postprocess_detections(split_outputs, split_anchors, sizes)


def _iou(a, b):
  lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
  inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
  area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
  union = area(a)[:, None] + area(b)[None] - inter
  return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


@pytest.mark.parametrize('image_hw', [None, (200, 232)], ids=['full', 'padded'])
def test_detections_match_torchvision(image_hw):
  rng = np.random.default_rng(0)
  # A smooth random image (upsampled noise) gives structured features rather than pure noise.
  images = np.kron(rng.uniform(0, 255, (2, SIZE // 8, SIZE // 8, 3)), np.ones((1, 8, 8, 1))).astype(np.float32)
  tv_model = _torchvision_model(images)
  want = _torchvision_detect(tv_model, images, image_hw)

  config = torchvision_config()
  state_dict = {k: v.numpy() for k, v in tv_model.state_dict().items()}
  variables = weights.from_torchvision_retinanet(state_dict, config)
  sizes = None if image_hw is None else np.array([image_hw] * len(images), np.int32)
  if image_hw is not None:
    images[:, image_hw[0] :] = 0.0  # black padding from the caller: detect fills it with the mean itself
    images[:, :, image_hw[1] :] = 0.0
  got = inference.detect(detectors.build_model(config), variables, images, config, image_sizes=sizes)

  for i, w in enumerate(want):
    w_boxes, w_scores, w_labels = (w[k].numpy() for k in ('boxes', 'scores', 'labels'))
    nonempty = (w_boxes[:, 2] > w_boxes[:, 0]) & (w_boxes[:, 3] > w_boxes[:, 1])
    w_boxes, w_scores, w_labels = w_boxes[nonempty], w_scores[nonempty], w_labels[nonempty]
    n = int(got['valid'][i].sum())
    g_boxes, g_scores, g_labels = (np.asarray(got[k][i, :n]) for k in ('boxes', 'scores', 'classes'))
    assert 20 <= len(w_scores) < config.eval.max_detections, 'the comparison needs non-trivial, uncapped output'
    # Only a detection within 2e-3 of the score threshold may legitimately appear on one side only.
    borderline = lambda scores: np.abs(scores - config.eval.score_threshold) < 2e-3
    iou = _iou(w_boxes, g_boxes)
    match = (w_labels[:, None] == g_labels[None]) & (iou >= 0.99) & (np.abs(w_scores[:, None] - g_scores[None]) <= 2e-3)
    for j in np.nonzero(~match.any(axis=1) & ~borderline(w_scores))[0]:
      pytest.fail(
        f'image {i}: torchvision detection (class {w_labels[j]}, score {w_scores[j]:.4f}, box '
        f'{w_boxes[j]}) has no match'
      )
    for j in np.nonzero(~match.any(axis=0) & ~borderline(g_scores))[0]:
      pytest.fail(
        f'image {i}: our detection (class {g_labels[j]}, score {g_scores[j]:.4f}, box {g_boxes[j]}) '
        f'has no torchvision match'
      )
    print(
      f'image {i}: {len(w_scores)} torchvision / {n} our detections, max score difference '
      f'{np.abs(w_scores[: min(n, len(w_scores))] - g_scores[: min(n, len(w_scores))]).max():.2e}'
    )


@pytest.mark.parametrize('height', [SIZE, 200], ids=['full', 'padded'])
def test_imported_weights_score_ap_one_against_their_own_detections(tmp_path, height):
  """conret-import of a torchvision RetinaNet .pth, then conret-eval's path with configs/retinanet_torchvision.py
  (class k = COCO category k) on a COCO-format folder whose ground truth is torchvision's own detections: every
  detection is found again under the same category id, so AP is about 1 (a detection within rounding of the 0.05
  score threshold may appear on one side only). Images `height` x SIZE are padded to SIZE x SIZE by the pipeline
  as torchvision pads them (the normalization's mean)."""
  import json

  from PIL import Image

  from conret_jax.cli import eval as eval_cli
  from conret_jax.cli import import_weights
  from conret_jax.data import info as info_lib

  rng = np.random.default_rng(1)
  images = np.kron(rng.uniform(0, 255, (2, SIZE // 8, SIZE // 8, 3)), np.ones((1, 8, 8, 1))).round().astype(np.float32)
  tv_model = _torchvision_model(images)
  want = _torchvision_detect(tv_model, images, (height, SIZE))
  image_dir = tmp_path / 'images'
  image_dir.mkdir()
  coco_ids = set(info_lib.COCO_CATEGORY_IDS)
  gt = {
    'images': [],
    'annotations': [],
    'categories': [{'id': c, 'name': n} for c, n in zip(info_lib.COCO_CATEGORY_IDS, info_lib.COCO_CLASS_NAMES)],
  }
  for i, w in enumerate(want):
    Image.fromarray(images[i, :height].astype(np.uint8)).save(image_dir / f'{i}.png')
    gt['images'].append({'id': i + 1, 'file_name': f'{i}.png', 'height': height, 'width': SIZE})
    for box, label in zip(w['boxes'].numpy(), w['labels'].numpy()):
      if int(label) in coco_ids and box[3] > box[1] and box[2] > box[0]:  # no category, or empty: no object
        x1, y1, x2, y2 = (float(v) for v in box)
        gt['annotations'].append(
          {
            'id': len(gt['annotations']) + 1,
            'image_id': i + 1,
            'category_id': int(label),
            'bbox': [x1, y1, x2 - x1, y2 - y1],
            'area': (x2 - x1) * (y2 - y1),
            'iscrowd': 0,
          }
        )
  (tmp_path / 'gt.json').write_text(json.dumps(gt))
  torch.save(tv_model.state_dict(), tmp_path / 'retinanet.pth')
  weights_dir = tmp_path / 'imported'
  assert (
    import_weights.main(
      ['--format', 'torchvision_retinanet', '--input', str(tmp_path / 'retinanet.pth'), '--output', str(weights_dir)]
    )
    == 0
  )

  config = torchvision_config()
  config.init_from = str(weights_dir)
  config.data.resize, config.data.image_size = 'square', SIZE  # the images are SIZE x SIZE: no resampling
  config.data.eval.source = 'coco_json'
  config.data.eval.annotation_file, config.data.eval.image_dir = str(tmp_path / 'gt.json'), str(image_dir)
  config.eval.global_batch_size = 8
  record, metrics = eval_cli.run(config, str(tmp_path / 'run'))
  assert record.step == 0 and len(gt['annotations']) >= 40
  print(
    f'{len(gt["annotations"])} ground-truth boxes: AP {metrics["AP"]:.4f}, AP50 {metrics["AP50"]:.4f}, '
    f'AP75 {metrics["AP75"]:.4f}'
  )
  assert metrics['AP'] > 0.97 and metrics['AP50'] > 0.97, metrics
  ours = json.loads((tmp_path / 'run' / 'eval' / 'step_0' / 'detections.json').read_text())
  assert {r['category_id'] for r in ours} <= coco_ids
  assert {a['category_id'] for a in gt['annotations']} <= {r['category_id'] for r in ours}
