"""Table 3 of the paper: the numbers of classification and regression terms, R50-FPN at 500, COCO minival.

  conret-train --config=configs/paper/table3_stages.py:cls=3,reg=2 --workdir=...
  conret-eval  --config=configs/paper/table3_stages.py:cls=2,reg=2,infer=1 --workdir=...   # the "2*" row

(cls, reg) = (1, 1) is the RetinaNet baseline. infer: regressions applied at inference (0 = all trained ones;
Table 3's "2*" trains two and applies one). Stage thresholds: stage 2 0.6/0.5, stage 3 0.7/0.6.
Paper AP / AP50 / AP60 / AP70 / AP80 / AP90 in PAPER below.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import conretinanet_coco  # noqa: E402

from conret_jax import defaults  # noqa: E402

PAPER = {
  (1, 1, 0): (32.5, 50.6, 46.4, 39.5, 28.6, 10.4),
  (2, 1, 0): (33.3, 51.2, 47.4, 40.6, 28.9, 11.2),
  (2, 2, 1): (33.5, 51.3, 47.4, 40.8, 29.8, 11.8),
  (2, 2, 0): (33.7, 51.7, 47.6, 41.0, 30.0, 13.6),
  (3, 2, 0): (33.6, 51.7, 47.7, 41.0, 29.6, 13.4),
}


def get_config(arg=None):
  args = defaults.parse_arg(arg, cls=2, reg=2, infer=0)
  config = conretinanet_coco.get_config('depth=50,scale=500')
  config.consistent.enabled = (args.cls, args.reg) != (1, 1)
  config.consistent.num_cls_terms = args.cls
  config.consistent.num_reg_terms = args.reg
  config.consistent.inference_reg_steps = args.infer
  return config
