"""Importers for pretrained weights (torchvision RetinaNet / ResNet, timm ResNet) and state-dict file loaders.

Nothing is downloaded: the user points at a file. Loaders return {name: np.ndarray}:
  .safetensors  read with the `safetensors` package when installed, else with a small NumPy reader (the format is
                an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, the data)
  .npz          numpy
  .pth / .pt    needs torch; loaded with torch.load(weights_only=True) (no pickle code execution)

Importers map names mechanically (our module names follow torchvision's; see model/resnet.py) and check every entry:
a state-dict key with no counterpart, a missing key, or a shape mismatch raises ValueError naming the key. Conv
kernels go from torch's [O, I, kh, kw] to flax's [kh, kw, I, O]. BatchNorm weight/bias/running_mean/running_var go to
scale/bias/mean/var in 'frozen' (backbone.norm='frozen_bn') or 'params' + 'batch_stats' ('bn'); eps is 1e-5 as in
torch. torchvision's legacy names (checkpoints saved before torchvision 0.13, e.g. the published COCO RetinaNet:
`head.*.conv.<2i>.weight`, `fpn.inner_blocks.<i>.weight`) are accepted too.

Layout written by `conret-import` (conret_jax/cli/import_weights.py): DIR is an orbax StandardCheckpointer
checkpoint of a variables dict with the nesting of `init_variables`: {'params': {...}, 'frozen' | 'batch_stats':
{...}}. A RetinaNet import holds the whole tree; a ResNet import holds only the 'backbone' subtree of each
collection. The trainer reads it through `config.init_from` (train/checkpoint.py: `load_variables`, `init_from`,
which copy the leaves that match by path and shape).
"""

import json
import os
import re
import struct

import jax
import numpy as np

from conret_jax.model import detector

_BN = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}
_CONV = {'kernel': 'weight', 'bias': 'bias'}


# ---------------------------------------------------------------------------------------------------- loaders

_ST_DTYPES = {'F64': '<f8', 'F32': '<f4', 'F16': '<f2', 'I64': '<i8', 'I32': '<i4', 'I16': '<i2', 'I8': 'i1',
              'U8': 'u1', 'BOOL': '?', 'BF16': '<u2'}


def read_safetensors(path: str) -> dict:
  """{name: np.ndarray} from a .safetensors file, with NumPy only (BF16 is widened to float32)."""
  with open(path, 'rb') as f:
    data = f.read()
  (n,) = struct.unpack('<Q', data[:8])
  header = json.loads(data[8:8 + n])
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if info['dtype'] not in _ST_DTYPES:
      raise ValueError(f'{path}: tensor {name!r} has unsupported dtype {info["dtype"]}')
    dtype = np.dtype(_ST_DTYPES[info['dtype']])
    begin, end = info['data_offsets']
    count = int(np.prod(info['shape'], dtype=np.int64))
    if end - begin != count * dtype.itemsize:
      raise ValueError(f'{path}: tensor {name!r} has {end - begin} bytes for shape {info["shape"]}')
    arr = np.frombuffer(data, dtype, count, offset=8 + n + begin).reshape(info['shape'])
    if info['dtype'] == 'BF16':
      arr = (arr.astype(np.uint32) << 16).view(np.float32)
    out[name] = arr
  return out


def _load_torch(path: str) -> dict:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'{path}: .pth files need torch; convert to .safetensors or .npz, or install torch') from e
  obj = torch.load(path, map_location='cpu', weights_only=True)
  for wrapper in ('model', 'state_dict'):  # training checkpoints nest the state dict
    if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
      obj = obj[wrapper]
  return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in obj.items() if hasattr(v, 'numpy')}


def load_state_dict(path: str) -> dict:
  """{name: np.ndarray} from .safetensors, .npz or .pth/.pt/.bin (torch)."""
  ext = os.path.splitext(path)[1].lower()
  if ext == '.safetensors':
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError:
      return read_safetensors(path)
    return {k: np.asarray(v) for k, v in load_file(path).items()}
  if ext == '.npz':
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  if ext in ('.pth', '.pt', '.bin'):
    return _load_torch(path)
  raise ValueError(f'{path}: unknown weight file type {ext!r} (expected .safetensors, .npz, .pth)')


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
      parts.append(name[len('block'):])
    elif name in ('downsample_conv', 'downsample_norm'):
      parts += ['downsample', '0' if name == 'downsample_conv' else '1']
    elif name.startswith('norm'):
      parts.append('bn' + name[len('norm'):])
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


# ---------------------------------------------------------------------------------------------------- importers

def _target_shapes(config) -> dict:
  model = detector.build_model(config)
  side = 2**config.model.fpn.max_level
  return jax.eval_shape(lambda: detector.init_variables(model, jax.random.key(0), (side, side)))


def _check_config(config):
  b = config.model.backbone
  if b.norm not in ('frozen_bn', 'bn'):
    raise ValueError(f"torchvision/timm ResNets use batch norm: set model.backbone.norm to 'frozen_bn' or 'bn', "
                     f'not {b.norm!r}')
  if b.stride_in_1x1:
    raise ValueError('torchvision/timm ResNets put the stride on the 3x3 conv: set backbone.stride_in_1x1=False')


def _fill(target: dict, key_fn, state_dict: dict, ignore) -> dict:
  """Map every leaf of `target` ({collection: tree of ShapeDtypeStruct}) to its state-dict entry, checked."""
  sd = {k: v for k, v in state_dict.items() if not ignore(k)}
  used, missing, unmapped, out = set(), [], [], {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    names = tuple(p.key for p in path)
    key = key_fn(names[1:])
    if key is None:
      unmapped.append('/'.join(names))
      continue
    if key not in sd:
      missing.append(key)
      continue
    arr = np.asarray(sd[key])
    used.add(key)
    want = tuple(leaf.shape)
    if names[-1] == 'kernel':
      want_torch = (want[3], want[2], want[0], want[1])
      if arr.shape != want_torch:
        raise ValueError(f'{key}: shape {arr.shape}, expected {want_torch} (for {"/".join(names)})')
      arr = arr.transpose(2, 3, 1, 0)
    elif arr.shape != want:
      raise ValueError(f'{key}: shape {arr.shape}, expected {want} (for {"/".join(names)})')
    node = out
    for name in names[:-1]:
      node = node.setdefault(name, {})
    node[names[-1]] = np.ascontiguousarray(arr, dtype=np.float32)
  unexpected = sorted(set(sd) - used)
  problems = []
  if unexpected:
    problems.append(f'unexpected keys (no counterpart in the config\'s model): {unexpected[:8]}')
  if missing:
    problems.append(f'missing keys: {missing[:8]}')
  if unmapped:
    problems.append(f'model variables with no counterpart in this format: {unmapped[:8]}')
  if problems:
    raise ValueError('; '.join(problems) + (f' ({len(unexpected)} unexpected, {len(missing)} missing in all)'))
  return out


def _tracked(k: str) -> bool:
  return k.endswith('num_batches_tracked')


def from_torchvision_retinanet(state_dict: dict, config) -> dict:
  """torchvision retinanet_resnet50_fpn-style state dict -> variables for `build_model(config)`.

  The config must describe the same network (configs/retinanet_torchvision.py does for the published model): plain
  RetinaNet (consistent.enabled=False, head.variant 'consistent'), fpn.p6_from='p5', batch-norm backbone.
  """
  _check_config(config)
  state_dict = upgrade_legacy_names(state_dict)
  target = _target_shapes(config)
  return _fill(target, lambda p: retinanet_key(p, config.model.fpn.min_level), state_dict, _tracked)


def _import_resnet(state_dict: dict, config, classifier_prefix: str) -> dict:
  _check_config(config)
  target = {c: {'backbone': tree['backbone']} for c, tree in _target_shapes(config).items() if 'backbone' in tree}
  ignore = lambda k: _tracked(k) or k.startswith(classifier_prefix)
  return _fill(target, lambda p: resnet_key(p[1:]), state_dict, ignore)


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


# ---------------------------------------------------------------------------------------------------- checkpoints

def save_imported(directory: str, variables: dict) -> None:
  """Write `variables` as an orbax StandardCheckpointer checkpoint at `directory` (must not exist yet)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as ckptr:
    from conret_jax.train.checkpoint import absolute  # pylint: disable=g-import-not-at-top
    ckptr.save(absolute(directory), variables)
    ckptr.wait_until_finished()
