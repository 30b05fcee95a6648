"""Wall-clock timing shared by the benchmark entry points (defines no flags).

Every figure is taken after one untimed call (compilation, warm-up), with
`jax.block_until_ready` around each timed call.
"""

import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp


def timeit(fn, *args, iters: int = 10,
           reduce: Callable = statistics.median) -> float:
  """Seconds per call: `reduce` (median, or min) over `iters` timed calls."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return reduce(times)


def hbm_copy_bandwidth(n_elements: int = 2**31) -> float:
  """Bytes/s of a bf16 device-to-device copy (read + write counted)."""
  x = jnp.ones((n_elements,), jnp.bfloat16)
  copy = jax.jit(lambda a: a + jnp.bfloat16(1))
  return 2 * x.nbytes / timeit(copy, x)


def hbm_read_bandwidth(n_elements: int = 2**30) -> float:
  """Bytes/s of an fp32-accumulated sum of a bf16 array (read only; best of
  5)."""
  x = jnp.ones((n_elements,), jnp.bfloat16)
  read = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  return x.nbytes / timeit(read, x, iters=5, reduce=min)
