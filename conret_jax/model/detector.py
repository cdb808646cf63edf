"""The detector: pixel normalization -> ResNet -> FPN -> RetinaNet head, and the helpers every caller shares.

  build_model(config) -> RetinaNet                      the network of config.model / config.consistent
  init_variables(model, rng, image_hw, batch_size=1)    {'params', and 'frozen' | 'batch_stats' by backbone.norm}
  trainable_mask(params, config) -> pytree of bool      False for the backbone's frozen prefix (backbone.freeze_at)
  predict_boxes(outputs, anchors, config)               the inference regression steps (detect and evaluation)

`model.apply(variables, images [B, H, W, 3] float32 RGB 0..255, train=False)` returns
dict(cls_logits=tuple of [B, A, K] float32, box_deltas=tuple of [B, A, 4] float32) (layout in model/heads.py). With
backbone.norm='bn' and train=True pass `mutable=['batch_stats']`.

Mixed precision: params are float32; convs compute in config.model.compute_dtype ('float32' | 'bfloat16'); norm
statistics are computed in float32 and head outputs are cast to float32.
"""

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections

from conret_jax import consistent
from conret_jax.core import boxes as box_ops
from conret_jax.core.anchors import num_anchors_per_location
from conret_jax.model.fpn import fpn_from_config
from conret_jax.model.heads import RetinaHead
from conret_jax.model.resnet import frozen_module_names, resnet_from_config

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(model_config):
  if model_config.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f'model.compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {model_config.compute_dtype!r}')
  return COMPUTE_DTYPES[model_config.compute_dtype]


class RetinaNet(nn.Module):
  """RetinaNet / ConRetinaNet. `model_config` is config.model (frozen, so the module is hashable and jit-cacheable)."""
  model_config: ml_collections.FrozenConfigDict
  num_stages: int = 1

  @nn.compact
  def __call__(self, images, train: bool = False):
    m = self.model_config
    dtype = compute_dtype(m)
    mean = jnp.asarray(m.pixel_mean, jnp.float32)
    std = jnp.asarray(m.pixel_std, jnp.float32)
    x = ((images.astype(jnp.float32) - mean) / std).astype(dtype)
    features = resnet_from_config(m.backbone, dtype)(x, train)
    pyramid = fpn_from_config(m.fpn, dtype)(features)
    h = m.head
    if h.variant == 'gated_cascade' and h.channels != m.fpn.channels:
      raise ValueError('gated_cascade adds tower features to FPN features: head.channels must equal fpn.channels')
    head = RetinaHead(num_classes=m.num_classes, num_anchors=num_anchors_per_location(m), num_convs=h.num_convs,
                      channels=h.channels, norm=h.norm, prior_prob=h.prior_prob, variant=h.variant,
                      num_stages=self.num_stages, dtype=dtype, name='head')
    return head(pyramid)


def build_model(config) -> RetinaNet:
  """The network of `config` (a base_config()-shaped ConfigDict)."""
  compute_dtype(config.model)  # fail early on a bad dtype name
  return RetinaNet(model_config=ml_collections.FrozenConfigDict(config.model), num_stages=consistent.num_regression_stages(config))


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


def predict_boxes(outputs, anchors, config):
  """The inference regression steps shared by detect and evaluation.

  Args:
    outputs: the model's dict(cls_logits=tuple of [B, A, K], box_deltas=tuple of [B, A, 4]).
    anchors: [A, 4] float32 x1y1x2y2 (core.anchors.anchors_from_config for the input's shape).
  Returns:
    (scores_logits [B, A, K] float32, boxes [B, A, 4] float32 x1y1x2y2, unclipped): boxes = decode(deltas[0],
    anchors), then decode(deltas[s], boxes) for s = 1..steps-1; logits of classifier min(steps, len) - 1.
  """
  m = config.model
  steps = consistent.inference_steps(config)
  deltas = outputs['box_deltas']
  boxes = jnp.broadcast_to(anchors, deltas[0].shape)
  for s in range(steps):
    boxes = box_ops.decode(deltas[s], boxes, m.box_weights, clamp=m.box_clamp)
  logits = outputs['cls_logits'][min(steps, len(outputs['cls_logits'])) - 1]
  return logits, boxes
