"""What a run records about itself in its workdir, so later tools need no --config: W/config.json and W/run.json.

  config.json  the resolved config `conret-train` runs with, every key (rewritten at each start)
  run.json     {"classes": {"layout", "num_classes", "category_ids", "names"}: the training set's categories, so
               predictions and evaluations are named as in training without opening any dataset,
                "starts": [{"argv", "time", "step", "processes", "devices", "version", "config_changes"}, ...]: every
               command that started or resumed the run, and the changes of training settings it accepted}
Also the model settings a workdir's checkpoints depend on (`model_settings`), shared by the checkpoint fingerprint
and the check that a given --config still describes the saved model, and the check of a resumed run's config
(`resume_changes`): a change that alters training is refused unless accepted, and recorded when it is.
"""

import datetime
import json
import os
import sys

import ml_collections

from conret_jax import defaults, fileio
from conret_jax.errors import CheckpointMismatchError, ConfigError

CONFIG_FILE = 'config.json'
RUN_FILE = 'run.json'
# Keys that may differ between the run that wrote a checkpoint and a later reader: they change numerics or inference
# only (Table 3's "2*" evaluates a 2-regression model with one regression step).
RUNTIME_KEYS = (
  'model.compute_dtype',
  'model.matmul_precision',
  'model.conv_lowering',
  'consistent.inference_reg_steps',
)


# Keys whose meaning in a record written before they existed is not their default: the value that earlier code
# behaved as. load_config and the checkpoint fingerprint read a missing key as this.
LEGACY_VALUES = {'model.pad_pixels': 'black'}


def _flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _json_ready(obj):
  """Tuples to lists, recursively (what json does), so stored and fresh settings compare equal."""
  if isinstance(obj, dict):
    return {str(k): _json_ready(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_ready(v) for v in obj]
  return obj


def model_settings(config) -> dict:
  """{'model.fpn.channels': 256, ...}: what must match for a checkpoint to belong to this config's model."""
  settings = _flatten({'model': config.model.to_dict(), 'consistent': config.consistent.to_dict()})
  return _json_ready({k: v for k, v in settings.items() if k not in RUNTIME_KEYS})


def missing_key_values() -> dict:
  """{dotted key: value} that a key missing from an older record stands for: LEGACY_VALUES, else its default."""
  return _json_ready(dict(_flatten(defaults.base_config().to_dict()), **LEGACY_VALUES))


def differences(old: dict, new: dict, *, what='config', old_name='saved run', new_name='given config', fill=None):
  """Readable differences between two flat {key: value} records (old first); empty if they match.

  `fill`: values for keys missing from `old` because it was written before they existed (`missing_key_values()`):
  such a key differs only if `new` holds another value. Without it, a key on one side only is a difference."""
  diffs = []
  for key in sorted(set(old) | set(new)):
    if key not in new:
      diffs.append(f'{what} {key} only in the {old_name} ({old[key]})')
      continue
    if key in old:
      value = old[key]
    elif fill is not None and key in fill:
      value = fill[key]
    else:
      diffs.append(f'{what} {key} only in the {new_name} ({new[key]})')
      continue
    if value != new[key]:
      diffs.append(f'{what} {key}: {old_name} {value} vs {new_name} {new[key]}')
  return diffs


def listed(diffs: list, most: int = 8) -> str:
  return '; '.join(diffs[:most]) + (f'; and {len(diffs) - most} more' if len(diffs) > most else '')


def has_record(workdir: str) -> bool:
  """Whether `workdir` holds a config written by conret-train."""
  return fileio.exists(os.path.join(workdir, CONFIG_FILE))


def save(
  workdir: str, config, layout, *, step: int, processes: int, devices: int, argv=None, config_changes=None
) -> None:
  """Writes W/config.json and adds this start to W/run.json (call on one process). `layout`: the run's
  data.info.ClassLayout; `config_changes`: {key: [old, new]} accepted at this start (`resume_changes`).

  run.json is read before anything is written (a damaged one stops the start with one line and changes nothing),
  and each file is replaced whole (fileio.write_text): a run killed while writing keeps its previous record."""
  run = load_run(workdir) or {'starts': []}
  if not isinstance(run, dict) or not isinstance(run.get('starts', []), list):
    raise ConfigError(f'{os.path.join(workdir, RUN_FILE)} is damaged: it holds no run record; restore it')
  fileio.write_text(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=1, sort_keys=True) + '\n')
  from conret_jax import __version__

  run['classes'] = {
    'layout': layout.kind,
    'num_classes': layout.num_classes,
    'category_ids': list(layout.category_ids),
    'names': list(layout.names),
  }
  run.setdefault('starts', []).append(
    {
      'argv': list(sys.argv if argv is None else argv),
      'step': int(step),
      'processes': int(processes),
      'devices': int(devices),
      'version': __version__,
      'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    }
    | ({'config_changes': dict(config_changes)} if config_changes else {})
  )
  fileio.write_text(os.path.join(workdir, RUN_FILE), json.dumps(run, indent=1))


def _typed_like(default, value):
  """A saved json value in the type of the schema's default (json has no tuples; ints may stand for floats)."""
  if isinstance(default, tuple):
    return tuple(_typed_like(default[0] if default else None, v) if isinstance(v, list) else v for v in value)
  if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  return value


def _json_type(value) -> str:
  """The json name of a parsed value's type, for messages about a damaged record."""
  if value is None:
    return 'null'
  if isinstance(value, bool):
    return 'boolean'
  names = {dict: 'object', list: 'list', str: 'string', int: 'number', float: 'number'}
  return names.get(type(value), type(value).__name__)


def _update(node: ml_collections.ConfigDict, saved: dict, path: str, source: str) -> None:
  """Sets `node`'s keys from the json tree `saved`; a value that does not fit the schema names `source` as damaged."""
  for key, value in saved.items():
    name = f'config.{path}{key}'
    if key not in node:
      raise ConfigError(f'{source} has {name}, which this version of conret_jax does not know')
    if isinstance(node[key], ml_collections.ConfigDict):
      if not isinstance(value, dict):
        raise ConfigError(
          f'{source} is damaged: {name} is a json {_json_type(value)}, not a section; restore it, or pass --config'
        )
      _update(node[key], value, f'{path}{key}.', source)
      continue
    try:
      node[key] = _typed_like(node[key], value)
    except (TypeError, ValueError):  # ml_collections refuses another type; a tuple key given a number
      kind = type(node[key]).__name__
      raise ConfigError(
        f'{source} is damaged: {name}={value!r} does not fit its type ({kind}); restore it, or pass --config'
      ) from None


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config W/config.json recorded, as a full ConfigDict typed by the schema (keys added to the schema since
  keep their defaults)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not fileio.exists(path):
    raise ConfigError(
      f'no --config given and {path} does not exist: pass --config, or a --workdir that conret-train wrote'
    )
  saved = _read_json(path)
  if not isinstance(saved, dict):
    raise ConfigError(
      f'{path} is damaged: it holds a json {_json_type(saved)}, not a config; restore it, or pass --config'
    )
  config = defaults.base_config()
  for key, value in LEGACY_VALUES.items():  # keys newer than the record: what the run that wrote it did
    if not _has_key(saved, key):
      node = config
      *sections, name = key.split('.')
      for section in sections:
        node = node[section]
      node[name] = value
  _update(config, saved, '', path)
  return config


def _has_key(tree: dict, dotted: str) -> bool:
  for part in dotted.split('.'):
    if not isinstance(tree, dict) or part not in tree:
      return False
    tree = tree[part]
  return True


def _read_json(path: str, remedy: str = 'restore it, or pass --config'):
  try:
    with fileio.open_file(path) as f:
      text = f.read()
    if not text.strip():  # json's own message for this would be 'Expecting value: line 1 column 1'
      raise ConfigError(f'{path} is damaged: it is empty; {remedy}')
    return json.loads(text)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f'{path} is damaged and cannot be read ({e}): {remedy}') from None


def load_run(workdir: str) -> dict | None:
  """W/run.json as a dict, or None if the workdir has none."""
  path = os.path.join(workdir, RUN_FILE)
  if not fileio.exists(path):
    return None
  return _read_json(path, 'restore it (it holds the classes and the starts of the run)')


def check_config_matches(workdir: str, config, *, config_given: bool = True) -> None:
  """CheckpointMismatchError when the config describes another model than the run saved in `workdir`.
  `config_given`: the user passed --config (else the differences come from --config.* overrides of the saved one)."""
  if not has_record(workdir):
    return
  diffs = differences(model_settings(load_config(workdir)), model_settings(config), fill=missing_key_values())
  if diffs:
    what = '--config describes' if config_given else 'the --config.* overrides describe'
    hint = f" Leave out --config to use the run's own {CONFIG_FILE}." if config_given else ''
    raise CheckpointMismatchError(
      f'{what} a different model than the one trained in {workdir} ({listed(diffs)}).{hint}'
    )


# Keys a resumed run may change freely: they do not alter what is trained (inference-only settings, the
# convolutions' lowering, which changes only the summation order, evaluation, logging and checkpoint cadence, input
# prefetching, the weights a fresh start would load). compute_dtype and matmul_precision change the training
# arithmetic itself, so like every other key they are refused unless accepted, and then recorded.
FREE_ON_RESUME = (
  'model.conv_lowering',
  'consistent.inference_reg_steps',
  'init_from',
  'checkpoint.',
  'eval.',
  'data.eval.',
  'data.prefetch',
  'data.num_parallel_calls',
  'train.log_every_steps',
  'train.skip_nonfinite_steps',
)
_SCHEDULE_KEYS = ('train.num_steps', 'train.warmup_steps', 'train.warmup_fraction', 'train.decay_steps')


def flat_settings(config) -> dict:
  """{dotted key: value} of every key of a config, json-ready."""
  return _json_ready(_flatten(config.to_dict()))


def _training_settings(config) -> dict:
  return {k: v for k, v in flat_settings(config).items() if not k.startswith(FREE_ON_RESUME)}


def resume_changes(workdir: str, config, *, step: int | None, accept: bool) -> dict:
  """The changes of training settings between the run saved in `workdir` and `config`, resumed at `step` (None: no
  checkpoint yet, so nothing was trained and nothing is checked): {key: [saved, new]}.

  ConfigError naming each key with its old and new value unless `accept`. A change of the schedule's length says
  where the warm-up and decays move and what the learning rate becomes at the resumed step."""
  if step is None or not has_record(workdir):
    return {}
  saved = load_config(workdir)
  old, new = _training_settings(saved), _training_settings(config)
  keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  if not keys:
    return {}
  changes = {k: [old.get(k), new.get(k)] for k in keys}
  text = ', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changes.items())
  schedule = _schedule_note(saved.train, config.train, step) if any(k.startswith(_SCHEDULE_KEYS) for k in keys) else ''
  if not accept:
    raise ConfigError(
      f'resuming {workdir} at step {step} with changed training settings ({text}) would train its remaining steps '
      f'differently from the ones already trained.{schedule} Rerun without these overrides, or pass '
      '--accept_config_changes to continue with them (they are recorded in run.json)'
    )
  from absl import logging

  logging.warning('resuming at step %d with accepted config changes: %s.%s', step, text, schedule)
  return changes


def _schedule_note(old_train, new_train, step: int) -> str:
  """Where the schedule's warm-up and decays were and will be, and the learning rate at `step` before and after."""
  rate = lambda t: float(defaults.learning_rate(t, step))
  (w0, d0), (w1, d1) = defaults.schedule_steps(old_train), defaults.schedule_steps(new_train)
  return (
    f' The schedule follows num_steps: warm-up {w0} -> {w1} steps, decays at {list(d0)} -> {list(d1)}, so the '
    f'learning rate at step {step} goes from {rate(old_train):.4g} to {rate(new_train):.4g}. To keep the old '
    f'schedule, add --config.train.warmup_steps={w0} --config.train.decay_steps="{tuple(d0)}".'
  )
