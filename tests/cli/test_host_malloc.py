"""The malloc settings the command-line tools apply on a CPU-only JAX (conret_jax/cli/host_malloc.py)."""

import json
import platform
import subprocess
import sys

import pytest

from conret_jax.cli import host_malloc


def test_applied_only_on_glibc_cpu_only_and_without_the_users_allocator():
  assert host_malloc.should_apply({}, 'glibc', accelerator=False)
  assert host_malloc.should_apply({'JAX_PLATFORMS': 'cpu'}, 'glibc', accelerator=True)  # asked for the CPU alone
  assert not host_malloc.should_apply({}, 'glibc', accelerator=True)  # a GPU or TPU host keeps glibc's arenas
  assert not host_malloc.should_apply({'JAX_PLATFORMS': 'cuda,cpu'}, 'glibc', accelerator=True)
  assert not host_malloc.should_apply({'JAX_PLATFORMS': 'tpu'}, 'glibc', accelerator=False)
  assert not host_malloc.should_apply({}, '', accelerator=False)  # musl, macOS: no glibc mallopt
  assert not host_malloc.should_apply({'CONRET_HOST_MALLOC': '0'}, 'glibc', accelerator=False)
  assert host_malloc.should_apply({'CONRET_HOST_MALLOC': '1'}, 'glibc', accelerator=False)
  # The user's own allocator settings win, whatever they are.
  assert not host_malloc.should_apply({'MALLOC_ARENA_MAX': '4'}, 'glibc', accelerator=False)
  assert not host_malloc.should_apply({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}, 'glibc', accelerator=False)
  assert not host_malloc.should_apply({'LD_PRELOAD': 'libjemalloc.so.2'}, 'glibc', accelerator=False)
  assert host_malloc.should_apply({'GLIBC_TUNABLES': 'glibc.pthread.rseq=0'}, 'glibc', accelerator=False)


# A fresh process (host_malloc applied or not, as its environment says) mallocs, touches and frees 256 MiB twice
# in a worker thread, as XLA:CPU does with a step's temporaries, and reports the minor page faults of the second
# round: with the settings the block comes back from the heap already faulted in.
_CHILD = """
import ctypes, json, resource, threading
from conret_jax.cli import host_malloc
applied = host_malloc.apply()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size, faults = 256 << 20, []
def rounds():
  for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
worker = threading.Thread(target=rounds)
worker.start(); worker.join()
print(json.dumps({'applied': applied, 'faults': faults}))
"""


def _second_round_faults(extra_env):
  env = {'PATH': '/usr/bin:/bin', 'JAX_PLATFORMS': 'cpu', **extra_env}
  proc = subprocess.run([sys.executable, '-c', _CHILD], capture_output=True, text=True, timeout=120, env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(proc.stdout.splitlines()[-1])
  return report['applied'], report['faults'][1]


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc malloc only')
def test_a_freed_block_is_reused_without_faulting_it_in_again():
  applied, kept = _second_round_faults({})
  assert applied
  not_applied, default = _second_round_faults({'CONRET_HOST_MALLOC': '0'})
  assert not not_applied
  pages = (256 << 20) // 4096
  assert kept < pages // 100, kept  # the heap kept the block: at most a few pages faulted
  assert default > kept, (default, kept)  # glibc's default maps a fresh block (4 KiB or 2 MiB pages)
