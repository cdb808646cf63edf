"""Plumbing shared by the command-line tools: flags, --help, the saved config, one-line errors, start-up, restore.

Every absl tool takes `--config=configs/X.py:args` (an ml_collections config file; `--config.a.b=v` overrides one
key, and a misspelt key is an error) and `--workdir=DIR`. Without --config, a workdir that `conret-train` wrote
supplies its own (W/config.json, conret_jax/run_record.py), overrides included. `run` wraps absl's app.run:
  --help / -h     the tool's description and its own flags
  user errors     one line `conret-<tool>: error: ...` and exit status 2 (bad flags, config keys or values, a
                  missing file, a workdir that is a file, no checkpoint, ...); real bugs keep their traceback, and
                  --debug (or CONRET_DEBUG=1) shows the traceback of user errors too
Importing this module defines the shared flags and the multi-process flags of `conret_jax.distributed`.
"""

import difflib
import logging as std_logging
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # must precede the first TensorFlow import

from absl import (
  app,  # noqa: E402
  flags,  # noqa: E402
  logging,  # noqa: E402
)
from ml_collections import config_flags  # noqa: E402

from conret_jax import (
  distributed,  # noqa: E402
  run_record,  # noqa: E402
)
from conret_jax.cli import xla_flags  # noqa: E402
from conret_jax.errors import CheckpointNotFoundError, ConfigError, UserError, WeightFileError, WorkdirError  # noqa: E402

FLAGS = flags.FLAGS
SAVED_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'saved_config.py')
_HELP = ('--help', '-h', '-help', '--helpshort', '-?')

if 'config' not in FLAGS:  # several tools may share one process in tests
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

COMMON_FLAGS = ('config', 'workdir', 'debug')
DISTRIBUTED_FLAGS = ('coordinator_address', 'num_processes', 'process_id', 'local_device_ids')


def define_step_flag() -> None:
  """--step for the tools that read one checkpoint (eval, predict, analyze); defined once per process."""
  if 'step' not in FLAGS:
    flags.DEFINE_integer('step', None, 'Checkpoint step to use (default: the latest).')


# ---------------------------------------------------------------------------------------------------- running a tool


def _debug(argv) -> bool:
  return os.environ.get('CONRET_DEBUG', '') not in ('', '0') or '--debug' in argv


def fail(tool: str, message: str) -> None:
  """The end of a user error: one line on stderr, exit status 2."""
  print(f'{tool}: error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def _flag_value(argv, name: str):
  for arg in argv:
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
  return None


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


def _with_saved_config(argv: list) -> list:
  """argv with --config pointing at the workdir's saved config when --config is absent and the workdir has one."""
  if any(a == '--config' or a.startswith('--config=') for a in argv):
    return argv
  workdir = _flag_value(argv, 'workdir')
  if workdir and run_record.has_record(workdir):
    return argv[:1] + [f'--config={SAVED_CONFIG}:{workdir}'] + argv[1:]
  return argv


def _root_cause(error: BaseException) -> BaseException:
  while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
    error = error.__cause__ or error.__context__
  return error


def _parse_flags(tool: str, argv: list, flag_names) -> list:
  """absl parsing with every mistake turned into one clear line."""
  config = _flag_value(argv, 'config')
  if config is not None and not os.path.isfile(config.split(':', 1)[0]):
    fail(tool, f'config file {config.split(":", 1)[0]!r} not found (--config={config})')
  try:
    rest = FLAGS(argv)
    FLAGS.config  # ml_collections loads the file lazily
  except flags.UnrecognizedFlagError as e:
    close = difflib.get_close_matches(e.flagname, flag_names, n=1)
    fail(
      tool,
      f'unknown flag --{e.flagname}' + (f'; did you mean --{close[0]}?' if close else '') + f' (see {tool} --help)',
    )
  except Exception as e:  # config files and overrides raise anything
    if _debug(argv):
      raise
    fail(tool, _config_error_message(e, argv))
  return rest


def _closest_key(dotted: str) -> str | None:
  """The existing config key nearest to a misspelt one: the first unknown part replaced by its closest sibling."""
  from conret_jax import defaults

  node, parts = defaults.base_config(), dotted.split('.')
  for i, part in enumerate(parts):
    if not hasattr(node, 'keys') or part in node:
      node = node[part] if hasattr(node, 'keys') else node
      continue
    close = difflib.get_close_matches(part, list(node.keys()), n=1)
    return '.'.join(parts[:i] + close + parts[i + 1 :]) if close else None
  return None


def _config_error_message(error: Exception, argv) -> str:
  """One line for an error raised while loading the config or applying an override."""
  cause = _root_cause(error)
  if isinstance(cause, KeyError) or isinstance(error, KeyError):  # ml_collections: an unknown key
    texts = [str(e.args[0]) if e.args else '' for e in (error, cause) if isinstance(e, KeyError)]
    key = texts[-1].partition('\n')[0].strip("'")
    hint = next((t.partition('\n')[2].strip() for t in texts if '\n' in t), '')
    overrides = [a.split('=', 1)[0] for a in argv if a.startswith('--config.')]
    bad = next((o for o in overrides if f'.{key}.' in f'{o}.'), None)
    close = _closest_key(bad[len('--config.') :]) if bad else None
    hint = f'did you mean --config.{close}?' if close else hint
    return f'unknown config key {bad or key}' + (f' ({hint})' if hint else '')
  flag = ''
  if isinstance(error, flags.IllegalFlagValueError):
    flag = str(error).split(':', 1)[0].replace('flag ', '') + ': '
  return f'{flag}{type(cause).__name__ if not str(cause) else ""}{cause}'.strip()


def run(tool_main, *, tool: str, doc: str, flag_names) -> None:
  """Runs `tool_main(argv)` as the console script `tool` (see the module docstring)."""
  xla_flags.apply()  # before any backend starts: XLA reads its flags once
  argv = list(sys.argv)
  if any(a in _HELP for a in argv[1:]):
    print(help_text(tool, doc, flag_names))
    sys.exit(0)
  argv = _with_saved_config(argv)
  sys.argv = argv  # ml_collections reads the --config.* overrides from sys.argv

  def guarded(args):
    try:
      return tool_main(args)
    except (UserError, app.UsageError) as e:
      if _debug(argv):
        raise
      fail(tool, str(e))

  app.run(guarded, argv=argv, flags_parser=lambda a: _parse_flags(tool, a, list(flag_names)))


# ---------------------------------------------------------------------------------------------------- start-up


def hide_accelerators_from_tf() -> None:
  """TensorFlow only feeds data: keep it off GPUs so it never takes memory that JAX needs."""
  import tensorflow as tf

  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialized its devices (e.g. a second call): nothing left to do
    pass


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax (several lines per save), of JAX's backend probing (`Unable to initialize
  backend 'tpu'` on every machine without one) and of faster-coco-eval (six lines per evaluation); their warnings
  and errors still show."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
      part in record.pathname for part in ('/orbax/', '/jax/_src/', '/faster_coco_eval/')
    )


def setup_logging(workdir: str | None, name: str) -> None:
  """INFO logs to stderr and, on process 0 with an existing local workdir, to WORKDIR/<name>.log as well."""
  logging.set_verbosity(logging.INFO)
  logging.use_absl_handler()
  quiet = _QuietLibraries()
  if not any(isinstance(f, _QuietLibraries) for f in logging.get_absl_handler().filters):
    logging.get_absl_handler().addFilter(quiet)
  import jax  # after distributed initialization

  if workdir and '://' not in workdir and os.path.isdir(workdir) and jax.process_index() == 0:
    path = os.path.join(workdir, f'{name}.log')
    logger = logging.get_absl_logger()
    if not any(getattr(h, 'baseFilename', None) == os.path.abspath(path) for h in logger.handlers):
      handler = std_logging.FileHandler(path)
      handler.setFormatter(std_logging.Formatter('%(asctime)s %(levelname)s %(filename)s:%(lineno)d] %(message)s'))
      handler.addFilter(quiet)
      logger.addHandler(handler)


def check_workdir(workdir: str | None, *, create: bool, flag: str = 'workdir') -> str:
  """A directory flag's value, checked: given, not a file; created (create=True) or left alone if missing."""
  if not workdir:
    raise WorkdirError(f'--{flag} is required')
  if '://' in workdir:
    return workdir
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'--{flag}={workdir} is a file, not a directory')
  if create:
    try:
      os.makedirs(workdir, exist_ok=True)
    except OSError as e:
      raise WorkdirError(f'cannot create --{flag}={workdir}: {e.strerror or e}') from None
  return workdir


def setup(name: str, *, writes_workdir: bool, distributed_init: bool = True, log_to_workdir: bool = True):
  """Start-up of a tool: checks, TF off accelerators, the distributed system, logging. Returns (config, workdir).

  writes_workdir: the tool creates its workdir (conret-train); read-only tools create nothing in a workdir that
  does not exist. A given --config must describe the model a workdir's run trained.
  log_to_workdir: False keeps WORKDIR/<name>.log from being written (a tool that leaves the workdir untouched; it
  may call `setup_logging` on its own output folder).
  """
  config, workdir = FLAGS.config, FLAGS.workdir
  if config is None:
    raise ConfigError(
      '--config is required (or a --workdir written by conret-train, which holds its config), '
      'e.g. --config=configs/shapes_demo.py'
    )
  workdir = check_workdir(workdir, create=writes_workdir)
  run_record.check_config_matches(workdir, config)
  hide_accelerators_from_tf()
  if distributed_init:
    distributed.initialize_from_flags()
  setup_logging(workdir if log_to_workdir else None, name)
  return config, workdir


# ---------------------------------------------------------------------------------------------------- restore


def abstract_train_state(model, config, mesh):
  """The TrainState's shapes, dtypes and shardings on `mesh` (see train.step.abstract_state)."""
  from conret_jax.train import state as state_lib

  return state_lib.abstract_state(model, config, mesh)


def restore_for_inference(config, workdir: str, step: int | None = None, devices=None):
  """The model and its variables from WORKDIR/checkpoints (step or the latest), else from config.init_from.

  Creates nothing in the workdir. Args:
    devices: the mesh's devices (default: all devices of all processes).
  Returns:
    (model, variables, step, mesh); step is 0 for variables from config.init_from.
  """
  import jax

  import conret_jax
  from conret_jax import mesh as mesh_lib
  from conret_jax.train import checkpoint as ckpt_lib

  model = conret_jax.build_model(config)
  mesh = mesh_lib.make_mesh(config, devices)
  directory = checkpoint_directory(workdir)
  if has_checkpoint(workdir, step):  # only then: a Checkpointer creates its directory
    checkpointer = ckpt_lib.Checkpointer(workdir, every_steps=0, keep=None, config=config, async_save=False)
    try:
      step = checkpointer.latest_step() if step is None else int(step)
      state, _ = checkpointer.restore(step, abstract_train_state(model, config, mesh))
    finally:
      checkpointer.close()
    return model, state.variables(), step, mesh
  check_weights_available(config, workdir, step)
  logging.info('no checkpoint in %s: using the weights of config.init_from=%s', directory, config.init_from)
  from conret_jax.train import state as state_lib

  fresh, _ = state_lib.init_state(model, config, mesh, jax.random.PRNGKey(0))
  # Inference needs every weight from the file: nothing may stay at its random initial value.
  every_leaf = jax.tree.map(lambda _: False, fresh.params)
  return model, ckpt_lib.init_from(fresh, config.init_from, every_leaf).variables(), 0, mesh


def checkpoint_directory(workdir: str) -> str:
  return os.path.join(workdir if '://' in workdir else os.path.abspath(workdir), 'checkpoints')


def has_checkpoint(workdir: str, step: int | None) -> bool:
  """Whether WORKDIR/checkpoints holds a checkpoint (step None) or has any to look for `step` in; creates nothing.
  Remote workdirs are assumed to (the checkpointer finds out)."""
  directory = checkpoint_directory(workdir)
  if '://' in directory:
    return True
  return os.path.isdir(directory) and any(e.isdigit() for e in os.listdir(directory))


def check_weights_available(config, workdir: str, step: int | None) -> None:
  """In seconds, before anything heavy: CheckpointNotFoundError unless the workdir has a checkpoint to restore or
  config.init_from names weights (WeightFileError if that folder does not exist). Nothing to say without a config
  or a workdir: `setup` reports those."""
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
  if '://' not in config.init_from and not os.path.isdir(config.init_from):
    raise WeightFileError(f'config.init_from={config.init_from} does not exist: write it with conret-import')
