"""Numbers that several layers share, in a module with no imports: the box-delta clamp (core.boxes, the config
defaults) and the label vocabulary of matching, targets and the losses.

An anchor's matching verdict (core.matching.MatchResult.labels) and its classification target (core.targets:
cls_labels, read by core.losses) are different arrays with different codes; code reads them through these names.
"""

import math

# Detectron's clamp on dw/dh before exp(), so a wild prediction cannot overflow the decoded box.
BOX_DELTA_CLAMP = math.log(1000.0 / 16)

# Matching verdicts: the best IoU of an anchor at or above pos_iou, below neg_iou, or in between.
MATCH_POSITIVE = 1
MATCH_NEGATIVE = 0
MATCH_IGNORED = -1

# Classification targets: a positive anchor's class index (>= 0), or one of these.
BACKGROUND = -1  # a negative anchor: every class's target is 0
IGNORE = -2  # no classification loss at all
