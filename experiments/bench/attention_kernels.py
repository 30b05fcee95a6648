"""Training attention kernels: the block-sparse fwd+bwd against cuDNN dense.

Parts of `experiments.kernel_bench` (each appends rows to `rows`):
  train          fwd+bwd at each T: cuDNN dense vs the Pallas kernel vs the
                 `xla` sparse path; the selection alone (XLA scores and the
                 block_scores kernel, and whether both give the same mask);
                 speedup vs dense without and with the selection counted
  train_sweep    the Pallas fwd and fwd+bwd over kernel tilings
  fwd            the forward alone at each T: cuDNN dense vs the Pallas
                 (Triton) kernel vs the Mosaic GPU kernel (issue 27), with
                 effective TFLOP/s (attended pairs only)
  fwd_bwd        the same three, forward + backward (jit of grad w.r.t.
                 q, k, v, bias): the Mosaic backward against the Triton
                 one; effective TFLOP/s count backward = 2.5 forward
  bwd_sweep      the backward variants (`BWD_VARIANTS`) with each one's
                 largest gradient difference from the first listed
  train_profile  per-kernel GPU time of one fwd+bwd call, beside cuDNN's

Inputs have 1B-like heads (H = 32, K = 2, D = 128, bf16) and the paper's
budget (`PAPER`: 64 blocks of 64 tokens). "random" masks come from i.i.d.
queries (every token picks differently: the worst case for tile unions),
"local" ones from slowly varying queries (what trained models do).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from experiments.bench import timing
from nosa_jax import config as config_lib
from nosa_jax import implementations
from nosa_jax import selection
from nosa_jax import sparse_attention

PAPER = config_lib.SparseConfig(variant="nosa", query_chunk=1024)
HEADS = (32, 2, 128)  # (H, K, D) of the 1B-like model

# Backward variants: name -> (block_q, block_q_dq, block_q_dkv, dkv_segment)
# in tokens (x G = 16 rows), fused_dq, transpose_bwd[, other kernel
# options]. All keep 4 warps and 2 stages. "old_default" was the library
# default until 2026-11-23 18:47 UTC; "transposed_dq64rows_dkv64rows" is the
# default since (with the unmasked path for full (tile, block) pairs since
# session 7; "..._masked" is it without). experiments/results/kernels/NOTES.md
# has the sweeps. Variants that change the forward (its tile,
# full_fast_path) get their own forward timing.
BWD_VARIANTS = {
    "old_default": ((4, 2, 2, 64), False, False),
    "transposed": ((4, 2, 2, 64), False, True),
    "fused": ((4, 2, 2, 64), True, False),
    "fused_transposed": ((4, 2, 2, 64), True, True),
    "transposed_dkv64rows": ((4, 2, 4, 64), False, True),
    "fused_transposed_dkv64rows": ((4, 2, 4, 64), True, True),
    "transposed_dq64rows": ((4, 4, 2, 64), False, True),
    "transposed_dkv128rows": ((4, 2, 8, 64), False, True),
    "transposed_dq64rows_dkv64rows": ((4, 4, 4, 64), False, True),
    "transposed_dq64rows_dkv64rows_masked": ((4, 4, 4, 64), False, True,
                                             {"full_fast_path": False}),
    "transposed_dkv64rows_seg128": ((4, 2, 4, 128), False, True),
}
DEFAULT_BWD = "transposed_dq64rows_dkv64rows"

# train_sweep tilings: (block_q, block_q_dq, block_q_dkv, dkv_segment,
# num_warps, num_stages): query tokens per tile (x G = 16 rows) of the three
# kernels, tiles per dk/dv work item, Triton launch settings of all three.
_TILINGS = ((8, 4, 4, 64, 8, 2), (4, 4, 4, 64, 8, 2), (4, 2, 2, 64, 4, 2),
            (2, 2, 2, 128, 4, 2), (1, 1, 1, 256, 4, 2), (8, 4, 4, 64, 4, 3),
            (4, 4, 4, 64, 4, 3), (2, 2, 1, 256, 4, 3), (16, 8, 4, 64, 8, 2),
            (4, 4, 4, 256, 8, 2))


def qkvb(key, b, t, h, k, d, dtype=jnp.bfloat16):
  """Random q [B,T,H,D], k, v [B,T,K,D] and eviction bias [B,T,K]."""
  kq, kk, kv, kb = jax.random.split(key, 4)
  return (jax.random.normal(kq, (b, t, h, d), dtype),
          jax.random.normal(kk, (b, t, k, d), dtype),
          jax.random.normal(kv, (b, t, k, d), dtype),
          0.5 * jax.random.normal(kb, (b, t, k), jnp.float32))


def local_queries(key, b, t, h, d, block, dtype=jnp.bfloat16):
  """Queries that vary slowly: one random vector per block plus 10% noise
  (trained models select nearly the same blocks at neighbouring positions;
  paper: gamma 0.944)."""
  k1, k2 = jax.random.split(key)
  n = -(-t // block)
  base = jax.random.normal(k1, (b, n, 1, h, d), jnp.float32)
  base = jnp.broadcast_to(base, (b, n, block, h, d)).reshape(
      b, n * block, h, d)
  noise = 0.1 * jax.random.normal(k2, (b, t, h, d), jnp.float32)
  return (base[:, :t] + noise).astype(dtype)


def union_ratio(mask_BKTN, tokens_per_tile):
  """Mean blocks per query tile's union, over the per-token mean."""
  b, k, t, n = mask_BKTN.shape
  tiles = t // tokens_per_tile
  m = mask_BKTN[:, :, :tiles * tokens_per_tile].reshape(
      b, k, tiles, tokens_per_tile, n)
  return float(jnp.mean(jnp.sum(jnp.any(m, axis=3), -1))
               / jnp.mean(jnp.sum(mask_BKTN, -1)))


def inputs_with_mask(t, kind):
  """((q, k, v, bias, mask), jitted selection) at length t, `kind` masks."""
  h, k, d = HEADS
  q, kk, v, bias = qkvb(jax.random.key(t), 1, t, h, k, d)
  if kind == "local":
    q = local_queries(jax.random.key(t + 1), 1, t, h, d, PAPER.block_size)
  select = jax.jit(lambda q, kk, b: selection.block_mask(q, kk, b, PAPER))
  return (q, kk, v, bias, select(q, kk, bias)), select


def sparse_fwd(implementation="pallas", tuning=None):
  """jit of the sparse attention at the paper's block and query chunk."""
  return jax.jit(lambda q, kk, v, b, m: sparse_attention.sparse_attention(
      q, kk, v, b, m, block_size=PAPER.block_size,
      query_chunk=PAPER.query_chunk, implementation=implementation,
      tuning=tuning))


def fwd_bwd(attend):
  """jit(grad) of sum(attend(q, k, v, bias, mask)) w.r.t. q, k, v, bias."""
  def loss(q, kk, v, b, m):
    return jnp.sum(attend(q, kk, v, b, m).astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def dense(q, kk, v, b, m):
  """Dense causal attention (bias and mask unused): cuDNN on the GPU
  (bf16), XLA elsewhere (so that the parts run as CPU smoke tests)."""
  del b, m
  return jax.nn.dot_product_attention(
      q, kk, v, is_causal=True, implementation=implementations.resolve(
          "dense_attention", "auto", dtype=q.dtype))


def dense_fwd_bwd():
  """fwd_bwd of `dense`."""
  return fwd_bwd(dense)


def attended_flops(q, mask_BKTN):
  """Forward matmul FLOPs of the attended (query, key) pairs only: 4 D per
  pair and query head (Q K^T and P V), the "effective" FLOPs of
  InfLLM-V2's figures. Block n holds keys n C .. n C + C - 1, of which
  query t sees those <= t."""
  _, t, h, d = q.shape
  k = mask_BKTN.shape[1]
  c = PAPER.block_size
  first_N = jnp.arange(mask_BKTN.shape[-1]) * c
  seen_TN = jnp.clip(jnp.arange(t)[:, None] - first_N[None, :] + 1, 0, c)
  pairs = jnp.sum(jnp.where(mask_BKTN, seen_TN, 0), dtype=jnp.float32)
  return 4.0 * d * (h // k) * float(pairs)


def _mosaic_vs_pallas(rows, *, part, lengths, masks, iters):
  """The fwd and fwd_bwd parts: cuDNN dense, the Pallas (Triton) and the
  Mosaic kernels, forward alone or jit(grad) (fwd_bwd); a kernel that fails
  is a row with `<name>_error`."""
  grads = part == "fwd_bwd"
  wrap = fwd_bwd if grads else jax.jit
  # Effective FLOPs: the forward's 4 D per attended pair, and for fwd+bwd
  # FlashAttention's convention, backward = 2.5 forward.
  flop_factor = 3.5 if grads else 1.0
  suffix = f"{part}_s"
  for kind in masks:
    for t in lengths:
      args, _ = inputs_with_mask(t, kind)
      flops = attended_flops(args[0], args[-1]) * flop_factor
      row = {"part": part, "mask": kind, "T": t,
             "selected_fraction_of_causal": float(jnp.mean(args[-1])) * 2,
             f"dense_cudnn_{suffix}": timing.timeit(wrap(dense), *args,
                                                    iters=iters)}
      outs = {}
      for name in ("pallas", "mosaic"):
        try:
          attend = sparse_fwd(name)
          run = fwd_bwd(attend) if grads else attend
          row[f"{name}_{suffix}"] = timing.timeit(run, *args, iters=iters)
          row[f"{name}_effective_tflops"] = (
              flops / row[f"{name}_{suffix}"] / 1e12)
          outs[name] = run(*args)
        except Exception as e:  # a kernel that fails is a result
          row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
      if len(outs) == 2:
        row["mosaic_speedup_vs_pallas"] = (row[f"pallas_{suffix}"] /
                                           row[f"mosaic_{suffix}"])
        row["mosaic_speedup_vs_dense"] = (row[f"dense_cudnn_{suffix}"] /
                                          row[f"mosaic_{suffix}"])
        if grads:
          row["mosaic_max_rel_diff_vs_pallas"] = max_rel_diff(
              outs["mosaic"], outs["pallas"])
        else:
          row["mosaic_max_abs_diff_vs_pallas"] = float(jnp.max(jnp.abs(
              outs["mosaic"].astype(jnp.float32) -
              outs["pallas"].astype(jnp.float32))))
      print(row, flush=True)
      rows.append(row)


def fwd(rows, *, lengths, masks, iters):
  """The fwd part (module docstring); `mosaic_max_abs_diff_vs_pallas` is
  the largest output difference of the two kernels (bf16 rounding ~1e-2;
  a wrong kernel O(1))."""
  _mosaic_vs_pallas(rows, part="fwd", lengths=lengths, masks=masks,
                    iters=iters)


def fwd_bwd_mosaic(rows, *, lengths, masks, iters):
  """The fwd_bwd part (module docstring); `mosaic_max_rel_diff_vs_pallas`
  is the worst gradient's largest difference from the Triton kernel's over
  its largest entry (`max_rel_diff`)."""
  _mosaic_vs_pallas(rows, part="fwd_bwd", lengths=lengths, masks=masks,
                    iters=iters)


def bwd_variant(name):
  """(sizes, fused_dq, transpose_bwd, other kernel options) of a variant."""
  sizes, fused_dq, transpose_bwd, *extra = BWD_VARIANTS[name]
  return sizes, fused_dq, transpose_bwd, {"full_fast_path": True,
                                          **(extra or [{}])[0]}


def bwd_tuning(name):
  sizes, fused_dq, transpose_bwd, extra = bwd_variant(name)
  return {"block_sizes": sparse_attention.KernelBlockSizes(*sizes),
          "fused_dq": fused_dq, "transpose_bwd": transpose_bwd,
          "num_warps": 4, "num_stages": 2, **extra}


def max_rel_diff(grads, want):
  """Largest |grad - want| over max |want|, worst of the gradients."""
  return max(float(jnp.max(jnp.abs(g.astype(jnp.float32) -
                                   w.astype(jnp.float32))) /
                   jnp.max(jnp.abs(w.astype(jnp.float32))))
             for g, w in zip(grads, want, strict=True))


def train(rows, *, lengths, masks, iters, xla_max_len):
  """The train part (module docstring)."""
  time = lambda fn, *a, n=iters: timing.timeit(fn, *a, iters=n)
  for kind in masks:
    for t in lengths:
      args, select = inputs_with_mask(t, kind)
      q, kk, _, bias, mask = args
      select_pallas = jax.jit(lambda q, kk, b: selection.block_mask(
          q, kk, b, dataclasses.replace(PAPER, score_implementation="pallas")))
      pallas = sparse_fwd("pallas")
      row = {"part": "train", "mask": kind, "T": t,
             "selected_fraction_of_causal": float(jnp.mean(mask)) * 2,
             "union_ratio_tile8": union_ratio(mask, 8),
             "dense_cudnn_s": time(dense_fwd_bwd(), *args),
             "pallas_sparse_s": time(fwd_bwd(pallas), *args),
             "pallas_fwd_only_s": time(pallas, *args),
             "selection_s": time(select, q, kk, bias),
             "selection_pallas_scores_s": time(select_pallas, q, kk, bias),
             "selection_pallas_scores_same_mask": bool(jnp.all(
                 select_pallas(q, kk, bias) == mask))}
      # Where the two score paths select differently: rows, and whether
      # each flipped pick lies within 2 eps of the boundary (rounding on a
      # near-tie) rather than beyond it (a bug); selection.py "Ties".
      agree = jax.jit(lambda q, kk, b: selection.score_path_agreement(
          q, kk, b, PAPER))(q, kk, bias)
      row.update({f"selection_pallas_scores_{name}": float(x)
                  for name, x in agree.items()})
      if t <= xla_max_len and kind == masks[0]:
        row["xla_sparse_s"] = time(fwd_bwd(sparse_fwd("xla")), *args, n=3)
      attention_s = row["pallas_sparse_s"]
      row["speedup_vs_dense"] = row["dense_cudnn_s"] / attention_s
      row["selection_share"] = row["selection_s"] / (row["selection_s"] +
                                                      attention_s)
      # End to end: the selection (kernel scores) + the sparse fwd+bwd.
      row["speedup_vs_dense_with_selection"] = row["dense_cudnn_s"] / (
          row["selection_pallas_scores_s"] + attention_s)
      print(row, flush=True)
      rows.append(row)


def train_sweep(rows, *, lengths, masks):
  """Forward / fwd+bwd over `_TILINGS` at the last T, last mask kind."""
  t = lengths[-1]
  args, _ = inputs_with_mask(t, masks[-1])
  for bq, bdq, bdkv, seg, warps, stages in _TILINGS:
    sizes = {"block_q": bq, "block_q_dq": bdq, "block_q_dkv": bdkv,
             "dkv_segment": seg}
    fwd = sparse_fwd("pallas", {
        "block_sizes": sparse_attention.KernelBlockSizes(**sizes),
        "num_warps": warps, "num_stages": stages})
    row = {"part": "train_sweep", "T": t, "mask": masks[-1], **sizes,
           "num_warps": warps, "num_stages": stages}
    try:
      row["fwd_s"] = timing.timeit(fwd, *args, iters=3)
      row["fwd_bwd_s"] = timing.timeit(fwd_bwd(fwd), *args, iters=3)
    except Exception as e:  # a tiling that does not compile is a result too
      row["error"] = f"{type(e).__name__}: {e}"[:300]
    print(row, flush=True)
    rows.append(row)


def bwd_sweep(rows, *, lengths, masks, iters, variants, save=lambda: None):
  """The backward variants at each T, last mask kind.

  The forward is timed once per forward configuration (its tile and
  full_fast_path). `max_rel_diff_vs_first` compares each variant's dq, dk,
  dv, dbias with the first variant's on the same inputs: bf16 rounding and
  atomic-add order give ~1e-3 of the largest entry; a wrong variant O(1).
  """
  kind = masks[-1]
  for t in lengths:
    args, _ = inputs_with_mask(t, kind)
    base = {"part": "bwd_sweep", "T": t, "mask": kind,
            "selected_fraction_of_causal": float(jnp.mean(args[-1])) * 2,
            "dense_cudnn_fwd_bwd_s": timing.timeit(dense_fwd_bwd(), *args,
                                                   iters=iters)}
    fwd_times, want = {}, None
    for name in variants:
      fwd = sparse_fwd("pallas", bwd_tuning(name))
      sizes, fused_dq, transpose_bwd, extra = bwd_variant(name)
      row = {**base, "variant": name, "fused_dq": fused_dq,
             "transpose_bwd": transpose_bwd, **extra,
             **dict(zip(("block_q", "block_q_dq", "block_q_dkv",
                         "dkv_segment"), sizes, strict=True))}
      try:
        fwd_key = (sizes[0], *sorted(extra.items()))
        if fwd_key not in fwd_times:
          fwd_times[fwd_key] = timing.timeit(fwd, *args, iters=iters)
        row["fwd_s"] = fwd_times[fwd_key]
        grad = fwd_bwd(fwd)
        row["fwd_bwd_s"] = timing.timeit(grad, *args, iters=iters)
        row["bwd_s"] = row["fwd_bwd_s"] - row["fwd_s"]
        row["speedup_vs_dense"] = (row["dense_cudnn_fwd_bwd_s"] /
                                   row["fwd_bwd_s"])
        grads = grad(*args)
        want = grads if want is None else want
        row["max_rel_diff_vs_first"] = max_rel_diff(grads, want)
      except Exception as e:  # a variant that does not compile is a result
        row["error"] = f"{type(e).__name__}: {e}"[:300]
      print(row, flush=True)
      rows.append(row)
      save()
  print(bwd_table(rows))


def bwd_table(rows) -> str:
  """Markdown table of the bwd_sweep rows."""
  ms = lambda r, k: f"{1e3 * r[k]:.1f}" if k in r else "-"
  lines = ["| T | variant | cuDNN fwd+bwd ms | fwd ms | fwd+bwd ms | bwd ms "
           "| speedup | max rel diff |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["part"] == "bwd_sweep" and "variant" in r:
      lines.append(
          f"| {r['T']} | {r['variant']} | {ms(r, 'dense_cudnn_fwd_bwd_s')} "
          f"| {ms(r, 'fwd_s')} | {ms(r, 'fwd_bwd_s')} | {ms(r, 'bwd_s')} "
          f"| {r.get('speedup_vs_dense', 0):.2f}x "
          f"| {r.get('max_rel_diff_vs_first', float('nan')):.2g} |")
  return "\n".join(lines)


def print_kernels(label, row, top=12):
  """One profiled row: wall and GPU busy time, then its top kernels."""
  print(f"{label}: wall {1e3 * row.get('wall_s', 0):.2f} ms, GPU busy "
        f"{1e3 * row.get('gpu_busy_s', 0):.2f} ms", flush=True)
  for k in row.get("kernels", [])[:top]:
    print(f"  {k['us'] / 1e3:8.3f} ms x{k['count']:<4d} {k['name']}",
          flush=True)


def train_profile(rows, *, lengths, masks, iters, variants):
  """Per-kernel GPU time of one fwd+bwd call at each T (last mask kind):
  cuDNN, the default kernels and each of `variants`."""
  kind = masks[-1]
  for t in lengths:
    args, _ = inputs_with_mask(t, kind)
    runs = {"dense_cudnn": dense_fwd_bwd()}
    for name in [DEFAULT_BWD, *variants]:
      runs[name] = fwd_bwd(sparse_fwd("pallas", bwd_tuning(name)))
    for name, fn in runs.items():
      row = {"part": "train_profile", "T": t, "mask": kind, "variant": name}
      try:
        row["wall_s"] = timing.timeit(fn, *args, iters=iters)
        row["kernels"], busy_us = timing.kernel_profile(fn, args)
        row["gpu_busy_s"] = busy_us * 1e-6
      except Exception as e:  # a variant that fails is a result
        row["error"] = f"{type(e).__name__}: {e}"[:300]
      rows.append(row)
      print_kernels(f"T={t} {name}", row)
