"""Plumbing shared by the command-line tools: --config/--workdir flags, logging, TF off accelerators, restore.

Every tool takes `--config=configs/X.py:args` (an ml_collections config file; `--config.a.b=v` overrides one key,
and a misspelt key is an error) and `--workdir=DIR`. Importing this module defines those flags and the
multi-process flags of `conret_jax.distributed`; call `setup()` first thing in main, before any JAX call.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # must precede the first TensorFlow import

import logging as std_logging  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from conret_jax import distributed  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS

if 'config' not in FLAGS:  # several tools may share one process in tests
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/conretinanet_coco.py:depth=50,scale=500; '
                                  'override single keys with --config.train.num_steps=100.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, logs, evaluations (local path or gs://).')
  distributed.define_flags()


def define_step_flag() -> None:
  """--step for the tools that read one checkpoint (eval, predict); defined once per process."""
  if 'step' not in FLAGS:
    flags.DEFINE_integer('step', None, 'Checkpoint step to use (default: the latest).')


def hide_accelerators_from_tf() -> None:
  """TensorFlow only feeds data: keep it off GPUs so it never takes memory that JAX needs."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialized its devices (e.g. a second call): nothing left to do
    pass


class _QuietLibraries(std_logging.Filter):
  """Drops the INFO chatter of orbax (several lines per save); its warnings and errors still show."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def setup_logging(workdir: str | None, name: str) -> None:
  """INFO logs to stderr and, on process 0 with a local workdir, to WORKDIR/<name>.log as well."""
  logging.set_verbosity(logging.INFO)
  logging.use_absl_handler()
  quiet = _QuietLibraries()
  if not any(isinstance(f, _QuietLibraries) for f in logging.get_absl_handler().filters):
    logging.get_absl_handler().addFilter(quiet)
  import jax  # pylint: disable=g-import-not-at-top  (after distributed initialization)
  if workdir and '://' not in workdir and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, f'{name}.log')
    logger = logging.get_absl_logger()
    if not any(getattr(h, 'baseFilename', None) == os.path.abspath(path) for h in logger.handlers):
      handler = std_logging.FileHandler(path)
      handler.setFormatter(std_logging.Formatter('%(asctime)s %(levelname)s %(filename)s:%(lineno)d] %(message)s'))
      handler.addFilter(quiet)
      logger.addHandler(handler)


def setup(name: str, *, distributed_init: bool = True):
  """Start-up of a tool: TF off accelerators, join the distributed system, logging. Returns (config, workdir)."""
  if FLAGS.config is None:
    raise flags.ValidationError('--config is required, e.g. --config=configs/shapes_demo.py')
  if not FLAGS.workdir:
    raise flags.ValidationError('--workdir is required')
  hide_accelerators_from_tf()
  if distributed_init:
    distributed.initialize_from_flags()
  setup_logging(FLAGS.workdir, name)
  return FLAGS.config, FLAGS.workdir


def abstract_train_state(model, config, mesh):
  """The TrainState's shapes, dtypes and shardings on `mesh` (see train.step.abstract_state)."""
  from conret_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  return step_lib.abstract_state(model, config, mesh)


def restore_for_inference(config, workdir: str, step: int | None = None, devices=None):
  """The model and its variables from WORKDIR/checkpoints (step or the latest), else from config.init_from.

  Args:
    devices: the mesh's devices (default: all devices of all processes).
  Returns:
    (model, variables, step, mesh); step is 0 for variables from config.init_from.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import conret_jax  # pylint: disable=g-import-not-at-top
  from conret_jax.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from conret_jax.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  model = conret_jax.build_model(config)
  mesh = mesh_lib.make_mesh(config, devices)
  abstract = abstract_train_state(model, config, mesh)
  checkpointer = ckpt_lib.Checkpointer(workdir, every_steps=0, keep=None, config=config, async_save=False)
  try:
    if step is None and checkpointer.latest_step() is None:
      if not config.init_from:
        raise FileNotFoundError(f'no checkpoint in {checkpointer.directory} and config.init_from is empty: '
                                'train first (conret-train) or point --config.init_from at imported weights')
      logging.info('no checkpoint in %s: using the weights of config.init_from=%s', checkpointer.directory,
                   config.init_from)
      from conret_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
      fresh, _ = step_lib.init_state(model, config, mesh, jax.random.PRNGKey(0))
      return model, ckpt_lib.init_from(fresh, config.init_from).variables(), 0, mesh
    step = checkpointer.latest_step() if step is None else int(step)
    state, _ = checkpointer.restore(step, abstract)
  finally:
    checkpointer.close()
  return model, state.variables(), step, mesh

