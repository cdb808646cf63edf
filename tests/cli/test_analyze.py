"""conret-analyze end to end through the real command line: two saved tiny runs (ConRetinaNet and its RetinaNet
baseline, untrained weights, each with its own config.json) on the synthetic shapes eval split. Checks the files,
every key of analysis.json and that its numbers agree with each other; a few-step model shows nothing of the paper's
findings, so no assertion is about them."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import xla_env

pytest.importorskip('conret_jax.data.pipeline')

from conret_jax.data import shapes  # noqa: E402 (after the importorskip above)
from conret_jax.data.info import ClassLayout, DatasetInfo  # noqa: E402 (after the importorskip above)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG = b'\x89PNG\r\n\x1a\n'
RUN_KEYS = {'workdir', 'step', 'label', 'num_images', 'regressions', 'method', 'fig3', 'fig5'}
FIG3_KEYS = {'bins', 'count_before', 'count_after', 'hist2d', 'num_anchors'}
FIG5_KEYS = {'iou_bins', 'score_mean', 'score_std', 'count', 'input_iou_bins', 'output_iou_mean', 'output_iou_std'}
FIG5_KEYS |= {'input_count'}


def _tiny_shapes(arg: str):
  spec = importlib.util.spec_from_file_location('tiny_shapes', os.path.join(REPO, 'tests', 'configs', 'tiny_shapes.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _files(folder) -> dict:
  return {
    os.path.relpath(os.path.join(root, name), folder): os.path.getmtime(os.path.join(root, name))
    for root, _, names in os.walk(folder)
    for name in names
  }


def _check_run(run: dict, *, num_images: int, detections_per_image: int) -> None:
  assert set(run) == RUN_KEYS and set(run['fig3']) == FIG3_KEYS and set(run['fig5']) == FIG5_KEYS
  assert run['step'] == 4 and run['num_images'] == num_images
  fig3, fig5 = run['fig3'], run['fig5']
  nb = len(fig3['bins']) - 1
  assert fig3['bins'] == fig5['iou_bins'] == fig5['input_iou_bins'] and fig3['bins'][0] == 0 and fig3['bins'][-1] == 1
  assert len(fig3['hist2d']) == nb and all(len(row) == nb for row in fig3['hist2d'])
  # One set of anchors, counted before and after regression.
  assert sum(fig3['count_before']) == sum(fig3['count_after']) == fig3['num_anchors'] == sum(map(sum, fig3['hist2d']))
  assert fig3['count_before'] == [sum(row) for row in fig3['hist2d']] and fig3['num_anchors'] > 0
  # Every anchor with input IoU >= 0.1 (bins 2..) enters both Figure 3 and Figure 5 (c, d).
  assert fig3['count_before'][2:] == fig5['input_count'][2:]
  # Score threshold 0: each real image keeps max_detections; the padding examples of the last batch count nothing.
  assert sum(fig5['count']) == num_images * detections_per_image
  for count, mean, std in (('count', 'score_mean', 'score_std'), ('input_count', 'output_iou_mean', 'output_iou_std')):
    assert [n == 0 for n in fig5[count]] == [m is None for m in fig5[mean]] == [s is None for s in fig5[std]]
    assert all(0 <= m <= 1 for m in fig5[mean] if m is not None)


def test_analyze_writes_the_figures_and_json_and_compares_two_runs(make_saved_run, tmp_path):
  workdirs = {}
  for name, consistent in (('conret', True), ('retina', False)):
    config = _tiny_shapes(f'batch=8,eval_images=10,cache={tmp_path / "shapes"}')
    config.consistent.enabled = consistent
    config.eval.score_threshold = 0.0  # keep every detection
    layout = ClassLayout.of(DatasetInfo(list(shapes.CATEGORY_IDS), list(shapes.SHAPE_NAMES), 0), config)
    workdirs[name] = str(tmp_path / name)
    make_saved_run(config, workdirs[name], 4, layout=layout)
  before = {name: _files(w) for name, w in workdirs.items()}
  out = tmp_path / 'out'
  env = xla_env.cpu_env(1)
  args = [f'--workdir={workdirs["conret"]}', f'--output={out}', '--num_images=6', f'--compare={workdirs["retina"]}']
  proc = subprocess.run(
    [sys.executable, '-m', 'conret_jax.cli.analyze', *args], capture_output=True, text=True, timeout=600, env=env
  )
  assert proc.returncode == 0, proc.stderr[-3000:]

  assert sorted(os.listdir(out)) == ['analysis.json', 'analyze.log', 'localization.png', 'score_iou.png']
  assert {name: _files(w) for name, w in workdirs.items()} == before  # read-only: nothing new, nothing rewritten
  for name in ('localization.png', 'score_iou.png'):
    data = (out / name).read_bytes()
    assert data[:8] == PNG and len(data) > 20_000
  content = json.loads((out / 'analysis.json').read_text())
  assert set(content) == RUN_KEYS | {'definitions', 'compare'}
  assert set(content['definitions']) >= {'input_iou', 'output_iou', 'regression', 'fig3_anchors', 'crowd', 'bins'}
  compare = content.pop('compare')
  content.pop('definitions')
  for run, workdir, method, regressions in (
    (content, 'conret', 'ConRetinaNet', 2),
    (compare, 'retina', 'RetinaNet', 1),
  ):
    _check_run(run, num_images=6, detections_per_image=10)
    assert run['workdir'] == workdirs[workdir] and run['method'] == method and run['regressions'] == regressions
  assert content['label'] == 'conret (ConRetinaNet)' and compare['label'] == 'retina (RetinaNet)'
  assert 'conret (ConRetinaNet), step 4: 6 images' in proc.stdout
