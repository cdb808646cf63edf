"""The XLA flags the command-line tools add to their own process (conret_jax/cli/xla_flags.py)."""

import subprocess
import sys

from conret_jax.cli import xla_flags

YNN_OFF = '--xla_cpu_experimental_ynn_fusion_type='


def test_added_unless_set_opted_out_or_unknown_to_jaxlib():
  assert xla_flags.flags_to_add({}, '0.10.2') == [YNN_OFF]
  assert xla_flags.flags_to_add({'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}, '0.11.2') == [YNN_OFF]
  # The user's own value of the flag wins, whatever it is.
  assert xla_flags.flags_to_add({'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=dot'}, '0.10.2') == []
  assert xla_flags.flags_to_add({'CONRET_XLA_DEFAULTS': '0'}, '0.10.2') == []
  assert xla_flags.flags_to_add({}, '0.9.1') == []  # XLA would abort on a flag it does not know
  assert xla_flags.flags_to_add({}, '0.6.0') == []


def test_apply_appends_to_the_users_flags():
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  added = xla_flags.apply(env)
  assert added == [YNN_OFF]  # this environment's jaxlib is >= 0.10 (pyproject's test install)
  assert env['XLA_FLAGS'] == f'--xla_force_host_platform_device_count=2 {YNN_OFF}'
  assert xla_flags.apply(env) == [] and env['XLA_FLAGS'].count(YNN_OFF) == 1  # idempotent


def test_a_process_with_the_flag_starts_and_trains_a_step():
  """XLA accepts the flag: a fresh process with it computes a gradient on the CPU backend."""
  code = (
    'from conret_jax.cli import xla_flags; import os; xla_flags.apply(); import jax, jax.numpy as jnp; '
    "print(os.environ['XLA_FLAGS'], float(jax.grad(lambda w: jnp.sum(jnp.tanh(w @ w)))(jnp.eye(4))[0, 0]))"
  )
  env = {'PATH': '/usr/bin:/bin', 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  flags, value = proc.stdout.split()[-2:]
  assert flags == YNN_OFF and abs(float(value) - 0.83994) < 1e-4, proc.stdout
