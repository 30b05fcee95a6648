"""The NOSA selection's cost: query-aware scores and the whole selection.

Parts of `experiments.kernel_bench` (each appends rows to `rows`):
  scores             XLA `selection.query_aware_scores` vs the block_scores
                     kernel at each dot precision, over query chunks of 1024
                     as the selection runs them and on the whole T; the full
                     selection for scale; each kernel's largest difference
                     from the XLA scores
  scores_sweep       the block_scores kernel (tf32) over `SCORE_TILINGS`
  selection_profile  per-kernel GPU time of the training selection
                     (`select_block_masks`, kernel scores) as the library
                     runs it, and with the final top-k (and compare-reduce
                     membership) it replaced, in the same run
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from experiments.bench import attention_kernels
from experiments.bench import timing
from nosa_jax import selection

PAPER = attention_kernels.PAPER
PRECISIONS = ("highest", "tf32", "bf16")

# (block_n, num_warps, block_q[, num_stages]) tilings of the block_scores
# kernel; block_q None = the default (128 rows = 8 tokens of G = 16 heads),
# with block_n 32 and 8 warps since session 8 (experiments/results/kernels/
# NOTES.md); (16, 4, 4) was the default before. On the H200 block_n = 64
# with 128 rows or more, and 3 stages at 128 x 32, exceed shared memory.
SCORE_TILINGS = ((16, 4, 4), (32, 8, None), (32, 4, None), (32, 8, 16),
                 (32, 16, 16), (16, 8, None), (16, 8, 16), (16, 4, None))


def _inputs(t):
  """(q, k, bias, kbar, number of blocks) at length t, 1B-like heads."""
  q, kk, _, bias = attention_kernels.qkvb(jax.random.key(t), 1, t,
                                          *attention_kernels.HEADS)
  kbar = jax.jit(lambda kk: selection.compress_keys(
      kk, PAPER.compress_kernel, PAPER.compress_stride))(kk)
  return q, kk, bias, kbar, selection.num_blocks(t, PAPER.block_size)


def score_runs(score, n, t):
  """jitted (q, kbar) -> scores of `score`: over query chunks as the
  selection calls it ("chunked"), and on the whole T at once ("full_T")."""
  pos_T = jnp.arange(t)
  chunk = lambda q, kbar: selection._map_query_chunks(  # pylint: disable=protected-access
      lambda qc, pos: score(qc, kbar, pos, PAPER, n), q, PAPER.query_chunk)
  return {"chunked": jax.jit(chunk),
          "full_T": jax.jit(lambda q, kbar: score(q, kbar, pos_T, PAPER, n))}


def _max_diff(got, want):
  return float(jnp.max(jnp.where(jnp.isfinite(want), jnp.abs(got - want),
                                 0.0)))


def scores(rows, *, lengths, iters):
  """The scores part (module docstring), then its table."""
  for t in lengths:
    q, kk, bias, kbar, n = _inputs(t)
    select = jax.jit(lambda q, kk, b: selection.select_blocks(q, kk, b, PAPER))
    xla = score_runs(selection.query_aware_scores, n, t)["chunked"]
    want = xla(q, kbar)
    row = {"part": "scores", "T": t, "H": attention_kernels.HEADS[0],
           "K": attention_kernels.HEADS[1], "D": attention_kernels.HEADS[2],
           "query_chunk": PAPER.query_chunk,
           "selection_s": timing.timeit(select, q, kk, bias, iters=iters),
           "xla_s": timing.timeit(xla, q, kbar, iters=iters)}
    for prec in PRECISIONS:
      runs = score_runs(functools.partial(
          selection.query_aware_scores_pallas, tuning={"precision": prec}),
                        n, t)
      for call, fn in runs.items():
        name = (f"pallas_{prec}" if call == "chunked"
                else f"pallas_full_T_{prec}")
        try:
          row[f"{name}_max_abs_diff_vs_xla"] = _max_diff(fn(q, kbar), want)
          row[f"{name}_s"] = timing.timeit(fn, q, kbar, iters=iters)
        except Exception as e:  # a variant that does not compile is a result
          row[f"{name}_error"] = f"{type(e).__name__}: {e}"[:300]
    print(row, flush=True)
    rows.append(row)
  print(scores_table(rows))


def scores_table(rows) -> str:
  """Markdown table of the scores rows, each against XLA's scores."""
  lines = ["| T | variant | ms | vs XLA | max abs diff vs XLA |",
           "|---|---|---|---|---|"]
  for r in rows:
    if r["part"] != "scores" or "xla_s" not in r:
      continue
    lines += [f"| {r['T']} | full selection | {1e3 * r['selection_s']:.2f} "
              "| - | - |",
              f"| {r['T']} | xla scores | {1e3 * r['xla_s']:.2f} | 1.00x | 0 |"]
    for prec in PRECISIONS:
      for name in (f"pallas_{prec}", f"pallas_full_T_{prec}"):
        if f"{name}_s" in r:
          lines.append(f"| {r['T']} | {name} | {1e3 * r[name + '_s']:.2f} "
                       f"| {r['xla_s'] / r[name + '_s']:.2f}x "
                       f"| {r[name + '_max_abs_diff_vs_xla']:.2g} |")
        else:
          lines.append(f"| {r['T']} | {name} | error | - | - |")
  return "\n".join(lines)


def scores_sweep(rows, *, lengths, iters):
  """The block_scores kernel (tf32) over SCORE_TILINGS at each T, each
  tiling's largest difference from the first's."""
  for t in lengths:
    q, _, _, kbar, n = _inputs(t)
    want = None
    for block_n, warps, block_q, *stages in SCORE_TILINGS:
      tuning = {"precision": "tf32", "num_warps": warps,
                "num_stages": stages[0] if stages else None,
                "block_sizes": selection.ScoreBlockSizes(block_q=block_q,
                                                         block_n=block_n)}
      runs = score_runs(functools.partial(
          selection.query_aware_scores_pallas, tuning=tuning), n, t)
      for call, fn in runs.items():
        row = {"part": "scores_sweep", "T": t, "block_n": block_n,
               "block_q": block_q, "num_warps": warps,
               "num_stages": tuning["num_stages"], "call": call}
        try:
          got = fn(q, kbar)
          want = got if want is None else want
          row["max_abs_diff_vs_first"] = _max_diff(got, want)
          row["seconds"] = timing.timeit(fn, q, kbar, iters=iters)
        except Exception as e:  # a tiling that does not compile is a result
          row["error"] = f"{type(e).__name__}: {e}"[:300]
        print(row, flush=True)
        rows.append(row)


def _masks_by_final_top_k(sq, se, pos, cfg):
  """The session-7 `select_masks_from_scores`: members of the final top-k."""
  idx, valid, pinned = selection.select_from_scores(sq, se, pos, cfg)
  return selection._members(idx, valid, se.shape[-1]), pinned  # pylint: disable=protected-access


def selection_profile(rows, *, lengths, iters):
  """The selection_profile part (module docstring). The replaced variants
  are patched into `selection` for their run and restored after."""
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
  for t in lengths:
    q, kk, bias, _, _ = _inputs(t)
    masks = {}
    for name, patch in variants.items():
      for attr, fn in patch.items():
        setattr(selection, attr, fn)
      try:
        select = jax.jit(lambda q, kk, b: selection.select_block_masks(
            q, kk, b, cfg))
        masks[name] = select(q, kk, bias)
        row = {"part": "selection_profile", "T": t, "variant": name,
               "wall_s": timing.timeit(select, q, kk, bias, iters=iters)}
        row["kernels"], busy_us = timing.kernel_profile(select, (q, kk, bias))
      finally:
        for attr, fn in library.items():
          setattr(selection, attr, fn)
      row["gpu_busy_s"] = busy_us * 1e-6
      row["same_masks_as_library"] = all(
          bool(jnp.array_equal(a, b)) for a, b in zip(
              masks[name], masks["library"], strict=True))
      rows.append(row)
      attention_kernels.print_kernels(
          f"T={t} selection ({name}), same masks "
          f"{row['same_masks_as_library']}", row)
