"""NOSA block selection (NOSA_SPEC.md §2.2-§2.6, §3; project decisions 2-5).

Per query token t and KV head, NOSA attends a set of key blocks of
`block_size` (C) tokens. The set is built from two block scores:

  * query-aware `sq` (§2.3): a per-head softmax of the query against
    mean-pooled compressed keys, summed over the G heads of a group and
    max-pooled to blocks;
  * query-agnostic `se` (§2.4): the eviction bias `b` mean-pooled over the
    same windows and max-pooled to blocks; it does not depend on the query.

The sink blocks, the query's own block and the `window_blocks` blocks before
it are forced (+inf); blocks after the query's own block score -inf. The
variants (project decision 4) rank these scores differently (§2.5):

  nosa:      Q = top-`query_topk_blocks` of sq; final = top-`topk_blocks` of
             se with se[Q] := +inf.
  infllmv2:  top-`topk_blocks` of sq.
  dma:       top-`topk_blocks` of se.
  full:      every causal block.

Everything that selects runs in fp32 under `stop_gradient`; `jax.lax.top_k`
breaks ties toward the lower block index (project decision 2). Queries are
processed in chunks of `query_chunk` so the [T, W] score matrix of a long
sequence is never materialised at once (§2.9 notes). Queries may sit at any
positions of their sequence (`positions_T`; keys are always 0..S-1), so a
chunk of a chunked prefill selects as the whole-sequence pass does.

Ties (NOSA_SPEC §2.5) come in two kinds:

  * Structural: the block max-pool gives blocks j and j+1 the shared
    window 4j+3 (64/32/16), so when that window holds the max both pooled
    scores are equal bit for bit, and top_k keeps the lower block. Every
    score path here computes that window's value once per block from the
    same operands (the Pallas kernel too), so structural ties are broken
    alike and never make two of our paths differ. They are where we differ
    from upstream, whose torch.topk over bf16 scores has no specified tie
    order: on CPU in fp32 with torch's top-k, 944 of 16,384 layer-0 rows at
    8k picked a different block (logits 0.09 apart); with lower-index ties
    on both sides the logits agree to ~3e-6. `score_dtype="bfloat16"`
    rounds the scores as upstream stores them, so its near-ties tie here
    too (still broken toward the lower index).
  * Numerical: the XLA einsum and the Pallas scores kernel (tf32 dots, an
    exp2 softmax) round differently, so a block within that rounding of the
    phase-1 boundary can flip between them; this is the kernel benchmark's
    `selection_pallas_scores_same_mask: False` at T = 32k. With eps a row's
    largest score difference, every flipped pick lies within 2 eps of the
    boundary score; `score_path_agreement` measures rows, eps and that
    ratio, and tests/pallas_kernels/block_scores_test.py checks the bound
    (Pallas interpret on the CPU; T = 32k compiled on the GPU). A wrong
    score (a bug) shows as a large eps or a ratio above 2, not as a tie.
    Measured (H100, 2026-12-07, the benchmark's T = 32k local mask): 3 of
    65,536 rows differ (6 picks), eps 3.0e-8, worst ratio 0.5: rounding.

`locality_penalty` (project decision 5, not in the paper) is the one
differentiable function here, exact or (`locality_sample_fraction` < 1)
estimated without bias from a random share of its query segments;
`locality_statistics` measures the step-to-step overlap of §3.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from nosa_jax import config as config_lib
from nosa_jax import implementations
from nosa_jax import sharding
import pallas_kernels

# Tiling of the scores kernel, for callers that tune it (`tuning=`).
ScoreBlockSizes = pallas_kernels.ScoreBlockSizes

_F32 = jnp.float32
_INF = float("inf")
# Floor for the log of a pooled probability in the locality penalty.
_TINY = 1e-30


# ------------------------------------------------------------------------------
# Sizes and pooling (§2.0, §2.3 steps 1 and 4, §2.4 steps 1-2).
# ------------------------------------------------------------------------------


def num_windows(length: int, kernel: int, stride: int) -> int:
  """W: complete windows [stride*c, stride*c + kernel) in `length` tokens."""
  if length < kernel:
    return 0
  return (length - kernel) // stride + 1


def num_blocks(length: int, block_size: int) -> int:
  """N = ceil(length / block_size)."""
  return -(-length // block_size)


def _window_mean(x: jax.Array, kernel: int, stride: int) -> jax.Array:
  """Mean of `x` over complete windows along axis 1, in fp32."""
  w = num_windows(x.shape[1], kernel, stride)
  x = x.astype(_F32)
  if w == 0:
    return jnp.zeros((x.shape[0], 0) + x.shape[2:], _F32)
  rest = (1,) * (x.ndim - 2)
  # A sum reduce_window has a transpose rule, so the locality penalty can
  # differentiate through the compressed keys.
  total = jax.lax.reduce_window(
      x, 0.0, jax.lax.add, window_dimensions=(1, kernel) + rest,
      window_strides=(1, stride) + rest, padding="VALID")
  return total / kernel


def compress_keys(k_BTKD: jax.Array, kernel: int, stride: int) -> jax.Array:
  """Mean-pooled compressed keys (§2.3 step 1).

  Args:
    k_BTKD: keys (RoPE applied), any float dtype.
    kernel: window length in tokens (`compress_kernel`).
    stride: window stride in tokens (`compress_stride`).

  Returns:
    kbar_BWKD in fp32, kbar[:, c] = mean(k[:, stride*c : stride*c + kernel]),
    complete windows only: W = (T - kernel) // stride + 1, or 0 if T < kernel.
  """
  return _window_mean(k_BTKD, kernel, stride)


def window_means(x_BTK: jax.Array, kernel: int, stride: int) -> jax.Array:
  """The pooling of `compress_keys` for per-token scalars (§2.4 step 1).

  Args:
    x_BTK: per-token values, e.g. the eviction bias.
    kernel: window length in tokens.
    stride: window stride in tokens.

  Returns:
    x_BWK in fp32.
  """
  return _window_mean(x_BTK, kernel, stride)


def block_pool(x: jax.Array, *, num_blocks: int, block_size: int,
               kernel: int, stride: int) -> jax.Array:
  """Max over the compressed windows that overlap each block (§2.3 step 4).

  Window c overlaps block j iff stride*c < C*(j+1) and
  stride*c + kernel > C*j, i.e. c in [r*j - a, r*j + r - 1] with
  r = C // stride and a = ceil(kernel / stride) - 1; for 64/32/16 this is
  [4j-1, 4j+3]. Windows outside [0, W) are ignored; a block without any
  window scores -inf.

  Args:
    x: [..., W] window scores.
    num_blocks: N, the number of output blocks.
    block_size: C; must be a multiple of `stride`.
    kernel: window length in tokens.
    stride: window stride in tokens.

  Returns:
    [..., N] block scores, dtype of x.
  """
  r = block_size // stride
  lead = -(-kernel // stride) - 1  # Windows starting before the block.
  width = r + lead                 # Windows per block.
  w = x.shape[-1]
  span = r * (num_blocks - 1) + 1
  pad_hi = max(0, span + width - 1 - lead - w)
  pad = [(0, 0)] * (x.ndim - 1) + [(lead, pad_hi)]
  x_pad = jnp.pad(x, pad, constant_values=-_INF)
  # Padded position r*j + o holds window r*j - lead + o.
  out = None
  for o in range(width):
    part = jax.lax.slice_in_dim(x_pad, o, o + span, stride=r, axis=x.ndim - 1)
    out = part if out is None else jnp.maximum(out, part)
  return out


# ------------------------------------------------------------------------------
# Scores (§2.2-§2.4).
# ------------------------------------------------------------------------------


def eviction_bias(v_BTKD: jax.Array, a_K: jax.Array, delta_w: jax.Array,
                  delta_b: Optional[jax.Array] = None) -> jax.Array:
  """The ED-DMA eviction bias (§2.2), in fp32.

  b[t, h] = A[h] * softplus(<delta_w[:, h], concat_h' v[t, h', :]> + db[h]).

  Args:
    v_BTKD: values (no RoPE).
    a_K: per-KV-head gain A (initialised to 0 in the paper).
    delta_w: [K*D, K] projection (the HF `delta.weight` [K, K*D] transposed).
    delta_b: optional [K] bias of the projection.

  Returns:
    bias_BTK in fp32: the additive logit bias and the eviction score.
  """
  b, t, k, d = v_BTKD.shape
  u = v_BTKD.reshape(b, t, k * d).astype(_F32)  # concat over KV heads
  z_BTK = jnp.dot(u, delta_w.astype(_F32))
  if delta_b is not None:
    z_BTK = z_BTK + delta_b.astype(_F32)[None, None, :]
  return a_K.astype(_F32)[None, None, :] * jax.nn.softplus(z_BTK)


def _masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the last axis restricted to `mask`; empty rows give 0."""
  logits = jnp.where(mask, logits, -_INF)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  e = jnp.where(mask, jnp.exp(logits - m), 0.0)
  z = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(z > 0, z, 1.0)


def query_aware_scores(q_BTHD: jax.Array, kbar_BWKD: jax.Array,
                       positions_T: jax.Array, cfg: config_lib.SparseConfig,
                       n_blocks: int) -> jax.Array:
  """Query-aware block scores sq (§2.3 steps 2-4), fp32, differentiable.

  p[t, g, c] = softmax_c(<q[t, g], kbar[c]> / sqrt(D)) over the windows
  visible to t (stride*c + kernel - 1 <= t); a row without any visible
  window gives 0. S[t, h, c] = sum of p over the G heads of group h, and
  sq[t, h, j] = max of S over the windows overlapping block j.

  Args:
    q_BTHD: queries (RoPE applied).
    kbar_BWKD: compressed keys from `compress_keys`.
    positions_T: int token positions of the T queries.
    cfg: selection constants.
    n_blocks: N.

  Returns:
    sq_BKTN in fp32 (no forced or causal masking applied).
  """
  b, t, h, d = q_BTHD.shape
  w, k = kbar_BWKD.shape[1], kbar_BWKD.shape[2]
  if w == 0:
    return jnp.full((b, k, t, n_blocks), -_INF, _F32)
  q_BTKGD = q_BTHD.astype(_F32).reshape(b, t, k, h // k, d)
  if t == 1:
    # Decode (one query). As the einsum below, XLA made two transposed fp32
    # copies of kbar per layer for its batch-major GEMM layout, and a
    # multiply-reduce re-read kbar once per G (both timed in
    # experiments/results/decode/NOTES.md). Here kbar keeps its stored layout
    # as the [W, K*D] operand of one GEMM against a block-diagonal
    # [K*D, K*G] query matrix: kbar is read once; the zeros cost K-fold
    # FLOPs of a memory-bound step. Inputs stay in their dtype (bf16
    # products are exact in fp32) with fp32 accumulation.
    dt = jnp.promote_types(q_BTHD.dtype, kbar_BWKD.dtype)
    q_BKGD = q_BTHD[:, 0].astype(dt).reshape(b, k, h // k, d)
    eye_KK = jnp.eye(k, dtype=dt)
    qbd_BCX = jnp.einsum("BKGD,KL->BKDLG", q_BKGD, eye_KK).reshape(
        b, k * d, k * (h // k))
    logits_BWX = jnp.einsum(
        "BWC,BCX->BWX", kbar_BWKD.astype(dt).reshape(b, w, k * d), qbd_BCX,
        precision=jax.lax.Precision.HIGHEST, preferred_element_type=_F32)
    logits_BKGTW = jnp.moveaxis(
        logits_BWX.reshape(b, w, k, h // k), 1, -1)[:, :, :, None, :]
    logits_BKGTW = logits_BKGTW / math.sqrt(d)
  else:
    logits_BKGTW = jnp.einsum("BTKGD,BWKD->BKGTW", q_BTKGD,
                              kbar_BWKD.astype(_F32)) / math.sqrt(d)
  c_W = jnp.arange(w)
  # Causal visibility: the whole window lies at or before t (§2.3 step 2).
  visible_TW = (cfg.compress_stride * c_W[None, :] + cfg.compress_kernel - 1
                <= positions_T[:, None])
  p_BKGTW = _masked_softmax(logits_BKGTW, visible_TW[None, None, None])
  s_BKTW = jnp.sum(p_BKGTW, axis=2)  # GQA: sum of probabilities (step 3)
  return block_pool(s_BKTW, num_blocks=n_blocks, block_size=cfg.block_size,
                    kernel=cfg.compress_kernel, stride=cfg.compress_stride)


def query_aware_scores_pallas(q_BTHD: jax.Array, kbar_BWKD: jax.Array,
                              positions_T: jax.Array,
                              cfg: config_lib.SparseConfig, n_blocks: int,
                              *, tuning: Optional[dict] = None) -> jax.Array:
  """`query_aware_scores` by the Pallas kernel `pallas_kernels.block_scores`.

  With `cfg.score_implementation="pallas"`, training / prefill selection
  (`select_blocks`) uses it, run per batch shard under a mesh;
  `experiments.kernel_bench --parts=scores` times it against the XLA path.
  Same arguments and result. The logit dot runs at "tf32" unless `tuning`
  says otherwise: that is what XLA's default precision does for the fp32
  dots of `query_aware_scores` on the GPU (agreement and speed against
  the XLA scores and "highest": experiments/results/kernels/NOTES.md).
  On the CPU "tf32" is an fp32 dot. No
  gradient (the kernel has no VJP, so `locality_penalty` keeps the XLA
  path).

  Args:
    q_BTHD, kbar_BWKD, positions_T, cfg, n_blocks: as `query_aware_scores`.
    tuning: optional keyword options of `pallas_kernels.block_scores`
      (block_sizes, precision, num_warps, num_stages); off the GPU the
      kernel runs in Pallas interpret mode (slow; `implementations`).

  Returns:
    sq_BKTN in fp32 (no forced or causal masking applied).
  """
  kernel = implementations.kernel("block_scores", "pallas",
                                  **{"precision": "tf32", **(tuning or {})})
  return kernel(
      jax.lax.stop_gradient(q_BTHD), jax.lax.stop_gradient(kbar_BWKD),
      positions_T, n_blocks, cfg.block_size, cfg.compress_kernel,
      cfg.compress_stride)


def query_agnostic_scores(bias_BTK: jax.Array, cfg: config_lib.SparseConfig,
                          n_blocks: int) -> jax.Array:
  """Query-agnostic block scores se (§2.4 steps 1-2), fp32.

  Args:
    bias_BTK: eviction bias from `eviction_bias`.
    cfg: selection constants.
    n_blocks: N.

  Returns:
    se_BKN: max over overlapping windows of the window-mean bias.
  """
  ebar_BWK = window_means(bias_BTK, cfg.compress_kernel, cfg.compress_stride)
  return block_pool(jnp.transpose(ebar_BWK, (0, 2, 1)), num_blocks=n_blocks,
                    block_size=cfg.block_size, kernel=cfg.compress_kernel,
                    stride=cfg.compress_stride)


def forced_and_future(positions_T: jax.Array, n_blocks: int,
                      cfg: config_lib.SparseConfig):
  """Forced (+inf) and future (-inf) blocks per query (§2.3 step 5, §2.4).

  Block j is future for query t iff j > j_t = t // C (project decision 2);
  it is forced iff it is not future and j < sink_blocks or
  j_t - window_blocks <= j <= j_t. Future wins over sink.

  Returns:
    (forced_TN, future_TN) bool arrays.
  """
  j_N = jnp.arange(n_blocks)
  jt_T = positions_T // cfg.block_size
  future_TN = j_N[None, :] > jt_T[:, None]
  window_TN = j_N[None, :] >= jt_T[:, None] - cfg.window_blocks
  sink_TN = jnp.broadcast_to(j_N[None, :] < cfg.sink_blocks, future_TN.shape)
  forced_TN = (sink_TN | window_TN) & ~future_TN
  return forced_TN, future_TN


def _members(idx_BKTP: jax.Array, valid_BKTP: jax.Array,
             n_blocks: int) -> jax.Array:
  """[B, K, T, N] bool: block j is among the valid entries of idx.

  A scatter-add of the P entries of each row (invalid ones into a spare
  column N): O(T P) work, where comparing every entry with every block
  (`_members_by_compare`, the reference) is O(T P N). Written per row and
  vmapped, so the scatter carries B, K, T as batching dimensions and XLA's
  partitioner keeps a batch-sharded selection local (explicit index
  arrays for B, K, T compiled to an all-reduce on a 4-device mesh).
  """
  def row(idx_P, valid_P):
    hits_N = jnp.zeros((n_blocks + 1,), jnp.int32).at[
        jnp.where(valid_P, idx_P, n_blocks)].add(1)
    return hits_N[:n_blocks] > 0

  return jax.vmap(jax.vmap(jax.vmap(row)))(idx_BKTP, valid_BKTP)


def _members_by_compare(idx_BKTP: jax.Array, valid_BKTP: jax.Array,
                        n_blocks: int) -> jax.Array:
  """`_members` by comparing each entry with each block (its reference)."""
  j_N = jnp.arange(n_blocks)
  hit = (idx_BKTP[..., None] == j_N[None, None, None, None, :])
  return jnp.any(hit & valid_BKTP[..., None], axis=-2)


def _ranked(s, cfg: config_lib.SparseConfig):
  """Scores as the top-k ranks them: fp32, or rounded to bf16 first
  (`score_dtype`; rounding is monotone, so it only merges near-ties)."""
  if s is None or cfg.score_dtype == "float32":
    return s
  return s.astype(jnp.bfloat16).astype(_F32)


def _with_forced(s_BKTN, forced, future, shape):
  """Scores broadcast to `shape` (fp32), forced blocks +inf, future -inf."""
  s_BKTN = jnp.broadcast_to(s_BKTN.astype(_F32), shape)
  return jnp.where(future, -_INF, jnp.where(forced, _INF, s_BKTN))


def _query_picks(sq_forced_BKTN: jax.Array, jt: jax.Array,
                 cfg: config_lib.SparseConfig) -> jax.Array:
  """NOSA phase 1, Q(t) as a [B, K, T, N] mask: the query_topk_blocks best
  of the query-aware scores with the forced (+inf) and future (-inf)
  blocks set. When fewer than that are causal, top_k also returns future
  blocks; they are dropped by the validity check (block <= jt)."""
  n = sq_forced_BKTN.shape[-1]
  _, q_idx = jax.lax.top_k(sq_forced_BKTN, min(cfg.query_topk_blocks, n))
  return _members(q_idx, q_idx <= jt, n)


def select_from_scores(sq_BKTN: Optional[jax.Array],
                       se_BKN: Optional[jax.Array], positions_T: jax.Array,
                       cfg: config_lib.SparseConfig):
  """The top-k rules of §2.5 / project decision 4 on given block scores.

  Args:
    sq_BKTN: query-aware scores (unused for `dma`).
    se_BKN: query-agnostic scores (unused for `infllmv2`).
    positions_T: int token positions of the T queries.
    cfg: `cfg.variant` in infllmv2 / dma / nosa.

  Returns:
    idx_BKTP int32 block indices, ascending, invalid slots last and set to -1;
    valid_BKTP bool; pinned_BKTN bool, the blocks ranked +inf in the last
    top-k (forced blocks plus, for nosa, the phase-1 query-aware set Q(t);
    every selected block for infllmv2).
    P = min(topk_blocks, N); a slot is valid iff its block is <= t // C.
  """
  sq_BKTN, se_BKN = _ranked(sq_BKTN, cfg), _ranked(se_BKN, cfg)
  src = sq_BKTN if sq_BKTN is not None else se_BKN
  n = src.shape[-1]
  b, k = src.shape[0], src.shape[1]
  t = positions_T.shape[0]
  forced_TN, future_TN = forced_and_future(positions_T, n, cfg)
  forced = forced_TN[None, None]
  future = future_TN[None, None]
  jt_T = positions_T // cfg.block_size
  jt = jt_T[None, None, :, None]
  shape = (b, k, t, n)

  def with_forced(s_BKTN):
    return _with_forced(s_BKTN, forced, future, shape)

  if not cfg.is_sparse:
    raise ValueError(f"select_from_scores: unsupported variant "
                     f"{cfg.variant!r}")
  if not cfg.has_eviction_head:  # infllmv2: query-aware only
    final_BKTN = with_forced(sq_BKTN)
    pinned_BKTN = None
  elif not cfg.query_aware:  # dma: eviction score only
    final_BKTN = with_forced(se_BKN[:, :, None, :])
    pinned_BKTN = jnp.broadcast_to(forced, shape)
  else:  # nosa: two phases
    pinned_BKTN = _query_picks(with_forced(sq_BKTN), jt, cfg)
    # Phase 2: query-aware picks always survive; the rest by eviction score.
    final_BKTN = jnp.where(pinned_BKTN, _INF,
                           with_forced(se_BKN[:, :, None, :]))
  _, idx = jax.lax.top_k(final_BKTN, min(cfg.topk_blocks, n))
  valid = idx <= jt
  # Sort ascending with invalid slots last (§2.5 "sort; entries > j_t -> -1").
  idx = jnp.sort(jnp.where(valid, idx, n), axis=-1)
  valid = idx < n
  idx = jnp.where(valid, idx, -1).astype(jnp.int32)
  if pinned_BKTN is None:
    pinned_BKTN = _members(idx, valid, n)
  return idx, valid, pinned_BKTN


def select_masks_from_scores(sq_BKTN: Optional[jax.Array],
                             se_BKN: Optional[jax.Array],
                             positions_T: jax.Array,
                             cfg: config_lib.SparseConfig):
  """`select_from_scores` as block masks: (mask_BKTN, pinned_BKTN).

  The same blocks as `_members` of its indices. For dma and nosa the final
  top-k is not run: its scores are +inf on the pinned and forced blocks
  (at most topk_blocks of them: the config guarantees forced <=
  query_topk_blocks <= topk_blocks), -inf on the future ones and the
  query-independent se elsewhere. So it takes every +inf block and fills
  the room left with the causal rest in one order of se per (B, K)
  (descending, ties to the lower block index, -inf last, as top_k ranks
  them). A block's rank in that order among a query's candidates is a 0/1
  matmul, candidates [T, N] x precedes [N, N] (exact: bf16 0/1 operands,
  fp32 sums), instead of a sort of N values per query. infllmv2 (whose
  final scores depend on the query) keeps the top-k.
  """
  sq_BKTN, se_BKN = _ranked(sq_BKTN, cfg), _ranked(se_BKN, cfg)
  if not cfg.has_eviction_head:
    idx, valid, pinned_BKTN = select_from_scores(sq_BKTN, se_BKN,
                                                 positions_T, cfg)
    n = (se_BKN if sq_BKTN is None else sq_BKTN).shape[-1]
    return _members(idx, valid, n), pinned_BKTN
  b, k, n = se_BKN.shape
  t = positions_T.shape[0]
  forced_TN, future_TN = forced_and_future(positions_T, n, cfg)
  forced = forced_TN[None, None]
  future = future_TN[None, None]
  shape = (b, k, t, n)
  if cfg.query_aware:  # nosa (dma has no query-aware phase)
    jt = (positions_T // cfg.block_size)[None, None, :, None]
    pinned_BKTN = _query_picks(_with_forced(sq_BKTN, forced, future, shape),
                               jt, cfg)
  else:
    pinned_BKTN = jnp.broadcast_to(forced, shape)
  top = pinned_BKTN | forced  # the +inf entries of the final top-k
  room_BKT = (min(cfg.topk_blocks, n)
              - jnp.sum(top, axis=-1, dtype=jnp.int32))
  rest = ~top & ~future
  se = se_BKN.astype(_F32)
  j_N = jnp.arange(n)
  # precedes[i, j]: block i ranks before block j in the final top-k.
  precedes_BKNN = ((se[..., :, None] > se[..., None, :])
                   | ((se[..., :, None] == se[..., None, :])
                      & (j_N[:, None] < j_N[None, :])[None, None]))
  before_BKTN = jnp.einsum(
      "bktn,bknm->bktm", rest.astype(jnp.bfloat16),
      precedes_BKNN.astype(jnp.bfloat16), preferred_element_type=_F32)
  take_rest = rest & (before_BKTN < room_BKT[..., None].astype(_F32))
  return top | take_rest, pinned_BKTN


# ------------------------------------------------------------------------------
# Chunked selection (public entry points).
# ------------------------------------------------------------------------------


def _map_query_chunks(fn: Callable, q_BTHD: jax.Array, chunk: int,
                      positions_T: Optional[jax.Array] = None):
  """Applies fn(q_chunk, positions) to query chunks; concatenates along T.

  `fn` returns a pytree of [B, K, Tc, ...] arrays. T is padded up to a
  multiple of the chunk (padded queries, at the last query's position, are
  sliced off again). positions_T: the queries' positions (default 0..T-1).
  """
  b, t, h, d = q_BTHD.shape
  if positions_T is None:
    positions_T = jnp.arange(t)
  tc = min(chunk, t)
  n = -(-t // tc)
  if n == 1:
    return fn(q_BTHD, positions_T)
  q_pad = jnp.pad(q_BTHD, ((0, 0), (0, n * tc - t), (0, 0), (0, 0)))
  q_nBTHD = jnp.moveaxis(q_pad.reshape(b, n, tc, h, d), 1, 0)
  pos_nT = jnp.pad(positions_T, (0, n * tc - t), mode="edge").reshape(n, tc)
  out = jax.lax.map(lambda args: fn(*args), (q_nBTHD, pos_nT))

  def merge(x):  # [n, B, K, Tc, ...] -> [B, K, T, ...]
    x = jnp.moveaxis(x, 0, 2)
    x = x.reshape(x.shape[:2] + (n * tc,) + x.shape[4:])
    return x[:, :, :t]

  return jax.tree.map(merge, out)


def _selection_chunk_fn(q_BTHD, k_BTKD, bias_BTK, cfg, n_blocks,
                        masks=False):
  """Returns fn(q_chunk, positions) -> (idx, valid, pinned) for one chunk,
  or -> (mask, pinned) with `masks`."""
  sg = jax.lax.stop_gradient
  kbar_BWKD = None
  se_BKN = None
  if cfg.query_aware:
    kbar_BWKD = compress_keys(sg(k_BTKD), cfg.compress_kernel,
                              cfg.compress_stride)
  if cfg.has_eviction_head:
    if bias_BTK is None:
      raise ValueError(f"variant {cfg.variant!r} selects on the eviction "
                       "bias; bias_BTK must not be None")
    se_BKN = query_agnostic_scores(sg(bias_BTK), cfg, n_blocks)

  scores = implementations.from_config("block_scores", cfg)

  def fn(q_chunk_BTHD, positions_T):
    sq_BKTN = None
    if kbar_BWKD is not None and scores == "pallas":
      # Batch-first arguments for `batch_parallel` (positions per row).
      pos_BT = jnp.broadcast_to(positions_T, q_chunk_BTHD.shape[:2])
      sq_BKTN = sharding.batch_parallel(
          lambda q, kbar, pos: query_aware_scores_pallas(
              q, kbar, pos[0], cfg, n_blocks),
          sg(q_chunk_BTHD), kbar_BWKD, pos_BT, head_dims=(2, 2, None),
          out_head_dim=1)
    elif kbar_BWKD is not None:
      sq_BKTN = query_aware_scores(sg(q_chunk_BTHD), kbar_BWKD, positions_T,
                                   cfg, n_blocks)
    if masks:
      return select_masks_from_scores(sq_BKTN, se_BKN, positions_T, cfg)
    return select_from_scores(sq_BKTN, se_BKN, positions_T, cfg)

  return fn


def _check_shapes(q_BTHD, k_BSKD, bias_BSK, positions_T=None):
  """Shapes of a selection call; returns positions_T (default 0..T-1)."""
  b, t, h, _ = q_BTHD.shape
  s = k_BSKD.shape[1]
  if positions_T is None and s != t:
    raise ValueError(f"q {q_BTHD.shape} and k {k_BSKD.shape} have different "
                     "lengths: pass positions_T, the queries' positions")
  if k_BSKD.shape[0] != b or h % k_BSKD.shape[2]:
    raise ValueError(f"q {q_BTHD.shape} and k {k_BSKD.shape} do not match "
                     "(need the same B and H divisible by K)")
  if bias_BSK is not None and bias_BSK.shape != k_BSKD.shape[:3]:
    raise ValueError(f"bias {bias_BSK.shape} != {k_BSKD.shape[:3]}")
  if positions_T is None:
    return jnp.arange(t)
  if positions_T.shape != (t,):
    raise ValueError(f"positions_T {positions_T.shape} != ({t},)")
  return positions_T


def select_blocks(q_BTHD: jax.Array, k_BSKD: jax.Array,
                  bias_BSK: Optional[jax.Array],
                  cfg: config_lib.SparseConfig,
                  positions_T: Optional[jax.Array] = None):
  """Selected blocks per (query, KV head) (§2.5), no gradient.

  The keys are the sequence from its first token: key s sits at position s
  and block j covers positions [j*C, (j+1)*C). The queries may be any
  positions of that sequence (a chunk of a chunked prefill: queries
  p..p+Tc-1 against the keys 0..S-1, S >= p + Tc); each selects exactly as
  it would in a pass over the whole sequence.

  Args:
    q_BTHD: queries (RoPE applied).
    k_BSKD: keys (RoPE applied) at positions 0..S-1.
    bias_BSK: eviction bias of the keys; required for dma / nosa, ignored
      otherwise.
    cfg: selection constants and variant.
    positions_T: int positions of the queries, each < S; default 0..T-1
      (then S must equal T).

  Returns:
    idx_BKTP int32 (ascending, invalid slots last and -1) and valid_BKTP
    bool, with N = ceil(S / C) and P = min(topk_blocks, N). For `full`,
    P = N and every causal block is valid. The query at position t always
    gets exactly min(topk_blocks, t // C + 1) valid blocks.
  """
  positions_T = _check_shapes(q_BTHD, k_BSKD, bias_BSK, positions_T)
  b, t = q_BTHD.shape[:2]
  k = k_BSKD.shape[2]
  n = num_blocks(k_BSKD.shape[1], cfg.block_size)
  if not cfg.is_sparse:
    j_N = jnp.arange(n, dtype=jnp.int32)
    valid_TN = j_N[None, :] <= (positions_T // cfg.block_size)[:, None]
    idx = jnp.where(valid_TN, j_N[None, :], -1)
    return (jnp.broadcast_to(idx[None, None], (b, k, t, n)),
            jnp.broadcast_to(valid_TN[None, None], (b, k, t, n)))
  fn = _selection_chunk_fn(q_BTHD, k_BSKD, bias_BSK, cfg, n)
  return _map_query_chunks(lambda q, p: fn(q, p)[:2], q_BTHD,
                           cfg.query_chunk, positions_T)


def select_block_masks(q_BTHD: jax.Array, k_BSKD: jax.Array,
                       bias_BSK: Optional[jax.Array],
                       cfg: config_lib.SparseConfig,
                       positions_T: Optional[jax.Array] = None):
  """Block masks of the selection and of its query-position part.

  Args: as `select_blocks`.

  Returns:
    mask_BKTN: True iff the query at position t attends block j through KV
      head k; never True for j > t // C. N = ceil(S / C).
    pinned_BKTN: the subset ranked +inf before the final top-k: the forced
      blocks plus, for nosa, the phase-1 query-aware picks Q(t). For
      infllmv2 and full it equals mask_BKTN; for dma it is the forced set.
  """
  positions_T = _check_shapes(q_BTHD, k_BSKD, bias_BSK, positions_T)
  n = num_blocks(k_BSKD.shape[1], cfg.block_size)
  if not cfg.is_sparse:
    b, t, k = q_BTHD.shape[0], q_BTHD.shape[1], k_BSKD.shape[2]
    _, future_TN = forced_and_future(positions_T, n, cfg)
    mask = jnp.broadcast_to(~future_TN[None, None], (b, k, t, n))
    return mask, mask
  fn = _selection_chunk_fn(q_BTHD, k_BSKD, bias_BSK, cfg, n, masks=True)
  return _map_query_chunks(fn, q_BTHD, cfg.query_chunk, positions_T)


def block_mask(q_BTHD: jax.Array, k_BSKD: jax.Array,
               bias_BSK: Optional[jax.Array],
               cfg: config_lib.SparseConfig,
               positions_T: Optional[jax.Array] = None) -> jax.Array:
  """mask_BKTN bool of the selected blocks (§2.6), no gradient.

  Args: as `select_blocks`.

  Returns:
    mask_BKTN with N = ceil(S / C): True iff the query at position t attends
    block j through KV head k (all G query heads of the group share it);
    never True for j > t // C. For `full`, every causal block is True.
  """
  return select_block_masks(q_BTHD, k_BSKD, bias_BSK, cfg, positions_T)[0]


# ------------------------------------------------------------------------------
# Ties: where two computations of the query-aware scores select differently.
# ------------------------------------------------------------------------------


def _phase1_rows(sq_a_BKTN, sq_b_BKTN, positions_T, cfg):
  """Per row (b, k, t) of two score arrays: whether the phase-1 picks Q(t)
  differ, eps = max |a - b| over the blocks both score finitely, and the
  largest |a_j - kth_a| / eps over the picks j in one set only (kth_a the
  query_topk_blocks-th largest of a with the forced blocks at +inf)."""
  b, k, t, n = sq_a_BKTN.shape
  forced_TN, future_TN = forced_and_future(positions_T, n, cfg)
  forced, future = forced_TN[None, None], future_TN[None, None]
  fa = _with_forced(sq_a_BKTN, forced, future, (b, k, t, n))
  fb = _with_forced(sq_b_BKTN, forced, future, (b, k, t, n))
  jt = (positions_T // cfg.block_size)[None, None, :, None]
  diff = _query_picks(fa, jt, cfg) ^ _query_picks(fb, jt, cfg)
  both = jnp.isfinite(fa) & jnp.isfinite(fb)
  eps = jnp.max(jnp.where(both, jnp.abs(fa - fb), 0.0), axis=-1)
  kth = jax.lax.top_k(fa, min(cfg.query_topk_blocks, n))[0][..., -1:]
  gap = jnp.where(diff & both & jnp.isfinite(kth), jnp.abs(fa - kth), 0.0)
  ratio = jnp.max(gap, axis=-1) / jnp.where(eps > 0, eps, 1.0)
  return jnp.any(diff, axis=-1), jnp.sum(diff, axis=-1), eps, ratio


def score_path_agreement(q_BTHD: jax.Array, k_BTKD: jax.Array,
                         bias_BTK: Optional[jax.Array],
                         cfg: config_lib.SparseConfig, *,
                         tuning: Optional[dict] = None) -> dict:
  """How the selection of the Pallas scores differs from the XLA scores'.

  Both score paths compute the same sq up to rounding (the kernel's tf32
  dots and exp2 softmax against XLA's einsum; NOTES: about 1e-6 apart at
  the paper's sizes), so a pick can flip only where two blocks' scores lie
  within that rounding of the phase-1 boundary. This measures it: with
  eps the row's largest score difference, every block in one phase-1 set
  but not the other lies within 2 eps of the boundary score of the XLA
  scores (if a's top-k all have b >= kth_a - eps, then kth_b >= kth_a -
  eps, so a pick of b only has a_j >= b_j - eps >= kth_a - 2 eps; the
  other side is symmetric). A larger ratio, or a large eps, is a bug, not
  a tie. Structural ties (adjacent blocks sharing window 4j+3, NOSA_SPEC
  §2.5) are exact in both paths and broken alike (lower index), so they
  never differ.

  Args:
    q_BTHD, k_BTKD, bias_BTK: as `select_block_masks` (query-aware variant).
    cfg: selection constants (score_implementation is ignored).
    tuning: options of the scores kernel (`query_aware_scores_pallas`).

  Returns:
    fp32 / int32 scalars: rows (B*K*T), mask_rows_differ (rows whose final
    block masks differ), query_rows_differ (rows whose phase-1 sets
    differ), picks_differ (blocks in one phase-1 set only), max_eps (the
    largest score difference), worst_gap_over_eps (max over differing
    picks of |a_j - kth_a| / eps; at most 2 by the argument above).
  """
  if not cfg.query_aware:
    raise ValueError(f"variant {cfg.variant!r} has no query-aware scores")
  positions_T = _check_shapes(q_BTHD, k_BTKD, bias_BTK)
  n = num_blocks(k_BTKD.shape[1], cfg.block_size)
  sg = jax.lax.stop_gradient
  kbar_BWKD = compress_keys(sg(k_BTKD), cfg.compress_kernel,
                            cfg.compress_stride)
  se_BKN = (query_agnostic_scores(sg(bias_BTK), cfg, n)
            if cfg.has_eviction_head else None)

  def chunk(q_c, pos_T):
    sq_x = query_aware_scores(sg(q_c), kbar_BWKD, pos_T, cfg, n)
    sq_p = query_aware_scores_pallas(q_c, kbar_BWKD, pos_T, cfg, n,
                                     tuning=tuning)
    m_x = select_masks_from_scores(sq_x, se_BKN, pos_T, cfg)[0]
    m_p = select_masks_from_scores(sq_p, se_BKN, pos_T, cfg)[0]
    return (jnp.any(m_x != m_p, axis=-1),) + _phase1_rows(sq_x, sq_p, pos_T,
                                                          cfg)

  mask_d, q_d, picks, eps, ratio = _map_query_chunks(chunk, q_BTHD,
                                                     cfg.query_chunk,
                                                     positions_T)
  return {"rows": jnp.asarray(mask_d.size, jnp.int32),
          "mask_rows_differ": jnp.sum(mask_d, dtype=jnp.int32),
          "query_rows_differ": jnp.sum(q_d, dtype=jnp.int32),
          "picks_differ": jnp.sum(picks, dtype=jnp.int32),
          "max_eps": jnp.max(eps),
          "worst_gap_over_eps": jnp.max(ratio)}


# ------------------------------------------------------------------------------
# Locality (§3) and the locality penalty (project decision 5).
# ------------------------------------------------------------------------------


def locality_statistics(mask_BKTN: jax.Array, pinned_BKTN: jax.Array,
                        topk_blocks: int) -> dict[str, jax.Array]:
  """Step-to-step overlap of the selection (§3), as fp32 scalars.

  A pair (t-1, t) of one (sequence, KV head) counts when both positions
  hold a full budget, |sel(t)| = |sel(t-1)| = topk_blocks; before that every
  causal block is selected and the overlap is trivially total.

  Returns:
    gamma: mean over counted pairs of |sel(t) & sel(t-1)| / |sel(t)|, the
      decode cache hit rate of §3 (1.0 when no pair counts).
    changed_query_picks: mean over counted pairs of the blocks entering
      sel(t) (not in sel(t-1)) that are pinned at t (forced or phase-1
      query-aware; every pick for infllmv2 / full).
    changed_agnostic_picks: the same for blocks entering through the
      query-agnostic ranking (eviction score); 0 for infllmv2 / full.
      On counted pairs changed_query + changed_agnostic = P * (1 - gamma).
    locality_pairs: fraction of the (b, k, t >= 1) pairs counted.
  """
  cur = mask_BKTN[:, :, 1:]
  prev = mask_BKTN[:, :, :-1]
  counted = ((jnp.sum(cur, axis=-1) == topk_blocks)
             & (jnp.sum(prev, axis=-1) == topk_blocks))
  entering = cur & ~prev
  inter = jnp.sum(cur & prev, axis=-1)
  enter_q = jnp.sum(entering & pinned_BKTN[:, :, 1:], axis=-1)
  enter_a = jnp.sum(entering & ~pinned_BKTN[:, :, 1:], axis=-1)
  n_pairs = jnp.sum(counted).astype(_F32)
  denom = jnp.maximum(n_pairs, 1.0)

  def mean(x):
    return jnp.sum(jnp.where(counted, x, 0)).astype(_F32) / denom

  stats = {
      "gamma": jnp.where(n_pairs > 0, mean(inter) / topk_blocks, 1.0),
      "changed_query_picks": mean(enter_q),
      "changed_agnostic_picks": mean(enter_a),
      "locality_pairs": n_pairs / max(1, counted.size),
  }
  return jax.tree.map(jax.lax.stop_gradient, stats)


def locality_penalty(q_BTHD: jax.Array, k_BTKD: jax.Array,
                     cfg: config_lib.SparseConfig,
                     temperature: float = 1.0,
                     key: Optional[jax.Array] = None) -> jax.Array:
  """Differentiable locality penalty (project decision 5; not in the paper).

  A soft version of the query-aware selection compared between consecutive
  queries. For each sequence b, KV head k and pair (t-1, t), t >= 1, let
  U(t) = {j : sink_blocks <= j <= j_{t-1} - window_blocks - 1}, the blocks
  that are selectable (not forced) at both t-1 and t. With sq the pooled
  query-aware scores of `query_aware_scores` (computed WITH gradient),

    p_u(j) = sq[u, k, j]^(1/tau) / sum_{j' in U(t)} sq[u, k, j']^(1/tau)
           = softmax_{j in U(t)}(log sq[u, k, j] / tau),   u in {t-1, t},

    penalty = mean over (b, k, t) with U(t) nonempty of
              0.5 * sum_{j in U(t)} |p_t(j) - p_{t-1}(j)|   (total variation).

  It is 0 when consecutive queries rank the free blocks alike and at most 1.
  Gradient reaches q and k (through the compressed keys). Computed in query
  chunks under `jax.checkpoint`, so forward and backward memory are bounded
  by one chunk of [B, H, query_chunk + 1, W] scores. The result is
  unweighted; callers add `cfg.locality_weight * penalty` to the loss.

  Sampled (`cfg.locality_sample_fraction` = f < 1, with a `key`): the same
  penalty estimated without bias from a random subset of pairs. Segment j
  holds the pairs whose earlier query t-1 lies in block j (U(t) is the same
  for all of them); the S = ceil((T-1)/C) - (sink + window + 1) segments
  with U nonempty partition the pairs counted above. Each sequence draws
  m = ceil(f S) of its segments uniformly without replacement, and

    estimate = mean over b of (S / m) * sum over its drawn segments j and
               (k, t in j) of TV(t)  /  (K * n_pairs),

  n_pairs the exact penalty's pair count per (b, k). Every segment is drawn
  with probability m / S, so E[estimate] = penalty, and its gradient is an
  unbiased estimate of the penalty's gradient (the draw does not depend on
  q or k). Only the m (C + 1) rows of each sequence's drawn segments are
  scored, so the cost is about m (C + 1) / T of the exact one; with m = S
  every pair is drawn and the estimate equals the penalty up to summation
  order. f = 1, or no key (evaluation), computes the exact penalty.

  Args:
    q_BTHD: queries (RoPE applied).
    k_BTKD: keys (RoPE applied).
    cfg: selection constants (`locality_sample_fraction` too).
    temperature: tau > 0; below 1 sharpens p toward the top blocks.
    key: PRNG key of the draw (training passes one per step and layer);
      None computes the exact penalty whatever the fraction.

  Returns:
    Scalar fp32 penalty (0.0 when no pair has a selectable block).
  """
  _check_shapes(q_BTHD, k_BTKD, None)
  b, t, h, d = q_BTHD.shape
  kk = k_BTKD.shape[2]
  n = num_blocks(t, cfg.block_size)
  # Static count of the pairs with U(t) nonempty.
  pos = np.arange(1, t)
  n_pairs = int(np.sum((pos - 1) // cfg.block_size - cfg.window_blocks - 1
                       >= cfg.sink_blocks))
  if n_pairs == 0:
    return jnp.zeros((), _F32)
  kbar_BWKD = compress_keys(k_BTKD, cfg.compress_kernel, cfg.compress_stride)
  if key is not None and cfg.locality_sample_fraction < 1.0:
    return _sampled_penalty(q_BTHD, kbar_BWKD, cfg, temperature,
                            key) / (kk * n_pairs)
  tc = min(cfg.query_chunk, t)
  n_chunks = -(-t // tc)
  # One leading row so each chunk also sees the query before its first one.
  q_pad = jnp.pad(q_BTHD, ((0, 0), (1, n_chunks * tc - t), (0, 0), (0, 0)))
  j_N = jnp.arange(n)

  @jax.checkpoint
  def chunk_tv(i, q_pad, kbar_BWKD):
    q_c = jax.lax.dynamic_slice_in_dim(q_pad, i * tc, tc + 1, axis=1)
    pos_T = i * tc - 1 + jnp.arange(tc + 1)  # positions of the rows
    sq_BKTN = query_aware_scores(q_c, kbar_BWKD, pos_T, cfg, n)
    logp = jnp.log(jnp.maximum(sq_BKTN, _TINY)) / temperature
    jprev_T = pos_T[:-1] // cfg.block_size
    support_TN = ((j_N[None, :] >= cfg.sink_blocks)
                  & (j_N[None, :] <= jprev_T[:, None] - cfg.window_blocks - 1))
    support = support_TN[None, None]
    p_prev = _masked_softmax(logp[:, :, :-1], support)
    p_cur = _masked_softmax(logp[:, :, 1:], support)
    tv_BKT = 0.5 * jnp.sum(jnp.abs(p_cur - p_prev), axis=-1)
    ok_T = (pos_T[:-1] >= 0) & (pos_T[1:] < t) & jnp.any(support_TN, axis=-1)
    return jnp.sum(jnp.where(ok_T[None, None], tv_BKT, 0.0))

  sums = jax.lax.map(lambda i: chunk_tv(i, q_pad, kbar_BWKD),
                     jnp.arange(n_chunks))
  return jnp.sum(sums) / (b * kk * n_pairs)


def penalty_segments(length: int, cfg: config_lib.SparseConfig
                     ) -> tuple[int, int, int]:
  """(first, S, m) of the sampled locality penalty at T = `length`.

  Segment j >= first = sink_blocks + window_blocks + 1 holds the pairs
  (t-1, t) with (t-1) // C = j; S segments have a pair (0 if none) and m =
  min(S, max(1, ceil(locality_sample_fraction * S))) are drawn per sequence.
  """
  first = cfg.sink_blocks + cfg.window_blocks + 1
  count = max(0, num_blocks(length - 1, cfg.block_size) - first)
  drawn = min(count, max(1, math.ceil(cfg.locality_sample_fraction * count)))
  return first, count, drawn


def _sampled_penalty(q_BTHD, kbar_BWKD, cfg, temperature, key):
  """`locality_penalty`'s sampled estimate times K * n_pairs: the mean over
  b of (S / m) * the TV summed over b's drawn segments.

  The drawn rows are gathered once (the backward scatters their gradient
  into q once) and scored in groups of about `query_chunk` rows under
  `jax.checkpoint`.
  """
  b, t, h, d = q_BTHD.shape
  c = cfg.block_size
  n = num_blocks(t, c)
  first, count, drawn = penalty_segments(t, cfg)
  # Each sequence draws its own segments: positions, and with them |U(t)|,
  # vary across the batch.
  segs = first + jax.vmap(  # [B, m]
      lambda kb: jax.random.choice(kb, count, (drawn,), replace=False))(
          jax.random.split(key, b))
  per_group = max(1, min(drawn, cfg.query_chunk // (c + 1)))
  groups = -(-drawn // per_group)
  # Padded segments (weight 0) fill the last group; they read segment
  # `first`, a valid one, so nothing non-finite enters the sum.
  segs = jnp.pad(segs, ((0, 0), (0, groups * per_group - drawn)),
                 constant_values=first)
  weights = (jnp.arange(groups * per_group) < drawn).astype(_F32)
  # Rows jC .. jC + C: the earlier queries of segment j and the query after
  # the last one (past T - 1 for the last segment: clamped, masked below).
  rows = jnp.minimum(segs[:, :, None] * c + jnp.arange(c + 1)[None, None],
                     t - 1)  # [B, groups * per_group, C + 1]
  q_rows_BTHD = jnp.take_along_axis(q_BTHD, rows.reshape(b, -1, 1, 1),
                                    axis=1)
  # Groups lead, for lax.map: [groups, B, per_group (C + 1), H, D].
  q_nBTHD = jnp.moveaxis(
      q_rows_BTHD.reshape(b, groups, per_group * (c + 1), h, d), 1, 0)
  segs_n = jnp.moveaxis(segs.reshape(b, groups, per_group), 1, 0)
  weights_n = weights.reshape(groups, per_group)
  j_N = jnp.arange(n)

  def one_sequence(q_THD, kbar_WKD, segs, weights):  # segs: [per_group]
    pos = segs[:, None] * c + jnp.arange(c + 1)[None]  # [per_group, C + 1]
    sq_KTN = query_aware_scores(q_THD[None], kbar_WKD[None],
                                jnp.minimum(pos, t - 1).reshape(-1), cfg,
                                n)[0]
    # [K, per_group, C + 1, N]: one segment's rows together.
    logp = (jnp.log(jnp.maximum(sq_KTN, _TINY)) / temperature).reshape(
        sq_KTN.shape[0], per_group, c + 1, n)
    # U is fixed within a segment: sink <= j <= seg - window - 1.
    support = ((j_N[None, :] >= cfg.sink_blocks)
               & (j_N[None, :] <= segs[:, None] - cfg.window_blocks - 1))
    support = support[None, :, None, :]
    p_prev = _masked_softmax(logp[:, :, :-1], support)
    p_cur = _masked_softmax(logp[:, :, 1:], support)
    # Total variation per pair: [K, per_group, C].
    tv = 0.5 * jnp.sum(jnp.abs(p_cur - p_prev), axis=-1)
    ok = (pos[:, 1:] <= t - 1).astype(_F32) * weights[:, None]
    return jnp.sum(tv * ok[None])

  @jax.checkpoint
  def group_tv(q_BTHD, kbar_BWKD, segs, weights):
    return jnp.sum(jax.vmap(one_sequence, in_axes=(0, 0, 0, None))(
        q_BTHD, kbar_BWKD, segs, weights))

  sums = jax.lax.map(lambda xs: group_tv(xs[0], kbar_BWKD, xs[1], xs[2]),
                     (q_nBTHD, segs_n, weights_n))
  return jnp.sum(sums) * (count / drawn) / b


# ------------------------------------------------------------------------------
# Decode: the same rule at one query per sequence, over incrementally kept
# compressed keys and window means (NOSA_SPEC.md §4.3, project decisions 1-2).
# ------------------------------------------------------------------------------


def eviction_block_scores(ebar_KW: jax.Array, pos: jax.Array,
                          cfg: config_lib.SparseConfig, n: int) -> jax.Array:
  """Query-agnostic block scores [K, N] of one sequence at position pos.

  Windows not complete at pos hold zeros: they rank as missing (-inf).
  With window_blocks >= 1 (and kernel <= C + stride) they overlap only
  forced blocks, so this is training's ranking. Training reads every window
  of the sequence, so with window_blocks = 0 its eviction score sees
  windows that end after t; decode cannot, and does not.
  """
  c_W = jnp.arange(ebar_KW.shape[-1])
  done_W = cfg.compress_stride * c_W + cfg.compress_kernel - 1 <= pos
  ebar_KW = jnp.where(done_W[None, :], ebar_KW, -_INF)
  return block_pool(ebar_KW, num_blocks=n, block_size=cfg.block_size,
                    kernel=cfg.compress_kernel, stride=cfg.compress_stride)


def select_decode_blocks(q_BHD: jax.Array, kbar_BWKD: Optional[jax.Array],
                         ebar_BKW: Optional[jax.Array], pos_B: jax.Array,
                         cfg: config_lib.SparseConfig, n: int):
  """The training selection (§2.5) of one query per sequence at pos_B.

  kbar / ebar must already include the windows the token at pos_B
  completes (its block is the query's own block). The query-aware scores
  of the one query always come from XLA (`query_aware_scores`), whatever
  `cfg.score_implementation` says for training and prefill: the
  block_scores kernel pads the query to a tile and was measured 1.44x
  slower per 8B decode step at 16k and 3.5x at 128k (H100, 2026-12-07,
  experiments/results/NOTES.md "Session 11"). Pallas-scored prefill and
  XLA-scored decode can then differ at near-ties, within the rounding
  `score_path_agreement` measures.

  Args:
    q_BHD: the query (RoPE applied).
    kbar_BWKD: compressed keys (query-aware variants) or None.
    ebar_BKW: window means of the bias (eviction variants) or None.
    pos_B: int32 positions of the queries.
    cfg: the selection constants.
    n: N, blocks in the cache's capacity.

  Returns:
    (idx_BKP, se_BKN): int32 block indices, ascending, invalid (-1) last,
    P = min(topk_blocks, N), exactly min(topk_blocks, pos // C + 1) valid;
    and the block eviction scores the selection ranked by
    (`eviction_block_scores`; None without an eviction head).
  """
  def one(q_HD, kbar_WKD, ebar_KW, pos):
    pos_T = pos[None]
    sq_BKTN = se_BKN = None
    if kbar_WKD is not None:
      sq_BKTN = query_aware_scores(q_HD[None, None], kbar_WKD[None], pos_T,
                                   cfg, n)
    if ebar_KW is not None:
      se_BKN = eviction_block_scores(ebar_KW, pos, cfg, n)[None]
    idx_BKTP, _, _ = select_from_scores(sq_BKTN, se_BKN, pos_T, cfg)
    return idx_BKTP[0, :, 0], None if se_BKN is None else se_BKN[0]

  return jax.vmap(one)(q_BHD, kbar_BWKD, ebar_BKW, pos_B)


def selection_gamma(prev_idx: jax.Array, cur_idx: jax.Array,
                    new_block_hits: bool = True) -> jax.Array:
  """gamma = |sel(t) & sel(t-1)| / |sel(t)| per (layer, sequence, KV head).

  Args:
    prev_idx: [..., P] selection at t-1 (-1 = unused).
    cur_idx: [..., P] selection at t.
    new_block_hits: count a block that did not exist at t-1 (the tail block
      opened at t) as a hit: it is written on the device, never fetched
      (§4.3 step 8a). Then gamma is the fraction of sel(t) that needs no
      transfer, the gamma of the decode cost model (`cost_model`), and it
      is 1.0 whenever the whole context fits the budget.

  Returns:
    [...] fp32 in [0, 1].
  """
  prev_ok = prev_idx >= 0
  cur_ok = cur_idx >= 0
  hit = _member(cur_idx, prev_idx)
  if new_block_hits:
    # The own block is always selected, so max(sel(t-1)) = j_{t-1}.
    newest = jnp.max(jnp.where(prev_ok, prev_idx, -1), axis=-1)
    hit = hit | (cur_ok & (cur_idx > newest[..., None]))
  n = jnp.sum(cur_ok, axis=-1)
  return (jnp.sum(hit, axis=-1) / jnp.maximum(n, 1)).astype(_F32)


def _member(a: jax.Array, b: jax.Array) -> jax.Array:
  """a's valid entries (>= 0) that b's valid entries hold, per row."""
  return jnp.any((a[..., :, None] == b[..., None, :])
                 & (b >= 0)[..., None, :], axis=-1) & (a >= 0)


def prefetch_coverage(prev_idx: jax.Array, cur_idx: jax.Array,
                      pred_idx: jax.Array) -> tuple[jax.Array, ...]:
  """How well a guessed selection covers a step's misses.

  A miss is a block of sel(t) that sel(t-1) did not hold and that is not
  the newly opened tail block (what `selection_gamma` counts as not hit):
  what an offloading engine must fetch. Per (layer, sequence, KV head):

    misses   the misses of sel(t);
    covered  the misses that pred(t) also selects (a prefetch of pred(t)
             would have fetched them ahead);
    extra    blocks of pred(t) in neither sel(t-1) nor sel(t) (fetched
             for nothing).

  Args:
    prev_idx, cur_idx, pred_idx: [..., P] selections (-1 = unused).

  Returns:
    (misses, covered, extra), int32 [...].
  """
  newest = jnp.max(jnp.where(prev_idx >= 0, prev_idx, -1), axis=-1)
  miss = (~_member(cur_idx, prev_idx) & (cur_idx >= 0)
          & (cur_idx <= newest[..., None]))
  covered = miss & _member(cur_idx, pred_idx)
  extra = (~_member(pred_idx, prev_idx) & ~_member(pred_idx, cur_idx)
           & (pred_idx >= 0))
  count = lambda x: jnp.sum(x, axis=-1).astype(jnp.int32)
  return count(miss), count(covered), count(extra)
