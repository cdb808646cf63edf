"""Importers for SSD: torchvision's ssd300_vgg16 (a whole detector) and torchvision's vgg16 ImageNet weights (the
base network).

torchvision's names, from its SSDFeatureExtractorVGG and SSDHead (our names: model/vgg.py, model/ssd_extras.py,
model/ssd.py):
  backbone.features.<i>       VGG-16's convs up to conv4_3 (<i>: the conv's index in torchvision's vgg16
                              `features`, where each conv is followed by its ReLU and each block by its pool)
  backbone.scale_weight       conv4_3's L2 normalization scale            -> backbone/conv4_3_norm/scale
  backbone.extra.0.<i - 23>   pool4 and conv5_x, the same indices shifted by pool4's position (23)
  backbone.extra.0.7.{1,3}    fc6, fc7
  backbone.extra.<k+1>.{0,2}  extra layer k's 1x1 and 3x3 convs         -> extras/conv<8+k>_1, conv<8+k>_2
  head.classification_head.module_list.<i>, head.regression_head.module_list.<i>   -> head/cls<i>, head/box0_<i>
ImageNet vgg16: features.<i> as above; classifier.0 and classifier.3 (fc6 and fc7 as 4096-wide linear layers).

Classes: torchvision's head has num_classes outputs per box with index 0 the background, like ours with K + 1; its
label L is the COCO category id. A config with class_layout='contiguous' and num_classes = N - 1 takes the file as
it is (class k = label k + 1); one with class_layout='category_id' and num_classes = N (class k IS label k) gets a
unit for class 0, which no category has, with zero weights and bias DEAD_CLASS_BIAS: its exp underflows to 0 in
float32, so the other classes' softmax is unchanged and class 0 is never scored above 0.
"""

import numpy as np
from absl import logging

from conret_jax.model import ssd_extras, vgg
from conret_jax.model.ssd import boxes_per_source
from conret_jax.weights import mapping

DEAD_CLASS_BIAS = -1e4
_LEAF = {'kernel': 'weight', 'bias': 'bias'}
_POOL4 = 23  # pool4's index in vgg16 `features`: torchvision's SSD splits `features` there


def vgg_index(name: str) -> int:
  """The index of VGG-16 conv `name` ('conv4_3') in torchvision's vgg16 `features`."""
  block, i = (int(v) for v in name[len('conv') :].split('_'))
  before = sum(2 * len(convs) + 1 for convs in vgg.VGG16_BLOCKS[: block - 1])  # conv + ReLU each, then the pool
  return before + 2 * (i - 1)


def _base_key(module: str) -> str:
  """torchvision SSD's name of a base-network module (without the leaf)."""
  if module == 'conv4_3_norm':
    return 'backbone.scale_weight'
  if module in ('fc6', 'fc7'):
    return f'backbone.extra.0.7.{1 if module == "fc6" else 3}'
  i = vgg_index(module)
  return f'backbone.features.{i}' if i < _POOL4 else f'backbone.extra.0.{i - _POOL4}'


def ssd_key(path):
  """Our path inside the variables (without the collection) -> torchvision ssd300_vgg16 name, or None (the extra
  box convs of consistent optimization have none)."""
  top, module, leaf = path
  if top == 'backbone':
    key = _base_key(module)
    return key if module == 'conv4_3_norm' else f'{key}.{_LEAF[leaf]}'
  if top == 'extras':
    k, part = (int(v) for v in module[len('conv') :].split('_'))
    return f'backbone.extra.{k - ssd_extras.FIRST_INDEX + 1}.{0 if part == 1 else 2}.{_LEAF[leaf]}'
  if module.startswith('cls'):
    return f'head.classification_head.module_list.{module[len("cls") :]}.{_LEAF[leaf]}'
  stage, i = module[len('box') :].split('_')
  return f'head.regression_head.module_list.{i}.{_LEAF[leaf]}' if stage == '0' else None


def _with_class_zero(state_dict: dict, config, num_boxes) -> dict:
  """The classification convs with the outputs our classes need (module docstring)."""
  m = config.model
  prefix = 'head.classification_head.module_list.'
  out = dict(state_dict)
  for i, n in enumerate(num_boxes):
    if f'{prefix}{i}.weight' not in state_dict or f'{prefix}{i}.bias' not in state_dict:
      continue  # reported as missing by mapping.fill
    w, b = np.asarray(state_dict[f'{prefix}{i}.weight']), np.asarray(state_dict[f'{prefix}{i}.bias'])
    theirs = w.shape[0] // n
    if theirs == m.num_classes + 1:
      continue
    if m.class_layout != 'category_id' or theirs != m.num_classes:
      raise ValueError(
        f'{prefix}{i} scores {theirs} classes (background included): set model.num_classes={theirs - 1} '
        f"(class k = label k + 1), or model.num_classes={theirs} with model.class_layout='category_id'"
      )
    w, b = w.reshape(n, theirs, *w.shape[1:]), b.reshape(n, theirs)
    w = np.concatenate([w[:, :1], np.zeros_like(w[:, :1]), w[:, 1:]], axis=1).reshape(-1, *w.shape[2:])
    b = np.concatenate([b[:, :1], np.full_like(b[:, :1], DEAD_CLASS_BIAS), b[:, 1:]], axis=1).reshape(-1)
    out[f'{prefix}{i}.weight'], out[f'{prefix}{i}.bias'] = w, b
  return out


def _check_vgg_config(config) -> None:
  s = config.model.ssd
  if config.model.family != 'ssd' or s.backbone != 'vgg16':
    raise ValueError("these weights are SSD's VGG-16: set model.family='ssd' and model.ssd.backbone='vgg16'")


def from_torchvision_ssd(state_dict: dict, config) -> dict:
  """torchvision ssd300_vgg16-style state dict -> variables for `build_model(config)`.

  The config must describe the same network (configs/ssd300_torchvision.py does for the published model): VGG-16
  SSD300, plain SSD (consistent.enabled=False), width_divisor 1; classes as in the module docstring.
  """
  _check_vgg_config(config)
  target = mapping.target_shapes(config)
  state_dict = _with_class_zero(state_dict, config, boxes_per_source(config.model.ssd))
  return mapping.fill(target, ssd_key, state_dict, ignore=lambda k: False)


def reduced_fc(state_dict: dict):
  """fc6 and fc7 of the SSD paper's base network from ImageNet vgg16's classifier ("we convert fc6 and fc7 to
  convolutional layers, subsample parameters from fc6 and fc7"; Caffe SSD's VGG_ILSVRC_16_layers_fc_reduced):
  every 4th output (and fc7 input) unit, 4096 -> 1024, and fc6's 7x7 window at every 3rd position, 7x7 -> 3x3, which
  dilation 6 spreads over the same extent on pool5's stride-16 map as the 7x7 window on the stride-32 one.

  Returns {'fc6': (weight [F/4, C, 3, 3], bias [F/4]), 'fc7': (weight [F/4, F/4, 1, 1], bias [F/4])} in torch layout
  (F = 4096, C = 512 for VGG-16), or None when the file has no classifier or a non-finite one (torchvision's
  IMAGENET1K_FEATURES weights keep only `features` valid).
  """
  keys = ('classifier.0.weight', 'classifier.0.bias', 'classifier.3.weight', 'classifier.3.bias')
  if not all(k in state_dict for k in keys):
    return None
  w6, b6, w7, b7 = (np.asarray(state_dict[k], np.float32) for k in keys)
  if not all(np.isfinite(x).all() for x in (w6, b6, w7, b7)):
    return None
  f = w6.shape[0]
  if w6.ndim != 2 or w6.shape[1] % 49 or f % 4 or w7.shape != (f, f):
    raise ValueError(f'classifier.0 / classifier.3 have shapes {w6.shape} / {w7.shape}, not those of a VGG')
  return {
    'fc6': (w6.reshape(f, -1, 7, 7)[::4, :, ::3, ::3], b6[::4]),
    'fc7': (w7[::4, ::4, None, None], b7[::4]),
  }


def from_torchvision_vgg16(state_dict: dict, config) -> dict:
  """torchvision vgg16 ImageNet state dict (`features.<i>`, `classifier.<i>`; a `features`-only file, with or
  without the prefix, too) -> {'params': {'backbone': ...}} of an SSD with backbone 'vgg16'.

  conv4_3_norm's scale gets its initial 20; fc6 and fc7 are `reduced_fc` of the classifier, or, when the file has
  none, left out (they keep their fresh initialization, as in torchvision's SSD). The 1000-way classifier.6 is
  dropped.
  """
  _check_vgg_config(config)
  if not any(k.startswith('features.') for k in state_dict):
    state_dict = {f'features.{k}': v for k, v in state_dict.items()}
  fc = reduced_fc(state_dict)
  target = mapping.backbone_target(config)
  if fc is None:
    logging.info('torchvision_vgg16 import: no usable classifier in the file; fc6 and fc7 keep their fresh init')
    target = {
      c: {'backbone': {k: v for k, v in t['backbone'].items() if k not in ('fc6', 'fc7')}} for c, t in target.items()
    }

  def derive(path, leaf):
    module, name = path[1], path[-1]
    if module == 'conv4_3_norm':
      return np.full(leaf.shape, vgg.L2_NORM_INIT, np.float32)
    if module in ('fc6', 'fc7'):
      arr = fc[module][0 if name == 'kernel' else 1]
      return mapping.torch_to_flax(f'classifier ({module})', arr, path, tuple(leaf.shape))
    return None

  key = lambda path: f'features.{vgg_index(path[1])}.{_LEAF[path[2]]}'
  return mapping.fill(target, key, state_dict, ignore=lambda k: k.startswith('classifier.'), derive=derive)
