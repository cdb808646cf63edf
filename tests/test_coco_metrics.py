"""COCO scoring: metric values against a NumPy AP reference, per-class AP, crowd regions, and the two backends
(faster-coco-eval, pycocotools) agreeing on every metric."""

import copy
import importlib.util
import sys

import numpy as np
import pytest

from conret_jax import coco_metrics

CATEGORY_IDS = [1, 7, 42]
_HAS_FASTER = importlib.util.find_spec('faster_coco_eval') is not None
_needs_faster = pytest.mark.skipif(not _HAS_FASTER, reason='faster-coco-eval is not installed')
BACKEND_PARAMS = [pytest.param('faster_coco_eval', marks=_needs_faster), 'pycocotools']


def _gt(images: dict, categories=CATEGORY_IDS) -> dict:
  """images: {image_id: (height, width, [(category_id, [x, y, w, h], iscrowd), ...])}."""
  anns = []
  for image_id, (_, _, boxes) in images.items():
    for cat, bbox, crowd in boxes:
      anns.append(
        {
          'id': len(anns) + 1,
          'image_id': image_id,
          'category_id': cat,
          'bbox': list(bbox),
          'area': float(bbox[2] * bbox[3]),
          'iscrowd': crowd,
        }
      )
  return {
    'images': [{'id': i, 'height': h, 'width': w} for i, (h, w, _) in images.items()],
    'annotations': anns,
    'categories': [{'id': c, 'name': f'c{c}'} for c in categories],
  }


def _result(image_id, cat, bbox, score):
  return {'image_id': image_id, 'category_id': cat, 'bbox': [float(v) for v in bbox], 'score': score}


# ---- the cases: (coco_gt, results, image_ids) ----


def _perfect_case():
  # Medium (32^2..96^2) and large objects only: APs is undefined.
  gt = _gt(
    {
      1: (200, 300, [(1, [10, 10, 50, 40], 0), (7, [100, 50, 150, 120], 0)]),
      2: (100, 100, [(42, [0, 0, 60, 60], 0), (1, [30, 30, 40, 40], 0)]),
    }
  )
  return gt, [_result(a['image_id'], a['category_id'], a['bbox'], 0.9) for a in gt['annotations']], None


def _iou_067_case():
  gt = _gt({1: (200, 200, [(7, [0, 0, 100, 100], 0)])})
  return gt, [_result(1, 7, [0, 0, 100, 67], 0.8)], None  # IoU 0.67


def _single_class_case():
  """4 images of class 7: jittered true positives (IoU spread over the thresholds) and false positives, distinct
  scores. Returns the case and {image_id: gt boxes}, [(image_id, box, score)] for the NumPy reference."""
  rs = np.random.RandomState(0)
  gt_boxes, dets = {}, []
  for image_id in range(1, 5):
    n = rs.randint(2, 5)
    xy = rs.uniform(0, 300, (n, 2))
    wh = rs.uniform(40, 150, (n, 2))
    gt_boxes[image_id] = [list(b) for b in np.concatenate([xy, wh], 1)]
    for box in gt_boxes[image_id]:
      if rs.rand() < 0.85:
        jitter = rs.uniform(-0.25, 0.25, 4) * np.array([box[2], box[3], box[2], box[3]]) * [0.3, 0.3, 1, 1]
        dets.append((image_id, list(np.array(box) + jitter)))
    for _ in range(rs.randint(1, 3)):
      dets.append((image_id, list(np.concatenate([rs.uniform(0, 300, 2), rs.uniform(40, 150, 2)]))))
  scores = rs.permutation(len(dets)) / len(dets) + 0.01  # distinct scores, no ties
  dets = [(i, [round(v, 2) for v in b], round(float(s), 5)) for (i, b), s in zip(dets, scores)]
  gt = _gt({i: (500, 500, [(7, b, 0) for b in boxes]) for i, boxes in gt_boxes.items()}, categories=[7])
  return (gt, [_result(i, 7, b, s) for i, b, s in dets], None), gt_boxes, dets


def _random_case(seed: int = 0):
  """40 images, 6 classes: small, medium and large objects, ~8% crowd regions; detections are jittered copies of the
  ground truth (misses, loose and tight matches, duplicates), boxes inside crowd regions and false positives, with
  scores on a 0.001 grid (ties). Class 5 is never detected, class 6 has no ground truth. Every 7th image has no
  ground truth, every 5th no detections, image 40 neither; image 3 has 12 objects of class 2 and 150 more
  detections of class 1 (past the 100-per-image cut)."""
  rs = np.random.default_rng(seed)
  h, w = 480.0, 640.0
  images, results = {}, []
  score = lambda: round(float(rs.uniform(0.05, 1.0)), 3)
  for image_id in range(1, 41):
    boxes = []
    for _ in range(0 if image_id % 7 == 0 or image_id == 40 else int(rs.integers(1, 12))):
      side = np.exp(rs.uniform(np.log(6), np.log(300), 2))  # 6 px .. 300 px: all three area ranges
      xy = rs.uniform(0, [w, h] - side)
      boxes.append((int(rs.integers(1, 6)), [*xy, *side], int(rs.random() < 0.08)))
    if image_id == 3:  # a row of 12 objects of one class: AR10 < AR100
      boxes += [(2, [10.0 + 52 * j, 420.0, 40.0, 40.0], 0) for j in range(12)]
    images[image_id] = (int(h), int(w), boxes)
    if image_id % 5 == 0 or image_id == 40:
      continue
    for cat, box, crowd in boxes:
      box = np.array(box)
      for _ in range(0 if cat == 5 else int(rs.integers(0, 4 if crowd else 3))):
        jitter = rs.normal(0, 0.08, 4) * box[[2, 3, 2, 3]]
        xywh = np.concatenate([box[:2] + jitter[:2], np.maximum(box[2:] + jitter[2:], 2.0)])
        results.append(_result(image_id, cat, np.round(xywh, 2), score()))
    for _ in range(int(rs.integers(0, 6))):
      side = np.exp(rs.uniform(np.log(6), np.log(300), 2))
      xy = rs.uniform(0, [w, h] - side)
      results.append(_result(image_id, int(rs.integers(1, 7)), np.round([*xy, *side], 2), score()))
  for _ in range(150):
    xy = rs.uniform(0, [w - 100, h - 100])
    results.append(_result(3, 1, np.round([*xy, *rs.uniform(10, 100, 2)], 2), score()))
  return _gt(images, categories=[1, 2, 3, 4, 5, 6]), results, None


def _crowd_case():
  """Class 1: one object, detected last (score 0.5), and a crowd region with three better-scored detections inside."""
  gt = _gt({1: (400, 400, [(1, [300, 300, 50, 50], 0), (1, [0, 0, 200, 200], 1)])}, categories=[1])
  results = [
    _result(1, 1, [10, 10, 60, 60], 0.9),
    _result(1, 1, [100, 20, 80, 90], 0.8),
    _result(1, 1, [0, 0, 200, 200], 0.7),
    _result(1, 1, [300, 300, 50, 50], 0.5),
  ]
  return gt, results, None


def _empty_images_case():
  """Image 2 has no ground truth (its detection is a false positive), image 3 no detections, image 4 neither."""
  gt = _gt(
    {
      1: (100, 100, [(1, [10, 10, 50, 50], 0)]),
      2: (100, 100, []),
      3: (100, 100, [(7, [20, 20, 40, 40], 0)]),
      4: (100, 100, []),
    }
  )
  results = [_result(1, 1, [10, 10, 50, 50], 0.6), _result(2, 1, [0, 0, 30, 30], 0.9)]
  return gt, results, None


def _subset_case():
  gt, results, _ = _empty_images_case()
  return gt, results, [1, 3]


def _empty_results_case():
  return _empty_images_case()[0], [], None


CASES = {
  'perfect': _perfect_case,
  'iou_067': _iou_067_case,
  'single_class': lambda: _single_class_case()[0],
  'random': _random_case,
  'crowd': _crowd_case,
  'empty_images': _empty_images_case,
  'subset': _subset_case,
  'empty_results': _empty_results_case,
}


# ---- values ----


@pytest.mark.parametrize('backend', BACKEND_PARAMS)
def test_perfect_detections_score_one_and_undefined_areas_are_minus_one(backend):
  gt, results, _ = _perfect_case()
  before = copy.deepcopy(gt), copy.deepcopy(results)
  scores = coco_metrics.score(gt, results, backend=backend)
  assert tuple(scores.summary) == coco_metrics.METRIC_NAMES
  for name in ('AP', 'AP50', 'AP75', 'AP60', 'AP70', 'AP80', 'AP90', 'APm', 'APl', 'AR10', 'AR100'):
    assert scores.summary[name] == pytest.approx(1.0), name
  assert scores.summary['APs'] == -1.0
  assert scores.per_class == {
    f'c{c}': pytest.approx({'category_id': c, 'AP': 1.0, 'AP50': 1.0, 'AP75': 1.0}) for c in CATEGORY_IDS
  }
  assert (gt, results) == before  # the backend worked on copies


@pytest.mark.parametrize('backend', BACKEND_PARAMS)
def test_one_box_at_iou_067(backend):
  metrics = coco_metrics.score(*_iou_067_case(), backend=backend).summary
  assert metrics['AP50'] == pytest.approx(1.0) and metrics['AP60'] == pytest.approx(1.0)
  assert metrics['AP70'] == 0.0 and metrics['AP75'] == 0.0 and metrics['AP90'] == 0.0
  assert metrics['AP'] == pytest.approx(0.4)  # matched at 0.50, 0.55, 0.60, 0.65 of the ten thresholds
  assert metrics['AR1'] == pytest.approx(0.4)


def _iou(a, b):
  """xywh boxes a [N,4], b [M,4] -> [N,M]."""
  ax2, ay2, bx2, by2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
  iw = np.clip(np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
  ih = np.clip(np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
  inter = iw * ih
  return inter / (a[:, 2:].prod(1)[:, None] + b[:, 2:].prod(1)[None] - inter)


def _reference_ap(gt_boxes: dict, dets: list, threshold: float) -> float:
  """Single-class COCO AP at one IoU threshold: greedy matching by score, 101-point interpolated precision."""
  tp = []
  for image_id, boxes in gt_boxes.items():
    mine = sorted([d for d in dets if d[0] == image_id], key=lambda d: -d[2])
    taken = np.zeros(len(boxes), bool)
    ious = _iou(np.array([d[1] for d in mine]).reshape(-1, 4), np.array(boxes).reshape(-1, 4))
    for k, det in enumerate(mine):
      candidates = np.where(~taken & (ious[k] >= threshold))[0]
      if len(candidates):
        taken[candidates[np.argmax(ious[k, candidates])]] = True
      tp.append((det[2], bool(len(candidates))))
  tp.sort(key=lambda t: -t[0])
  hits = np.array([t[1] for t in tp], float)
  num_gt = sum(len(b) for b in gt_boxes.values())
  recall = np.cumsum(hits) / num_gt
  precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
  precision = np.maximum.accumulate(precision[::-1])[::-1]  # the envelope
  points = np.linspace(0, 1, 101)
  idx = np.searchsorted(recall, points, side='left')
  return float(np.mean([precision[i] if i < len(precision) else 0.0 for i in idx]))


@pytest.mark.parametrize('backend', BACKEND_PARAMS)
def test_matches_numpy_reference_ap_single_class(backend):
  case, gt_boxes, dets = _single_class_case()
  scores = coco_metrics.score(*case, backend=backend)
  metrics = scores.summary
  per_threshold = [_reference_ap(gt_boxes, dets, t) for t in np.linspace(0.5, 0.95, 10)]
  assert 0.05 < metrics['AP'] < 0.95  # a non-trivial case
  assert metrics['AP'] == pytest.approx(np.mean(per_threshold), abs=1e-9)
  for name, index in (('AP50', 0), ('AP60', 2), ('AP70', 4), ('AP75', 5), ('AP80', 6), ('AP90', 8)):
    assert metrics[name] == pytest.approx(per_threshold[index], abs=1e-9), name
  # One class: its per-class AP is the summary's.
  assert scores.per_class['c7'] == {
    'category_id': 7,
    'AP': metrics['AP'],
    'AP50': metrics['AP50'],
    'AP75': metrics['AP75'],
  }


@pytest.mark.parametrize('backend', BACKEND_PARAMS)
def test_per_class_ap_averages_to_the_summary(backend):
  scores = coco_metrics.score(*_random_case(), backend=backend)
  assert set(scores.per_class) == {f'c{c}' for c in range(1, 7)}
  assert scores.per_class['c6']['AP'] == -1.0 and scores.per_class['c6']['AP50'] == -1.0  # no ground truth
  assert scores.per_class['c5']['AP'] == 0.0  # never detected
  summary = scores.summary
  assert 0.05 < summary['AP'] < 0.9 and summary['AR1'] < summary['AR10'] < summary['AR100']
  assert min(summary['APs'], summary['APm'], summary['APl']) > 0
  for name in ('AP', 'AP50', 'AP75'):
    defined = [v[name] for v in scores.per_class.values() if v[name] > -1]
    assert scores.summary[name] == pytest.approx(np.mean(defined), abs=1e-12), name


@pytest.mark.parametrize('backend', BACKEND_PARAMS)
def test_detections_on_crowd_regions_are_ignored(backend):
  gt, results, _ = _crowd_case()
  assert coco_metrics.score(gt, results, backend=backend).summary['AP'] == pytest.approx(1.0)
  gt['annotations'][1]['iscrowd'] = 0  # the same region as a plain object: the detections inside it count
  assert coco_metrics.score(gt, results, backend=backend).summary['AP'] < 0.9


@pytest.mark.parametrize('backend', BACKEND_PARAMS)
def test_empty_results_images_without_gt_and_image_subset(backend):
  gt, results, _ = _empty_images_case()
  empty = coco_metrics.score(gt, [], backend=backend)
  assert empty.summary == {name: 0.0 for name in coco_metrics.METRIC_NAMES}
  assert empty.per_class == {
    'c1': {'category_id': 1, 'AP': 0.0, 'AP50': 0.0, 'AP75': 0.0},
    'c7': {'category_id': 7, 'AP': 0.0, 'AP50': 0.0, 'AP75': 0.0},
    'c42': {'category_id': 42, 'AP': -1.0, 'AP50': -1.0, 'AP75': -1.0},
  }
  scores = coco_metrics.score(gt, results, backend=backend)
  assert scores.summary['AR100'] == pytest.approx(0.5)  # image 3's object is missed
  assert scores.per_class['c1']['AP'] == pytest.approx(0.5)  # image 2's false positive scores higher
  subset = coco_metrics.score(gt, results, image_ids=[1, 4], backend=backend)
  assert subset.summary['AP'] == pytest.approx(1.0) and subset.per_class['c7']['AP'] == -1.0
  once = coco_metrics.score(gt, results, image_ids=(i for i in (4, 1)), backend=backend)  # an iterator, read once
  assert once.summary == subset.summary and once.per_class == subset.per_class


# ---- the backends agree ----


@_needs_faster
@pytest.mark.parametrize('case', sorted(CASES))
def test_backends_agree_on_every_metric(case):
  faster, reference = (coco_metrics.score(*CASES[case](), backend=b) for b in ('faster_coco_eval', 'pycocotools'))
  assert list(faster.summary) == list(reference.summary)
  for name, value in reference.summary.items():
    assert faster.summary[name] == pytest.approx(value, abs=1e-4), name
  assert list(faster.per_class) == list(reference.per_class)
  for name, values in reference.per_class.items():
    assert faster.per_class[name] == pytest.approx(values, abs=1e-4), name


def test_results_for_unknown_images_are_an_error():
  gt, results, _ = _perfect_case()
  with pytest.raises(ValueError, match='missing from the ground truth, e.g. 99'):
    coco_metrics.score(gt, results + [_result(99, 1, [0, 0, 5, 5], 0.5)], backend='pycocotools')


def test_repeated_category_names_stay_apart():
  gt, results, _ = _perfect_case()
  for category in gt['categories']:
    category['name'] = 'thing'
  per_class = coco_metrics.score(gt, results, backend='pycocotools').per_class
  assert list(per_class) == ['thing (id 1)', 'thing (id 7)', 'thing (id 42)']


# ---- backend selection ----


def test_backend_selection(monkeypatch):
  assert coco_metrics.resolve_backend('pycocotools') == 'pycocotools'
  assert coco_metrics.resolve_backend('auto') == ('faster_coco_eval' if _HAS_FASTER else 'pycocotools')
  with pytest.raises(ValueError, match="'auto', 'faster_coco_eval', 'pycocotools'"):
    coco_metrics.resolve_backend('detectron2')
  with pytest.raises(ValueError, match='unknown COCO evaluation backend'):
    coco_metrics.score(*_perfect_case(), backend='fast')
  monkeypatch.setitem(sys.modules, 'faster_coco_eval', None)  # as if not installed
  assert coco_metrics.resolve_backend('auto') == 'pycocotools'
  with pytest.raises(ImportError, match='pip install faster-coco-eval'):
    coco_metrics.resolve_backend('faster_coco_eval')
  monkeypatch.setitem(sys.modules, 'pycocotools', None)
  with pytest.raises(ImportError, match='faster_coco_eval or pycocotools'):
    coco_metrics.resolve_backend('auto')
