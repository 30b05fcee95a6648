"""How the benchmarks time things. Defines no flags.

  timeit(fn, *args)             wall seconds per call (median of iters)
  timeit_chained(fn, arg_sets)  seconds per call of calls chained in one jit
                                (dispatch excluded; for calls of microseconds)
  kernel_profile(fn, args)      per-kernel GPU time of a call (jax.profiler)
  kernel_seconds(fn, arg_sets)  GPU time per call summed over its kernels
  hbm_read_bandwidth, hbm_bandwidth   the HBM references of a run
  find_trace, summarize_trace   a perfetto trace -> kernel name, count, time
                                (CLI: experiments/trace_summary.py)

Every figure is taken after one untimed call (compilation, warm-up), with
`jax.block_until_ready` around each timed call.
"""

import collections
import glob
import gzip
import json
import os
import statistics
import tempfile
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


def hbm_bandwidth(n_elements: int = 2**30) -> dict:
  """HBM references, bytes/s, each the best of its timed calls: a device
  copy (both directions counted), and fp32 sums of bf16 data over the whole
  array ("read") and over rows of 8192 (XLA's row reduction); "bw" is the
  largest (the conservative denominator of "fraction of HBM")."""
  x = jnp.ones((n_elements,), jnp.bfloat16)
  refs = {"copy": 2 * x.nbytes / timeit(
      jax.jit(lambda a: a + jnp.bfloat16(1)), x, iters=10, reduce=min)}
  for name, shape, axis in (("read", (n_elements,), None),
                            ("read_rows", (n_elements // 8192, 8192), 1)):
    fn = jax.jit(lambda a, axis=axis: jnp.sum(a, axis=axis,
                                              dtype=jnp.float32))
    refs[name] = x.nbytes / timeit(fn, x.reshape(shape), iters=10,
                                   reduce=min)
  del x
  return {**refs, "bw": max(refs.values())}


def timeit_chained(fn, arg_sets, reps: int = 20, iters: int = 10) -> float:
  """Seconds per call with `reps` calls chained inside one jit.

  Host dispatch would otherwise dominate calls as short as a decode
  kernel's. The chain is unrolled (an XLA while loop costs a predicate round
  trip per iteration), cycles through `arg_sets` (distinct inputs, so that
  the working set exceeds the L2), and each call's first argument depends on
  the previous output so XLA cannot merge or drop calls.
  """
  def chained(sets):
    q = sets[0][0]
    for i in range(reps):
      _, *rest = sets[i % len(sets)]
      out = fn(q, *rest)
      q = q + (0 * out[..., :1]).astype(q.dtype)
    return q
  return timeit(jax.jit(chained), arg_sets, iters=iters) / reps


def kernel_profile(fn, args, calls: int = 3) -> tuple[list[dict], float]:
  """Per-kernel GPU time of `fn(*args)`: a jax.profiler trace of `calls`
  calls after a warm-up, summed by kernel name (us per call), largest
  first; and the GPU busy time per call (us). Empty off the GPU."""
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(fn(*args))
    with gzip.open(find_trace(tmp), "rt") as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  kernels = summarize_trace(events)["kernels"]
  per_call = [{"name": k["name"][:120], "count": k["count"] // calls,
               "us": k["total_us"] / calls} for k in kernels]
  return per_call, sum(k["us"] for k in per_call)


def kernel_seconds(fn, arg_sets, calls: int = 20) -> tuple[float, list]:
  """GPU time per call of `fn`, summed over its kernels (jax.profiler),
  over `calls` calls cycling through `arg_sets`; and the kernels."""
  jit_fn = jax.jit(fn)
  cycle = [arg_sets[i % len(arg_sets)] for i in range(calls)]

  def run_all(*_):
    return [jit_fn(*a) for a in cycle]
  kernels, busy_us = kernel_profile(run_all, (), calls=1)
  return busy_us * 1e-6 / calls, [
      {**k, "count": k["count"] / calls, "us": k["us"] / calls}
      for k in kernels]


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
