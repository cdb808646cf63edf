"""Every user mistake through the real console scripts: a nonzero exit status, one line naming the problem, no
traceback, nothing created; and --help lists each tool's own flags."""

import io
import json
import os
import re
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
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


def _run(tool, args, cwd, timeout=300, **env):
  """The tool's process, without the caller's CONRET_DEBUG unless `env` sets it."""
  full = xla_env.cpu_env(1)
  full.pop('CONRET_DEBUG', None)
  full.update(env)
  return subprocess.run([*_command(tool), *args], capture_output=True, text=True, timeout=timeout, env=full, cwd=cwd)


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
    "config.data.resize='big' must be one of ('square', 'short_side', 'stretch')",
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
  ('conret-export', ['--config=CONFIG', '--workdir=NEW', '--output=OUT'], 'no checkpoint in'),
  (
    'conret-predict',
    ['--config=CONFIG', '--workdir=NEW', '--images=x.png', '--output=OUT', '--config.data.resize=squre'],
    "config.data.resize='squre' must be one of",
  ),
  ('conret-export', ['--config=CONFIG', '--workdir=NEW'], '--output is required'),
  (
    'conret-export',
    ['--config=CONFIG', '--workdir=NEW', '--output=OUT', '--config.model.pad_pixels=white'],
    "config.model.pad_pixels='white' must be 'mean' or 'black'",
  ),
  ('conret-export', ['--config=CONFIG', '--workdir=NEW', '--output=HERE'], 'exists and is not empty; pass --overwrite'),
  ('conret-export', ['--config=CONFIG', '--workdir=NEW', '--output=FILE', '--overwrite'], 'is a file, not a folder'),
  ('conret-analyze', ['--config=CONFIG', '--workdir=NEW'], '--output is required'),
  ('conret-analyze', ['--config=CONFIG', '--workdir=NEW', '--output=OUT'], 'no checkpoint in'),
  (
    'conret-analyze',
    ['--config=CONFIG', '--workdir=NEW', '--output=OUT', '--num_images=-3'],
    '--num_images=-3 must be >= 0 (0: every image)',
  ),
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


# conret-import's target for the weight-file tests: a width-8 ResNet-18 backbone.
IMPORT_CONFIG = """
from conret_jax.defaults import base_config

def get_config():
  c = base_config()
  c.model.backbone.depth, c.model.backbone.width = 18, 8
  return c
"""


def _resnet18_width8() -> dict:
  """torchvision's names and shapes for a ResNet-18 of width 8 (BasicBlocks, two per stage), random values."""
  rng, sd = np.random.default_rng(0), {}

  def conv_bn(conv, bn, out, cin, k):
    sd[f'{conv}.weight'] = rng.standard_normal((out, cin, k, k)).astype(np.float32)
    for name in ('weight', 'bias', 'running_mean', 'running_var'):
      sd[f'{bn}.{name}'] = rng.random(out).astype(np.float32)
    sd[f'{bn}.num_batches_tracked'] = np.zeros((), np.int64)

  conv_bn('conv1', 'bn1', 8, 3, 7)
  cin = 8
  for stage in range(4):
    width = 8 * 2**stage
    for block in range(2):
      q = f'layer{stage + 1}.{block}'
      conv_bn(f'{q}.conv1', f'{q}.bn1', width, cin, 3)
      conv_bn(f'{q}.conv2', f'{q}.bn2', width, width, 3)
      if cin != width:
        conv_bn(f'{q}.downsample.0', f'{q}.downsample.1', width, cin, 1)
      cin = width
  return sd


def _npz(arrays) -> bytes:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return buf.getvalue()


def _safetensors(header, data: bytes = b'', length=None) -> bytes:
  head = json.dumps(header).encode()
  return struct.pack('<Q', len(head) if length is None else length) + head + data


def _corrupt_pth() -> bytes:
  """A zip laid out as torch.save writes one (archive/data.pkl, archive/version) with one byte of the pickle flipped."""
  buf, pkl = io.BytesIO(), b'\x80\x02}q\x00(X\x0c\x00\x00\x00conv1.weightq\x01G?\xf0\x00\x00\x00\x00\x00\x00u.'
  with zipfile.ZipFile(buf, 'w', zipfile.ZIP_STORED) as archive:
    archive.writestr('archive/data.pkl', pkl)
    archive.writestr('archive/version', '3\n')
  raw = buf.getvalue()
  i = raw.index(pkl) + 10
  return raw[:i] + bytes([raw[i] ^ 0xFF]) + raw[i + 1 :]


_F32 = {'dtype': 'F32', 'shape': [1]}
WEIGHT_FILE_MISTAKES = [
  ('truncated.npz', lambda: _npz(_resnet18_width8())[:5000], 'truncated.npz is damaged: no zip directory at its end'),
  ('empty.npz', lambda: b'', 'empty.npz is empty (0 bytes)'),
  ('empty.safetensors', lambda: b'', 'empty.safetensors is empty (0 bytes)'),
  ('list.safetensors', lambda: _safetensors([]), 'list.safetensors is damaged: its header is a JSON list'),
  (
    'no_dtype.safetensors',
    lambda: _safetensors({'conv1.weight': {'shape': [1], 'data_offsets': [0, 4]}}, bytes(4)),
    "no_dtype.safetensors is damaged: tensor 'conv1.weight' has no 'dtype'",
  ),
  (
    'resnet50.safetensors',
    lambda: _safetensors({}, bytes(2038), length=123456),
    'resnet50.safetensors is damaged: header length 123456 runs past the end of the 2048-byte file',
  ),
  (
    'negative.safetensors',
    lambda: _safetensors({'conv1.weight': {**_F32, 'data_offsets': [-4, 0]}}, bytes(4)),
    "negative.safetensors is damaged: tensor 'conv1.weight' has data_offsets [-4, 0]",
  ),
  ('corrupt.pth', _corrupt_pth, 'corrupt.pth is damaged: member archive/data.pkl of its zip archive is corrupt'),
  (
    'other_network.npz',
    lambda: _npz({**_resnet18_width8(), 'layer5.0.conv1.weight': np.zeros((8, 8, 3, 3), np.float32)}),
    "unexpected keys (no counterpart in the config's model): ['layer5.0.conv1.weight']",
  ),
]


@pytest.mark.parametrize('name,make,message', WEIGHT_FILE_MISTAKES, ids=[m[0] for m in WEIGHT_FILE_MISTAKES])
def test_a_damaged_or_wrong_weight_file_is_one_line(tmp_path, name, make, message):
  """Exit status 2, one line naming the file and what is wrong with it, nothing written, in seconds."""
  (tmp_path / name).write_bytes(make())
  (tmp_path / 'tiny.py').write_text(IMPORT_CONFIG)
  args = ['--format=torchvision_resnet', f'--input={name}', '--output=out', '--config=tiny.py']
  proc = _run('conret-import', args, tmp_path, timeout=60)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith(f'conret-import: error: {name}') and proc.stderr.count('\n') == 1, proc.stderr
  assert message in proc.stderr, proc.stderr
  assert sorted(os.listdir(tmp_path)) == sorted([name, 'tiny.py'])  # no --output, no half-written folder


def test_an_unwritable_output_is_one_line_in_seconds(tmp_path):
  """A valid import whose --output lies under a file: orbax used to retry for minutes and print five tracebacks."""
  (tmp_path / 'r18.npz').write_bytes(_npz(_resnet18_width8()))
  (tmp_path / 'tiny.py').write_text(IMPORT_CONFIG)
  (tmp_path / 'FILE').write_text('not a directory')
  args = ['--format=torchvision_resnet', '--input=r18.npz', '--output=FILE/r18', '--config=tiny.py']
  start = time.monotonic()
  proc = _run('conret-import', args, tmp_path, timeout=60)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr == f'conret-import: error: cannot write FILE/r18: Not a directory ({tmp_path / "FILE"})\n'
  assert time.monotonic() - start < 30
  assert sorted(os.listdir(tmp_path)) == ['FILE', 'r18.npz', 'tiny.py']
  args[2] = '--output=new/r18'  # the same import, written: the check leaves nothing behind and the layout holds
  proc = _run('conret-import', args, tmp_path, timeout=60)
  assert proc.returncode == 0, proc.stderr
  assert sorted(os.listdir(tmp_path)) == ['FILE', 'new', 'r18.npz', 'tiny.py']
  assert os.listdir(tmp_path / 'new') == ['r18']
  assert {'_CHECKPOINT_METADATA', '_METADATA'} <= set(os.listdir(tmp_path / 'new' / 'r18'))


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
    ('conret-export', ('--workdir', '--output', '--overwrite', '--step', '--platforms', '--config')),
  ],
)
def test_help_lists_the_tools_own_flags(tmp_path, tool, own_flags):
  proc = _run(tool, ['--help'], tmp_path)
  assert proc.returncode == 0, proc.stderr
  for flag in own_flags:
    assert flag in proc.stdout, (tool, flag, proc.stdout)


def _one_line_error(proc, tool: str) -> str:
  """The error line of a tool that ended on a user mistake: exit status 2, stderr's only `tool: error:` line, no
  traceback. The tools log INFO lines to stderr before it, so only the error lines are counted."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith(f'{tool}: error:')]
  assert len(lines) == 1 and proc.stderr.rstrip('\n').endswith(lines[0]), proc.stderr[-3000:]
  return lines[0]


@pytest.fixture(name='saved_workdir')
def fixture_saved_workdir(make_saved_run, make_tiny_config, tmp_path_factory):
  """A workdir as conret-train leaves it (checkpoint 7, config.json, run.json) whose eval split is 4 generated shapes
  images (in the test's own cache), and the folder that holds it."""
  from conret_jax import defaults
  from conret_jax.data.info import ClassLayout

  root = tmp_path_factory.mktemp('saved')
  config = make_tiny_config()
  config.data.eval = defaults.data_source_config(
    source='shapes', split='val', num_examples=4, cache_dir=str(root / 'shapes')
  )
  layout = ClassLayout('contiguous', 5, (1, 2, 3, 4, 5), ('a', 'b', 'c', 'd', 'e'))
  make_saved_run(config, str(root / 'run'), 7, layout=layout)
  return str(root / 'run'), root


def test_analyze_takes_space_separated_flags_like_equals_ones(saved_workdir, tmp_path):
  """`--workdir W --output O`: the saved config is found in W as with `--workdir=W`; absl takes both forms."""
  workdir, _ = saved_workdir
  out = tmp_path / 'out'
  proc = _run('conret-analyze', ['--workdir', workdir, '--output', str(out), '--num_images', '2'], tmp_path, 120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'run (ConRetinaNet), step 7: 2 images' in proc.stdout, proc.stdout
  assert sorted(os.listdir(out)) == ['analysis.json', 'analyze.log', 'localization.png', 'score_iou.png']
  assert json.loads((out / 'analysis.json').read_text())['workdir'] == workdir


def test_a_missing_config_file_given_with_a_space_is_one_line(tmp_path):
  proc = _run('conret-train', ['--config', 'missing.py', '--workdir', str(tmp_path / 'new')], tmp_path, 60)
  assert "config file 'missing.py' not found" in _one_line_error(proc, 'conret-train')
  assert os.listdir(tmp_path) == []


DAMAGED_CONFIGS = [
  ('truncated', '{"model": {', 'is damaged and cannot be read'),
  ('empty', '', 'is damaged: it is empty'),
  ('a list', '[1, 2]', 'is damaged: it holds a json list, not a config'),
  ('a number for a section', '{"model": 3}', 'is damaged: config.model is a json number, not a section'),
  ('a string for a number', '{"model": {"fpn": {"channels": "abc"}}}', "is damaged: config.model.fpn.channels='abc'"),
]
DAMAGED_TOOLS = [
  ('conret-eval', []),
  ('conret-predict', ['--images=x.png', '--output=OUT']),
  ('conret-analyze', ['--output=OUT']),
]


@pytest.mark.parametrize('tool,extra', DAMAGED_TOOLS, ids=[t for t, _ in DAMAGED_TOOLS])
@pytest.mark.parametrize('case,content,message', DAMAGED_CONFIGS, ids=[d[0] for d in DAMAGED_CONFIGS])
def test_a_damaged_config_json_is_named_in_one_line(tmp_path, tool, extra, case, content, message):
  """The workdir's config.json, which a tool reads when --config is absent, is named with what is wrong with it;
  the file that reads it for the tool (cli/saved_config.py) is not the user's business and is not named. The
  config is read while the flags are parsed, before any checkpoint is looked for, so the workdir holds nothing else."""
  damaged = tmp_path / 'run'
  damaged.mkdir()
  (damaged / 'config.json').write_text(content)
  args = [f'--workdir={damaged}', *(a.replace('OUT', str(tmp_path / 'out')) for a in extra)]
  start = time.monotonic()
  line = _one_line_error(_run(tool, args, tmp_path, 60), tool)
  assert time.monotonic() - start < 60
  assert line.startswith(f'{tool}: error: {damaged / "config.json"} {message}'), line
  assert 'saved_config' not in line, line
  assert not (tmp_path / 'out').exists()


def test_a_model_changed_by_overrides_of_the_saved_config_is_not_blamed_on_config(saved_workdir, tmp_path):
  """The mismatch message tells the user to leave out --config only when they passed one."""
  workdir, _ = saved_workdir
  override = '--config.model.fpn.channels=32'
  line = _one_line_error(_run('conret-eval', [f'--workdir={workdir}', override], tmp_path, 60), 'conret-eval')
  assert line.startswith('conret-eval: error: the --config.* overrides describe a different model than the one trained')
  assert 'model.fpn.channels: saved run 16 vs given config 32' in line and '--config to use' not in line, line

  proc = _run('conret-eval', ['--config', CONFIG, '--workdir', workdir, override], tmp_path, 60)
  line = _one_line_error(proc, 'conret-eval')
  assert line.startswith('conret-eval: error: --config describes a different model than the one trained'), line
  assert line.endswith("Leave out --config to use the run's own config.json."), line


IMPORT_MISTAKES = [
  ('output exists', ['--input=r18.npz', '--output=HERE'], 'conret-import: error: --output HERE already exists'),
  ('no format', ['--input=r18.npz', '--output=new'], 'the following arguments are required: --format'),
  ('bad format', ['--format=onnx', '--input=r18.npz', '--output=new'], "argument --format: invalid choice: 'onnx'"),
  ('unknown flag', ['--input=r18.npz', '--output=new', '--stpe=3'], 'unrecognized arguments: --stpe=3'),
]


IMPORT_CONFIG_MISTAKES = [
  ('config.json', '{"model": {}}', "config file 'config.json' is not a Python file"),
  ('noget.py', 'x = 1\n', "config file 'noget.py' defines no get_config() function"),
  ('broken.py', 'def get_config(:\n', "config file 'broken.py' fails to load: SyntaxError"),
]


@pytest.mark.parametrize('name,content,message', IMPORT_CONFIG_MISTAKES, ids=[m[0] for m in IMPORT_CONFIG_MISTAKES])
def test_conret_import_config_that_is_no_config_file_is_one_line(tmp_path, name, content, message):
  """--config naming a file that is not a Python config (a config.json) or has no get_config: the file named."""
  (tmp_path / name).write_text(content)
  args = ['--format=torchvision_resnet', '--input=r18.npz', '--output=new', f'--config={name}']
  proc = _run('conret-import', args, tmp_path, timeout=60)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith(f'conret-import: error: --config={name}: ') and proc.stderr.count('\n') == 1
  assert message in proc.stderr, proc.stderr
  assert os.listdir(tmp_path) == [name]


@pytest.mark.parametrize('case,args,message', IMPORT_MISTAKES, ids=[m[0] for m in IMPORT_MISTAKES])
def test_conret_import_mistakes_are_one_line_without_usage(tmp_path, case, args, message):
  """argparse's own errors too: one `conret-import: error:` line (no usage line above it), exit status 2."""
  args = [a.replace('HERE', str(tmp_path)) for a in args]
  if case != 'no format' and not any(a.startswith('--format') for a in args):
    args.insert(0, '--format=torchvision_resnet')
  proc = _run('conret-import', args, tmp_path, timeout=60)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith('conret-import: error: ') and proc.stderr.count('\n') == 1, proc.stderr
  assert message.replace('HERE', str(tmp_path)) in proc.stderr, proc.stderr
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('how', ['--debug', 'CONRET_DEBUG=1'])
def test_conret_import_debug_shows_the_traceback(tmp_path, how):
  """As for the absl tools: a user error's traceback with --debug or CONRET_DEBUG=1."""
  args = ['--format=torchvision_resnet', '--input=r18.npz', f'--output={tmp_path}']
  env = {'CONRET_DEBUG': '1'} if how.startswith('CONRET_DEBUG') else {}
  proc = _run('conret-import', [*args, how] if how == '--debug' else args, tmp_path, timeout=60, **env)
  assert proc.returncode != 0 and 'Traceback' in proc.stderr, proc.stderr
  assert proc.stderr.rstrip().splitlines()[-1].startswith('conret_jax.errors.WorkdirError: --output'), proc.stderr
  proc = _run('conret-import', [*args[1:], how] if how == '--debug' else args[1:], tmp_path, timeout=60, **env)
  assert 'Traceback' in proc.stderr and 'the following arguments are required: --format' in proc.stderr, proc.stderr
