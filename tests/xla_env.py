"""The XLA settings of every JAX process the tests run: the pytest process (tests/conftest.py) and the tools and
jobs it starts as subprocesses.

The tests compile their XLA:CPU programs at backend optimization level 0. They check what our programs compute, not
how fast XLA's optimized code runs it, and compiling is most of the suite's time: the tiny train step of
tests/train/test_step.py compiled in 10.9 s at the default level and in 6.1 s at level 0, and the suite's pytest time
went from 9 min 7 s to 8 min 4 s (2-core AMD EPYC, cold compilation cache, 2026-11-25; runs vary by about 15%). Its
loss after 3 steps moved in the 7th digit (2.2650385 -> 2.2650387), far inside every tolerance here; the float32
noise the multi-host tolerances rest on was measured again at this level (tests/float_noise.py). Benchmarks and real
runs keep XLA's default level.
"""

import os

OPT_LEVEL = '--xla_backend_optimization_level=0'


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a process of `devices` fake CPU devices."""
  return f'--xla_force_host_platform_device_count={devices} {OPT_LEVEL}'


def cpu_env(devices: int, **extra: str) -> dict:
  """This process's environment for a JAX subprocess on `devices` fake CPU devices. The command-line tools' own XLA
  flags (conret_jax/cli/xla_flags.py) are turned off: every process of a test computes with XLA's defaults, like
  the pytest process, so that runs in and out of it compare within the noise measured in tests/float_noise.py."""
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': xla_flags(devices), 'CONRET_XLA_DEFAULTS': '0', **extra}
