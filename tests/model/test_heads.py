"""RetinaNet heads (consistent, cascade, gated cascade) against a NumPy reference; init and parameter layout."""

import math

import jax
import jax.numpy as jnp
import model_reference as ref
import numpy as np
import pytest

from conret_jax.model.heads import RetinaHead, prior_bias
from conret_jax.model.resnet import count_params

A, K, C, NUM_CONVS = 3, 2, 8, 2


def _features(rng):
  return tuple(rng.standard_normal((2, s, s, C)).astype(np.float32) for s in (4, 2, 1))


def _random_variables(head, feats):
  return ref.random_like(jax.eval_shape(lambda: head.init(jax.random.key(0), feats)))


def _conv(x, p):
  return ref.conv(x, np.asarray(p['kernel']).transpose(3, 2, 0, 1), p.get('bias'))


def _tower(p, x, gn=False):
  for i in range(NUM_CONVS):
    x = _conv(x, p[f'conv{i}'])
    if gn:
      n = p[f'norm{i}']
      x = ref.group_norm(x, n['scale'], n['bias'], groups=8)
    x = ref.relu(x)
  return x


def _flat(y, per):
  return y.reshape(y.shape[0], -1, per)


def reference_head(params, feats, variant, stages, gn=False):
  if variant == 'consistent':
    box_feats = [_tower(params['box_tower'], p, gn) for p in feats]
    cls = np.concatenate([_flat(_conv(_tower(params['cls_tower'], p, gn), params['cls_pred']), K) for p in feats], 1)
    boxes = [np.concatenate([_flat(_conv(b, params[f'box_pred{s}']), 4) for b in box_feats], 1) for s in range(stages)]
    return [cls], boxes
  cls_out, box_out, prev = [], [], None
  for s in range(stages):
    sfx = '' if s == 0 else f'_{s}'
    cur = []
    for i, p in enumerate(feats):
      cin = p + prev[i][0] if variant == 'gated_cascade' and s > 0 else p
      bin_ = p + prev[i][1] if variant == 'gated_cascade' and s > 0 else p
      cur.append((_tower(params['cls_tower' + sfx], cin, gn), _tower(params['box_tower' + sfx], bin_, gn)))
    cls_out.append(np.concatenate([_flat(_conv(c, params['cls_pred' + sfx]), K) for c, _ in cur], 1))
    box_out.append(np.concatenate([_flat(_conv(b, params[f'box_pred{s}']), 4) for _, b in cur], 1))
    prev = cur
  return cls_out, box_out


@pytest.mark.parametrize(
  'variant,stages,norm', [('consistent', 2, ''), ('consistent', 1, 'gn'), ('cascade', 2, ''), ('gated_cascade', 3, '')]
)
def test_head_matches_numpy(variant, stages, norm):
  rng = np.random.default_rng(0)
  feats = _features(rng)
  head = RetinaHead(
    num_classes=K, num_anchors=A, num_convs=NUM_CONVS, channels=C, norm=norm, variant=variant, num_stages=stages
  )
  variables = _random_variables(head, feats)
  out = jax.jit(head.apply)(variables, feats)
  want_cls, want_box = reference_head(variables['params'], feats, variant, stages, gn=norm == 'gn')
  assert len(out['cls_logits']) == len(want_cls) and len(out['box_deltas']) == stages
  for got, want in zip(out['cls_logits'] + out['box_deltas'], want_cls + want_box):
    assert got.dtype == jnp.float32
    ref.assert_close(got, want)


def test_init_prior_bias_and_small_weights():
  head = RetinaHead(num_classes=K, num_anchors=A, num_convs=NUM_CONVS, channels=64, num_stages=2)
  params = jax.jit(lambda f: head.init(jax.random.key(0), f))(tuple(jnp.zeros((1, s, s, 64)) for s in (4, 2)))['params']
  np.testing.assert_allclose(params['cls_pred']['bias'], np.full(A * K, -math.log(99.0)), rtol=1e-6)
  assert prior_bias(0.5) == 0.0
  np.testing.assert_array_equal(params['box_pred1']['bias'], 0.0)
  np.testing.assert_array_equal(params['cls_tower']['conv0']['bias'], 0.0)
  kernel = np.asarray(params['cls_tower']['conv1']['kernel'])
  assert abs(kernel.std() - 0.01) < 0.001 and abs(kernel.mean()) < 0.001


def _count(variant, stages, norm=''):
  head = RetinaHead(
    num_classes=91, num_anchors=9, channels=256, num_convs=4, norm=norm, variant=variant, num_stages=stages
  )
  return count_params(jax.eval_shape(lambda: head.init(jax.random.key(0), (jnp.zeros((1, 8, 8, 256)),))))


def test_parameter_counts():
  base = _count('consistent', 1)
  assert base == 6_691_415  # torchvision RetinaNetHead, 91 classes
  box_conv = 3 * 3 * 256 * 9 * 4 + 9 * 4
  assert _count('consistent', 2) == base + box_conv  # footnote 2: one more last box conv per stage
  assert _count('consistent', 3) == base + 2 * box_conv
  assert _count('cascade', 2) == 2 * base  # a full sibling head
  assert _count('gated_cascade', 2) == 2 * base  # the gate is an addition: no parameters
  tower_conv_bias = 4 * 2 * 256
  gn_affine = 4 * 2 * 2 * 256
  assert _count('consistent', 1, 'gn') == base - tower_conv_bias + gn_affine


def test_bad_variant():
  head = RetinaHead(num_classes=K, num_anchors=A, variant='cascaded')
  with pytest.raises(ValueError, match='head.variant'):
    head.init(jax.random.key(0), (jnp.zeros((1, 2, 2, 4)),))
