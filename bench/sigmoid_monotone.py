"""Checks that float32 jax.nn.sigmoid is monotone non-decreasing over every float32 input, on the default backend.

  python bench/sigmoid_monotone.py [--chunk_log2 26]

core.nms.select_candidates ranks anchors by sigmoid(max logit) and relies on that being the anchor's best score,
which needs sigmoid(x) <= sigmoid(y) whenever x <= y in float32. Mathematically true, but the float32 sigmoid is
1 / (1 + exp(-x)) with a backend's exp, so it is checked here for every non-NaN input (about 4.3e9), in
chunks of 2**chunk_log2 consecutive bit patterns: +0 to +inf ascending and -0 to -inf descending (each chunk
overlaps the next by one value), plus sigmoid(-0) == sigmoid(+0). About a minute on 2 CPU cores.
Prints one JSON line: the backend, the number of inputs checked and of decreasing steps found (0 = monotone).
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp

POS_INF = 0x7F800000
SIGN = 0x80000000


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--chunk_log2', type=int, default=26)
  args = p.parse_args()
  size = 1 << args.chunk_log2

  @jax.jit
  def violations(start, sign):
    """Decreasing steps of sigmoid along |x| = bits start .. start + size (ascending x for sign 0)."""
    bits = start + jnp.arange(size + 1, dtype=jnp.uint32)
    inside = bits <= POS_INF  # also false where the addition ran past the sign bit
    x = jax.lax.bitcast_convert_type(bits | sign, jnp.float32)
    y = jax.nn.sigmoid(x)
    step = jnp.where(sign == 0, y[1:] - y[:-1], y[:-1] - y[1:])  # as x increases
    return jnp.sum((step < 0) & inside[1:] & inside[:-1])

  t = time.perf_counter()
  bad = checked = 0
  for sign in (0, SIGN):
    for start in range(0, POS_INF + 1, size):
      bad += int(violations(jnp.uint32(start), jnp.uint32(sign)))
      checked += min(size, POS_INF + 1 - start)
  zero = jax.nn.sigmoid(jnp.array([-0.0, 0.0], jnp.float32))
  bad += int(zero[0] != zero[1])
  print(
    json.dumps(
      dict(
        bench='sigmoid_monotone',
        backend=jax.default_backend(),
        jax=jax.__version__,
        device=str(jax.devices()[0].device_kind),
        inputs_checked=checked,
        decreasing_steps=bad,
        seconds=round(time.perf_counter() - t, 1),
      )
    )
  )


if __name__ == '__main__':
  main()
