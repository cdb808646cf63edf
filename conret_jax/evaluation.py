"""COCO box evaluation: detections to COCO results json, the evaluation pass, and its files.

One job (big_vision's evaluators): the trainer and `conret-eval` both call `evaluate`, so a number in a training log
and a number from `conret-eval` on the same checkpoint come from the same code. The scoring itself (summary metrics,
per-class AP, the faster-coco-eval and pycocotools backends) is `conret_jax.coco_metrics`.
"""

import json
import os
from typing import Iterable, Sequence

import numpy as np
from absl import logging

from conret_jax import coco_metrics as metrics_lib

METRIC_NAMES = metrics_lib.METRIC_NAMES


def detections_to_coco(dets: dict, batch: dict, category_of: Sequence[int]) -> list[dict]:
  """Turns one batch of detections into COCO result dicts in ORIGINAL image coordinates.

  Args:
    dets: numpy dict: boxes [B, D, 4] float x1y1x2y2 in model-input pixels, scores [B, D], classes [B, D] int
      model class index, valid [B, D] bool.
    batch: numpy dict with image_id [B], scale [B] (resized / original), orig_hw [B, 2] (height, width),
      example_valid [B] bool (False for padding examples).
    category_of: [K] the dataset's category id of each model class, -1 for a class that is none of them
      (`data.info.ClassLayout.category_of`; for the contiguous layout simply the sorted category ids).
  Returns:
    [{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}]: padded examples, invalid detections and
    detections of classes that are not dataset categories (torchvision's background 0, unused COCO ids) dropped.
  """
  boxes = np.asarray(dets['boxes'], np.float64)
  scores = np.asarray(dets['scores'], np.float64)
  classes = np.asarray(dets['classes'])
  cat_ids = np.asarray(category_of, np.int64)
  keep = np.asarray(dets['valid'], bool) & np.asarray(batch['example_valid'], bool)[:, None] & (cat_ids[classes] >= 0)
  scale = np.asarray(batch['scale'], np.float64)
  orig_hw = np.asarray(batch['orig_hw'], np.float64)
  # Back to original pixels, clipped to the original image (padding lies outside it).
  boxes = boxes / scale[:, None, None]
  limits = np.stack([orig_hw[:, 1], orig_hw[:, 0], orig_hw[:, 1], orig_hw[:, 0]], axis=-1)[:, None, :]
  boxes = np.clip(boxes, 0.0, limits)
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


def coco_metrics(
  coco_gt: dict, results: list[dict], image_ids: Iterable[int] | None = None, backend: str = 'auto'
) -> dict[str, float]:
  """The summary metrics of `coco_metrics.score`: {name: float} for METRIC_NAMES, -1 where undefined."""
  return metrics_lib.score(coco_gt, results, image_ids, backend).summary


def format_metrics(metrics: dict, per_class: dict | None = None, *, title: str = '') -> str:
  """The console table of an evaluation, AP in percent (COCO's usual presentation; the json files keep fractions):
  the summary metrics in one row, then one row per class if `per_class` is given (-1, undefined, shows as '-')."""
  pct = lambda v, width: f'{100 * v:>{width}.1f}' if v >= 0 else f'{"-":>{width}}'
  names = [n for n in METRIC_NAMES if n in metrics]
  lines = [
    f'{title} (AP in percent)' if title else '(AP in percent)',
    ' '.join(f'{n:>6}' for n in names),
    ' '.join(pct(metrics[n], 6) for n in names),
  ]
  if per_class:
    width = max(8, *(len(n) for n in per_class))
    lines += ['', f'{"class":<{width}} {"id":>5} {"AP":>6} {"AP50":>6} {"AP75":>6}']
    for name, row in per_class.items():
      lines.append(
        f'{name:<{width}} {row["category_id"]:>5} ' + ' '.join(pct(row[k], 6) for k in ('AP', 'AP50', 'AP75'))
      )
  return '\n'.join(lines)


def read_per_class(workdir: str, step: int) -> dict | None:
  """The per-class AP that `evaluate` wrote to DIR/eval/step_N/metrics.json, or None if there is none."""
  path = os.path.join(eval_dir(workdir, step), 'metrics.json')
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f).get('per_class')


def eval_dir(workdir: str, step: int) -> str:
  """DIR/eval/step_N: where one evaluation's files go."""
  return os.path.join(workdir, 'eval', f'step_{int(step)}')


def write_eval(out_dir: str, results: list[dict], metrics: dict, per_class: dict | None = None) -> None:
  """Writes OUT_DIR/detections.json (COCO results format) and OUT_DIR/metrics.json.

  metrics.json: {name: float} for the summary metrics and, if per_class is given,
  "per_class": {category name: {"category_id": int, "AP": float, "AP50": float, "AP75": float}} (-1.0: undefined).
  """
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'detections.json'), 'w') as f:
    json.dump(results, f)
  content = {k: float(v) for k, v in metrics.items()}
  if per_class is not None:
    content['per_class'] = per_class
  with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
    json.dump(content, f, indent=2, sort_keys=True)


def coco_gt_from_batches(gt_rows: list[dict], layout) -> dict:
  """Builds a COCO gt dict from the batches' own annotations, for sources that carry no instances json.

  Args:
    gt_rows: host batches holding boxes [B, M, 4] (model-input pixels), classes [B, M] (model classes), valid
      [B, M], crowd [B, M], image_id [B], scale [B], orig_hw [B, 2], example_valid [B].
    layout: the model's `data.info.ClassLayout` over the dataset.
  Areas are box areas (COCO's are mask areas), so APs/APm/APl can differ slightly from an official evaluation.
  """
  category_of = layout.category_of
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
  categories = [{'id': c, 'name': n} for c, n in zip(layout.category_ids, layout.names)]
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

  def add(self, dets: dict, host: dict, category_of, pictured) -> None:
    """One gathered batch: detections `dets`, metadata (and ground truth) `host`; `pictured()` gathers images."""
    # Keep only the first num_images real examples (every process decides the same from the gathered ids).
    valid = host['example_valid'].astype(bool)
    if self.num_images:
      valid &= np.cumsum(valid) <= self.num_images - len(self.image_ids)
    host['example_valid'] = valid
    self.results += detections_to_coco(dets, host, category_of)
    self.image_ids += [int(i) for i in host['image_id'][valid]]
    if self.keep_gt:
      self.gt_rows.append(host)
    if len(self.pictured) < self.num_pictured:
      rows = pictured()
      for b in np.flatnonzero(valid)[: self.num_pictured - len(self.pictured)]:
        self.pictured.append((rows['images'][b], {k: v[b] for k, v in dets.items()}, {k: rows[k][b] for k in _GT_KEYS}))


def _save_picture(collected: _Collected, class_names, path: str, *, threshold: float, title: str) -> None:
  """detections.png: the pictured images, ground truth beside detections. short_side batches come in up to two
  padded shapes; the grid takes those of the first image's shape."""
  from conret_jax import visualize

  rows = [r for r in collected.pictured if r[0].shape == collected.pictured[0][0].shape]
  stack = lambda i: {k: np.stack([r[i][k] for r in rows]) for k in rows[0][i]}
  visualize.save_grid(
    np.stack([r[0] for r in rows]),
    stack(1),
    class_names,
    path,
    max_images=len(rows),
    score_threshold=threshold,
    ground_truth=stack(2),
    title=title,
  )


def eval_inputs(config, mesh, *, batches: Iterable | None = None, info=None, cache=None):
  """(batches, info) of a pass over the eval split: those given, else `data.make_eval_iterator` on `mesh` (batches
  sharded over all its devices) and `data.dataset_info(config.data.eval, config)`."""
  if batches is None or info is None:
    from conret_jax import data as data_lib

    info = info or data_lib.dataset_info(config.data.eval, config, train=False, cache=cache)
    if batches is None:
      from conret_jax import mesh as mesh_lib

      batches = data_lib.make_eval_iterator(config, mesh, mesh_lib.batch_sharding(mesh), cache=cache)
  return batches, info


def evaluate(
  model,
  variables,
  config,
  mesh=None,
  *,
  workdir: str | None = None,
  step: int = 0,
  batches: Iterable | None = None,
  info=None,
  detect_fn=None,
  cache=None,
) -> dict[str, float]:
  """Runs detection over the eval set, gathers across processes, scores it (`coco_metrics.score`), writes files.

  Args:
    model, variables: the detector and its flax variables (e.g. `state.variables()`).
    config: the full config (config.data.eval: the source; config.eval: post-processing, num_images, visualize,
      coco_backend).
    mesh: the device mesh; the eval batches are sharded over all its devices.
    workdir: if set, process 0 writes DIR/eval/step_N/{detections.json, metrics.json, detections.png};
      metrics.json also holds per-class AP (`write_eval`).
    batches: global eval batches (conret_jax.batch.Batch, or mappings of its fields); default
      `data.make_eval_iterator(config, mesh, ...)`. Every process must iterate the same batches.
    info: `data.DatasetInfo` of the eval source; default `data.dataset_info(config.data.eval, config)`.
      Without coco_gt, the ground truth is rebuilt from the batches (box areas stand in for mask areas).
    detect_fn: (model, variables, images, config) -> detections dict; default `conret_jax.detect`.
    cache: a data.SourceCache to open the eval source through (the trainer passes its own).
  Returns:
    {name: float} for METRIC_NAMES, identical on every process.
  """
  import jax
  from jax.experimental import multihost_utils

  from conret_jax.data.info import ClassLayout

  batches, info = eval_inputs(config, mesh, batches=batches, info=info, cache=cache)
  if detect_fn is None:
    import conret_jax

    detect_fn = conret_jax.detect
  gather = lambda tree: jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
  layout = ClassLayout.of(info, config)
  collected = _Collected(
    int(config.eval.num_images), int(config.eval.visualize) if workdir else 0, keep_gt=info.coco_gt is None
  )
  for batch in batches:
    dets = gather(detect_fn(model, variables, batch['images'], config))
    host = gather({k: batch[k] for k in _META_KEYS + (_GT_KEYS if collected.keep_gt else ())})
    collected.add(dets, host, layout.category_of, lambda b=batch: gather({k: b[k] for k in ('images',) + _GT_KEYS}))
    if collected.done:
      break
  logging.info('Evaluated %d images, %d detections.', len(collected.image_ids), len(collected.results))

  # Every process holds the same gathered results and scores them itself: identical metrics everywhere, and no
  # process sits in a collective while COCO val is scored (seconds with faster-coco-eval, a minute with pycocotools).
  coco_gt = info.coco_gt if not collected.keep_gt else coco_gt_from_batches(collected.gt_rows, layout)
  scores = metrics_lib.score(coco_gt, collected.results, collected.image_ids, backend=config.eval.coco_backend)
  if workdir and jax.process_index() == 0:
    out_dir = eval_dir(workdir, step)
    write_eval(out_dir, collected.results, scores.summary, scores.per_class)
    if collected.pictured:
      threshold = float(config.eval.visualize_score_threshold)
      _save_picture(
        collected,
        layout.class_names,
        os.path.join(out_dir, 'detections.png'),
        threshold=threshold,
        title=f'{workdir}, step {step}: ground truth | detections scoring >= {threshold:.2f}',
      )
  return scores.summary
