"""What a run records about itself in its workdir, so later tools need no --config: W/config.json and W/run.json.

  config.json  the resolved config `conret-train` ran with, every key (rewritten at each start: a resumed run may
               extend num_steps or change an inference-only key)
  run.json     {"classes": {"layout", "num_classes", "category_ids", "names"}: the training set's categories, so
               predictions are named as in training without opening any dataset,
                "starts": [{"argv", "time", "step", "processes", "devices", "version"}, ...]: every command that
               started or resumed the run}
Also the model settings a workdir's checkpoints depend on (`model_settings`), shared by the checkpoint fingerprint
and the check that a given --config still describes the saved model.
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


def settings_differences(stored: dict, current: dict, what: str = 'config') -> list[str]:
  """Readable differences between two `model_settings` (stored first); empty if they match."""
  diffs = []
  for key in sorted(set(stored) | set(current)):
    if key not in current:
      diffs.append(f'{what} {key} only in the saved run ({stored[key]})')
    elif key not in stored:
      diffs.append(f'{what} {key} only in this config ({current[key]})')
    elif stored[key] != current[key]:
      diffs.append(f'{what} {key}: saved {stored[key]} vs given {current[key]}')
  return diffs


def has_record(workdir: str) -> bool:
  """Whether `workdir` holds a config written by conret-train."""
  return fileio.exists(os.path.join(workdir, CONFIG_FILE))


def save(workdir: str, config, layout, *, step: int, processes: int, devices: int, argv=None) -> None:
  """Writes W/config.json and adds this start to W/run.json (call on one process). `layout`: the run's
  data.info.ClassLayout."""
  with fileio.open_file(os.path.join(workdir, CONFIG_FILE), 'w') as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True) + '\n')
  run = {'starts': []}
  if fileio.exists(os.path.join(workdir, RUN_FILE)):
    with fileio.open_file(os.path.join(workdir, RUN_FILE)) as f:
      run = json.load(f)
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
  )
  with fileio.open_file(os.path.join(workdir, RUN_FILE), 'w') as f:
    json.dump(run, f, indent=1)


def _typed_like(default, value):
  """A saved json value in the type of the schema's default (json has no tuples; ints may stand for floats)."""
  if isinstance(default, tuple):
    return tuple(_typed_like(default[0] if default else None, v) if isinstance(v, list) else v for v in value)
  if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  return value


def _update(node: ml_collections.ConfigDict, saved: dict, path: str, source: str) -> None:
  for key, value in saved.items():
    if key not in node:
      raise ConfigError(f'{source} has config.{path}{key}, which this version of conret_jax does not know')
    if isinstance(node[key], ml_collections.ConfigDict):
      _update(node[key], value, f'{path}{key}.', source)
    else:
      node[key] = _typed_like(node[key], value)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config W/config.json recorded, as a full ConfigDict typed by the schema (keys added to the schema since
  keep their defaults)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not fileio.exists(path):
    raise ConfigError(
      f'no --config given and {path} does not exist: pass --config, or a --workdir that conret-train wrote'
    )
  with fileio.open_file(path) as f:
    saved = json.load(f)
  config = defaults.base_config()
  _update(config, saved, '', path)
  return config


def load_run(workdir: str) -> dict | None:
  """W/run.json as a dict, or None if the workdir has none."""
  path = os.path.join(workdir, RUN_FILE)
  if not fileio.exists(path):
    return None
  with fileio.open_file(path) as f:
    return json.load(f)


def check_config_matches(workdir: str, config) -> None:
  """CheckpointMismatchError when the given config describes another model than the run saved in `workdir`."""
  if not has_record(workdir):
    return
  diffs = settings_differences(model_settings(load_config(workdir)), model_settings(config))
  if diffs:
    listed = '; '.join(diffs[:8]) + (f'; and {len(diffs) - 8} more' if len(diffs) > 8 else '')
    raise CheckpointMismatchError(
      f'--config describes a different model than the one trained in {workdir} ({listed}). Leave out --config to '
      f"use the run's own {CONFIG_FILE}."
    )
