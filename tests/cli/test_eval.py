"""conret-eval: restore + the shared `evaluation.evaluate` over the real eval pipeline (synthetic shapes data)."""

import json
import os

import pytest

for _module in (
  'conret_jax.detectors',
  'conret_jax.inference',
  'conret_jax.train.state',
  'conret_jax.mesh',
  'conret_jax.data.pipeline',
):
  pytest.importorskip(_module)

from conret_jax import defaults, eval_files, evaluation  # noqa: E402 (after the importorskip above)
from conret_jax.cli import eval as eval_cli  # noqa: E402 (after the importorskip above)


def test_format_metrics_in_percent_with_a_row_per_class():
  """conret-train and conret-eval print this one table: AP in percent, '-' where undefined."""
  per_class = {'circle': {'category_id': 3, 'AP': 0.5, 'AP50': 0.75, 'AP75': -1.0}}
  lines = eval_files.format_metrics({'AP': 0.3651, 'APs': -1.0}, per_class, title='run, step 12').splitlines()
  assert lines[0] == 'run, step 12 (AP in percent)'
  assert lines[1].split() == ['AP', 'APs'] and lines[2].split() == ['36.5', '-']
  assert lines[4].split() == ['class', 'id', 'AP', 'AP50', 'AP75']
  assert lines[5].split() == ['circle', '3', '50.0', '75.0', '-']


def test_eval_run_on_shapes(trained_workdir, make_tiny_config, tmp_path):
  from conret_jax import data as data_lib

  workdir, _ = trained_workdir
  config = make_tiny_config()
  config.data.eval = defaults.data_source_config(
    source='shapes', split='val', num_examples=10, cache_dir=str(tmp_path / 'shapes')
  )
  config.consistent.inference_reg_steps = 1  # inference-only settings may differ from the checkpoint's run
  record, metrics = eval_cli.run(config, workdir)
  assert record.step == 7 and set(metrics) == set(evaluation.METRIC_NAMES)

  out = record.directory
  results = json.load(open(os.path.join(out, 'detections.json')))
  info = data_lib.dataset_info(config.data.eval, config, train=False)
  gt_ids = [im['id'] for im in info.coco_gt['images']]
  # Score threshold 0 and 5 detections per image: every one of the 10 images (8 + 2 in a padded batch) is covered,
  # no padding example leaks in.
  assert sorted({r['image_id'] for r in results}) == sorted(gt_ids) and len(results) == 50
  written = json.load(open(os.path.join(out, 'metrics.json')))
  assert written.pop('per_class').keys() == set(info.class_names)
  assert written == pytest.approx(metrics)
  assert evaluation.coco_metrics(info.coco_gt, results, gt_ids) == pytest.approx(metrics)
  assert os.path.getsize(os.path.join(out, 'detections.png')) > 0
