"""Wall-clock timing shared by the benchmark entry points, and the summary of
a `jax.profiler` trace (`find_trace`, `summarize_trace`; CLI:
experiments/trace_summary.py). Defines no flags.

Every figure is taken after one untimed call (compilation, warm-up), with
`jax.block_until_ready` around each timed call.
"""

import collections
import glob
import os
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


def hbm_read_bandwidth(n_elements: int = 2**30) -> float:
  """Bytes/s of an fp32-accumulated sum of a bf16 array (read only; best of
  5)."""
  x = jnp.ones((n_elements,), jnp.bfloat16)
  read = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  return x.nbytes / timeit(read, x, iters=5, reduce=min)


def find_trace(trace_dir: str) -> str:
  """The newest perfetto_trace.json.gz under trace_dir."""
  paths = sorted(glob.glob(os.path.join(trace_dir, "**",
                                        "perfetto_trace.json.gz"),
                           recursive=True))
  if not paths:
    raise FileNotFoundError(
        f"no perfetto_trace.json.gz under {trace_dir!r}: trace with "
        "jax.profiler.trace(..., create_perfetto_trace=True)")
  return paths[-1]


def summarize_trace(events: list[dict]) -> dict:
  """Kernel name -> (count, total us) over events on GPU device tracks."""
  names = {e["pid"]: e.get("args", {}).get("name", "")
           for e in events if e.get("ph") == "M"
           and e.get("name") == "process_name"}
  gpu_pids = {p for p, n in names.items() if "/device:GPU" in n}
  count, total = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in gpu_pids:
      count[e["name"]] += 1
      total[e["name"]] += float(e.get("dur", 0.0))
  return {"tracks": sorted(names[p] for p in gpu_pids),
          "kernels": [{"name": n, "count": count[n], "total_us": t}
                      for n, t in total.most_common()]}
