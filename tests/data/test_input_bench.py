from conret_jax import defaults
from conret_jax.data import bench


def test_run_input_bench_reports_rates():
  config = defaults.base_config()
  config.data.image_size = 128
  config.train.global_batch_size = 4
  result = bench.run_input_bench(config, num_batches=2, num_images=12, image_hw=(96, 128))
  assert result['cpu_cores'] >= 1 and result['batch_size'] == 4 and result['image_size'] == 128
  for key in ('images_per_s', 'images_per_s_per_core', 'decode_only_images_per_s', 'decode_resize_images_per_s'):
    assert result[key] > 0
  assert config.data.train.source == 'shapes'  # the caller's config is not modified
