"""Checkpoints with orbax: the train state, the data-iterator position, and a model fingerprint.

Layout: DIR/checkpoints/<step>/{state, data, meta}.
  state  the TrainState pytree (ocp StandardSave). It is restored INTO an abstract state whose leaves carry the
         target shardings, so a checkpoint written on one mesh/topology restores onto any other.
  data   the data-iterator position (json), so a resumed run continues the input stream where it stopped.
  meta   a model fingerprint (json): config.model and config.consistent (less the keys that only change inference
         or numerics) and the param tree's paths and shapes. A workdir holding another model is refused with an error
         that names the differences, instead of an opaque shape error from deep inside orbax.

Also `load_variables` / `merge_init` for config.init_from: variables written by `conret-import` (a
StandardCheckpointer directory holding {'params': ..., 'frozen': ...}) copied leaf by leaf into a fresh state.
"""

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from conret_jax import run_record
from conret_jax.errors import CheckpointMismatchError, CheckpointNotFoundError, WeightFileError
from conret_jax.fileio import absolute

_MAX_LISTED = 12


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def tree_shapes(tree) -> dict[str, list[int]]:
  """{'a/b/kernel': [3, 3, 8, 16], ...} for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
  return {_path_str(p): [int(d) for d in np.shape(x)] for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def model_fingerprint(config, params) -> dict:
  """What must match for a checkpoint to belong to this model: the model settings (run_record.model_settings,
  None for a reader without a config) and the param shapes, json-ready."""
  settings = None if config is None else run_record.model_settings(config)
  return {'config': settings, 'params': tree_shapes(params)}


def fingerprint_differences(stored: dict, current: dict) -> list[str]:
  """Human-readable differences between two fingerprints; empty if they match. Model settings newer than the
  checkpoint count as what the code that wrote it did (run_record.missing_key_values)."""
  diffs = []
  names = dict(old_name='checkpoint', new_name='this run')
  if stored.get('config') is not None and current.get('config') is not None:
    fill = run_record.missing_key_values()
    diffs += run_record.differences(stored['config'], current['config'], what='config', fill=fill, **names)
  if stored.get('params') is not None and current.get('params') is not None:
    diffs += run_record.differences(stored['params'], current['params'], what='param', **names)
  return diffs


class Checkpointer:
  """Periodic, optionally asynchronous checkpoints of (state, data position, fingerprint) under DIR/checkpoints.

  Args:
    workdir: the run's directory (local path or gs://).
    every_steps: `save` writes only at multiples of this (0: only when forced).
    keep: how many recent checkpoints to keep (0 or None: all).
    config: the run's config, for the model fingerprint (None: param shapes only).
    async_save: write in a background thread (`async` is a Python keyword, hence the name).
  """

  def __init__(self, workdir: str, *, every_steps: int, keep: int | None, config=None, async_save: bool = True):
    self.directory = os.path.join(absolute(workdir), 'checkpoints')
    self.every_steps = int(every_steps or 0)
    self._config = config
    self._fingerprint = None
    options = ocp.CheckpointManagerOptions(max_to_keep=keep or None, enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, item_names=('state', 'data', 'meta'), options=options)

  def _fingerprint_of(self, params) -> dict:
    if self._fingerprint is None:
      self._fingerprint = model_fingerprint(self._config, params)
    return self._fingerprint

  def should_save(self, step: int) -> bool:
    """True at multiples of every_steps (what `save` does without force)."""
    return bool(self.every_steps) and int(step) % self.every_steps == 0

  def save(self, step: int, state, data_state: dict | None = None, force: bool = False) -> bool:
    """Saves at multiples of every_steps, or whenever `force`. Returns whether a save started."""
    step = int(step)
    if not force and not self.should_save(step):
      return False
    if step in self._manager.all_steps():  # e.g. the final forced save right after a periodic one
      return False
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(dict(data_state or {})),
      meta=ocp.args.JsonSave(self._fingerprint_of(getattr(state, 'params', state))),
    )
    saved = self._manager.save(step, args=args, force=True)  # the interval decision is ours, made above
    if saved:
      logging.info('Saving checkpoint at step %d to %s', step, self.directory)
    return saved

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def reload(self) -> None:
    """Reads the checkpoint folder again (after a checkpoint was moved aside)."""
    self._manager.reload()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def restore(self, step: int | None, abstract_state) -> tuple[Any, dict]:
    """Restores (state, data_state) from `step` (None: the latest) into `abstract_state`'s shapes and shardings.

    Args:
      abstract_state: the state pytree with jax.ShapeDtypeStruct leaves carrying the target shardings, e.g.
        jax.eval_shape(create_train_state, ...) with shardings attached.
    Raises:
      FileNotFoundError if there is no checkpoint; ValueError if it holds a different model.
    """
    if step is None:
      step = self.latest_step()
    if step is None or step not in self._manager.all_steps():
      raise CheckpointNotFoundError(
        f'no checkpoint {"" if step is None else step} in {self.directory} (steps there: {self.all_steps()})'
      )
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    diffs = fingerprint_differences(meta, self._fingerprint_of(getattr(abstract_state, 'params', abstract_state)))
    if diffs:
      listed = '; '.join(diffs[:_MAX_LISTED])
      more = f'; and {len(diffs) - _MAX_LISTED} more' if len(diffs) > _MAX_LISTED else ''
      raise CheckpointMismatchError(
        f'workdir {os.path.dirname(self.directory)} holds a checkpoint of a different '
        f'model (step {step}): {listed}{more}'
      )
    restored = self._manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    )
    logging.info('Restored checkpoint at step %d from %s', step, self.directory)
    return restored.state, dict(restored.data or {})

  def reached_preemption(self, step: int) -> bool:
    """True when the cluster announced a preemption: save now (force=True) and stop."""
    return self._manager.reached_preemption(int(step))

  def wait(self) -> None:
    """Blocks until a background save has finished."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def load_variables(path: str) -> dict:
  """Loads a variables dict ({'params': ..., 'frozen': ...}) saved with ocp.StandardCheckpointer, as numpy.

  Leaves come back as host numpy arrays whatever sharding they were saved with; `merge_init` places them.
  Raises WeightFileError naming the path when it is missing or not such a checkpoint.
  """
  path = absolute(path)
  if '://' not in path and not os.path.isdir(path):
    raise WeightFileError(f'config.init_from={path} does not exist: write it with conret-import')
  checkpointer = ocp.StandardCheckpointer()
  try:
    metadata = checkpointer.metadata(path)
  except Exception as e:  # orbax raises assorted errors for a foreign folder
    raise WeightFileError(f'config.init_from={path} is not a checkpoint written by conret-import: {e}') from None
  tree = getattr(metadata, 'item_metadata', metadata)
  tree = getattr(tree, 'tree', tree)
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), tree)
  try:
    return checkpointer.restore(path, target)
  except Exception as e:  # damaged array files: orbax and tensorstore raise assorted errors
    first = (str(e).strip().splitlines() or [''])[0]
    raise WeightFileError(
      f'config.init_from={path} is damaged and does not restore ({type(e).__name__}: {first}); '
      'write it again with conret-import'
    ) from None


def match_leaves(target, loaded) -> dict[str, list[str]]:
  """Compares two trees by leaf path: {'copied', 'missing' (not in loaded), 'mismatched' (shape), 'unused'}."""
  want = tree_shapes(target)
  have = tree_shapes(loaded)
  return {
    'copied': [k for k in want if k in have and have[k] == want[k]],
    'missing': [k for k in want if k not in have],
    'mismatched': [k for k in want if k in have and have[k] != want[k]],
    'unused': [k for k in have if k not in want],
  }


def _place_like(value: np.ndarray, like):
  """`value` cast to `like`'s dtype and, for a jax.Array, laid out with its sharding (works multi-process)."""
  value = np.asarray(value, dtype=like.dtype)
  if isinstance(like, jax.Array):
    return jax.make_array_from_callback(value.shape, like.sharding, lambda index: value[index])
  return value


def merge_init(state_params, loaded_params):
  """Copies the leaves of `loaded_params` into `state_params` where path and shape agree.

  Leaves not found or of another shape keep their fresh initialization (e.g. a classifier for another number of
  classes). Logs the counts. Raises ValueError if nothing matched: the wrong file, or the wrong tree level.
  """
  report = match_leaves(state_params, loaded_params)
  if not report['copied']:
    raise WeightFileError(
      f'init_from: no parameter matched by path and shape (first wanted: '
      f'{list(tree_shapes(state_params))[:3]}, first found: {list(tree_shapes(loaded_params))[:3]})'
    )
  logging.info(
    'init_from: copied %d leaves, %d missing (kept fresh), %d shape-mismatched (kept fresh), %d unused',
    *(len(report[k]) for k in ('copied', 'missing', 'mismatched', 'unused')),
  )
  for key in report['mismatched'][:_MAX_LISTED]:
    logging.info('init_from: shape differs, kept fresh: %s', key)
  loaded = {_path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(loaded_params)}
  copied = set(report['copied'])

  def pick(path, leaf):
    key = _path_str(path)
    return _place_like(loaded[key], leaf) if key in copied else leaf

  return jax.tree_util.tree_map_with_path(pick, state_params)


def init_from(state, path: str, trainable=None):
  """`state` with its params (and frozen / batch_stats collections) overwritten from the variables at `path`.

  Args:
    state: a TrainState (params, batch_stats, frozen = {collection: tree}) with its final shardings.
    path: a variables checkpoint written by `conret-import` ({'params': ..., 'frozen': ..., ...}).
    trainable: optional pytree of bools like params (Detector.trainable_mask; all False for inference).
      Parameters it marks False, and every leaf of the non-trained collections (frozen BN statistics), never
      change: if the file lacks any of them, WeightFileError instead of a silently random frozen layer.
  Collections that the state and the file share are merged leaf by leaf (`merge_init`); the others are logged.
  """
  loaded = load_variables(path)
  logging.info('init_from %s: collections %s', path, sorted(loaded))
  if 'params' not in loaded:
    raise WeightFileError(f'init_from {path}: no "params" collection (found {sorted(loaded)})')
  fixed = []  # frozen leaves the file does not provide
  if trainable is not None:
    frozen_params = jax.tree.map(lambda keep, p: None if keep else p, trainable, state.params)
    report = match_leaves(frozen_params, loaded['params'])
    fixed += report['missing'] + report['mismatched']
    for name in state.frozen:
      report = match_leaves(state.frozen[name], loaded.get(name, {}))
      fixed += [f'{name}/{k}' for k in report['missing'] + report['mismatched']]
  if fixed:
    raise WeightFileError(
      f'config.init_from={path} lacks {len(fixed)} frozen leaves, which would stay at their '
      f'random initial values (e.g. {fixed[:3]}): weights of another network or layout?'
    )
  params = merge_init(state.params, loaded['params'])
  batch_stats = state.batch_stats
  if batch_stats and 'batch_stats' in loaded:
    batch_stats = merge_init(batch_stats, loaded['batch_stats'])
  frozen = dict(state.frozen)
  for name in frozen:
    if name in loaded:
      frozen[name] = merge_init(frozen[name], loaded[name])
  unused = sorted(set(loaded) - {'params', 'batch_stats'} - set(frozen))
  if unused:
    logging.warning('init_from %s: collections not in this model, ignored: %s', path, unused)
  return state.replace(params=params, batch_stats=batch_stats, frozen=frozen)
