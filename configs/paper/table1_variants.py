"""Table 1 of the paper: the design choices of Figure 4, R50-FPN at short side 500, COCO minival.

  conret-train --config=configs/paper/table1_variants.py:variant=cascade --workdir=...

variant: 'baseline' (RetinaNet, Fig. 4a), 'cascade' (Fig. 4b: sibling towers for the refined stage),
'gated_cascade' (Fig. 4c: the refined towers also take the previous stage's tower features), 'consistent'
(Fig. 4d: shared towers and classifier, one extra box conv). Paper AP / AP50 / AP75 in PAPER below.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import conretinanet_coco  # noqa: E402  (configs/ is not a package; big_vision-style sibling import)

from conret_jax import defaults  # noqa: E402

PAPER = {
  'baseline': (32.5, 50.9, 34.8),
  'cascade': (33.4, 51.3, 36.0),
  'gated_cascade': (33.6, 51.5, 36.3),
  'consistent': (33.7, 51.7, 36.2),
}


def get_config(arg=None):
  args = defaults.parse_arg(arg, variant='consistent')
  if args.variant not in PAPER:
    raise ValueError(f'variant={args.variant!r}: expected one of {sorted(PAPER)}')
  config = conretinanet_coco.get_config('depth=50,scale=500')
  if args.variant == 'baseline':
    config.consistent.enabled = False
  else:
    config.model.head.variant = args.variant
  return config
