"""RetinaNet heads, shared across pyramid levels: the consistent head (paper Fig. 4(d)) and the cascade ablations.

Every variant has a class tower and a box tower of `num_convs` x (3x3 conv [+ GroupNorm] + ReLU), a class conv with
A*K outputs (bias = -log((1 - p) / p), the focal-loss prior) and box convs with A*4 outputs; convs use normal(0.01)
weights and zero bias. R = number of regression stages.

  'consistent'     (Fig. 4(d), footnote 2) towers and the class conv are shared by all stages; each extra stage adds
                   ONLY its own last box conv `box_pred<s>` on the same box-tower features. It predicts the offset
                   from the anchor refined s times. Outputs: 1 classifier, R regressions.
  'cascade'        (Fig. 4(b)) stage s >= 1 has its own sibling class tower, box tower, class conv and box conv
                   (`*_<s>`, unshared). Outputs: R classifiers, R regressions.
  'gated_cascade'  (Fig. 4(c)) like 'cascade', but stage s >= 1 also receives stage s-1's head features: the input
                   of its class (box) tower is the FPN feature PLUS the output of stage s-1's class (box) tower at
                   the same level. The paper only says the previous head's features are "combined"; an addition
                   keeps the channel count and costs no parameters, so the variant differs from 'cascade' only in
                   that connection.

Outputs: dict(cls_logits=tuple of [B, A_total, K] float32, box_deltas=tuple of [B, A_total, 4] float32), anchors
ordered level, y, x, anchor-in-location (the reshape of channel a*K + k to [.., a, k], as torchvision).
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from conret_jax.model.layers import Compute, Norm

VARIANTS = ('consistent', 'cascade', 'gated_cascade')
_normal_001 = nn.initializers.normal(0.01)


def prior_bias(prior_prob: float) -> float:
  """Class-conv bias so that sigmoid(bias) = prior_prob at init (focal loss paper, Section 4.1)."""
  return -math.log((1.0 - prior_prob) / prior_prob)


class Tower(nn.Module):
  """num_convs x (3x3 conv [+ GN] + ReLU). With GN the convs have no bias (torchvision v2 convention)."""

  num_convs: int
  channels: int
  norm: str
  compute: Compute = Compute()

  @nn.compact
  def __call__(self, x):
    if self.norm not in ('', 'gn'):
      raise ValueError(f"head.norm must be '' or 'gn', got {self.norm!r}")
    for i in range(self.num_convs):
      x = self.compute.conv(self.channels, 3, name=f'conv{i}', use_bias=not self.norm, kernel_init=_normal_001)(x)
      if self.norm:
        x = Norm('gn', name=f'norm{i}')(x, train=False)
      x = nn.relu(x)
    return x


def _flatten(x, per_anchor: int):
  """[B, H, W, A*per_anchor] -> [B, H*W*A, per_anchor] float32."""
  b, h, w, c = x.shape
  return x.reshape(b, h * w * (c // per_anchor), per_anchor).astype(jnp.float32)


class RetinaHead(nn.Module):
  """__call__(features: tuple of [B, H_l, W_l, C] per level) -> dict(cls_logits, box_deltas); see module doc."""

  num_classes: int
  num_anchors: int
  num_convs: int = 4
  channels: int = 256
  norm: str = ''
  prior_prob: float = 0.01
  variant: str = 'consistent'
  num_stages: int = 1
  compute: Compute = Compute()

  def _pred(self, outputs_per_anchor: int, name: str, bias: float = 0.0):
    return self.compute.conv(
      self.num_anchors * outputs_per_anchor,
      3,
      name=name,
      use_bias=True,
      kernel_init=_normal_001,
      bias_init=nn.initializers.constant(bias),
    )

  @nn.compact
  def __call__(self, features):
    if self.variant not in VARIANTS:
      raise ValueError(f'head.variant must be one of {VARIANTS}, got {self.variant!r}')
    if self.num_stages < 1:
      raise ValueError(f'need at least one regression stage, got {self.num_stages}')
    k, r = self.num_classes, self.num_stages
    tower = lambda name: Tower(self.num_convs, self.channels, self.norm, self.compute, name=name)
    suffix = lambda s: '' if s == 0 else f'_{s}'
    cls_bias = prior_bias(self.prior_prob)

    if self.variant == 'consistent':
      cls_tower, box_tower = tower('cls_tower'), tower('box_tower')
      cls_pred = self._pred(k, 'cls_pred', cls_bias)
      box_preds = [self._pred(4, f'box_pred{s}') for s in range(r)]
      logits, deltas = [], [[] for _ in range(r)]
      for p in features:
        box_feat = box_tower(p)
        logits.append(_flatten(cls_pred(cls_tower(p)), k))
        for s in range(r):
          deltas[s].append(_flatten(box_preds[s](box_feat), 4))
      cls_out = (jnp.concatenate(logits, axis=1),)
      return {'cls_logits': cls_out, 'box_deltas': tuple(jnp.concatenate(d, axis=1) for d in deltas)}

    gated = self.variant == 'gated_cascade'
    cls_out, box_out = [], []
    prev_cls = prev_box = None  # per level: previous stage's tower outputs
    for s in range(r):
      cls_tower, box_tower = tower(f'cls_tower{suffix(s)}'), tower(f'box_tower{suffix(s)}')
      cls_pred = self._pred(k, f'cls_pred{suffix(s)}', cls_bias)
      box_pred = self._pred(4, f'box_pred{s}')
      logits, deltas, cur_cls, cur_box = [], [], [], []
      for i, p in enumerate(features):
        cls_in = p + prev_cls[i] if gated and s > 0 else p
        box_in = p + prev_box[i] if gated and s > 0 else p
        c, b = cls_tower(cls_in), box_tower(box_in)
        cur_cls.append(c)
        cur_box.append(b)
        logits.append(_flatten(cls_pred(c), k))
        deltas.append(_flatten(box_pred(b), 4))
      prev_cls, prev_box = cur_cls, cur_box
      cls_out.append(jnp.concatenate(logits, axis=1))
      box_out.append(jnp.concatenate(deltas, axis=1))
    return {'cls_logits': tuple(cls_out), 'box_deltas': tuple(box_out)}
