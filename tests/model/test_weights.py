"""Weight import: torchvision-named random state dicts -> our variables -> same forward as a NumPy reference."""

import json
import struct

import jax
import numpy as np
import pytest

from conret_jax import weights
from conret_jax.model import detector
from conret_jax.model.resnet import ResNet
import model_reference as ref


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
  out = detector.build_model(config).apply(variables, images, train=False)
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
  np.testing.assert_array_equal(variables['params']['head']['cls_pred']['bias'],
                                sd['head.classification_head.cls_logits.bias'])


def test_trainable_bn_goes_to_params_and_batch_stats(tiny):
  config, sd = tiny
  config = ref.tiny_config(**{'model.backbone.norm': 'bn'})
  variables = weights.from_torchvision_retinanet(sd, config)
  assert set(variables) == {'params', 'batch_stats'}
  np.testing.assert_array_equal(variables['params']['backbone']['norm1']['scale'], sd['backbone.body.bn1.weight'])
  np.testing.assert_array_equal(variables['batch_stats']['backbone']['norm1']['mean'],
                                sd['backbone.body.bn1.running_mean'])


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
  with pytest.raises(ValueError, match=r'layer_blocks\.1\.0\.weight: shape \(16, 16, 1, 1\), expected \(16, 16, 3, 3\)'):
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


def _write_safetensors(path, tensors, bf16=()):
  header, blobs, offset = {'__metadata__': {'format': 'pt'}}, [], 0
  for name, arr in tensors.items():
    if name in bf16:
      raw, dtype = (arr.astype(np.float32).view(np.uint32) >> 16).astype('<u2').tobytes(), 'BF16'
    else:
      raw, dtype = np.ascontiguousarray(arr).tobytes(), {'float32': 'F32', 'int64': 'I64'}[arr.dtype.name]
    header[name] = {'dtype': dtype, 'shape': list(arr.shape), 'data_offsets': [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
  head = json.dumps(header).encode()
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(head)) + head + b''.join(blobs))


def test_loaders_round_trip(tmp_path, tiny):
  _, sd = tiny
  _write_safetensors(tmp_path / 'w.safetensors', sd)
  np.savez(tmp_path / 'w.npz', **sd)
  for loaded in (weights.read_safetensors(str(tmp_path / 'w.safetensors')),
                 weights.load_state_dict(str(tmp_path / 'w.safetensors')),
                 weights.load_state_dict(str(tmp_path / 'w.npz'))):
    assert sorted(loaded) == sorted(sd)
    for k in sd:
      np.testing.assert_array_equal(loaded[k], sd[k])


def test_safetensors_bf16_is_widened(tmp_path):
  x = np.array([1.0, -2.5, 3.140625, 1e-3], np.float32)  # exactly representable except 1e-3
  _write_safetensors(tmp_path / 'b.safetensors', {'x': x}, bf16=('x',))
  got = weights.read_safetensors(str(tmp_path / 'b.safetensors'))['x']
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got[:3], x[:3])
  assert abs(got[3] - 1e-3) < 1e-5


def test_unknown_extension():
  with pytest.raises(ValueError, match='unknown weight file type'):
    weights.load_state_dict('weights.h5')
