"""Running a command-line tool: `run` wraps absl's app.run.

--help / -h     the tool's description and its own flags
--config        absent: a --workdir that conret-train wrote supplies its saved config (cli/saved_config.py)
user errors     one line `conret-<tool>: error: ...` and exit status 2 (bad flags, config keys or values, a
                missing file, a workdir that is a file, no checkpoint, ...); real bugs keep their traceback, and
                --debug (or CONRET_DEBUG=1) shows the traceback of user errors too
"""

import difflib
import os
import sys

from absl import app, flags

from conret_jax import run_record
from conret_jax.cli import tool_flags, xla_flags
from conret_jax.errors import UserError

FLAGS = flags.FLAGS
_HELP = ('--help', '-h', '-help', '--helpshort', '-?')


def debug_requested(argv) -> bool:
  """Whether a user error should keep its traceback: --debug among the arguments, or CONRET_DEBUG set (not 0)."""
  return os.environ.get('CONRET_DEBUG', '') not in ('', '0') or '--debug' in argv


def fail(tool: str, message: str) -> None:
  """The end of a user error: one line on stderr, exit status 2."""
  print(f'{tool}: error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def _with_saved_config(argv: list) -> list:
  """argv with --config pointing at the workdir's saved config when --config is absent and the workdir has one."""
  if any(a == '--config' or a.startswith('--config=') for a in argv):
    return argv
  workdir = tool_flags.flag_value(argv, 'workdir')
  if workdir and run_record.has_record(workdir):
    return argv[:1] + [f'--config={tool_flags.SAVED_CONFIG}:{workdir}'] + argv[1:]
  return argv


def _root_cause(error: BaseException) -> BaseException:
  while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
    error = error.__cause__ or error.__context__
  return error


def _parse_flags(tool: str, argv: list, flag_names) -> list:
  """absl parsing with every mistake turned into one clear line."""
  config = tool_flags.flag_value(argv, 'config')
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
    if debug_requested(argv):
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
    flag = str(error).split(':', 1)[0].replace('flag ', '')
    # The workdir's saved config: the error names W/config.json; the file that reads it is ours, not the user's.
    flag = '' if flag.startswith(f'--config={tool_flags.SAVED_CONFIG}') else flag + ': '
  return f'{flag}{type(cause).__name__ if not str(cause) else ""}{cause}'.strip()


def run(tool_main, *, tool: str, doc: str, flag_names) -> None:
  """Runs `tool_main(argv)` as the console script `tool` (see the module docstring)."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before the first TensorFlow import
  xla_flags.apply()  # before any backend starts: XLA reads its flags once
  argv = list(sys.argv)
  if any(a in _HELP for a in argv[1:]):
    print(tool_flags.help_text(tool, doc, flag_names))
    sys.exit(0)
  argv = _with_saved_config(argv)
  sys.argv = argv  # ml_collections reads the --config.* overrides from sys.argv

  def guarded(args):
    try:
      return tool_main(args)
    except (UserError, app.UsageError) as e:
      if debug_requested(argv):
        raise
      fail(tool, str(e))

  app.run(guarded, argv=argv, flags_parser=lambda a: _parse_flags(tool, a, list(flag_names)))
