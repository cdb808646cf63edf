"""A tool's start-up: its workdir checked, TensorFlow kept off the accelerators, the distributed system, logging."""

import logging as std_logging
import os

from absl import flags, logging

from conret_jax import distributed, run_record
from conret_jax.cli import tool_flags
from conret_jax.errors import ConfigError, WorkdirError

FLAGS = flags.FLAGS


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
  run_record.check_config_matches(workdir, config, config_given=not tool_flags.config_from_workdir())
  hide_accelerators_from_tf()
  if distributed_init:
    distributed.initialize_from_flags()
  setup_logging(workdir if log_to_workdir else None, name)
  return config, workdir
