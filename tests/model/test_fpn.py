"""FPN against a NumPy reference of torchvision's FeaturePyramidNetwork + LastLevelP6P7."""

import jax
import jax.numpy as jnp
import model_reference as ref
import numpy as np
import pytest

from conret_jax.model.fpn import FPN
from conret_jax.model.resnet import count_params


def _random_fpn(rng, in_channels, channels, p6_in):
  """A torchvision-named FPN state dict and the same weights in our naming."""
  sd, params = {}, {}
  convs = [(f'inner_blocks.{i}.0', f'lateral{3 + i}', cin, 1) for i, cin in enumerate(in_channels)]
  convs += [(f'layer_blocks.{i}.0', f'output{3 + i}', channels, 3) for i in range(3)]
  convs += [('extra_blocks.p6', 'p6', p6_in, 3), ('extra_blocks.p7', 'p7', channels, 3)]
  for theirs, ours, cin, k in convs:
    w = ref._conv_w(rng, channels, cin, k, std=(1 / (cin * k * k)) ** 0.5)
    b = rng.normal(0, 0.1, channels).astype(np.float32)
    sd[theirs + '.weight'], sd[theirs + '.bias'] = w, b
    params[ours] = {'kernel': w.transpose(2, 3, 1, 0), 'bias': b}
  return sd, {'params': params}


@pytest.mark.parametrize('p6_from', ['p5', 'c5'])
def test_fpn_matches_numpy(p6_from):
  rng = np.random.default_rng(0)
  in_channels, channels = (4, 6, 8), 5
  feats = [rng.standard_normal((2, s, s, c)).astype(np.float32) for s, c in zip((16, 8, 4), in_channels)]
  sd, variables = _random_fpn(rng, in_channels, channels, channels if p6_from == 'p5' else in_channels[2])
  fpn = FPN(channels=channels, p6_from=p6_from)
  got = jax.jit(lambda v, f: fpn.apply(v, f))(variables, tuple(feats))
  want = ref.fpn(sd, '', feats, p6_from)
  assert [g.shape for g in got] == [(2, 16, 16, 5), (2, 8, 8, 5), (2, 4, 4, 5), (2, 2, 2, 5), (2, 1, 1, 5)]
  for g, w in zip(got, want):
    ref.assert_close(g, w)


def test_fpn_parameter_count_and_levels():
  shapes = jax.eval_shape(
    lambda: FPN(channels=256, p6_from='p5').init(
      jax.random.key(0), tuple(jnp.zeros((1, s, s, c)) for s, c in ((16, 512), (8, 1024), (4, 2048)))
    )
  )
  assert count_params(shapes) == 3_868_672  # torchvision's R50 FPN + P6/P7 from P5
  out = jax.eval_shape(
    lambda: FPN(channels=8, min_level=4, max_level=6).init_with_output(
      jax.random.key(0), tuple(jnp.zeros((1, s, s, 4)) for s in (16, 8, 4))
    )
  )[0]
  assert [o.shape for o in out] == [(1, 8, 8, 8), (1, 4, 4, 8), (1, 2, 2, 8)]
