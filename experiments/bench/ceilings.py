"""The transfer ceilings every decode figure is compared against.

  measure_ceilings  HBM read bandwidth and bulk pinned-host -> device
                    bandwidth of this machine, bytes/s
  measure_gather    the offload fetch alone: the zero-copy Pallas copy
                    kernel over a sweep of its grid, and XLA's per-block
                    copy loop, on scattered K+V tiles of a pinned store;
                    bytes/s and the ratio to the bulk bandwidth
  gemm_chain        decode-like GEMMs (M = batch rows, streaming weights):
                    the compute the probes try to overlap transfers with
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import timing
from nosa_jax import implementations


def gemm_chain(x_BM, w_up_LMF, w_down_LFM):
  """x -> silu(x @ W_up) @ W_down, once per layer (a lax.scan)."""
  def layer(x, w):
    h = jax.nn.silu(x @ w[0])
    return (h @ w[1]).astype(x.dtype), None
  return jax.lax.scan(layer, x_BM, (w_up_LMF, w_down_LFM))[0]


def _best_of_5(fn, *args):
  return timing.timeit(fn, *args, iters=5, reduce=min)


def measure_ceilings(small: bool) -> dict:
  """HBM read and bulk pinned -> device bandwidth (2 GiB; 2 MiB if small)."""
  n = (1 << 20) if small else (1 << 30)  # bf16 elements
  hbm = timing.hbm_read_bandwidth(n)
  h = jax.device_put(jnp.ones((n // 2,), jnp.bfloat16), jax.memory.Space.Host)
  bulk = n / _best_of_5(lambda a: jax.device_put(a, jax.memory.Space.Device),
                        h)
  del h
  return {"hbm_bytes_per_s": hbm, "pcie_bulk_bytes_per_s": bulk,
          "pcie_bulk_bytes": n}


def measure_gather(small: bool, bulk: float) -> list[dict]:
  """Scattered K+V tiles of 16 KiB (64 tokens x 128 x bf16) from a 2 x
  1 GiB pinned store into the device, 2 x 64 MiB per call (tiny if small)."""
  c, d = (16, 32) if small else (64, 128)
  rows = 512 if small else 65536
  f = 64 if small else 4096  # tiles per K and V
  rng = np.random.default_rng(0)
  host = tuple(jax.device_put(jnp.zeros((rows, c, d), jnp.bfloat16),
                              jax.memory.Space.Host) for _ in range(2))
  dst = tuple(jnp.zeros((f, c, d), jnp.bfloat16) for _ in range(2))
  src_rows = jnp.asarray(rng.choice(rows, f, replace=False), jnp.int32)
  dst_rows = jnp.arange(f, dtype=jnp.int32)

  def row(method, programs, warps, nbytes, t):
    return {"method": method, "programs": programs, "num_warps": warps,
            "bytes": nbytes, "seconds": t, "bytes_per_s": nbytes / t,
            "over_bulk": nbytes / t / bulk}

  out = []
  sweep = ([(4, 4)] if small else
           [(p, w) for p in (66, 264, 528, 1056) for w in (4, 8)])
  for programs, warps in sweep:
    gather = implementations.kernel("block_fetch", "pallas",
                                    programs=programs, num_warps=warps)
    fn = jax.jit(lambda h, d_, gather=gather: gather(
        h, d_, src_rows, dst_rows, jnp.int32(f)))
    out.append(row("pallas_gather", programs, warps, 2 * f * c * d * 2,
                   _best_of_5(fn, host, dst)))
  # XLA's copies, as HostStore(fetch="loop"), on a shorter list (slow).
  fl = min(f, 512)

  def loop(h, d_):
    def body(i, carry):
      return tuple(jax.lax.dynamic_update_slice(
          dd, jax.device_put(jax.lax.dynamic_slice(
              hh, (src_rows[i], 0, 0), (1, c, d)), jax.memory.Space.Device),
          (i, 0, 0)) for hh, dd in zip(h, carry, strict=True))
    return jax.lax.fori_loop(0, fl, body, d_)

  out.append(row("xla_copy_loop", 0, 0, 2 * fl * c * d * 2,
                 _best_of_5(jax.jit(loop), host, dst)))
  return out
