"""Test-wide setup: 8 fake CPU devices for the sharding tests, quiet TensorFlow, TF kept off accelerators."""

import os

# Must happen before jax is imported anywhere in the test process.
import xla_env  # noqa: E402  (tests/ is on sys.path: this conftest's folder)

os.environ.setdefault('XLA_FLAGS', xla_env.xla_flags(8))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # tests run on CPU; keeps TF/JAX off any local GPU
# One persistent compilation cache for the whole run, shared with the subprocesses the CLI and multi-host tests
# start: their runs compile the same programs (a resumed run, a second topology), so later ones load them.
import tempfile  # noqa: E402

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'conret_jax_test_xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

# Property tests draw the same examples on every run and machine: CI must not pass or fail by the draw.
from hypothesis import settings  # noqa: E402

settings.register_profile('deterministic', derandomize=True, deadline=None, database=None)
settings.load_profile('deterministic')
