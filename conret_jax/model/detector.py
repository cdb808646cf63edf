"""The detector: pixel normalization -> ResNet -> FPN -> RetinaNet head, and the helpers every caller shares.

  RetinaNet.from_config(config) = build_model(config)  the network of config.model / config.consistent (the only
                                                        code here that reads the config, besides the two adapters
                                                        marked below)
  init_variables(model, rng, image_hw, batch_size=1)    {'params', and 'frozen' | 'batch_stats' by backbone.norm}
  trainable_mask(params, config) -> pytree of bool      False for the backbone's frozen prefix (adapter: freeze_at)
  decode_stages(outputs, anchors, steps, ...)           the inference regressions (predict_boxes: the config's)

`model.apply(variables, images [B, H, W, 3] float32 RGB 0..255, train=False)` returns
dict(cls_logits=tuple of [B, A, K] float32, box_deltas=tuple of [B, A, 4] float32) (layout in model/heads.py). With
backbone.norm='bn' and train=True pass `mutable=['batch_stats']`.

Mixed precision: params are float32; convs compute in config.model.compute_dtype ('float32' | 'bfloat16'); norm
statistics are computed in float32 and head outputs are cast to float32.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from conret_jax import stages
from conret_jax.core import boxes as box_ops
from conret_jax.defaults import IMAGENET_PIXEL_MEAN, IMAGENET_PIXEL_STD
from conret_jax.model import conv_lowering
from conret_jax.model.anchor_spec import AnchorSpec
from conret_jax.model.fpn import FPN, fpn_from_config
from conret_jax.model.heads import RetinaHead
from conret_jax.model.resnet import ResNet, frozen_module_names, resnet_from_config

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# model.matmul_precision -> the precision of every convolution. 'default' leaves the platform's choice: on GPU a float32
# convolution then runs in TF32, which a torchvision fp32 reference does not; 'highest' asks for full float32.
MATMUL_PRECISIONS = {'default': None, 'high': jax.lax.Precision.HIGH, 'highest': jax.lax.Precision.HIGHEST}


def matmul_precision(model_config):
  if model_config.matmul_precision not in MATMUL_PRECISIONS:
    raise ValueError(
      f'model.matmul_precision must be one of {sorted(MATMUL_PRECISIONS)}, got {model_config.matmul_precision!r}'
    )
  return MATMUL_PRECISIONS[model_config.matmul_precision]


def compute_dtype(model_config):
  if model_config.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f'model.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {model_config.compute_dtype!r}')
  return COMPUTE_DTYPES[model_config.compute_dtype]


class RetinaNet(nn.Module):
  """RetinaNet / ConRetinaNet: normalize pixels, then backbone -> FPN -> head. `from_config` builds it from a config;
  the module itself holds only its parts and plain values (hashable, so jitted callers cache by it)."""

  backbone: ResNet
  fpn: FPN
  head: RetinaHead
  pixel_mean: tuple = IMAGENET_PIXEL_MEAN
  pixel_std: tuple = IMAGENET_PIXEL_STD
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    mean = jnp.asarray(self.pixel_mean, jnp.float32)
    std = jnp.asarray(self.pixel_std, jnp.float32)
    x = ((images.astype(jnp.float32) - mean) / std).astype(self.dtype)
    return self.head(self.fpn(self.backbone(x, train)))

  @classmethod
  def from_config(cls, config) -> 'RetinaNet':
    """The network of config.model, with one box conv per regression stage of config.consistent."""
    m = config.model
    dtype = compute_dtype(m)
    precision = matmul_precision(m)
    lowering = conv_lowering.resolve(m.conv_lowering)
    h = m.head
    if h.variant == 'gated_cascade' and h.channels != m.fpn.channels:
      raise ValueError('gated_cascade adds tower features to FPN features: head.channels must equal fpn.channels')
    head = RetinaHead(
      num_classes=m.num_classes,
      num_anchors=AnchorSpec.from_config(m).per_location,
      num_convs=h.num_convs,
      channels=h.channels,
      norm=h.norm,
      prior_prob=h.prior_prob,
      variant=h.variant,
      num_stages=stages.num_regression_stages(config),
      dtype=dtype,
      precision=precision,
      conv_lowering=lowering,
    )
    return cls(
      backbone=resnet_from_config(m.backbone, dtype, precision, lowering),
      fpn=fpn_from_config(m.fpn, dtype, precision, lowering),
      head=head,
      pixel_mean=tuple(float(v) for v in m.pixel_mean),
      pixel_std=tuple(float(v) for v in m.pixel_std),
      dtype=dtype,
    )


def build_model(config) -> RetinaNet:
  """The network of `config` (a base_config()-shaped ConfigDict)."""
  return RetinaNet.from_config(config)


def init_variables(model: RetinaNet, rng, image_hw=(512, 512), batch_size: int = 1) -> dict:
  """Fresh variables: {'params': ..., 'frozen': ... (frozen_bn) | 'batch_stats': ... (bn)}, all float32.

  Shapes do not depend on image_hw (any size divisible by 2**max_level works); use jax.eval_shape on this to get
  shapes without computing.
  """
  images = jnp.zeros((batch_size, *image_hw, 3), jnp.float32)
  return dict(jax.jit(lambda r, x: model.init(r, x, train=False))(rng, images))


def init_compiler_options(devices) -> dict | None:
  """Compiler options for a one-off initialization program on `devices`.

  On CPU, LLVM spends almost all of that compile on the ~100 unrolled threefry generators of the parameter
  initializers: 18 s of 20 s for the tiny test model at the default optimization level, 4.6 s at level 0 (2-core
  dev box, 2026-11-25). The program runs once, so its own speed does not matter. A few normal draws can then differ
  from the default level's in the last bit, the same way for every run and topology. Other platforms keep their
  defaults.
  """
  if all(d.platform == 'cpu' for d in devices):
    return {'xla_backend_optimization_level': 0}
  return None


def trainable_mask(params, config):
  """Pytree of bool like `params`: False for the backbone's frozen prefix (stem, res2, ... per freeze_at).

  The forward pass already stops gradients at the end of the frozen prefix; the train step must also mask the
  optimizer update with this (e.g. optax.masked), or weight decay would still move those parameters.
  """
  frozen = frozen_module_names(config.model.backbone.freeze_at)

  def keep(path, _):
    keys = [getattr(p, 'key', None) for p in path]
    return not (len(keys) > 1 and keys[0] == 'backbone' and keys[1] in frozen)

  return jax.tree_util.tree_map_with_path(keep, params)


def decode_stages(outputs, anchors, *, steps: int, box_weights, clamp: float):
  """The first `steps` regressions applied in turn, and the scores of the classifier that goes with them.

  Args:
    outputs: the model's dict(cls_logits=tuple of [B, A, K], box_deltas=tuple of [B, A, 4]).
    anchors: [A, 4] float32 x1y1x2y2 (AnchorSpec.anchors for the input's shape).
  Returns:
    (logits [B, A, K] float32, boxes [B, A, 4] float32 x1y1x2y2, unclipped): boxes = decode(deltas[0], anchors),
    then decode(deltas[s], boxes) for s = 1..steps-1; logits of classifier min(steps, len) - 1.
  """
  deltas = outputs['box_deltas']
  boxes = jnp.broadcast_to(anchors, deltas[0].shape)
  for s in range(steps):
    boxes = box_ops.decode(deltas[s], boxes, box_weights, clamp=clamp)
  logits = outputs['cls_logits'][min(steps, len(outputs['cls_logits'])) - 1]
  return logits, boxes


def predict_boxes(outputs, anchors, config):
  """`decode_stages` with the inference regressions of `config` (stages.inference_steps, model.box_weights)."""
  m = config.model
  return decode_stages(
    outputs, anchors, steps=stages.inference_steps(config), box_weights=tuple(m.box_weights), clamp=m.box_clamp
  )
