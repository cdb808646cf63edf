"""Every user mistake through the real console scripts: a nonzero exit status, one line naming the problem, no
traceback, nothing created; and --help lists each tool's own flags."""

import os
import re
import subprocess
import sys

import pytest
import xla_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, 'configs', 'shapes_demo.py')
BIN = os.path.dirname(sys.executable)  # the console scripts sit next to the venv's interpreter


def _command(tool) -> list:
  """The installed console script, or `python -m` its module when the environment was installed before the tool
  existed (an editable install writes the scripts of its time only)."""
  script = os.path.join(BIN, tool)
  if os.path.exists(script):
    return [script]
  with open(os.path.join(REPO, 'pyproject.toml'), encoding='utf-8') as f:
    module = re.search(rf'^{re.escape(tool)} = "([\w.]+):main"$', f.read(), re.M).group(1)
  return [sys.executable, '-m', module]


def _run(tool, args, cwd, **env):
  env = xla_env.cpu_env(1, **env)
  env.pop('CONRET_DEBUG', None)
  return subprocess.run([*_command(tool), *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


MISTAKES = [
  ('conret-train', [], '--config is required'),
  (
    'conret-train',
    ['--config=CONFIG', '--workdir=NEW', '--config.trian.seed=1'],
    'unknown config key --config.trian.seed (did you mean --config.train.seed?)',
  ),
  ('conret-train', ['--config=CONFIG', '--workdir=NEW', '--config.train.sed=1'], 'did you mean --config.train.seed?'),
  (
    'conret-train',
    ['--config=CONFIG', '--workdir=NEW', '--config.data.resize=big'],
    "config.data.resize='big' must be one of ('square', 'short_side')",
  ),
  ('conret-train', ['--config=CONFIG', '--workdir=NEW', '--config.train.seed=abc'], '--config.train.seed=abc'),
  ('conret-train', ['--config=CONFIG:steps=x', '--workdir=NEW'], "config argument steps='x': expected int"),
  ('conret-train', ['--config=missing.py', '--workdir=NEW'], "config file 'missing.py' not found"),
  ('conret-train', ['--config=CONFIG', '--workdir=FILE'], 'is a file, not a directory'),
  ('conret-train', ['--config=CONFIG', '--workdir=FILE/run'], 'cannot create --workdir'),
  ('conret-train', ['--config=CONFIG', '--workdir=NEW', '--stpe=3'], 'unknown flag --stpe'),
  (
    'conret-train',
    ['--config=CONFIG', '--workdir=NEW', '--config.model.backbone.freeze_at=2'],
    'config.init_from is empty',
  ),
  ('conret-eval', ['--workdir=NEW'], '--config is required'),
  ('conret-eval', ['--config=CONFIG', '--workdir=NEW'], 'no checkpoint in'),
  ('conret-eval', ['--config=CONFIG', '--workdir=NEW', '--step=7'], 'no checkpoint 7'),
  (
    'conret-eval',
    ['--config=CONFIG', '--workdir=NEW', '--config.init_from=/nonexistent'],
    'config.init_from=/nonexistent does not exist',
  ),
  ('conret-predict', ['--config=CONFIG', '--workdir=NEW', '--images=x.png', '--output=OUT'], 'no checkpoint in'),
  ('conret-predict', ['--config=CONFIG', '--workdir=NEW'], '--images and --output are required'),
  ('conret-analyze', ['--config=CONFIG', '--workdir=NEW'], '--output is required'),
  ('conret-analyze', ['--config=CONFIG', '--workdir=NEW', '--output=OUT'], 'no checkpoint in'),
  (
    'conret-analyze',
    ['--config=CONFIG', '--workdir=NEW', '--output=OUT', '--config.init_from=HERE', '--compare=NEW'],
    'holds no config.json',
  ),
  (
    'conret-analyze',
    ['--config=CONFIG', '--workdir=NEW', '--output=OUT', '--config.init_from=HERE', '--compare=FILE'],
    'FILE is a file, not a directory',
  ),
  ('conret-bench', ['--config=CONFIG'], 'conret-bench {step|detect|input}'),
  ('conret-bench', ['step'], '--config is required'),
  ('conret-make-shapes', ['--output=FILE'], 'is a file, not a directory'),
  (
    'conret-import',
    ['--format=torchvision_resnet', '--input=/nonexistent.npz', '--output=OUT'],
    '/nonexistent.npz: no such file',
  ),
  (
    'conret-import',
    ['--format=torchvision_resnet', '--input=/nonexistent.npz', '--output=OUT', '--config=missing.py'],
    'missing.py',
  ),
]


@pytest.mark.parametrize('tool,args,message', MISTAKES, ids=[f'{m[0]}:{" ".join(m[1])}' for m in MISTAKES])
def test_a_user_mistake_is_one_line(tmp_path, tool, args, message):
  (tmp_path / 'FILE').write_text('not a directory')
  paths = {'CONFIG': CONFIG, 'NEW': str(tmp_path / 'new'), 'OUT': str(tmp_path / 'out'), 'FILE': str(tmp_path / 'FILE')}
  paths['HERE'] = str(tmp_path)  # a folder that exists
  for name, value in paths.items():
    args = [a.replace(name, value) for a in args]
  proc = _run(tool, args, tmp_path)
  output = proc.stdout + proc.stderr
  assert proc.returncode != 0, output
  assert message in proc.stderr, output
  assert 'Traceback' not in output, output
  lines = [line for line in proc.stderr.splitlines() if line.startswith(f'{tool}: error:')]
  assert len(lines) == 1, output
  assert not (tmp_path / 'new').exists() and not (tmp_path / 'out').exists()  # nothing created


def test_unknown_step_of_a_real_checkpoint(trained_workdir, tiny_overrides, tmp_path):
  workdir, _ = trained_workdir
  overrides = [f'--config.{k}={v}' for k, v in tiny_overrides.items()]
  config_file = tmp_path / 'tiny.py'
  config_file.write_text('from conret_jax import defaults\n\ndef get_config():\n  return defaults.base_config()\n')
  proc = _run('conret-eval', [f'--config={config_file}', f'--workdir={workdir}', '--step=99', *overrides], tmp_path)
  assert proc.returncode != 0 and 'Traceback' not in proc.stderr, proc.stderr
  assert 'no checkpoint 99 in' in proc.stderr and '(steps there: [7])' in proc.stderr, proc.stderr


def test_debug_shows_the_traceback(tmp_path):
  proc = _run('conret-eval', [f'--config={CONFIG}', f'--workdir={tmp_path / "new"}', '--debug'], tmp_path)
  assert proc.returncode != 0 and 'Traceback' in proc.stderr and 'CheckpointNotFoundError' in proc.stderr


@pytest.mark.parametrize(
  'tool,own_flags',
  [
    ('conret-train', ('--config', '--workdir', '--coordinator_address', '--debug')),
    ('conret-eval', ('--config', '--workdir', '--step')),
    ('conret-predict', ('--images', '--output', '--score_threshold', '--step')),
    ('conret-analyze', ('--workdir', '--output', '--step', '--num_images', '--compare', '--config')),
    ('conret-bench', ('--config', '--steps', '--batches')),
    ('conret-make-shapes', ('--output', '--num_train', '--num_val', '--seed')),
    ('conret-import', ('--format', '--input', '--output', '--config')),
  ],
)
def test_help_lists_the_tools_own_flags(tmp_path, tool, own_flags):
  proc = _run(tool, ['--help'], tmp_path)
  assert proc.returncode == 0, proc.stderr
  for flag in own_flags:
    assert flag in proc.stdout, (tool, flag, proc.stdout)
