"""launch/local_multiprocess.py: a real 2-process JAX job on CPU, failure propagation, signal forwarding."""

import importlib.util
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

LAUNCHER = pathlib.Path(__file__).resolve().parents[2] / 'launch' / 'local_multiprocess.py'
HANG_GUARD_S = 120  # only so that a broken launcher fails the test instead of hanging it


def _load_launcher():
  spec = importlib.util.spec_from_file_location('local_multiprocess', LAUNCHER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _launch(tmp_path, script, num_processes=2, devices=2, extra=()):
  program = tmp_path / 'program.py'
  program.write_text(textwrap.dedent(script))
  return subprocess.run(
    [
      sys.executable,
      str(LAUNCHER),
      f'--num_processes={num_processes}',
      f'--devices_per_process={devices}',
      *extra,
      '--',
      sys.executable,
      str(program),
    ],
    capture_output=True,
    text=True,
    timeout=HANG_GUARD_S,
    cwd=tmp_path,
  )


def test_child_env_replaces_device_count_and_sets_layout():
  lm = _load_launcher()
  base = {'XLA_FLAGS': '--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8', 'HOME': '/h'}
  env = lm.child_env(base, 1, 3, 2, '127.0.0.1:999')
  assert env['XLA_FLAGS'].split() == ['--xla_dump_to=/tmp/d', '--xla_force_host_platform_device_count=2']
  assert (
    env['JAX_PLATFORMS'],
    env['CONRET_COORDINATOR'],
    env['CONRET_NUM_PROCESSES'],
    env['CONRET_PROCESS_ID'],
    env['HOME'],
  ) == ('cpu', '127.0.0.1:999', '3', '1', '/h')
  assert lm.child_env({}, 0, 1, 4, 'h:1')['XLA_FLAGS'] == '--xla_force_host_platform_device_count=4'
  # Process 0 alone writes JAX's persistent cache: a warm cache would let it skip a compile that process 1 still
  # runs, past gloo's 30 s rendezvous.
  assert env['JAX_ENABLE_COMPILATION_CACHE'] == 'false'
  assert base['XLA_FLAGS'].endswith('=8')  # the launcher's own environment is left alone


GLOBAL_SUM = """
import numpy as np
from conret_jax import distributed
plan = distributed.initialize()
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((4,), ('data',))
# Process i holds rows 4i..4i+3 of an [8, 5] array; the global array is sharded over all 4 devices.
i = jax.process_index()
local = np.arange(20, dtype=np.float32).reshape(4, 5) + 20 * i
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P('data')), local)
total = jax.jit(lambda a: jnp.sum(a * a - a), out_shardings=NamedSharding(mesh, P()))(x)
print(f'mode={plan.mode} processes={jax.process_count()} devices={jax.device_count()} '
      f'local_devices={jax.local_device_count()} shape={x.shape} sum={float(total)}')
"""


def test_two_processes_compute_one_global_sum(tmp_path):
  result = _launch(tmp_path, GLOBAL_SUM)
  assert result.returncode == 0, result.stdout + result.stderr
  full = np.arange(40, dtype=np.float64).reshape(8, 5)
  expected = float(np.sum(full * full - full))
  lines = [line for line in result.stdout.splitlines() if line.strip()]
  assert all(line.startswith(('[p0] ', '[p1] ')) for line in lines), lines
  for p in (0, 1):
    mine = [line for line in lines if line.startswith(f'[p{p}] mode=')]
    assert mine == [f'[p{p}] mode=explicit processes=2 devices=4 local_devices=2 shape=(8, 5) sum={expected}']


FAIL_ONE = """
import os, signal, sys, time
pid = int(os.environ['CONRET_PROCESS_ID'])
if os.environ.get('IGNORE_TERM') == '1':
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
  signal.signal(signal.SIGTERM, lambda *a: (print('got SIGTERM', flush=True), sys.exit(0)))
with open(f'pid{pid}', 'w') as f:
  f.write(str(os.getpid()))
print('ready', flush=True)
if pid == 0:
  while not os.path.exists('pid1'):
    time.sleep(0.05)
  sys.exit(3)
time.sleep(600)
"""


def _gone(pid_file):
  pid = int(pid_file.read_text())
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  return False


def test_one_failure_stops_the_others_and_fails_the_launch(tmp_path):
  result = _launch(tmp_path, FAIL_ONE, devices=1)
  assert result.returncode == 3, result.stdout + result.stderr
  assert '[p1] got SIGTERM' in result.stdout.splitlines()
  assert 'p0 exited with 3' in result.stderr
  assert _gone(tmp_path / 'pid1')


def test_sigterm_ignored_escalates_to_sigkill(tmp_path, monkeypatch):
  monkeypatch.setenv('IGNORE_TERM', '1')
  result = _launch(tmp_path, FAIL_ONE, devices=1, extra=['--grace_period=0.5'])
  assert result.returncode == 3, result.stdout + result.stderr
  assert 'SIGKILL' in result.stderr
  assert _gone(tmp_path / 'pid1')


FORWARD = """
import os, signal, sys, time
def stop(signum, frame):
  print('got', signal.Signals(signum).name, flush=True)
  sys.exit(0)
signal.signal(signal.SIGINT, stop)
open('ready%s' % os.environ['CONRET_PROCESS_ID'], 'w').close()
time.sleep(600)
"""


def test_sigint_is_forwarded_to_all_processes(tmp_path):
  (tmp_path / 'program.py').write_text(FORWARD)
  proc = subprocess.Popen(
    [sys.executable, str(LAUNCHER), '--num_processes=2', '--devices_per_process=1', '--', sys.executable, 'program.py'],
    cwd=tmp_path,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.monotonic() + HANG_GUARD_S
  while not all((tmp_path / f'ready{i}').exists() for i in (0, 1)) and time.monotonic() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=HANG_GUARD_S)
  assert proc.returncode == 128 + signal.SIGINT, out + err
  assert sorted(out.splitlines()) == ['[p0] got SIGINT', '[p1] got SIGINT']


def test_usage_errors():
  for args in ([], ['--num_processes=2'], ['--num_processes=0', '--', 'true']):
    result = subprocess.run(
      [sys.executable, str(LAUNCHER), *args], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert result.returncode != 0
