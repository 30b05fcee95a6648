"""Block-sparse causal attention with an additive key bias (Pallas, Triton).

The training / prefill attention of NOSA (NOSA_SPEC.md §2.6-§2.7): query t
attends, through KV head k, the keys s <= t whose block s // C is selected
for (t, k), with logits q.k / sqrt(D) + bias[s, k] (the eviction bias at
full strength) and an fp32 softmax. The G query heads of a KV head share the
selection (GQA). Differentiable w.r.t. q, k, v and the bias (custom VJP with
two backward kernels); the selection is not.

Design. Selection is per query token, so a tile is `block_q` consecutive
tokens times the G query heads of one KV head: R = block_q * G rows, row r =
token t0 + r // G, head r % G, so the G heads share every K/V load. The
wrapper (XLA) prepares, per tile, the sorted list of blocks in the union of
its tokens' selections (causally pruned) and the per-token selection
transposed to [N, T], so that a block's column for the tile's tokens is one
contiguous load. The kernels then work on whole selection blocks:

  forward  grid (tile, B*K): loop over the tile's blocks with an fp32 online
           softmax (FlashAttention-2); writes out and the log-sum-exp
           (base 2).
  dq       grid (tile, B*K): same loop, ds = p * (dp - delta), dq += ds k.
  dk/dv/db grid (B*K, work item): an item is a block and a segment of at
           most `dkv_segment` entries of its list of query tiles (the
           transposed unions); items add their partial dk, dv, dbias to
           fp32 accumulators with atomic adds. Segments keep the sink
           block, in every tile's union, from being one serial program
           that walks all T / block_q_dkv tiles. The accumulators cost
           8 bytes per key element (128 MiB at T=64k, K=2, D=128), and
           the order of the adds, hence the last bits of dk, dv and
           dbias, varies from run to run.

Backward options (keyword arguments of the wrapper; transpose_bwd on and
fused_dq off by default, from the bwd_sweep in
experiments/results/kernels/NOTES.md, session 3; timed against each other
by `experiments/kernel_bench.py --parts=bwd_sweep`):

  transpose_bwd  dq and dk/dv kernels compute the logits transposed, keys
           as rows: [C, R] = K Q^T, as FlashAttention's dk/dv kernels do.
           Every backward matmul then has the block's C keys (64) as its
           M dimension whatever R is (R = 32 rows is below Hopper's
           64-row wgmma tile), and P^T, dS^T come out in the layout that
           dV += P^T dO, dK += dS^T Q take, with no transpose of a register
           tile; dq is accumulated as dq^T = K^T dS^T.
  fused_dq does the dq work in the dk/dv kernel: each (block, tile) pair
           adds its dS K to an fp32 dq accumulator atomically (R * D adds
           per pair; [D, T * G] with transpose_bwd), so the logits, exp2
           and dP of every pair are computed once in the backward instead
           of twice, and there is no dq kernel.

Inside a block, the token mask is the tile's selection column expanded to
rows (a broadcast-compare-reduce with a one-hot [R, block_q], avoiding an
in-kernel reshape) and the causal mask. A (tile, block) pair that every
token of the tile selected, with the block wholly before the tile, needs
neither: the kernels branch (scf.if) to a path without the mask
(`full_fast_path`; most pairs on local selections). Triton wants every
loaded tile to be a power of 2 and every dot dimension >= 16: the wrapper
pads G and D to powers of 2 and, when compiling, checks block_q, C and R.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
import jax.numpy as jnp

from pallas_kernels import common

_F32 = jnp.float32
# The per-token selection as stored for the kernels: a byte per (block, token).
_SEL_DTYPE = jnp.int8
_MIN_DOT_DIM = 16
_LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call; hashable (custom_vjp nondiff arg)."""
  block_size: int
  groups: int  # G padded to a power of 2
  block_q: int
  block_q_dq: int
  block_q_dkv: int
  dkv_segment: int
  fused_dq: bool
  transpose_bwd: bool
  full_fast_path: bool
  scale: float
  num_warps: int | None
  num_stages: int | None
  interpret: bool
  debug: bool


# ---------------------------------------------------------------------------
# Kernels.
# ---------------------------------------------------------------------------


def _dot(a, b, *, trans_a=False, trans_b=False):
  # IEEE fp32 for fp32 inputs (Triton's default would be TF32); bf16 inputs
  # use the tensor cores with fp32 accumulation either way.
  precision = lax.Precision.HIGHEST if a.dtype == _F32 else None
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision,
                         preferred_element_type=_F32)


def _row_tokens(rows, groups):
  """[R] int32: token offset of each row within its tile (r // G)."""
  r = jnp.arange(rows, dtype=jnp.int32)
  return r if groups == 1 else lax.div(r, groups)


def _one_hot(row_tok, block_q):
  """[R, block_q] bool: row r belongs to token t of the tile; None if G=1."""
  if row_tok.shape[0] == block_q:
    return None
  return row_tok[:, None] == jnp.arange(block_q, dtype=jnp.int32)[None, :]


def _row_selected(sel_ref, sel_idx, one_hot):
  """[R] bool: the row's token selected the block."""
  sel = sel_ref[sel_idx].astype(jnp.int32)  # [block_q]
  if one_hot is None:
    return sel > 0
  return jnp.max(jnp.where(one_hot, sel[None, :], 0), axis=1) > 0


def _block_mask(sel_ref, sel_idx, one_hot, row_pos, key_pos, *,
                key_rows=False):
  """[R, C] bool ([C, R] if key_rows): block selected, and key <= query."""
  row_sel = _row_selected(sel_ref, sel_idx, one_hot)
  if key_rows:
    return row_sel[None, :] & (key_pos[:, None] <= row_pos[None, :])
  return row_sel[:, None] & (key_pos[None, :] <= row_pos[:, None])


def _block_is_full(sel_ref, sel_idx, block_start, first_tok, block_size):
  """[] bool: every token of the tile selected the block, and the block's
  last key is at or before the tile's first token (no causal mask inside).

  Such (tile, block) pairs need no token mask at all: most pairs are full
  when neighbouring tokens select the same blocks (a 4-token tile's union
  is ~1.06x a token's selection on local masks), so the kernels branch to a
  path without the mask's compares and selects.
  """
  all_sel = jnp.min(sel_ref[sel_idx].astype(jnp.int32)) > 0
  return all_sel & (block_start + block_size - 1 <= first_tok)


def _probs(full, s, mask_fn, lse):
  """Backward probabilities exp2(s - lse), zero where masked.

  `mask_fn()` builds the token mask only on the branch that needs it;
  `full` (see _block_is_full) picks the branch without it, None always
  masks.
  """
  def masked(s):
    return jnp.where(mask_fn(), jnp.exp2(s - lse), 0.0)

  if full is None:
    return masked(s)
  return lax.cond(full, lambda s: jnp.exp2(s - lse), masked, s)


def _masked_logits(full, s, mask_fn):
  """The logits with masked entries at MASK_VALUE; `full` (see
  _block_is_full) branches to the unmasked path, None always masks."""
  masked = lambda s: jnp.where(mask_fn(), s, common.MASK_VALUE)
  if full is None:
    return masked(s)
  return lax.cond(full, lambda s: s, masked, s)


def _per_query(x, key_rows):
  """Broadcasts a per-query-row vector [R] over the logits' key axis."""
  return x[None, :] if key_rows else x[:, None]


def _logits(q, k, bias, scale, *, key_rows=False):
  """[R, C] logits in base 2, log2(e) * (q.k * scale + bias), unmasked.

  Base 2 so that the softmax uses exp2 (one MUFU op; exp is a libdevice
  call with extra range reduction), as in JAX's flash attention. The lse
  is kept in base 2 too; ds is still the gradient of the natural logits.
  With `key_rows`, the transpose [C, R] = K Q^T (see `_dkv_kernel`).
  """
  if key_rows:
    return (_dot(k, q, trans_b=True) * (scale * _LOG2E)
            + (bias * _LOG2E)[:, None])
  return _dot(q, k, trans_b=True) * (scale * _LOG2E) + (bias * _LOG2E)[None, :]


def _fwd_kernel(
    q_ref,  # [R, D]
    k_ref,  # [S, D]
    v_ref,  # [S, D]
    bias_ref,  # [S] fp32
    sel_ref,  # [N, block_q] int8
    idx_ref,  # [N] int32, the tile's blocks first, ascending
    cnt_ref,  # [] int32, how many
    o_ref,  # [R, D]
    lse_ref,  # [R] fp32, log2-sum-exp2 of the base-2 logits
    *, block_size: int, groups: int, scale: float, fast: bool):
  c = block_size
  rows, d = q_ref.shape
  block_q = sel_ref.shape[1]
  row_tok = _row_tokens(rows, groups)
  first_tok = pl.program_id(0) * block_q
  row_pos = first_tok + row_tok
  one_hot = _one_hot(row_tok, block_q)
  q = q_ref[...]

  def body(i, carry):
    acc, m_prev, l_prev = carry
    j = idx_ref[i]
    blk = pl.ds(j * c, c)
    key_pos = j * c + jnp.arange(c, dtype=jnp.int32)
    sel_idx = (j, slice(None))
    mask_fn = lambda: _block_mask(sel_ref, sel_idx, one_hot, row_pos, key_pos)
    full = (_block_is_full(sel_ref, sel_idx, j * c, first_tok, c)
            if fast else None)
    s = _logits(q, k_ref[blk, :], bias_ref[blk], scale)  # [R, C]
    s = _masked_logits(full, s, mask_fn)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    # In a row masked so far m_next is MASK_VALUE itself, and exp2(s -
    # m_next) would be 1 on its masked entries: subtract 0 there instead,
    # so that every masked entry gives exp2(MASK_VALUE - m) = 0 with no
    # per-entry select.
    m_sub = jnp.where(m_next > 0.5 * common.MASK_VALUE, m_next, 0.0)
    p = jnp.exp2(s - m_sub[:, None])
    corr = jnp.exp2(m_prev - m_next)
    l_next = corr * l_prev + jnp.sum(p, axis=1)
    v = v_ref[blk, :]
    acc = corr[:, None] * acc + _dot(p.astype(v.dtype), v)
    return acc, m_next, l_next

  carry = (jnp.zeros((rows, d), _F32),
           jnp.full((rows,), common.MASK_VALUE, _F32),
           jnp.zeros((rows,), _F32))
  acc, m, denom = lax.fori_loop(0, cnt_ref[()], body, carry)
  # A row with no attended key (denom = 0) gives 0, and an lse the backward
  # never uses (its mask is empty in every block).
  l_safe = jnp.where(denom > 0.0, denom, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l_safe)


def _dq_kernel(
    q_ref,  # [R, D]
    do_ref,  # [R, D]
    lse_ref,  # [R] fp32, base 2
    delta_ref,  # [R] fp32, rowsum(dO * O)
    k_ref,  # [S, D]
    v_ref,  # [S, D]
    bias_ref,  # [S] fp32
    sel_ref,  # [N, block_q] int8
    idx_ref,  # [N] int32
    cnt_ref,  # [] int32
    dq_ref,  # [R, D]
    *, block_size: int, groups: int, scale: float, key_rows: bool,
    fast: bool):
  c = block_size
  rows, d = q_ref.shape
  block_q = sel_ref.shape[1]
  row_tok = _row_tokens(rows, groups)
  first_tok = pl.program_id(0) * block_q
  row_pos = first_tok + row_tok
  one_hot = _one_hot(row_tok, block_q)
  q, do = q_ref[...], do_ref[...]
  lse = _per_query(lse_ref[...], key_rows)
  delta = _per_query(delta_ref[...], key_rows)

  def body(i, dq):
    j = idx_ref[i]
    blk = pl.ds(j * c, c)
    key_pos = j * c + jnp.arange(c, dtype=jnp.int32)
    sel_idx = (j, slice(None))
    mask_fn = lambda: _block_mask(sel_ref, sel_idx, one_hot, row_pos,
                                  key_pos, key_rows=key_rows)
    full = (_block_is_full(sel_ref, sel_idx, j * c, first_tok, c)
            if fast else None)
    k, v = k_ref[blk, :], v_ref[blk, :]
    s = _logits(q, k, bias_ref[blk], scale, key_rows=key_rows)
    p = _probs(full, s, mask_fn, lse)
    if key_rows:
      # [C, R] tiles: C rows in every matmul, and dq^T = K^T dS^T.
      ds = p * (_dot(v, do, trans_b=True) - delta)
      return dq + _dot(k, ds.astype(k.dtype), trans_a=True)  # [D, R]
    ds = p * (_dot(do, v, trans_b=True) - delta)  # [R, C]
    return dq + _dot(ds.astype(k.dtype), k)

  shape = (d, rows) if key_rows else (rows, d)
  dq = lax.fori_loop(0, cnt_ref[()], body, jnp.zeros(shape, _F32))
  if key_rows:
    dq = dq.T
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref,  # [T * G, D], all query rows of this (b, k)
    do_ref,  # [T * G, D]
    lse_ref,  # [T * G] fp32, base 2
    delta_ref,  # [T * G] fp32
    k_ref,  # [S, D]
    v_ref,  # [S, D]
    bias_ref,  # [S] fp32
    sel_ref,  # [N, T] int8
    tiles_ref,  # [N * T / block_q] int32, block j's tiles from j * T / block_q
    blk_ref,  # [] int32, this item's block
    start_ref,  # [] int32, its first entry in the block's tile list
    cnt_ref,  # [] int32, how many entries (0: a padding item)
    *acc_refs,
    # The fp32 accumulators, zero-initialized and added to atomically; each
    # is passed twice, as an input aliased to the output (unused) and as the
    # output: dk [S, D], dv [S, D], dbias [S], and with fused_dq dq [T * G, D]
    # ([D, T * G] with key_rows).
    block_size: int, block_q: int, groups: int, scale: float,
    fused_dq: bool, key_rows: bool, fast: bool):
  dk_ref, dv_ref, dbias_ref, *dq_refs = acc_refs[len(acc_refs) // 2:]
  c, d = block_size, k_ref.shape[1]
  num_tiles = sel_ref.shape[1] // block_q
  rows = block_q * groups
  cnt = cnt_ref[()]

  # Padding items (the grid holds a static bound on the item count) leave
  # without touching the accumulators.
  @pl.when(cnt > 0)
  def _():
    j = blk_ref[()]
    row_tok = _row_tokens(rows, groups)
    one_hot = _one_hot(row_tok, block_q)
    blk = pl.ds(j * c, c)
    key_pos = j * c + jnp.arange(c, dtype=jnp.int32)
    k, v, bias = k_ref[blk, :], v_ref[blk, :], bias_ref[blk]
    first = j * num_tiles + start_ref[()]

    def body(i, carry):
      dk, dv, dbias = carry
      qi = tiles_ref[first + i]
      tile = pl.ds(qi * rows, rows)
      first_tok = qi * block_q
      row_pos = first_tok + row_tok
      sel_idx = (j, pl.ds(first_tok, block_q))
      mask_fn = lambda: _block_mask(sel_ref, sel_idx, one_hot, row_pos,
                                    key_pos, key_rows=key_rows)
      full = (_block_is_full(sel_ref, sel_idx, j * c, first_tok, c)
              if fast else None)
      q, do = q_ref[tile, :], do_ref[tile, :]
      s = _logits(q, k, bias, scale, key_rows=key_rows)
      p = _probs(full, s, mask_fn, _per_query(lse_ref[tile], key_rows))
      delta = _per_query(delta_ref[tile], key_rows)
      # ds stays fp32 for the bias gradient; only the matmul operand is cast.
      if key_rows:
        # [C, R] tiles: P^T and dS^T are the A operands of dV += P^T dO and
        # dK += dS^T Q as computed, with no transpose, and every matmul has
        # the C block keys as rows (>= 64 for wgmma), whatever R is.
        dv = dv + _dot(p.astype(do.dtype), do)
        ds = p * (_dot(v, do, trans_b=True) - delta)
        ds_lo = ds.astype(q.dtype)
        dk = dk + _dot(ds_lo, q)
        dbias = dbias + jnp.sum(ds, axis=1)
      else:
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (_dot(do, v, trans_b=True) - delta)  # [R, C]
        ds_lo = ds.astype(q.dtype)
        dk = dk + _dot(ds_lo, q, trans_a=True)
        dbias = dbias + jnp.sum(ds, axis=0)
      if fused_dq:
        # The tile's dq share from this block; other blocks' items add to
        # the same rows. Saves the dq kernel's second pass over every
        # (tile, block) pair (logits, exp2, dP again) for R * D atomics.
        if key_rows:
          dq = _dot(k, ds_lo, trans_a=True)  # [D, R] = K^T dS^T
          plt.atomic_add(dq_refs[0], (slice(None), tile), dq * scale)
        else:
          dq = _dot(ds_lo, k)  # [R, D]
          plt.atomic_add(dq_refs[0], (tile, slice(None)), dq * scale)
      return dk, dv, dbias

    carry = (jnp.zeros((c, d), _F32), jnp.zeros((c, d), _F32),
             jnp.zeros((c,), _F32))
    dk, dv, dbias = lax.fori_loop(0, cnt, body, carry)
    # The other segments of the block add into the same rows.
    plt.atomic_add(dk_ref, (blk, slice(None)), dk * scale)
    plt.atomic_add(dv_ref, (blk, slice(None)), dv)
    plt.atomic_add(dbias_ref, (blk,), dbias)


# ---------------------------------------------------------------------------
# pallas_calls and the custom VJP. Arrays are flattened to X = B * K.
# ---------------------------------------------------------------------------


def _compiler_params(st: _Static, d: int):
  # 4 warps beat 8 at D = 128 with the default 32-64-row tiles (tiling sweep,
  # experiments/results/kernels/NOTES.md).
  num_warps = st.num_warps or 4
  return plt.CompilerParams(num_warps=num_warps,
                            num_stages=st.num_stages or 2)


def _forward(st: _Static, q_XRD, k_XSD, v_XSD, bias_XS, sel_XNT, idx_XQN,
             cnt_XQ):
  x, tg, d = q_XRD.shape
  s, n = k_XSD.shape[1], sel_XNT.shape[1]
  rows, nq = st.block_q * st.groups, idx_XQN.shape[1]
  kernel = functools.partial(_fwd_kernel, block_size=st.block_size,
                             groups=st.groups, scale=st.scale,
                             fast=st.full_fast_path)
  full = lambda *shape: pl.BlockSpec((None, *shape),
                                     lambda i, b: (b,) + (0,) * len(shape))
  return pl.pallas_call(
      kernel,
      grid=(nq, x),
      in_specs=[
          pl.BlockSpec((None, rows, d), lambda i, b: (b, i, 0)),
          full(s, d), full(s, d), full(s),
          pl.BlockSpec((None, n, st.block_q), lambda i, b: (b, 0, i)),
          pl.BlockSpec((None, None, n), lambda i, b: (b, i, 0)),
          pl.BlockSpec((None, None), lambda i, b: (b, i)),
      ],
      out_specs=[
          pl.BlockSpec((None, rows, d), lambda i, b: (b, i, 0)),
          pl.BlockSpec((None, rows), lambda i, b: (b, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct((x, tg, d), q_XRD.dtype),
                 jax.ShapeDtypeStruct((x, tg), _F32)],
      compiler_params=_compiler_params(st, d),
      interpret=st.interpret,
      debug=st.debug,
      name="block_sparse_attention_fwd",
  )(q_XRD, k_XSD, v_XSD, bias_XS, sel_XNT, idx_XQN, cnt_XQ)


def _backward_dq(st: _Static, q_XRD, do_XRD, lse_XR, delta_XR, k_XSD, v_XSD,
                 bias_XS, sel_XNT, idx_XQN, cnt_XQ):
  x, _, d = q_XRD.shape
  s, n = k_XSD.shape[1], sel_XNT.shape[1]
  rows, nq = st.block_q_dq * st.groups, idx_XQN.shape[1]
  kernel = functools.partial(_dq_kernel, block_size=st.block_size,
                             groups=st.groups, scale=st.scale,
                             key_rows=st.transpose_bwd,
                             fast=st.full_fast_path)
  tile = pl.BlockSpec((None, rows, d), lambda i, b: (b, i, 0))
  tile_vec = pl.BlockSpec((None, rows), lambda i, b: (b, i))
  full = lambda *shape: pl.BlockSpec((None, *shape),
                                     lambda i, b: (b,) + (0,) * len(shape))
  return pl.pallas_call(
      kernel,
      grid=(nq, x),
      in_specs=[
          tile, tile, tile_vec, tile_vec, full(s, d), full(s, d), full(s),
          pl.BlockSpec((None, n, st.block_q_dq), lambda i, b: (b, 0, i)),
          pl.BlockSpec((None, None, n), lambda i, b: (b, i, 0)),
          pl.BlockSpec((None, None), lambda i, b: (b, i)),
      ],
      out_specs=tile,
      out_shape=jax.ShapeDtypeStruct(q_XRD.shape, q_XRD.dtype),
      compiler_params=_compiler_params(st, d),
      interpret=st.interpret,
      debug=st.debug,
      name="block_sparse_attention_dq",
  )(q_XRD, do_XRD, lse_XR, delta_XR, k_XSD, v_XSD, bias_XS, sel_XNT,
    idx_XQN, cnt_XQ)


def _backward_dkv(st: _Static, q_XRD, do_XRD, lse_XR, delta_XR, k_XSD,
                  v_XSD, bias_XS, sel_XNT, tiles_XZ, blk_XW, start_XW,
                  cnt_XW):
  """dk, dv, dbias, and with `st.fused_dq` dq too (else None)."""
  x, tg, d = q_XRD.shape
  s, n, t = k_XSD.shape[1], sel_XNT.shape[1], sel_XNT.shape[2]
  z, w = tiles_XZ.shape[1], blk_XW.shape[1]
  kernel = functools.partial(_dkv_kernel, block_size=st.block_size,
                             block_q=st.block_q_dkv, groups=st.groups,
                             scale=st.scale, fused_dq=st.fused_dq,
                             key_rows=st.transpose_bwd,
                             fast=st.full_fast_path)
  full = lambda *shape: pl.BlockSpec((None, *shape),
                                     lambda b, i: (b,) + (0,) * len(shape))
  item = pl.BlockSpec((None, None), lambda b, i: (b, i))
  # fp32 accumulators, aliased to the outputs: zero, then every item adds;
  # cast to k's (q's) dtype after the call.
  acc_dims = [(s, d), (s, d), (s,)]
  if st.fused_dq:
    # dq^T with key_rows: the kernel's dq tiles come out as [D, R].
    acc_dims.append((d, tg) if st.transpose_bwd else (tg, d))
  acc_shapes = [jax.ShapeDtypeStruct((x, *dims), _F32) for dims in acc_dims]
  zeros = [jnp.zeros(a.shape, a.dtype) for a in acc_shapes]
  acc_specs = [full(*dims) for dims in acc_dims]
  num_in = 12  # operands before the accumulators
  # B*K is the fastest grid axis (CUDA launches in linear order). Items are
  # in block order, so the sink's many segments start first, and the
  # padding items, which exit at once, come last.
  dk_XSD, dv_XSD, dbias_XS, *dq = pl.pallas_call(
      kernel,
      grid=(x, w),
      in_specs=[
          full(tg, d), full(tg, d), full(tg), full(tg), full(s, d),
          full(s, d), full(s), full(n, t), full(z), item, item, item,
          *acc_specs,
      ],
      out_specs=acc_specs,
      out_shape=acc_shapes,
      input_output_aliases={num_in + i: i for i in range(len(acc_dims))},
      compiler_params=_compiler_params(st, d),
      interpret=st.interpret,
      debug=st.debug,
      name="block_sparse_attention_dkv",
  )(q_XRD, do_XRD, lse_XR, delta_XR, k_XSD, v_XSD, bias_XS, sel_XNT,
    tiles_XZ, blk_XW, start_XW, cnt_XW, *zeros)
  dq_XRD = None
  if st.fused_dq:
    dq_XRD = dq[0].transpose(0, 2, 1) if st.transpose_bwd else dq[0]
    dq_XRD = dq_XRD.astype(q_XRD.dtype)
  return (dq_XRD, dk_XSD.astype(k_XSD.dtype), dv_XSD.astype(v_XSD.dtype),
          dbias_XS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st, q_XRD, k_XSD, v_XSD, bias_XS, sel_XNT, lists):
  out_XRD, _ = _forward(st, q_XRD, k_XSD, v_XSD, bias_XS, sel_XNT,
                        *lists["fwd"])
  return out_XRD


def _attention_fwd(st, q_XRD, k_XSD, v_XSD, bias_XS, sel_XNT, lists):
  out_XRD, lse_XR = _forward(st, q_XRD, k_XSD, v_XSD, bias_XS, sel_XNT,
                             *lists["fwd"])
  res = (q_XRD, k_XSD, v_XSD, bias_XS, sel_XNT, lists, out_XRD, lse_XR)
  return out_XRD, res


def _attention_bwd(st, res, do_XRD):
  q_XRD, k_XSD, v_XSD, bias_XS, sel_XNT, lists, out_XRD, lse_XR = res
  # delta = rowsum(dO * O) = sum_s p_s dp_s, the softmax-backward term.
  delta_XR = jnp.sum(do_XRD.astype(_F32) * out_XRD.astype(_F32), axis=-1)
  common_args = (q_XRD, do_XRD, lse_XR, delta_XR, k_XSD, v_XSD, bias_XS,
                 sel_XNT)
  dq_XRD, dk_XSD, dv_XSD, dbias_XS = _backward_dkv(st, *common_args,
                                                   *lists["dkv"])
  if not st.fused_dq:
    dq_XRD = _backward_dq(st, *common_args, *lists["dq"])
  zero_lists = jax.tree.map(lambda _: None, lists)
  return dq_XRD, dk_XSD, dv_XSD, dbias_XS, None, zero_lists


_attention.defvjp(_attention_fwd, _attention_bwd)


# ---------------------------------------------------------------------------
# Public wrapper.
# ---------------------------------------------------------------------------


def _tile_unions(mask_BKTN, block_q, block_size):
  """[B, K, T / block_q, N] bool: blocks any token of the tile attends."""
  b, kh, t, n = mask_BKTN.shape
  nq = t // block_q
  union_BKQN = jnp.any(mask_BKTN.reshape(b, kh, nq, block_q, n), axis=3)
  # Blocks starting after the tile's last token hold no visible key.
  last_Q = (jnp.arange(nq) + 1) * block_q - 1
  causal_QN = jnp.arange(n)[None, :] * block_size <= last_Q[:, None]
  return union_BKQN & causal_QN[None, None]


def _compact(member_BKAZ):
  """Member indices first (ascending) along the last axis, and their count.

  A cumsum and a scatter, O(size); an argsort costs O(size log Z) and is
  noticeably slower on long rows (the dk/dv lists have T / block_q).
  """
  b, kh, a, z = member_BKAZ.shape
  member_MZ = member_BKAZ.reshape(b * kh * a, z)
  slot_MZ = jnp.cumsum(member_MZ, axis=-1, dtype=jnp.int32) - 1
  # Non-members aim past the row's end and are dropped. Row-local targets
  # (a scatter per row) keep every index below Z: a flat index over all
  # rows overflows int32 once B K A Z reaches 2^31 (a 128k prefill at
  # batch 16).
  target_MZ = jnp.where(member_MZ, slot_MZ, z)
  src_Z = jnp.arange(z, dtype=jnp.int32)

  def row(target_Z):
    return jnp.zeros((z,), jnp.int32).at[target_Z].set(src_Z, mode="drop")

  idx_MZ = jax.vmap(row)(target_MZ)
  cnt_M = slot_MZ[:, -1] + 1
  return idx_MZ.reshape(b * kh, a, z), cnt_M.reshape(b * kh, a)


def _dkv_num_items(t, n, block_size, block_q, segment):
  """Static bound on the dk/dv work items per (b, k).

  Block j is in the union of at most the tiles that hold a real token at or
  after its first key, tiles - floor(j C / block_q) of them (all of them
  when every token selects every block, so the bound is reached).
  """
  tiles = common.cdiv(t, block_q)
  return max(1, sum(common.cdiv(max(0, tiles - j * block_size // block_q),
                                segment) for j in range(n)))


def _dkv_work_items(cnt_XN, segment, num_items):
  """[X, W] int32 block, first list entry and entry count of each item.

  Block j's list of cnt_j tiles becomes ceil(cnt_j / segment) items, in
  block order; the slots past the last item are padding (count 0).
  """
  x, n = cnt_XN.shape
  nseg_XN = (cnt_XN + segment - 1) // segment
  end_XN = jnp.cumsum(nseg_XN, axis=1)
  # Item i belongs to block #{j : end_j <= i}: ones scattered at the ends
  # and a prefix sum, O(N + W).
  row_XN = jnp.broadcast_to(jnp.arange(x)[:, None], (x, n))
  hits_XW = jnp.zeros((x, num_items), jnp.int32)
  hits_XW = hits_XW.at[row_XN, end_XN].add(1, mode="drop")
  blk_XW = jnp.cumsum(hits_XW, axis=1)
  real_XW = blk_XW < n
  blk_XW = jnp.minimum(blk_XW, n - 1)
  first_XW = jnp.take_along_axis(end_XN - nseg_XN, blk_XW, axis=1)
  start_XW = (jnp.arange(num_items, dtype=jnp.int32)[None, :] - first_XW)
  start_XW = start_XW * segment
  left_XW = jnp.take_along_axis(cnt_XN, blk_XW, axis=1) - start_XW
  cnt_XW = jnp.where(real_XW, jnp.minimum(left_XW, segment), 0)
  return blk_XW, jnp.where(real_XW, start_XW, 0), cnt_XW


def _to_rows(q_BTHD, k_BTKD, v_BTKD, bias_BTK, tp, gp, dp, s):
  """The kernels' operands, flattened to X = B * K and zero-padded.

  Query rows [X, Tp * Gp, Dp]: row t * Gp + g is (token t, head g of the
  group), tokens padded to Tp, heads to Gp, D to Dp; keys, values [X, S, Dp]
  and the fp32 bias [X, S] (0 for None) padded to S keys.
  """
  b, t, h, d = q_BTHD.shape
  kh = k_BTKD.shape[2]
  q_BKTGD = q_BTHD.reshape(b, t, kh, h // kh, d).transpose(0, 2, 1, 3, 4)
  q_BKTGD = jnp.pad(q_BKTGD, ((0, 0), (0, 0), (0, tp - t),
                              (0, gp - h // kh), (0, dp - d)))
  q_XRD = q_BKTGD.reshape(b * kh, tp * gp, dp)
  kv_pad = ((0, 0), (0, 0), (0, s - t), (0, dp - d))
  k_XSD = jnp.pad(k_BTKD.transpose(0, 2, 1, 3), kv_pad).reshape(b * kh, s, dp)
  v_XSD = jnp.pad(v_BTKD.transpose(0, 2, 1, 3), kv_pad).reshape(b * kh, s, dp)
  if bias_BTK is None:
    return q_XRD, k_XSD, v_XSD, jnp.zeros((b * kh, s), _F32)
  bias_BKS = bias_BTK.astype(_F32).transpose(0, 2, 1)
  bias_XS = jnp.pad(bias_BKS, ((0, 0), (0, 0), (0, s - t)))
  return q_XRD, k_XSD, v_XSD, bias_XS.reshape(b * kh, s)


def _from_rows(x_XR, b, t, h, kh, gp):
  """[B, T, H, ...] from query rows [B*K, Tp * Gp, ...] (`_to_rows`'
  layout), the padded tokens and heads sliced off."""
  rest = x_XR.shape[2:]
  x_BKTG = x_XR.reshape(b, kh, -1, gp, *rest)[:, :, :t, :h // kh]
  return jnp.moveaxis(x_BKTG, 1, 2).reshape(b, t, h, *rest)


def _check(q_BTHD, k_BTKD, v_BTKD, bias_BTK, mask_BKTN, block_size):
  b, t, h, d = q_BTHD.shape
  kh = k_BTKD.shape[2] if k_BTKD.ndim == 4 else 0
  if block_size < 1:
    raise ValueError(f"block_size={block_size} must be positive")
  n = common.cdiv(t, block_size)
  if k_BTKD.shape != (b, t, kh, d) or kh == 0 or h % kh:
    raise ValueError(f"k_BTKD {k_BTKD.shape} must be [B, T, K, D] with "
                     f"q_BTHD {q_BTHD.shape} and H % K == 0")
  if v_BTKD.shape != k_BTKD.shape:
    raise ValueError(f"v_BTKD {v_BTKD.shape} != k_BTKD {k_BTKD.shape}")
  if k_BTKD.dtype != q_BTHD.dtype or v_BTKD.dtype != q_BTHD.dtype:
    raise ValueError(f"k_BTKD {k_BTKD.dtype} / v_BTKD {v_BTKD.dtype} must "
                     f"have q_BTHD's dtype {q_BTHD.dtype}")
  if bias_BTK is not None and bias_BTK.shape != (b, t, kh):
    raise ValueError(f"bias_BTK {bias_BTK.shape} != {(b, t, kh)}")
  if mask_BKTN.shape != (b, kh, t, n):
    raise ValueError(f"mask_BKTN {mask_BKTN.shape} != {(b, kh, t, n)} "
                     f"(N = ceil(T / block_size={block_size}))")


def _tile_fields(st: _Static) -> tuple[str, ...]:
  """The query-tile sizes in use (fused_dq runs no dq kernel)."""
  if st.fused_dq:
    return ("block_q", "block_q_dkv")
  return ("block_q", "block_q_dq", "block_q_dkv")


def _check_triton(st: _Static, d: int):
  """Triton lowering constraints (not needed in interpret mode)."""
  c = st.block_size
  if not common.is_power_of_2(c) or c < _MIN_DOT_DIM:
    raise ValueError(f"block_size={c} must be a power of 2 >= 16 on GPU")
  if d < _MIN_DOT_DIM:
    raise ValueError(f"head dim D={d} must be >= 16 on GPU")
  for name in _tile_fields(st):
    tq = getattr(st, name)
    if not common.is_power_of_2(tq) or tq * st.groups < _MIN_DOT_DIM:
      raise ValueError(f"block_sizes.{name}={tq} must be a power of 2 with "
                       f"{name} * G >= 16 (G padded = {st.groups}) on GPU")


@functools.partial(
    jax.jit,
    static_argnames=("block_size", "block_sizes", "fused_dq",
                     "transpose_bwd", "full_fast_path", "num_warps",
                     "num_stages", "interpret", "debug"))
def block_sparse_attention(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    bias_BTK: jax.Array | None,
    mask_BKTN: jax.Array,
    block_size: int,
    *,
    block_sizes: common.BlockSizes | None = None,
    fused_dq: bool = False,
    transpose_bwd: bool = True,
    full_fast_path: bool = True,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
    debug: bool = False,
) -> jax.Array:
  """Block-sparse causal GQA attention with a key bias, as Pallas kernels.

  Same semantics as `block_sparse_attention_reference`; differentiable
  w.r.t. q, k, v and the bias (not the mask).

  Args:
    q_BTHD: queries; query t sits at position t. bf16 or fp32.
    k_BTKD: keys at positions 0..T-1, q's dtype.
    v_BTKD: values, q's dtype.
    bias_BTK: additive per-key logit bias (None means 0).
    mask_BKTN: bool, block n selected for (b, KV head k, query t),
      N = ceil(T / C).
    block_size: C, tokens per selection block (the kernels' key tile).
    block_sizes: query tiles and dk/dv segments (`common.BlockSizes`);
      None for the defaults.
    fused_dq: compute dq in the dk/dv kernel (fp32 atomic adds per
      (block, tile) pair, tiles of `block_q_dkv` tokens) instead of in a
      separate dq kernel; `block_q_dq` is then unused.
    transpose_bwd: the backward kernels compute the logits transposed,
      keys as rows ([C, R] = K Q^T, as FlashAttention's dk/dv kernels),
      so every backward matmul has C rows and needs no register transpose.
    full_fast_path: branch, per (tile, block) pair, to a path without the
      token mask when every token of the tile selected the block and the
      block lies wholly before the tile (no compares or selects; the same
      result). False always masks (the kernels before session 7).
    num_warps: Triton warps per program (None: 4).
    num_stages: Triton pipeline stages (None: 2).
    interpret: run the kernels in the Pallas interpreter (CPU).
    debug: print the kernels' jaxprs.

  Returns:
    out_BTHD in q's dtype; a query row with no attended key gives 0.
  """
  _check(q_BTHD, k_BTKD, v_BTKD, bias_BTK, mask_BKTN, block_size)
  b, t, h, d = q_BTHD.shape
  kh = k_BTKD.shape[2]
  g, c = h // kh, block_size
  n = common.cdiv(t, c)
  gp, dp = common.next_power_of_2(g), common.next_power_of_2(d)
  bs = (block_sizes or common.BlockSizes()).resolve(gp)
  for field in dataclasses.fields(bs):
    if getattr(bs, field.name) < 1:
      raise ValueError(f"block_sizes.{field.name}="
                       f"{getattr(bs, field.name)} must be positive")
  st = _Static(block_size=c, groups=gp, block_q=bs.block_q,
               block_q_dq=bs.block_q_dq, block_q_dkv=bs.block_q_dkv,
               dkv_segment=bs.dkv_segment, fused_dq=fused_dq,
               transpose_bwd=transpose_bwd, full_fast_path=full_fast_path,
               scale=1.0 / math.sqrt(d),
               num_warps=num_warps, num_stages=num_stages,
               interpret=interpret, debug=debug)
  if not interpret:
    _check_triton(st, dp)
  tile_lcm = math.lcm(*(getattr(st, f) for f in _tile_fields(st)))
  tp = common.cdiv(t, tile_lcm) * tile_lcm
  # Padded tokens select nothing and padded heads get zero cotangents, so
  # neither affects grads.
  q_XRD, k_XSD, v_XSD, bias_XS = _to_rows(q_BTHD, k_BTKD, v_BTKD, bias_BTK,
                                          tp, gp, dp, n * c)

  # Index structures (XLA; the selection carries no gradient).
  mask_BKTN = jnp.pad(lax.stop_gradient(mask_BKTN).astype(bool),
                      ((0, 0), (0, 0), (0, tp - t), (0, 0)))
  sel_XNT = mask_BKTN.transpose(0, 1, 3, 2).reshape(b * kh, n, tp)
  sel_XNT = sel_XNT.astype(_SEL_DTYPE)
  union_dkv = _tile_unions(mask_BKTN, st.block_q_dkv, c)
  tiles_XNQ, cnt_XN = _compact(union_dkv.transpose(0, 1, 3, 2))
  num_items = _dkv_num_items(t, n, c, st.block_q_dkv, st.dkv_segment)
  items = _dkv_work_items(cnt_XN, st.dkv_segment, num_items)
  fwd_lists = _compact(_tile_unions(mask_BKTN, st.block_q, c))
  lists = dict(fwd=fwd_lists, dkv=(tiles_XNQ.reshape(b * kh, -1), *items))
  if not st.fused_dq:
    # The forward's lists serve the dq kernel when the tiles agree.
    lists["dq"] = (fwd_lists if st.block_q_dq == st.block_q else
                   _compact(_tile_unions(mask_BKTN, st.block_q_dq, c)))

  out_XRD = _attention(st, q_XRD, k_XSD, v_XSD, bias_XS, sel_XNT, lists)
  return _from_rows(out_XRD, b, t, h, kh, gp)[..., :d]


# ---------------------------------------------------------------------------
# Reference.
# ---------------------------------------------------------------------------


def block_sparse_attention_reference(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    bias_BTK: jax.Array | None,
    mask_BKTN: jax.Array,
    block_size: int,
    *,
    compute_dtype: jnp.dtype = _F32,
) -> jax.Array:
  """Dense masked attention with the same semantics, in fp32 by default.

  out[t, g] = softmax_s(q[t, g].k[s] / sqrt(D) + bias[s, k]) v[s] over the
  s <= t with mask[k, t, s // C], where query head g uses KV head g // G.

  fp32 is the spec. `compute_dtype=jnp.bfloat16` runs the same math with
  inputs and every intermediate in bf16; the distance of that variant from
  the fp32 one measures how far bf16 rounding alone moves the result, the
  yardstick of the large-case kernel tests (`tests/tolerances.py`).

  Args:
    q_BTHD: queries; query t sits at position t.
    k_BTKD: keys at positions 0..T-1.
    v_BTKD: values.
    bias_BTK: additive per-key logit bias (None means 0).
    mask_BKTN: bool selected blocks, N = ceil(T / C).
    block_size: C.
    compute_dtype: dtype of the computation (fp32 unless measuring rounding).

  Returns:
    out_BTHD in q's dtype; a query row with no attended key gives 0.
  """
  _check(q_BTHD, k_BTKD, v_BTKD, bias_BTK, mask_BKTN, block_size)
  b, t, h, d = q_BTHD.shape
  kh = k_BTKD.shape[2]
  cd = jnp.dtype(compute_dtype)
  q_BTKGD = q_BTHD.astype(cd).reshape(b, t, kh, h // kh, d)
  logits_BKGTS = jnp.einsum("BTKGD,BSKD->BKGTS", q_BTKGD, k_BTKD.astype(cd),
                            precision=lax.Precision.HIGHEST)
  logits_BKGTS = logits_BKGTS / jnp.asarray(math.sqrt(d), cd)
  if bias_BTK is not None:
    bias_BKS = bias_BTK.astype(cd).transpose(0, 2, 1)
    logits_BKGTS = logits_BKGTS + bias_BKS[:, :, None, None, :]
  # Token mask: the key's block is selected for the query, and key <= query.
  block_S = jnp.arange(t) // block_size
  tok_BKTS = jnp.take(mask_BKTN.astype(bool), block_S, axis=3)
  tok_BKTS = tok_BKTS & jnp.tril(jnp.ones((t, t), bool))[None, None]
  mask_BKGTS = jnp.broadcast_to(tok_BKTS[:, :, None], logits_BKGTS.shape)
  logits_BKGTS = jnp.where(mask_BKGTS, logits_BKGTS, -jnp.inf)
  m_BKGT1 = jnp.max(logits_BKGTS, axis=-1, keepdims=True)
  m_BKGT1 = lax.stop_gradient(jnp.where(jnp.isfinite(m_BKGT1), m_BKGT1, 0.0))
  e_BKGTS = jnp.where(mask_BKGTS, jnp.exp(logits_BKGTS - m_BKGT1), 0.0)
  z_BKGT1 = jnp.sum(e_BKGTS, axis=-1, keepdims=True)
  p_BKGTS = e_BKGTS / jnp.where(z_BKGT1 > 0, z_BKGT1, 1.0)
  out_BTKGD = jnp.einsum("BKGTS,BSKD->BTKGD", p_BKGTS, v_BTKD.astype(cd),
                         precision=lax.Precision.HIGHEST)
  return out_BTKGD.reshape(b, t, h, d).astype(q_BTHD.dtype)
