import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conret_jax.core import anchors
from conret_jax.defaults import base_config
from conret_jax.model import anchor_spec

TV_SIZES = ((32, 40, 50), (64, 80, 101), (128, 161, 203), (256, 322, 406), (512, 645, 812))


def np_anchors(image_hw, min_level=3, max_level=7, base_scale=4.0, spo=3, ratios=(0.5, 1.0, 2.0), offset=0.5):
  """Loop reference in float64: level, y, x, ratio, scale."""
  out = []
  for level in range(min_level, max_level + 1):
    stride = 2**level
    for y in range(image_hw[0] // stride):
      for x in range(image_hw[1] // stride):
        cx, cy = (x + offset) * stride, (y + offset) * stride
        for r in ratios:
          for i in range(spo):
            s = base_scale * stride * 2 ** (i / spo)
            h, w = s * math.sqrt(r), s / math.sqrt(r)
            out.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
  return np.array(out)


def tv_anchors(image_hw, sizes=TV_SIZES, ratios=(0.5, 1.0, 2.0)):
  """torchvision AnchorGenerator semantics (float32, rounded base anchors, centres at x * stride), loops."""
  out = []
  for lvl, level_sizes in enumerate(sizes):
    stride = 2 ** (lvl + 3)
    base = []
    for r in ratios:
      hr = np.sqrt(np.float32(r))
      wr = np.float32(1) / hr
      for s in level_sizes:
        ws, hs = wr * np.float32(s), hr * np.float32(s)
        base.append(np.round(np.array([-ws, -hs, ws, hs], np.float32) / np.float32(2)))
    for y in range(image_hw[0] // stride):
      for x in range(image_hw[1] // stride):
        shift = np.array([x * stride, y * stride] * 2, np.float32)
        out.extend(shift + b for b in base)
  return np.array(out, np.float32)


def test_level_shapes():
  assert anchors.level_shapes((256, 384), 3, 7) == ((32, 48), (16, 24), (8, 12), (4, 6), (2, 3))
  with pytest.raises(ValueError, match='100x128'):
    anchors.level_shapes((100, 128), 3, 7)


def test_default_anchors_match_loop_reference():
  got = np.asarray(anchors.generate_anchors((128, 256)))
  want = np_anchors((128, 256))
  assert got.dtype == np.float32 and got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)


def test_custom_levels_scales_ratios_offset():
  got = np.asarray(
    anchors.generate_anchors(
      (64, 64), min_level=2, max_level=4, base_scale=2.0, scales_per_octave=2, aspect_ratios=(1.0, 3.0), offset=0.0
    )
  )
  np.testing.assert_allclose(got, np_anchors((64, 64), 2, 4, 2.0, 2, (1.0, 3.0), 0.0), rtol=1e-6, atol=1e-4)


def test_torchvision_parity_exact():
  got = np.asarray(anchors.generate_anchors((256, 128), sizes=TV_SIZES, offset=0.0, round_base=True))
  np.testing.assert_array_equal(got, tv_anchors((256, 128)))
  # The first cell's anchors as torchvision's retinanet_resnet50_fpn produces them (known values).
  first = [
    [-23, -11, 23, 11],
    [-28, -14, 28, 14],
    [-35, -18, 35, 18],
    [-16, -16, 16, 16],
    [-20, -20, 20, 20],
    [-25, -25, 25, 25],
    [-11, -23, 11, 23],
    [-14, -28, 14, 28],
    [-18, -35, 18, 35],
  ]
  np.testing.assert_array_equal(got[:9], first)
  # Second column of P3 is shifted by the stride 8 in x only.
  np.testing.assert_array_equal(got[9:18], np.array(first) + [8, 0, 8, 0])


def test_config_helpers_and_order_for_head_layout():
  cfg = base_config().model
  hw = (128, 128)
  spec = anchor_spec.AnchorSpec.from_config(cfg)
  counts = spec.level_counts(hw)
  assert counts == (16 * 16 * 9, 8 * 8 * 9, 4 * 4 * 9, 2 * 2 * 9, 1 * 9)
  assert spec.per_location == 9
  a = np.asarray(spec.anchors(hw))
  assert a.shape == (sum(counts), 4)
  # A head output [H, W, 9, 4] flattened: index (y * W + x) * 9 + anchor -> centre of cell (y, x).
  p3 = a[: counts[0]].reshape(16, 16, 9, 4)
  centres = (p3[..., :2] + p3[..., 2:]) / 2
  yy, xx = np.meshgrid(np.arange(16), np.arange(16), indexing='ij')
  np.testing.assert_allclose(centres[..., 0], np.broadcast_to(((xx + 0.5) * 8)[..., None], (16, 16, 9)), atol=1e-4)
  np.testing.assert_allclose(centres[..., 1], np.broadcast_to(((yy + 0.5) * 8)[..., None], (16, 16, 9)), atol=1e-4)
  # Ratio-major: anchors 0..2 have ratio 0.5 (h / w), sizes growing with the scale index.
  wh = p3[0, 0, :, 2:] - p3[0, 0, :, :2]
  np.testing.assert_allclose(wh[:, 1] / wh[:, 0], np.repeat([0.5, 1.0, 2.0], 3), rtol=1e-5)
  np.testing.assert_allclose(np.sqrt(wh[:3, 0] * wh[:3, 1]), 32 * 2 ** (np.arange(3) / 3), rtol=1e-5)


def test_explicit_sizes_from_config():
  cfg = base_config().model
  cfg.anchors.sizes = TV_SIZES
  cfg.anchors.offset = 0.0
  cfg.anchors.round_base = True
  np.testing.assert_array_equal(
    np.asarray(anchor_spec.AnchorSpec.from_config(cfg).anchors((128, 128))), tv_anchors((128, 128))
  )
  cfg.anchors.sizes = ((32, 40), (64,), (128,), (256,), (512,))
  with pytest.raises(ValueError):
    anchors.generate_anchors((128, 128), sizes=cfg.anchors.sizes)
  with pytest.raises(ValueError):
    anchors.generate_anchors((128, 128), sizes=TV_SIZES[:4])


def test_inside_jit_and_vmap():
  hw = (64, 64)
  ref = np.asarray(anchors.generate_anchors(hw, min_level=3, max_level=5))

  def shifted(d):
    return anchors.generate_anchors(hw, min_level=3, max_level=5) + d

  np.testing.assert_array_equal(np.asarray(jax.jit(shifted)(0.0)), ref)
  out = jax.vmap(shifted)(jnp.arange(2.0))
  np.testing.assert_array_equal(np.asarray(out[1]), ref + 1)
