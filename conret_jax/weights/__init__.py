"""Importers for pretrained weights: torchvision RetinaNet / ResNet, timm ResNet, Detectron (Caffe2) ImageNet ResNet;
torchvision SSD300-VGG16 and VGG-16 (weights/ssd.py). The importers share weights/mapping.py.

Nothing is downloaded: the user points at a file, read by conret_jax/weight_files.py into {name: np.ndarray}
(`load_state_dict` and `read_safetensors` are re-exported here).

Importers map names mechanically (our module names follow torchvision's; see model/resnet.py) and check every entry:
a state-dict key with no counterpart, a missing key, or a shape mismatch raises ValueError naming the key. Conv
kernels go from torch's [O, I, kh, kw] to flax's [kh, kw, I, O]. BatchNorm weight/bias/running_mean/running_var go to
scale/bias/mean/var in 'frozen' (backbone.norm='frozen_bn') or 'params' + 'batch_stats' ('bn'); eps is 1e-5 as in
torch. torchvision's legacy names (checkpoints saved before torchvision 0.13, e.g. the published COCO RetinaNet:
`head.*.conv.<2i>.weight`, `fpn.inner_blocks.<i>.weight`) are accepted too. Detectron's blobs (`res2_0_branch2a_w`,
`res2_0_branch2a_bn_s`, ...; Caffe2 convs are [O, I, kh, kw] like torch) are mapped in `from_detectron_resnet`.

Layout written by `conret-import` (conret_jax/cli/import_weights.py): DIR is an orbax StandardCheckpointer
checkpoint of a variables dict with the nesting of `init_variables`: {'params': {...}, 'frozen' | 'batch_stats':
{...}}. A RetinaNet or SSD import holds the whole tree; a ResNet or VGG-16 import holds only the 'backbone'
subtree of each collection. The trainer reads it through `config.init_from` (train/checkpoint.py:
`load_variables`, `init_from`, which copy the leaves that match by path and shape).
"""

import os
import re
import shutil
import tempfile

import numpy as np
from absl import logging

from conret_jax.errors import WorkdirError
from conret_jax.fileio import absolute, is_remote
from conret_jax.model.layers import BN_EPS
from conret_jax.model.resnet import DEPTHS
from conret_jax.weight_files import load_state_dict, read_safetensors  # noqa: F401 (re-exported)
from conret_jax.weights import mapping
from conret_jax.weights.ssd import from_torchvision_ssd, from_torchvision_vgg16  # noqa: F401 (re-exported)

_BN = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}
_CONV = {'kernel': 'weight', 'bias': 'bias'}


# ---------------------------------------------------------------------------------------------------- names


def _leaf_name(module: str, leaf: str) -> str:
  table = _BN if module.startswith('norm') or module == 'downsample_norm' else _CONV
  return table[leaf]


def resnet_key(path) -> str:
  """Our path inside the backbone, e.g. ('layer1', 'block0', 'downsample_norm', 'mean') -> torchvision's name
  'layer1.0.downsample.1.running_mean'."""
  parts = []
  for name in path[:-1]:
    if name.startswith('block'):
      parts.append(name[len('block') :])
    elif name in ('downsample_conv', 'downsample_norm'):
      parts += ['downsample', '0' if name == 'downsample_conv' else '1']
    elif name.startswith('norm'):
      parts.append('bn' + name[len('norm') :])
    else:
      parts.append(name)
  return '.'.join(parts + [_leaf_name(path[-2], path[-1])])


def _fpn_key(path, min_level: int):
  module, leaf = path
  m = re.fullmatch(r'(lateral|output)(\d)', module)
  if m:
    kind = 'inner_blocks' if m.group(1) == 'lateral' else 'layer_blocks'
    return f'{kind}.{int(m.group(2)) - min_level}.0.{_CONV[leaf]}'
  if module in ('p6', 'p7'):
    return f'extra_blocks.{module}.{_CONV[leaf]}'
  return None


def _head_key(path):
  branch = {'cls_tower': 'classification_head', 'box_tower': 'regression_head'}
  if path[0] in branch:  # ('cls_tower', 'conv0' | 'norm0', leaf)
    i, is_norm = int(re.sub(r'\D', '', path[1])), path[1].startswith('norm')
    return f'{branch[path[0]]}.conv.{i}.{1 if is_norm else 0}.{_CONV[path[2]]}'
  if path[0] == 'cls_pred':
    return f'classification_head.cls_logits.{_CONV[path[1]]}'
  if path[0] == 'box_pred0':
    return f'regression_head.bbox_reg.{_CONV[path[1]]}'
  return None  # extra consistent / cascade stages have no torchvision counterpart


def retinanet_key(path, min_level: int = 3):
  """Our path inside the model's variables (without the collection) -> torchvision RetinaNet name, or None."""
  if path[0] == 'backbone':
    return 'backbone.body.' + resnet_key(path[1:])
  if path[0] == 'fpn':
    key = _fpn_key(path[1:], min_level)
    return None if key is None else 'backbone.fpn.' + key
  key = _head_key(path[1:])
  return None if key is None else 'head.' + key


def upgrade_legacy_names(state_dict: dict) -> dict:
  """torchvision < 0.13 names -> current ones (head towers were Sequential(conv, relu, ...), FPN blocks bare convs)."""
  out = {}
  for k, v in state_dict.items():
    m = re.fullmatch(r'(head\.(?:classification|regression)_head\.conv)\.(\d+)\.(weight|bias)', k)
    if m:
      k = f'{m.group(1)}.{int(m.group(2)) // 2}.0.{m.group(3)}'
    m = re.fullmatch(r'(backbone\.fpn\.(?:inner|layer)_blocks)\.(\d+)\.(weight|bias)', k)
    if m:
      k = f'{m.group(1)}.{m.group(2)}.0.{m.group(3)}'
    out[k] = v
  return out


_DETECTRON_BRANCH = {
  'conv1': 'branch2a',
  'conv2': 'branch2b',
  'conv3': 'branch2c',
  'downsample_conv': 'branch1',
  'norm1': 'branch2a_bn',
  'norm2': 'branch2b_bn',
  'norm3': 'branch2c_bn',
  'downsample_norm': 'branch1_bn',
}
_DETECTRON_LEAF = {'kernel': 'w', 'scale': 's', 'bias': 'b'}


def detectron_key(path) -> str:
  """Our path inside the backbone -> Detectron's blob name: ('conv1', 'kernel') -> 'conv1_w', ('norm1', 'scale') ->
  'res_conv1_bn_s', ('layer1', 'block0', 'norm2', 'bias') -> 'res2_0_branch2b_bn_b' (layer<k> is res<k+1>).
  Norm means and variances have no blob (see `from_detectron_resnet`)."""
  *modules, leaf = path
  if len(modules) == 1:
    prefix = {'conv1': 'conv1', 'norm1': 'res_conv1_bn'}[modules[0]]
  else:
    layer, block, module = modules
    prefix = f'res{int(layer[len("layer") :]) + 1}_{block[len("block") :]}_{_DETECTRON_BRANCH[module]}'
  return f'{prefix}_{_DETECTRON_LEAF[leaf]}'


# ---------------------------------------------------------------------------------------------------- importers


def _check_config(config, source: str = 'torchvision/timm ResNets', stride_in_1x1: bool = False):
  b = config.model.backbone
  section, norm = ('ssd', config.model.ssd.norm) if config.model.family == 'ssd' else ('backbone', b.norm)
  if norm not in ('frozen_bn', 'bn'):
    raise ValueError(f"{source} use batch norm: set model.{section}.norm to 'frozen_bn' or 'bn', not {norm!r}")
  if b.stride_in_1x1 != stride_in_1x1:
    where = 'first 1x1' if stride_in_1x1 else '3x3'
    raise ValueError(f'{source} put the stride on the {where} conv: set backbone.stride_in_1x1={stride_in_1x1}')


def from_torchvision_retinanet(state_dict: dict, config) -> dict:
  """torchvision retinanet_resnet50_fpn-style state dict -> variables for `build_model(config)`.

  The config must describe the same network (configs/retinanet_torchvision.py does for the published model): plain
  RetinaNet (consistent.enabled=False, head.variant 'consistent'), fpn.p6_from='p5', batch-norm backbone.
  """
  _check_config(config)
  state_dict = upgrade_legacy_names(state_dict)
  target = mapping.target_shapes(config)
  return mapping.fill(target, lambda p: retinanet_key(p, config.model.fpn.min_level), state_dict, mapping.tracked)


def _import_resnet(state_dict: dict, config, classifier_prefix: str) -> dict:
  """The backbone's variables; the file's stages that the backbone does not have (an SSD trunk ends at layer3) are
  left out, like its classifier."""
  _check_config(config)
  target = mapping.backbone_target(config)
  built = {name for tree in target.values() for name in tree['backbone']}
  unbuilt = {f'layer{k}' for k in range(1, 5)} - built  # a ResNet's stages; any other name stays an error
  ignore = lambda k: mapping.tracked(k) or k.startswith(classifier_prefix) or k.split('.')[0] in unbuilt
  return mapping.fill(target, lambda p: resnet_key(p[1:]), state_dict, ignore)


def from_torchvision_resnet(state_dict: dict, config) -> dict:
  """torchvision resnet{18..152} ImageNet state dict -> {collection: {'backbone': ...}} (the classifier `fc` is
  dropped)."""
  return _import_resnet(state_dict, config, 'fc.')


def from_timm_resnet(state_dict: dict, config) -> dict:
  """timm plain ResNet (resnet18..152, e.g. `*.a1_in1k`, `*.tv_in1k` .safetensors) -> backbone variables.

  timm's plain ResNets use torchvision's names (conv1, bn1, layer<k>.<j>.conv<i>/bn<i>, downsample.0/1, fc). Deep-stem
  or avg-down variants (resnet50d: conv1.0, downsample.1 as conv...) are a different network and are rejected with
  the offending keys named.
  """
  return _import_resnet(state_dict, config, 'fc.')


# Biases the Caffe -> Caffe2 conversion gives every conv (zeros where the Caffe model had none); Detectron's ResNet
# convs have no bias and its weight loader skips blobs the network lacks.
_DETECTRON_CONV_BIAS = re.compile(r'(conv1|res\d+_\d+_branch(1|2[abc]))_b')


def _affine_channel_stats(path, leaf):
  """Mean 0 and var 1 - eps for every norm. In float32 var + eps rounds to exactly 1.0 (the exact sum of the two
  float32 values is 1 - 1.36e-8, nearer 1 than the next float32 below, 1 - 5.96e-8), so Norm's multiplier
  scale * rsqrt(var + eps) is `scale` and its shift bias - mean * multiplier is `bias`: y = s * x + b exactly."""
  if path[-1] == 'mean':
    return np.zeros(leaf.shape, np.float32)
  if path[-1] == 'var':
    return np.full(leaf.shape, 1 - BN_EPS, np.float32)
  return None


def from_detectron_resnet(blobs: dict, config) -> dict:
  """Detectron (Caffe2) ImageNet ResNet blobs (R-50.pkl, R-101.pkl, R-152.pkl) -> {collection: {'backbone': ...}}.

  The paper's own backbone weights. Detectron's ResNet puts the stride on each bottleneck's first 1x1 conv (the config
  must set backbone.stride_in_1x1=True), uses affine-channel norms (backbone.norm 'frozen_bn', or 'bn') and reads BGR
  images minus BGR means. Conversions:
    conv1_w             input channels flipped from BGR to RGB: on an RGB image normalized with
                        defaults.DETECTRON_PIXEL_MEAN_RGB / DETECTRON_PIXEL_STD our conv1 computes the same sums as
                        Detectron's on that image in BGR minus its BGR means (the same terms, in another order).
    <x>_bn_s, <x>_bn_b  the affine channel y = s * x + b (BN statistics already folded in) -> scale s, bias b, mean 0,
                        var 1 - eps, which our Norm turns back into exactly s * x + b (`_affine_channel_stats`).
    <conv>_b            conv biases, which the Caffe -> Caffe2 conversion gives every conv (zeros where the Caffe
                        model had none): dropped, as Detectron's convs have no bias; a non-zero one is logged.
    fc1000_w, fc1000_b  the ImageNet classifier, dropped; '*_momentum' blobs (SGD state) too.
  Every other blob must map to a model variable and every variable must be found with its shape, or ValueError names
  them (names in `detectron_key`).
  """
  _check_config(config, 'Detectron (Caffe2) ResNets', stride_in_1x1=True)
  depth = config.model.backbone.depth
  if DEPTHS.get(depth, ('',))[0] != 'bottleneck':
    raise ValueError(
      f'Detectron ImageNet ResNets are bottleneck networks: set model.backbone.depth to 50, 101 or 152, not {depth}'
    )
  blobs = dict(blobs)
  if np.ndim(blobs.get('conv1_w')) == 4:
    blobs['conv1_w'] = np.asarray(blobs['conv1_w'])[:, ::-1]  # [O, I, kh, kw], I in BGR order -> RGB
  biased = sorted(k for k, v in blobs.items() if _DETECTRON_CONV_BIAS.fullmatch(k) and np.any(v))
  if biased:
    logging.warning('Detectron import: dropping non-zero conv biases, as Detectron does: %s', biased)
  ignore = lambda k: k.endswith('_momentum') or k.startswith('fc1000_') or _DETECTRON_CONV_BIAS.fullmatch(k)
  target = mapping.backbone_target(config)
  return mapping.fill(target, lambda p: detectron_key(p[1:]), blobs, ignore, _affine_channel_stats)


# ---------------------------------------------------------------------------------------------------- checkpoints


def _staging_folder(directory: str) -> str:
  """A new empty hidden folder next to local `directory` (in its nearest existing parent, so on its filesystem), or
  WorkdirError saying why none can be made there."""
  target = absolute(directory)
  existing = os.path.dirname(target)
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  try:
    return tempfile.mkdtemp(prefix=f'.{os.path.basename(target)}.', suffix='.partial', dir=existing)
  except OSError as e:
    raise WorkdirError(f'cannot write {directory}: {e.strerror or e} ({existing})') from None


def check_output(directory: str) -> None:
  """WorkdirError, in one line and in milliseconds, unless a checkpoint can be written at `directory`: the folder it
  goes in must take a new folder (one is made and removed to find out). Meant for before the weights are read:
  orbax, asked to write where it cannot, waited minutes on its timeouts. Remote (gs://) directories are not checked.
  """
  if not is_remote(directory):
    os.rmdir(_staging_folder(directory))


def save_imported(directory: str, variables: dict) -> None:
  """Write `variables` as an orbax StandardCheckpointer checkpoint at `directory` (must not exist yet).

  A local checkpoint is written into a hidden folder next to `directory` and moved into place with one rename when
  complete, so `directory` never holds half a checkpoint; missing parents are made only for that move, and an
  error leaves nothing behind (WorkdirError for a failed write). Written synchronously, with the handler
  StandardCheckpointer uses (the same files): its background write, when it failed, left the tool waiting minutes on
  orbax's timeouts. A remote (gs://) directory is written in place: orbax commits it atomically itself.
  """
  import orbax.checkpoint as ocp

  def write(path):
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
      checkpointer.save(path, variables)

  if is_remote(directory):
    write(directory)
    return
  target = absolute(directory)
  staging = _staging_folder(directory)
  try:
    write(os.path.join(staging, 'checkpoint'))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.rename(os.path.join(staging, 'checkpoint'), target)
  except OSError as e:
    raise WorkdirError(f'cannot write {directory}: {e.strerror or e}') from None
  finally:
    shutil.rmtree(staging, ignore_errors=True)
