"""COCO box evaluation: detections to COCO results json, pycocotools metrics, and the evaluation pass.

One job (big_vision's evaluators): the trainer and `conret-eval` both call `evaluate`, so a number in a training log
and a number from `conret-eval` on the same checkpoint come from the same code.

Metrics are the paper's columns (Tables 2-3): AP (IoU .50:.95), AP50, AP75, APs/APm/APl, and AP60/AP70/AP80/AP90
read off COCOeval's precision array at a single IoU threshold; AR1/AR10/AR100 as in pycocotools' summary.
"""

import contextlib
import io
import json
import os
from typing import Iterable, Sequence

from absl import logging
import numpy as np

METRIC_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AP60', 'AP70', 'AP80', 'AP90', 'AR1', 'AR10', 'AR100')

# (name, IoU threshold or None for the .50:.95 mean, area range label) read from precision [T, R, K, A, M].
_AP_SPECS = (
    ('AP', None, 'all'), ('AP50', 0.5, 'all'), ('AP75', 0.75, 'all'),
    ('APs', None, 'small'), ('APm', None, 'medium'), ('APl', None, 'large'),
    ('AP60', 0.6, 'all'), ('AP70', 0.7, 'all'), ('AP80', 0.8, 'all'), ('AP90', 0.9, 'all'),
)
_AR_SPECS = (('AR1', 1), ('AR10', 10), ('AR100', 100))


def detections_to_coco(dets: dict, batch: dict, category_ids: Sequence[int]) -> list[dict]:
  """Turns one batch of detections into COCO result dicts in ORIGINAL image coordinates.

  Args:
    dets: numpy dict: boxes [B, D, 4] float x1y1x2y2 in model-input pixels, scores [B, D], classes [B, D] int
      contiguous class index, valid [B, D] bool.
    batch: numpy dict with image_id [B], scale [B] (resized / original), orig_hw [B, 2] (height, width),
      example_valid [B] bool (False for padding examples).
    category_ids: the dataset's category id for each contiguous class index.
  Returns:
    [{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}], padded examples and invalid detections dropped.
  """
  boxes = np.asarray(dets['boxes'], np.float64)
  scores = np.asarray(dets['scores'], np.float64)
  classes = np.asarray(dets['classes'])
  keep = np.asarray(dets['valid'], bool) & np.asarray(batch['example_valid'], bool)[:, None]
  scale = np.asarray(batch['scale'], np.float64)
  orig_hw = np.asarray(batch['orig_hw'], np.float64)
  # Back to original pixels, clipped to the original image (padding lies outside it).
  boxes = boxes / scale[:, None, None]
  limits = np.stack([orig_hw[:, 1], orig_hw[:, 0], orig_hw[:, 1], orig_hw[:, 0]], axis=-1)[:, None, :]
  boxes = np.clip(boxes, 0.0, limits)
  xywh = np.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)
  cat_ids = np.asarray(category_ids)
  image_ids = np.asarray(batch['image_id'])
  results = []
  for b, d in zip(*np.nonzero(keep)):
    results.append({
        'image_id': int(image_ids[b]),
        'category_id': int(cat_ids[classes[b, d]]),
        'bbox': [round(float(v), 2) for v in xywh[b, d]],  # 0.01 px: far below any IoU that matters
        'score': round(float(scores[b, d]), 5),
    })
  return results


def _quiet(fn, *args):
  """Runs a pycocotools call with its prints sent to the debug log."""
  buffer = io.StringIO()
  with contextlib.redirect_stdout(buffer):
    out = fn(*args)
  if buffer.getvalue().strip():
    logging.debug('pycocotools: %s', buffer.getvalue().strip())
  return out


def _gt_copy(coco_gt: dict) -> dict:
  """A copy pycocotools may mutate (COCOeval writes 'ignore' into gt annotations), with defaults filled in."""
  annotations = []
  for ann in coco_gt['annotations']:
    ann = dict(ann)
    ann.setdefault('iscrowd', 0)
    ann.setdefault('area', float(ann['bbox'][2] * ann['bbox'][3]))
    annotations.append(ann)
  return {**coco_gt, 'annotations': annotations}


def _mean_valid(values: np.ndarray) -> float:
  """Mean over entries > -1 (pycocotools' convention for undefined), -1 if none is defined."""
  values = values[values > -1]
  return float(np.mean(values)) if values.size else -1.0


def coco_metrics(coco_gt: dict, results: list[dict], image_ids: Iterable[int] | None = None) -> dict[str, float]:
  """COCO box metrics of `results` against the ground-truth dict `coco_gt`.

  Args:
    coco_gt: a COCO instances dict ('images', 'annotations', 'categories').
    results: COCO result dicts as made by `detections_to_coco`.
    image_ids: the images to evaluate (those the eval pass covered); None = every image in coco_gt.
  Returns:
    {name: float} for METRIC_NAMES; -1 where a metric is undefined (e.g. no small objects), as pycocotools.
  """
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top

  if not results:  # loadRes cannot take an empty list; no detections means zero precision and recall.
    return {name: 0.0 for name in METRIC_NAMES}
  gt = COCO()
  gt.dataset = _gt_copy(coco_gt)
  _quiet(gt.createIndex)
  dt = _quiet(gt.loadRes, [dict(r) for r in results])  # loadRes writes into the dicts it gets
  evaluator = COCOeval(gt, dt, 'bbox')
  if image_ids is not None:
    evaluator.params.imgIds = sorted({int(i) for i in image_ids})
  _quiet(evaluator.evaluate)
  _quiet(evaluator.accumulate)

  params = evaluator.params
  precision = evaluator.eval['precision']  # [T iou, R recall points, K classes, A areas, M max-dets]
  recall = evaluator.eval['recall']  # [T, K, A, M]
  m100 = list(params.maxDets).index(100)
  metrics = {}
  for name, iou, area in _AP_SPECS:
    a = list(params.areaRngLbl).index(area)
    p = precision[:, :, :, a, m100]
    if iou is not None:
      p = p[np.flatnonzero(np.isclose(params.iouThrs, iou))]
    metrics[name] = _mean_valid(p)
  a_all = list(params.areaRngLbl).index('all')
  for name, max_dets in _AR_SPECS:
    metrics[name] = _mean_valid(recall[:, :, a_all, list(params.maxDets).index(max_dets)])
  return metrics


def eval_dir(workdir: str, step: int) -> str:
  """DIR/eval/step_N: where one evaluation's files go."""
  return os.path.join(workdir, 'eval', f'step_{int(step)}')


def write_eval(out_dir: str, results: list[dict], metrics: dict) -> None:
  """Writes OUT_DIR/detections.json (COCO results format) and OUT_DIR/metrics.json."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'detections.json'), 'w') as f:
    json.dump(results, f)
  with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
    json.dump({k: float(v) for k, v in metrics.items()}, f, indent=2, sort_keys=True)


def coco_gt_from_batches(gt_rows: list[dict], category_ids: Sequence[int], class_names: Sequence[str]) -> dict:
  """Builds a COCO gt dict from the batches' own annotations, for sources that carry no instances json.

  Args:
    gt_rows: host batches holding boxes [B, M, 4] (model-input pixels), classes [B, M], valid [B, M], crowd [B, M],
      image_id [B], scale [B], orig_hw [B, 2], example_valid [B].
  Areas are box areas (COCO's are mask areas), so APs/APm/APl can differ slightly from an official evaluation.
  """
  images, annotations = [], []
  for rows in gt_rows:
    for b in np.flatnonzero(np.asarray(rows['example_valid'], bool)):
      h, w = (int(v) for v in rows['orig_hw'][b])
      image_id = int(rows['image_id'][b])
      images.append({'id': image_id, 'height': h, 'width': w})
      boxes = np.asarray(rows['boxes'][b], np.float64) / float(rows['scale'][b])
      boxes = np.clip(boxes, 0.0, [w, h, w, h])
      for m in np.flatnonzero(np.asarray(rows['valid'][b], bool)):
        x1, y1, x2, y2 = (float(v) for v in boxes[m])
        annotations.append({
            'id': len(annotations) + 1, 'image_id': image_id,
            'category_id': int(category_ids[int(rows['classes'][b, m])]),
            'bbox': [x1, y1, x2 - x1, y2 - y1], 'area': (x2 - x1) * (y2 - y1),
            'iscrowd': int(bool(rows['crowd'][b, m])),
        })
  categories = [{'id': int(c), 'name': str(n)} for c, n in zip(category_ids, class_names)]
  return {'images': images, 'annotations': annotations, 'categories': categories}


_META_KEYS = ('image_id', 'scale', 'orig_hw', 'example_valid')
_GT_KEYS = ('boxes', 'classes', 'valid', 'crowd')


def evaluate(model, variables, config, mesh=None, *, workdir: str | None = None, step: int = 0,
             batches: Iterable[dict] | None = None, info=None, detect_fn=None) -> dict[str, float]:
  """Runs detection over the eval set, gathers across processes, scores with pycocotools, writes files.

  Args:
    model, variables: the detector and its flax variables (e.g. `state.variables()`).
    config: the full config (config.data.eval: the source; config.eval: post-processing, num_images, visualize).
    mesh: the device mesh; the eval batches are sharded over all its devices.
    workdir: if set, process 0 writes DIR/eval/step_N/{detections.json, metrics.json, detections.png}.
    batches: global eval batches (layout in conret_jax/data/__init__.py); default `data.make_eval_iterator(config, mesh, ...)`.
      Every process must iterate the same batches.
    info: `data.DatasetInfo` of the eval source; default `data.dataset_info(config.data.eval, config)`.
      Without coco_gt, the ground truth is rebuilt from the batches (box areas stand in for mask areas).
    detect_fn: (model, variables, images, config) -> detections dict; default `conret_jax.detect`.
  Returns:
    {name: float} for METRIC_NAMES, identical on every process.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  if batches is None or info is None:
    from conret_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    if info is None:
      info = data_lib.dataset_info(config.data.eval, config)
    if batches is None:
      from conret_jax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
      batches = data_lib.make_eval_iterator(config, mesh, mesh_lib.batch_sharding(mesh))
  if detect_fn is None:
    import conret_jax  # pylint: disable=g-import-not-at-top
    detect_fn = conret_jax.detect
  gather = lambda tree: jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
  num_images = int(config.eval.num_images)
  num_visualize = int(config.eval.visualize) if workdir else 0
  need_gt = info.coco_gt is None
  results, image_ids, gt_rows, vis_images, vis_dets = [], [], [], [], []
  for batch in batches:
    dets = gather(detect_fn(model, variables, batch['images'], config))
    host = gather({k: batch[k] for k in _META_KEYS + (_GT_KEYS if need_gt else ())})
    # Keep only the first num_images real examples (every process decides the same from the gathered ids).
    valid = host['example_valid'].astype(bool)
    if num_images:
      valid &= np.cumsum(valid) <= num_images - len(image_ids)
    host['example_valid'] = valid
    results += detections_to_coco(dets, host, info.category_ids)
    image_ids += [int(i) for i in host['image_id'][valid]]
    if need_gt:
      gt_rows.append(host)
    if len(vis_images) < num_visualize:
      images = gather(batch['images'])
      for b in np.flatnonzero(valid)[:num_visualize - len(vis_images)]:
        vis_images.append(images[b])
        vis_dets.append({k: v[b] for k, v in dets.items()})
    if num_images and len(image_ids) >= num_images:
      break
  logging.info('Evaluated %d images, %d detections.', len(image_ids), len(results))

  # Every process holds the same gathered results and scores them itself: identical metrics everywhere, and no
  # process sits in a collective for the minute pycocotools takes on COCO val.
  coco_gt = info.coco_gt if not need_gt else coco_gt_from_batches(gt_rows, info.category_ids, info.class_names)
  metrics = coco_metrics(coco_gt, results, image_ids)
  if workdir and jax.process_index() == 0:
    out_dir = eval_dir(workdir, step)
    write_eval(out_dir, results, metrics)
    if vis_images:
      from conret_jax import visualize  # pylint: disable=g-import-not-at-top
      # short_side batches come in up to two padded shapes; the grid takes those of the first image's shape.
      same = [i for i, im in enumerate(vis_images) if im.shape == vis_images[0].shape]
      stacked = {k: np.stack([vis_dets[i][k] for i in same]) for k in vis_dets[0]}
      visualize.save_grid(np.stack([vis_images[i] for i in same]), stacked, info.class_names,
                          os.path.join(out_dir, 'detections.png'), max_images=num_visualize)
  return metrics
