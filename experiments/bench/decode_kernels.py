"""The split-K decode kernels against the HBM bandwidth of the same run.

Parts of `experiments.kernel_bench`:
  decode        each of `DECODE_KERNELS` at each batch, budget 4096 tokens
                (64 slots of 64): achieved bandwidth on the bytes it must
                read over the HBM references (`timing.hbm_bandwidth`), timed
                two ways (calls chained in one jit: dispatch excluded,
                launch gaps included; and the GPU time of its kernels in a
                profiler trace), its largest difference from the xla path
                and its speed relative to Pallas. A kernel that fails (no
                jax-triton) is a row with an error.
  decode_sweep  the Pallas kernel over split counts, warps and stages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments.bench import timing
from nosa_jax import sparse_attention

SLOT = 64  # tokens per cache slot

# (SparseConfig.decode_implementation, kernel options), timed in one run:
# Pallas, then jax-triton pipelined (cp.async K/V copies, as the Pallas
# kernel), unpipelined with plain loads (the baseline of the load options),
# and with each load option (unpipelined: Triton's pipelining drops them).
DECODE_KERNELS = (
    ("pallas", {}),
    ("triton", {}),
    ("triton", {"num_stages": 3}),  # as the Pallas default since s8
    ("triton", {"num_stages": 1}),
    ("triton", {"cache_modifier": ".ca"}),
    ("triton", {"cache_modifier": ".cg"}),
    ("triton", {"eviction_policy": "evict_first"}),
    ("triton", {"eviction_policy": "evict_last"}),
)


def decode_inputs(b, k=2, g=16, d=128, p=64, seed=0):
  """q [B,H,D], k/v caches [B,K,P*SLOT,D], bias, full slot lengths."""
  keys = jax.random.split(jax.random.key(1000 * seed + b), 4)
  q = jax.random.normal(keys[0], (b, k * g, d), jnp.bfloat16)
  kc = jax.random.normal(keys[1], (b, k, p * SLOT, d), jnp.bfloat16)
  vc = jax.random.normal(keys[2], (b, k, p * SLOT, d), jnp.bfloat16)
  bias = jax.random.normal(keys[3], (b, k, p * SLOT), jnp.float32)
  return q, kc, vc, bias, jnp.full((b, k, p), SLOT, jnp.int32)


def _timing(run, arg_sets, nbytes, hbm, iters):
  """Chained wall time and profiled kernel time of one decode call."""
  bw = hbm["bw"]
  secs = timing.timeit_chained(run, arg_sets, iters=iters)
  kernel_s, kernels = timing.kernel_seconds(run, arg_sets)
  return {"seconds": secs, "bytes": nbytes,
          "achieved_GBps": nbytes / secs / 1e9, "hbm_GBps": bw / 1e9,
          **{f"hbm_{k}_GBps": v / 1e9 for k, v in hbm.items() if k != "bw"},
          "fraction_of_hbm": nbytes / secs / bw,
          # No GPU kernel tracks (CPU): no kernel time.
          "kernel_seconds": kernel_s or float("nan"),
          "fraction_of_hbm_kernels": (nbytes / kernel_s / bw if kernel_s
                                      else float("nan")),
          "kernels": kernels}


def _sweep_configs():
  return [("pallas", {"block_sizes": sparse_attention.DecodeBlockSizes(
      num_splits=ns), "num_warps": w, "num_stages": st})
          for ns in (None, 16, 8, 4, 2) for w in (4, 8) for st in (2, 3)]


def decode(rows, *, batches, iters, sweep=False, save=lambda: None):
  """The decode (or, with sweep, decode_sweep) part."""
  hbm = timing.hbm_bandwidth()
  print({k: f"{v / 1e9:.0f} GB/s" for k, v in hbm.items()}, flush=True)
  part = "decode_sweep" if sweep else "decode"
  for b in batches:
    # Two distinct caches (>= 134 MB at B = 16, over the 50 MB L2).
    arg_sets = [decode_inputs(b, seed=s) for s in range(2)]
    args = arg_sets[0]
    nbytes = float(sparse_attention.decode_bytes_read(*args, SLOT))
    want = sparse_attention.decode_attention(*args, SLOT).astype(jnp.float32)
    for kernel, tuning in _sweep_configs() if sweep else DECODE_KERNELS:
      run = (lambda *a, i=kernel, t=tuning: sparse_attention.decode_attention(
          *a, SLOT, implementation=i, tuning=t))
      row = {"part": part, "B": b, "kernel": kernel,
             **{k: str(v) for k, v in tuning.items()}}
      try:
        row.update(_timing(run, arg_sets, nbytes, hbm, iters))
        row["max_abs_diff_vs_xla"] = float(jnp.max(jnp.abs(
            run(*args).astype(jnp.float32) - want)))
      except Exception as e:  # e.g. jax-triton missing: record, go on
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print({k: v for k, v in row.items() if k != "kernels"}, flush=True)
      rows.append(row)
      save()
  print(decode_table(rows, part))


def decode_table(rows, part="decode") -> str:
  """Markdown table of the decode rows, each kernel against Pallas at its B."""
  lines = ["| B | kernel | options | chained us | of HBM | kernel us | of HBM "
           "(kernels) | vs pallas | max abs diff vs xla |",
           "|---|---|---|---|---|---|---|---|---|"]
  decode_rows = [r for r in rows if r["part"] == part and "kernel" in r]
  pallas = {r["B"]: r["seconds"] for r in decode_rows
            if r["kernel"] == "pallas" and "seconds" in r}
  for r in decode_rows:
    options = ", ".join(f"{k}={r[k]}" for k in (
        "block_sizes", "num_warps", "num_stages", "cache_modifier",
        "eviction_policy") if k in r) or "default"
    if "seconds" not in r:
      lines.append(f"| {r['B']} | {r['kernel']} | {options} | error: "
                   f"{r.get('error', '')[:80]} | - | - | - | - | - |")
      continue
    ratio = (f"{pallas[r['B']] / r['seconds']:.2f}x" if r["B"] in pallas
             else "-")
    lines.append(f"| {r['B']} | {r['kernel']} | {options} "
                 f"| {1e6 * r['seconds']:.1f} | {r['fraction_of_hbm']:.2f} "
                 f"| {1e6 * r['kernel_seconds']:.1f} "
                 f"| {r['fraction_of_hbm_kernels']:.2f} | {ratio} "
                 f"| {r.get('max_abs_diff_vs_xla', float('nan')):.2g} |")
  return "\n".join(lines)
