"""SSD: output layout and default-box counts at 300 and 512, the forward pass against a NumPy reference of
torchvision's network, the published parameter count, the detector's scores, frozen layers and the loss."""

import jax
import jax.numpy as jnp
import model_reference as ref
import numpy as np
import pytest
import ssd_reference as sref

from conret_jax import defaults, detectors, inference, weights
from conret_jax.core import default_boxes
from conret_jax.model import ssd
from conret_jax.model.resnet import count_params

# torchvision ssd300_vgg16(num_classes=91): the SSD300_VGG16_Weights.COCO_V1 entry's num_params.
TORCHVISION_SSD300_PARAMS = 35_641_826


def ssd_config(size=300, backbone='vgg16', **overrides):
  c = defaults.ssd_config(size)
  c.model.ssd.backbone = backbone
  if backbone != 'vgg16':
    c.model.ssd.norm, c.model.ssd.extra_norm = 'frozen_bn', 'bn'
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def narrow(size=300, backbone='vgg16', **overrides):
  """A narrow SSD (channels / 16) with 3 classes for forward tests."""
  return ssd_config(size, backbone, **{'model.ssd.width_divisor': 16, 'model.num_classes': 3, **overrides})


def _shapes(config):
  detector = detectors.from_config(config)
  hw = detector.input_size.smallest()
  variables = jax.eval_shape(lambda: detectors.init_variables(detector.module, jax.random.key(0), hw))
  images = jax.ShapeDtypeStruct((2, *hw, 3), jnp.float32)
  outputs, state = jax.eval_shape(
    lambda v, x: detector.module.apply(v, x, capture_intermediates=True, mutable=['intermediates']), variables, images
  )
  return detector, variables, outputs, state['intermediates']


@pytest.mark.parametrize('size,count', [(300, 8732), (512, 24564)])
@pytest.mark.parametrize('backbone', ['vgg16', 'resnet50'])
def test_outputs_sources_and_default_boxes(size, count, backbone):
  config = ssd_config(size, backbone)
  detector, _, outputs, inter = _shapes(config)
  k1 = config.model.num_classes + 1
  assert [o.shape for o in outputs['cls_logits']] == [(2, count, k1)]
  assert [o.shape for o in outputs['box_deltas']] == [(2, count, 4)] * 2  # consistent: one more box conv
  assert all(o.dtype == jnp.float32 for o in outputs['cls_logits'] + outputs['box_deltas'])
  sources = inter['backbone']['__call__'][0] + inter['extras']['__call__'][0]
  preset = default_boxes.SSD300 if size == 300 else default_boxes.SSD512
  assert tuple(s.shape[1] for s in sources) == ssd.source_sizes(config.model.ssd) == preset.feature_sizes
  assert all(s.shape[1] == s.shape[2] for s in sources)
  assert sum(detector.level_counts((size, size))) == count
  np.testing.assert_array_equal(np.asarray(detector.anchors((size, size))), np.asarray(preset.boxes()))
  assert detector.input_size.problem((size, size)) == '' and detector.input_size.problem((256, 256))
  assert detector.name == 'ConSSD'


def test_torchvision_parameter_count_and_one_box_conv_per_stage():
  config = ssd_config(**{'model.num_classes': 90, 'consistent.enabled': False})  # 91 outputs, as torchvision's
  _, variables, _, _ = _shapes(config)
  assert count_params(variables['params']) == TORCHVISION_SSD300_PARAMS
  config.consistent.enabled = True
  box_convs = sum(3 * 3 * c * n * 4 + n * 4 for c, n in zip((512, 1024, 512, 256, 256, 256), (4, 6, 6, 6, 4, 4)))
  assert count_params(_shapes(config)[1]['params']) == TORCHVISION_SSD300_PARAMS + box_convs


@pytest.mark.parametrize('size', [300, 512])
def test_forward_matches_numpy_reference(size):
  """A narrow SSD-VGG16 with torchvision-named random weights, imported, against the NumPy network."""
  config = narrow(size, **{'consistent.enabled': False, 'model.matmul_precision': 'highest'})
  boxes = ssd.boxes_per_source(config.model.ssd)
  layers = sref.EXTRAS_300 if size == 300 else sref.EXTRAS_512
  sd = sref.ssd_vgg_state_dict(np.random.default_rng(0), 16, 4, boxes, layers)
  variables = weights.from_torchvision_ssd(sd, config)
  images = np.random.default_rng(1).uniform(0, 255, (1, size, size, 3)).astype(np.float32)
  got = detectors.build_model(config).apply(variables, images)
  want_cls, want_box = sref.ssd_vgg(sd, images, config.model.pixel_mean, config.model.pixel_std, layers, 4)
  ref.assert_close(got['cls_logits'][0], want_cls)
  ref.assert_close(got['box_deltas'][0], want_box)


def test_resnet_trunk_matches_numpy_reference():
  """The SSD-ResNet trunk (conv4_x without its stride) with torchvision ResNet-50 weights, imported."""
  config = narrow(backbone='resnet50', **{'model.matmul_precision': 'highest'})
  sd, _ = ref.resnet_state_dict(np.random.default_rng(2), depth=50, width=4, with_fc=True)
  variables = weights.from_torchvision_resnet(sd, config)  # layer4 and fc of the file are not used
  assert set(variables['params']['backbone']) == {'conv1', 'layer1', 'layer2', 'layer3'}
  detector = detectors.from_config(config)
  images = np.random.default_rng(3).uniform(0, 255, (1, 300, 300, 3)).astype(np.float32)
  full = detectors.init_variables(detector.module, jax.random.key(0), (300, 300))
  full = {c: {**tree, **variables.get(c, {})} for c, tree in full.items()}
  _, state = detector.module.apply(full, images, capture_intermediates=True, mutable=['intermediates'])
  (c4,) = state['intermediates']['backbone']['__call__'][0]
  x = (images - np.asarray(config.model.pixel_mean)) / np.asarray(config.model.pixel_std)
  ref.assert_close(c4, sref.ssd_resnet_trunk(sd, x, 50))
  assert c4.shape == (1, 38, 38, 64)


def test_decode_scores_are_the_softmax_probabilities():
  config = narrow()
  detector = detectors.from_config(config)
  rng = np.random.default_rng(4)
  a = sum(detector.level_counts((300, 300)))
  logits = rng.normal(0, 4, (2, a, 4)).astype(np.float32)
  logits[0, :10, 2] = 40.0  # a class that takes all the mass
  deltas = tuple(rng.normal(0, 0.5, (2, a, 4)).astype(np.float32) for _ in range(2))
  anchors = detector.anchors((300, 300))
  scores, boxes = detector.decode({'cls_logits': (jnp.asarray(logits),), 'box_deltas': deltas}, anchors)
  softmax = np.exp(logits - logits.max(-1, keepdims=True))
  softmax /= softmax.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(jax.nn.sigmoid(scores)), softmax[..., 1:], rtol=2e-6, atol=1e-7)
  # The boxes: the regressions applied in turn to the default boxes, SSD's coding (weights 10, 10, 5, 5), in NumPy.
  want = np.broadcast_to(np.asarray(anchors, np.float64), deltas[0].shape)
  for d in deltas[: detectors.Stages.from_config(config).inference_steps]:
    w, h = want[..., 2] - want[..., 0], want[..., 3] - want[..., 1]
    cx, cy = want[..., 0] + w / 2 + d[..., 0] / 10 * w, want[..., 1] + h / 2 + d[..., 1] / 10 * h
    w, h = w * np.exp(d[..., 2] / 5), h * np.exp(d[..., 3] / 5)
    want = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)
  np.testing.assert_allclose(np.asarray(boxes), want, rtol=1e-5, atol=1e-3)


def test_frozen_layers_get_no_gradient_and_no_update():
  config = narrow(**{'model.ssd.freeze_at': 2})
  detector = detectors.from_config(config)
  variables = detectors.init_variables(detector.module, jax.random.key(0), (300, 300))
  mask = detector.trainable_mask(variables['params'])
  frozen = {k for k, v in mask['backbone'].items() if not all(jax.tree.leaves(v))}
  assert frozen == {'conv1_1', 'conv1_2', 'conv2_1', 'conv2_2'}
  images = jnp.full((1, 300, 300, 3), 100.0)
  loss = lambda p: sum(jnp.sum(o) for o in jax.tree.leaves(detector.module.apply({'params': p}, images)))
  grads = jax.jit(jax.grad(loss))(variables['params'])['backbone']
  assert all(float(jnp.abs(g).max()) == 0 for name in frozen for g in jax.tree.leaves(grads[name]))
  assert float(jnp.abs(grads['conv3_1']['kernel']).max()) > 0
  resnet = narrow(backbone='resnet18', **{'model.ssd.freeze_at': 2})
  params = jax.eval_shape(
    lambda: detectors.init_variables(detectors.build_model(resnet), jax.random.key(0), (300, 300))
  )
  mask = detectors.from_config(resnet).trainable_mask(params['params'])['backbone']
  assert {k for k, v in mask.items() if not all(jax.tree.leaves(v))} == {'conv1', 'layer1'}


def test_loss_and_gradient_through_the_detector():
  config = narrow(backbone='resnet18', **{'model.ssd.norm': 'gn', 'model.ssd.extra_norm': 'gn'})
  detector = detectors.from_config(config)
  variables = detectors.init_variables(detector.module, jax.random.key(0), (300, 300))
  rng = np.random.default_rng(5)
  batch = dict(
    images=rng.uniform(0, 255, (2, 300, 300, 3)).astype(np.float32),
    boxes=np.array([[[20, 30, 120, 150], [100, 100, 280, 260], [0, 0, 0, 0]]] * 2, np.float32),
    classes=np.array([[0, 2, 0], [1, 1, 0]], np.int32),
    valid=np.array([[True, True, False], [True, False, False]]),
    crowd=np.zeros((2, 3), bool),
  )
  anchors = detector.anchors((300, 300))

  def loss(params):
    return detector.loss(detector.module.apply({'params': params}, batch['images']), anchors, batch)

  (value, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  assert np.isfinite(float(value)) and float(metrics['num_pos_0']) >= 3
  assert {'cls_loss_0', 'cls_loss_1', 'box_loss_0', 'box_loss_1'} <= set(metrics)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  refined = [g for name, g in grads['head'].items() if name.startswith('box1_')]  # the refined stage's convs learn
  assert max(float(jnp.abs(g['kernel']).max()) for g in refined) > 0


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_detect_takes_the_fixed_size_only(dtype):
  config = narrow(**{'eval.max_detections': 20, 'eval.topk_per_class': 50, 'model.compute_dtype': dtype})
  model = detectors.build_model(config)
  variables = detectors.init_variables(model, jax.random.key(0), (300, 300))
  images = np.random.default_rng(6).uniform(0, 255, (2, 300, 300, 3)).astype(np.float32)
  out = inference.detect(model, variables, images, config)
  assert out['boxes'].shape == (2, 20, 4) and out['classes'].dtype == jnp.int32
  assert int(np.asarray(out['valid']).sum()) > 0 and np.asarray(out['classes']).max() < 3
  with pytest.raises(ValueError, match='300'):
    inference.detect(model, variables, np.zeros((1, 256, 256, 3), np.float32), config)
