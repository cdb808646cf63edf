"""The trainer: mesh -> data -> model and state -> jitted step -> loop with logging, checkpoints and evaluation.

Resumption is exact: the state (parameters, optimizer, step, RNG) comes back from the latest checkpoint in
`workdir/checkpoints`, and the input pipeline's position is a pure function of the step and the seed, so the
resumed run sees the same batches with the same augmentation as an uninterrupted one. SIGTERM (and, on Cloud TPU,
a preemption notice) makes the loop save at the next step boundary and exit cleanly; with several processes, all
of them stop at the same boundary even when only one got the signal (`_StopAgreement`). The run records its config and
classes in the workdir (conret_jax/run_record.py). The checkpointer, the metric writers and the signal handlers
are closed by one ExitStack whatever ends the run (the last step, a signal, divergence or an error).
"""

import contextlib
import dataclasses
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from conret_jax import config_checks, detectors, eval_files, evaluation, fileio, run_record
from conret_jax import mesh as mesh_lib
from conret_jax.data import info as info_lib
from conret_jax.data import pipeline as data_lib
from conret_jax.data import sources
from conret_jax.train import checkpoint as ckpt_lib
from conret_jax.train import restore as restore_lib
from conret_jax.train import state as state_lib
from conret_jax.train import step as step_lib
from conret_jax.train.metrics_writer import MetricsWriter


class NonFiniteLossError(RuntimeError):
  """The loss or the gradient became NaN/inf (more often in a row than config.train.skip_nonfinite_steps allows);
  the state keeps the last finite update."""


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
    logging.warning(
      'received %s: saving a checkpoint at the next step boundary, then exiting', signal.Signals(signum).name
    )
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class _StopAgreement:
  """Whether to stop at this step boundary, the same answer on every process.

  A signal reaches the processes of a job separately: one host may be preempted alone, or the others may see the
  signal a step later. A process that stopped on its own would leave the others waiting in the next step's
  collectives (and the checkpoint save is collective too): the job would hang until it is killed. So with several
  processes each boundary combines the local flags by a max over every device, a collective queued behind the step,
  and reads the result one boundary later, when the host waits for the previous step anyway (the finite check):
  every process reads the same value at the same boundary and all stop there. One process stops at once.
  """

  def __init__(self, stop: _StopFlag, mesh):
    self.stop = stop
    self.pending = None
    if jax.process_count() > 1:
      flat = jax.sharding.Mesh(mesh.devices.reshape(-1), ('all',))
      self.sharding = jax.sharding.NamedSharding(flat, jax.sharding.PartitionSpec('all'))
      self.local = sum(d.process_index == jax.process_index() for d in flat.devices)
      self.combine = jax.jit(jnp.max, out_shardings=jax.sharding.NamedSharding(flat, jax.sharding.PartitionSpec()))

  def poll(self) -> bool:
    """Call once per step boundary on every process; True: stop here."""
    if jax.process_count() == 1:
      return self.stop.signal is not None
    agreed = self.pending is not None and bool(np.asarray(self.pending.addressable_data(0)))
    local = np.full((self.local,), self.stop.signal is not None, np.int32)
    self.pending = self.combine(jax.make_array_from_process_local_data(self.sharding, local))
    return agreed


def _host_metrics(metrics) -> dict:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


class FiniteGuard:
  """Watches every step's `finite` flag. The step already dropped a non-finite update on device; this allows
  `max_skips` such steps in a row, each logged with its step and terms, and raises NonFiniteLossError beyond that
  (max_skips=0, the default: at the first one)."""

  def __init__(self, max_skips: int):
    self.max_skips = int(max_skips)
    self.in_a_row = 0
    self.skipped = []

  def check(self, step: int, metrics) -> None:
    """`metrics` of `step` (device arrays or host floats); fetches only the flag unless something went wrong."""
    if float(metrics['finite']) > 0:
      self.in_a_row = 0
      return
    host = _host_metrics(metrics)
    bad = sorted(k for k, v in host.items() if not np.isfinite(v)) or ['gradient']
    self.in_a_row += 1
    if self.in_a_row > self.max_skips:
      allowed = (
        f' ({self.in_a_row} in a row; config.train.skip_nonfinite_steps={self.max_skips})' if self.max_skips else ''
      )
      raise NonFiniteLossError(
        f'non-finite training values at step {step}: {", ".join(bad)} (loss={host["loss"]}, '
        f'grad_norm={host["grad_norm"]}){allowed}. The update of that step was dropped and no checkpoint was '
        f'written after it; the last good checkpoint stays in the workdir.'
      )
    self.skipped.append(step)
    logging.warning(
      'step %d: non-finite %s (loss=%s, grad_norm=%s): update skipped, %d of %d allowed in a row',
      step,
      ', '.join(bad),
      host['loss'],
      host['grad_norm'],
      self.in_a_row,
      self.max_skips,
    )


def _initial_state(detector, config, mesh, abstract, checkpointer):
  """(state, start step): the newest checkpoint that restores (a damaged one is named, moved aside and skipped),
  restored straight into its shardings (a resumed run never builds or compiles a fresh state, and a checkpoint of
  another model is refused before anything compiles); else a fresh state, with config.init_from's weights."""
  restored = restore_lib.restore_newest(checkpointer, abstract, move_damaged=True)
  if restored is not None:
    state, _, step = restored
    logging.info('resumed from %s at step %d', checkpointer.directory, step)
    return state, int(step)
  if config.init_from:  # a missing or foreign file fails here, before the initialization compiles
    ckpt_lib.load_variables(config.init_from)
  state, _ = state_lib.init_state(
    detector.module, config, mesh, jax.random.PRNGKey(config.train.seed), shardings=state_lib.shardings_of(abstract)
  )
  if config.init_from:
    state = ckpt_lib.init_from(state, config.init_from, detector.trainable_mask(state.params))
  return state, 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None, config_changes=None) -> dict:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint), evaluates, returns the last eval metrics.
  `devices`: the mesh's devices (default: all devices of all processes); `config_changes`: the accepted changes of
  a resumed run (run_record.resume_changes), recorded in run.json."""
  config_checks.validate_training(config)
  main = jax.process_index() == 0
  mesh = mesh_lib.make_mesh(config, devices)
  cache = sources.SourceCache()  # each dataset is opened once for the run: training and every evaluation
  train_info = data_lib.dataset_info(config.data.train, config, train=True, cache=cache)
  layout = info_lib.ClassLayout.of(train_info, config)
  layout.check()
  logging.info(
    'mesh %s over %d devices (%d processes); train set: %d images, %d classes',
    dict(mesh.shape),
    mesh.devices.size,
    jax.process_count(),
    train_info.num_examples,
    train_info.num_classes,
  )
  detector = detectors.from_config(config)
  abstract = state_lib.abstract_state(detector.module, config, mesh)
  with contextlib.ExitStack() as resources:
    checkpointer = resources.enter_context(
      contextlib.closing(
        ckpt_lib.Checkpointer(
          workdir, every_steps=config.checkpoint.every_steps, keep=config.checkpoint.keep, config=config
        )
      )
    )
    state, start_step = _initial_state(detector, config, mesh, abstract, checkpointer)
    if main:
      run_record.save(
        workdir,
        config,
        layout,
        step=start_step,
        processes=jax.process_count(),
        devices=jax.device_count(),
        config_changes=config_changes,
      )
    writer = resources.enter_context(
      contextlib.closing(MetricsWriter(workdir, start_step=start_step, num_steps=config.train.num_steps, enabled=main))
    )
    run = _Run(
      config, detector, mesh, workdir, layout, checkpointer, writer, resources.enter_context(_StopFlag()), cache
    )
    return _train(run, state, start_step)


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the loop works with besides the state: the config, the detector, the mesh, where the run lives, its
  classes (for evaluation), and the resources the ExitStack of `train_and_evaluate` closes."""

  config: ml_collections.ConfigDict
  detector: detectors.Detector
  mesh: object
  workdir: str
  classes: info_lib.ClassLayout
  checkpointer: ckpt_lib.Checkpointer
  writer: MetricsWriter
  stop: _StopFlag
  cache: sources.SourceCache

  def evaluate(self, state, step: int) -> dict:
    metrics = evaluation.evaluate(
      self.detector.module,
      state.variables(),
      self.config,
      self.mesh,
      classes=self.classes,
      record=eval_files.record_for(self.workdir, step, self.config, self.config),
      data=evaluation.EvalData(cache=self.cache),
    )
    self.writer.write_eval(step, metrics)
    self.writer.reset_clock(step)
    return metrics


def _eval_missing(run: _Run, step: int, eval_every: int, num_steps: int) -> bool:
  """Whether `step` (a resumed run's first) was due a periodic evaluation that left no metrics.json."""
  due = step > 0 and eval_every and step % eval_every == 0 and step != num_steps
  if not due:
    return False
  missing = not fileio.exists(os.path.join(eval_files.Record(run.workdir, step).directory, 'metrics.json'))
  if jax.process_count() > 1:  # process 0 wrote it; all must agree, as the evaluation is collective
    from jax.experimental import multihost_utils

    missing = bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))
  return missing


def _train(run: _Run, state, start_step: int) -> dict:
  """The loop itself: steps, logs, checks, checkpoints and evaluations, until num_steps or a stop signal."""
  config, mesh, checkpointer, writer = run.config, run.mesh, run.checkpointer, run.writer
  train_step = step_lib.make_train_step(run.detector.module, config, mesh, state_lib.shardings_of(state))
  batches = data_lib.make_train_iterator(
    config, mesh, mesh_lib.batch_sharding(mesh), start_step=start_step, cache=run.cache
  )
  guard = FiniteGuard(config.train.skip_nonfinite_steps)
  num_steps, eval_every = int(config.train.num_steps), int(config.eval.every_steps)
  log_every = max(int(config.train.log_every_steps), 1)
  eval_metrics = {}
  if _eval_missing(run, start_step, eval_every, num_steps):
    # The run stopped at an evaluation step before that evaluation finished (a preemption, a crash during it): the
    # checkpoint of that step was saved first, so its evaluation is done now, before training goes on.
    logging.warning(
      'step %d: the evaluation of this step was not written before the run stopped; evaluating now', start_step
    )
    eval_metrics = run.evaluate(state, start_step)
  stop = _StopAgreement(run.stop, mesh)
  step, lagged = start_step, None  # (step, device metrics) checked one step late: the host never stalls the device
  t_compile = time.monotonic()
  while step < num_steps:
    state, metrics = train_step(state, next(batches))
    if lagged is not None:
      guard.check(*lagged)
    step += 1
    lagged = (step, metrics)
    if step == start_step + 1:
      logging.info('first step (compilation included) took %.1f s', time.monotonic() - t_compile)
      writer.reset_clock(step)
    if step % log_every == 0 or step == num_steps:
      host = _host_metrics(metrics)
      guard.check(step, host)
      writer.write(step, host, images_per_step=config.train.global_batch_size)
      lagged = None
    preempted = stop.poll() or checkpointer.reached_preemption(step)
    if checkpointer.should_save(step) or preempted or step == num_steps:
      if lagged is not None:
        guard.check(*lagged)
        lagged = None
      # The data item records the pipeline's position (derived from the step; kept for inspection).
      checkpointer.save(step, state, batches.state(), force=preempted or step == num_steps)
    if preempted:
      cause = 'signal' if run.stop.signal is not None else 'preemption notice or a signal to another process'
      logging.warning('stopped at step %d after a %s; rerun the same command to resume', step, cause)
      return {}
    if eval_every and step % eval_every == 0 and step != num_steps:
      eval_metrics = run.evaluate(state, step)
  checkpointer.wait()
  if guard.skipped:
    logging.warning('%d non-finite steps were skipped: %s', len(guard.skipped), guard.skipped[:20])
  if config.eval.at_end:
    eval_metrics = run.evaluate(state, step)
  return eval_metrics
