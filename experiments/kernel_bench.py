r"""Kernel benchmark: NOSA block-sparse attention and sparse decode on a GPU.

  python -m experiments.kernel_bench --out=/tmp/kbench [--parts=train,decode]

All figures of one invocation are measured in the same process, so ratios
compare like with like. Parts:
  train:  attention fwd+bwd at T = 8k..64k with 1B-like heads (H=32, K=2,
          D=128, bf16) and the paper's budget (64 blocks of 64): cuDNN dense
          causal attention vs the Pallas block-sparse kernel vs the `xla`
          sparse path; the NOSA selection (scores + top-k) timed on its own,
          with the XLA scores and with the `block_scores` kernel (and whether
          both give the same mask); speedup vs dense without and with the
          selection (kernel scores) counted.
  decode: the split-K decode kernel at B = 16..64, budget 4096 tokens:
          achieved bandwidth on the bytes it must read, over the HBM
          bandwidth measured in the same run (the best of a 2 GiB device
          copy and two 2 GiB read-only sums), timed two ways: 20
          calls chained in one unrolled jit over two distinct caches
          (dispatch excluded, launch gaps included) and the GPU time of
          its kernels in a jax.profiler trace; for
          the Pallas kernel and the jax-triton one (`_DECODE_KERNELS`:
          pipelined, unpipelined, and with each cache modifier / eviction
          policy), each with its largest difference from the xla path and
          its speed relative to Pallas; a kernel that fails (no jax-triton)
          is a row with an error.
  train_profile: per-kernel GPU time (jax.profiler) of one fwd+bwd call of
          the default kernels, each --bwd_variants one and cuDNN at each
          --lengths T: how much is the Pallas kernels, how much XLA's
          index lists and layout copies.
  train_sweep / decode_sweep: the same over kernel tilings.
  bwd_sweep: the backward variants of the Pallas kernel (`_BWD_VARIANTS`:
          fused dq, transposed backward tiles, larger backward tiles) at
          each --lengths T with the last --masks kind: fwd and fwd+bwd ms
          per variant, cuDNN dense fwd+bwd for reference, and each
          variant's largest gradient difference from the first one's.
  step:   the training step of a 1B-like model at 16k tokens with
          --step_layers layers, per --step_variants (`full` = cuDNN dense,
          nosa with the Pallas or xla attention, and the Pallas attention
          with the block_scores kernel): tokens/s and MFU.
  scores_sweep: the block_scores kernel (tf32) over block_n, num_warps and
          block_q (`_SCORE_TILINGS`) at each --score_lengths T, chunked as the
          selection calls it and on the whole T.
  scores: the query-aware block scores of the selection (issue #4) at each
          --score_lengths T, 1B-like heads: XLA `selection.query_aware_scores`
          vs the `block_scores` kernel (`selection.query_aware_scores_pallas`)
          at each dot precision, both over query chunks of 1024 as the
          selection runs them, the kernel also on the whole T in one call;
          the full selection (scores + eviction + top-k) for scale, and each
          kernel's largest difference from the XLA scores.
  selection_profile: per-kernel GPU time of the NOSA selection as
          training runs it (`select_block_masks` with the block_scores
          kernel) at each --score_lengths T, as the library runs it and
          with the final top-k and compare-reduce membership it replaced.
Prints a table and writes results.json under --out. Measured figures and
the commands that gave them: experiments/results/kernels/NOTES.md (and
training/NOTES.md for the step).

Timing the scoring kernel (issue #4):

  python -m experiments.kernel_bench --out=/tmp/kb_scores --parts=scores

Timing the backward variants (issue #4), a few minutes of device time:

  python -m experiments.kernel_bench --out=/tmp/kb --parts=bwd_sweep \
      --lengths=32768,16384 --masks=local --iters=5
"""

import dataclasses
import functools
import json
import os
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments import timing
from experiments.bench import harness
from nosa_jax import config as config_lib
from nosa_jax import implementations
from nosa_jax import metrics as metrics_lib
from nosa_jax import selection
from nosa_jax import sparse_attention
from nosa_jax import train

_OUT = flags.DEFINE_string("out", "/tmp/kernel_bench", "Output directory.")
_PARTS = flags.DEFINE_list("parts", ["train", "decode", "step"],
                           "Which parts to run.")
_LENGTHS = flags.DEFINE_list("lengths", ["8192", "16384", "32768", "65536"],
                             "Sequence lengths for the train part.")
_XLA_MAX = flags.DEFINE_integer("xla_max_len", 32768,
                                "Longest T for the xla sparse path.")
_STEP_LAYERS = flags.DEFINE_integer(
    "step_layers", 28, "Layers of the 1B-like model in the step part.")
# name -> (SparseConfig.variant, implementation, score_implementation[,
# ModelConfig.remat_keeps_selection, True if absent]).
_STEP_VARIANT_CHOICES = {
    "full": ("full", "xla", "xla"),  # cuDNN dense attention
    "nosa_pallas": ("nosa", "pallas", "xla"),
    "nosa_pallas_scores": ("nosa", "pallas", "pallas"),
    # The same, its remat backward repeating the selection (before s8).
    "nosa_pallas_scores_reselect": ("nosa", "pallas", "pallas", False),
    "nosa_xla": ("nosa", "xla", "xla"),
}
_STEP_VARIANTS = flags.DEFINE_list(
    "step_variants", list(_STEP_VARIANT_CHOICES),
    f"Train-step variants of --parts=step, from {list(_STEP_VARIANT_CHOICES)}"
    ": attention implementation, and the query-aware scores by XLA or the "
    "block_scores kernel.")
_DECODE_BATCHES = flags.DEFINE_list(
    "decode_batches", ["16", "32", "64"], "Batch sizes of the decode parts.")
_ITERS = flags.DEFINE_integer("iters", 10, "Timed iterations per figure.")
_MASKS = flags.DEFINE_list(
    "masks", ["random", "local"], "Selection inputs for the train part: "
    "random queries, or slowly varying (local) ones.")

# Kernel variants for the bwd_sweep part: name ->
# (block_q, block_q_dq, block_q_dkv, dkv_segment) in tokens (x G=16 rows),
# fused_dq, transpose_bwd[, other kernel options]. All keep 4 warps
# and 2 stages; "old_default" was the library default until the sweep of
# 2026-11-23 18:47 UTC, "transposed_dq64rows_dkv64rows" is the default since
# the one of 18:56 UTC (with the unmasked path for full (tile, block) pairs
# since session 7; "..._masked" is it without, i.e. the session-6 kernels;
# experiments/results/kernels/NOTES.md has the sweeps).
# Variants that change the forward too (its tile, full_fast_path) get their
# own forward timing.
_BWD_VARIANTS = {
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
_SCORE_LENGTHS = flags.DEFINE_list(
    "score_lengths", ["16384", "32768"], "Sequence lengths for the scores "
    "part.")
_SCORE_PRECISIONS = ("highest", "tf32", "bf16")
_BWD = flags.DEFINE_list(
    "bwd_variants", list(_BWD_VARIANTS)[:6],
    f"Variants timed by the bwd_sweep part, of {list(_BWD_VARIANTS)}.")

PAPER = config_lib.SparseConfig(variant="nosa", query_chunk=1024)


def timeit(fn, *args, iters=None):
  """Median seconds per call after one compile/warm-up call."""
  return timing.timeit(fn, *args, iters=iters or _ITERS.value)


def timeit_device(fn, arg_sets, reps=20):
  """Seconds per call with `reps` calls chained inside one jit.

  Host dispatch would otherwise dominate calls as short as a decode
  kernel's (experiments/results/kernels/NOTES.md). The chain is unrolled
  (an XLA while loop costs a predicate round trip per iteration), cycles
  through `arg_sets` (distinct caches, so that the working set exceeds the
  L2), and each call's query depends on the previous output so XLA cannot
  merge or drop them.
  """
  def chained(sets):
    q = sets[0][0]
    for i in range(reps):
      _, *rest = sets[i % len(sets)]
      out = fn(q, *rest)
      q = q + (0 * out[..., :1]).astype(q.dtype)
    return q
  run = jax.jit(chained)
  return timeit(run, arg_sets) / reps


def kernel_seconds(fn, arg_sets, calls=20):
  """GPU time per call of `fn`, summed over its kernels (jax.profiler),
  over `calls` calls cycling through `arg_sets`; and the kernels."""
  jit_fn = jax.jit(fn)
  cycle = [arg_sets[i % len(arg_sets)] for i in range(calls)]

  def run_all(*_):
    return [jit_fn(*a) for a in cycle]
  kernels, busy_us = _kernel_profile(run_all, (), calls=1)
  return busy_us * 1e-6 / calls, [
      {**k, "count": k["count"] / calls, "us": k["us"] / calls}
      for k in kernels]


def hbm_bandwidth() -> dict:
  """HBM references of the decode part, bytes/s, each the best of its
  timed calls: a device copy of 2 GiB (4 GiB moved, both counted), and 2 GiB
  read-only fp32 sums of bf16 data over the whole array and over rows of
  8192 (XLA's row reduction); `bw` is the largest (the conservative
  denominator of "fraction of HBM")."""
  n = 2**30
  x = jnp.ones((n,), jnp.bfloat16)
  refs = {"copy": 2 * x.nbytes / timing.timeit(
      jax.jit(lambda a: a + jnp.bfloat16(1)), x, iters=10, reduce=min)}
  for name, shape, axis in (("read", (n,), None),
                            ("read_rows", (n // 8192, 8192), 1)):
    fn = jax.jit(lambda a, axis=axis: jnp.sum(a, axis=axis,
                                              dtype=jnp.float32))
    refs[name] = x.nbytes / timing.timeit(fn, x.reshape(shape), iters=10,
                                          reduce=min)
  del x
  return {**refs, "bw": max(refs.values())}


def _qkvb(key, b, t, h, k, d, dtype=jnp.bfloat16):
  kq, kk, kv, kb = jax.random.split(key, 4)
  q = jax.random.normal(kq, (b, t, h, d), dtype)
  kk_ = jax.random.normal(kk, (b, t, k, d), dtype)
  v = jax.random.normal(kv, (b, t, k, d), dtype)
  bias = 0.5 * jax.random.normal(kb, (b, t, k), jnp.float32)
  return q, kk_, v, bias


def _fwd_bwd(attend):
  """jit(grad) of sum(attend(q, k, v, bias, mask)) w.r.t. q, k, v, bias."""
  def loss(q, kk, v, b, m):
    return jnp.sum(attend(q, kk, v, b, m).astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def _train_step_fn(graphdef, model, tx):
  return jax.jit(lambda s, b: train.train_step(
      s, b, graphdef=graphdef, cfg=model, tx=tx), donate_argnums=0)


def _local_queries(key, b, t, h, d, block, dtype=jnp.bfloat16):
  """Queries that vary slowly: one random vector per block plus 10% noise.

  Random i.i.d. queries make every token pick different blocks, an
  unrealistically bad case for tile unions; trained models select nearly
  the same blocks at neighbouring positions (paper: gamma 0.944).
  """
  k1, k2 = jax.random.split(key)
  n = -(-t // block)
  base = jax.random.normal(k1, (b, n, 1, h, d), jnp.float32)
  base = jnp.broadcast_to(base, (b, n, block, h, d)).reshape(b, n * block, h, d)
  noise = 0.1 * jax.random.normal(k2, (b, t, h, d), jnp.float32)
  return (base[:, :t] + noise).astype(dtype)


def _union_ratio(mask_BKTN, tokens_per_tile):
  """Mean blocks per query tile's union, over the per-token mean."""
  b, k, t, n = mask_BKTN.shape
  tiles = t // tokens_per_tile
  m = mask_BKTN[:, :, :tiles * tokens_per_tile].reshape(
      b, k, tiles, tokens_per_tile, n)
  return float(jnp.mean(jnp.sum(jnp.any(m, axis=3), -1))
               / jnp.mean(jnp.sum(mask_BKTN, -1)))


def _inputs_with_mask(t, kind):
  h, k, d = 32, 2, 128
  q, kk, v, bias = _qkvb(jax.random.key(t), 1, t, h, k, d)
  if kind == "local":
    q = _local_queries(jax.random.key(t + 1), 1, t, h, d, PAPER.block_size)
  select = jax.jit(lambda q, kk, b: selection.block_mask(q, kk, b, PAPER))
  mask = select(q, kk, bias)
  return (q, kk, v, bias, mask), select


def bench_train(rows):
  for kind in _MASKS.value:
    for t in (int(x) for x in _LENGTHS.value):
      args, select = _inputs_with_mask(t, kind)
      q, kk, _, bias, mask = args
      t_select = timeit(select, q, kk, bias)
      select_pallas = jax.jit(functools.partial(
          selection.block_mask,
          cfg=dataclasses.replace(PAPER, score_implementation="pallas")))
      same_mask = bool(jnp.all(select_pallas(q, kk, bias) == mask))
      t_select_pallas = timeit(select_pallas, q, kk, bias)
      dense = _dense_fwd_bwd()
      pallas_fwd = jax.jit(lambda q, kk, v, b, m: sparse_attention.
                           sparse_attention(q, kk, v, b, m,
                                            block_size=PAPER.block_size,
                                            query_chunk=PAPER.query_chunk,
                                            implementation="pallas"))
      pallas = _fwd_bwd(pallas_fwd)
      row = {"part": "train", "mask": kind, "T": t,
             "selected_fraction_of_causal": float(jnp.mean(mask)) * 2,
             "union_ratio_tile8": _union_ratio(mask, 8),
             "dense_cudnn_s": timeit(dense, *args),
             "pallas_sparse_s": timeit(pallas, *args),
             "pallas_fwd_only_s": timeit(pallas_fwd, *args),
             "selection_s": t_select,
             "selection_pallas_scores_s": t_select_pallas,
             "selection_pallas_scores_same_mask": same_mask}
      if t <= _XLA_MAX.value and kind == _MASKS.value[0]:
        xla = _fwd_bwd(lambda q, kk, v, b, m: sparse_attention.
                       sparse_attention(q, kk, v, b, m,
                                        block_size=PAPER.block_size,
                                        query_chunk=PAPER.query_chunk))
        row["xla_sparse_s"] = timeit(xla, *args, iters=3)
      row["speedup_vs_dense"] = row["dense_cudnn_s"] / row["pallas_sparse_s"]
      row["selection_share"] = t_select / (t_select + row["pallas_sparse_s"])
      # NOSA attention end to end: selection (scores by the kernel) + the
      # sparse fwd+bwd, against dense.
      row["speedup_vs_dense_with_selection"] = row["dense_cudnn_s"] / (
          t_select_pallas + row["pallas_sparse_s"])
      print(row, flush=True)
      rows.append(row)


def bench_train_sweep(rows):
  """Forward / fwd+bwd time over kernel tilings at the last --lengths T,
  with the last --masks kind."""
  t = int(_LENGTHS.value[-1])
  args, _ = _inputs_with_mask(t, _MASKS.value[-1])
  fields = {f.name for f in dataclasses.fields(
      sparse_attention.KernelBlockSizes)}
  # (block_q, block_q_dq, block_q_dkv, dkv_segment, num_warps, num_stages):
  # query tokens per tile (x G=16 rows) for the three kernels, tiles per
  # dk/dv work item, and the Triton launch settings shared by all three.
  grid = []
  for bq, bdq, bdkv, seg, warps, stages in (
      (8, 4, 4, 64, 8, 2), (4, 4, 4, 64, 8, 2), (4, 2, 2, 64, 4, 2),
      (2, 2, 2, 128, 4, 2), (1, 1, 1, 256, 4, 2), (8, 4, 4, 64, 4, 3),
      (4, 4, 4, 64, 4, 3), (2, 2, 1, 256, 4, 3), (16, 8, 4, 64, 8, 2),
      (4, 4, 4, 256, 8, 2)):
    sizes = {"block_q": bq, "block_q_dq": bdq, "block_q_dkv": bdkv,
             "dkv_segment": seg}
    grid.append((sizes, warps, stages))
  for sizes, warps, stages in grid:
    tuning = {"block_sizes": sparse_attention.KernelBlockSizes(
        **{k: v for k, v in sizes.items() if k in fields}),
              "num_warps": warps, "num_stages": stages}
    fwd = jax.jit(lambda q, kk, v, b, m, tuning=tuning: sparse_attention.
                  sparse_attention(q, kk, v, b, m,
                                   block_size=PAPER.block_size,
                                   query_chunk=PAPER.query_chunk,
                                   implementation="pallas", tuning=tuning))
    row = {"part": "train_sweep", "T": t, "mask": _MASKS.value[-1], **sizes,
           "num_warps": warps,
           "num_stages": stages}
    try:
      row["fwd_s"] = timeit(fwd, *args, iters=3)
      row["fwd_bwd_s"] = timeit(_fwd_bwd(fwd), *args, iters=3)
    except Exception as e:  # a tiling that does not compile is a result too
      row["error"] = f"{type(e).__name__}: {e}"[:300]
    print(row, flush=True)
    rows.append(row)


def _bwd_variant(name):
  """(sizes, fused_dq, transpose_bwd, other kernel options) of a variant."""
  sizes, fused_dq, transpose_bwd, *extra = _BWD_VARIANTS[name]
  return sizes, fused_dq, transpose_bwd, {"full_fast_path": True,
                                          **(extra or [{}])[0]}


def _bwd_tuning(name):
  sizes, fused_dq, transpose_bwd, extra = _bwd_variant(name)
  return {"block_sizes": sparse_attention.KernelBlockSizes(*sizes),
          "fused_dq": fused_dq, "transpose_bwd": transpose_bwd,
          "num_warps": 4, "num_stages": 2, **extra}


def _dense_fwd_bwd():
  """jit(grad) of dense causal attention: cuDNN on the GPU (bf16), XLA
  elsewhere (so that the parts using it run as CPU smoke tests)."""
  return _fwd_bwd(lambda q, kk, v, b, m: jax.nn.dot_product_attention(
      q, kk, v, is_causal=True, implementation=implementations.resolve(
          "dense_attention", "auto", dtype=q.dtype)))


def _max_rel_diff(grads, want):
  """Largest |grad - want| over max |want|, worst of the gradients."""
  return max(float(jnp.max(jnp.abs(g.astype(jnp.float32) -
                                   w.astype(jnp.float32))) /
                   jnp.max(jnp.abs(w.astype(jnp.float32))))
             for g, w in zip(grads, want, strict=True))


def bench_bwd_sweep(rows, save=lambda: None):
  """Backward variants (issue #4) at each --lengths T, last --masks kind.

  The forward is timed once per T and forward configuration (its tile and
  full_fast_path; the backward options change only the backward kernels).
  `max_rel_diff_vs_first` compares each variant's dq, dk, dv, dbias with
  those of the first variant listed ("old_default" unless --bwd_variants says
  otherwise) on the same inputs: bf16 rounding and atomic-add order only,
  ~1e-3 of the largest gradient entry; a wrong variant shows as O(1).
  """
  kind = _MASKS.value[-1]
  dense = _dense_fwd_bwd()
  for t in (int(x) for x in _LENGTHS.value):
    args, _ = _inputs_with_mask(t, kind)
    mask = args[-1]
    base = {"part": "bwd_sweep", "T": t, "mask": kind,
            "selected_fraction_of_causal": float(jnp.mean(mask)) * 2,
            "dense_cudnn_fwd_bwd_s": timeit(dense, *args)}
    fwd_times, want = {}, None
    for name in _BWD.value:
      tuning = _bwd_tuning(name)
      fwd = jax.jit(lambda q, kk, v, b, m, tuning=tuning: sparse_attention.
                    sparse_attention(q, kk, v, b, m,
                                     block_size=PAPER.block_size,
                                     query_chunk=PAPER.query_chunk,
                                     implementation="pallas", tuning=tuning))
      sizes, fused_dq, transpose_bwd, extra = _bwd_variant(name)
      row = {**base, "variant": name, "fused_dq": fused_dq,
             "transpose_bwd": transpose_bwd, **extra,
             **dict(zip(("block_q", "block_q_dq", "block_q_dkv",
                         "dkv_segment"), sizes, strict=True))}
      try:
        fwd_key = (sizes[0], *sorted(extra.items()))
        if fwd_key not in fwd_times:
          fwd_times[fwd_key] = timeit(fwd, *args)
        fwd_s = row["fwd_s"] = fwd_times[fwd_key]
        fwd_bwd = _fwd_bwd(fwd)
        row["fwd_bwd_s"] = timeit(fwd_bwd, *args)
        row["bwd_s"] = row["fwd_bwd_s"] - fwd_s
        row["speedup_vs_dense"] = (row["dense_cudnn_fwd_bwd_s"] /
                                   row["fwd_bwd_s"])
        grads = fwd_bwd(*args)
        if want is None:
          want = grads
        row["max_rel_diff_vs_first"] = _max_rel_diff(grads, want)
      except Exception as e:  # a variant that does not compile is a result
        row["error"] = f"{type(e).__name__}: {e}"[:300]
      print(row, flush=True)
      rows.append(row)
      save()
  print("| T | variant | cuDNN fwd+bwd ms | fwd ms | fwd+bwd ms | bwd ms "
        "| speedup | max rel diff |")
  print("|---|---|---|---|---|---|---|---|")
  ms = lambda r, k: f"{1e3 * r[k]:.1f}" if k in r else "-"
  for r in rows:
    if r["part"] == "bwd_sweep" and "variant" in r:
      print(f"| {r['T']} | {r['variant']} | {ms(r, 'dense_cudnn_fwd_bwd_s')} "
            f"| {ms(r, 'fwd_s')} | {ms(r, 'fwd_bwd_s')} | {ms(r, 'bwd_s')} "
            f"| {r.get('speedup_vs_dense', 0):.2f}x "
            f"| {r.get('max_rel_diff_vs_first', float('nan')):.2g} |")


def _kernel_profile(fn, args, calls=3):
  """Per-kernel GPU time of `fn(*args)`: a jax.profiler trace of `calls`
  calls after a warm-up, summed by kernel name (us per call), largest first,
  and the GPU busy time per call."""
  import gzip  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(fn(*args))
    with gzip.open(timing.find_trace(tmp), "rt") as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  kernels = timing.summarize_trace(events)["kernels"]
  per_call = [{"name": k["name"][:120], "count": k["count"] // calls,
               "us": k["total_us"] / calls} for k in kernels]
  return per_call, sum(k["us"] for k in per_call)


def bench_train_profile(rows):
  """Where the Pallas fwd+bwd time goes (issue #4): per-kernel GPU time of
  one fwd+bwd call at each --lengths T (last --masks kind), for the default
  kernels and, if listed in --bwd_variants, the others, beside cuDNN's."""
  kind = _MASKS.value[-1]
  dense = _dense_fwd_bwd()
  for t in (int(x) for x in _LENGTHS.value):
    args, _ = _inputs_with_mask(t, kind)
    runs = {"dense_cudnn": dense}
    for name in ["transposed_dq64rows_dkv64rows", *_BWD.value]:
      tuning = _bwd_tuning(name)
      runs[name] = _fwd_bwd(
          lambda q, kk, v, b, m, tuning=tuning: sparse_attention.
          sparse_attention(q, kk, v, b, m, block_size=PAPER.block_size,
                           query_chunk=PAPER.query_chunk,
                           implementation="pallas", tuning=tuning))
    for name, fn in runs.items():
      row = {"part": "train_profile", "T": t, "mask": kind, "variant": name}
      try:
        row["wall_s"] = timeit(fn, *args)
        row["kernels"], busy_us = _kernel_profile(fn, args)
        row["gpu_busy_s"] = busy_us * 1e-6
      except Exception as e:  # a variant that fails is a result
        row["error"] = f"{type(e).__name__}: {e}"[:300]
      rows.append(row)
      print(f"T={t} {name}: wall {1e3 * row.get('wall_s', 0):.2f} ms, GPU "
            f"busy {1e3 * row.get('gpu_busy_s', 0):.2f} ms", flush=True)
      for k in row.get("kernels", [])[:12]:
        print(f"  {k['us'] / 1e3:8.3f} ms x{k['count']:<4d} {k['name']}",
              flush=True)


def _scores_row(t):
  """One row of the scores part at sequence length t."""
  h, k, d = 32, 2, 128
  q, kk, _, bias = _qkvb(jax.random.key(t), 1, t, h, k, d)
  n = selection.num_blocks(t, PAPER.block_size)
  kbar = jax.jit(lambda kk: selection.compress_keys(
      kk, PAPER.compress_kernel, PAPER.compress_stride))(kk)

  def chunked(score_fn):
    # As `select_blocks` runs them: lax.map over query chunks.
    return jax.jit(lambda q, kbar: selection._map_query_chunks(
        lambda qc, pos: score_fn(qc, kbar, pos, PAPER, n), q,
        PAPER.query_chunk))

  def pallas(tuning):
    return lambda qc, kb, pos, cfg, nb: selection.query_aware_scores_pallas(
        qc, kb, pos, cfg, nb, tuning=tuning)

  select = jax.jit(lambda q, kk, b: selection.select_blocks(q, kk, b, PAPER))
  xla = chunked(selection.query_aware_scores)
  want = xla(q, kbar)
  finite = jnp.isfinite(want)
  row = {"part": "scores", "T": t, "H": h, "K": k, "D": d,
         "query_chunk": PAPER.query_chunk,
         "selection_s": timeit(select, q, kk, bias),
         "xla_s": timeit(xla, q, kbar)}
  pos_T = jnp.arange(t)
  for prec in _SCORE_PRECISIONS:
    tuning = {"precision": prec}
    full = pallas(tuning)
    runs = {f"pallas_{prec}": chunked(pallas(tuning)),
            f"pallas_full_T_{prec}": jax.jit(
                lambda q, kbar, full=full: full(q, kbar, pos_T, PAPER, n))}
    for name, fn in runs.items():
      try:
        got = fn(q, kbar)
        row[f"{name}_max_abs_diff_vs_xla"] = float(jnp.max(jnp.where(
            finite, jnp.abs(got - want), 0.0)))
        row[f"{name}_s"] = timeit(fn, q, kbar)
      except Exception as e:  # a variant that does not compile is a result
        row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
  return row


def _masks_by_final_top_k(sq, se, pos, cfg):
  """The session-7 `select_masks_from_scores`: members of the top-k."""
  idx, valid, pinned = selection.select_from_scores(sq, se, pos, cfg)
  return selection._members(idx, valid, se.shape[-1]), pinned  # pylint: disable=protected-access


def bench_selection_profile(rows):
  """Where the NOSA selection's time goes: per-kernel GPU time of the
  training path's `select_block_masks` (block_scores kernel for the
  query-aware scores) at each --score_lengths T, 1B-like heads, as the
  library runs it (final mask from one se order per head, membership by
  scatter; session 8) and, for the baseline in the same run, with the
  final top-k and with membership by compare-reduce (session 7)."""
  h, k, d = 32, 2, 128
  cfg = dataclasses.replace(PAPER, score_implementation="pallas")
  library = {"_members": selection._members,  # pylint: disable=protected-access
             "select_masks_from_scores": selection.select_masks_from_scores}
  variants = {
      "library": {},
      "final_top_k": {"select_masks_from_scores": _masks_by_final_top_k},
      "final_top_k_compare": {
          "select_masks_from_scores": _masks_by_final_top_k,
          "_members": selection._members_by_compare},  # pylint: disable=protected-access
  }
  for t in (int(x) for x in _SCORE_LENGTHS.value):
    q, kk, _, bias = _qkvb(jax.random.key(t), 1, t, h, k, d)
    masks = {}
    for name, patch in variants.items():
      for attr, fn in patch.items():
        setattr(selection, attr, fn)
      try:
        select = jax.jit(lambda q, kk, b: selection.select_block_masks(
            q, kk, b, cfg))
        masks[name] = select(q, kk, bias)
        row = {"part": "selection_profile", "T": t, "variant": name,
               "wall_s": timeit(select, q, kk, bias)}
        row["kernels"], busy_us = _kernel_profile(select, (q, kk, bias))
      finally:
        for attr, fn in library.items():
          setattr(selection, attr, fn)
      row["gpu_busy_s"] = busy_us * 1e-6
      row["same_masks_as_library"] = all(
          bool(jnp.array_equal(a, b)) for a, b in zip(
              masks[name], masks["library"], strict=True))
      rows.append(row)
      print(f"T={t} selection ({name}): wall {1e3 * row['wall_s']:.2f} ms, "
            f"GPU busy {1e3 * row['gpu_busy_s']:.2f} ms, same masks "
            f"{row['same_masks_as_library']}", flush=True)
      for kern in row["kernels"][:12]:
        print(f"  {kern['us'] / 1e3:8.3f} ms x{kern['count']:<4d} "
              f"{kern['name']}", flush=True)


def bench_scores(rows):
  """XLA query-aware scores vs the `block_scores` kernel (issue #4)."""
  for t in (int(x) for x in _SCORE_LENGTHS.value):
    row = _scores_row(t)
    print(row, flush=True)
    rows.append(row)
  print("| T | variant | ms | vs XLA | max abs diff vs XLA |")
  print("|---|---|---|---|---|")
  for r in rows:
    if r["part"] != "scores" or "xla_s" not in r:
      continue
    print(f"| {r['T']} | full selection | {1e3 * r['selection_s']:.2f} | - "
          "| - |")
    print(f"| {r['T']} | xla scores | {1e3 * r['xla_s']:.2f} | 1.00x | 0 |")
    for prec in _SCORE_PRECISIONS:
      for name in (f"pallas_{prec}", f"pallas_full_T_{prec}"):
        if f"{name}_s" in r:
          print(f"| {r['T']} | {name} | {1e3 * r[name + '_s']:.2f} "
                f"| {r['xla_s'] / r[name + '_s']:.2f}x "
                f"| {r[name + '_max_abs_diff_vs_xla']:.2g} |")
        else:
          print(f"| {r['T']} | {name} | error | - | - |")


# (block_n, num_warps, block_q[, num_stages]) tilings of the block_scores
# kernel for scores_sweep; block_q None = the default, 128 rows (8 tokens of
# G = 16 heads), with block_n 32 and 8 warps since session 8 (the fastest
# over 1024-query chunks in the session-8 sweeps; 256 rows were faster at
# 32k, slower at 16k; experiments/results/kernels/NOTES.md); (16, 4, 4) was
# the default before. On the H200 block_n = 64 with 128 rows or more, and
# 3 stages at 128 rows x 32 columns, exceed the 227 KB of shared memory.
_SCORE_TILINGS = ((16, 4, 4), (32, 8, None), (32, 4, None), (32, 8, 16),
                  (32, 16, 16), (16, 8, None), (16, 8, 16), (16, 4, None))


def _score_runs(score, n, pos_T):
  """jitted (q, kbar) -> scores: over query chunks as the selection calls
  `score`, and on the whole T at once."""
  chunk = lambda q, kbar: selection._map_query_chunks(  # pylint: disable=protected-access
      lambda qc, pos: score(qc, kbar, pos, PAPER, n), q, PAPER.query_chunk)
  return {"chunked": jax.jit(chunk),
          "full_T": jax.jit(lambda q, kbar: score(q, kbar, pos_T, PAPER, n))}


def bench_scores_sweep(rows):
  """The block_scores kernel (tf32) over tilings at each --score_lengths T:
  over query chunks as the selection runs it, and on the whole T."""
  h, k, d = 32, 2, 128
  for t in (int(x) for x in _SCORE_LENGTHS.value):
    q, kk, _, _ = _qkvb(jax.random.key(t), 1, t, h, k, d)
    n = selection.num_blocks(t, PAPER.block_size)
    kbar = jax.jit(lambda kk: selection.compress_keys(
        kk, PAPER.compress_kernel, PAPER.compress_stride))(kk)
    pos_T = jnp.arange(t)
    want = None
    for block_n, warps, block_q, *stages in _SCORE_TILINGS:
      tuning = {"precision": "tf32", "num_warps": warps,
                "num_stages": stages[0] if stages else None,
                "block_sizes": selection.ScoreBlockSizes(block_q=block_q,
                                                         block_n=block_n)}
      runs = _score_runs(functools.partial(
          selection.query_aware_scores_pallas, tuning=tuning), n, pos_T)
      for name, fn in runs.items():
        row = {"part": "scores_sweep", "T": t, "block_n": block_n,
               "block_q": block_q, "num_warps": warps,
               "num_stages": tuning["num_stages"], "call": name}
        try:
          got = fn(q, kbar)
          if want is None:
            want = got
          finite = jnp.isfinite(want)
          row["max_abs_diff_vs_first"] = float(jnp.max(jnp.where(
              finite, jnp.abs(got - want), 0.0)))
          row["seconds"] = timeit(fn, q, kbar)
        except Exception as e:  # a tiling that does not compile is a result
          row["error"] = f"{type(e).__name__}: {e}"[:300]
        print(row, flush=True)
        rows.append(row)


def _decode_inputs(b, k=2, g=16, d=128, p=64, c=64, seed=0):
  keys = jax.random.split(jax.random.key(1000 * seed + b), 4)
  q = jax.random.normal(keys[0], (b, k * g, d), jnp.bfloat16)
  kc = jax.random.normal(keys[1], (b, k, p * c, d), jnp.bfloat16)
  vc = jax.random.normal(keys[2], (b, k, p * c, d), jnp.bfloat16)
  bias = jax.random.normal(keys[3], (b, k, p * c), jnp.float32)
  return q, kc, vc, bias, jnp.full((b, k, p), c, jnp.int32)


# The decode part's kernels (SparseConfig.decode_implementation, kernel
# options), timed in one run: the Pallas one, then the jax-triton one
# pipelined (cp.async K/V copies, as in the Pallas kernel), unpipelined with
# plain loads (the baseline of the load options), and with each load option
# (unpipelined: Triton's pipelining drops them). Rows before this commit
# named the triton one "jax_triton".
_DECODE_KERNELS = (
    ("pallas", {}),
    ("triton", {}),
    ("triton", {"num_stages": 3}),  # as the Pallas default since s8
    ("triton", {"num_stages": 1}),
    ("triton", {"cache_modifier": ".ca"}),
    ("triton", {"cache_modifier": ".cg"}),
    ("triton", {"eviction_policy": "evict_first"}),
    ("triton", {"eviction_policy": "evict_last"}),
)


def _decode_timing(run, arg_sets, nbytes, hbm):
  """Chained wall time and profiled kernel time of one decode call."""
  bw = hbm["bw"]
  secs = timeit_device(run, arg_sets)
  kernel_s, kernels = kernel_seconds(run, arg_sets)
  return {"seconds": secs, "bytes": nbytes,
          "achieved_GBps": nbytes / secs / 1e9, "hbm_GBps": bw / 1e9,
          **{f"hbm_{k}_GBps": v / 1e9 for k, v in hbm.items() if k != "bw"},
          "fraction_of_hbm": nbytes / secs / bw,
          # No GPU kernel tracks (CPU): no kernel time.
          "kernel_seconds": kernel_s or float("nan"),
          "fraction_of_hbm_kernels": (nbytes / kernel_s / bw if kernel_s
                                      else float("nan")),
          "kernels": kernels}


def bench_decode(rows, sweep=False, save=lambda: None):
  hbm = hbm_bandwidth()
  print({k: f"{v / 1e9:.0f} GB/s" for k, v in hbm.items()}, flush=True)
  c = 64
  configs = _DECODE_KERNELS
  if sweep:
    configs = [("pallas", {"block_sizes": sparse_attention.DecodeBlockSizes(
        num_splits=ns), "num_warps": w, "num_stages": st})
               for ns in (None, 16, 8, 4, 2) for w in (4, 8) for st in (2, 3)]
  for b in (int(x) for x in _DECODE_BATCHES.value):
    # Two distinct caches (>= 134 MB at B = 16, over the 50 MB L2).
    arg_sets = [_decode_inputs(b, seed=s) for s in range(2)]
    args = arg_sets[0]
    nbytes = float(sparse_attention.decode_bytes_read(*args, c))
    want = (None if sweep else  # the xla path, once per B
            sparse_attention.decode_attention(*args, c).astype(jnp.float32))
    for kernel, tuning in configs:
      run = (lambda *a, i=kernel, t=tuning: sparse_attention.decode_attention(
          *a, c, implementation=i, tuning=t))
      options = {k: str(v) for k, v in tuning.items()}
      if sweep:
        row = {"part": "decode_sweep", "B": b,
               **_decode_timing(run, arg_sets, nbytes, hbm), **options}
      else:
        row = {"part": "decode", "B": b, "kernel": kernel, **options}
        try:
          row.update(_decode_timing(run, arg_sets, nbytes, hbm))
          row["max_abs_diff_vs_xla"] = float(jnp.max(jnp.abs(
              run(*args).astype(jnp.float32) - want)))
        except Exception as e:  # e.g. jax-triton missing: record, go on
          row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print({k: v for k, v in row.items() if k != "kernels"}, flush=True)
      rows.append(row)
      save()
  if not sweep:
    _print_decode_table(rows)


def _print_decode_table(rows):
  """Markdown table of the decode part, each kernel against Pallas at its B."""
  print("| B | kernel | options | chained us | of HBM | kernel us | of HBM "
        "(kernels) | vs pallas | max abs diff vs xla |")
  print("|---|---|---|---|---|---|---|---|---|")
  decode = [r for r in rows if r["part"] == "decode" and "kernel" in r]
  pallas = {r["B"]: r["seconds"] for r in decode
            if r["kernel"] == "pallas" and "seconds" in r}
  for r in decode:
    options = ", ".join(f"{k}={r[k]}" for k in ("num_stages",
                                                 "cache_modifier",
                                                 "eviction_policy")
                        if k in r) or "default"
    if "seconds" not in r:
      print(f"| {r['B']} | {r['kernel']} | {options} | error: "
            f"{r.get('error', '')[:80]} | - | - | - | - | - |")
      continue
    ratio = (f"{pallas[r['B']] / r['seconds']:.2f}x" if r["B"] in pallas
             else "-")
    print(f"| {r['B']} | {r['kernel']} | {options} "
          f"| {1e6 * r['seconds']:.1f} | {r['fraction_of_hbm']:.2f} "
          f"| {1e6 * r['kernel_seconds']:.1f} "
          f"| {r['fraction_of_hbm_kernels']:.2f} | {ratio} "
          f"| {r.get('max_abs_diff_vs_xla', float('nan')):.2g} |")


def bench_step(rows):
  t_len = 16384
  for name in _STEP_VARIANTS.value:
    variant, impl, scores, *keep = _STEP_VARIANT_CHOICES[name]
    sparse = dataclasses.replace(PAPER, variant=variant, implementation=impl,
                                 score_implementation=scores)
    model = config_lib.ModelConfig(
        vocab_size=73448, num_layers=_STEP_LAYERS.value, model_dim=1536,
        num_heads=32, num_kv_heads=2, head_dim=128, mlp_dim=4096,
        tie_embeddings=True, dtype="bfloat16", remat="full", sparse=sparse,
        scan_layers=True, remat_keeps_selection=keep[0] if keep else True)
    cfg = config_lib.ExperimentConfig(
        model=model, train=config_lib.TrainConfig(
            seq_len=t_len, batch_size=1, num_steps=10, warmup_steps=1))
    graphdef, state, tx = train.init_state(cfg)
    step = _train_step_fn(graphdef, model, tx)
    batch = jax.random.randint(jax.random.key(0), (1, t_len + 1), 0, 73448)
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    print(f"step {name}: compiled in {compile_s:.0f} s", flush=True)
    times = []
    for _ in range(5):
      t0 = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    secs = statistics.median(times)
    n = sum(x.size for x in jax.tree.leaves(state["params"]))
    flops = metrics_lib.flops_per_token(model, t_len, n) * t_len
    peak = metrics_lib.peak_flops(jax.devices()[0].device_kind)
    row = {"part": "step", "name": name, "variant": variant,
           "implementation": impl, "score_implementation": scores,
           "remat_keeps_selection": model.remat_keeps_selection,
           "layers": model.num_layers, "T": t_len, "seconds": secs,
           "compile_s": compile_s, "tokens_per_s": t_len / secs,
           "mfu": flops / secs / peak if peak else None,
           "loss": float(m["loss"])}
    print(row, flush=True)
    rows.append(row)
    del state


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  rows = []
  info = harness.stamp("kernel_bench")
  print(info, flush=True)

  def save():
    harness.write_results(_OUT.value, "results", {"info": info, "rows": rows})

  unknown = set(_BWD.value) - set(_BWD_VARIANTS)
  if unknown:
    raise app.UsageError(f"--bwd_variants: unknown {sorted(unknown)}")
  unknown = set(_STEP_VARIANTS.value) - set(_STEP_VARIANT_CHOICES)
  if unknown:
    raise app.UsageError(f"--step_variants: unknown {sorted(unknown)}; "
                         f"allowed: {list(_STEP_VARIANT_CHOICES)}")
  parts = (("train", bench_train), ("train_sweep", bench_train_sweep),
           ("bwd_sweep", lambda r: bench_bwd_sweep(r, save)),
           ("train_profile", bench_train_profile),
           ("decode", lambda r: bench_decode(r, save=save)),
           ("decode_sweep", lambda r: bench_decode(r, sweep=True, save=save)),
           ("step", bench_step),
           ("scores", bench_scores),
           ("scores_sweep", bench_scores_sweep),
           ("selection_profile", bench_selection_profile))
  for part, fn in parts:
    if part in _PARTS.value:
      try:
        fn(rows)
      except Exception as e:  # keep the other parts' figures
        print(f"part {part} failed: {type(e).__name__}: {e}"[:2000],
              flush=True)
        rows.append({"part": part, "error": f"{type(e).__name__}: {e}"[:2000]})
      save()
  print("\n".join(json.dumps(r) for r in rows))


if __name__ == "__main__":
  app.run(main)
