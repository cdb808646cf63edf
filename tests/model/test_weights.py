"""Weight import: torchvision- and Detectron-named random weights -> our variables -> same forward as a NumPy
reference. The file readers are tested in test_weight_files.py."""

import jax
import model_reference as ref
import numpy as np
import pytest

from conret_jax import defaults, detectors, weights
from conret_jax.model.layers import BN_EPS
from conret_jax.model.resnet import ResNet


@pytest.fixture(scope='module')
def tiny():
  config = ref.tiny_config()
  sd = ref.retinanet_state_dict(np.random.default_rng(0), config)
  return config, sd


def test_retinanet_import_matches_numpy_forward(tiny):
  config, sd = tiny
  variables = weights.from_torchvision_retinanet(sd, config)
  assert set(variables) == {'params', 'frozen'}
  images = np.random.default_rng(1).uniform(0, 255, (2, 128, 128, 3)).astype(np.float32)
  out = detectors.build_model(config).apply(variables, images, train=False)
  want_cls, want_box = ref.retinanet(sd, images, config)
  ref.assert_close(out['cls_logits'][0], want_cls)
  ref.assert_close(out['box_deltas'][0], want_box)


def test_conv_and_bn_layout(tiny):
  config, sd = tiny
  variables = weights.from_torchvision_retinanet(sd, config)
  kernel = variables['params']['backbone']['layer2']['block0']['conv1']['kernel']
  np.testing.assert_array_equal(kernel, sd['backbone.body.layer2.0.conv1.weight'].transpose(2, 3, 1, 0))
  norm = variables['frozen']['backbone']['layer2']['block0']['downsample_norm']
  np.testing.assert_array_equal(norm['var'], sd['backbone.body.layer2.0.downsample.1.running_var'])
  np.testing.assert_array_equal(
    variables['params']['head']['cls_pred']['bias'], sd['head.classification_head.cls_logits.bias']
  )


def test_trainable_bn_goes_to_params_and_batch_stats(tiny):
  config, sd = tiny
  config = ref.tiny_config(**{'model.backbone.norm': 'bn'})
  variables = weights.from_torchvision_retinanet(sd, config)
  assert set(variables) == {'params', 'batch_stats'}
  np.testing.assert_array_equal(variables['params']['backbone']['norm1']['scale'], sd['backbone.body.bn1.weight'])
  np.testing.assert_array_equal(
    variables['batch_stats']['backbone']['norm1']['mean'], sd['backbone.body.bn1.running_mean']
  )


def test_legacy_torchvision_names(tiny):
  config, sd = tiny
  legacy = {}
  for k, v in sd.items():
    k = k.replace('inner_blocks.0.0.', 'inner_blocks.0.').replace('layer_blocks.2.0.', 'layer_blocks.2.')
    k = k.replace('classification_head.conv.1.0.', 'classification_head.conv.2.')  # Sequential(conv, relu, ...)
    legacy[k] = v
  assert len(legacy) == len(sd) and 'head.classification_head.conv.2.weight' in legacy
  got = weights.from_torchvision_retinanet(legacy, config)
  want = weights.from_torchvision_retinanet(sd, config)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_misnamed_key_is_named(tiny):
  config, sd = tiny
  bad = dict(sd)
  bad['backbone.body.layer1.0.conv1.wieght'] = bad.pop('backbone.body.layer1.0.conv1.weight')
  with pytest.raises(ValueError, match=r'layer1\.0\.conv1\.wieght') as e:
    weights.from_torchvision_retinanet(bad, config)
  assert 'backbone.body.layer1.0.conv1.weight' in str(e.value)  # the missing expected key is named too


def test_misshaped_key_is_named(tiny):
  config, sd = tiny
  bad = dict(sd)
  bad['head.regression_head.bbox_reg.bias'] = np.zeros(35, np.float32)
  with pytest.raises(ValueError, match=r'head\.regression_head\.bbox_reg\.bias: shape \(35,\), expected \(36,\)'):
    weights.from_torchvision_retinanet(bad, config)
  bad = dict(sd)
  bad['backbone.fpn.layer_blocks.1.0.weight'] = np.zeros((16, 16, 1, 1), np.float32)
  with pytest.raises(
    ValueError, match=r'layer_blocks\.1\.0\.weight: shape \(16, 16, 1, 1\), expected \(16, 16, 3, 3\)'
  ):
    weights.from_torchvision_retinanet(bad, config)


def test_extra_stage_has_no_torchvision_counterpart(tiny):
  _, sd = tiny
  config = ref.tiny_config(**{'consistent.enabled': True})
  with pytest.raises(ValueError, match='box_pred1'):
    weights.from_torchvision_retinanet(sd, config)


@pytest.mark.parametrize('importer', [weights.from_torchvision_resnet, weights.from_timm_resnet])
def test_resnet_import_matches_numpy_trunk(importer):
  rng = np.random.default_rng(2)
  sd, _ = ref.resnet_state_dict(rng, depth=50, width=4, with_fc=True)
  config = ref.tiny_config(**{'model.backbone.depth': 50, 'model.backbone.width': 4})
  variables = importer(sd, config)
  assert set(variables['params']) == {'backbone'} and set(variables['frozen']) == {'backbone'}
  x = rng.standard_normal((1, 64, 64, 3)).astype(np.float32)
  backbone = {c: v['backbone'] for c, v in variables.items()}
  got = ResNet(depth=50, width=4, norm='frozen_bn').apply(backbone, x)
  for g, w in zip(got, ref.resnet(sd, '', 50, x)):
    ref.assert_close(g, w)


def test_resnet_import_rejects_deep_stem():
  sd, _ = ref.resnet_state_dict(np.random.default_rng(3), depth=18, width=8)
  sd['conv1.0.weight'] = sd.pop('conv1.weight')
  with pytest.raises(ValueError, match=r'conv1\.0\.weight'):
    weights.from_timm_resnet(sd, ref.tiny_config())


# ---------------------------------------------------------------------------------------------------- Detectron

DETECTRON_MEAN_BGR = (102.9801, 115.9465, 122.7717)  # Detectron's cfg.PIXEL_MEANS, written out independently


def _detectron_config(**overrides):
  settings = {'model.backbone.depth': 50, 'model.backbone.width': 8, 'model.backbone.stride_in_1x1': True}
  return ref.tiny_config(**{**settings, **overrides})


@pytest.fixture(scope='module')
def detectron():
  sd = ref.affine_resnet_state_dict(np.random.default_rng(4), depth=50, width=8)
  return sd, ref.detectron_blobs(sd)


def test_detectron_import_equals_torchvision_layout(detectron):
  """The same weights written both ways import to the same variables: Detectron's affine channel (s, b) becomes the
  BN (weight s, bias b, mean 0, var 1 - eps) and conv1 goes back to RGB. Variable shapes do not depend on where the
  stride sits, so the torchvision import uses the stride-on-3x3 config its importer requires."""
  sd, blobs = detectron
  got = weights.from_detectron_resnet(blobs, _detectron_config())
  want = weights.from_torchvision_resnet(sd, _detectron_config(**{'model.backbone.stride_in_1x1': False}))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_detectron_import_computes_detectrons_network(detectron):
  """Ours on an RGB image minus DETECTRON_PIXEL_MEAN_RGB == the NumPy trunk with Detectron's own weights (conv1 in
  BGR order, stride on the first 1x1) on the same image in BGR minus Detectron's BGR means."""
  sd, blobs = detectron
  variables = weights.from_detectron_resnet(blobs, _detectron_config())
  backbone = {c: v['backbone'] for c, v in variables.items()}
  for path, var in jax.tree_util.tree_leaves_with_path(backbone['frozen']):
    if path[-1].key == 'var':  # Norm's multiplier scale * rsqrt(var + eps) is exactly `scale`
      np.testing.assert_array_equal(jax.lax.rsqrt(var + BN_EPS), 1.0)
  rgb = np.random.default_rng(5).uniform(0, 255, (1, 64, 64, 3)).astype(np.float32)
  x = (rgb - np.asarray(defaults.DETECTRON_PIXEL_MEAN_RGB, np.float32)) / np.asarray(defaults.DETECTRON_PIXEL_STD)
  got = ResNet(depth=50, width=8, norm='frozen_bn', stride_in_1x1=True).apply(backbone, x)
  detectron_sd = dict(sd, **{'conv1.weight': blobs['conv1_w']})  # BGR input channels
  bgr = rgb[..., ::-1].astype(np.float64) - np.asarray(DETECTRON_MEAN_BGR)
  for g, w in zip(got, ref.resnet(detectron_sd, '', 50, bgr, stride_in_1x1=True)):
    ref.assert_close(g, w)


def test_detectron_blob_errors_are_named(detectron):
  _, blobs = detectron
  config = _detectron_config()
  bad = dict(blobs, res3_0_branch2b_w=np.zeros((16, 16, 1, 1), np.float32))
  with pytest.raises(ValueError, match=r'res3_0_branch2b_w: shape \(16, 16, 1, 1\), expected \(16, 16, 3, 3\)'):
    weights.from_detectron_resnet(bad, config)
  bad = {k: v for k, v in blobs.items() if k != 'res4_2_branch2c_bn_b'}
  with pytest.raises(ValueError, match=r"missing keys: \['res4_2_branch2c_bn_b'\]"):
    weights.from_detectron_resnet(bad, config)
  bad = dict(blobs, res6_0_branch2a_w=blobs['res5_0_branch2a_w'])
  with pytest.raises(ValueError, match=r"unexpected keys .*\['res6_0_branch2a_w'\]"):
    weights.from_detectron_resnet(bad, config)


@pytest.mark.parametrize(
  'override, named',
  [
    ({'model.backbone.stride_in_1x1': False}, 'stride_in_1x1=True'),
    ({'model.backbone.norm': 'gn'}, 'model.backbone.norm'),
    ({'model.backbone.depth': 18}, 'model.backbone.depth'),
  ],
)
def test_detectron_import_checks_the_config(detectron, override, named):
  with pytest.raises(ValueError, match=named):
    weights.from_detectron_resnet(detectron[1], _detectron_config(**override))


def test_detectron_nonzero_conv_bias_is_dropped_and_logged(detectron, caplog):
  _, blobs = detectron
  biased = dict(blobs, conv1_b=np.ones_like(blobs['conv1_b']))
  got = weights.from_detectron_resnet(biased, _detectron_config())
  want = weights.from_detectron_resnet(blobs, _detectron_config())
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert 'conv1_b' in caplog.text
