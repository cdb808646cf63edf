"""XLA flags the command-line tools add to their own process's XLA_FLAGS, before JAX starts a backend.

  --xla_cpu_experimental_ynn_fusion_type=   XLA:CPU hands no fusion to YNNPACK (its own emitters and Eigen run
                                             them). In-process A/B on the 2-core AMD EPYC dev box, 2026-12-02, the
                                             same compiled step with and without it, alternating: the shapes demo's
                                             train step 0.588 -> 0.511 s, R50-FPN at 512^2 batch 2 3.63 -> 3.29 s
                                             and 3.43 -> 3.18 s (bench/RESULTS.md); the first step's loss equal to 6
                                             digits. It only concerns the CPU backend.

A flag is added only when XLA_FLAGS does not set it already (the user's value wins), when CONRET_XLA_DEFAULTS is
not '0' (the tests set that, so that every process they start keeps XLA's own defaults, as the pytest process
does), and when the installed jaxlib is one these flags were measured with (0.10 or newer): XLA aborts a process
whose XLA_FLAGS name a flag it does not know.
"""

import importlib.metadata
import os
import re

CPU_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=',)
MIN_JAXLIB = (0, 10)
OPT_OUT = 'CONRET_XLA_DEFAULTS'


def _version(text: str) -> tuple[int, ...]:
  return tuple(int(p) for p in re.findall(r'\d+', text)[:2])


def flags_to_add(environ, jaxlib_version: str) -> list[str]:
  """The flags of CPU_FLAGS that `environ`'s XLA_FLAGS lacks, or [] when opted out or on an older jaxlib."""
  if environ.get(OPT_OUT, '') == '0' or _version(jaxlib_version) < MIN_JAXLIB:
    return []
  present = environ.get('XLA_FLAGS', '')
  return [flag for flag in CPU_FLAGS if flag.split('=')[0] + '=' not in present]


def apply(environ=None) -> list[str]:
  """Adds `flags_to_add` to XLA_FLAGS in `environ` (default: this process's environment); returns what it added.
  Call before JAX's first backend use: XLA reads the flags once."""
  environ = os.environ if environ is None else environ
  try:
    jaxlib = importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return []
  added = flags_to_add(environ, jaxlib)
  if added:
    environ['XLA_FLAGS'] = ' '.join([environ.get('XLA_FLAGS', ''), *added]).strip()
  return added
