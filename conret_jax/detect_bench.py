"""Benchmark of inference (`conret-bench detect`): `conret_jax.detect` on synthetic images, and its two halves alone.

The batch is config.eval.global_batch_size images of the padded input size config.data produces, on the first
device. Three jitted programs are each timed N times after a warm-up call, blocking on the result, and the medians
reported: the forward (`model.apply`), post-processing alone (decoding the regressions, top-k per level, class-aware
NMS: everything `detect` does after the forward, on the forward's outputs) and `detect` end to end.

The weights are a fresh initialization, scored with config.eval.score_threshold set to 0: a freshly initialized
detector scores everything at its prior (0.01), which would leave post-processing nothing to sort or suppress at the
usual threshold. At 0 every anchor-class pair passes, every level's top-k is full and NMS gets the most candidates
it can: post-processing's worst case, for every detector family.
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import conret_jax
from conret_jax import detectors, inference
from conret_jax.data import sizes


def _timed(fn, args, steps: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def run_detect_bench(config, steps: int) -> dict:
  """Times detect and its halves (see the module docstring); returns the JSON-able result."""
  if steps < 1:
    raise ValueError(f'steps={steps}: need at least one timed call')
  hw = tuple(next(iter(sizes.padded_shapes(config.data).values())))
  batch = int(config.eval.global_batch_size)
  config = config.copy_and_resolve_references()
  config.eval.score_threshold = 0.0  # the worst case (module docstring)
  detector = detectors.from_config(config)
  model = detector.module
  variables = detectors.init_variables(model, jax.random.PRNGKey(0), hw)
  images = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (batch, *hw, 3)), jnp.float32)
  e = config.eval

  forward = jax.jit(lambda v, x: detector.module.apply(v, x, train=False))
  anchors = detector.anchors(hw)

  def post(outputs):
    logits, boxes = detector.decode(outputs, anchors)
    return inference.postprocess(detector, logits, boxes, hw, e)

  outputs = forward(variables, images)
  forward_s = _timed(forward, (variables, images), steps)
  postprocess_s = _timed(jax.jit(post), (outputs,), steps)
  total_s = _timed(lambda v, x: conret_jax.detect(model, v, x, config), (variables, images), steps)
  dets = conret_jax.detect(model, variables, images, config)
  device = jax.devices()[0]
  return dict(
    images_per_s=batch / total_s,
    total_s=total_s,
    forward_s=forward_s,
    postprocess_s=postprocess_s,
    postprocess_share_of_forward=postprocess_s / forward_s,
    batch=batch,
    image_hw=list(hw),
    steps=steps,
    num_classes=int(config.model.num_classes),
    detections_per_image=float(np.asarray(dets['valid']).sum(1).mean()),
    device=f'1x {getattr(device, "device_kind", device.platform)}',
    compute_dtype=config.model.compute_dtype,
  )
