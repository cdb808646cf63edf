"""SSD importers without torch: torchvision ssd300_vgg16's names (listed here from its module tree), the class-0 unit
of a category-id config, ImageNet vgg16 into the SSD base (fc6 / fc7 subsampled as the SSD paper does), and
conret-import's two SSD formats."""

import jax
import numpy as np
import pytest
import ssd_reference as sref
from test_ssd import narrow, ssd_config

from conret_jax import weights
from conret_jax.cli import import_weights
from conret_jax.model import ssd
from conret_jax.weights import mapping
from conret_jax.weights import ssd as ssd_weights


def torchvision_ssd300_keys() -> set:
  """ssd300_vgg16's state-dict keys: SSDFeatureExtractorVGG (features up to conv4_3, extra.0 = pool4, conv5_x and
  Sequential(pool5, fc6, ReLU, fc7, ReLU), extra.1-4 = Sequential(1x1, ReLU, 3x3, ReLU)), scale_weight, SSDHead."""
  convs = [f'backbone.features.{i}' for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21)]
  convs += [f'backbone.extra.0.{i}' for i in (1, 3, 5)] + ['backbone.extra.0.7.1', 'backbone.extra.0.7.3']
  convs += [f'backbone.extra.{k}.{i}' for k in range(1, 5) for i in (0, 2)]
  convs += [f'head.{h}_head.module_list.{i}' for h in ('classification', 'regression') for i in range(6)]
  return {f'{c}.{leaf}' for c in convs for leaf in ('weight', 'bias')} | {'backbone.scale_weight'}


def test_every_variable_maps_to_one_torchvision_name():
  config = ssd_config(**{'consistent.enabled': False})
  target = mapping.target_shapes(config)
  keys = [
    ssd_weights.ssd_key(tuple(p.key for p in path)[1:]) for path, _ in jax.tree_util.tree_leaves_with_path(target)
  ]
  assert len(keys) == len(set(keys)) == 71 and set(keys) == torchvision_ssd300_keys()
  assert ssd_weights.ssd_key(('head', 'box1_3', 'kernel')) is None  # consistent optimization's box conv: no counterpart


def _sd(num_outputs=4):
  boxes = ssd.boxes_per_source(narrow().model.ssd)
  return sref.ssd_vgg_state_dict(np.random.default_rng(0), 16, num_outputs, boxes), boxes


def test_class_layouts():
  """torchvision's 4 outputs (background + labels 1..3): contiguous 3 classes take them as they are; category_id 4
  classes (class k = label k) get a class-0 unit with zero weights and a bias that never scores."""
  sd, boxes = _sd()
  plain = weights.from_torchvision_ssd(sd, narrow(**{'consistent.enabled': False}))
  cat = weights.from_torchvision_ssd(
    sd, narrow(**{'consistent.enabled': False, 'model.num_classes': 4, 'model.class_layout': 'category_id'})
  )
  for i, n in enumerate(boxes):
    theirs_w = sd[f'head.classification_head.module_list.{i}.weight'].reshape(n, 4, -1, 3, 3)
    theirs_b = sd[f'head.classification_head.module_list.{i}.bias'].reshape(n, 4)
    kernel = cat['params']['head'][f'cls{i}']['kernel']  # [3, 3, C, n * 5]
    kernel = kernel.reshape(3, 3, -1, n, 5).transpose(3, 4, 2, 0, 1)  # [n, 5, C, 3, 3]
    bias = cat['params']['head'][f'cls{i}']['bias'].reshape(n, 5)
    np.testing.assert_array_equal(kernel[:, [0, 2, 3, 4]], theirs_w)
    np.testing.assert_array_equal(bias[:, [0, 2, 3, 4]], theirs_b)
    assert np.all(kernel[:, 1] == 0) and np.all(bias[:, 1] == ssd_weights.DEAD_CLASS_BIAS)
    np.testing.assert_array_equal(
      plain['params']['head'][f'cls{i}']['kernel'],
      sd[f'head.classification_head.module_list.{i}.weight'].transpose(2, 3, 1, 0),
    )
  with pytest.raises(ValueError, match='num_classes=3'):
    weights.from_torchvision_ssd(sd, narrow(**{'consistent.enabled': False, 'model.num_classes': 7}))
  with pytest.raises(ValueError, match='model variables with no counterpart'):
    weights.from_torchvision_ssd(sd, narrow())  # ConSSD's second box convs are not in the file


def _vgg16_sd(rng, divisor=16, classifier=True):
  """A random torchvision vgg16 state dict (features, classifier) with channels / divisor."""
  sd = {}
  cin = 3
  for i, c in sref.VGG_CONVS.items():
    sd[f'features.{i}.weight'] = rng.standard_normal((c // divisor, cin, 3, 3)).astype(np.float32)
    sd[f'features.{i}.bias'] = rng.standard_normal(c // divisor).astype(np.float32)
    cin = c // divisor
  if classifier:
    f = 4096 // divisor
    for i, shape in ((0, (f, cin * 49)), (3, (f, f)), (6, (1000, f))):
      sd[f'classifier.{i}.weight'] = rng.standard_normal(shape).astype(np.float32)
      sd[f'classifier.{i}.bias'] = rng.standard_normal(shape[0]).astype(np.float32)
  return sd


def test_vgg16_imagenet_weights_become_the_ssd_base():
  sd = _vgg16_sd(np.random.default_rng(1))
  variables = weights.from_torchvision_vgg16(sd, narrow())
  base = variables['params']['backbone']
  assert set(variables) == {'params'} and set(variables['params']) == {'backbone'}
  np.testing.assert_array_equal(base['conv1_1']['kernel'], sd['features.0.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(base['conv4_3']['bias'], sd['features.21.bias'])
  np.testing.assert_array_equal(base['conv5_3']['kernel'], sd['features.28.weight'].transpose(2, 3, 1, 0))
  assert np.all(base['conv4_3_norm']['scale'] == 20.0)
  # fc6: output unit o, input channel c, tap (ky, kx) = classifier.0's unit 4o at input (c, 3ky, 3kx) of its 7x7.
  w6 = sd['classifier.0.weight'].reshape(256, 32, 7, 7)
  kernel = base['fc6']['kernel']  # [3, 3, 32, 64]
  for o, c, ky, kx in ((0, 0, 0, 0), (5, 7, 1, 2), (63, 31, 2, 2)):
    assert kernel[ky, kx, c, o] == w6[4 * o, c, 3 * ky, 3 * kx]
  np.testing.assert_array_equal(base['fc6']['bias'], sd['classifier.0.bias'][::4])
  np.testing.assert_array_equal(base['fc7']['kernel'][0, 0], sd['classifier.3.weight'][::4, ::4].T)


def test_vgg16_without_a_usable_classifier_leaves_fc_fresh():
  rng = np.random.default_rng(2)
  features = _vgg16_sd(rng, classifier=False)
  bare = {k[len('features.') :]: v for k, v in features.items()}  # a `features` module's own state dict
  nan = _vgg16_sd(rng)
  nan['classifier.0.weight'][:] = np.nan  # IMAGENET1K_FEATURES: only `features` is valid
  for sd in (features, bare, nan):
    base = weights.from_torchvision_vgg16(sd, narrow())['params']['backbone']
    assert 'fc6' not in base and 'fc7' not in base and 'conv5_3' in base
  with pytest.raises(ValueError, match="backbone='vgg16'"):
    weights.from_torchvision_vgg16(features, narrow(backbone='resnet18', **{'model.ssd.norm': 'gn'}))


def _config_file(tmp_path):
  path = tmp_path / 'narrow_ssd.py'
  path.write_text(
    'from conret_jax import defaults\n\n\ndef get_config():\n  c = defaults.ssd_config(300)\n'
    '  c.model.ssd.width_divisor = 16\n  c.model.num_classes = 3\n  c.consistent.enabled = False\n  return c\n'
  )
  return str(path)


def test_import_cli_formats(tmp_path, capsys):
  config_file = _config_file(tmp_path)
  np.savez(tmp_path / 'ssd.npz', **_sd()[0])
  np.savez(tmp_path / 'vgg.npz', **_vgg16_sd(np.random.default_rng(3)))
  for fmt, name in (('torchvision_ssd', 'ssd'), ('torchvision_vgg16', 'vgg')):
    args = ['--format', fmt, '--input', str(tmp_path / f'{name}.npz'), '--output', str(tmp_path / f'out_{name}')]
    assert import_weights.main([*args, '--config', config_file]) == 0
  assert 'conret-import: wrote' in capsys.readouterr().out
  # The other's file: one line, exit 2.
  args = ['--format', 'torchvision_ssd', '--input', str(tmp_path / 'vgg.npz'), '--output', str(tmp_path / 'x')]
  assert import_weights.main([*args, '--config', config_file]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('conret-import: error:') and '\n' not in err
  assert import_weights.default_config('torchvision_ssd').model.num_classes == 91
  assert import_weights.default_config('torchvision_vgg16').model.family == 'ssd'
