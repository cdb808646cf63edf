"""Restoring a run: the newest checkpoint that restores (a damaged one is named and skipped, never deleted), and the
variables of a workdir or of config.init_from for inference.

A checkpoint can be damaged after it was written (a failing disk, a partial copy between buckets). Resuming then
takes the newest one that restores and says in one line which it skipped and why; the trainer moves the damaged
folder aside (`<step>.damaged`, or `.damaged.2` ... when that name is taken; data kept) so that the step can be
written again. Read-only tools leave it alone, and asked for a damaged step (`--step=N`) they stop with one line.
"""

import os

import jax
from absl import logging

from conret_jax import detectors, fileio
from conret_jax import mesh as mesh_lib
from conret_jax.errors import CheckpointDamagedError, CheckpointNotFoundError, UserError, WeightFileError
from conret_jax.train import checkpoint as ckpt_lib
from conret_jax.train import state as state_lib


def _why(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0] if text else ""}'.strip()


def restore_step(checkpointer: ckpt_lib.Checkpointer, step: int, abstract):
  """(state, data position) of checkpoint `step`; CheckpointDamagedError if its files do not restore. A checkpoint
  of another model (CheckpointMismatchError) is a user error, not damage, and propagates as it is."""
  try:
    return checkpointer.restore(step, abstract)
  except UserError:
    raise
  except Exception as e:  # orbax, tensorstore and json raise anything for damaged files
    raise CheckpointDamagedError(
      f'checkpoint {step} in {checkpointer.directory} is damaged and does not restore ({_why(e)})'
    ) from e


def restore_newest(checkpointer: ckpt_lib.Checkpointer, abstract, *, move_damaged: bool):
  """(state, data position, step) of the newest checkpoint that restores, or None if there is no checkpoint.

  Damaged ones are skipped, each with one warning line; with move_damaged (the trainer) they are renamed to
  <step>.damaged so the run can write that step again. CheckpointDamagedError if none restores."""
  steps = sorted(checkpointer.all_steps(), reverse=True)
  skipped = []
  for step in steps:
    try:
      state, data = restore_step(checkpointer, step, abstract)
    except CheckpointDamagedError as e:
      skipped.append(step)
      logging.warning('%s: skipped, trying an older checkpoint', e)
      continue
    if skipped:
      logging.warning('resumed from checkpoint %d; damaged checkpoints skipped: %s', step, skipped)
      if move_damaged:
        _move_aside(checkpointer, skipped)
    return state, data, step
  if skipped:
    raise CheckpointDamagedError(
      f'no checkpoint in {checkpointer.directory} restores: {skipped} are all damaged (see the log for why)'
    )
  return None


def _move_aside(checkpointer: ckpt_lib.Checkpointer, steps) -> None:
  """Process 0 renames each damaged step's folder to <step>.damaged; then every process reads the folder again, so
  all of them agree that those steps can be written anew (a save is collective)."""
  if jax.process_index() == 0:
    for step in steps:
      source = os.path.join(checkpointer.directory, str(step))
      # A step damaged before keeps its first copy: <step>.damaged, then .damaged.2, ... (a name in use would make
      # the move fail and leave the step unwritable).
      target, n = f'{source}.damaged', 1
      while fileio.exists(target):
        n += 1
        target = f'{source}.damaged.{n}'
      try:
        fileio.rename(source, target)
        logging.warning('moved the damaged checkpoint %d to %s (kept: delete it when done with it)', step, target)
      except Exception as e:  # os and gfile errors alike (a bucket cannot rename a folder in one step)
        logging.warning(
          'could not move the damaged checkpoint %s aside (%s); it stays where it is, and step %d is not written '
          'again until it is moved or deleted',
          source,
          e,
          step,
        )
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices('conret_jax: damaged checkpoints moved aside')
  checkpointer.reload()


def restore_for_inference(config, workdir: str, step: int | None = None, devices=None):
  """The model and its variables from WORKDIR/checkpoints (step, or the newest that restores), else from
  config.init_from. Creates nothing in the workdir.

  Args:
    devices: the mesh's devices (default: all devices of all processes).
  Returns:
    (model, variables, step, mesh); step is 0 for variables from config.init_from.
  """
  model = detectors.build_model(config)
  mesh = mesh_lib.make_mesh(config, devices)
  if has_checkpoint(workdir, step):  # only then: a Checkpointer creates its directory
    checkpointer = ckpt_lib.Checkpointer(workdir, every_steps=0, keep=None, config=config, async_save=False)
    abstract = state_lib.abstract_state(model, config, mesh)
    try:
      if step is None:
        state, _, step = restore_newest(checkpointer, abstract, move_damaged=False)
      else:
        if int(step) not in checkpointer.all_steps():
          raise CheckpointNotFoundError(
            f'no checkpoint {step} in {checkpointer.directory} (steps there: {checkpointer.all_steps()})'
          )
        state, _ = restore_step(checkpointer, int(step), abstract)
    finally:
      checkpointer.close()
    return model, state.variables(), int(step), mesh
  check_weights_available(config, workdir, step)
  logging.info('no checkpoint in %s: using the weights of config.init_from=%s', workdir, config.init_from)
  fresh, _ = state_lib.init_state(model, config, mesh, jax.random.PRNGKey(0))
  # Inference needs every weight from the file: nothing may stay at its random initial value.
  every_leaf = jax.tree.map(lambda _: False, fresh.params)
  return model, ckpt_lib.init_from(fresh, config.init_from, every_leaf).variables(), 0, mesh


def checkpoint_directory(workdir: str) -> str:
  return os.path.join(fileio.absolute(workdir), 'checkpoints')


def has_checkpoint(workdir: str, step: int | None) -> bool:
  """Whether WORKDIR/checkpoints holds a checkpoint (step None) or has any to look for `step` in; creates nothing.
  Remote workdirs are assumed to (the checkpointer finds out)."""
  directory = checkpoint_directory(workdir)
  if fileio.is_remote(directory):
    return True
  return os.path.isdir(directory) and any(e.isdigit() for e in os.listdir(directory))


def latest_step_on_disk(workdir: str) -> int | None:
  """The newest step folder in WORKDIR/checkpoints, read from the listing (no orbax, no devices), or None."""
  directory = checkpoint_directory(workdir)
  if not fileio.exists(directory):
    return None
  steps = [int(e.rstrip('/')) for e in fileio.listdir(directory) if e.rstrip('/').isdigit()]
  return max(steps) if steps else None


def check_weights_available(config, workdir: str, step: int | None) -> None:
  """In seconds, before anything heavy: CheckpointNotFoundError unless the workdir has a checkpoint to restore or
  config.init_from names weights (WeightFileError if that folder does not exist). Nothing to say without a config
  or a workdir: `startup.setup` reports those."""
  if config is None or not workdir or has_checkpoint(workdir, step):
    return
  directory = checkpoint_directory(workdir)
  if step is not None:
    raise CheckpointNotFoundError(f'no checkpoint {step} in {directory}: it holds none')
  if not config.init_from:
    raise CheckpointNotFoundError(
      f'no checkpoint in {directory} and config.init_from is empty: train first (conret-train) or point '
      '--config.init_from at imported weights'
    )
  if not fileio.is_remote(config.init_from) and not os.path.isdir(config.init_from):
    raise WeightFileError(f'config.init_from={config.init_from} does not exist: write it with conret-import')
