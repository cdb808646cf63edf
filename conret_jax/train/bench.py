"""Benchmark of the real train step on synthetic batches (`conret-bench step`).

Builds exactly what `conret-train` builds (mesh, model, sharded state, jitted step) and feeds it random images with
random ground truth already on the devices, so the number is the step alone, not the input pipeline. Times N steps
after compilation, blocking on each result, and reports the median.
"""

import resource
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import conret_jax
from conret_jax import config_checks
from conret_jax.train import mesh as mesh_lib
from conret_jax.train import step as step_lib

# Peak dense bf16 matrix throughput per chip, for model-FLOPs utilization (vendor datasheets).
PEAK_BF16_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'TPU v4': 275.0, 'TPU v5p': 459.0,
                    'TPU v5 lite': 197.0, 'TPU v6 lite': 918.0}


def synthetic_batch(config: ml_collections.ConfigDict, image_hw, rng: np.random.Generator) -> dict:
  """A host batch like the pipeline's: random images and 1..max_boxes random boxes per image."""
  b, m = config.train.global_batch_size, config.data.max_boxes
  h, w = image_hw
  xy = rng.uniform(0, [w * 0.8, h * 0.8], (b, m, 2))
  wh = rng.uniform(16, [w * 0.5, h * 0.5], (b, m, 2))
  boxes = np.concatenate([xy, np.minimum(xy + wh, [w, h])], -1).astype(np.float32)
  counts = rng.integers(1, min(m, 20) + 1, b)
  valid = np.arange(m)[None] < counts[:, None]
  return dict(
      images=rng.uniform(0, 255, (b, h, w, 3)).astype(np.float32),
      boxes=np.where(valid[..., None], boxes, 0).astype(np.float32),
      classes=rng.integers(0, config.model.num_classes, (b, m)).astype(np.int32),
      valid=valid, crowd=np.zeros((b, m), bool))


def _peak_memory_mb() -> float:
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 2**20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # host RSS (KiB on Linux): the CPU case


def _peak_tflops(device) -> float | None:
  kind = getattr(device, 'device_kind', '')
  for name, tflops in PEAK_BF16_TFLOPS.items():
    if name.lower() in kind.lower():
      return tflops
  return None


def run_step_bench(config: ml_collections.ConfigDict, steps: int, image_hw=None) -> dict:
  """Times `steps` train steps after compilation. Returns the JSON-able result."""
  config_checks.validate(config)
  image_hw = tuple(image_hw or (config.data.image_size, config.data.image_size))
  mesh = mesh_lib.make_mesh(config)
  model = conret_jax.build_model(config)
  state, shardings = step_lib.init_state(model, config, mesh, jax.random.PRNGKey(0), (128, 128))
  train_step = step_lib.make_train_step(model, config, mesh, shardings)
  batch = jax.device_put(synthetic_batch(config, image_hw, np.random.default_rng(0)), mesh_lib.batch_sharding(mesh))

  t0 = time.perf_counter()
  compiled = train_step.lower(state, batch).compile()
  compile_time = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  flops = float(cost.get('flops', 0.0))

  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
  step_time = statistics.median(times)
  device = jax.devices()[0]
  result = dict(
      step_time_s=step_time, step_time_min_s=min(times), compile_time_s=compile_time,
      images_per_s=config.train.global_batch_size / step_time,
      images_per_s_per_device=config.train.global_batch_size / step_time / jax.device_count(),
      peak_memory_mb=_peak_memory_mb(), device=f'{jax.device_count()}x {getattr(device, "device_kind", device.platform)}',
      global_batch_size=config.train.global_batch_size, image_hw=list(image_hw), steps=steps,
      consistent=bool(config.consistent.enabled), compute_dtype=config.model.compute_dtype,
      step_tflops=flops / 1e12, loss=float(metrics['loss']))
  peak = _peak_tflops(device)
  if peak and flops:
    result['mfu'] = flops / step_time / (peak * 1e12 * jax.device_count())
  return result
