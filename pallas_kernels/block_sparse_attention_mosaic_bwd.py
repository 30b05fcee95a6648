"""Block-sparse causal attention backward on Pallas Mosaic GPU (Hopper).

The backward of `block_sparse_attention_mosaic` (NOSA_SPEC.md §2.6-§2.7):
the gradients w.r.t. q, k, v and the eviction bias of the forward in
`block_sparse_attention_mosaic.py`, from its saved base-2 log-sum-exp, as
two `plgpu.kernel`s (TMA, wgmma) with the math of the Triton backward's
default (`transpose_bwd`, unfused dq) in `block_sparse_attention.py`:

  delta = rowsum(dO * O) (XLA; minus log2(e) * dlse when the lse is used)
  p     = exp2(log2(e) * (q.k * scale + bias) - lse), masked to 0
  ds    = p * (dO V^T - delta)
  dq kernel   grid (query tile, B*K): a program is one warpgroup of 64
              query rows (64 / G tokens) walking the sorted union of its
              tokens' selected blocks (the forward's lists):
              dq += ds K over the blocks, times scale.
  dk/dv kernel grid (block, B*K): a program owns one 64-key block and walks
              the query tiles that selected it (the transposed unions), keys
              as rows ([C, 64] = K Q^T, FlashAttention's dk/dv layout):
              dv += P^T dO, dk += dS^T Q, dbias += rowsum(dS^T).

Deterministic, no atomics: each program writes its own rows once (the
Triton backward's dkv segments add with atomics, which the GPU interpreter
cannot run). The cost is the Triton kernel's `dkv_segment` problem again: the
sink block, in every tile's union, is one program walking all T / (64 / G)
tiles, the longest program of the grid.

Each program is one warpgroup that TMA-prefetches its blocks (dq: K, V,
bias) or query tiles (dk/dv: Q, dO, lse, delta) `max_concurrent_steps - 1`
ahead into a ring of SMEM slots, like the forward's `warp_specialized=False`
variant; there is no warp-specialized backward yet. The token mask is the
forward's (`_query_limit`: XLA-packed selection bits, one compare per
logit), on the key axis of the transposed tiles in the dk/dv kernel, and
`full_fast_path` branches past it (lax.cond) as there.

Constraints: those of the forward, and D <= 128 (the dk/dv kernel holds two
fp32 [64, D] accumulators in one warpgroup's registers); other shapes are
refused with a one-line error when differentiated. Interpret mode: P, dS
(and P^T, dS^T) go through SMEM and every matmul into a fresh accumulator
that is added (the interpreter's wgmma reads SMEM operands only and has no
`run_state` rule); compiled, they are register operands accumulated in
place.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

# The forward's module (the package re-exports its wrapper under the
# module's name): its constants, static config and helpers.
fwd = importlib.import_module("pallas_kernels.block_sparse_attention_mosaic")

_F32 = jnp.float32
_ROWS = fwd._ROWS
_BLOCK = fwd._BLOCK
_LOG2E = fwd._LOG2E
_MAX_D = 128  # two fp32 [64, D] accumulators per dk/dv warpgroup thread


def check(d: int) -> None:
  """One-line error for the shapes the backward does not take."""
  if d > _MAX_D:
    raise NotImplementedError(
        f"head dim D={d}: the Mosaic backward takes D <= {_MAX_D} "
        "(differentiate implementation 'pallas' or 'xla')")


# ---------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------


def _matmul(a, b, shape):
  """a @ b into a fresh fp32 accumulator (SMEM operands)."""
  def mm(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]

  return pl.run_scoped(mm, plgpu.ACC(shape, _F32))


def _mma(st, acc, a, b, a_smem):
  """acc + a @ b, `a` a WGMMA-layout register tile in b's dtype.

  Compiled: `a` is the register operand and acc is accumulated in place.
  Interpreted: `a` goes through `a_smem` and into a fresh accumulator (see
  the module docstring).
  """
  if st.interpret:
    a_smem[...] = a
    return acc + _matmul(a_smem, b, acc.shape)

  def mma(acc_ref):
    plgpu.wgmma(acc_ref, a, b)

  return pl.run_state(mma)(plgpu.ACC.init(acc))


def _zeros(shape):
  layout = (plgpu.Layout.WGMMA if len(shape) == 2 else
            plgpu.Layout.WGMMA.reduce(1))
  return plgpu.layout_cast(jnp.zeros(shape, _F32), layout)


def _load_rows(q_refs, smem, bar, x, row0):
  """TMA copies of the 64 query rows from row0 of q, dO, lse and delta into
  `smem` (one slot of each), on one barrier of 4 arrivals."""
  rows = pl.ds(row0, _ROWS)
  for ref, buf in zip(q_refs, smem, strict=True):
    plgpu.copy_gmem_to_smem(ref.at[x, rows], buf, bar)


def _probs(s, lse, limit_fn, full, key_dim):
  """exp2(s - lse), 0 where masked: s [64, 64] base-2 logits, lse
  broadcast; `limit_fn()` the queries' `_query_limit` (built only on the
  masked branch), keys on axis `key_dim`."""
  shape = s.shape
  keys = plgpu.broadcasted_iota(jnp.int32, shape, key_dim,
                                layout=plgpu.Layout.WGMMA)

  def masked(s):
    limit = lax.broadcast_in_dim(limit_fn(), shape, [1 - key_dim])
    return jnp.where(keys <= limit, jnp.exp2(s - lse), 0.0)

  if full is None:
    return masked(s)
  return lax.cond(full, lambda s: jnp.exp2(s - lse), masked, s)


def _dq_kernel(
    q_ref,  # [X, Tp * G, D]
    do_ref,  # [X, Tp * G, D]
    lse_ref,  # [X, Tp * G] fp32, base 2
    delta_ref,  # [X, Tp * G] fp32
    k_ref,  # [X, S, D]
    v_ref,  # [X, S, D]
    bias_ref,  # [X, S] fp32
    bits_ref,  # [X, Tp * G / 64, N, words] int32, by list entry
    idx_ref,  # [X, Tp * G / 64, N] int32, the tile's blocks first, ascending
    cnt_ref,  # [X, Tp * G / 64] int32, how many
    dq_ref,  # [X, Tp * G, D]
    smem,
    # q, do [64, D] (q then dq out), k, v [steps, C, D], bias [steps, C]
    # fp32, lse, delta [64] fp32, and in interpret mode ds [64, C] (else
    # None).
    barriers,  # q (+ do, lse, delta), k (+ bias) and v per slot
    *, st):
  q_smem, do_smem, k_smem, v_smem, bias_smem, lse_smem, delta_smem, ds_smem = (
      smem)
  q_bar, k_bar, v_bar = barriers
  qi, x = lax.axis_index("q"), lax.axis_index("x")
  cnt = cnt_ref[x, qi]
  steps = st.max_concurrent_steps
  first_tok = qi * st.wg_tokens
  _load_rows((q_ref, do_ref, lse_ref, delta_ref),
             (q_smem, do_smem, lse_smem, delta_smem), q_bar, x, qi * _ROWS)

  # The forward's loaders, with this kernel's K/V ring and barriers.
  refs = (k_ref, v_ref, bias_ref)
  ring = (None, k_smem, v_smem, bias_smem, None, None)
  ring_bars = (None, k_bar, v_bar)

  def prefetch(i):
    @pl.when(i < cnt)
    def _():
      j, slot = idx_ref[x, qi, i], lax.rem(i, steps)
      fwd._load_k(refs, ring, ring_bars, x, j, slot)
      fwd._load_v(refs, ring, ring_bars, x, j, slot)

  for i in range(steps - 1):
    prefetch(i)
  plgpu.barrier_wait(q_bar)
  shape = (_ROWS, _BLOCK)
  row_vec = plgpu.Layout.WGMMA.reduce(1)
  lse = lax.broadcast_in_dim(plgpu.load(lse_smem, layout=row_vec), shape,
                             [0])
  delta = lax.broadcast_in_dim(plgpu.load(delta_smem, layout=row_vec), shape,
                               [0])
  row_tok = fwd._query_tokens(st, 0)

  def body(i, dq):
    # Block i + steps - 1 goes into the slot block i - 1 has left.
    prefetch(i + steps - 1)
    slot = lax.rem(i, steps)
    j = idx_ref[x, qi, i]
    words = [bits_ref[x, qi, i, w] for w in range(st.words)]
    plgpu.barrier_wait(k_bar.at[slot])
    s = _matmul(q_smem, k_smem.at[slot].T, shape)
    bias = plgpu.load(bias_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
    s = (s * (st.scale * _LOG2E)
         + lax.broadcast_in_dim(bias * _LOG2E, shape, [1]))
    full = (fwd._is_full(st, words, j, first_tok) if st.full_fast_path
            else None)
    p = _probs(s, lse,
               lambda: fwd._query_limit(st, words, row_tok, first_tok, j),
               full, key_dim=1)
    plgpu.barrier_wait(v_bar.at[slot])
    dp = _matmul(do_smem, v_smem.at[slot].T, shape)
    ds = p * (dp - delta)
    return _mma(st, dq, ds.astype(q_smem.dtype), k_smem.at[slot], ds_smem)

  dq = lax.fori_loop(0, cnt, body, _zeros((_ROWS, q_smem.shape[-1])))
  q_smem[...] = (dq * st.scale).astype(q_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[x, pl.ds(qi * _ROWS, _ROWS)])
  plgpu.wait_smem_to_gmem(0)


def _dkv_kernel(
    # [X, Tp * G, D] q, dO, [X, Tp * G] fp32 lse (base 2), delta, [X, S, D]
    # k, v and [X, S] fp32 bias, as in _dq_kernel.
    q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, bias_ref,
    bits_ref,  # [X, Tp * G / 64, N, words] int32, by (tile, block)
    tiles_ref,  # [X, N, Tp * G / 64] int32, the block's tiles first
    cnt_ref,  # [X, N] int32, how many
    dk_ref,  # [X, S, D]
    dv_ref,  # [X, S, D]
    dbias_ref,  # [X, S] fp32
    smem,
    # k, v [C, D] (then dk, dv out), bias [C] fp32 (then dbias), q, do
    # [steps, 64, D], lse, delta [steps, 64] fp32, and in interpret mode
    # p [C, 64] (P^T, then dS^T; else None).
    barriers,  # k (+ v, bias), and q (+ do, lse, delta) per slot
    *, st):
  (k_smem, v_smem, bias_smem, q_smem, do_smem, lse_smem, delta_smem,
   p_smem) = smem
  k_bar, q_bar = barriers
  j, x = lax.axis_index("kv"), lax.axis_index("x")
  cnt = cnt_ref[x, j]
  steps = st.max_concurrent_steps
  blk = pl.ds(j * _BLOCK, _BLOCK)
  plgpu.copy_gmem_to_smem(k_ref.at[x, blk], k_smem, k_bar)
  plgpu.copy_gmem_to_smem(v_ref.at[x, blk], v_smem, k_bar)
  plgpu.copy_gmem_to_smem(bias_ref.at[x, blk], bias_smem, k_bar)

  def prefetch(i):
    @pl.when(i < cnt)
    def _():
      qi, slot = tiles_ref[x, j, i], lax.rem(i, steps)
      _load_rows((q_ref, do_ref, lse_ref, delta_ref),
                 tuple(buf.at[slot] for buf in (q_smem, do_smem, lse_smem,
                                                delta_smem)),
                 q_bar.at[slot], x, qi * _ROWS)

  for i in range(steps - 1):
    prefetch(i)
  plgpu.barrier_wait(k_bar)
  shape = (_BLOCK, _ROWS)  # keys as rows, queries as columns
  col_vec = plgpu.Layout.WGMMA.reduce(0)
  bias = plgpu.load(bias_smem, layout=plgpu.Layout.WGMMA.reduce(1))
  bias = lax.broadcast_in_dim(bias * _LOG2E, shape, [0])
  col_tok = fwd._query_tokens(st, 1)
  dtype = k_smem.dtype

  def body(i, carry):
    dk, dv, dbias = carry
    prefetch(i + steps - 1)
    slot = lax.rem(i, steps)
    qi = tiles_ref[x, j, i]
    first_tok = qi * st.wg_tokens
    words = [bits_ref[x, qi, j, w] for w in range(st.words)]
    plgpu.barrier_wait(q_bar.at[slot])
    s_t = _matmul(k_smem, q_smem.at[slot].T, shape)  # S^T = K Q^T
    s_t = s_t * (st.scale * _LOG2E) + bias
    lse = lax.broadcast_in_dim(plgpu.load(lse_smem.at[slot], layout=col_vec),
                               shape, [1])
    full = (fwd._is_full(st, words, j, first_tok) if st.full_fast_path
            else None)
    pt = _probs(s_t, lse,
                lambda: fwd._query_limit(st, words, col_tok, first_tok, j),
                full, key_dim=0)
    delta = lax.broadcast_in_dim(
        plgpu.load(delta_smem.at[slot], layout=col_vec), shape, [1])
    dv = _mma(st, dv, pt.astype(dtype), do_smem.at[slot], p_smem)
    dpt = _matmul(v_smem, do_smem.at[slot].T, shape)  # dP^T = V dO^T
    # dS^T stays fp32 for the bias gradient; only the matmul operand is cast.
    dst = pt * (dpt - delta)
    dk = _mma(st, dk, dst.astype(dtype), q_smem.at[slot], p_smem)
    return dk, dv, dbias + jnp.sum(dst, axis=1)

  d = k_smem.shape[-1]
  carry = (_zeros((_BLOCK, d)), _zeros((_BLOCK, d)), _zeros((_BLOCK,)))
  dk, dv, dbias = lax.fori_loop(0, cnt, body, carry)
  k_smem[...] = (dk * st.scale).astype(dtype)
  v_smem[...] = dv.astype(dtype)
  bias_smem[...] = dbias
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[x, blk])
  plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[x, blk])
  plgpu.copy_smem_to_gmem(bias_smem, dbias_ref.at[x, blk])
  plgpu.wait_smem_to_gmem(0)


# ---------------------------------------------------------------------------
# Kernel calls and the custom VJP's backward.
# ---------------------------------------------------------------------------


def _tile(dtype, *shape):
  """SMEM in the layout wgmma reads: 8 x 64 tiles, 128-byte swizzle."""
  transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  return plgpu.SMEM(shape, dtype, transforms=transforms)


def _call(kernel, st, grid, grid_names, out_type, scratch, *args):
  return plgpu.kernel(
      functools.partial(kernel, st=st), out_type=out_type,
      scratch_types=scratch, grid=grid, grid_names=grid_names,
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if st.interpret else None,
  )(*args)


def _backward_dq(st, q_XRD, do_XRD, lse_XR, delta_XR, k_XSD, v_XSD, bias_XS,
                 bits_XQNW, idx_XQN, cnt_XQ):
  x, _, d = q_XRD.shape
  steps, dtype = st.max_concurrent_steps, q_XRD.dtype
  smem = (_tile(dtype, _ROWS, d), _tile(dtype, _ROWS, d),
          _tile(dtype, steps, _BLOCK, d), _tile(dtype, steps, _BLOCK, d),
          plgpu.SMEM((steps, _BLOCK), _F32), plgpu.SMEM((_ROWS,), _F32),
          plgpu.SMEM((_ROWS,), _F32),
          _tile(dtype, _ROWS, _BLOCK) if st.interpret else None)
  barriers = (plgpu.Barrier(num_arrivals=4),
              # K's barrier also counts the bias copy.
              plgpu.Barrier(num_arrivals=2, num_barriers=steps),
              plgpu.Barrier(num_barriers=steps))
  return _call(_dq_kernel, st, (idx_XQN.shape[1], x), ("q", "x"),
               jax.ShapeDtypeStruct(q_XRD.shape, dtype), (smem, barriers),
               q_XRD, do_XRD, lse_XR, delta_XR, k_XSD, v_XSD, bias_XS,
               bits_XQNW, idx_XQN, cnt_XQ)


def _backward_dkv(st, q_XRD, do_XRD, lse_XR, delta_XR, k_XSD, v_XSD, bias_XS,
                  bits_XQNW, tiles_XNQ, cnt_XN):
  x, s, d = k_XSD.shape
  steps, dtype = st.max_concurrent_steps, k_XSD.dtype
  smem = (_tile(dtype, _BLOCK, d), _tile(dtype, _BLOCK, d),
          plgpu.SMEM((_BLOCK,), _F32), _tile(dtype, steps, _ROWS, d),
          _tile(dtype, steps, _ROWS, d), plgpu.SMEM((steps, _ROWS), _F32),
          plgpu.SMEM((steps, _ROWS), _F32),
          _tile(dtype, _BLOCK, _ROWS) if st.interpret else None)
  barriers = (plgpu.Barrier(num_arrivals=3),
              plgpu.Barrier(num_arrivals=4, num_barriers=steps))
  out_type = (jax.ShapeDtypeStruct((x, s, d), dtype),
              jax.ShapeDtypeStruct((x, s, d), dtype),
              jax.ShapeDtypeStruct((x, s), _F32))
  return _call(_dkv_kernel, st, (tiles_XNQ.shape[1], x), ("kv", "x"),
               out_type, (smem, barriers), q_XRD, do_XRD, lse_XR, delta_XR,
               k_XSD, v_XSD, bias_XS, bits_XQNW, tiles_XNQ, cnt_XN)


def attention_bwd(st, res, cts):
  """The custom VJP's backward: cotangents of (q, k, v, bias, lists).

  `res` is the forward's (q, k, v, bias, lists, out, lse) in the kernel
  layout and `cts` the cotangents of (out, lse).
  """
  q_XRD, k_XSD, v_XSD, bias_XS, lists, out_XRD, lse_XR = res
  do_XRD, dlse_XR = cts
  check(q_XRD.shape[-1])
  # One self-prefetching warpgroup per program (module docstring).
  st = dataclasses.replace(st, compute_wgs=1, warp_specialized=False)
  # delta = rowsum(dO * O) = sum_s p_s dp_s, the softmax-backward term. The
  # base-2 lse is log2(e) * the natural one, whose gradient w.r.t. the
  # natural logits is p: its cotangent folds into delta.
  delta_XR = jnp.sum(do_XRD.astype(_F32) * out_XRD.astype(_F32), axis=-1)
  delta_XR = delta_XR - dlse_XR * _LOG2E
  args = (q_XRD, do_XRD, lse_XR, delta_XR, k_XSD, v_XSD, bias_XS)
  dq_XRD = _backward_dq(st, *args, *lists["dq"])
  dk_XSD, dv_XSD, dbias_XS = _backward_dkv(st, *args, *lists["dkv"])
  return (dq_XRD, dk_XSD, dv_XSD, dbias_XS,
          jax.tree.map(lambda _: None, lists))


def backward_lists(mask_BKTN, st, fwd_lists):
  """The backward's index lists (XLA) from the padded token mask.

  dq: per 64-row query tile, its blocks and their selection bits by list
  entry (the forward's lists when its programs are one warpgroup); dkv: per
  block, the query tiles whose union holds it, and the bits by (tile,
  block).
  """
  bsa = fwd.bsa
  st1 = dataclasses.replace(st, compute_wgs=1)
  union_BKQN = bsa._tile_unions(mask_BKTN, st1.block_q, _BLOCK)
  bits_XQNW = fwd._selection_bits(mask_BKTN, st1)
  if st.compute_wgs == 1:
    dq = fwd_lists
  else:
    idx_XQN, cnt_XQ = bsa._compact(union_BKQN)
    dq = (jnp.take_along_axis(bits_XQNW, idx_XQN[..., None], axis=2),
          idx_XQN, cnt_XQ)
  tiles_XNQ, cnt_XN = bsa._compact(union_BKQN.transpose(0, 1, 3, 2))
  return dict(dq=dq, dkv=(bits_XQNW, tiles_XNQ, cnt_XN))
