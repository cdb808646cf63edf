"""glibc malloc settings the command-line tools apply to their own process when JAX runs on the CPU alone.

XLA:CPU allocates an executable's temporaries afresh on every run, hundreds of MB for a train step. glibc serves a
block that large with mmap (always, from a worker thread's arena) and hands it back to the kernel when it is freed,
so every step faults its temporaries in again, page by page, in kernel time (bench/RESULTS.md, "Host memory": a
sixth of the SSD demo's CPU time). One arena with mmap off and no trimming keeps freed blocks in the heap for the
next step instead:

  M_ARENA_MAX 1          worker threads allocate from the main arena, which can grow past 64 MB without mmap
  M_MMAP_MAX 0           no block is served by mmap
  M_TRIM_THRESHOLD -1    free memory at the heap's top is never returned to the kernel

The price is memory: the process keeps its peak. One arena also serializes the allocations of the process's threads,
so the settings apply only where the step is XLA:CPU's and no accelerator host's input pipeline can be slowed, that
is when all of these hold:
  - glibc's malloc (Linux), and no allocator of the user's: no MALLOC_* variable, no malloc tunable in
    GLIBC_TUNABLES, no LD_PRELOAD;
  - JAX has the CPU alone: JAX_PLATFORMS is 'cpu', or it is unset and no accelerator plugin or libtpu is installed;
  - CONRET_HOST_MALLOC is not '0' (the opt-out).
Call `apply` before JAX starts a backend: threads that have taken an arena keep it.
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import platform

OPT_OUT = 'CONRET_HOST_MALLOC'
# mallopt's parameter numbers (glibc malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
# The same settings for another process, as glibc reads them from its environment at start-up.
ENVIRONMENT = {'MALLOC_ARENA_MAX': '1', 'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': str(2**62)}


def accelerator_installed() -> bool:
  """Whether JAX could find a backend besides the CPU: a PJRT plugin (its entry points or `jax_plugins` package)
  or libtpu."""
  if any(True for _ in importlib.metadata.entry_points(group='jax_plugins')):
    return True
  return any(importlib.util.find_spec(name) is not None for name in ('jax_plugins', 'libtpu'))


def should_apply(environ, libc: str, accelerator: bool) -> bool:
  """The module docstring's conditions. libc: platform.libc_ver()[0]; accelerator: `accelerator_installed()`."""
  if environ.get(OPT_OUT, '') == '0' or libc != 'glibc':
    return False
  if any(k.startswith('MALLOC_') for k in environ) or 'glibc.malloc' in environ.get('GLIBC_TUNABLES', ''):
    return False
  if environ.get('LD_PRELOAD'):
    return False
  platforms = [p.strip() for p in environ.get('JAX_PLATFORMS', '').split(',') if p.strip()]
  return platforms == ['cpu'] if platforms else not accelerator


APPLIED = False  # whether this process applied SETTINGS (the tools log it)


def apply(environ=None) -> bool:
  """Sets SETTINGS with mallopt when `should_apply`; returns whether it did. Idempotent."""
  global APPLIED
  environ = os.environ if environ is None else environ
  if not should_apply(environ, platform.libc_ver()[0], accelerator_installed()):
    return False
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  APPLIED = all(mallopt(param, value) == 1 for param, value in SETTINGS)
  return APPLIED
