"""RetinaNet anchors for pyramid levels P3-P7 of a static image size.

Order of the flattened anchors (the head's output layout depends on it):
  level ascending (min_level .. max_level), then row y, then column x, then the per-location anchor
  a = ratio_index * num_scales + scale_index (ratio-major, as torchvision's AnchorGenerator).
So a head that emits, per location, channels `a * K + k` (classes) and `a * 4 + c` (box deltas), reshaped as
[B, H, W, num_anchors, K] -> [B, H * W * num_anchors, K] and concatenated over levels, lines up with these anchors.

Anchor shapes: for an aspect ratio r (= height / width) and a size s, h = s * sqrt(r) and w = s / sqrt(r), i.e.
area s^2. Sizes per level are `base_scale * stride * 2^(i / scales_per_octave)` unless `sizes` names them
explicitly. The anchor centre of cell (y, x) is ((x + offset) * stride, (y + offset) * stride).

torchvision parity: offset=0.0, round_base=True and sizes=((32, 40, 50), (64, 80, 101), (128, 161, 203),
(256, 322, 406), (512, 645, 812)) give exactly torchvision's anchors; the base (zero-centred) anchors are then
computed in float32 the way torchvision does (w/2 and h/2 rounded half-to-even), so even the rounding agrees.

Everything here is static (NumPy at trace time); the result enters jitted code as a constant.
"""

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np


def level_shapes(image_hw: Sequence[int], min_level: int, max_level: int) -> tuple[tuple[int, int], ...]:
  """Feature map (h, w) of each level min_level..max_level; image sides must be divisible by 2**max_level."""
  h, w = int(image_hw[0]), int(image_hw[1])
  if min_level > max_level:
    raise ValueError(f'min_level {min_level} > max_level {max_level}')
  div = 2**max_level
  if h % div or w % div:
    raise ValueError(f'image size {h}x{w} is not divisible by 2**max_level = {div}')
  return tuple((h // 2**level, w // 2**level) for level in range(min_level, max_level + 1))


def _level_sizes(min_level, max_level, base_scale, scales_per_octave, sizes) -> list[tuple[float, ...]]:
  num_levels = max_level - min_level + 1
  if sizes:
    sizes = [tuple(float(s) for s in level) for level in sizes]
    if len(sizes) != num_levels:
      raise ValueError(f'sizes has {len(sizes)} levels, expected {num_levels} (P{min_level}-P{max_level})')
    if len({len(level) for level in sizes}) != 1:
      raise ValueError(f'every level needs the same number of sizes, got {sizes}')
    return sizes
  return [
    tuple(base_scale * 2**level * 2 ** (i / scales_per_octave) for i in range(scales_per_octave))
    for level in range(min_level, max_level + 1)
  ]


def _base_anchors(sizes, aspect_ratios, round_base) -> np.ndarray:
  """Zero-centred anchors [len(ratios) * len(sizes), 4], ratio-major, float32 arithmetic like torchvision."""
  scales = np.asarray(sizes, np.float32)
  h_ratios = np.sqrt(np.asarray(aspect_ratios, np.float32))
  w_ratios = np.float32(1) / h_ratios
  ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
  hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
  base = np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)
  return np.round(base) if round_base else base


def generate_anchors(
  image_hw: Sequence[int],
  *,
  min_level: int = 3,
  max_level: int = 7,
  base_scale: float = 4.0,
  scales_per_octave: int = 3,
  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
  sizes: Sequence[Sequence[float]] = (),
  offset: float = 0.5,
  round_base: bool = False,
) -> jnp.ndarray:
  """All anchors of an image_hw input: [A_total, 4] float32, x1y1x2y2, in the order of the module docstring."""
  return jnp.asarray(
    _anchors_np(image_hw, min_level, max_level, base_scale, scales_per_octave, aspect_ratios, sizes, offset, round_base)
  )


def _anchors_np(
  image_hw, min_level, max_level, base_scale, scales_per_octave, aspect_ratios, sizes, offset, round_base
) -> np.ndarray:
  shapes = level_shapes(image_hw, min_level, max_level)
  level_sizes = _level_sizes(min_level, max_level, base_scale, scales_per_octave, sizes)
  out = []
  for level, (fh, fw), lsizes in zip(range(min_level, max_level + 1), shapes, level_sizes):
    stride = np.float32(2**level)
    base = _base_anchors(lsizes, aspect_ratios, round_base)  # [n, 4]
    cx = (np.arange(fw, dtype=np.float32) + np.float32(offset)) * stride
    cy = (np.arange(fh, dtype=np.float32) + np.float32(offset)) * stride
    cy, cx = np.meshgrid(cy, cx, indexing='ij')  # [fh, fw], row-major: y then x
    shifts = np.stack([cx, cy, cx, cy], axis=-1).reshape(-1, 1, 4)
    out.append((shifts + base[None]).reshape(-1, 4))
  return np.concatenate(out, axis=0).astype(np.float32)


def anchors_per_location(
  min_level: int,
  max_level: int,
  base_scale: float = 4.0,
  scales_per_octave: int = 3,
  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
  sizes: Sequence[Sequence[float]] = (),
) -> int:
  """Anchors per feature-map cell: len(aspect_ratios) * (scales_per_octave, or the sizes given per level)."""
  return len(aspect_ratios) * len(_level_sizes(min_level, max_level, base_scale, scales_per_octave, sizes)[0])


def level_counts(image_hw: Sequence[int], min_level: int, max_level: int, per_location: int) -> tuple[int, ...]:
  """Static number of anchors of each level (h * w * anchors per location), in level order."""
  return tuple(h * w * per_location for h, w in level_shapes(image_hw, min_level, max_level))
