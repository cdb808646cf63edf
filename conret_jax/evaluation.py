"""COCO box evaluation: detections to COCO results json, the evaluation pass, and its files.

One job (big_vision's evaluators): the trainer and `conret-eval` both call `evaluate`, so a number in a training log
and a number from `conret-eval` on the same checkpoint come from the same code. The scoring itself (summary metrics,
per-class AP, the faster-coco-eval and pycocotools backends) is `conret_jax.coco_metrics`.
"""

import dataclasses
from typing import Iterable, Sequence

import numpy as np
from absl import logging

from conret_jax import coco_metrics as metrics_lib
from conret_jax import eval_files
from conret_jax.eval_files import Record

METRIC_NAMES = metrics_lib.METRIC_NAMES


def run_classes(workdir: str):
  """The classes a run was trained on, as its run.json recorded them (a data.info.ClassLayout), or None for a
  workdir without a training record (e.g. weights evaluated straight from config.init_from)."""
  from conret_jax import run_record
  from conret_jax.data.info import ClassLayout

  classes = (run_record.load_run(workdir) or {}).get('classes')
  if not classes:
    return None
  return ClassLayout(
    classes['layout'], int(classes['num_classes']), tuple(classes['category_ids']), tuple(classes['names'])
  )


def detections_to_coco(dets: dict, batch: dict, category_of: Sequence[int]) -> list[dict]:
  """Turns one batch of detections into COCO result dicts in ORIGINAL image coordinates.

  Args:
    dets: numpy dict: boxes [B, D, 4] float x1y1x2y2 in model-input pixels, scores [B, D], classes [B, D] int
      model class index, valid [B, D] bool.
    batch: numpy dict with image_id [B], scale [B, 2] (sy, sx: resized / original), orig_hw [B, 2] (height, width),
      example_valid [B] bool (False for padding examples).
    category_of: [K] the dataset's category id of each model class, -1 for a class that is none of them
      (`data.info.ClassLayout.category_of`; for the contiguous layout simply the sorted category ids).
  Returns:
    [{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}]: padded examples, invalid detections and
    detections of classes that are not dataset categories (torchvision's background 0, unused COCO ids) dropped.
  """
  scores = np.asarray(dets['scores'], np.float64)
  classes = np.asarray(dets['classes'])
  cat_ids = np.asarray(category_of, np.int64)
  keep = np.asarray(dets['valid'], bool) & np.asarray(batch['example_valid'], bool)[:, None] & (cat_ids[classes] >= 0)
  boxes = to_image_coords(dets['boxes'], batch['scale'], batch['orig_hw'])
  xywh = np.concatenate([boxes[..., :2], boxes[..., 2:] - boxes[..., :2]], axis=-1)
  image_ids = np.asarray(batch['image_id'])
  results = []
  for b, d in zip(*np.nonzero(keep)):
    results.append(
      {
        'image_id': int(image_ids[b]),
        'category_id': int(cat_ids[classes[b, d]]),
        'bbox': [round(float(v), 2) for v in xywh[b, d]],  # 0.01 px: far below any IoU that matters
        'score': round(float(scores[b, d]), 5),
      }
    )
  return results


def to_image_coords(boxes, scale, image_hw) -> np.ndarray:
  """Boxes in model-input pixels -> the original image's pixels: x / sx and y / sy, clipped to the image.

  boxes [..., N, 4] x1y1x2y2; scale [..., 2] (sy, sx), Batch.scale's layout; image_hw [..., 2] (h, w). Returns
  float64 [..., N, 4]."""
  boxes = np.asarray(boxes, np.float64)
  scale = np.asarray(scale, np.float64)
  hw = np.asarray(image_hw, np.float64)
  if scale.shape != hw.shape:  # a [B] scale of one factor per image would be read as pairs without complaint
    raise ValueError(f'scale {scale.shape} must be (sy, sx) per image, the shape of image_hw {hw.shape}')
  sy, sx = scale[..., 0], scale[..., 1]
  factor = np.stack([sx, sy, sx, sy], axis=-1)[..., None, :]
  limits = np.stack([hw[..., 1], hw[..., 0], hw[..., 1], hw[..., 0]], axis=-1)[..., None, :]
  return np.clip(boxes / factor, 0.0, limits)


def coco_metrics(
  coco_gt: dict, results: list[dict], image_ids: Iterable[int] | None = None, backend: str = 'auto'
) -> dict[str, float]:
  """The summary metrics of `coco_metrics.score`: {name: float} for METRIC_NAMES, -1 where undefined."""
  return metrics_lib.score(coco_gt, results, image_ids, backend).summary


def coco_gt_from_batches(gt_rows: list[dict], classes) -> dict:
  """Builds a COCO gt dict from the batches' own annotations, for sources that carry no instances json.

  Args:
    gt_rows: host batches holding boxes [B, M, 4] (model-input pixels), classes [B, M] (indices of `classes`),
      valid [B, M], crowd [B, M], image_id [B], scale [B, 2] (sy, sx), orig_hw [B, 2], example_valid [B].
    classes: the evaluation's `data.info.EvalClasses`.
  Areas are box areas (COCO's are mask areas), so APs/APm/APl can differ slightly from an official evaluation.
  """
  category_of = classes.category_of
  images, annotations = [], []
  for rows in gt_rows:
    for b in np.flatnonzero(np.asarray(rows['example_valid'], bool)):
      h, w = (int(v) for v in rows['orig_hw'][b])
      image_id = int(rows['image_id'][b])
      images.append({'id': image_id, 'height': h, 'width': w})
      boxes = to_image_coords(rows['boxes'][b], rows['scale'][b], (h, w))
      for m in np.flatnonzero(np.asarray(rows['valid'][b], bool)):
        x1, y1, x2, y2 = (float(v) for v in boxes[m])
        annotations.append(
          {
            'id': len(annotations) + 1,
            'image_id': image_id,
            'category_id': int(category_of[int(rows['classes'][b, m])]),
            'bbox': [x1, y1, x2 - x1, y2 - y1],
            'area': (x2 - x1) * (y2 - y1),
            'iscrowd': int(bool(rows['crowd'][b, m])),
          }
        )
  categories = [{'id': int(c), 'name': n} for c, n in zip(category_of, classes.names) if c >= 0]
  return {'images': images, 'annotations': annotations, 'categories': categories}


_META_KEYS = ('image_id', 'scale', 'orig_hw', 'example_valid')
_GT_KEYS = ('boxes', 'classes', 'valid', 'crowd')


class _Collected:
  """What one pass over the eval batches keeps: COCO results, the images covered, the ground truth rows (for sources
  without a COCO json) and the first images for the picture."""

  def __init__(self, num_images: int, num_pictured: int, keep_gt: bool):
    self.num_images, self.num_pictured, self.keep_gt = num_images, num_pictured, keep_gt
    self.results, self.image_ids, self.gt_rows, self.pictured = [], [], [], []

  @property
  def done(self) -> bool:
    return bool(self.num_images) and len(self.image_ids) >= self.num_images

  def add(self, dets: dict, host: dict, names, pictured) -> None:
    """One gathered batch: detections `dets`, metadata (and ground truth, classes already in `names`' indices)
    `host`; `pictured()` gathers images. `names`: the evaluation's data.info.EvalClasses."""
    # Keep only the first num_images real examples (every process decides the same from the gathered ids).
    valid = host['example_valid'].astype(bool)
    if self.num_images:
      valid &= np.cumsum(valid) <= self.num_images - len(self.image_ids)
    host['example_valid'] = valid
    self.results += detections_to_coco(dets, host, names.category_of)
    self.image_ids += [int(i) for i in host['image_id'][valid]]
    if self.keep_gt:
      self.gt_rows.append(host)
    if len(self.pictured) < self.num_pictured:
      rows = pictured()
      rows['classes'] = names.gt_classes(rows['classes'])
      for b in np.flatnonzero(valid)[: self.num_pictured - len(self.pictured)]:
        self.pictured.append((rows['images'][b], {k: v[b] for k, v in dets.items()}, {k: rows[k][b] for k in _GT_KEYS}))


@dataclasses.dataclass(frozen=True)
class EvalData:
  """The eval split of one pass: `batches` (global batches, the same on every process) and `info` (its
  data.DatasetInfo) when given, else the eval iterator over the mesh and the eval source's info, opened through
  `cache` (a data.SourceCache; the trainer passes its own)."""

  batches: Iterable | None = None
  info: object = None
  cache: object = None

  def resolve(self, config, mesh):
    """(batches, info)."""
    batches, info = self.batches, self.info
    if batches is None or info is None:
      from conret_jax import data as data_lib

      info = info or data_lib.dataset_info(config.data.eval, config, train=False, cache=self.cache)
      if batches is None:
        from conret_jax import mesh as mesh_lib

        batches = data_lib.make_eval_iterator(config, mesh, mesh_lib.batch_sharding(mesh), cache=self.cache)
    return batches, info


def evaluate(
  model, variables, config, mesh=None, *, classes=None, record: Record | None = None, data=EvalData(), detect_fn=None
) -> dict[str, float]:
  """Runs detection over the eval set, gathers across processes, scores it (`coco_metrics.score`), writes files.

  Args:
    model, variables: the detector and its flax variables (e.g. `state.variables()`).
    config: the full config (config.data.eval: the source; config.eval: post-processing, num_images, visualize,
      coco_backend).
    mesh: the device mesh; the eval batches are sharded over all its devices.
    classes: the run's classes (data.info.ClassLayout, as training recorded them); None: the eval set's own
      (weights without a training record). Detections are named by these, never by the eval set's order.
    record: if set, process 0 writes record.directory/{detections.json, metrics.json (with per-class AP),
      detections.png, settings.json for an override}.
    data: the eval split (EvalData); without a COCO json, the ground truth is rebuilt from the batches (box areas
      stand in for mask areas).
    detect_fn: (model, variables, images, config, image_sizes=) -> detections dict; default `conret_jax.detect`.
  Returns:
    {name: float} for METRIC_NAMES, identical on every process (-1 where undefined, e.g. with no image at all).
  """
  import jax

  from conret_jax.data.info import ClassLayout, EvalClasses

  batches, info = data.resolve(config, mesh)
  names = EvalClasses.of(classes or ClassLayout.of(info, config), info, config)
  for line in names.report():
    logging.warning('%s', line)
  collected = _collect(
    model,
    variables,
    config,
    batches,
    names,
    detect_fn,
    keep_gt=info.coco_gt is None,
    num_pictured=int(config.eval.visualize) if record else 0,
  )
  logging.info('Evaluated %d images, %d detections.', len(collected.image_ids), len(collected.results))
  # Every process holds the same gathered results and scores them itself: identical metrics everywhere, and no
  # process sits in a collective while COCO val is scored (seconds with faster-coco-eval, a minute with pycocotools).
  coco_gt = info.coco_gt if not collected.keep_gt else coco_gt_from_batches(collected.gt_rows, names)
  scores = metrics_lib.score(coco_gt, collected.results, collected.image_ids, backend=config.eval.coco_backend)
  if record and jax.process_index() == 0:
    eval_files.write_record(record, collected, scores, names.names, config)
  return scores.summary


def _collect(model, variables, config, batches, names, detect_fn, *, keep_gt: bool, num_pictured: int):
  """The pass itself: detections of every batch, gathered from every process, until eval.num_images."""
  import jax
  from jax.experimental import multihost_utils

  if detect_fn is None:
    import conret_jax

    detect_fn = conret_jax.detect
  gather = lambda tree: jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
  collected = _Collected(int(config.eval.num_images), num_pictured, keep_gt=keep_gt)
  for batch in batches:
    sizes = batch['input_hw'] if 'input_hw' in batch else None
    dets = gather(detect_fn(model, variables, batch['images'], config, image_sizes=sizes))
    host = gather({k: batch[k] for k in _META_KEYS + (_GT_KEYS if keep_gt else ())})
    if keep_gt:
      host['classes'] = names.gt_classes(host['classes'])
    pictured = lambda b=batch: gather({k: b[k] for k in ('images',) + _GT_KEYS})
    collected.add(dets, host, names, pictured)
    if collected.done:
      break
  return collected
