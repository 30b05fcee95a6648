"""Block-sparse causal attention forward on Pallas Mosaic GPU (Hopper).

The forward of `block_sparse_attention` (NOSA_SPEC.md §2.6-§2.7) written for
the Mosaic GPU backend (`plgpu.kernel`, TMA, wgmma), the first kernel of
issue 27's move off the deprecated Pallas Triton backend
(experiments/results/kernels/NOTES.md, "Off the Pallas Triton backend").
Query t attends, through KV head k, the keys s <= t whose block s // C is
selected for (t, k), with logits q.k / sqrt(D) + bias[s, k] and an fp32
softmax; the G query heads of a KV head share the selection (GQA). Same
semantics and positional arguments as
`block_sparse_attention.block_sparse_attention_reference`.

Differentiable w.r.t. q, k, v and the bias (and through the returned lse):
the custom VJP's backward is the Mosaic GPU dq and dk/dv/dbias kernels of
`block_sparse_attention_mosaic_bwd.py`, from the lse saved here; it takes
D <= 128 and refuses other shapes with a one-line error.

Design. As in the Triton kernel, a query tile is consecutive tokens times
the G heads of one KV head (row = token * G + head), and a program walks
the sorted union of its tokens' selected blocks (XLA prepares the lists).
A program is `compute_wgs` consumer warpgroups of 64 rows each (one wgmma
M tile: 64 / G tokens per warpgroup) and one producer warpgroup that TMA-
copies each listed block's K, V (C x D) and bias (C) from row `idx[i] * C`
into a ring of `max_concurrent_steps` SMEM slots, as FlashAttention-3 and
JAX's `attention_mgpu` do for dense blocks (`warp_specialized`; without it
one warpgroup issues its own copies, `max_concurrent_steps - 1` blocks
ahead). The consumers share every block:

  s   = Q K^T (wgmma, fp32)            [64, C]
  s   = s * scale * log2(e) + bias * log2(e), masked (below)
  online softmax in base 2 (FlashAttention-2), p cast to q's dtype
  acc = acc * corr + P V (wgmma, fp32)  [64, D]

and write out = acc / l and the log2-sum-exp2 (the Triton forward's lse,
kept for a backward) through SMEM by TMA.

Token mask. The selection is per token, the wgmma fragment per row, and
there is no register reshape [R] -> [block_q, G] in the WGMMA layout. So
XLA packs, per (tile, listed block), each warpgroup's token selections into
bits (int32 words of 32 tokens; two words when G = 1), and row r's bit is
`(word >> ((r // G) % 32)) & 1`: a scalar shifted by the row's token, all
in the logits' own layout. The causal mask compares key and row positions.
Masked logits are `common.MASK_VALUE` (finite), as in the Triton kernel.

Constraints (one-line ValueErrors): bf16 or fp16 (wgmma; fp32 inputs use
"pallas" or "xla"), D a multiple of 64 (wgmma K and the 128-byte swizzle),
C = 64, G <= 64 (padded to a power of 2). T is any length (tokens padded).
Interpret mode: `interpret=True` runs the kernel on the CPU in Mosaic GPU's
interpreter (`plgpu.InterpretGPUParams()`); slow, tiny shapes only. There,
P goes through SMEM (the interpreter's wgmma reads SMEM operands only) and
P V into a fresh accumulator (no `run_state` rule); the compiled kernel
feeds P from registers and accumulates in place.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels import common

# The Triton kernel's module, for its argument checks and XLA block lists
# (the package re-exports its wrapper under the module's name).
bsa = importlib.import_module("pallas_kernels.block_sparse_attention")

_F32 = jnp.float32
_LOG2E = math.log2(math.e)
_ROWS = 64  # rows per consumer warpgroup: one wgmma M tile
_BLOCK = 64  # C, the only selection block size supported
_WORD = 32  # tokens per selection-bit word
_PRODUCER_REGS = 40  # registers per thread of the TMA warpgroup


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call; hashable (custom_vjp nondiff arg)."""
  groups: int  # G padded to a power of 2
  compute_wgs: int
  warp_specialized: bool
  full_fast_path: bool
  max_concurrent_steps: int
  scale: float
  interpret: bool

  @property
  def wg_tokens(self) -> int:
    """Tokens per consumer warpgroup (64 rows / G)."""
    return _ROWS // self.groups

  @property
  def words(self) -> int:
    """Selection-bit words per warpgroup: 2 when G = 1 (64 tokens), else 1."""
    return common.cdiv(self.wg_tokens, _WORD)

  @property
  def block_q(self) -> int:
    """Tokens per program."""
    return self.compute_wgs * self.wg_tokens


# ---------------------------------------------------------------------------
# Kernel.
# ---------------------------------------------------------------------------


def _query_tokens(st, dim):
  """[64] int32 token offset (row // G) of each query row within its
  warpgroup, in the layout of a WGMMA tile's axis `dim` (the forward's
  logits have queries on axis 0, the key-major backward's on axis 1)."""
  rows = plgpu.broadcasted_iota(jnp.int32, (_ROWS,), 0,
                                layout=plgpu.Layout.WGMMA.reduce(1 - dim))
  return lax.shift_right_logical(rows, int(math.log2(st.groups)))


def _query_limit(st, words, tok, first_tok, j):
  """[64] int32 in tok's layout: the last key offset in block j each query
  row sees, its position - j * C if its token selected block j, else -1.

  `words` are the warpgroup's selection-bit words for block j (the token's
  bit `tok % 32` of word `tok // 32`), `first_tok` its first token. A key
  `j * C + col` is then visible iff `col <= limit`: one compare per logit.
  """
  word = words[0] if st.words == 1 else jnp.where(tok >= _WORD, words[1],
                                                  words[0])
  bit = lax.bitwise_and(tok, _WORD - 1)
  sel = lax.bitwise_and(lax.shift_right_logical(word, bit), 1) != 0
  return jnp.where(sel, first_tok + tok - j * _BLOCK, -1)


def _is_full(st, words, j, first_tok):
  """[] bool: every token of the warpgroup selected block j, and the block
  ends at or before its first token: no mask needed (most pairs on local
  selections, as the Triton kernel's `full_fast_path`)."""
  all_tokens = -1 if st.wg_tokens >= _WORD else (1 << st.wg_tokens) - 1
  full = j * _BLOCK + _BLOCK - 1 <= first_tok
  for word in words:
    full &= word == all_tokens
  return full


def _load_k(refs, smem, barriers, x, j, slot):
  """Starts the TMA copies of block j's K and bias (one barrier)."""
  k_ref, _, bias_ref = refs
  _, k_smem, _, bias_smem, _, _ = smem
  k_bar = barriers[1].at[slot]
  blk = pl.ds(j * _BLOCK, _BLOCK)
  plgpu.copy_gmem_to_smem(k_ref.at[x, blk], k_smem.at[slot], k_bar)
  plgpu.copy_gmem_to_smem(bias_ref.at[x, blk], bias_smem.at[slot], k_bar)


def _load_v(refs, smem, barriers, x, j, slot):
  """Starts the TMA copy of block j's V."""
  _, v_ref, _ = refs
  _, _, v_smem, _, _, _ = smem
  plgpu.copy_gmem_to_smem(v_ref.at[x, pl.ds(j * _BLOCK, _BLOCK)],
                          v_smem.at[slot], barriers[2].at[slot])


def _consumer(st, q_ref, bits_ref, idx_ref, o_ref, lse_ref, smem, barriers,
              *, x, qi, wg, cnt, before_block):
  """One warpgroup's 64 rows: attends the program's listed blocks.

  `before_block(i)` runs before block i is awaited (the single-thread
  variant's prefetch). With warp specialization the warpgroup releases each
  slot on the consumed barriers once it has read it.
  """
  q_smem, k_smem, v_smem, bias_smem, lse_smem, p_smem = smem
  q_bar, k_bar, v_bar, k_free, v_free = barriers
  c, steps = _BLOCK, st.max_concurrent_steps
  row0 = (qi * st.compute_wgs + wg) * _ROWS
  first_tok = (qi * st.compute_wgs + wg) * st.wg_tokens
  qo = q_smem.at[wg]
  plgpu.copy_gmem_to_smem(q_ref.at[x, pl.ds(row0, _ROWS)], qo, q_bar.at[wg])
  plgpu.barrier_wait(q_bar.at[wg])

  shape = (_ROWS, c)
  col = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
  # Per-row quantities live in the row layout of the logits, [64] (each
  # thread holds its rows' values), and are broadcast along the keys.
  row_tok = _query_tokens(st, 0)

  def masked_logits(s, i, j):
    # The bits are stored in list order: loads that need not wait for j.
    words = [bits_ref[x, qi, i, wg * st.words + w] for w in range(st.words)]

    def masked(s):
      limit = _query_limit(st, words, row_tok, first_tok, j)
      return jnp.where(col <= lax.broadcast_in_dim(limit, shape, [0]), s,
                       common.MASK_VALUE)

    if not st.full_fast_path:
      return masked(s)
    return lax.cond(_is_full(st, words, j, first_tok), lambda s: s, masked,
                    s)

  def body(i, carry):
    acc, m_prev, l_prev = carry
    before_block(i)
    slot = lax.rem(i, steps)
    j = idx_ref[x, qi, i]
    plgpu.barrier_wait(k_bar.at[slot])

    def qk(acc_ref):
      plgpu.wgmma(acc_ref, qo, k_smem.at[slot].T)
      return acc_ref[...]

    s = pl.run_scoped(qk, plgpu.ACC(shape, _F32))
    bias = plgpu.load(bias_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
    if st.warp_specialized:
      plgpu.barrier_arrive(k_free.at[slot])
    # Base 2, so that the softmax uses exp2 (as the Triton kernel).
    s = (s * (st.scale * _LOG2E)
         + lax.broadcast_in_dim(bias * _LOG2E, shape, [1]))
    s = masked_logits(s, i, j)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    # In a row masked so far m_next is MASK_VALUE itself: subtract 0 there,
    # so that its masked entries give exp2(MASK_VALUE) = 0.
    m_sub = jnp.where(m_next > 0.5 * common.MASK_VALUE, m_next, 0.0)
    p = jnp.exp2(s - lax.broadcast_in_dim(m_sub, shape, [0]))
    corr = jnp.exp2(m_prev - m_next)
    l_next = corr * l_prev + jnp.sum(p, axis=1)
    acc = acc * lax.broadcast_in_dim(corr, acc.shape, [0])
    p_lo = p.astype(qo.dtype)
    plgpu.barrier_wait(v_bar.at[slot])
    if st.interpret:
      # The interpreter's wgmma takes SMEM operands only and has no rule
      # for run_state: P goes through SMEM, and P V into a fresh
      # accumulator is added (the same sum).
      p_smem.at[wg][...] = p_lo

      def pv_fresh(acc_ref):
        plgpu.wgmma(acc_ref, p_smem.at[wg], v_smem.at[slot])
        return acc_ref[...]

      acc = acc + pl.run_scoped(pv_fresh, plgpu.ACC(acc.shape, _F32))
    else:
      def pv(acc_ref):
        plgpu.wgmma(acc_ref, p_lo, v_smem.at[slot])

      acc = pl.run_state(pv)(plgpu.ACC.init(acc))
    if st.warp_specialized:
      plgpu.barrier_arrive(v_free.at[slot])
    return acc, m_next, l_next

  row_vec = plgpu.Layout.WGMMA.reduce(1)
  carry = (plgpu.layout_cast(jnp.zeros((_ROWS, qo.shape[-1]), _F32),
                             plgpu.Layout.WGMMA),
           plgpu.layout_cast(jnp.full((_ROWS,), common.MASK_VALUE, _F32),
                             row_vec),
           plgpu.layout_cast(jnp.zeros((_ROWS,), _F32), row_vec))
  acc, m, denom = lax.fori_loop(0, cnt, body, carry)
  # A row with no attended key (denom = 0) gives 0.
  l_safe = jnp.where(denom > 0.0, denom, 1.0)
  acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
  qo[...] = acc.astype(qo.dtype)
  lse_smem.at[wg][...] = m + jnp.log2(l_safe)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(qo, o_ref.at[x, pl.ds(row0, _ROWS)])
  plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[x, pl.ds(row0, _ROWS)])
  plgpu.wait_smem_to_gmem(0)


def _producer(st, refs, idx_ref, smem, barriers, *, x, qi, cnt):
  """The TMA warpgroup: copies each listed block into the next free slot."""
  _, _, _, k_free, v_free = barriers
  steps = st.max_concurrent_steps

  @pl.loop(0, cnt)
  def _(i):
    slot = lax.rem(i, steps)

    j = idx_ref[x, qi, i]

    # A slot's K (V) is free once every consumer has read the K (V) of the
    # block `steps` back: K goes in while the consumers still multiply by V.
    @pl.when(i >= steps)
    def _():
      plgpu.barrier_wait(k_free.at[slot])

    _load_k(refs, smem, barriers, x, j, slot)

    @pl.when(i >= steps)
    def _():
      plgpu.barrier_wait(v_free.at[slot])

    _load_v(refs, smem, barriers, x, j, slot)

  # Wait for the consumers to release the last blocks, so that every phase
  # of the consumed barriers is observed before they are freed (the
  # interpreter checks it).
  @pl.loop(jnp.maximum(cnt - steps, 0), cnt)
  def _(i):
    slot = lax.rem(i, steps)
    plgpu.barrier_wait(k_free.at[slot])
    plgpu.barrier_wait(v_free.at[slot])


def _fwd_kernel(
    q_ref,  # [X, Tp * G, D]
    k_ref,  # [X, S, D]
    v_ref,  # [X, S, D]
    bias_ref,  # [X, S] fp32
    bits_ref,  # [X, Tp / block_q, N, compute_wgs * words] int32, by entry
    idx_ref,  # [X, Tp / block_q, N] int32, the tile's blocks first, ascending
    cnt_ref,  # [X, Tp / block_q] int32, how many
    o_ref,  # [X, Tp * G, D]
    lse_ref,  # [X, Tp * G] fp32, log2-sum-exp2 of the base-2 logits
    smem,
    # q [compute_wgs, 64, D] (Q in, then out), k and v [steps, C, D],
    # bias [steps, C] fp32, lse [compute_wgs, 64] fp32, and in interpret
    # mode p [compute_wgs, 64, C] (else None).
    barriers,
    # q, k (+ bias), v, and with warp specialization k and v consumed.
    *, st: _Static):
  qi = lax.axis_index("q")
  x = lax.axis_index("x")
  cnt = cnt_ref[x, qi]
  refs = (k_ref, v_ref, bias_ref)
  consume = functools.partial(_consumer, st, q_ref, bits_ref, idx_ref, o_ref,
                              lse_ref, smem, barriers, x=x, qi=qi, cnt=cnt)
  if not st.warp_specialized:
    # One warpgroup that issues its own copies, `steps - 1` blocks ahead:
    # block i + steps - 1 goes into the slot block i - 1 has left.
    ahead = st.max_concurrent_steps - 1

    def prefetch(i):
      @pl.when(i < cnt)
      def _():
        j, slot = idx_ref[x, qi, i], lax.rem(i, st.max_concurrent_steps)
        _load_k(refs, smem, barriers, x, j, slot)
        _load_v(refs, smem, barriers, x, j, slot)

    for i in range(ahead):
      prefetch(i)
    consume(wg=0, before_block=lambda i: prefetch(i + ahead))
    return

  wg = lax.axis_index("wg")
  # The register file (64k = 512 per thread of one warpgroup) moves from
  # the producer to the consumers, as in Pallas' warp-specialized pipeline:
  # 232 each for two consumers, 256 (the most) for one.
  consumer_regs = min(256, (512 - _PRODUCER_REGS) // st.compute_wgs) // 8 * 8

  @pl.when(wg < st.compute_wgs)
  def _():
    plgpu.set_max_registers(consumer_regs, action="increase")
    consume(wg=wg, before_block=lambda i: None)

  @pl.when(wg == st.compute_wgs)
  def _():
    plgpu.set_max_registers(_PRODUCER_REGS, action="decrease")
    _producer(st, refs, idx_ref, smem, barriers, x=x, qi=qi, cnt=cnt)


def _forward(st: _Static, q_XRD, k_XSD, v_XSD, bias_XS, bits_XQNW, idx_XQN,
             cnt_XQ):
  """(out_XRD, lse_XR): the Mosaic GPU kernel over every tile."""
  x, tg, d = q_XRD.shape
  nq = idx_XQN.shape[1]
  wgs, steps = st.compute_wgs, st.max_concurrent_steps
  dtype = q_XRD.dtype
  # The layout wgmma reads from SMEM: 8 x 64 tiles, 128-byte swizzle.
  transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  tile = lambda *shape: plgpu.SMEM(shape, dtype, transforms=transforms)
  smem = (tile(wgs, _ROWS, d), tile(steps, _BLOCK, d), tile(steps, _BLOCK, d),
          plgpu.SMEM((steps, _BLOCK), _F32), plgpu.SMEM((wgs, _ROWS), _F32),
          tile(wgs, _ROWS, _BLOCK) if st.interpret else None)
  consumed = (plgpu.Barrier(num_arrivals=wgs, num_barriers=steps)
              if st.warp_specialized else None)
  barriers = (plgpu.Barrier(num_barriers=wgs),
              # K's barrier also counts the bias copy.
              plgpu.Barrier(num_arrivals=2, num_barriers=steps),
              plgpu.Barrier(num_barriers=steps), consumed, consumed)
  threads = ({"num_threads": wgs + 1, "thread_name": "wg"}
             if st.warp_specialized else {})
  return plgpu.kernel(
      functools.partial(_fwd_kernel, st=st),
      out_type=(jax.ShapeDtypeStruct((x, tg, d), dtype),
                jax.ShapeDtypeStruct((x, tg), _F32)),
      scratch_types=(smem, barriers),
      grid=(nq, x),
      grid_names=("q", "x"),
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if st.interpret else None,
      **threads,
  )(q_XRD, k_XSD, v_XSD, bias_XS, bits_XQNW, idx_XQN, cnt_XQ)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st, q_XRD, k_XSD, v_XSD, bias_XS, lists):
  return _forward(st, q_XRD, k_XSD, v_XSD, bias_XS, *lists["fwd"])


def _attention_fwd(st, q_XRD, k_XSD, v_XSD, bias_XS, lists):
  out_XRD, lse_XR = _attention(st, q_XRD, k_XSD, v_XSD, bias_XS, lists)
  res = (q_XRD, k_XSD, v_XSD, bias_XS, lists, out_XRD, lse_XR)
  return (out_XRD, lse_XR), res


def _attention_bwd(st, res, cts):
  # The backward kernels' module imports this one (one way at import time).
  bwd = importlib.import_module(
      "pallas_kernels.block_sparse_attention_mosaic_bwd")
  return bwd.attention_bwd(st, res, cts)


_attention.defvjp(_attention_fwd, _attention_bwd)


# ---------------------------------------------------------------------------
# Public wrapper.
# ---------------------------------------------------------------------------


def _selection_bits(mask_BKTN, st: _Static):
  """[B*K, Tp / block_q, N, compute_wgs * words] int32 token bits.

  Word w of a tile holds the selections of its tokens w * 32 .. w * 32 + 31
  (fewer when a warpgroup has fewer tokens), token i of the word in bit i.
  """
  b, kh, tp, n = mask_BKTN.shape
  per_word = min(_WORD, st.wg_tokens)
  m = mask_BKTN.reshape(b * kh, tp // per_word, per_word, n)
  weights = jnp.left_shift(jnp.uint32(1),
                           jnp.arange(per_word, dtype=jnp.uint32))
  bits = jnp.sum(m.astype(jnp.uint32) * weights[None, None, :, None], axis=2,
                 dtype=jnp.uint32)
  bits = lax.bitcast_convert_type(bits, jnp.int32)  # [X, Tp / 32, N]
  per_tile = st.compute_wgs * st.words
  bits = bits.reshape(b * kh, tp // st.block_q, per_tile, n)
  return bits.transpose(0, 1, 3, 2)


def _check_mosaic(q_BTHD, k_BTKD, block_size, compute_wgs, warp_specialized,
                  max_concurrent_steps):
  d = q_BTHD.shape[-1]
  g = q_BTHD.shape[2] // k_BTKD.shape[2]
  if jnp.dtype(q_BTHD.dtype) not in (jnp.dtype(jnp.bfloat16),
                                     jnp.dtype(jnp.float16)):
    raise ValueError(f"q_BTHD dtype {q_BTHD.dtype}: the Mosaic kernel takes "
                     "bfloat16 or float16 only (use 'pallas' or 'xla')")
  if d % 64:
    raise ValueError(f"head dim D={d} must be a multiple of 64 for the "
                     "Mosaic kernel")
  if block_size != _BLOCK:
    raise ValueError(f"block_size={block_size}: the Mosaic kernel takes "
                     f"{_BLOCK}-token blocks only")
  if common.next_power_of_2(g) > _ROWS:
    raise ValueError(f"G={g} query heads per KV head: the Mosaic kernel "
                     f"takes at most {_ROWS}")
  if compute_wgs not in (1, 2):
    raise ValueError(f"compute_wgs={compute_wgs} must be 1 or 2")
  if compute_wgs != 1 and not warp_specialized:
    raise ValueError(f"compute_wgs={compute_wgs} needs warp_specialized "
                     "(one warpgroup without it)")
  if max_concurrent_steps < 1:
    raise ValueError(f"max_concurrent_steps={max_concurrent_steps} must be "
                     "positive")


@functools.partial(
    jax.jit,
    static_argnames=("block_size", "compute_wgs", "warp_specialized",
                     "full_fast_path", "max_concurrent_steps", "return_lse",
                     "interpret"))
def block_sparse_attention_mosaic(
    q_BTHD: jax.Array,
    k_BTKD: jax.Array,
    v_BTKD: jax.Array,
    bias_BTK: jax.Array | None,
    mask_BKTN: jax.Array,
    block_size: int,
    *,
    compute_wgs: int | None = None,
    warp_specialized: bool | None = None,
    full_fast_path: bool = True,
    max_concurrent_steps: int = 2,
    return_lse: bool = False,
    interpret: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Block-sparse causal GQA attention with a key bias, on Mosaic GPU.

  Same semantics and positional arguments as
  `block_sparse_attention_reference` (and the Triton
  `block_sparse_attention`), for the shapes the Mosaic kernel takes (module
  docstring); differentiable w.r.t. q, k, v and the bias (not the mask)
  through the Mosaic backward kernels, for D <= 128.

  Args:
    q_BTHD, k_BTKD, v_BTKD, bias_BTK, mask_BKTN: as in the reference;
      q, k, v bf16 or fp16.
    block_size: C; must be 64.
    compute_wgs: consumer warpgroups per program (64 rows each), 1 or 2;
      they share the K/V loads of the union of their tokens' selections.
      None: 2 with warp specialization, else 1.
    warp_specialized: a producer warpgroup issues the TMA copies for the
      consumers (FlashAttention-3); False: one warpgroup that prefetches
      its own blocks `max_concurrent_steps - 1` ahead. None: True compiled,
      False in interpret mode, where each warpgroup is a CPU thread running
      an XLA program whose barrier waits hold one of XLA's CPU threads:
      the producer variant's 3-4 threads deadlock when the machine has
      fewer cores than that (measured on 2 cores).
    full_fast_path: branch (lax.cond), per (warpgroup, block), to logits
      without the token mask when every token of the warpgroup selected
      the block and the block lies wholly before them (the same result).
    max_concurrent_steps: SMEM slots of the K/V/bias ring (blocks in
      flight).
    return_lse: also return the log-sum-exp of each row's logits.
    interpret: run in Mosaic GPU's interpreter on the CPU.

  Returns:
    out_BTHD in q's dtype; a query row with no attended key gives 0. With
    `return_lse`, (out_BTHD, lse_BTH): lse_BTH fp32, the natural
    log-sum-exp of the row's attended logits (meaningless for a row with
    none).
  """
  bsa._check(q_BTHD, k_BTKD, v_BTKD, bias_BTK, mask_BKTN, block_size)
  if warp_specialized is None:
    warp_specialized = not interpret
  if compute_wgs is None:
    compute_wgs = 2 if warp_specialized else 1
  _check_mosaic(q_BTHD, k_BTKD, block_size, compute_wgs, warp_specialized,
                max_concurrent_steps)
  b, t, h, d = q_BTHD.shape
  kh = k_BTKD.shape[2]
  g, c = h // kh, block_size
  n = common.cdiv(t, c)
  gp = common.next_power_of_2(g)
  st = _Static(groups=gp, compute_wgs=compute_wgs,
               warp_specialized=warp_specialized,
               full_fast_path=full_fast_path,
               max_concurrent_steps=max_concurrent_steps,
               scale=1.0 / math.sqrt(d), interpret=interpret)
  tp = common.cdiv(t, st.block_q) * st.block_q
  q_XRD, k_XSD, v_XSD, bias_XS = bsa._to_rows(q_BTHD, k_BTKD, v_BTKD,
                                              bias_BTK, tp, gp, d, n * c)

  # Index structures (XLA; the selection carries no gradient). Padded
  # tokens select nothing.
  mask_BKTN = jnp.pad(lax.stop_gradient(mask_BKTN).astype(bool),
                      ((0, 0), (0, 0), (0, tp - t), (0, 0)))
  idx_XQN, cnt_XQ = bsa._compact(bsa._tile_unions(mask_BKTN, st.block_q, c))
  # Each list entry's bits, so that the kernel reads them at the entry.
  bits_XQNW = jnp.take_along_axis(_selection_bits(mask_BKTN, st),
                                  idx_XQN[..., None], axis=2)
  fwd_lists = (bits_XQNW, idx_XQN, cnt_XQ)
  # The backward's lists; XLA drops them when nothing differentiates.
  bwd = importlib.import_module(
      "pallas_kernels.block_sparse_attention_mosaic_bwd")
  lists = dict(fwd=fwd_lists, **bwd.backward_lists(mask_BKTN, st, fwd_lists))

  out_XRD, lse_XR = _attention(st, q_XRD, k_XSD, v_XSD, bias_XS, lists)
  out_BTHD = bsa._from_rows(out_XRD, b, t, h, kh, gp)
  if not return_lse:
    return out_BTHD
  # The kernel's lse is in base 2 (log2-sum-exp2 of log2(e) * logits).
  return out_BTHD, bsa._from_rows(lse_XR, b, t, h, kh, gp) * math.log(2.0)
