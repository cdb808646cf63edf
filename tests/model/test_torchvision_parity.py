"""Parity with torchvision's retinanet_resnet50_fpn (skipped without torch): random seeded weights, imported with
from_torchvision_retinanet, give the same detections as torchvision's backbone/head/anchors/postprocess on the same
normalized input (torchvision's GeneralizedRCNNTransform, which resizes, is bypassed)."""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

from conret_jax import inference, weights  # pylint: disable=g-import-not-at-top
from conret_jax.model import detector
from test_detector import torchvision_config

SIZE = 256


def _torchvision_model():
  torch.manual_seed(0)
  model = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
  with torch.no_grad():  # make BN and the predictions non-trivial so there are detections to compare
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0, 0.1)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
    head = model.head
    head.classification_head.cls_logits.weight.normal_(0, 0.03)
    head.classification_head.cls_logits.bias.normal_(-3.0, 1.0)
    head.regression_head.bbox_reg.weight.normal_(0, 0.02)
    head.regression_head.bbox_reg.bias.normal_(0, 0.2)
  return model.eval()


def _torchvision_detect(model, images):
  """images [B, H, W, 3] float 0..255 -> list of torchvision detections, via the model's own parts."""
  from torchvision.models.detection.image_list import ImageList  # pylint: disable=g-import-not-at-top
  mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
  x = (torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0 - mean) / std
  sizes = [tuple(x.shape[-2:])] * x.shape[0]
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
  return inter / (area(a)[:, None] + area(b)[None] - inter)


def test_detections_match_torchvision():
  tv_model = _torchvision_model()
  rng = np.random.default_rng(0)
  # A smooth random image (upsampled noise) gives structured features rather than pure noise.
  images = np.kron(rng.uniform(0, 255, (2, SIZE // 8, SIZE // 8, 3)), np.ones((1, 8, 8, 1))).astype(np.float32)
  want = _torchvision_detect(tv_model, images)

  config = torchvision_config()
  state_dict = {k: v.numpy() for k, v in tv_model.state_dict().items()}
  variables = weights.from_torchvision_retinanet(state_dict, config)
  got = inference.detect(detector.build_model(config), variables, images, config)

  for i, w in enumerate(want):
    w_boxes, w_scores, w_labels = (w[k].numpy() for k in ('boxes', 'scores', 'labels'))
    n = int(got['valid'][i].sum())
    g_boxes, g_scores, g_labels = (np.asarray(got[k][i, :n]) for k in ('boxes', 'scores', 'classes'))
    assert len(w_scores) >= 20, 'weights give too few detections for a meaningful comparison'
    # Detections within 2e-3 of the score threshold may legitimately flip; all others must be present in both.
    assert abs(n - len(w_scores)) <= int(np.sum(np.abs(w_scores - config.eval.score_threshold) < 2e-3)) + 0
    iou = _iou(w_boxes, g_boxes)
    for j in range(len(w_scores)):
      same = (g_labels == w_labels[j]) & (iou[j] >= 0.99) & (np.abs(g_scores - w_scores[j]) <= 2e-3)
      assert same.any(), f'image {i}: torchvision detection {j} (class {w_labels[j]}, score {w_scores[j]:.4f}, ' \
                         f'box {w_boxes[j]}) has no match'
