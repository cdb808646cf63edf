"""Post-processing against the forward it follows: R50-FPN of configs/retinanet_torchvision.py, square input.

  python bench/postprocess_share.py [--config configs/retinanet_torchvision.py] [--size 640] [--batch 4]
      [--repeats 3] [--post_repeats 10]

The config gives the network, anchors, classes and eval settings; the input is --size x --size (not the config's
800 short side).
Times, each with bench/core_ops.timed (median of the repeats after a compile and a warm-up call; wall time and
process CPU time, all threads):
  forward:          jitted model.apply(variables, images, train=False), float32, freshly initialised weights;
  postprocess:      core.nms.postprocess (per level: top-k anchors by best score, then top-k over their pairs),
                    clipping and class-aware NMS;
  postprocess_flat: the same with the previous selection, one top-k over all anchors x classes of each level (the
                    frozen copy tests/core/core_reference.flat_topk_postprocess): the "before";
  select, select_flat: the candidate selection alone (core.nms.select_candidates, and the previous one).
A freshly initialised model scores every anchor near its prior (0.01, below the 0.05 threshold), which would leave
NMS nothing to do, so the post-processing runs on bench/core_ops.realistic_logits (background around -6,
clusters of confident anchors around 20 objects per image) for the config's 91 classes and boxes decoded from small
random offsets, with the config's eval settings (score > 0.05, top 1000 per level, NMS 0.5, 300 detections). The
two post-processings are checked to give identical outputs. Prints one JSON line.
"""

import argparse
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

from conret_jax.cli.import_weights import load_config
from conret_jax.core.boxes import decode
from conret_jax.core.nms import postprocess, select_candidates
from conret_jax.detectors import build_model, init_variables
from conret_jax.model.anchor_spec import AnchorSpec

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, 'tests', 'core'))
from core_ops import peak_rss_mb, realistic_logits, timed  # noqa: E402 (bench/, the script's folder)
from core_reference import flat_topk_candidates, flat_topk_postprocess  # noqa: E402


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', default=os.path.join(_ROOT, 'configs', 'retinanet_torchvision.py'))
  p.add_argument('--size', type=int, default=640)
  p.add_argument('--batch', type=int, default=4)
  p.add_argument('--repeats', type=int, default=3, help='timed forward calls')
  p.add_argument('--post_repeats', type=int, default=10, help='timed calls of each post-processing')
  args = p.parse_args()

  config = load_config(args.config)
  hw = (args.size, args.size)
  anchors = AnchorSpec.from_config(config.model).anchors(hw)
  counts = AnchorSpec.from_config(config.model).level_counts(hw)
  num_classes = config.model.num_classes
  result = dict(
    bench='postprocess_share',
    config=os.path.relpath(args.config, _ROOT),
    backend=jax.default_backend(),
    jax=jax.__version__,
    cpu=cpu_model(),
    cpu_count=os.cpu_count(),
    load_avg_start=[round(x, 2) for x in os.getloadavg()],
    batch=args.batch,
    image=args.size,
    anchors=int(anchors.shape[0]),
    level_anchors=list(counts),
    classes=num_classes,
    repeats=args.repeats,
    post_repeats=args.post_repeats,
  )

  model = build_model(config)
  variables = init_variables(model, jax.random.PRNGKey(0), hw, args.batch)
  images = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (args.batch, *hw, 3)).astype(np.float32))
  forward = lambda v, x: model.apply(v, x, train=False)
  result['forward'] = timed(forward, (variables, images), args.repeats)
  del variables, images
  result['peak_rss_mb_forward'] = peak_rss_mb()

  rng = np.random.default_rng(0)
  logits = jnp.asarray(realistic_logits(rng, np.asarray(anchors), args.batch, num_classes, args.size))
  deltas = rng.normal(0, 0.1, (args.batch, anchors.shape[0], 4)).astype(np.float32)
  boxes = jax.jit(decode)(jnp.asarray(deltas), anchors)
  e = config.eval
  settings = dict(
    score_threshold=e.score_threshold,
    topk_per_level=e.topk_per_level,
    nms_iou=e.nms_iou,
    max_detections=e.max_detections,
  )
  new = lambda lg, b: postprocess(lg, b, counts, hw, **settings)
  flat = lambda lg, b: flat_topk_postprocess(lg, b, counts, hw, **settings)
  result['postprocess'] = timed(new, (logits, boxes), args.post_repeats)
  result['postprocess_flat'] = timed(flat, (logits, boxes), args.post_repeats)
  for key, select in (('select', select_candidates), ('select_flat', flat_topk_candidates)):
    result[key] = timed(
      lambda lg, s=select: s(lg, counts, e.topk_per_level, e.score_threshold), (logits,), args.post_repeats
    )

  got, want = jax.jit(new)(logits, boxes), jax.jit(flat)(logits, boxes)
  result['identical_outputs'] = all(np.array_equal(np.asarray(got[k]), np.asarray(want[k])) for k in want)
  result['mean_detections'] = float(np.asarray(got['valid']).sum(1).mean())
  for key in ('postprocess', 'postprocess_flat'):
    result[f'{key}_over_forward'] = dict(
      wall=round(result[key]['median_s'] / result['forward']['median_s'], 4),
      cpu=round(result[key]['cpu_median_s'] / result['forward']['cpu_median_s'], 4),
    )
  result['load_avg_end'] = [round(x, 2) for x in os.getloadavg()]
  result['peak_rss_mb'] = peak_rss_mb()
  print(json.dumps(result))


if __name__ == '__main__':
  main()
