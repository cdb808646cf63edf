"""The flags every tool shares, defined on demand: `--config`, `--workdir`, `--debug`, the multi-process flags of
`conret_jax.distributed`, and `--step` for the tools that read one checkpoint.

Every absl tool takes `--config=configs/X.py:args` (an ml_collections config file; `--config.a.b=v` overrides one
key, and a misspelt key is an error) and `--workdir=DIR`. Without --config, a workdir that `conret-train` wrote
supplies its own (W/config.json, conret_jax/run_record.py), overrides included.
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from conret_jax import distributed

FLAGS = flags.FLAGS
# The config file that reads a workdir's saved config; `tool.run` passes it when --config is absent.
SAVED_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'saved_config.py')
COMMON_FLAGS = ('config', 'workdir', 'debug')
DISTRIBUTED_FLAGS = ('coordinator_address', 'num_processes', 'process_id', 'local_device_ids')


def define_common_flags() -> None:
  """--config, --workdir, --debug and the multi-process flags; defined once per process (tests run several tools)."""
  if 'config' in FLAGS:
    return
  config_flags.DEFINE_config_file(
    'config',
    None,
    'Config file, e.g. configs/conretinanet_coco.py:depth=50,scale=500; '
    'override single keys with --config.train.num_steps=100. Default: the config '
    'saved in --workdir by conret-train.',
    lock_config=True,
  )
  flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, logs, evaluations (local path or gs://).')
  flags.DEFINE_bool('debug', False, 'Show the traceback of user errors too (also: CONRET_DEBUG=1).')
  distributed.define_flags()


def define_step_flag() -> None:
  """--step for the tools that read one checkpoint (eval, predict, analyze); defined once per process."""
  if 'step' not in FLAGS:
    flags.DEFINE_integer('step', None, 'Checkpoint step to use (default: the latest).')


def flag_value(argv, name: str):
  """The value of --name in argv, written `--name=value` or `--name value` (absl takes both); None if absent."""
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def config_from_workdir(argv=None) -> bool:
  """Whether the config in use is the workdir's saved one (the user gave no --config)."""
  return any(a.startswith(f'--config={SAVED_CONFIG}') for a in (sys.argv if argv is None else argv))


def help_text(tool: str, doc: str, flag_names) -> str:
  lines = [doc.strip(), '', 'Flags:']
  for name in flag_names:
    flag = FLAGS[name]
    default = '' if flag.default in (None, '', [], False) else f' (default: {flag.default_as_str})'
    lines.append(f'  --{name}: {flag.help}{default}')
  lines += [
    '',
    f'Config keys: --config.KEY=VALUE overrides one key (every key, with its meaning: '
    f"conret_jax/defaults.py). {tool} --helpfull lists absl's own flags too.",
  ]
  return '\n'.join(lines)
