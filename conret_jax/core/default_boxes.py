"""SSD's default boxes (Liu et al. 2016, Section 2.2 "Choosing scales and aspect ratios") for a static input size.

Level k (one per source feature map) has a scale s_k, a fraction of the image side; `scales` holds one more entry
than there are levels, s_0 .. s_m, because each level also has an extra square box of scale sqrt(s_k * s_{k+1}).
The boxes of one location, in this order (torchvision's DefaultBoxGenerator and Caffe SSD's PriorBox agree on it):
  (s_k, s_k), (s'_k, s'_k) with s'_k = sqrt(s_k * s_{k+1}),
  then per aspect ratio a of the level: (s_k * sqrt(a), s_k / sqrt(a)) wide, then (s_k / sqrt(a), s_k * sqrt(a)) tall,
as (width, height) fractions of the image, so 2 + 2 * len(ratios) boxes per location.
The centre of cell (y, x) is ((x + 0.5) / (W / step), (y + 0.5) / (H / step)), i.e. (x + 0.5) * step pixels.

Flattened order: level, row y, column x, box in location. A head whose per-level output [B, H, W, n * C] is reshaped
to [B, H * W * n, C] and concatenated over levels lines up with these boxes.

Clipping (`clip=True`, torchvision's and the default) clamps the relative width and height to [0, 1] before the
conversion to corners: it caps a box's size at the image's, and corners can still lie outside the image (a box
centred near the border is not cut). Caffe SSD's PriorBox `clip: true` would clamp the corners instead (its
SSD300/512 scripts set clip false); that variant is not offered.

Parity with torchvision's `ssd300_vgg16` (DefaultBoxGenerator(aspect_ratios, scales, steps), boxes in x1y1x2y2
pixels, which its SSD matches ground truth against and decodes predictions from): `SSD300` below gives the same
boxes in the same order, computed with the same float32 operations. One difference for non-square inputs only:
torchvision divides the x centres by H / step and the y centres by W / step; here x goes with W and y with H.

Scales (`ssd_scales`) follow Caffe SSD's scripts (examples/ssd/ssd_*.py), which turn the paper's linear rule
s_k = s_min + (s_max - s_min)(k - 1)/(m - 1) into integer percents: ratios from min_ratio to max_ratio in steps of
floor((max_ratio - min_ratio) / (num_levels - 2)), a smaller first level (conv4_3) in front, and s_{m} one step past
max_ratio. SSD300 on COCO: min 15, max 90, first 7 -> torchvision's [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05].
SSD512 on COCO: the SSD paper's Section 3.4 footnote ("For SSD512 model, we add extra conv12_2 for prediction, set
s_min to 0.1, and 0.04 on conv4_3"), with s_max 0.9: min 10, max 90, first 4 -> [0.04, 0.10, 0.26, 0.42, 0.58,
0.74, 0.90, 1.06], i.e. 20.48, 51.2, 133.12, ... pixels at 512 (the released COCO SSD512's prior sizes). Caffe's
ssd_pascal_512.py (VOC) uses min 15, max 90, first 7 instead.

Everything is NumPy at trace time; the result enters jitted code as a constant.
"""

import dataclasses
import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


def ssd_scales(num_levels: int, min_ratio: int, max_ratio: int, first_ratio: int) -> tuple[float, ...]:
  """The num_levels + 1 scales s_0 .. s_m (fractions of the image side) of Caffe SSD's rule; ratios in percent.

  The first level gets first_ratio, levels 1 .. m-1 min_ratio, min_ratio + step, ... (step =
  floor((max_ratio - min_ratio) / (num_levels - 2))), and the extra last entry is one step past the last level.
  """
  if num_levels < 3:
    raise ValueError(f'the rule needs at least 3 levels, got {num_levels}')
  step = (max_ratio - min_ratio) // (num_levels - 2)
  ratios = [first_ratio] + [min_ratio + i * step for i in range(num_levels)]
  return tuple(r / 100 for r in ratios)


def boxes_per_location(aspect_ratios: Sequence[float]) -> int:
  """Boxes of one location of a level with these aspect ratios: two squares, and a wide and a tall box per ratio."""
  return 2 + 2 * len(aspect_ratios)


def _hw(size) -> tuple[int, int]:
  return (int(size), int(size)) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))


def level_counts(feature_sizes: Sequence, aspect_ratios: Sequence[Sequence[float]]) -> tuple[int, ...]:
  """Static number of boxes of each level (h * w * boxes per location), in level order.

  feature_sizes: per level, a side (square map) or (h, w).
  """
  return tuple(_hw(f)[0] * _hw(f)[1] * boxes_per_location(r) for f, r in zip(feature_sizes, aspect_ratios, strict=True))


def _level_wh(scales: Sequence[float], k: int, ratios: Sequence[float], clip: bool) -> np.ndarray:
  """[n, 2] float32 (width, height) fractions of the image, in the module docstring's order."""
  s, s_next = scales[k], scales[k + 1]
  pairs = [(s, s), (math.sqrt(s * s_next),) * 2]
  for a in ratios:
    pairs += [(s * math.sqrt(a), s / math.sqrt(a)), (s / math.sqrt(a), s * math.sqrt(a))]
  wh = np.asarray(pairs, np.float32)  # Python doubles rounded once to float32, as torchvision's tensor
  return np.clip(wh, 0.0, 1.0) if clip else wh


def default_boxes_np(
  image_size,
  feature_sizes: Sequence,
  steps: Sequence[float],
  scales: Sequence[float],
  aspect_ratios: Sequence[Sequence[float]],
  clip: bool = True,
) -> np.ndarray:
  """`generate_default_boxes` as a NumPy array (for callers outside jit)."""
  n = len(feature_sizes)
  if not len(steps) == len(aspect_ratios) == n or len(scales) != n + 1:
    raise ValueError(
      f'{n} levels need {n} steps, {n} aspect-ratio lists and {n + 1} scales; got {len(steps)}, '
      f'{len(aspect_ratios)} and {len(scales)}'
    )
  img_h, img_w = _hw(image_size)
  half = np.float32(0.5)
  out = []
  for k, (fsize, step, ratios) in enumerate(zip(feature_sizes, steps, aspect_ratios)):
    fh, fw = _hw(fsize)
    # float32 centres as torchvision computes them: (i + 0.5) / (cells per image side at this step).
    cx = (np.arange(fw, dtype=np.float32) + half) / np.float32(img_w / step)
    cy = (np.arange(fh, dtype=np.float32) + half) / np.float32(img_h / step)
    cy, cx = np.meshgrid(cy, cx, indexing='ij')  # [fh, fw]: row y, then column x
    centres = np.stack([cx, cy], axis=-1).reshape(-1, 1, 2)
    wh = _level_wh(scales, k, ratios, clip)[None]  # [1, n, 2]
    boxes = np.concatenate([centres - half * wh, centres + half * wh], axis=-1)  # [fh * fw, n, 4] relative
    out.append(boxes.reshape(-1, 4) * np.asarray([img_w, img_h, img_w, img_h], np.float32))
  return np.concatenate(out, axis=0).astype(np.float32)


def generate_default_boxes(
  image_size,
  feature_sizes: Sequence,
  steps: Sequence[float],
  scales: Sequence[float],
  aspect_ratios: Sequence[Sequence[float]],
  clip: bool = True,
) -> jnp.ndarray:
  """All default boxes of an input: [A, 4] float32 x1y1x2y2 pixels, in the order of the module docstring.

  Args:
    image_size: the input side (square) or (h, w).
    feature_sizes: per level, the feature map's side or (h, w).
    steps: per level, the pixels between neighbouring centres.
    scales: num_levels + 1 scales (fractions of the image side); see `ssd_scales`.
    aspect_ratios: per level, the ratios a > 1 whose wide and tall boxes the level has (e.g. (2,) or (2, 3)).
    clip: clamp the relative width and height to [0, 1] (torchvision's), not the corners.
  """
  return jnp.asarray(default_boxes_np(image_size, feature_sizes, steps, scales, aspect_ratios, clip))


@dataclasses.dataclass(frozen=True)
class DefaultBoxSpec:
  """One SSD input size's default-box settings, with the boxes and counts they give."""

  image_size: int
  feature_sizes: tuple
  steps: tuple
  scales: tuple
  aspect_ratios: tuple
  clip: bool = True

  def boxes(self) -> jnp.ndarray:
    """[A, 4] float32 x1y1x2y2 pixels."""
    return generate_default_boxes(
      self.image_size, self.feature_sizes, self.steps, self.scales, self.aspect_ratios, self.clip
    )

  def per_location(self) -> tuple[int, ...]:
    """Boxes per location of each level: the head's box count per cell."""
    return tuple(boxes_per_location(r) for r in self.aspect_ratios)

  def counts(self) -> tuple[int, ...]:
    """Boxes of each level, in level order."""
    return level_counts(self.feature_sizes, self.aspect_ratios)


# torchvision's ssd300_vgg16 (COCO): 8732 boxes.
SSD300 = DefaultBoxSpec(
  image_size=300,
  feature_sizes=(38, 19, 10, 5, 3, 1),
  steps=(8, 16, 32, 64, 100, 300),
  scales=ssd_scales(6, min_ratio=15, max_ratio=90, first_ratio=7),
  aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
)

# SSD512 on COCO (the SSD paper's Section 3.4; Caffe's 512 layout of seven sources): 24564 boxes.
SSD512 = DefaultBoxSpec(
  image_size=512,
  feature_sizes=(64, 32, 16, 8, 4, 2, 1),
  steps=(8, 16, 32, 64, 128, 256, 512),
  scales=ssd_scales(7, min_ratio=10, max_ratio=90, first_ratio=4),
  aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,)),
)
