r"""Do copy-engine copies of scattered KV blocks overlap decode GEMMs? (probe)

  python -m experiments.dma_probe --out_dir=/tmp/dma   # GPU
  (off the GPU, or without a CUDA runtime, it writes why it skipped, exit 0)

The offload-overlap issue's transfer candidates, measured before anything is
built on them (experiments/results/decode/NOTES.md has the readings):

  dma_loop    one cudaMemcpyAsync per block on a stream of our own
              (experiments/bench/cuda_dma.py), pinned host -> device
  dma_batch   the same blocks in one cudaMemcpyBatchAsync (CUDA >= 12.8)
  xla_static  inside one jit: a static list of dynamic_slice + device_put
              per block from a pinned_host array (XLA's async host copies)
  ffi_loop    inside one jit: nosa_jax.inference.copy_engine's issue (the
  ffi_batch   plan read back, copies on its own stream: a cudaMemcpyAsync
              loop or one cudaMemcpyBatchAsync), the GEMM chain, then wait
              (the compute stream waits for the copies' event); ffi_empty is
              the same with every row skipped (the issue's host round trip
              alone)

For each block size (--block_kib: 16 KiB is one K or V tile of one block
and KV head; 64 KiB all of a block's K and V for 2 KV heads): GB/s of
--total_mib scattered blocks, the host time to issue them, and then, at the
largest block size, overlap with a decode-like GEMM chain
(`ceilings.gemm_chain`): (t_gemm + t_copy - t_both) / min(t_gemm, t_copy),
0 = serial, 1 = the shorter fully hidden. The DMA source is a JAX
pinned_host array when XLA gives its address, else cudaHostAlloc memory;
the destination is a device array XLA allocated. The copied bytes are
checked against the source.
"""

from __future__ import annotations

import functools
import statistics
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import cli
from experiments.bench import ceilings
from experiments.bench import cuda_dma
from experiments.bench import harness
from experiments.bench import timing
from nosa_jax.inference import copy_engine

_OUT = flags.DEFINE_string("out_dir", "/tmp/dma_probe", "Output dir.")
_BLOCKS = flags.DEFINE_list("block_kib", ["16", "64", "256", "1024"],
                            "Block sizes, KiB.")
_TOTAL = flags.DEFINE_integer("total_mib", 64, "Bytes copied per call, MiB.")
_STORE = flags.DEFINE_integer("store_mib", 2048, "Pinned store size, MiB.")
_XLA_BLOCKS = flags.DEFINE_integer("xla_blocks", 256,
                                   "Blocks of the xla_static copy.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed calls per figure.")


def _median_s(fn, iters):
  fn()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _source(dma, nbytes, rng):
  """(address, numpy view of the bytes, kind, keepalive) of the store."""
  data = rng.integers(0, 255, nbytes, dtype=np.uint8)
  try:
    arr = jax.device_put(data, jax.memory.Space.Host)
    arr.block_until_ready()
    return arr.unsafe_buffer_pointer(), data, "jax_pinned_host", arr
  except Exception as e:  # pylint: disable=broad-except
    print(f"no address of a JAX pinned_host array ({type(e).__name__}: "
          f"{str(e)[:200]}); using cudaHostAlloc", flush=True)
  ptr = dma.host_alloc(nbytes)
  ctypes_view = np.ctypeslib.as_array(
      (np.ctypeslib.ctypes.c_uint8 * nbytes).from_address(ptr))
  ctypes_view[:] = data
  return ptr, data, "cudaHostAlloc", None


def _gemm():
  key = jax.random.key(0)
  w_up = jax.random.normal(key, (16, 4096, 14336), jnp.bfloat16) * 0.02
  w_down = jax.random.normal(key, (16, 14336, 4096), jnp.bfloat16) * 0.02
  return jax.jit(ceilings.gemm_chain), (jnp.ones((16, 4096), jnp.bfloat16),
                                        w_up, w_down)


def _xla_static(host_RX, rows):
  """One jit: a static list of per-block host -> device copies."""
  return jnp.stack([jax.device_put(jax.lax.dynamic_index_in_dim(
      host_RX, r, keepdims=False), jax.memory.Space.Device) for r in rows])


def run(res: dict) -> None:
  lib = cuda_dma.load()
  if jax.default_backend() != "gpu" or lib is None:
    res["skipped"] = (f"needs a GPU and the CUDA runtime (backend "
                      f"{jax.default_backend()!r}, libcudart "
                      f"{'found' if lib else 'not found'})")
    return
  dma = cuda_dma.Dma(lib)
  res["cuda"] = dma.versions()
  rng = np.random.default_rng(0)
  store = _STORE.value << 20
  total = _TOTAL.value << 20
  src, data, kind, keep = _source(dma, store, rng)
  res["source"] = kind
  dst = jnp.zeros((total,), jnp.uint8)
  dst_ptr = dst.unsafe_buffer_pointer()
  gemm, gemm_args = _gemm()
  t_gemm = timing.timeit(gemm, *gemm_args, iters=_ITERS.value)
  res["gemm_ms"] = 1e3 * t_gemm
  for kib in (int(k) for k in _BLOCKS.value):
    size = kib << 10
    n = total // size
    rows = rng.choice(store // size, n, replace=False)
    srcs = [src + int(r) * size for r in rows]
    dsts = [dst_ptr + i * size for i in range(n)]
    modes = ["dma_loop"] + (["dma_batch"] if dma.has_batch else [])
    for mode in modes:
      def copy(mode=mode, srcs=srcs, dsts=dsts, size=size, n=n):
        dma.copy(dsts, srcs, [size] * n, batch=mode == "dma_batch")
        dma.synchronize()
      row = {"mode": mode, "block_kib": kib, "blocks": n, "bytes": n * size}
      try:
        t = _median_s(copy, _ITERS.value)
        t0 = time.perf_counter()
        dma.copy(dsts, srcs, [size] * n, batch=mode == "dma_batch")
        row["issue_ms"] = 1e3 * (time.perf_counter() - t0)
        dma.synchronize()
        got = np.asarray(dst[: 2 * size])
        want = np.concatenate([data[int(r) * size:(int(r) + 1) * size]
                               for r in rows[:2]])
        row.update(ms=1e3 * t, gb_s=n * size / t / 1e9,
                   bytes_correct=bool(np.array_equal(got, want)))

        def both(copy=copy):
          out = gemm(*gemm_args)  # dispatched, runs while we copy
          copy()
          out.block_until_ready()
        t_both = _median_s(both, _ITERS.value)
        row.update(gemm_ms=1e3 * t_gemm, both_ms=1e3 * t_both,
                   overlap=(t_gemm + t - t_both) / min(t_gemm, t))
      except Exception as e:  # pylint: disable=broad-except
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print(row, flush=True)
      res["rows"].append(row)
  # XLA's own host copies, a static list in one jit, alone and beside the
  # GEMMs in the same jit.
  size = int(_BLOCKS.value[1]) << 10
  host_RX = jax.device_put(jnp.asarray(data[: (store // size) * size]).view(
      jnp.bfloat16).reshape(store // size, size // 2), jax.memory.Space.Host)
  rows = [int(r) for r in rng.choice(store // size, _XLA_BLOCKS.value,
                                     replace=False)]
  row = {"mode": "xla_static", "block_kib": size >> 10, "blocks": len(rows),
         "bytes": len(rows) * size}
  try:
    alone = jax.jit(lambda h: _xla_static(h, rows))
    t = timing.timeit(alone, host_RX, iters=_ITERS.value)
    fused = jax.jit(lambda h, *g: (_xla_static(h, rows), gemm(*g)))
    t_both = timing.timeit(fused, host_RX, *gemm_args, iters=_ITERS.value)
    row.update(ms=1e3 * t, gb_s=row["bytes"] / t / 1e9, gemm_ms=1e3 * t_gemm,
               both_ms=1e3 * t_both,
               overlap=(t_gemm + t - t_both) / min(t_gemm, t))
  except Exception as e:  # pylint: disable=broad-except
    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
  print(row, flush=True)
  res["rows"].append(row)
  for kib in (int(k) for k in _BLOCKS.value[:2]):
    for mode in ("ffi_loop", "ffi_batch", "ffi_empty"):
      row = {"mode": mode, "block_kib": kib}
      try:
        row.update(_ffi_row(mode, kib << 10, src, data, store, total, rng,
                            gemm, gemm_args, t_gemm))
      except Exception as e:  # pylint: disable=broad-except
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print(row, flush=True)
      res["rows"].append(row)
  del keep


def _ffi_row(mode, size, src, data, store, total, rng, gemm, gemm_args,
             t_gemm):
  """One jit: issue (copy-engine extension), the GEMM chain, wait."""
  engine, why = copy_engine.load(batch=mode == "ffi_batch")
  if engine is None:
    raise RuntimeError(why)
  n = total // size
  src_rows = rng.choice(store // size, n, replace=False).astype(np.int32)
  dst_rows = rng.permutation(n).astype(np.int32)
  if mode == "ffi_empty":
    src_rows[:] = -1
  plan = jnp.asarray(np.stack([src_rows, dst_rows], 1))
  dst = jnp.zeros((n * size,), jnp.uint8)
  issue = functools.partial(engine.issue, src_address=src, row_bytes=size)

  def copies(d, p):
    return engine.wait(issue(d, p))

  def both(d, p, *g):
    d = issue(d, p)
    d, x = jax.lax.optimization_barrier((d, g[0]))
    y = gemm(x, *g[1:])  # enqueued after the issue, before the wait
    d, y = jax.lax.optimization_barrier((d, y))
    return engine.wait(d), y

  copies, both = jax.jit(copies), jax.jit(both)
  out = np.asarray(copies(dst, plan)).reshape(n, size)
  engine.counters(reset=True)
  t = timing.timeit(copies, dst, plan, iters=_ITERS.value)
  t_both = timing.timeit(both, dst, plan, *gemm_args, iters=_ITERS.value)
  counts = engine.counters(reset=True)
  got, _ = both(dst, plan, *gemm_args)
  got = np.asarray(got).reshape(n, size)
  row = {"blocks": n, "bytes": 0 if mode == "ffi_empty" else n * size,
         "ms": 1e3 * t, "gemm_ms": 1e3 * t_gemm, "both_ms": 1e3 * t_both,
         "copies_per_call": counts["copies"] / max(counts["calls"], 1)}
  if mode == "ffi_empty":
    row["bytes_correct"] = bool((out == 0).all() and (got == 0).all())
    return row
  want = data.reshape(-1, size)[src_rows[:4]]
  row.update(gb_s=n * size / t / 1e9,
             overlap=(t_gemm + t - t_both) / min(t_gemm, t),
             bytes_correct=bool(np.array_equal(out[dst_rows[:4]], want)
                                and np.array_equal(got[dst_rows[:4]], want)))
  return row


def table(res: dict) -> str:
  meta = res["meta"]
  lines = [f"`{meta['command']}` on {meta['device']}, {meta['date']}, "
           f"commit {meta['commit']}", ""]
  if "skipped" in res:
    return "\n".join(lines + [f"Skipped: {res['skipped']}"]) + "\n"
  lines += [f"CUDA {res['cuda']}; source {res['source']}; GEMM chain alone "
            f"{res['gemm_ms']:.2f} ms.", "",
            "| mode | block KiB | blocks | ms | GB/s | issue ms | both ms "
            "| overlap | bytes ok |", "|---|---|---|---|---|---|---|---|---|"]
  f = lambda r, k, p=".2f": format(r[k], p) if k in r else "-"
  for r in res["rows"]:
    lines.append(
        f"| {r['mode']} | {r['block_kib']} | {r.get('blocks', '-')} "
        f"| {f(r, 'ms')} "
        f"| {f(r, 'gb_s', '.1f')} | {f(r, 'issue_ms')} | {f(r, 'both_ms')} "
        f"| {f(r, 'overlap')} | {r.get('bytes_correct', '-')} |"
        + (f" error: {r['error'][:100]}" if "error" in r else ""))
  return "\n".join(lines) + "\n"


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  res = {"meta": harness.stamp("dma_probe"), "rows": []}
  run(res)
  harness.write_results(_OUT.value, "dma_probe", res, table(res))
  print(table(res))


if __name__ == "__main__":
  cli.run(main, "dma_probe")
