"""The trainer: mesh -> data -> model and state -> jitted step -> loop with logging, checkpoints and evaluation.

Resumption is exact: the state (parameters, optimizer, step, RNG) comes back from the latest checkpoint in
`workdir/checkpoints`, and the input pipeline's position is a pure function of the step and the seed, so the
resumed run sees the same batches with the same augmentation as an uninterrupted one. SIGTERM (and, on Cloud TPU,
a preemption notice) makes the loop save at the next step boundary and exit cleanly.
"""

import signal
import time

import jax
import ml_collections
import numpy as np
from absl import logging

import conret_jax
from conret_jax import config_checks, evaluation
from conret_jax.data import info as info_lib
from conret_jax.data import pipeline as data_lib
from conret_jax.train import checkpoint as ckpt_lib
from conret_jax.train import mesh as mesh_lib
from conret_jax.train import step as step_lib
from conret_jax.train.metrics_writer import MetricsWriter


class NonFiniteLossError(RuntimeError):
  """The loss or the gradient became NaN/inf; the state keeps the last finite update."""


class _StopFlag:
  """Set by SIGTERM/SIGINT; the loop checks it between steps so a save never races a step."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. called from a test thread): no handler
        pass
    return self

  def _handle(self, signum, frame):
    logging.warning('received %s: saving a checkpoint at the next step boundary, then exiting',
                    signal.Signals(signum).name)
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _check_finite(step: int, metrics: dict) -> None:
  if metrics['finite'] > 0:
    return
  bad = sorted(k for k, v in metrics.items() if not np.isfinite(v))
  raise NonFiniteLossError(
      f'non-finite training values at step {step}: {", ".join(bad) or "gradient"} '
      f'(loss={metrics["loss"]}, grad_norm={metrics["grad_norm"]}). The update of that step was dropped and no '
      f'checkpoint was written after it; the last good checkpoint stays in the workdir.')


def _check_finite_lagged(step: int, metrics) -> None:
  """Fetches only the finite flag; the full metrics only when something went wrong."""
  if float(metrics['finite']) == 0:
    _check_finite(step, _host_metrics(metrics))


def _host_metrics(metrics) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint), evaluates, returns the last eval metrics."""
  config_checks.validate_training(config)
  main = jax.process_index() == 0
  mesh = mesh_lib.make_mesh(config)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  train_info = data_lib.dataset_info(config.data.train, config)
  info_lib.check_num_classes(train_info, config)
  logging.info('mesh %s over %d devices (%d processes); train set: %d images, %d classes',
               dict(mesh.shape), jax.device_count(), jax.process_count(), train_info.num_examples,
               train_info.num_classes)

  model = conret_jax.build_model(config)
  abstract = step_lib.abstract_state(model, config, mesh)
  shardings = step_lib.shardings_of(abstract)
  checkpointer = ckpt_lib.Checkpointer(workdir, every_steps=config.checkpoint.every_steps,
                                       keep=config.checkpoint.keep, config=config)
  latest = checkpointer.latest_step()
  if latest is not None:
    # Straight into the target shardings: a resumed run never builds (or compiles) a fresh state, and a
    # checkpoint of another model is refused here, before anything compiles.
    state, _ = checkpointer.restore(latest, abstract)
    start_step = int(latest)
    logging.info('resumed from %s at step %d', checkpointer.directory, start_step)
  else:
    state, _ = step_lib.init_state(model, config, mesh, jax.random.PRNGKey(config.train.seed), shardings=shardings)
    start_step = 0
    if config.init_from:
      state = ckpt_lib.init_from(state, config.init_from)

  train_step = step_lib.make_train_step(model, config, mesh, shardings)
  batches = data_lib.make_train_iterator(config, mesh, batch_sharding, start_step=start_step)
  writer = MetricsWriter(workdir, start_step=start_step, num_steps=config.train.num_steps, enabled=main)
  images_per_step = config.train.global_batch_size
  num_steps = int(config.train.num_steps)
  eval_every = int(config.eval.every_steps)
  log_every = max(int(config.train.log_every_steps), 1)
  eval_metrics = {}

  def run_eval(step):
    nonlocal eval_metrics
    eval_metrics = evaluation.evaluate(model, state.variables(), config, mesh, workdir=workdir, step=step)
    writer.write_eval(step, eval_metrics)
    writer.reset_clock(step)

  step = start_step
  lagged = None  # (step, device metrics) checked one step late, so the host never stalls the device
  t_compile = time.monotonic()
  with _StopFlag() as stop:
    while step < num_steps:
      batch = next(batches)
      state, metrics = train_step(state, batch)
      if lagged is not None:
        _check_finite_lagged(*lagged)
      step += 1
      lagged = (step, metrics)
      if step == start_step + 1:
        logging.info('first step (compilation included) took %.1f s', time.monotonic() - t_compile)
        writer.reset_clock(step)
      if step % log_every == 0 or step == num_steps:
        host = _host_metrics(metrics)
        _check_finite(step, host)
        writer.write(step, host, images_per_step=images_per_step)
        lagged = None
      preempted = stop.signal is not None or checkpointer.reached_preemption(step)
      if checkpointer.should_save(step) or preempted or step == num_steps:
        if lagged is not None:
          _check_finite_lagged(*lagged)
          lagged = None
        # The data item records the pipeline's position (derived from the step; kept for inspection).
        checkpointer.save(step, state, batches.state(), force=preempted or step == num_steps)
      if preempted:
        checkpointer.wait()
        logging.warning('stopped at step %d after a %s; rerun the same command to resume', step,
                        'signal' if stop.signal is not None else 'preemption notice')
        writer.close()
        checkpointer.close()
        return {}
      if eval_every and step % eval_every == 0 and step != num_steps:
        run_eval(step)
  checkpointer.wait()
  if config.eval.at_end:
    run_eval(step)
  writer.close()
  checkpointer.close()
  return eval_metrics
