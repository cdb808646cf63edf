"""NumPy references (float64, torch layouts and torchvision's names) of SSD's networks, written from torchvision's
ssd300_vgg16 (SSDFeatureExtractorVGG, SSDHead) and NVIDIA's SSD-ResNet, independently of conret_jax.model: the
layers are spelled out here as torchvision's Sequential indices, not derived from the model's tables."""

import math

import model_reference as ref
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

relu = ref.relu

# torchvision vgg16 `features` (the convs' indices and channels; pools at 4, 9, 16, 23, 30).
VGG_CONVS = {
  0: 64,
  2: 64,
  5: 128,
  7: 128,
  10: 256,
  12: 256,
  14: 256,
  17: 512,
  19: 512,
  21: 512,
  24: 512,
  26: 512,
  28: 512,
}
# (1x1 out, second conv out, kernel, stride, padding) of torchvision's SSD300 extra.1 .. extra.4, and Caffe's SSD512.
EXTRAS_300 = ((256, 512, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 1, 0), (128, 256, 3, 1, 0))
EXTRAS_512 = ((256, 512, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 3, 2, 1), (128, 256, 4, 1, 1))


def conv(x, w, b=None, stride=1, pad=None, dilation=1):
  """x [B, H, W, I] NHWC, w [O, I, kh, kw] (torch); symmetric `pad` (default dilation * (k // 2))."""
  k = w.shape[2]
  pad = dilation * (k // 2) if pad is None else pad
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  span = dilation * (k - 1) + 1
  win = sliding_window_view(xp, (span, span), axis=(1, 2))[:, ::stride, ::stride, :, ::dilation, ::dilation]
  y = np.einsum('bhwcij,ocij->bhwo', win, np.asarray(w, np.float64))
  return y if b is None else y + b


def max_pool(x, k, stride, pad=0, ceil=False):
  h, w = x.shape[1:3]
  extra = lambda n: (-(n + 2 * pad - k) % stride) if ceil else 0
  xp = np.pad(x, ((0, 0), (pad, pad + extra(h)), (pad, pad + extra(w)), (0, 0)), constant_values=-np.inf)
  return sliding_window_view(xp, (k, k), axis=(1, 2))[:, ::stride, ::stride].max(axis=(-1, -2))


def vgg_sources(sd, x):
  """torchvision's SSDFeatureExtractorVGG base: (scale_weight * normalize(conv4_3), fc7)."""
  for i in range(23):
    if i in VGG_CONVS:
      x = relu(conv(x, sd[f'backbone.features.{i}.weight'], sd[f'backbone.features.{i}.bias']))
    elif i in (4, 9, 16):
      x = max_pool(x, 2, 2, ceil=i == 16)
  norm = np.sqrt(np.sum(x * x, axis=-1, keepdims=True))
  first = x / np.maximum(norm, 1e-12) * sd['backbone.scale_weight']
  x = max_pool(x, 2, 2)  # extra.0.0 = pool4
  for local in (1, 3, 5):  # conv5_1 .. conv5_3
    x = relu(conv(x, sd[f'backbone.extra.0.{local}.weight'], sd[f'backbone.extra.0.{local}.bias']))
  x = max_pool(x, 3, 1, pad=1)
  x = relu(conv(x, sd['backbone.extra.0.7.1.weight'], sd['backbone.extra.0.7.1.bias'], dilation=6))
  x = relu(conv(x, sd['backbone.extra.0.7.3.weight'], sd['backbone.extra.0.7.3.bias']))
  return [first, x]


def extras(sd, x, layers):
  out = []
  for k, (_, _, kernel, stride, pad) in enumerate(layers):
    p = f'backbone.extra.{k + 1}.'
    x = relu(conv(x, sd[p + '0.weight'], sd[p + '0.bias']))
    x = relu(conv(x, sd[p + '2.weight'], sd[p + '2.bias'], stride=stride, pad=pad))
    out.append(x)
  return out


def head(sd, sources, num_outputs):
  """SSDHead: per source a 3x3 conv, (N, H, W, n * C) -> (N, H * W * n, C), concatenated."""
  cls, box = [], []
  for i, x in enumerate(sources):
    for name, c, out in (('classification_head', num_outputs, cls), ('regression_head', 4, box)):
      y = conv(x, sd[f'head.{name}.module_list.{i}.weight'], sd[f'head.{name}.module_list.{i}.bias'])
      out.append(y.reshape(y.shape[0], -1, c))
  return np.concatenate(cls, axis=1), np.concatenate(box, axis=1)


def ssd_vgg(sd, images, pixel_mean, pixel_std, layers, num_outputs):
  x = (np.asarray(images, np.float64) - np.asarray(pixel_mean)) / np.asarray(pixel_std)
  sources = vgg_sources(sd, x)
  return head(sd, sources + extras(sd, sources[-1], layers), num_outputs)


def _w(rng, o, i, k):
  return (rng.standard_normal((o, i, k, k)) * math.sqrt(2.0 / (i * k * k))).astype(np.float32)


def _b(rng, o):
  return rng.normal(0, 0.1, o).astype(np.float32)


def ssd_vgg_state_dict(rng, divisor, num_outputs, boxes, layers=EXTRAS_300):
  """A random torchvision-named SSD-VGG16 state dict with every channel count divided by `divisor`; `boxes` per
  source, num_outputs classes per box (background included)."""
  sd, cin = {}, 3
  for i, c in VGG_CONVS.items():
    name = f'backbone.features.{i}' if i < 23 else f'backbone.extra.0.{i - 23}'
    sd[name + '.weight'], sd[name + '.bias'] = _w(rng, c // divisor, cin, 3), _b(rng, c // divisor)
    cin = c // divisor
  sd['backbone.scale_weight'] = rng.uniform(10, 30, cin).astype(np.float32)
  fc = 1024 // divisor
  sd['backbone.extra.0.7.1.weight'], sd['backbone.extra.0.7.1.bias'] = _w(rng, fc, cin, 3), _b(rng, fc)
  sd['backbone.extra.0.7.3.weight'], sd['backbone.extra.0.7.3.bias'] = _w(rng, fc, fc, 1), _b(rng, fc)
  channels, cin = [512 // divisor, fc], fc
  for k, (mid, out, kernel, _, _) in enumerate(layers):
    p = f'backbone.extra.{k + 1}.'
    sd[p + '0.weight'], sd[p + '0.bias'] = _w(rng, mid // divisor, cin, 1), _b(rng, mid // divisor)
    sd[p + '2.weight'], sd[p + '2.bias'] = _w(rng, out // divisor, mid // divisor, kernel), _b(rng, out // divisor)
    cin = out // divisor
    channels.append(cin)
  for i, (c, n) in enumerate(zip(channels, boxes)):
    for name, per in (('classification_head', num_outputs), ('regression_head', 4)):
      sd[f'head.{name}.module_list.{i}.weight'] = _w(rng, n * per, c, 3)
      sd[f'head.{name}.module_list.{i}.bias'] = _b(rng, n * per)
  return sd


def ssd_resnet_trunk(sd, x, depth):
  """NVIDIA's SSD-ResNet trunk: torchvision's ResNet through layer3, whose first block has stride 1 -> conv4_x."""
  kind, counts = ref.BLOCKS[depth]
  x = relu(ref.batch_norm(conv(x, sd['conv1.weight'], stride=2), sd, 'bn1'))
  x = max_pool(x, 3, 2, pad=1)
  for i, n in enumerate(counts[:3]):
    for j in range(n):
      q = f'layer{i + 1}.{j}.'
      stride = 2 if (i == 1 and j == 0) else 1
      if kind == 'basic':
        y = relu(ref.batch_norm(conv(x, sd[q + 'conv1.weight'], stride=stride), sd, q + 'bn1'))
        y = ref.batch_norm(conv(y, sd[q + 'conv2.weight']), sd, q + 'bn2')
      else:
        y = relu(ref.batch_norm(conv(x, sd[q + 'conv1.weight']), sd, q + 'bn1'))
        y = relu(ref.batch_norm(conv(y, sd[q + 'conv2.weight'], stride=stride), sd, q + 'bn2'))
        y = ref.batch_norm(conv(y, sd[q + 'conv3.weight']), sd, q + 'bn3')
      if q + 'downsample.0.weight' in sd:
        x = ref.batch_norm(conv(x, sd[q + 'downsample.0.weight'], stride=stride), sd, q + 'downsample.1')
      x = relu(y + x)
  return x
