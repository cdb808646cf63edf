"""The paper's analysis (conret_jax/analysis.py): binning and statistics against NumPy on hand-made anchors, boxes and
detections (crowd regions, images without objects, padded examples and ground-truth rows), the float64 merge of
batches, and the files it writes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conret_jax import analysis, analysis_figures

EDGES32 = np.asarray(analysis.EDGES, np.float32)
NB = len(analysis.EDGES) - 1
batch_statistics = jax.jit(analysis.batch_statistics)  # as the tool runs it (and one compile, not one per op)


def _np_iou(a, b) -> np.ndarray:
  """[N, 4], [M, 4] -> [N, M] float64."""
  a, b = np.asarray(a, np.float64)[:, None], np.asarray(b, np.float64)[None]
  iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])
  union = area(a) + area(b) - iw * ih
  return np.where(union > 0, iw * ih / np.where(union > 0, union, 1), 0.0)


def _np_bin(values) -> np.ndarray:
  return np.clip(np.searchsorted(EDGES32, np.asarray(values, np.float32), side='right') - 1, 0, NB - 1)


def test_bin_edges_are_closed_below_and_the_last_bin_holds_one():
  values = [0.0, 0.0499, 0.05, 0.1, 0.4999, 0.5, 0.55, 0.95, 0.99, 1.0]
  expected = [0, 0, 1, 2, 9, 10, 11, 19, 19, 19]
  np.testing.assert_array_equal(analysis.bin_index(jnp.array(values)), expected)
  np.testing.assert_array_equal(_np_bin(values), expected)
  assert analysis.EDGES[0] == 0.0 and analysis.EDGES[-1] == 1.0 and len(analysis.EDGES) == 21


def _scene():
  """Four 64x64 images, max 4 gt rows, 4 classes (class 3 is no dataset category):
  0: two objects, a crowd region, and a padded gt row that would match many anchors if it counted;
  1: no objects (only padded rows, with boxes); 2: one object; 3: a padding example (a copy of image 0)."""
  rs = np.random.RandomState(0)
  gt_boxes = np.zeros((4, 4, 4), np.float32)
  gt_boxes[0] = [[4, 4, 24, 28], [30, 10, 58, 40], [0, 40, 40, 64], [2, 2, 30, 30]]
  gt_boxes[1] = [[4, 4, 24, 28], [30, 10, 58, 40], [0, 0, 0, 0], [0, 0, 0, 0]]
  gt_boxes[2, 0] = [10, 20, 50, 60]
  gt_boxes[3] = gt_boxes[0]
  gt = {
    'boxes': gt_boxes,
    'classes': np.array([[0, 1, 2, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 2, 0]], np.int32),
    'valid': np.array([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], bool),
    'crowd': np.array([[0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]], bool),
  }
  centres = rs.uniform(0, 64, (60, 2))
  sizes = rs.uniform(8, 40, (60, 2))
  anchors = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1).astype(np.float32)
  anchors[:4] = gt_boxes[0, [0, 0, 1, 3]] + [[0, 0, 0, 0], [2, 2, 2, 2], [-3, 1, 3, 1], [0, 0, 0, 0]]
  boxes = (anchors[None] + rs.normal(0, 3, (4, 60, 4))).astype(np.float32)
  boxes[:, 0] = gt_boxes[0, 0]  # anchor 0 regressed exactly onto object 0: IoU 1.0 where it exists
  det_boxes = boxes[:, :8].copy()
  det_boxes[0, 5] = [2, 44, 14, 56]  # inside the crowd region, IoU 0 with the real objects: ignored (class 2)
  det_boxes[0, 6] = [2, 44, 14, 56]  # the same box as class 0: no crowd of its class, kept with IoU 0
  dets = {
    'boxes': det_boxes,
    'scores': rs.uniform(0.05, 1, (4, 8)).astype(np.float32),
    'classes': np.array([[0, 0, 1, 1, 3, 2, 0, 1]] * 4, np.int32),
    'valid': np.array([[1, 1, 1, 1, 1, 1, 1, 0]] * 4, bool),
  }
  return anchors, boxes, dets, gt, np.array([True, True, True, False])


def _np_reference(anchors, boxes, dets, gt, example_valid, known):
  """The same numbers, image by image, in float64 NumPy."""
  hist2d = np.zeros((NB, NB), np.int64)
  out_by_bin, score_by_bin = [[] for _ in range(NB)], [[] for _ in range(NB)]
  for b in np.flatnonzero(example_valid):
    real = gt['valid'][b] & ~gt['crowd'][b]
    crowd = gt['valid'][b] & gt['crowd'][b]
    best = lambda x: _np_iou(x, gt['boxes'][b][real]).max(axis=1) if real.any() else np.zeros(len(x))
    before, after = best(anchors), best(boxes[b])
    near = np.maximum(before, after) >= analysis.NEAR_IOU
    np.add.at(hist2d, (_np_bin(before[near]), _np_bin(after[near])), 1)
    for i, v in zip(_np_bin(before[before > 0]), after[before > 0]):
      out_by_bin[i].append(v)
    for d in range(len(dets['scores'][b])):
      c = dets['classes'][b, d]
      if not dets['valid'][b, d] or not known[c]:
        continue
      same = real & (gt['classes'][b] == c)
      iou = _np_iou(dets['boxes'][b, d : d + 1], gt['boxes'][b][same]).max() if same.any() else 0.0
      in_crowd = False
      for g in np.flatnonzero(crowd & (gt['classes'][b] == c)):
        x1, y1, x2, y2 = dets['boxes'][b, d]
        gx1, gy1, gx2, gy2 = gt['boxes'][b, g]
        inter = max(min(x2, gx2) - max(x1, gx1), 0) * max(min(y2, gy2) - max(y1, gy1), 0)
        in_crowd |= inter / ((x2 - x1) * (y2 - y1)) >= 0.5
      if in_crowd and iou < 0.5:
        continue
      score_by_bin[_np_bin(iou)].append(dets['scores'][b, d])
  stats = lambda lists, f: [float(f(v)) if v else None for v in lists]
  return {
    'num_images': int(example_valid.sum()),
    'hist2d': hist2d,
    'output_iou_mean': stats(out_by_bin, np.mean),
    'output_iou_std': stats(out_by_bin, np.std),
    'input_count': [len(v) for v in out_by_bin],
    'score_mean': stats(score_by_bin, np.mean),
    'score_std': stats(score_by_bin, np.std),
    'count': [len(v) for v in score_by_bin],
  }


def _assert_close_or_null(got, expected):
  assert [g is None for g in got] == [e is None for e in expected], (got, expected)
  np.testing.assert_allclose(
    [g for g in got if g is not None], [e for e in expected if e is not None], rtol=1e-5, atol=1e-6
  )


@pytest.mark.parametrize('split', [False, True], ids=['one batch', 'two batches'])
def test_statistics_match_numpy(split):
  anchors, boxes, dets, gt, example_valid = _scene()
  known = np.array([True, True, True, False])
  total = analysis.Accumulator()
  parts = [slice(0, 2), slice(2, 4)] if split else [slice(0, 4)]
  for part in parts:
    pick = lambda tree, p=part: {k: v[p] for k, v in tree.items()}
    total.add(batch_statistics(anchors, boxes[part], pick(dets), pick(gt), example_valid[part], known))
  got, ref = total.results(), _np_reference(anchors, boxes, dets, gt, example_valid, known)

  assert got['num_images'] == ref['num_images'] == 3
  fig3, fig5 = got['fig3'], got['fig5']
  np.testing.assert_array_equal(fig3['hist2d'], ref['hist2d'])
  assert fig3['count_before'] == ref['hist2d'].sum(1).tolist() and fig3['count_after'] == ref['hist2d'].sum(0).tolist()
  assert fig3['num_anchors'] == ref['hist2d'].sum() > 0 and fig3['count_after'][-1] >= 1  # anchor 0 onto object 0
  assert fig5['count'] == ref['count'] and fig5['input_count'] == ref['input_count']
  for key in ('score_mean', 'score_std', 'output_iou_mean', 'output_iou_std'):
    _assert_close_or_null(fig5[key], ref[key])
  assert None in fig5['score_mean'] and None in fig5['output_iou_mean']  # empty bins are null
  # Each image has 6 usable detections (one invalid, one of a non-dataset class); image 0 loses the one in the crowd
  # region of its class; the image without objects scores its 6 at IoU 0; the padding example counts for nothing.
  assert sum(fig5['count']) == 5 + 6 + 6 and fig5['count'][0] >= 6
  assert fig3['bins'] == fig5['iou_bins'] == fig5['input_iou_bins'] == list(analysis.EDGES)


def test_padding_and_crowd_rows_never_are_the_nearest_ground_truth():
  anchors, boxes, dets, gt, _ = _scene()
  real = gt['valid'] & ~gt['crowd']
  iou = np.asarray(analysis.nearest_gt_iou(anchors, gt['boxes'], real))
  # Anchor 3 is the padded row 3 of image 0 (IoU 1 with it): its nearest ground truth is a real object.
  assert iou[0, 3] == pytest.approx(_np_iou(anchors[3:4], gt['boxes'][0, :2]).max()) and iou[0, 3] < 0.7
  assert not iou[1].any()  # no objects: every anchor has input IoU 0
  after = np.asarray(analysis.nearest_gt_iou(boxes, gt['boxes'], real))
  assert after[0, 0] == after[3, 0] == 1.0  # regressed exactly onto object 0
  best, ignored = (np.asarray(x) for x in analysis.detection_iou(dets, gt))
  assert ignored[0, 5] and not ignored[0, 6] and best[0, 6] == 0.0
  crowd_hit = dict(dets, boxes=dets['boxes'].copy())
  crowd_hit['boxes'][0, 5] = gt['boxes'][0, 2]  # exactly the crowd box, class 2: IoU 0 with real objects
  assert np.asarray(analysis.detection_iou(crowd_hit, gt)[1])[0, 5]


def test_batches_merge_in_float64_without_losing_the_spread():
  """Many values near 0.9 with a small spread: a float32 sum of squares would lose the std; the per-batch two-pass
  moments merged in float64 keep it."""
  rs = np.random.RandomState(1)
  total, values = analysis.Accumulator(), []
  for _ in range(6):
    v = rs.normal(0.9, 0.004, 50_000).astype(np.float32)
    values.append(v)
    bins = np.full(v.shape, 3, np.int32)
    moments = analysis.binned_moments(jnp.asarray(v), jnp.asarray(bins), jnp.ones(v.shape, bool), NB)
    total.output_iou.add(moments)
  v = np.concatenate(values).astype(np.float64)
  assert total.output_iou.count[3] == len(v) and total.output_iou.means()[2] is None
  assert total.output_iou.means()[3] == pytest.approx(v.mean(), rel=1e-6)
  assert total.output_iou.stds()[3] == pytest.approx(v.std(), rel=1e-3)


def _two_runs():
  anchors, boxes, dets, gt, example_valid = _scene()
  runs = []
  for name, shift in (('conret', 0.0), ('retina', 2.0)):
    total = analysis.Accumulator()
    total.add(batch_statistics(anchors, boxes + shift, dets, gt, example_valid))
    runs.append(dict(total.results(), workdir=f'runs/{name}', step=7, label=name, regressions=1, method='RetinaNet'))
  return runs


def test_write_makes_both_figures_and_the_json(tmp_path):
  content = analysis.write(str(tmp_path), _two_runs())
  on_disk = json.loads((tmp_path / 'analysis.json').read_text())
  assert on_disk == content and on_disk['compare']['label'] == 'retina'
  assert set(on_disk['definitions']) >= {'input_iou', 'output_iou', 'regression', 'crowd', 'bins', 'fig3_anchors'}
  for name in ('localization.png', 'score_iou.png'):
    data = (tmp_path / name).read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 20_000


@pytest.mark.parametrize('num_runs', [1, 2])
def test_figure_captions_show_whole_inside_the_figure_and_below_the_panels(tmp_path, num_runs):
  from matplotlib.backends.backend_agg import FigureCanvasAgg

  runs = _two_runs()[:num_runs]
  plots = (
    (analysis_figures.plot_localization, analysis.FIG3_CAPTION),
    (analysis_figures.plot_score_iou, analysis.FIG5_CAPTION),
  )
  for plot, caption in plots:
    fig = plot(runs, str(tmp_path / 'figure.png'), caption=caption)
    renderer = FigureCanvasAgg(fig).get_renderer()
    texts = [t for t in fig.texts if t.get_text().split() and t.get_text().split()[0] == caption.split()[0]]
    assert len(texts) == 1, [t.get_text() for t in fig.texts]
    assert texts[0].get_text().split() == caption.split()  # every word, only line breaks added
    box = texts[0].get_window_extent(renderer)
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width and 0 <= box.y0 and box.y1 <= fig.bbox.height, (plot, box)
    for ax in fig.axes:  # tick labels and axis titles included
      assert ax.get_tightbbox(renderer).y0 > box.y1, (plot, ax.get_title())
