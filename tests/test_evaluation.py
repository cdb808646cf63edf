"""COCO evaluation: coordinate conversion, the evaluate pass and its files (scoring: tests/test_coco_metrics.py)."""

import json
import os
import socket
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conret_jax import coco_metrics, defaults, eval_files, evaluation
from conret_jax.data import info as data_info
from tests.test_coco_metrics import CATEGORY_IDS, _gt, _result


def test_detections_to_coco_converts_coordinates_and_drops_padding():
  dets = {
    'boxes': np.array(
      [[[10, 20, 50, 60], [100, 0, 300, 90], [0, 0, 1, 1]], [[5, 5, 10, 10], [0, 0, 0, 0], [0, 0, 0, 0]]], np.float32
    ),
    'scores': np.array([[0.9, 0.123456789, 0.5], [0.8, 0.0, 0.0]], np.float32),
    'classes': np.array([[2, 0, 1], [1, 0, 0]], np.int32),
    'valid': np.array([[True, True, False], [True, False, False]]),
  }
  batch = {
    'image_id': np.array([17, -1], np.int32),
    'scale': np.array([[0.5, 0.5], [1.0, 1.0]], np.float32),
    'orig_hw': np.array([[100, 400], [64, 64]], np.int32),
    'example_valid': np.array([True, False]),
  }
  results = evaluation.detections_to_coco(dets, batch, CATEGORY_IDS)
  assert [r['image_id'] for r in results] == [17, 17]
  assert [r['category_id'] for r in results] == [42, 1]
  # Box 0: /0.5 -> (20, 40, 100, 120), y2 clipped to the original height 100 -> xywh (20, 40, 80, 60).
  assert results[0]['bbox'] == [20.0, 40.0, 80.0, 60.0]
  # Box 1: /0.5 -> (200, 0, 600, 180), clipped to width 400 / height 100.
  assert results[1]['bbox'] == [200.0, 0.0, 200.0, 100.0]
  assert results[0]['score'] == pytest.approx(0.9, abs=1e-6)
  assert results[1]['score'] == round(float(np.float32(0.123456789)), 5)
  json.dumps(results)  # plain python types only


def test_stretched_detections_map_back_per_axis():
  """resize='stretch' scales x by S / W and y by S / H: detections_to_coco, to_image_coords and coco_gt_from_batches
  divide x by sx and y by sy and clip to the image, as the NumPy reference does; a one-factor [B] scale is refused
  rather than read as pairs."""
  rs = np.random.RandomState(0)
  orig_hw = np.array([[120, 300], [250, 90]], np.int32)
  scale = np.float32(96) / orig_hw.astype(np.float32)  # (sy, sx) as the pipeline computes it
  wh = orig_hw[:, ::-1].astype(np.float64)
  x1y1 = rs.uniform(0, 0.7, (2, 5, 2)) * wh[:, None]
  boxes = np.concatenate([x1y1, x1y1 + rs.uniform(0.1, 0.6, (2, 5, 2)) * wh[:, None]], -1)  # some past the edge
  factor = np.tile(scale[:, ::-1], 2)[:, None].astype(np.float64)  # (sx, sy, sx, sy)
  stretched = (boxes * factor).astype(np.float32)  # model-input pixels of a 96 x 96 input
  limits = np.tile(wh, 2)[:, None]
  want = np.clip(stretched / factor, 0, limits)
  np.testing.assert_array_equal(evaluation.to_image_coords(stretched, scale, orig_hw), want)
  np.testing.assert_allclose(want, np.clip(boxes, 0, limits), atol=1e-3)

  dets = {'boxes': stretched, 'scores': np.full((2, 5), 0.5, np.float32), 'classes': np.zeros((2, 5), np.int32)}
  dets['valid'] = np.ones((2, 5), bool)
  batch = {'image_id': np.array([1, 2]), 'scale': scale, 'orig_hw': orig_hw, 'example_valid': np.ones(2, bool)}
  results = evaluation.detections_to_coco(dets, batch, CATEGORY_IDS)
  xywh = np.concatenate([want[..., :2], want[..., 2:] - want[..., :2]], -1).reshape(-1, 4)
  assert [r['bbox'] for r in results] == [[round(float(v), 2) for v in row] for row in xywh]

  rows = dict(batch, boxes=stretched, classes=dets['classes'], valid=dets['valid'], crowd=np.zeros((2, 5), bool))
  names = types.SimpleNamespace(category_of=np.array(CATEGORY_IDS), names=['a', 'b', 'c'])
  gt = evaluation.coco_gt_from_batches([rows], names)
  np.testing.assert_allclose([a['bbox'] for a in gt['annotations']], xywh, rtol=1e-12)
  with pytest.raises(ValueError, match='sy, sx'):
    evaluation.to_image_coords(stretched, scale[:, 0], orig_hw)


def test_torchvision_class_layout_scores_person_as_category_1():
  """The 91-way torchvision head: class k is COCO category k. Class 1 is a person (id 1), class 85 a clock (id 85);
  class 0 (background) and 12 (an id COCO does not use) are no category and are dropped."""
  config = defaults.base_config()
  config.model.num_classes, config.model.class_layout = 91, 'category_id'
  info = data_info.DatasetInfo(
    category_ids=list(data_info.COCO_CATEGORY_IDS), class_names=list(data_info.COCO_CLASS_NAMES), num_examples=1
  )
  layout = data_info.ClassLayout.of(info, config)
  dets = {
    'boxes': np.tile(np.array([10, 10, 50, 50], np.float32), (1, 4, 1)),
    'scores': np.array([[0.9, 0.8, 0.7, 0.6]], np.float32),
    'classes': np.array([[1, 85, 0, 12]], np.int32),
    'valid': np.ones((1, 4), bool),
  }
  batch = {
    'image_id': np.array([7]),
    'scale': np.array([[1.0, 1.0]], np.float32),
    'orig_hw': np.array([[100, 100]]),
    'example_valid': np.array([True]),
  }
  results = evaluation.detections_to_coco(dets, batch, layout.category_of)
  assert [r['category_id'] for r in results] == [1, 85]
  assert layout.class_names[1] == 'person' and layout.class_names[85] == 'clock'


def test_coco_metrics_is_the_summary_of_score():
  gt = _gt({1: (100, 100, [(1, [10, 10, 50, 50], 0)]), 2: (100, 100, [(1, [20, 20, 50, 50], 0)])})
  results = [_result(1, 1, [10, 10, 50, 50], 0.9)]
  assert evaluation.coco_metrics(gt, []) == {name: 0.0 for name in evaluation.METRIC_NAMES}
  assert evaluation.coco_metrics(gt, results, image_ids=[1])['AP'] == pytest.approx(1.0)
  for backend in ('auto', 'pycocotools'):
    assert (
      evaluation.coco_metrics(gt, results, backend=backend) == coco_metrics.score(gt, results, None, backend).summary
    )


def test_write_eval(tmp_path):
  out = eval_files.eval_dir(str(tmp_path), 300)
  assert out == os.path.join(str(tmp_path), 'eval', 'step_300')
  eval_files.write_eval(out, [_result(1, 1, [1, 2, 3, 4], 0.5)], {'AP': np.float32(0.25)})
  assert json.load(open(os.path.join(out, 'detections.json')))[0]['bbox'] == [1, 2, 3, 4]
  assert json.load(open(os.path.join(out, 'metrics.json'))) == {'AP': 0.25}
  per_class = {'person': {'category_id': 1, 'AP': 0.5, 'AP50': 0.75, 'AP75': -1.0}}
  eval_files.write_eval(out, [], {'AP': 0.25}, per_class)
  assert json.load(open(os.path.join(out, 'metrics.json'))) == {'AP': 0.25, 'per_class': per_class}


def _fake_bucket(monkeypatch, root):
  """tensorflow's gfile, as fileio's remote branch calls it, keeping gs://BUCKET/... under ROOT/BUCKET/...; returns
  the (function, path) calls it received."""
  calls = []

  def local_path(path):
    assert path.startswith('gs://'), path
    return os.path.join(root, path[len('gs://') :])

  def local(name):
    def call(path, *args):
      calls.append((name, path))
      target = local_path(path)
      if name == 'makedirs':
        return os.makedirs(target, exist_ok=True)
      return os.path.exists(target) if name == 'exists' else open(target, *args)

    return call

  def rename(source, target, overwrite=False):
    calls.append(('rename', target))
    if not overwrite and os.path.exists(local_path(target)):
      raise FileExistsError(target)
    os.replace(local_path(source), local_path(target))

  gfile = types.SimpleNamespace(GFile=local('GFile'), exists=local('exists'), makedirs=local('makedirs'), rename=rename)
  monkeypatch.setitem(sys.modules, 'tensorflow', types.SimpleNamespace(io=types.SimpleNamespace(gfile=gfile)))
  return calls


def test_an_evaluation_of_a_gs_workdir_is_written_through_fileio(tmp_path, monkeypatch):
  """Every file of an evaluation record (json, settings.json, the picture) goes to the bucket, none to a local
  'gs:' folder under the working directory, and read_per_class reads it back from there."""
  calls = _fake_bucket(monkeypatch, str(tmp_path / 'bucket'))
  (tmp_path / 'cwd').mkdir()
  monkeypatch.chdir(tmp_path / 'cwd')
  rs = np.random.RandomState(0)
  picture = (
    rs.randint(0, 255, (32, 32, 3)).astype(np.uint8),
    {'boxes': np.array([[2, 2, 20, 20]], np.float32), 'scores': np.array([0.9]), 'classes': np.array([0])},
    {'boxes': np.array([[2, 2, 20, 20]], np.float32), 'classes': np.array([0]), 'valid': np.array([True])},
  )
  collected = types.SimpleNamespace(results=[_result(1, 1, [1, 2, 3, 4], 0.5)], pictured=[picture])
  per_class = {'a': {'category_id': 1, 'AP': 0.5, 'AP50': 0.75, 'AP75': -1.0}}
  scores = types.SimpleNamespace(summary={'AP': 0.5}, per_class=per_class)
  record = eval_files.Record('gs://b/run', 3, '+eval.num_images=2')
  eval_files.write_record(record, collected, scores, ['a'], defaults.base_config())
  assert os.listdir(tmp_path / 'cwd') == []
  written = tmp_path / 'bucket' / 'b' / 'run' / 'eval' / 'step_3+eval.num_images=2'
  assert sorted(os.listdir(written)) == ['detections.json', 'detections.png', 'metrics.json', 'settings.json']
  assert json.loads((written / 'settings.json').read_text())['overrides'] == ['eval.num_images=2']
  assert (written / 'detections.png').read_bytes()[:4] == b'\x89PNG'
  assert eval_files.read_per_class(record.directory) == per_class
  assert eval_files.read_per_class('gs://b/run/eval/step_4') is None
  assert ('GFile', f'{record.directory}/metrics.json.tmp') in calls  # written whole, then moved into place
  assert ('rename', f'{record.directory}/metrics.json') in calls


def _eval_batches(mesh, second_hw=(32, 32)):
  """Two global batches of 8 (the last with 3 padding examples) and a detector that returns the ground truth.
  second_hw: the padded size of the second batch (short_side resizing pads to one shape per orientation)."""
  rs = np.random.RandomState(3)
  sharding = NamedSharding(mesh, P('data'))
  images_gt, batches, outputs = {}, [], []
  for first in (0, 8):
    n_real = 8 if first == 0 else 5
    scale = rs.uniform(0.4, 1.0, (8, 2)).astype(np.float32)  # (sy, sx), unequal: a 'stretch' resize
    orig_hw = rs.randint(60, 160, (8, 2)).astype(np.int32)
    boxes = np.zeros((8, 4, 4), np.float32)
    classes = rs.randint(0, 3, (8, 4)).astype(np.int32)
    valid = np.zeros((8, 4), bool)
    crowd = np.zeros((8, 4), bool)
    for b in range(n_real):
      image_id = 100 + first + b
      h, w = orig_hw[b]
      anns = []
      for m in range(rs.randint(1, 5)):
        x1, y1 = rs.uniform(0, w - 40), rs.uniform(0, h - 40)
        box = np.array([x1, y1, x1 + rs.uniform(20, 40), y1 + rs.uniform(20, 40)])
        boxes[b, m] = box * np.tile(scale[b, ::-1], 2)
        valid[b, m] = True
        anns.append((CATEGORY_IDS[classes[b, m]], [box[0], box[1], box[2] - box[0], box[3] - box[1]], 0))
      images_gt[image_id] = (int(h), int(w), anns)
    image_id = np.where(np.arange(8) < n_real, 100 + first + np.arange(8), -1).astype(np.int32)
    hw = (32, 32) if first == 0 else second_hw
    batch = {
      'images': np.full((8, *hw, 3), 100.0, np.float32),
      'boxes': boxes,
      'classes': classes,
      'valid': valid,
      'crowd': crowd,
      'image_id': image_id,
      'orig_hw': orig_hw,
      'scale': scale,
      'example_valid': np.arange(8) < n_real,
    }
    batches.append({k: jax.device_put(v, sharding) for k, v in batch.items()})
    outputs.append(
      {
        'boxes': jax.device_put(boxes, sharding),
        'scores': jax.device_put(np.where(valid, 0.9, 0.0).astype(np.float32), sharding),
        'classes': jax.device_put(classes, sharding),
        'valid': jax.device_put(valid, sharding),
      }
    )
  queue = list(outputs)
  detect_fn = lambda model, variables, images, config, image_sizes=None: queue.pop(0)
  return images_gt, batches, detect_fn


@pytest.mark.parametrize('with_gt', [True, False])
def test_evaluate_end_to_end(tmp_path, with_gt):
  mesh = jax.make_mesh((8,), ('data',))
  images_gt, batches, detect_fn = _eval_batches(mesh)
  info = types.SimpleNamespace(
    category_ids=CATEGORY_IDS, class_names=['a', 'b', 'c'], coco_gt=_gt(images_gt) if with_gt else None
  )
  config = defaults.base_config()
  config.eval.visualize = 3
  metrics = evaluation.evaluate(
    None,
    None,
    config,
    mesh,
    record=eval_files.Record(str(tmp_path), 12),
    data=evaluation.EvalData(batches, info),
    detect_fn=detect_fn,
  )
  assert metrics['AP50'] == pytest.approx(1.0) and metrics['AP'] == pytest.approx(1.0)
  out = os.path.join(str(tmp_path), 'eval', 'step_12')
  results = json.load(open(os.path.join(out, 'detections.json')))
  assert sorted({r['image_id'] for r in results}) == sorted(images_gt)  # padding examples dropped
  assert len(results) == sum(len(v[2]) for v in images_gt.values())
  written = json.load(open(os.path.join(out, 'metrics.json')))
  assert written['AP'] == pytest.approx(1.0)
  names = [f'c{c}' for c in CATEGORY_IDS] if with_gt else info.class_names  # the gt's categories, or the source's
  assert [(n, written['per_class'][n]['category_id']) for n in names] == list(zip(names, CATEGORY_IDS))
  assert all(written['per_class'][n]['AP'] == pytest.approx(1.0) for n in names)
  assert os.path.getsize(os.path.join(out, 'detections.png')) > 0


def test_evaluate_pictures_with_two_padded_shapes(tmp_path):
  """Eval batches of two shapes (short_side's landscape and portrait buckets): the picture keeps one shape."""
  mesh = jax.make_mesh((8,), ('data',))
  images_gt, batches, detect_fn = _eval_batches(mesh, second_hw=(32, 64))
  info = types.SimpleNamespace(category_ids=CATEGORY_IDS, class_names=['a', 'b', 'c'], coco_gt=_gt(images_gt))
  config = defaults.base_config()
  config.eval.visualize = 12  # more than the first batch holds: images of both shapes are collected
  metrics = evaluation.evaluate(
    None,
    None,
    config,
    mesh,
    record=eval_files.Record(str(tmp_path), 1),
    data=evaluation.EvalData(batches, info),
    detect_fn=detect_fn,
  )
  assert metrics['AP'] == pytest.approx(1.0)
  assert os.path.getsize(os.path.join(str(tmp_path), 'eval', 'step_1', 'detections.png')) > 0


def test_evaluate_num_images_limit():
  mesh = jax.make_mesh((8,), ('data',))
  images_gt, batches, detect_fn = _eval_batches(mesh)
  config = defaults.base_config()
  config.eval.num_images = 3
  info = types.SimpleNamespace(category_ids=CATEGORY_IDS, class_names=['a', 'b', 'c'], coco_gt=None)
  seen = []

  def counting_detect(*args, **kwargs):
    seen.append(1)
    return detect_fn(*args, **kwargs)

  data = evaluation.EvalData(iter(batches), info)
  metrics = evaluation.evaluate(None, None, config, mesh, data=data, detect_fn=counting_detect)
  assert len(seen) == 1  # stopped after the first batch
  assert metrics['AP'] == pytest.approx(1.0)
  # Against the full ground truth, evaluating the same 3 images only: still perfect (the others are not counted).
  info.coco_gt = _gt(images_gt)
  _, batches, detect_fn = _eval_batches(mesh)
  data = evaluation.EvalData(batches, info)
  assert evaluation.evaluate(None, None, config, mesh, data=data, detect_fn=detect_fn)['AR100'] == pytest.approx(1.0)


@pytest.mark.parametrize('with_gt', [True, False])
def test_detections_are_named_by_the_runs_classes_not_the_eval_sets(with_gt, caplog):
  """Trained on ids (3, 7, 11, 15, 19), evaluated on a set listing (3, 7, 11, 19, 23): the model's class 4 is
  category 19 whatever position 19 holds in the eval set. The eval set's 23 (never learned) keeps its ground truth
  and its name, 15 (learned, absent) has no AP; one line reports each."""
  mesh = jax.make_mesh((8,), ('data',))
  run = data_info.ClassLayout('contiguous', 5, (3, 7, 11, 15, 19), ('circle', 'square', 'triangle', 'cross', 'ring'))
  eval_ids, eval_names = [3, 7, 11, 19, 23], ['circle', 'square', 'triangle', 'ring', 'star']
  box_a, box_b = [10.0, 10.0, 40.0, 40.0], [60.0, 60.0, 90.0, 90.0]
  batch = {
    'images': np.zeros((8, 128, 128, 3), np.float32),
    'boxes': np.zeros((8, 2, 4), np.float32),
    'classes': np.zeros((8, 2), np.int32),
    'valid': np.zeros((8, 2), bool),
    'crowd': np.zeros((8, 2), bool),
    'image_id': np.where(np.arange(8) == 0, 5, -1).astype(np.int32),
    'orig_hw': np.full((8, 2), 128, np.int32),
    'scale': np.ones((8, 2), np.float32),
    'example_valid': np.arange(8) == 0,
  }
  batch['boxes'][0] = [box_a, box_b]
  batch['classes'][0] = [3, 4]  # the eval pipeline's numbering: its categories 19 and 23
  batch['valid'][0] = True
  dets = {
    'boxes': np.tile(np.array([[box_a, box_b]], np.float32), (8, 1, 1)),
    'scores': np.full((8, 2), 0.9, np.float32),
    'classes': np.tile(np.array([[4, 3]], np.int32), (8, 1)),  # the model's: ring (19) on A, cross (15) on B
    'valid': np.tile(np.array([[True, True]]), (8, 1)),
  }
  gt = _gt({5: (128, 128, [(19, [10, 10, 30, 30], 0), (23, [60, 60, 30, 30], 0)])}) if with_gt else None
  if gt is not None:
    gt['categories'] = [{'id': c, 'name': n} for c, n in zip(eval_ids, eval_names)]
  info = types.SimpleNamespace(category_ids=eval_ids, class_names=eval_names, coco_gt=gt)
  config = defaults.base_config()
  config.model.num_classes = 5
  with caplog.at_level('WARNING'):
    scores = evaluation.evaluate(
      None,
      None,
      config,
      mesh,
      classes=run,
      data=evaluation.EvalData([batch], info),
      detect_fn=lambda *a, **k: dets,
    )
  assert 'never learned by this run' in caplog.text and 'ids [23]' in caplog.text
  assert 'not in the eval set' in caplog.text and 'ids [15]' in caplog.text
  # Ring found exactly where its ground truth is; star never detected: AP (mean over the two) 0.5.
  assert scores['AP50'] == pytest.approx(0.5)


def test_no_image_evaluated_is_undefined_not_zero():
  """An evaluation that visits no image (an empty split) reports every metric as undefined (-1), not 0.0."""
  mesh = jax.make_mesh((8,), ('data',))
  images_gt, _, _ = _eval_batches(mesh)
  info = types.SimpleNamespace(category_ids=CATEGORY_IDS, class_names=['a', 'b', 'c'], coco_gt=_gt(images_gt))
  metrics = evaluation.evaluate(None, None, defaults.base_config(), mesh, data=evaluation.EvalData([], info))
  assert metrics == {name: -1.0 for name in evaluation.METRIC_NAMES}


_WORKER = r'''
"""One process of a 2-process run: evaluate() and Checkpointer across processes (CPU, gloo)."""
import json, os, sys
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
port, pid, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2, process_id=pid)
import types
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from conret_jax import defaults, eval_files, evaluation
from conret_jax.train import checkpoint

mesh = jax.make_mesh((4,), ('data',))
sharding = NamedSharding(mesh, P('data'))
cats = [1, 2]
rs = np.random.RandomState(0)  # same on both processes: the global batch, each takes its rows
boxes = np.zeros((8, 2, 4), np.float32); boxes[:, 0] = [10, 10, 60, 50]; boxes[:, 1] = [20, 30, 90, 100]
classes = rs.randint(0, 2, (8, 2)).astype(np.int32)
ev = np.arange(8) < 7
glob = {'images': np.full((8, 128, 128, 3), 50, np.float32), 'boxes': boxes, 'classes': classes,
        'valid': np.ones((8, 2), bool), 'crowd': np.zeros((8, 2), bool),
        'image_id': np.where(ev, np.arange(8) + 1, -1).astype(np.int32), 'orig_hw': np.full((8, 2), 256, np.int32),
        'scale': np.full((8, 2), 0.5, np.float32), 'example_valid': ev}
rows = slice(4 * pid, 4 * pid + 4)
to_global = lambda x: jax.make_array_from_process_local_data(sharding, x[rows], x.shape)
batch = {k: to_global(v) for k, v in glob.items()}
dets = {'boxes': batch['boxes'], 'scores': to_global(np.full((8, 2), 0.9, np.float32)), 'classes': batch['classes'],
        'valid': batch['valid']}
config = defaults.base_config(); config.eval.visualize = 2
info = types.SimpleNamespace(category_ids=cats, class_names=['a', 'b'], coco_gt=None)
metrics = evaluation.evaluate(None, None, config, mesh, record=eval_files.Record(workdir, 3),
                              data=evaluation.EvalData([batch], info), detect_fn=lambda *a, **k: dets)

# Checkpoint: saved sharded over the 4 devices of both processes, restored replicated.
state = {'w': to_global(np.arange(32, dtype=np.float32).reshape(8, 4))}
ckpt = checkpoint.Checkpointer(workdir, every_steps=1, keep=2, config=config)
ckpt.save(5, state, {'step': 5})
ckpt.wait()
target = {'w': jax.ShapeDtypeStruct((8, 4), np.float32, sharding=NamedSharding(mesh, P()))}
restored, data = ckpt.restore(None, target)
ckpt.close()
ok = bool(np.array_equal(np.asarray(restored['w'].addressable_data(0)), np.arange(32).reshape(8, 4)))
print('RESULT ' + json.dumps({'metrics': metrics, 'restored': ok, 'data': data}), flush=True)
'''


def test_evaluate_and_checkpoint_across_two_processes(tmp_path):
  """Two CPU processes (2 devices each): gathered detections, one pycocotools run, the same metrics on both;
  a checkpoint saved sharded over both processes restores replicated."""
  script = tmp_path / 'worker.py'
  script.write_text(_WORKER)
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(port), str(i), str(tmp_path / 'wd')],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=240)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs
  results = [json.loads(next(ln for ln in out.splitlines() if ln.startswith('RESULT '))[7:]) for out in outputs]
  assert results[0] == results[1]
  # 7 real images (one padding example), 2 objects each, all detected: perfect AP.
  assert results[0]['metrics']['AP'] == pytest.approx(1.0)
  assert results[0]['restored'] and results[0]['data'] == {'step': 5}
  written = json.load(open(tmp_path / 'wd' / 'eval' / 'step_3' / 'detections.json'))
  assert sorted({r['image_id'] for r in written}) == list(range(1, 8)) and len(written) == 14
  # Boxes were in 0.5-scaled input pixels: back in original pixels.
  assert sorted(map(tuple, (r['bbox'] for r in written)))[0] == (20.0, 20.0, 100.0, 80.0)


def test_an_evaluation_never_writes_over_a_record_made_with_other_settings(tmp_path):
  """A run resumed with eval.num_images=50 has that in config.json now; its step-5 folder was written with 0 (every
  image). An evaluation of step 5 with the run's current settings goes next to it, named for what differs from that
  folder's own settings.json; one with the folder's settings, or of a step without a folder, is the run's own."""
  from conret_jax import defaults

  before, after = defaults.base_config(), defaults.base_config()
  after.eval.num_images = 50
  folder = tmp_path / 'eval' / 'step_5'
  folder.mkdir(parents=True)
  (folder / 'settings.json').write_text(json.dumps({'overrides': [], 'config': before.to_dict()}, default=str))
  assert eval_files.record_for(str(tmp_path), 5, after, after).suffix == '+eval.num_images=50'
  assert eval_files.record_for(str(tmp_path), 5, before, before).suffix == ''
  assert eval_files.record_for(str(tmp_path), 6, after, after).suffix == ''
  assert eval_files.record_for(str(tmp_path), 6, after, before).suffix == '+eval.num_images=0'  # an override
  # An override folder written before the resume (num_images=50 over the run's 0) is not written over either.
  override = tmp_path / 'eval' / 'step_5+eval.num_images=50'
  override.mkdir()
  (override / 'settings.json').write_text(json.dumps({'config': after.to_dict()}, default=str))
  later = defaults.base_config()
  later.eval.num_images, later.eval.score_threshold = 50, 0.3
  assert eval_files.record_for(str(tmp_path), 5, before, later).suffix == (
    '+eval.num_images=50+eval.score_threshold=0.3'
  )
  assert eval_files.record_for(str(tmp_path), 5, before, after).suffix == '+eval.num_images=50'  # its own settings
  (folder / 'settings.json').write_text('{"config": ')  # damaged: unknown settings, as a folder written without one
  assert eval_files.record_for(str(tmp_path), 5, after, after).suffix == ''
