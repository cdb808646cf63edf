"""Test-wide setup: 8 fake CPU devices for the sharding tests, quiet TensorFlow, TF kept off accelerators."""

import os

# Must happen before jax is imported anywhere in the test process.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')  # tests run on CPU; keeps TF/JAX off any local GPU
