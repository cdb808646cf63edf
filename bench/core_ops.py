"""Benchmark of the detection core: target assignment and NMS post-processing at training/eval sizes.

  python bench/core_ops.py [--batch 16] [--size 1024] [--gt 100] [--classes 80] [--repeats 5]

Times (median of --repeats runs after a compile run; wall and process CPU time) of
  assign:      IoU + matching + targets for the anchors of a size x size input (anchors_from_config of the default
               config: P3-P7, 9 anchors per location) against --gt ground-truth rows per image;
  postprocess: per-level top-k, clipping and class-aware NMS of realistic logits (most anchors background, clusters
               of confident overlapping anchors around a few objects) for --classes classes.
Memory: XLA's compiled.memory_analysis() of each function (arguments, outputs, temporaries) and the process's
peak RSS after each phase. Prints one JSON line.
"""

import argparse
import json
import platform
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from conret_jax.core.boxes import decode, pairwise_iou
from conret_jax.core.nms import postprocess
from conret_jax.core.targets import assign
from conret_jax.defaults import base_config
from conret_jax.model.anchor_spec import AnchorSpec

MB = 2.0**20


def random_gt(rng, batch, rows, size):
  """Boxes of COCO-like sizes (8 px to most of the image), random classes; a few crowd rows marked invalid."""
  side = np.exp(rng.uniform(np.log(8), np.log(size * 0.8), (batch, rows, 2)))
  x0 = rng.uniform(0, size - side)
  boxes = np.concatenate([x0, x0 + side], -1).astype(np.float32)
  classes = rng.integers(0, 80, (batch, rows)).astype(np.int32)
  valid = rng.uniform(size=(batch, rows)) > 0.02
  return boxes, classes, valid


def realistic_logits(rng, anchors, batch, num_classes, size, objects=20):
  """Background logits around -6 (p ~ 0.0025, a few percent above 0.05), and anchors overlapping one of
  `objects` boxes get a logit rising with the IoU for that object's class: clusters of overlapping candidates."""
  logits = rng.normal(-6.0, 1.5, (batch, anchors.shape[0], num_classes)).astype(np.float32)
  obj, obj_cls, _ = random_gt(rng, batch, objects, size)
  iou = np.asarray(jax.jit(jax.vmap(pairwise_iou, (None, 0)))(anchors, obj))  # [B, A, objects]
  best, which = iou.max(-1), iou.argmax(-1)
  cls = np.take_along_axis(obj_cls, which, axis=1)
  hit = best > 0.3
  b_idx, a_idx = np.nonzero(hit)
  logits[b_idx, a_idx, cls[hit]] = 8.0 * best[hit] - 3.0 + rng.normal(0, 0.5, hit.sum())
  return logits


def timed(fn, args, repeats) -> dict:
  """Compiles fn, calls it once (warm-up), then `repeats` times: median and min wall seconds, median process CPU
  seconds (all threads; less sensitive than wall time to other jobs on a shared machine), XLA memory in MB."""
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))  # warm-up
  times, cpu = [], []
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
  mem = compiled.memory_analysis()
  memory = {}
  if mem is not None:
    memory = {k: round(getattr(mem, f'{k}_size_in_bytes') / MB, 1) for k in ('argument', 'output', 'temp')}
  return dict(
    median_s=round(statistics.median(times), 4),
    min_s=round(min(times), 4),
    cpu_median_s=round(statistics.median(cpu), 4),
    xla_memory_mb=memory,
  )


def peak_rss_mb():
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # KiB on Linux


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--size', type=int, default=1024)
  p.add_argument('--gt', type=int, default=100)
  p.add_argument('--classes', type=int, default=80)
  p.add_argument('--repeats', type=int, default=5)
  args = p.parse_args()

  config = base_config()
  hw = (args.size, args.size)
  anchors = AnchorSpec.from_config(config.model).anchors(hw)
  rng = np.random.default_rng(0)
  result = dict(
    bench='core_ops',
    backend=jax.default_backend(),
    device=str(jax.devices()[0].device_kind),
    cpu=platform.processor() or platform.machine(),
    batch=args.batch,
    image=args.size,
    anchors=int(anchors.shape[0]),
    gt_rows=args.gt,
    classes=args.classes,
    repeats=args.repeats,
  )

  boxes, classes, valid = random_gt(rng, args.batch, args.gt, args.size)
  loss_cfg = config.loss

  def assign_fn(gt_boxes, gt_classes, gt_valid):
    return assign(
      anchors,
      gt_boxes,
      gt_classes,
      gt_valid,
      pos_iou=0.5,
      neg_iou=0.4,
      allow_low_quality_matches=loss_cfg.allow_low_quality_matches,
      box_weights=tuple(config.model.box_weights),
    )

  result['assign'] = dict(
    **timed(assign_fn, (jnp.asarray(boxes), jnp.asarray(classes), jnp.asarray(valid)), args.repeats),
    peak_rss_mb=peak_rss_mb(),
  )

  counts = AnchorSpec.from_config(config.model).level_counts(hw)
  logits = jnp.asarray(realistic_logits(rng, np.asarray(anchors), args.batch, args.classes, args.size))
  deltas = rng.normal(0, 0.1, (args.batch, anchors.shape[0], 4)).astype(np.float32)
  decoded = jax.jit(decode)(jnp.asarray(deltas), anchors)
  del deltas
  e = config.eval

  def post_fn(cls_logits, box):
    return postprocess(
      cls_logits,
      box,
      counts,
      hw,
      score_threshold=e.score_threshold,
      topk_per_level=e.topk_per_level,
      nms_iou=e.nms_iou,
      max_detections=e.max_detections,
    )

  timing = timed(post_fn, (logits, decoded), args.repeats)
  out = jax.jit(post_fn)(logits, decoded)
  result['postprocess'] = dict(
    **timing, peak_rss_mb=peak_rss_mb(), mean_detections=float(np.asarray(out['valid']).sum(1).mean())
  )
  print(json.dumps(result))


if __name__ == '__main__':
  main()
