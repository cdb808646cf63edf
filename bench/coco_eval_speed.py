"""Benchmark of COCO scoring (`coco_metrics.score`) with each backend, on a synthetic COCO val-sized evaluation.

  python bench/coco_eval_speed.py [--images 5000] [--classes 80] [--dets 100] [--seed 0]
                                  [--backends faster_coco_eval,pycocotools]

Data (seeded NumPy generator): --images 640x480 images with 1-7 objects each (sides log-uniform 6-400 px, so all
three area ranges; 1% crowd), classes uniform over --classes; --dets detections per image: up to three jittered
copies of each object (its class, higher scores) and random boxes of random classes for the rest, rounded as
`evaluation.detections_to_coco` rounds them (0.01 px, 5-decimal scores, so scores tie).
Times the whole metric part, once per backend: copies, loadRes, evaluate, accumulate and reading the metrics
(wall-clock and this process's CPU time). Checks that the backends give the same summary and per-class metrics and
prints the largest difference. Prints one JSON line.
"""

import argparse
import json
import os
import platform
import time

import numpy as np

from conret_jax import coco_metrics


def synthetic_eval(num_images: int, num_classes: int, dets_per_image: int, seed: int) -> tuple[dict, list[dict]]:
  """(coco_gt, results) as described in the module docstring."""
  rng = np.random.default_rng(seed)
  w, h = 640.0, 480.0
  images, annotations, results = [], [], []
  for image_id in range(1, num_images + 1):
    images.append({'id': image_id, 'height': int(h), 'width': int(w)})
    n = int(rng.integers(1, 8))
    side = np.exp(rng.uniform(np.log(6), np.log(400), (n, 2)))
    gt = np.concatenate([rng.uniform(0, [w, h] - side), side], 1)
    classes = rng.integers(1, num_classes + 1, n)
    for box, cat in zip(gt, classes):
      annotations.append(
        {
          'id': len(annotations) + 1,
          'image_id': image_id,
          'category_id': int(cat),
          'bbox': [float(v) for v in box],
          'area': float(box[2] * box[3]),
          'iscrowd': int(rng.random() < 0.01),
        }
      )
    copies = rng.integers(0, 4, n)
    matched = np.repeat(gt, copies, axis=0)[:dets_per_image]
    matched = matched + rng.normal(0, 0.1, matched.shape) * matched[:, [2, 3, 2, 3]]
    matched_cls = np.repeat(classes, copies)[: len(matched)]
    m = dets_per_image - len(matched)
    side = np.exp(rng.uniform(np.log(6), np.log(400), (m, 2)))
    noise = np.concatenate([rng.uniform(0, [w, h] - side), side], 1)
    boxes = np.concatenate([matched, noise])
    boxes[:, 2:] = np.maximum(boxes[:, 2:], 1.0)
    cats = np.concatenate([matched_cls, rng.integers(1, num_classes + 1, m)])
    scores = np.concatenate([rng.uniform(0.3, 1.0, len(matched)), rng.uniform(0.05, 0.6, m)])
    for box, cat, score in zip(boxes, cats, scores):
      results.append(
        {
          'image_id': image_id,
          'category_id': int(cat),
          'bbox': [round(float(v), 2) for v in box],
          'score': round(float(score), 5),
        }
      )
  categories = [{'id': c, 'name': f'class{c}'} for c in range(1, num_classes + 1)]
  return {'images': images, 'annotations': annotations, 'categories': categories}, results


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', type=int, default=5000)
  parser.add_argument('--classes', type=int, default=80)
  parser.add_argument('--dets', type=int, default=100)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--backends', default=','.join(coco_metrics.BACKENDS))
  args = parser.parse_args()

  coco_gt, results = synthetic_eval(args.images, args.classes, args.dets, args.seed)
  report = {
    'images': args.images,
    'classes': args.classes,
    'gt': len(coco_gt['annotations']),
    'detections': len(results),
    'cpu': _cpu_model(),
    'cpus': os.cpu_count(),
    'load_before': os.getloadavg()[0],
  }
  scores = {}
  for backend in args.backends.split(','):
    wall, cpu = time.perf_counter(), time.process_time()
    scores[backend] = coco_metrics.score(coco_gt, results, backend=backend)
    report[backend] = {
      'wall_s': round(time.perf_counter() - wall, 2),
      'cpu_s': round(time.process_time() - cpu, 2),
      'load_after': os.getloadavg()[0],
    }
  report['summary'] = {b: {k: round(v, 6) for k, v in s.summary.items()} for b, s in scores.items()}
  if len(scores) == 2:
    first, second = scores.values()
    report['max_abs_diff_summary'] = max(abs(first.summary[k] - second.summary[k]) for k in first.summary)
    report['max_abs_diff_per_class'] = max(
      abs(first.per_class[c][k] - second.per_class[c][k]) for c in first.per_class for k in ('AP', 'AP50', 'AP75')
    )
  print(json.dumps(report))


if __name__ == '__main__':
  main()
