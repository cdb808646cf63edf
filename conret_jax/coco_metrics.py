"""Scoring COCO box results against COCO ground truth: the summary metrics and per-class AP, with two backends.

Both backends run the same COCOeval algorithm: per image and class, the best-scored detections (at most 1, 10 or
100) are matched greedily to ground truth at each IoU threshold .50:.05:.95; a detection matched to a crowd region or
to an object outside the area range, or unmatched and itself outside it, is ignored rather than counted false;
precision is interpolated at 101 recall points. Area ranges (of the ground truth's 'area', the detections' w * h):
all, small (up to 32^2), medium (32^2 to 96^2), large (above 96^2).

  'faster_coco_eval'  faster-coco-eval's C++ evaluate + accumulate: 7-11 s for 5,000 images x 100 detections on
                      the 2-core dev CPU, where pycocotools took 145 s (bench/RESULTS.md, "COCO scoring").
  'pycocotools'       the reference implementation.
  'auto'              faster_coco_eval if it imports, else pycocotools.

Each fills precision [T iou, R recall points, K classes, A areas, M max-dets] and recall [T, K, A, M]; every number
here is read from those two arrays by the code below, so the backend decides the time, not the metrics
(tests/test_coco_metrics.py compares them metric by metric).

Metrics are the paper's columns (Tables 2-3): AP (IoU .50:.95), AP50, AP75, APs/APm/APl, and AP60/AP70/AP80/AP90
at a single IoU threshold, all with 100 detections per image; AR1/AR10/AR100 as in pycocotools' summary.
Undefined values (no ground truth in that class or area range) are -1.0, pycocotools' convention.
"""

import collections
import contextlib
import dataclasses
import gc
import importlib
import io
import types
from typing import Iterable

import numpy as np
from absl import logging

METRIC_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AP60', 'AP70', 'AP80', 'AP90', 'AR1', 'AR10', 'AR100')
BACKENDS = ('faster_coco_eval', 'pycocotools')

# (name, IoU threshold or None for the .50:.95 mean, area range label) read from precision [T, R, K, A, M].
_AP_SPECS = (
  ('AP', None, 'all'),
  ('AP50', 0.5, 'all'),
  ('AP75', 0.75, 'all'),
  ('APs', None, 'small'),
  ('APm', None, 'medium'),
  ('APl', None, 'large'),
  ('AP60', 0.6, 'all'),
  ('AP70', 0.7, 'all'),
  ('AP80', 0.8, 'all'),
  ('AP90', 0.9, 'all'),
)
_AR_SPECS = (('AR1', 1), ('AR10', 10), ('AR100', 100))
_PER_CLASS_SPECS = (('AP', None), ('AP50', 0.5), ('AP75', 0.75))  # area 'all'


@dataclasses.dataclass(frozen=True)
class Scores:
  """summary: {name: float} for METRIC_NAMES.
  per_class: {category name: {'category_id': int, 'AP': float, 'AP50': float, 'AP75': float}}, every category of
    the ground truth; -1.0 where the class has no (non-crowd) ground truth among the evaluated images."""

  summary: dict[str, float]
  per_class: dict[str, dict]


def resolve_backend(backend: str = 'auto') -> str:
  """The backend that `backend` names: 'auto' -> faster_coco_eval if importable, else pycocotools.

  Raises ValueError for an unknown name and ImportError when the named backend (or, for 'auto', neither) is installed.
  """
  if backend not in ('auto',) + BACKENDS:
    raise ValueError(f'unknown COCO evaluation backend {backend!r}; choose one of {("auto",) + BACKENDS}')
  candidates = BACKENDS if backend == 'auto' else (backend,)
  for name in candidates:
    try:
      importlib.import_module(name)
    except ImportError:
      continue
    return name
  raise ImportError(
    f'COCO evaluation backend {backend!r} needs {" or ".join(candidates)}, not installed here; '
    f'pip install {candidates[0].replace("_", "-")} or choose another of {("auto",) + BACKENDS}'
  )


def _api(backend: str):
  """(COCO, COCOeval) classes of a resolved backend; both share pycocotools' interface."""
  if backend == 'faster_coco_eval':
    from faster_coco_eval import COCO, COCOeval_faster

    return COCO, COCOeval_faster
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval

  return COCO, COCOeval


def _quiet(fn, *args):
  """Runs a backend call with its prints sent to the debug log."""
  buffer = io.StringIO()
  with contextlib.redirect_stdout(buffer):
    out = fn(*args)
  if buffer.getvalue().strip():
    logging.debug('COCO evaluation: %s', buffer.getvalue().strip())
  return out


def _gt_copy(coco_gt: dict) -> dict:
  """A copy the backends may mutate, with defaults filled in. Both write 'ignore' into gt annotations and
  faster-coco-eval casts image ids to int in place; both read 'iscrowd' and 'area' (the area ranges), which a
  hand-built gt may leave out."""
  annotations = []
  for ann in coco_gt['annotations']:
    ann = dict(ann)
    ann.setdefault('iscrowd', 0)
    ann.setdefault('area', float(ann['bbox'][2] * ann['bbox'][3]))
    annotations.append(ann)
  return {**coco_gt, 'images': [dict(image) for image in coco_gt['images']], 'annotations': annotations}


def _mean_valid(values: np.ndarray) -> float:
  """Mean over entries > -1 (undefined), -1 if none is defined."""
  values = values[values > -1]
  return float(np.mean(values)) if values.size else -1.0


def _coco(coco_cls, dataset: dict):
  """A backend's COCO object over `dataset` (used as is, not copied)."""
  api = coco_cls()
  api.dataset = dataset
  _quiet(api.createIndex)
  return api


def _detections(coco_cls, gt, results: list[dict]):
  """The results as a COCO object, as the backends' loadRes makes them for boxes (id, area = w * h, iscrowd 0)
  but without the segmentation polygon it adds to each (unused for boxes; ~1.8 s on 500,000 detections), and
  for an empty list too, which pycocotools' loadRes cannot take."""
  unknown = {r['image_id'] for r in results} - set(gt.imgs)
  if unknown:
    raise ValueError(f'results for {len(unknown)} image ids missing from the ground truth, e.g. {min(unknown)}')
  anns = [{**r, 'id': i, 'area': r['bbox'][2] * r['bbox'][3], 'iscrowd': 0} for i, r in enumerate(results, 1)]
  return _coco(coco_cls, {'images': gt.dataset['images'], 'categories': gt.dataset['categories'], 'annotations': anns})


@contextlib.contextmanager
def _gc_paused():
  """Pauses the cyclic garbage collector: scoring allocates several objects per detection and none in cycles, and
  every collection walks them all (2.5-3 of 12-14 CPU seconds with faster-coco-eval on 500,000 detections)."""
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()


def _run(coco_gt: dict, results: list[dict], image_ids, backend: str):
  """Runs one backend's evaluate + accumulate; returns (precision, recall, params)."""
  coco_cls, eval_cls = _api(backend)
  with _gc_paused():
    gt = _coco(coco_cls, _gt_copy(coco_gt))
    evaluator = eval_cls(gt, _detections(coco_cls, gt, results), 'bbox')
    if image_ids is not None:
      evaluator.params.imgIds = image_ids
    _quiet(evaluator.evaluate)
    _quiet(evaluator.accumulate)
    return np.asarray(evaluator.eval['precision']), np.asarray(evaluator.eval['recall']), evaluator.params


def _ap(precision: np.ndarray, params, iou: float | None, area: str, k=slice(None)) -> float:
  """Mean defined precision at 100 detections for one area range, one IoU threshold (None: all), classes k."""
  p = precision[:, :, k, list(params.areaRngLbl).index(area), list(params.maxDets).index(100)]
  if iou is not None:
    p = p[np.flatnonzero(np.isclose(params.iouThrs, iou))]
  return _mean_valid(p)


def _class_keys(categories: list[dict], cat_ids) -> list[str]:
  """The per_class key of each category id: its name, or 'name (id N)' where names repeat."""
  names = {int(c['id']): str(c.get('name', c['id'])) for c in categories}
  repeated = {n for n, count in collections.Counter(names.values()).items() if count > 1}
  return [f'{names[int(i)]} (id {int(i)})' if names[int(i)] in repeated else names[int(i)] for i in cat_ids]


def _per_class(precision: np.ndarray, params, categories: list[dict]) -> dict[str, dict]:
  """{name: {'category_id', 'AP', 'AP50', 'AP75'}} in category id order (precision None: all undefined)."""
  out = {}
  for k, (cat_id, key) in enumerate(zip(params.catIds, _class_keys(categories, params.catIds))):
    out[key] = {'category_id': int(cat_id)}
    for metric, iou in _PER_CLASS_SPECS:
      out[key][metric] = -1.0 if precision is None else _ap(precision, params, iou, 'all', k)
  return out


def score(coco_gt: dict, results: list[dict], image_ids: Iterable[int] | None = None, backend: str = 'auto') -> Scores:
  """COCO box metrics of `results` against the ground-truth dict `coco_gt`.

  Args:
    coco_gt: a COCO instances dict ('images', 'annotations', 'categories'); not modified.
    results: COCO result dicts [{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}]; not modified.
    image_ids: the images to evaluate (those the eval pass covered); None = every image in coco_gt.
    backend: 'auto', 'faster_coco_eval' or 'pycocotools' (see the module docstring).
  Returns:
    Scores. With no results at all, every summary metric is 0.0 (a run that detects nothing reads as zero, as
    before per-class AP existed), and per-class AP is 0.0 for classes with ground truth, -1.0 for the others. With
    no image at all (image_ids empty), every metric is undefined: -1.0.
  """
  if image_ids is not None:  # read once: an iterator would be empty by the time the evaluator reads it
    image_ids = sorted({int(i) for i in image_ids})
  if image_ids is not None and not image_ids:
    params = types.SimpleNamespace(catIds=sorted(int(c['id']) for c in coco_gt['categories']))
    return Scores({name: -1.0 for name in METRIC_NAMES}, _per_class(None, params, coco_gt['categories']))
  precision, recall, params = _run(coco_gt, results, image_ids, resolve_backend(backend))
  per_class = _per_class(precision, params, coco_gt['categories'])
  if not results:
    return Scores({name: 0.0 for name in METRIC_NAMES}, per_class)
  summary = {name: _ap(precision, params, iou, area) for name, iou, area in _AP_SPECS}
  a_all = list(params.areaRngLbl).index('all')
  for name, max_dets in _AR_SPECS:
    summary[name] = _mean_valid(recall[:, :, a_all, list(params.maxDets).index(max_dets)])
  return Scores({name: summary[name] for name in METRIC_NAMES}, per_class)
