"""RetinaNet: published parameter counts, output layout, dtypes, trainable mask, the inference regressions."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import model_reference as ref
import numpy as np
import pytest
from jax.extend import core as jex_core

from conret_jax import detectors
from conret_jax import stages as stage_lib
from conret_jax.model.resnet import count_params

TORCHVISION_RETINANET_PARAMS = 34_068_119  # retinanet_resnet50_fpn(num_classes=91), BN affine included
_CONFIGS = os.path.join(os.path.dirname(__file__), '..', '..', 'configs')


def torchvision_config():
  spec = importlib.util.spec_from_file_location(
    'retinanet_torchvision', os.path.join(_CONFIGS, 'retinanet_torchvision.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _shapes(config, hw=(128, 128)):
  model = detectors.build_model(config)
  return jax.eval_shape(lambda: detectors.init_variables(model, jax.random.key(0), hw))


def test_torchvision_config():
  c = torchvision_config()
  assert (c.model.num_classes, c.model.fpn.p6_from, c.model.backbone.norm) == (91, 'p5', 'frozen_bn')
  assert (c.model.anchors.offset, c.model.anchors.round_base) == (0.0, True)
  assert c.model.anchors.sizes[4] == (512, 645, 812)
  assert (c.consistent.enabled, c.loss.smooth_l1_beta) == (False, 0.0)
  assert (c.eval.score_threshold, c.eval.topk_per_level, c.eval.nms_iou, c.eval.max_detections) == (
    0.05,
    1000,
    0.5,
    300,
  )


def test_torchvision_retinanet_parameter_count():
  c = torchvision_config()
  frozen = _shapes(c)
  # torchvision with weights=None uses trainable BatchNorm2d, whose affine parameters it counts; our frozen BN keeps
  # scale/bias/mean/var outside 'params', so half of 'frozen' is that affine.
  assert count_params(frozen['params']) + count_params(frozen['frozen']) // 2 == TORCHVISION_RETINANET_PARAMS
  c.model.backbone.norm = 'bn'
  trainable = _shapes(c)
  assert count_params(trainable['params']) == TORCHVISION_RETINANET_PARAMS
  assert count_params(trainable['params']['backbone']) == 23_508_032


def test_consistent_head_adds_one_box_conv_per_stage():
  c = torchvision_config()
  base = count_params(_shapes(c)['params'])
  box_conv = 3 * 3 * 256 * 9 * 4 + 9 * 4
  c.consistent.enabled = True
  for stages in (2, 3):
    c.consistent.num_reg_terms = stages
    assert count_params(_shapes(c)['params']) == base + (stages - 1) * box_conv


@pytest.mark.parametrize(
  'variant,enabled,stages,num_cls',
  [
    ('consistent', False, 2, 1),
    ('consistent', True, 2, 1),
    ('consistent', True, 3, 1),
    ('cascade', True, 2, 2),
    ('gated_cascade', True, 3, 3),
  ],
)
def test_output_layout(variant, enabled, stages, num_cls):
  c = ref.tiny_config(
    **{
      'model.head.variant': variant,
      'consistent.enabled': enabled,
      'consistent.num_reg_terms': stages,
      'model.compute_dtype': 'bfloat16',
    }
  )
  model = detectors.build_model(c)
  variables = _shapes(c)
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 256, 128, 3)), train=False), variables)
  num_anchors = 9 * sum((256 >> lv) * (128 >> lv) for lv in range(3, 8))
  reg = stages if enabled else 1
  assert len(out['cls_logits']) == (num_cls if enabled else 1) and len(out['box_deltas']) == reg
  for x in out['cls_logits']:
    assert (x.shape, x.dtype) == ((2, num_anchors, 3), jnp.float32)
  for x in out['box_deltas']:
    assert (x.shape, x.dtype) == ((2, num_anchors, 4), jnp.float32)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_trainable_mask():
  c = ref.tiny_config(**{'model.backbone.freeze_at': 2})
  params = _shapes(c)['params']
  mask = detectors.from_config(c).trainable_mask(params)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  flat = {'/'.join(k.key for k in path): m for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert not flat['backbone/conv1/kernel'] and not flat['backbone/layer1/block1/conv2/kernel']
  assert flat['backbone/layer2/block0/conv1/kernel'] and flat['fpn/p6/kernel'] and flat['head/cls_pred/bias']
  c.model.backbone.freeze_at = 0
  assert all(jax.tree.leaves(detectors.from_config(c).trainable_mask(params)))


def np_decode(deltas, anchors, clamp=np.log(1000 / 16)):
  w, h = anchors[..., 2] - anchors[..., 0], anchors[..., 3] - anchors[..., 1]
  cx, cy = anchors[..., 0] + w / 2, anchors[..., 1] + h / 2
  cx, cy = cx + deltas[..., 0] * w, cy + deltas[..., 1] * h
  w, h = w * np.exp(np.minimum(deltas[..., 2], clamp)), h * np.exp(np.minimum(deltas[..., 3], clamp))
  return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


@pytest.mark.parametrize(
  'variant,stages,steps,cls_index',
  [('consistent', 2, 0, 0), ('consistent', 2, 1, 0), ('cascade', 3, 0, 2), ('cascade', 3, 2, 1)],
)
def test_decode_applies_the_inference_regressions(variant, stages, steps, cls_index):
  c = ref.tiny_config(
    **{
      'model.head.variant': variant,
      'consistent.enabled': True,
      'consistent.num_reg_terms': stages,
      'consistent.inference_reg_steps': steps,
    }
  )
  rng = np.random.default_rng(0)
  anchors = np.sort(rng.uniform(0, 100, (6, 2, 2)), axis=1).transpose(0, 2, 1).reshape(6, 4).astype(np.float32)
  num_cls = 1 if variant == 'consistent' else stages
  outputs = {
    'cls_logits': tuple(rng.standard_normal((2, 6, 3)).astype(np.float32) for _ in range(num_cls)),
    'box_deltas': tuple(rng.normal(0, 0.3, (2, 6, 4)).astype(np.float32) for _ in range(stages)),
  }
  logits, boxes = detectors.from_config(c).decode(outputs, jnp.asarray(anchors))
  want = np.broadcast_to(anchors, (2, 6, 4)).astype(np.float64)
  for s in range(steps or stages):
    want = np_decode(outputs['box_deltas'][s], want)
  np.testing.assert_allclose(boxes, want, rtol=1e-5, atol=1e-3)
  np.testing.assert_array_equal(logits, outputs['cls_logits'][cls_index])


def test_bad_settings():
  with pytest.raises(ValueError, match='compute_dtype'):
    detectors.build_model(ref.tiny_config(**{'model.compute_dtype': 'float16'}))
  c = ref.tiny_config(**{'consistent.enabled': True, 'consistent.inference_reg_steps': 3})
  with pytest.raises(ValueError, match='inference_reg_steps'):
    stage_lib.Stages.from_config(c)


def _convolutions(jaxpr):
  """Every convolution of a jaxpr, and every matrix product (model.conv_lowering='matmul' lowers convs to them)."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('conv_general_dilated', 'dot_general'):
      yield eqn
    for sub in jex_core.jaxprs_in_params(eqn.params):
      yield from _convolutions(sub)


@pytest.mark.parametrize('lowering', ['xla', 'matmul'])
@pytest.mark.parametrize('name,want', [('default', None), ('highest', jax.lax.Precision.HIGHEST)])
def test_matmul_precision_reaches_every_convolution(name, want, lowering):
  """model.matmul_precision='highest' asks for full float32 in every conv of the network, backbone, FPN and head,
  forward and backward (GPUs otherwise run float32 convolutions in TF32), under either conv lowering."""
  config = ref.tiny_config(
    **{'model.matmul_precision': name, 'consistent.enabled': True, 'model.conv_lowering': lowering}
  )
  model = detectors.build_model(config)
  variables = _shapes(config)
  images = jnp.zeros((1, 128, 128, 3))
  loss = lambda v: sum(jnp.sum(o) for o in jax.tree.leaves(model.apply(v, images)))
  convs = list(_convolutions(jax.make_jaxpr(jax.grad(loss))(variables).jaxpr))
  assert len(convs) > 40
  kinds = {eqn.primitive.name for eqn in convs}
  assert kinds == ({'conv_general_dilated'} if lowering == 'xla' else {'conv_general_dilated', 'dot_general'}), kinds
  precisions = {eqn.params['precision'] for eqn in convs}
  assert precisions == ({None} if want is None else {(want, want)}), precisions


@pytest.mark.parametrize('lowering', ['xla', 'matmul'])
def test_conv_lowering_reaches_every_stride_1_kernel_gradient(lowering):
  """model.conv_lowering='matmul' reaches the backbone, the FPN and the head: every stride-1 k x k kernel gradient
  (k > 1) of the network is then a convolution with no padding of its own, on a pre-padded input
  (conret_jax/model/conv_lowering.py); under 'xla' they carry the padding, as lax differentiates them."""
  config = ref.tiny_config(**{'consistent.enabled': True, 'model.conv_lowering': lowering})
  model = detectors.build_model(config)
  variables = _shapes(config)
  kernel_shapes = {
    p.shape for p in jax.tree.leaves(variables['params']) if p.ndim == 4 and p.shape[0] == p.shape[1] > 1
  }
  images = jnp.zeros((1, 128, 128, 3))
  loss = lambda v: sum(jnp.sum(o) for o in jax.tree.leaves(model.apply(v, images)))
  convs = [
    e for e in _convolutions(jax.make_jaxpr(jax.grad(loss))(variables).jaxpr) if e.primitive.name != 'dot_general'
  ]
  kernel_grads = [
    e
    for e in convs
    if e.outvars[0].aval.shape in kernel_shapes
    and tuple(e.params['rhs_dilation']) == (1, 1)
    and e.outvars[0].aval.shape != e.invars[1].aval.shape  # not a forward conv whose output happens to match
  ]
  head_grads = [e for e in kernel_grads if e.outvars[0].aval.shape[2] == config.model.head.channels]
  levels = config.model.fpn.max_level - config.model.fpn.min_level + 1
  assert len(head_grads) >= levels * 2 * config.model.head.num_convs  # towers: every level, class and box
  unpadded = [all(tuple(p) == (0, 0) for p in e.params['padding']) for e in kernel_grads]
  assert all(unpadded) if lowering == 'matmul' else not any(unpadded), unpadded
