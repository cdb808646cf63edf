"""Benchmark of the real train step on synthetic batches (`conret-bench step`).

Builds exactly what `conret-train` builds (mesh, model, sharded state, jitted step) and feeds it random images with
random ground truth already on the devices, so the number is the step alone, not the input pipeline. Times N steps
after compilation and one warm-up step, blocking on each result, and reports the median.

Besides wall-clock time it records the process's CPU time per step (all threads): on a CPU machine shared with other
jobs, wall time grows with their load while CPU time mostly does not, so CPU seconds are the steadier measure of
the work done. `StepRunner` keeps a compiled step and its state alive, so a comparison can alternate variants in one
process (bench/step_compare.py) and machine load drifts affect both alike.
"""

import resource
import statistics
import time

import jax
import ml_collections
import numpy as np

import conret_jax
from conret_jax import config_checks, flops
from conret_jax import mesh as mesh_lib
from conret_jax.data import sizes
from conret_jax.train import state as state_lib
from conret_jax.train import step as step_lib

# Peak dense bf16 matrix throughput per chip, for model-FLOPs utilization (vendor datasheets).
PEAK_BF16_TFLOPS = {
  'H100': 989.0,
  'H200': 989.0,
  'A100': 312.0,
  'TPU v4': 275.0,
  'TPU v5p': 459.0,
  'TPU v5 lite': 197.0,
  'TPU v6 lite': 918.0,
}


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
    valid=valid,
    crowd=np.zeros((b, m), bool),
  )


def default_image_hw(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """The padded input the training pipeline feeds: (S, S) for 'square', the landscape bucket for 'short_side'."""
  return tuple(next(iter(sizes.padded_shapes(config.data).values())))


def _peak_memory_mb() -> float:
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 2**20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # host RSS (KiB on Linux): the CPU case


def peak_tflops(device) -> float | None:
  """The device's dense bf16 peak in TFLOP/s from PEAK_BF16_TFLOPS by its device_kind, or None (e.g. a CPU)."""
  kind = getattr(device, 'device_kind', '')
  for name, tflops in PEAK_BF16_TFLOPS.items():
    if name.lower() in kind.lower():
      return tflops
  return None


def step_flops(model, config: ml_collections.ConfigDict, state, batch) -> float:
  """FLOPs of one train step on the global batch (conret_jax/flops.py: convolutions and matrix products, forward
  and backward): the same on any platform and number of devices. `state` and `batch` may be abstract."""
  abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  step_fn = step_lib.make_step_fn(model, config, state.params)
  return flops.count_flops(step_fn, abstract(state), abstract(batch))


class StepRunner:
  """One compiled train step with its (donated, hence replaced every step) state and a device-resident batch."""

  def __init__(self, config: ml_collections.ConfigDict, image_hw=None, devices=None):
    config_checks.validate(config)
    self.config = config
    self.image_hw = tuple(image_hw or default_image_hw(config))
    mesh = mesh_lib.make_mesh(config, devices)
    model = conret_jax.build_model(config)
    self.state, shardings = state_lib.init_state(model, config, mesh, jax.random.PRNGKey(0))
    train_step = step_lib.make_train_step(model, config, mesh, shardings)
    self.batch = jax.device_put(
      synthetic_batch(config, self.image_hw, np.random.default_rng(0)), mesh_lib.batch_sharding(mesh)
    )
    t0 = time.perf_counter()
    self.compiled = train_step.lower(self.state, self.batch).compile()
    self.compile_time_s = time.perf_counter() - t0
    self.flops = step_flops(model, config, self.state, self.batch)
    mem = self.compiled.memory_analysis()
    self.xla_temp_mb = float(getattr(mem, 'temp_size_in_bytes', 0)) / 2**20 if mem is not None else 0.0
    self.metrics = None
    self.run(1)  # warm-up: first-call allocations and thread-pool start-up are not the step

  def run(self, steps: int) -> tuple[list[float], list[float]]:
    """Runs `steps` steps, each timed alone. Returns (wall seconds, process CPU seconds) per step."""
    wall, cpu = [], []
    for _ in range(steps):
      t, c = time.perf_counter(), time.process_time()
      self.state, self.metrics = self.compiled(self.state, self.batch)
      jax.block_until_ready((self.state, self.metrics))
      wall.append(time.perf_counter() - t)
      cpu.append(time.process_time() - c)
    return wall, cpu


def run_step_bench(config: ml_collections.ConfigDict, steps: int, image_hw=None, devices=None) -> dict:
  """Times `steps` train steps after compilation and one warm-up step. Returns the JSON-able result.

  Args:
    config: a full config; the batch is config.train.global_batch_size split over the mesh's devices.
    steps: timed steps (>= 1); the median is reported.
    image_hw: input (height, width); default: the padded shape the training pipeline produces.
    devices: the mesh's devices (default: all).
  """
  if steps < 1:
    raise ValueError(f'steps={steps}: need at least one timed step')
  devices = list(devices) if devices is not None else None
  runner = StepRunner(config, image_hw, devices)
  wall, cpu = runner.run(steps)
  step_time = statistics.median(wall)
  n_dev = len(devices) if devices else jax.device_count()
  device = (devices or jax.devices())[0]
  batch_size = config.train.global_batch_size
  result = dict(
    step_time_s=step_time,
    step_time_min_s=min(wall),
    step_time_max_s=max(wall),
    step_cpu_s=statistics.median(cpu),
    compile_time_s=runner.compile_time_s,
    images_per_s=batch_size / step_time,
    images_per_s_per_device=batch_size / step_time / n_dev,
    peak_memory_mb=_peak_memory_mb(),
    xla_temp_mb=runner.xla_temp_mb,
    device=f'{n_dev}x {getattr(device, "device_kind", device.platform)}',
    global_batch_size=batch_size,
    image_hw=list(runner.image_hw),
    steps=steps,
    consistent=bool(config.consistent.enabled),
    compute_dtype=config.model.compute_dtype,
    step_tflops=runner.flops / 1e12,
    loss=float(runner.metrics['loss']),
  )
  peak = peak_tflops(device)
  if peak and runner.flops:  # global FLOPs over the whole mesh's peak (bf16 dense, whatever the compute dtype)
    result['mfu'] = runner.flops / step_time / (peak * 1e12 * n_dev)
  return result
