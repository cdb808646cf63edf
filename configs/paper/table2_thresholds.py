"""Table 2 of the paper: the IoU thresholds of the refined stage, R50-FPN at short side 500, COCO minival.

  conret-train --config=configs/paper/table2_thresholds.py:pos=0.7,neg=0.6 --workdir=...

Paper AP / AP50 / AP60 / AP70 / AP80 / AP90 for (mu_pos, mu_neg) in PAPER below; (0.6, 0.5) is the default.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import conretinanet_coco  # noqa: E402

from conret_jax import defaults  # noqa: E402

PAPER = {
  (0.5, 0.5): (33.5, 51.7, 47.5, 40.7, 29.4, 11.2),
  (0.6, 0.5): (33.7, 51.7, 47.6, 41.0, 30.0, 13.6),
  (0.7, 0.6): (33.6, 51.4, 47.6, 40.9, 30.2, 14.0),
}


def get_config(arg=None):
  args = defaults.parse_arg(arg, pos=0.6, neg=0.5)
  config = conretinanet_coco.get_config('depth=50,scale=500')
  pos, neg = list(config.consistent.pos_iou_thresholds), list(config.consistent.neg_iou_thresholds)
  pos[1], neg[1] = args.pos, args.neg
  config.consistent.pos_iou_thresholds = tuple(pos)
  config.consistent.neg_iou_thresholds = tuple(neg)
  return config
