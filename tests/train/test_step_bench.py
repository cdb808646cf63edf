"""`conret-bench step` on a tiny model: the result carries every field, with sane values (no timing assertions)."""

import jax
import pytest

from conret_jax import defaults
from conret_jax.train import bench


def tiny_config(consistent=True):
  c = defaults.base_config()
  c.model.num_classes = 3
  c.model.backbone.depth = 18
  c.model.backbone.width = 8
  c.model.fpn.channels = 16
  c.model.fpn.max_level = 5  # P3-P5: faster to compile
  c.model.head.channels = 16
  c.model.head.num_convs = 1
  c.data.resize = 'square'
  c.data.image_size = 128
  c.data.max_boxes = 8
  c.train.global_batch_size = 2
  c.eval.global_batch_size = 2
  c.consistent.enabled = consistent
  return c


@pytest.fixture(scope='module')
def consistent_result():
  return bench.run_step_bench(tiny_config(), steps=2, devices=jax.devices()[:1])


def test_step_bench_reports_every_field(consistent_result):
  result = consistent_result
  for key in (
    'step_time_s',
    'step_time_min_s',
    'step_cpu_s',
    'compile_time_s',
    'images_per_s',
    'images_per_s_per_device',
    'peak_memory_mb',
    'xla_temp_mb',
    'step_tflops',
  ):
    assert result[key] > 0, key
  assert result['step_time_min_s'] <= result['step_time_s'] <= result['step_time_max_s']
  assert result['images_per_s'] == pytest.approx(2 / result['step_time_s'])
  assert result['device'] == '1x cpu'
  assert result['image_hw'] == [128, 128]  # square resize: the pipeline's padded input
  assert result['steps'] == 2 and result['global_batch_size'] == 2 and result['consistent'] is True
  assert result['loss'] > 0 and 'mfu' not in result  # CPU: no known peak, so no utilization


def test_step_runner_advances_state_and_counts_flops(consistent_result):
  off = bench.StepRunner(tiny_config(consistent=False), devices=jax.devices()[:1])
  assert int(off.state.step) == 1  # the warm-up step ran and the donated state was replaced
  wall, cpu = off.run(2)
  assert len(wall) == len(cpu) == 2 and min(wall) > 0 and min(cpu) >= 0
  assert int(off.state.step) == 3
  assert set(off.metrics) >= {'cls_loss_0', 'box_loss_0', 'num_pos_0'} and 'cls_loss_1' not in off.metrics
  # The consistent loss adds a second box conv and a second matching: strictly more work than RetinaNet.
  assert consistent_result['step_tflops'] > off.flops / 1e12 > 0


def test_short_side_bench_uses_the_pipeline_shape():
  config = tiny_config()
  config.data.resize = 'short_side'
  config.data.image_size = 100
  config.data.max_size = 170
  assert bench.default_image_hw(config) == (128, 256)  # both sides padded up to multiples of 128


def test_rejects_zero_steps():
  with pytest.raises(ValueError, match='steps=0'):
    bench.run_step_bench(tiny_config(), steps=0)
