"""The paper's analysis of a detector (Figures 3 and 5, Section 3.1), measured on the eval split.

  results = analysis.analyze(model, variables, config, mesh)    one run: binned numbers, json-ready
  analysis.write(output, [run, compare])                        analysis.json, localization.png, score_iou.png
                                                                (the drawing: conret_jax/analysis_figures.py)

What counts (DEFINITIONS holds the same, and analysis.json and the figure captions repeat it):
  input IoU       of an anchor: its IoU with the nearest ground truth, the highest IoU over the image's non-crowd
                  ground truth (the IoU training matches anchors by); 0 in an image without any
  output IoU      the same for the anchor's box after regression, clipped to the image as inference clips it. Its
                  nearest ground truth may be another object than before (the box is credited with the object it
                  lands on, as COCO credits a detection)
  regression      the regressions inference applies: Stages.inference_steps, every trained stage unless
                  config.consistent.inference_reg_steps asks for fewer (the detector's decode, as conret-eval)
  Figure 3        anchors whose input or output IoU is >= 0.1: the 2-D histogram (input, output) and its marginals
  Figure 5 (c,d)  every anchor with input IoU > 0: output IoU mean and std per input-IoU bin
  Figure 5 (a,b)  the detections after NMS, exactly as conret-eval scores them (config.eval), binned by their IoU with
                  the best non-crowd ground truth of their class (0 if none): score mean and std per bin
  crowd           crowd ground truth is nobody's nearest ground truth (training matches valid & ~crowd); a detection
                  at least half inside a crowd region of its class (intersection over its own area >= 0.5) whose IoU
                  with every real ground truth of its class is < 0.5 is left out, as COCO ignores it at IoU 0.5
  bins            width 0.05 over [0, 1]: bin i holds edges[i] <= v < edges[i+1], the last bin holds 1.0 too;
                  population std (ddof 0); an empty bin's mean and std are null
  images          the eval split's first config.eval.num_images (0: all); padding examples (example_valid False)
                  and padded ground-truth rows (valid False) never count

Everything per batch runs in one jitted program on the accelerator (network, decoding, NMS, IoUs, binning); only
per-bin counts, means and squared deviations from the batch's bin means (a two-pass variance, exact enough in
float32) reach the host, which merges batches in float64 (Chan et al.'s pairwise update). So COCO val costs what an
evaluation pass costs, and the 2-D histogram is the only array larger than a bin row.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from conret_jax import analysis_figures, detectors, evaluation, inference
from conret_jax.core import boxes as box_ops
from conret_jax.core import nms
from conret_jax.data.info import ClassLayout, EvalClasses
from conret_jax.data.sizes import pad_value_of
from conret_jax.stages import Stages

EDGES = tuple(round(0.05 * i, 2) for i in range(21))
NEAR_IOU = 0.1  # Figure 3: anchors near an object before or after regression
CROWD_IOU = 0.5  # COCO's crowd rule at IoU 0.5

DEFINITIONS = {
  'input_iou': "an anchor's IoU with its nearest ground truth: the highest IoU over the image's non-crowd ground "
  'truth (what training matches anchors by); 0 in an image without any',
  'output_iou': "the same for the anchor's box after regression, clipped to the image as inference clips it; its "
  'nearest ground truth may be another object than before',
  'regression': 'the regressions inference applies (Stages.inference_steps: every trained stage unless '
  'config.consistent.inference_reg_steps asks for fewer), counted per run in `regressions`',
  'fig3_anchors': f'anchors whose input or output IoU is >= {NEAR_IOU}',
  'fig5cd_anchors': 'every anchor with input IoU > 0, binned by its input IoU',
  'fig5ab_detections': 'the detections after NMS as conret-eval scores them (config.eval), binned by their IoU with '
  'the best non-crowd ground truth of their class (0 if none)',
  'crowd': "crowd ground truth is nobody's nearest ground truth; a detection at least half inside a crowd region of "
  f'its class (intersection over its own area >= {CROWD_IOU}) with IoU < {CROWD_IOU} to every real ground truth of '
  'its class is left out, as COCO ignores it',
  'bins': 'bin i holds edges[i] <= v < edges[i+1]; the last bin holds 1.0 too',
  'statistics': 'mean and population std (ddof 0) per bin; null where a bin is empty',
  'images': 'the first num_images of the eval split; padding examples and padded ground-truth rows never count',
  'hist2d': 'fig3.hist2d[i][j]: anchors in input-IoU bin i and output-IoU bin j (both with the edges fig3.bins)',
}

# ---------------------------------------------------------------------------------------------------- on the device


def bin_index(values, edges=EDGES) -> jax.Array:
  """The bin of each value (int32, same shape): i with edges[i] <= v < edges[i+1]; 1.0 (the last edge) falls in
  the last bin, values outside the edges are clipped into the end bins. Edges compare in float32."""
  e = jnp.asarray(edges, jnp.float32)
  index = jnp.searchsorted(e, jnp.asarray(values, jnp.float32), side='right') - 1
  return jnp.clip(index, 0, len(edges) - 2).astype(jnp.int32)


def _per_bin(values, bins, mask, num_bins: int):
  """Sums of `values` per bin over the masked entries: [num_bins] (masked-out entries go to a dropped extra bin)."""
  segments = jnp.where(mask, bins, num_bins).reshape(-1)
  return jax.ops.segment_sum(values.reshape(-1), segments, num_segments=num_bins + 1)[:num_bins]


def binned_moments(values, bins, mask, num_bins: int) -> dict:
  """count [nb] int32, mean [nb] float32 (0 where empty) and m2 [nb], the sum of squared deviations from the bin's
  mean, of `values` grouped by `bins` (same shape) over the entries where `mask`."""
  values = jnp.asarray(values, jnp.float32)
  count = _per_bin(jnp.ones(values.shape, jnp.int32), bins, mask, num_bins)
  mean = _per_bin(values, bins, mask, num_bins) / jnp.maximum(count, 1)
  deviation = values - mean[jnp.clip(bins, 0, num_bins - 1)]
  return {'count': count, 'mean': mean, 'm2': _per_bin(deviation * deviation, bins, mask, num_bins)}


def nearest_gt_iou(boxes, gt_boxes, gt_real) -> jax.Array:
  """Each box's IoU with its nearest ground truth: the highest over the image's rows where gt_real (0 without any).

  Args:
    boxes: [A, 4] shared by every image, or [B, A, 4]; gt_boxes: [B, G, 4]; gt_real: [B, G] bool.
  Returns:
    [B, A] float32. One image at a time (jax.lax.map, as core.matching): one image's [A, G] IoU is the peak memory.
  """
  shared = boxes.ndim == 2

  def one(x):
    image_boxes, gt, real = (boxes, *x) if shared else x
    return jnp.max(jnp.where(real[None, :], box_ops.pairwise_iou(image_boxes, gt), 0.0), axis=1, initial=0.0)

  return jax.lax.map(one, (gt_boxes, gt_real) if shared else (boxes, gt_boxes, gt_real))


def detection_iou(dets: dict, gt: dict):
  """Per detection: (IoU with the best non-crowd ground truth of its class [B, D], ignored [B, D] bool: COCO's crowd
  rule, see DEFINITIONS['crowd']). dets: boxes [B, D, 4], classes [B, D]; gt: boxes [B, G, 4], classes, valid,
  crowd [B, G]."""
  iou = box_ops.pairwise_iou(dets['boxes'], gt['boxes'])  # [B, D, G]
  same = dets['classes'][:, :, None] == gt['classes'][:, None, :]
  real, crowd = gt['valid'] & ~gt['crowd'], gt['valid'] & gt['crowd']
  best = jnp.max(jnp.where(same & real[:, None, :], iou, 0.0), axis=-1, initial=0.0)
  # Intersection over the detection's own area, from the IoU: intersection = iou * (a1 + a2) / (1 + iou).
  own = box_ops.area(dets['boxes'])[:, :, None]
  inside = iou * (own + box_ops.area(gt['boxes'])[:, None, :]) / (1.0 + iou) / jnp.maximum(own, 1e-12)
  in_crowd = jnp.any(same & crowd[:, None, :] & (inside >= CROWD_IOU), axis=-1)
  return best, in_crowd & (best < CROWD_IOU)


def batch_statistics(anchors, boxes, dets: dict, gt: dict, example_valid, known_class=None, edges=EDGES) -> dict:
  """One batch's binned statistics (traceable).

  Args:
    anchors: [A, 4] the regular anchors; boxes: [B, A, 4] the same anchors after regression (clipped).
    dets: detections after NMS: boxes [B, D, 4], scores, classes, valid [B, D].
    gt: boxes [B, G, 4], classes, valid, crowd [B, G]; example_valid: [B] bool.
    known_class: [K] bool, the classes that are dataset categories (others are dropped, as evaluation drops them).
  Returns:
    num_images: int32; hist2d: [nb, nb] int32 (Figure 3); output_iou and score: `binned_moments` (Figure 5 c-d, a-b).
  """
  nb = len(edges) - 1
  real = gt['valid'] & ~gt['crowd']
  before = nearest_gt_iou(anchors, gt['boxes'], real)
  after = nearest_gt_iou(boxes, gt['boxes'], real)
  image = jnp.asarray(example_valid, bool)[:, None]
  i_before, i_after = bin_index(before, edges), bin_index(after, edges)
  near = image & (jnp.maximum(before, after) >= NEAR_IOU)
  hist2d = _per_bin(jnp.ones(near.shape, jnp.int32), i_before * nb + i_after, near, nb * nb).reshape(nb, nb)
  iou, ignored = detection_iou(dets, gt)
  keep = dets['valid'] & image & ~ignored
  if known_class is not None:
    keep &= jnp.asarray(known_class, bool)[dets['classes']]
  return {
    'num_images': jnp.sum(image, dtype=jnp.int32),
    'hist2d': hist2d,
    'output_iou': binned_moments(after, i_before, image & (before > 0.0), nb),
    'score': binned_moments(dets['scores'], bin_index(iou, edges), keep, nb),
  }


def statistics_fn(detector: detectors.Detector, eval_config, pad_value, known_class=None, out_sharding=None):
  """jit((variables, batch) -> batch_statistics): the network, the detector's decoding and conret-eval's
  post-processing, then the statistics. batch: images, boxes, classes, valid, crowd, example_valid, input_hw."""

  def run(variables, batch):
    images, sizes = batch['images'], batch['input_hw']
    images = inference.fill_padding(images.astype(jnp.float32), sizes, pad_value)
    anchors, logits, boxes = inference.decode(detector, variables, images)
    boxes = nms.clip_to_images(boxes, sizes)  # as post-processing clips them
    dets = inference.postprocess(detector, logits, boxes, images.shape[1:3], eval_config, sizes)
    gt = {k: batch[k] for k in ('boxes', 'classes', 'valid', 'crowd')}
    return batch_statistics(anchors, boxes, dets, gt, batch['example_valid'], known_class)

  return jax.jit(run, out_shardings=out_sharding)


# ---------------------------------------------------------------------------------------------------- on the host


class _Moments:
  """Per-bin count, mean and m2 merged over batches in float64 (Chan et al.'s pairwise update)."""

  def __init__(self, num_bins: int):
    self.count, self.mean, self.m2 = np.zeros(num_bins, np.int64), np.zeros(num_bins), np.zeros(num_bins)

  def add(self, part: dict) -> None:
    count, mean, m2 = (np.asarray(part[k], np.float64) for k in ('count', 'mean', 'm2'))
    total = self.count + count
    share = np.divide(count, total, out=np.zeros_like(count), where=total > 0)
    delta = mean - self.mean
    self.m2 = self.m2 + m2 + delta * delta * self.count * share
    self.mean = self.mean + delta * share
    self.count = total.astype(np.int64)

  def means(self) -> list:
    return [float(m) if n else None for n, m in zip(self.count, self.mean)]

  def stds(self) -> list:
    return [float(np.sqrt(max(m2, 0.0) / n)) if n else None for n, m2 in zip(self.count, self.m2)]


class Accumulator:
  """Adds up `batch_statistics` on the host; `results()` is the json-ready content of one run."""

  def __init__(self, edges=EDGES):
    nb = len(edges) - 1
    self.edges, self.num_images = [float(e) for e in edges], 0
    self.hist2d = np.zeros((nb, nb), np.int64)
    self.output_iou, self.score = _Moments(nb), _Moments(nb)

  def add(self, stats: dict) -> None:
    stats = jax.tree.map(np.asarray, stats)
    self.num_images += int(stats['num_images'])
    self.hist2d += stats['hist2d'].astype(np.int64)
    self.output_iou.add(stats['output_iou'])
    self.score.add(stats['score'])

  def results(self) -> dict:
    """{num_images, fig3: {bins, count_before, count_after, hist2d, num_anchors}, fig5: {iou_bins, score_mean,
    score_std, count, input_iou_bins, output_iou_mean, output_iou_std, input_count}}; edges listed in full."""
    h = self.hist2d
    fig3 = {'bins': self.edges, 'count_before': h.sum(1).tolist(), 'count_after': h.sum(0).tolist()}
    fig3.update(hist2d=h.tolist(), num_anchors=int(h.sum()))
    fig5 = {'iou_bins': self.edges, 'score_mean': self.score.means(), 'score_std': self.score.stds()}
    fig5.update(count=self.score.count.tolist(), input_iou_bins=self.edges)
    fig5.update(output_iou_mean=self.output_iou.means(), output_iou_std=self.output_iou.stds())
    fig5.update(input_count=self.output_iou.count.tolist())
    return {'num_images': self.num_images, 'fig3': fig3, 'fig5': fig5}


def analyze(model, variables, config, mesh, *, classes=None, data=evaluation.EvalData()) -> dict:
  """One pass over the eval split (as `evaluation.evaluate` makes it; the same batches on every process), with the
  run's classes (a data.info.ClassLayout; None: the eval set's): a detection is matched to ground truth of the
  category it names, and ground truth of categories the run never learned matches none.

  Returns:
    `Accumulator.results()` plus regressions (how many inference applied) and method (the detector's name, e.g.
    'ConRetinaNet' or 'RetinaNet'), identical on every process.
  """
  from conret_jax import mesh as mesh_lib

  batches, info = data.resolve(config, mesh)
  names = EvalClasses.of(classes or ClassLayout.of(info, config), info, config)
  known = names.category_of[: int(config.model.num_classes)] >= 0
  detector = detectors.from_config(config, model)
  run = statistics_fn(detector, config.eval, pad_value_of(config.model), known, mesh_lib.replicated(mesh))
  gt_lookup = jnp.asarray(names.gt_lookup)
  total = Accumulator()
  for batch in batches:
    fields = {k: batch[k] for k in ('images', 'boxes', 'classes', 'valid', 'crowd', 'example_valid')}
    b, h, w = fields['images'].shape[:3]
    fields['input_hw'] = batch['input_hw'] if 'input_hw' in batch else np.full((b, 2), (h, w), np.int32)
    fields['classes'] = gt_lookup[jnp.clip(fields['classes'], 0, len(gt_lookup) - 1)]
    total.add(run(variables, fields))
  results = total.results()
  logging.info('Analyzed %d images: %d anchors near objects.', results['num_images'], results['fig3']['num_anchors'])
  return dict(results, regressions=Stages.from_config(config).inference_steps, method=detector.name)


# ---------------------------------------------------------------------------------------------------- the files

FIG3_CAPTION = (
  f'Anchors whose IoU with the nearest non-crowd ground truth is >= {NEAR_IOU} before or after regression (all the '
  'regressions inference applies; boxes clipped to the image). Left: anchors per cell (log colour); dashed: no '
  'change. Right: the marginal histograms. Bins of 0.05 IoU.'
)
FIG5_CAPTION = (
  '(a, b) detections after NMS (config.eval), by IoU with the best non-crowd ground truth of their class (0 if none); '
  'those COCO ignores in crowd regions are left out. (c, d) every anchor with input IoU > 0; input / output IoU: with '
  'the nearest non-crowd ground truth before / after regression. Bins of 0.05 IoU; std: population; empty bins '
  'are not drawn. Bottom: the counts per bin.'
)


def write(output: str, runs: list) -> dict:
  """Writes OUTPUT/analysis.json, localization.png and score_iou.png; returns the json's content.

  Args:
    runs: one or two dicts (`analyze`'s results plus workdir, step and label); a second one is the comparison,
      drawn in the second colour and stored under the json's `compare` key.
  Returns:
    The first run's dict with `definitions` (DEFINITIONS) and, for two runs, `compare`: the second run's dict.
  """
  content = dict(runs[0], definitions=DEFINITIONS)
  if len(runs) > 1:
    content['compare'] = runs[1]
  with open(os.path.join(output, 'analysis.json'), 'w', encoding='utf-8') as f:
    json.dump(content, f, indent=1)
  analysis_figures.plot_localization(runs, os.path.join(output, 'localization.png'), caption=FIG3_CAPTION)
  analysis_figures.plot_score_iou(runs, os.path.join(output, 'score_iou.png'), caption=FIG5_CAPTION)
  return content
