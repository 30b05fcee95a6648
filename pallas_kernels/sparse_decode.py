"""Split-K sparse decode attention over the GPU block cache (Pallas, Triton).

One new query token per sequence attends to the P cached KV blocks ("slots")
of its (sequence, KV head), each C tokens long: the GPU block cache of the
offload engine (NOSA_SPEC.md §4.1, §4.3). The cache *is* the selected set, so
the kernel needs no index list; slot order does not matter because RoPE was
applied before caching (§4.3).

Semantics (project decisions 1 and 6, fixing NOSI's §4.6 flaw):

  out = softmax(q.k / sqrt(D) + b) v,

with the eviction bias b at full strength (NOSI adds b/sqrt(D)), keys of empty
slots and of the unfilled tail of the partial block masked, the tail block
attended, and a query row with no valid key giving 0 (not NaN).

Which keys are valid is given per slot by `slot_len_BKP` (int32, the number
of valid tokens at the start of each slot: 0 = empty, C = full, in between =
the partial tail block): P times smaller than a per-key mask, and the kernel
builds the mask with an iota. Whatever the invalid positions of K, V and the
bias hold (stale data, NaN) never reaches the output: the kernel does not
even load them.

Design (flash-decoding): the grid is (B, K, n_split). Each program handles
the G query heads that share one KV head (rows padded to >= 16 in the
wrapper, because Triton dots need M >= 16) and a contiguous range of slots,
loops over them with an fp32 online softmax and writes an unnormalised
partial (o [G, D], m [G], l [G]); the wrapper combines the splits with a
log-sum-exp reduction in XLA. Splitting the slot axis keeps the GPU full when
B * K is small. Decode is memory-bound; `decode_bytes_read` counts the bytes
a step must move, for achieved-bandwidth figures.
"""

import dataclasses
import functools
import math

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
import jax.numpy as jnp

# Triton's dot needs every operand dimension >= 16, and every loaded tile
# must have a power-of-2 size.
_MIN_DOT_DIM = 16
# 2 waves of programs on an H100 SXM (132 SMs).
_DEFAULT_MIN_PROGRAMS = 2 * 132


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
  """Tiling of `sparse_decode` (frozen, so it can be a jit static argument).

  Attributes:
    num_splits: splits of the slot axis (n_split); None picks one from B, K
      and P (see `num_decode_splits`). The effective count can be lower, so
      that every split holds at least one slot.
    min_programs: with `num_splits=None`, split until the grid holds at
      least this many programs (2 waves on a 132-SM H100 by default), or
      every split holds one slot.
  """

  num_splits: int | None = None
  min_programs: int = _DEFAULT_MIN_PROGRAMS


def num_decode_splits(
    batch: int, kv_heads: int, num_slots: int,
    block_sizes: DecodeBlockSizes = DecodeBlockSizes()) -> tuple[int, int]:
  """The (n_split, slots per split) `sparse_decode` uses for these sizes."""
  n = block_sizes.num_splits
  if n is None:
    n = -(-block_sizes.min_programs // (batch * kv_heads))
  n = max(1, min(n, num_slots))
  per_split = -(-num_slots // n)
  # Drop splits left empty by rounding (e.g. P = 8, n = 5 -> 4 splits of 2).
  return -(-num_slots // per_split), per_split


def _is_pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


def _next_pow2(x: int) -> int:
  return 1 << max(0, x - 1).bit_length()


# ---------------------------------------------------------------------------
# Kernel.
# ---------------------------------------------------------------------------


def _dot(a, b, *, contract_b: int):
  """a @ b (contract_b=0) or a @ b.T (contract_b=1), accumulated in fp32."""
  # HIGHEST: fp32 inputs get IEEE dots (Triton's default would be TF32);
  # bf16 inputs are unaffected.
  return lax.dot_general(
      a, b, (((1,), (contract_b,)), ((), ())),
      precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _sparse_decode_kernel(
    q_ref,         # [Gp, D]  Gp = G padded to a power of 2 >= 16
    k_ref,         # [S, D]   S = P * C slot-major, or the cache's N * C
    v_ref,         # [S, D]
    bias_ref,      # [S] fp32, or None
    slot_len_ref,  # [P] int32
    block_idx_ref,  # [P] int32 block of the cache each slot reads, or None
    o_ref,         # [Gp, D] fp32, unnormalised output of this split
    m_ref,         # [Gp] fp32, max logit of this split (-inf: no valid key)
    l_ref,         # [Gp] fp32, softmax denominator relative to m
    *,
    sm_scale: float,
    block_size: int,
    slots_per_split: int,
    num_slots: int,
):
  gp, d = q_ref.shape
  c = block_size
  first = pl.program_id(2) * slots_per_split
  last = jnp.minimum(first + slots_per_split, num_slots)
  q = q_ref[...]
  token = lax.broadcasted_iota(jnp.int32, (c,), 0)

  def body(slot, carry):
    o, m_i, l_i = carry
    valid = token < slot_len_ref[slot]  # [C]
    blk = slot if block_idx_ref is None else block_idx_ref[slot]
    span = pl.ds(pl.multiple_of(blk * c, c), c)
    # Masked loads: invalid rows cost no memory traffic and read as 0, so
    # stale or NaN cache contents cannot leak into p @ v.
    k = plt.load(k_ref.at[span, :], mask=valid[:, None], other=0)  # [C, D]
    s = _dot(q, k, contract_b=1) * sm_scale  # [Gp, C]
    if bias_ref is not None:
      # Full-strength bias (project decision 1), not NOSI's b / sqrt(D).
      b = plt.load(bias_ref.at[span], mask=valid, other=0)  # [C]
      s = s + b[None, :]
    s = jnp.where(valid[None, :], s, -jnp.inf)
    m_new = jnp.maximum(m_i, s.max(axis=1))
    # While every key so far is masked, m_new = -inf; shift by 0 instead so
    # that exp gives 0, not exp(-inf - -inf) = NaN.
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m_i - shift)  # [Gp]
    p = jnp.exp(s - shift[:, None])  # [Gp, C]
    l_i = alpha * l_i + p.sum(axis=1)
    v = plt.load(v_ref.at[span, :], mask=valid[:, None], other=0)  # [C, D]
    pv = _dot(p.astype(v.dtype), v, contract_b=0)  # [Gp, D]
    return alpha[:, None] * o + pv, m_new, l_i

  init = (jnp.zeros((gp, d), jnp.float32),
          jnp.full((gp,), -jnp.inf, jnp.float32),
          jnp.zeros((gp,), jnp.float32))
  o, m_i, l_i = lax.fori_loop(first, last, body, init)
  o_ref[...] = o
  m_ref[...] = m_i
  l_ref[...] = l_i


# ---------------------------------------------------------------------------
# Wrapper.
# ---------------------------------------------------------------------------


def _validate(q_BHD, k_BKSD, v_BKSD, bias_BKS, slot_len_BKP, block_size,
              block_idx_BKP=None):
  """Raises a one-line ValueError naming the first bad argument."""
  if q_BHD.ndim != 3:
    raise ValueError(f"q_BHD must be [B, H, D], got shape {q_BHD.shape}")
  if k_BKSD.ndim != 4:
    raise ValueError(f"k_BKSD must be [B, K, S, D], got shape {k_BKSD.shape}")
  if v_BKSD.shape != k_BKSD.shape:
    raise ValueError(f"v_BKSD shape {v_BKSD.shape} != k_BKSD shape "
                     f"{k_BKSD.shape}")
  b, h, d = q_BHD.shape
  kb, kv_heads, s, kd = k_BKSD.shape
  if kb != b or kd != d:
    raise ValueError(f"k_BKSD shape {k_BKSD.shape} does not match q_BHD "
                     f"shape {q_BHD.shape} in B or D")
  if h % kv_heads:
    raise ValueError(f"q_BHD heads H={h} not a multiple of k_BKSD heads "
                     f"K={kv_heads}")
  if not (q_BHD.dtype == k_BKSD.dtype == v_BKSD.dtype):
    raise ValueError(f"q_BHD, k_BKSD, v_BKSD dtypes differ: {q_BHD.dtype}, "
                     f"{k_BKSD.dtype}, {v_BKSD.dtype}")
  if not jnp.issubdtype(q_BHD.dtype, jnp.floating):
    raise ValueError(f"q_BHD dtype must be floating, got {q_BHD.dtype}")
  if not (_is_pow2(block_size) and block_size >= _MIN_DOT_DIM):
    raise ValueError(f"block_size={block_size} must be a power of 2 >= "
                     f"{_MIN_DOT_DIM} (Triton tile)")
  if not (_is_pow2(d) and d >= _MIN_DOT_DIM):
    raise ValueError(f"q_BHD head dim D={d} must be a power of 2 >= "
                     f"{_MIN_DOT_DIM} (Triton tile)")
  if slot_len_BKP.ndim != 3 or slot_len_BKP.shape[:2] != (b, kv_heads):
    raise ValueError(f"slot_len_BKP shape {slot_len_BKP.shape} must be "
                     f"[B, K, P] = [{b}, {kv_heads}, P]")
  if slot_len_BKP.dtype != jnp.int32:
    raise ValueError(f"slot_len_BKP dtype must be int32, got "
                     f"{slot_len_BKP.dtype}")
  p = slot_len_BKP.shape[2]
  if block_idx_BKP is None and s != p * block_size:
    raise ValueError(f"k_BKSD slot axis S={s} != P * block_size = {p} * "
                     f"{block_size}")
  if block_idx_BKP is not None:
    if s % block_size:
      raise ValueError(f"k_BKSD cache axis S={s} is not a multiple of "
                       f"block_size={block_size}")
    if (block_idx_BKP.shape != slot_len_BKP.shape
        or block_idx_BKP.dtype != jnp.int32):
      raise ValueError(f"block_idx_BKP must be int32 {slot_len_BKP.shape}, "
                       f"got {block_idx_BKP.dtype} {block_idx_BKP.shape}")
  if bias_BKS is not None:
    if bias_BKS.shape != (b, kv_heads, s):
      raise ValueError(f"bias_BKS shape {bias_BKS.shape} must be [B, K, S] "
                       f"= {(b, kv_heads, s)}")
    if bias_BKS.dtype != jnp.float32:
      raise ValueError(f"bias_BKS dtype must be float32, got {bias_BKS.dtype}")


@functools.partial(
    jax.jit,
    static_argnames=["block_size", "block_sizes", "num_warps", "num_stages",
                     "interpret", "debug"])
def sparse_decode(
    q_BHD: jax.Array,
    k_BKSD: jax.Array,
    v_BKSD: jax.Array,
    bias_BKS: jax.Array | None,
    slot_len_BKP: jax.Array,
    block_size: int,
    *,
    block_idx_BKP: jax.Array | None = None,
    block_sizes: DecodeBlockSizes | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
    debug: bool = False,
) -> jax.Array:
  """Decode attention of one query token over the cached slots (Pallas).

  Args:
    q_BHD: [B, H, D] query of the new token, after RoPE; H = K * G.
    k_BKSD: [B, K, P * C, D] cached keys, slot-major: slot p holds keys
      [p * C, (p + 1) * C). Same dtype as q (bf16, fp16 or fp32).
    v_BKSD: [B, K, P * C, D] cached values.
    bias_BKS: [B, K, P * C] fp32 per-key eviction bias, added to the logits
      at full strength; None means 0.
    slot_len_BKP: [B, K, P] int32 valid tokens at the start of each slot
      (0 = empty slot, C = full block, else the partial tail block); the
      other positions are ignored whatever they hold.
    block_size: C, tokens per slot; a power of 2 >= 16.
    block_idx_BKP: optional [B, K, P] int32 block table: slot p reads
      block block_idx_BKP[b, k, p] of k/v/bias, which are then the whole
      cache [B, K, N * C, ...] (paged-attention style, no gathered copy);
      entries of empty slots (slot_len 0) are never read. None: k/v/bias
      are slot-major with S = P * C.
    block_sizes: split of the slot axis; None = `DecodeBlockSizes()`.
    num_warps: Triton warps per program; None = 4.
    num_stages: Triton software-pipelining stages of the slot loop;
      None = 2.
    interpret: run the kernel in the Pallas interpreter (CPU).
    debug: print the kernel's jaxpr and lowered code.

  Returns:
    [B, H, D] softmax(q.k / sqrt(D) + bias) v over the valid keys, in q's
    dtype (fp32 accumulation); 0 for a query with no valid key.
  """
  _validate(q_BHD, k_BKSD, v_BKSD, bias_BKS, slot_len_BKP, block_size,
            block_idx_BKP)
  b, h, d = q_BHD.shape
  kv_heads, s = k_BKSD.shape[1:3]
  g = h // kv_heads
  num_slots = slot_len_BKP.shape[2]
  block_sizes = block_sizes or DecodeBlockSizes()
  n_split, per_split = num_decode_splits(b, kv_heads, num_slots, block_sizes)

  # Pad the query rows of each KV head to a power of 2 >= 16 (Triton dot M).
  gp = max(_MIN_DOT_DIM, _next_pow2(g))
  q_BKGD = q_BHD.reshape(b, kv_heads, g, d)
  q_BKGD = jnp.pad(q_BKGD, ((0, 0), (0, 0), (0, gp - g), (0, 0)))

  kernel = functools.partial(
      _sparse_decode_kernel, sm_scale=1.0 / math.sqrt(d),
      block_size=block_size, slots_per_split=per_split, num_slots=num_slots)
  kv_spec = pl.BlockSpec((None, None, s, d), lambda i, j, n: (i, j, 0, 0))
  part_spec = pl.BlockSpec((None, None, None, gp), lambda i, j, n: (i, j, n, 0))
  o_BKNGD, m_BKNG, l_BKNG = pl.pallas_call(
      kernel,
      grid=(b, kv_heads, n_split),
      in_specs=[
          pl.BlockSpec((None, None, gp, d), lambda i, j, n: (i, j, 0, 0)),
          kv_spec,
          kv_spec,
          None if bias_BKS is None else pl.BlockSpec(
              (None, None, s), lambda i, j, n: (i, j, 0)),
          pl.BlockSpec((None, None, num_slots), lambda i, j, n: (i, j, 0)),
          None if block_idx_BKP is None else pl.BlockSpec(
              (None, None, num_slots), lambda i, j, n: (i, j, 0)),
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, gp, d),
                       lambda i, j, n: (i, j, n, 0, 0)),
          part_spec,
          part_spec,
      ],
      out_shape=[
          jax.ShapeDtypeStruct((b, kv_heads, n_split, gp, d), jnp.float32),
          jax.ShapeDtypeStruct((b, kv_heads, n_split, gp), jnp.float32),
          jax.ShapeDtypeStruct((b, kv_heads, n_split, gp), jnp.float32),
      ],
      compiler_params=plt.CompilerParams(
          num_warps=4 if num_warps is None else num_warps,
          num_stages=2 if num_stages is None else num_stages),
      interpret=interpret,
      debug=debug,
      name="nosa_sparse_decode",
  )(q_BKGD, k_BKSD, v_BKSD, bias_BKS, slot_len_BKP, block_idx_BKP)

  # Log-sum-exp combination of the splits. A split (or a whole row) with no
  # valid key has m = -inf and l = 0: shift by 0 there so its weight is 0.
  m_BKG = m_BKNG.max(axis=2)
  m_BKG = jnp.where(m_BKG == -jnp.inf, 0.0, m_BKG)
  w_BKNG = jnp.exp(m_BKNG - m_BKG[:, :, None, :])
  l_BKG = (w_BKNG * l_BKNG).sum(axis=2)
  o_BKGD = (w_BKNG[..., None] * o_BKNGD).sum(axis=2)
  o_BKGD = o_BKGD / jnp.where(l_BKG > 0, l_BKG, 1.0)[..., None]
  return o_BKGD[:, :, :g].reshape(b, h, d).astype(q_BHD.dtype)


def gather_blocks_by_index(x_BKS_: jax.Array, block_idx_BKP: jax.Array,
                           block_size: int) -> jax.Array:
  """[B, K, N * C, ...] cache -> [B, K, P * C, ...] slot-major copy."""
  b, kv, s = x_BKS_.shape[:3]
  p = block_idx_BKP.shape[-1]
  rest = x_BKS_.shape[3:]
  blocks = x_BKS_.reshape((b, kv, s // block_size, block_size) + rest)
  idx = jnp.clip(block_idx_BKP, 0, s // block_size - 1)
  out = blocks[jnp.arange(b)[:, None, None], jnp.arange(kv)[None, :, None],
               idx]
  return out.reshape((b, kv, p * block_size) + rest)


def decode_bytes_read(
    q_BHD: jax.Array,
    k_BKSD: jax.Array,
    v_BKSD: jax.Array,
    bias_BKS: jax.Array | None,
    slot_len_BKP: jax.Array,
    block_size: int,
) -> jax.Array:
  """HBM bytes one `sparse_decode` call must move (for achieved bandwidth).

  bytes = n_valid * (D * (|k| + |v|) + 4 * has_bias)   valid K, V, bias rows
        + B * H * D * |q| * 2                           q read, out written
        + 4 * B * K * P                                 slot_len

  where n_valid = sum(clip(slot_len_BKP, 0, C)) and |x| is the item size.
  Invalid rows are not loaded, so they are not counted; the fp32 split
  partials (B * K * n_split * Gp * (D + 2) * 4 bytes, written then read
  back) are overhead of the split, not counted either.

  Args:
    q_BHD, k_BKSD, v_BKSD, bias_BKS, slot_len_BKP, block_size: as for
      `sparse_decode`.

  Returns:
    A scalar float32 array (the count depends on the slot lengths).
  """
  d = q_BHD.shape[-1]
  n_valid = jnp.clip(slot_len_BKP, 0, block_size).astype(jnp.float32).sum()
  row = d * (k_BKSD.dtype.itemsize + v_BKSD.dtype.itemsize)
  row += 0 if bias_BKS is None else bias_BKS.dtype.itemsize
  fixed = 2 * q_BHD.size * q_BHD.dtype.itemsize + 4 * slot_len_BKP.size
  return n_valid * row + fixed


# ---------------------------------------------------------------------------
# Reference.
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=["block_size"])
def sparse_decode_reference(
    q_BHD: jax.Array,
    k_BKSD: jax.Array,
    v_BKSD: jax.Array,
    bias_BKS: jax.Array | None,
    slot_len_BKP: jax.Array,
    block_size: int,
    *,
    block_idx_BKP: jax.Array | None = None,
) -> jax.Array:
  """Pure-jnp `sparse_decode`: fp32 logits, dense masking. The spec.

  Same arguments and result as `sparse_decode` (without the tuning ones);
  a block table is applied by gathering the blocks first.
  """
  _validate(q_BHD, k_BKSD, v_BKSD, bias_BKS, slot_len_BKP, block_size,
            block_idx_BKP)
  if block_idx_BKP is not None:
    k_BKSD, v_BKSD, bias_BKS = (
        None if x is None else gather_blocks_by_index(x, block_idx_BKP,
                                                      block_size)
        for x in (k_BKSD, v_BKSD, bias_BKS))
  b, h, d = q_BHD.shape
  kv_heads, s = k_BKSD.shape[1:3]
  num_slots = slot_len_BKP.shape[2]
  token_C = jnp.arange(block_size)
  valid_BKPC = token_C[None, None, None, :] < slot_len_BKP[..., None]
  valid_BKS = valid_BKPC.reshape(b, kv_heads, num_slots * block_size)
  # Invalid positions may hold anything (NaN included): zero them.
  zero = lambda x: jnp.where(valid_BKS[..., None], x.astype(jnp.float32), 0.0)
  k_BKSD, v_BKSD = zero(k_BKSD), zero(v_BKSD)

  q_BKGD = q_BHD.reshape(b, kv_heads, h // kv_heads, d).astype(jnp.float32)
  logits_BKGS = jnp.einsum("BKGD,BKSD->BKGS", q_BKGD, k_BKSD,
                           precision=lax.Precision.HIGHEST) / math.sqrt(d)
  if bias_BKS is not None:
    # Full strength (project decision 1).
    bias_BKS = jnp.where(valid_BKS, bias_BKS, 0.0)
    logits_BKGS = logits_BKGS + bias_BKS[:, :, None, :]
  logits_BKGS = jnp.where(valid_BKS[:, :, None, :], logits_BKGS, -jnp.inf)

  m_BKG = logits_BKGS.max(axis=-1)
  m_BKG = jnp.where(m_BKG == -jnp.inf, 0.0, m_BKG)  # no valid key
  p_BKGS = jnp.exp(logits_BKGS - m_BKG[..., None])
  l_BKG = p_BKGS.sum(axis=-1)
  o_BKGD = jnp.einsum("BKGS,BKSD->BKGD", p_BKGS, v_BKSD,
                      precision=lax.Precision.HIGHEST)
  o_BKGD = o_BKGD / jnp.where(l_BKG > 0, l_BKG, 1.0)[..., None]
  return o_BKGD.reshape(b, h, d).astype(q_BHD.dtype)
