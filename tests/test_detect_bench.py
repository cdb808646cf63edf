"""`conret-bench detect` on a tiny model: every field, consistent values (no timing assertions)."""

import pytest

from conret_jax import detect_bench
from tests.cli.conftest import tiny_config


def test_detect_bench_reports_every_field():
  config = tiny_config()
  config.eval.global_batch_size = 2
  result = detect_bench.run_detect_bench(config, steps=1)
  for key in ('images_per_s', 'total_s', 'forward_s', 'postprocess_s', 'postprocess_share_of_forward'):
    assert result[key] > 0, key
  assert result['images_per_s'] == pytest.approx(2 / result['total_s'])
  assert result['image_hw'] == [128, 128] and result['batch'] == 2 and result['compute_dtype'] == 'float32'
  # The weights make every pair pass the threshold: NMS has a full load and detections come out.
  assert result['detections_per_image'] == config.eval.max_detections
  with pytest.raises(ValueError, match='steps=0'):
    detect_bench.run_detect_bench(config, steps=0)
