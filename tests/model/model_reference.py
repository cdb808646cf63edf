"""NumPy references (float64, torchvision semantics, torch layouts) and torchvision-named random state dicts for
the model tests. Written from torchvision's documented architecture, independently of conret_jax.model."""

import math
import re

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from conret_jax.defaults import base_config

BLOCKS = {18: ('basic', (2, 2, 2, 2)), 34: ('basic', (3, 4, 6, 3)), 50: ('bottleneck', (3, 4, 6, 3))}


def tiny_config(num_classes=3, depth=18, width=8, channels=16, **overrides):
  """A tiny torchvision-shaped config (P6 from P5, batch norm) for forward tests at 128x128."""
  c = base_config()
  c.model.num_classes = num_classes
  c.model.backbone.depth = depth
  c.model.backbone.width = width
  c.model.fpn.channels = channels
  c.model.head.channels = channels
  c.model.head.num_convs = 2
  c.model.fpn.p6_from = 'p5'
  c.consistent.enabled = False
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


# ------------------------------------------------------------------------------------------------ layers


def conv(x, w, b=None, stride=1):
  """x [B, H, W, I] NHWC, w [O, I, kh, kw] (torch), symmetric padding k // 2."""
  kh, kw = w.shape[2:]
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  win = sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]  # [B, H', W', I, kh, kw]
  y = np.einsum('bhwcij,ocij->bhwo', win, np.asarray(w, np.float64))
  return y if b is None else y + b


def batch_norm(x, sd, name, eps=1e-5):
  g, b, m, v = (sd[f'{name}.{k}'] for k in ('weight', 'bias', 'running_mean', 'running_var'))
  return (x - m) / np.sqrt(v + eps) * g + b


def group_norm(x, scale, bias, groups, eps=1e-5):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def max_pool_3x3_s2(x):
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  return sliding_window_view(xp, (3, 3), axis=(1, 2))[:, ::2, ::2].max(axis=(-1, -2))


relu = lambda x: np.maximum(x, 0)


# ------------------------------------------------------------------------------------------------ networks


def resnet(sd, prefix, depth, x, stride_in_1x1=False):
  """torchvision ResNet trunk on normalized NHWC input -> (C3, C4, C5)."""
  kind, counts = BLOCKS[depth]
  p = prefix
  x = relu(batch_norm(conv(x, sd[p + 'conv1.weight'], stride=2), sd, p + 'bn1'))
  x = max_pool_3x3_s2(x)
  outs = []
  for i, n in enumerate(counts):
    for j in range(n):
      q = f'{p}layer{i + 1}.{j}.'
      stride = 2 if (i > 0 and j == 0) else 1
      if kind == 'basic':
        y = relu(batch_norm(conv(x, sd[q + 'conv1.weight'], stride=stride), sd, q + 'bn1'))
        y = batch_norm(conv(y, sd[q + 'conv2.weight']), sd, q + 'bn2')
      else:
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        y = relu(batch_norm(conv(x, sd[q + 'conv1.weight'], stride=s1), sd, q + 'bn1'))
        y = relu(batch_norm(conv(y, sd[q + 'conv2.weight'], stride=s3), sd, q + 'bn2'))
        y = batch_norm(conv(y, sd[q + 'conv3.weight']), sd, q + 'bn3')
      if q + 'downsample.0.weight' in sd:
        x = batch_norm(conv(x, sd[q + 'downsample.0.weight'], stride=stride), sd, q + 'downsample.1')
      x = relu(y + x)
    outs.append(x)
  return tuple(outs[1:])


def fpn(sd, prefix, feats, p6_from='p5'):
  """torchvision FeaturePyramidNetwork + LastLevelP6P7 -> [P3, ..., P7]."""
  p = prefix
  layer = lambda kind, i, x, stride=1: conv(x, sd[f'{p}{kind}.{i}.0.weight'], sd[f'{p}{kind}.{i}.0.bias'], stride)
  inner = layer('inner_blocks', 2, feats[2])
  outs = [layer('layer_blocks', 2, inner)]
  for i in (1, 0):
    inner = layer('inner_blocks', i, feats[i]) + inner.repeat(2, axis=1).repeat(2, axis=2)
    outs.insert(0, layer('layer_blocks', i, inner))
  src = outs[-1] if p6_from == 'p5' else feats[2]
  p6 = conv(src, sd[p + 'extra_blocks.p6.weight'], sd[p + 'extra_blocks.p6.bias'], 2)
  p7 = conv(relu(p6), sd[p + 'extra_blocks.p7.weight'], sd[p + 'extra_blocks.p7.bias'], 2)
  return outs + [p6, p7]


def head(sd, prefix, pyramid, num_convs, num_classes):
  """torchvision RetinaNetHead -> (cls [B, sum H*W*A, K], box [B, sum H*W*A, 4])."""

  def branch(name, pred, per):
    outs = []
    for x in pyramid:
      for i in range(num_convs):
        x = relu(conv(x, sd[f'{prefix}{name}.conv.{i}.0.weight'], sd[f'{prefix}{name}.conv.{i}.0.bias']))
      y = conv(x, sd[f'{prefix}{name}.{pred}.weight'], sd[f'{prefix}{name}.{pred}.bias'])
      outs.append(y.reshape(y.shape[0], -1, per))
    return np.concatenate(outs, axis=1)

  return branch('classification_head', 'cls_logits', num_classes), branch('regression_head', 'bbox_reg', 4)


def retinanet(sd, images, config):
  m = config.model
  x = (np.asarray(images, np.float64) - np.asarray(m.pixel_mean)) / np.asarray(m.pixel_std)
  feats = resnet(sd, 'backbone.body.', m.backbone.depth, x)
  pyramid = fpn(sd, 'backbone.fpn.', feats, m.fpn.p6_from)
  return head(sd, 'head.', pyramid, m.head.num_convs, m.num_classes)


# ------------------------------------------------------------------------------------------------ state dicts


def _conv_w(rng, o, i, k, std=None):
  std = math.sqrt(2.0 / (i * k * k)) if std is None else std
  return (rng.standard_normal((o, i, k, k)) * std).astype(np.float32)


def _bn(rng, sd, name, c):
  sd[name + '.weight'] = rng.uniform(0.5, 1.5, c).astype(np.float32)
  sd[name + '.bias'] = rng.normal(0, 0.1, c).astype(np.float32)
  sd[name + '.running_mean'] = rng.normal(0, 0.1, c).astype(np.float32)
  sd[name + '.running_var'] = rng.uniform(0.5, 1.5, c).astype(np.float32)
  sd[name + '.num_batches_tracked'] = np.array(7, np.int64)


def resnet_state_dict(rng, depth=18, width=8, prefix='', with_fc=False):
  """Random torchvision ResNet state dict (BN buffers included)."""
  kind, counts = BLOCKS[depth]
  exp = 4 if kind == 'bottleneck' else 1
  sd = {prefix + 'conv1.weight': _conv_w(rng, width, 3, 7)}
  _bn(rng, sd, prefix + 'bn1', width)
  cin = width
  for i, n in enumerate(counts):
    w = width * 2**i
    for j in range(n):
      q = f'{prefix}layer{i + 1}.{j}.'
      if kind == 'basic':
        shapes = [(w, cin, 3), (w, w, 3)]
      else:
        shapes = [(w, cin, 1), (w, w, 3), (w * exp, w, 1)]
      for t, (o, ii, k) in enumerate(shapes, 1):
        sd[f'{q}conv{t}.weight'] = _conv_w(rng, o, ii, k)
        _bn(rng, sd, f'{q}bn{t}', o)
      if j == 0 and (i > 0 or cin != w * exp):
        sd[q + 'downsample.0.weight'] = _conv_w(rng, w * exp, cin, 1)
        _bn(rng, sd, q + 'downsample.1', w * exp)
      cin = w * exp
  if with_fc:
    sd[prefix + 'fc.weight'] = rng.standard_normal((10, cin)).astype(np.float32)
    sd[prefix + 'fc.bias'] = np.zeros(10, np.float32)
  return sd, cin


def affine_resnet_state_dict(rng, depth=50, width=8, eps=1e-5):
  """Random torchvision ResNet state dict (with fc) whose BN statistics are mean 0 and var 1 - eps: each BN is the
  affine map weight * x + bias, which is what Detectron's folded affine channels store."""
  sd, _ = resnet_state_dict(rng, depth, width, with_fc=True)
  for k in sd:
    if k.endswith('running_mean'):
      sd[k] = np.zeros_like(sd[k])
    elif k.endswith('running_var'):
      sd[k] = np.full_like(sd[k], 1 - eps)
  return sd


_C2_BLOCK = {
  'conv1': 'branch2a',
  'conv2': 'branch2b',
  'conv3': 'branch2c',
  'downsample.0': 'branch1',
  'bn1': 'branch2a_bn',
  'bn2': 'branch2b_bn',
  'bn3': 'branch2c_bn',
  'downsample.1': 'branch1_bn',
}
_C2_LEAF = {'weight': ('w', 's'), 'bias': ('b', 'b')}  # (conv, affine channel)


def detectron_blobs(sd):
  """`affine_resnet_state_dict`'s network as Detectron's R-50.pkl names it (tools/pickle_caffe_blobs.py naming):
  conv1_w (input channels in BGR order), res_conv1_bn_{s,b}, res<k+1>_<j>_branch2{a,b,c}_w / _bn_{s,b},
  res<k+1>_<j>_branch1_w / _bn_{s,b}, a zero <conv>_b for every conv (the Caffe conversion adds them), fc1000_{w,b}."""
  blobs = {}
  for name, value in sd.items():
    if name.endswith(('running_mean', 'running_var', 'num_batches_tracked')):
      continue
    module, leaf = name.rsplit('.', 1)
    m = re.fullmatch(r'layer(\d)\.(\d+)\.(.+)', module)
    if m:
      prefix = f'res{int(m.group(1)) + 1}_{m.group(2)}_{_C2_BLOCK[m.group(3)]}'
    else:
      prefix = {'conv1': 'conv1', 'bn1': 'res_conv1_bn', 'fc': 'fc1000'}[module]
    affine = prefix.endswith('_bn')
    blobs[f'{prefix}_{_C2_LEAF[leaf][affine]}'] = value
    if value.ndim == 4:
      blobs[prefix + '_b'] = np.zeros(value.shape[0], np.float32)
  blobs['conv1_w'] = blobs['conv1_w'][:, ::-1].copy()  # RGB -> BGR
  return blobs


def retinanet_state_dict(rng, config):
  """Random torchvision RetinaNet state dict for a (tiny) torchvision-shaped config."""
  m = config.model
  sd, c5 = resnet_state_dict(rng, m.backbone.depth, m.backbone.width, 'backbone.body.')
  c, k = m.fpn.channels, m.num_classes
  a = len(m.anchors.aspect_ratios) * (len(m.anchors.sizes[0]) if m.anchors.sizes else m.anchors.scales_per_octave)
  bias = lambda n: rng.normal(0, 0.1, n).astype(np.float32)
  for i, cin in enumerate((c5 // 4, c5 // 2, c5)):
    sd[f'backbone.fpn.inner_blocks.{i}.0.weight'], sd[f'backbone.fpn.inner_blocks.{i}.0.bias'] = (
      _conv_w(rng, c, cin, 1, std=math.sqrt(1 / cin)),
      bias(c),
    )
    sd[f'backbone.fpn.layer_blocks.{i}.0.weight'], sd[f'backbone.fpn.layer_blocks.{i}.0.bias'] = (
      _conv_w(rng, c, c, 3, std=math.sqrt(1 / (9 * c))),
      bias(c),
    )
  p6_in = c if m.fpn.p6_from == 'p5' else c5
  sd['backbone.fpn.extra_blocks.p6.weight'], sd['backbone.fpn.extra_blocks.p6.bias'] = (
    _conv_w(rng, c, p6_in, 3, std=math.sqrt(1 / (9 * p6_in))),
    bias(c),
  )
  sd['backbone.fpn.extra_blocks.p7.weight'], sd['backbone.fpn.extra_blocks.p7.bias'] = (
    _conv_w(rng, c, c, 3, std=math.sqrt(1 / (9 * c))),
    bias(c),
  )
  for name, pred, out in (('classification_head', 'cls_logits', a * k), ('regression_head', 'bbox_reg', a * 4)):
    for i in range(m.head.num_convs):
      sd[f'head.{name}.conv.{i}.0.weight'] = _conv_w(rng, c, c, 3)
      sd[f'head.{name}.conv.{i}.0.bias'] = bias(c)
    sd[f'head.{name}.{pred}.weight'] = _conv_w(rng, out, c, 3, std=math.sqrt(1 / (9 * c)))
    sd[f'head.{name}.{pred}.bias'] = bias(out)
  return sd


def assert_close(actual, expected, rel=1e-4):
  """Elementwise |a - e| <= rel * (max |e| + |e|): float32 against a float64 reference."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  tol = rel * (np.abs(expected).max() + np.abs(expected))
  err = np.abs(actual - expected)
  assert np.all(err <= tol), f'max error {err.max():.3g}, scale {np.abs(expected).max():.3g}'


def random_like(shapes, seed=0):
  """Random float32 NumPy variables shaped like `shapes` (from jax.eval_shape of an init), without compiling an init:
  kernels ~ N(0, 1/fan_in), scales and variances ~ U(0.5, 1.5), biases and means ~ N(0, 0.1)."""
  import jax

  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == 'kernel':
      return (rng.standard_normal(s.shape) / math.sqrt(math.prod(s.shape[:-1]))).astype(np.float32)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return rng.normal(0, 0.1, s.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)
