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


def _online_update(carry, q, k, v, b, valid, sm_scale):
  """One slot of the fp32 online softmax: (o, m, l) -> (o, m, l)."""
  o, m_i, l_i = carry
  s = _dot(q, k, contract_b=1) * sm_scale  # [Gp, C]
  if b is not None:
    # Full-strength bias (project decision 1), not NOSI's b / sqrt(D).
    s = s + b[None, :]
  s = jnp.where(valid[None, :], s, -jnp.inf)
  m_new = jnp.maximum(m_i, s.max(axis=1))
  # While every key so far is masked, m_new = -inf; shift by 0 instead so
  # that exp gives 0, not exp(-inf - -inf) = NaN.
  shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  alpha = jnp.exp(m_i - shift)  # [Gp]
  p = jnp.exp(s - shift[:, None])  # [Gp, C]
  l_i = alpha * l_i + p.sum(axis=1)
  pv = _dot(p.astype(v.dtype), v, contract_b=0)  # [Gp, D]
  return alpha[:, None] * o + pv, m_new, l_i


def _init_carry(gp, d):
  return (jnp.zeros((gp, d), jnp.float32),
          jnp.full((gp,), -jnp.inf, jnp.float32),
          jnp.zeros((gp,), jnp.float32))


def _write_partials(carry, o_ref, m_ref, l_ref):
  o_ref[...], m_ref[...], l_ref[...] = carry


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
    valid = token < slot_len_ref[slot]  # [C]
    blk = slot if block_idx_ref is None else block_idx_ref[slot]
    span = pl.ds(pl.multiple_of(blk * c, c), c)
    # Masked loads: invalid rows cost no memory traffic and read as 0, so
    # stale or NaN cache contents cannot leak into p @ v.
    k = plt.load(k_ref.at[span, :], mask=valid[:, None], other=0)  # [C, D]
    v = plt.load(v_ref.at[span, :], mask=valid[:, None], other=0)  # [C, D]
    b = (None if bias_ref is None
         else plt.load(bias_ref.at[span], mask=valid, other=0))  # [C]
    return _online_update(carry, q, k, v, b, valid, sm_scale)

  _write_partials(lax.fori_loop(first, last, body, _init_carry(gp, d)),
                  o_ref, m_ref, l_ref)


def _sparse_decode_fetch_kernel(
    q_ref,         # [Gp, D]
    bias_ref,      # [P * C] fp32, or None
    slot_len_ref,  # [P] int32
    fetch_ref,     # [P] int32 host block to load into each slot, -1 = none
    k_slot_ref,    # [B * K * P, C, D] memory_space=ANY (aliased to k_out)
    v_slot_ref,    # [B * K * P, C, D]
    k_host_ref,    # [B * K * N, C, D] memory_space=ANY (pinned_host)
    v_host_ref,    # [B * K * N, C, D]
    o_ref, m_ref, l_ref,  # as in _sparse_decode_kernel
    k_out_ref,     # = k_slot_ref's buffer: fetched tiles are stored here
    v_out_ref,
    *,
    sm_scale: float,
    block_size: int,
    slots_per_split: int,
    num_slots: int,
    num_blocks: int,
):
  gp, d = q_ref.shape
  c = block_size
  bk = pl.program_id(0) * pl.num_programs(1) + pl.program_id(1)
  first = pl.program_id(2) * slots_per_split
  last = jnp.minimum(first + slots_per_split, num_slots)
  q = q_ref[...]
  token = lax.broadcasted_iota(jnp.int32, (c,), 0)

  def body(slot, carry):
    valid = token < slot_len_ref[slot]  # [C]
    src = fetch_ref[slot]
    from_host = valid & (src >= 0)
    from_slot = valid & (src < 0)
    row = bk * num_slots + slot
    host_row = bk * num_blocks + jnp.maximum(src, 0)

    def load(slot_ref, host_ref, out_ref):
      # Exactly one of the two masked loads moves data for each valid row:
      # a resident slot reads HBM, a missing block reads the pinned_host
      # store over PCIe (and is stored into its slot for the next steps).
      x = plt.load(slot_ref.at[row], mask=from_slot[:, None], other=0)
      y = plt.load(host_ref.at[host_row], mask=from_host[:, None], other=0)
      x = jnp.where(from_host[:, None], y, x)
      plt.store(out_ref.at[row], x, mask=from_host[:, None])
      return x

    k = load(k_slot_ref, k_host_ref, k_out_ref)
    v = load(v_slot_ref, v_host_ref, v_out_ref)
    b = (None if bias_ref is None else plt.load(
        bias_ref.at[pl.ds(pl.multiple_of(slot * c, c), c)], mask=valid,
        other=0))
    return _online_update(carry, q, k, v, b, valid, sm_scale)

  _write_partials(lax.fori_loop(first, last, body, _init_carry(gp, d)),
                  o_ref, m_ref, l_ref)


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
      None = 3 (faster than 2 at every split count of `kernel_bench
      --parts=decode_sweep` at B = 16; experiments/results/kernels/NOTES.md,
      session 8).
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
  num_slots = slot_len_BKP.shape[2]
  block_sizes = block_sizes or DecodeBlockSizes()
  n_split, per_split = num_decode_splits(b, kv_heads, num_slots, block_sizes)
  gp, q_BKGD = _pad_queries(q_BHD, kv_heads)

  kernel = functools.partial(
      _sparse_decode_kernel, sm_scale=1.0 / math.sqrt(d),
      block_size=block_size, slots_per_split=per_split, num_slots=num_slots)
  kv_spec = pl.BlockSpec((None, None, s, d), lambda i, j, n: (i, j, 0, 0))
  partials = pl.pallas_call(
      kernel,
      grid=(b, kv_heads, n_split),
      in_specs=[
          _query_spec(gp, d),
          kv_spec,
          kv_spec,
          None if bias_BKS is None else _per_bk(s),
          _per_bk(num_slots),
          None if block_idx_BKP is None else _per_bk(num_slots),
      ],
      out_specs=_partial_specs(gp, d),
      out_shape=_partial_shapes(b, kv_heads, n_split, gp, d),
      compiler_params=plt.CompilerParams(
          num_warps=4 if num_warps is None else num_warps,
          num_stages=3 if num_stages is None else num_stages),
      interpret=interpret,
      debug=debug,
      name="nosa_sparse_decode",
  )(q_BKGD, k_BKSD, v_BKSD, bias_BKS, slot_len_BKP, block_idx_BKP)
  return _combine_splits(*partials, q_BHD)


def _pad_queries(q_BHD, kv_heads):
  """Query rows of each KV head padded to a power of 2 >= 16 (Triton dot M)."""
  b, h, d = q_BHD.shape
  g = h // kv_heads
  gp = max(_MIN_DOT_DIM, _next_pow2(g))
  q_BKGD = q_BHD.reshape(b, kv_heads, g, d)
  return gp, jnp.pad(q_BKGD, ((0, 0), (0, 0), (0, gp - g), (0, 0)))


def _per_bk(width):
  return pl.BlockSpec((None, None, width), lambda i, j, n: (i, j, 0))


def _query_spec(gp, d):
  return pl.BlockSpec((None, None, gp, d), lambda i, j, n: (i, j, 0, 0))


def _partial_specs(gp, d):
  part_spec = pl.BlockSpec((None, None, None, gp), lambda i, j, n: (i, j, n, 0))
  return [pl.BlockSpec((None, None, None, gp, d),
                       lambda i, j, n: (i, j, n, 0, 0)), part_spec, part_spec]


def _partial_shapes(b, kv_heads, n_split, gp, d):
  return [jax.ShapeDtypeStruct((b, kv_heads, n_split, gp, d), jnp.float32),
          jax.ShapeDtypeStruct((b, kv_heads, n_split, gp), jnp.float32),
          jax.ShapeDtypeStruct((b, kv_heads, n_split, gp), jnp.float32)]


def _combine_splits(o_BKNGD, m_BKNG, l_BKNG, q_BHD):
  """Log-sum-exp combination of the split partials -> [B, H, D]."""
  b, h, d = q_BHD.shape
  kv_heads = o_BKNGD.shape[1]
  # A split (or a whole row) with no valid key has m = -inf and l = 0:
  # shift by 0 there so its weight is 0.
  m_BKG = m_BKNG.max(axis=2)
  m_BKG = jnp.where(m_BKG == -jnp.inf, 0.0, m_BKG)
  w_BKNG = jnp.exp(m_BKNG - m_BKG[:, :, None, :])
  l_BKG = (w_BKNG * l_BKNG).sum(axis=2)
  o_BKGD = (w_BKNG[..., None] * o_BKNGD).sum(axis=2)
  o_BKGD = o_BKGD / jnp.where(l_BKG > 0, l_BKG, 1.0)[..., None]
  g = h // kv_heads
  return o_BKGD[:, :, :g].reshape(b, h, d).astype(q_BHD.dtype)


def _validate_fetch(q_BHD, k_slot_BKPCD, v_slot_BKPCD, bias_BKS, slot_len_BKP,
                    k_host_BKNCD, v_host_BKNCD, fetch_BKP):
  """Raises a one-line ValueError naming the first bad argument."""
  if k_slot_BKPCD.ndim != 5:
    raise ValueError("k_slot_BKPCD must be [B, K, P, C, D], got shape "
                     f"{k_slot_BKPCD.shape}")
  b, kv, p, c, d = k_slot_BKPCD.shape
  if v_slot_BKPCD.shape != k_slot_BKPCD.shape:
    raise ValueError(f"v_slot_BKPCD shape {v_slot_BKPCD.shape} != "
                     f"k_slot_BKPCD shape {k_slot_BKPCD.shape}")
  flat = lambda x: jax.ShapeDtypeStruct((b, kv, p * c, d), x.dtype)
  _validate(q_BHD, flat(k_slot_BKPCD), flat(v_slot_BKPCD), bias_BKS,
            slot_len_BKP, c)
  if slot_len_BKP.shape[2] != p:
    raise ValueError(f"slot_len_BKP has {slot_len_BKP.shape[2]} slots, "
                     f"k_slot_BKPCD has P={p}")
  for name, x in (("k_host_BKNCD", k_host_BKNCD),
                  ("v_host_BKNCD", v_host_BKNCD)):
    if (x.ndim != 5 or x.shape[:2] != (b, kv) or x.shape[3:] != (c, d)
        or x.dtype != k_slot_BKPCD.dtype):
      raise ValueError(f"{name} must be {k_slot_BKPCD.dtype} [B, K, N, C, D]"
                       f" = [{b}, {kv}, N, {c}, {d}], got {x.dtype} "
                       f"{x.shape}")
  if v_host_BKNCD.shape != k_host_BKNCD.shape:
    raise ValueError(f"v_host_BKNCD shape {v_host_BKNCD.shape} != "
                     f"k_host_BKNCD shape {k_host_BKNCD.shape}")
  if fetch_BKP.shape != slot_len_BKP.shape or fetch_BKP.dtype != jnp.int32:
    raise ValueError(f"fetch_BKP must be int32 {slot_len_BKP.shape}, got "
                     f"{fetch_BKP.dtype} {fetch_BKP.shape}")


@functools.partial(
    jax.jit,
    static_argnames=["block_sizes", "num_warps", "num_stages", "interpret",
                     "debug"],
    donate_argnames=["k_slot_BKPCD", "v_slot_BKPCD"])
def sparse_decode_fetch(
    q_BHD: jax.Array,
    k_slot_BKPCD: jax.Array,
    v_slot_BKPCD: jax.Array,
    bias_BKS: jax.Array | None,
    slot_len_BKP: jax.Array,
    k_host_BKNCD: jax.Array,
    v_host_BKNCD: jax.Array,
    fetch_BKP: jax.Array,
    *,
    block_sizes: DecodeBlockSizes | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
    debug: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`sparse_decode` over the block cache, fetching missing blocks itself.

  The offload engine's fused fetch: slot p of (b, k) with fetch_BKP[b, k, p]
  = n >= 0 does not hold its block yet; the kernel reads block n of the
  host store (a `pinned_host` array, read in place over PCIe like
  `gather_blocks`), attends to it, and stores it into the slot for later
  steps. Resident slots are read from the device cache. The PCIe reads of
  one layer thus overlap the HBM reads and the math of its attention, and
  the separate gather launch (and its compaction of the miss list) goes.
  They do not overlap the projections and the MLP, which depend on the
  attention output.

  Args:
    q_BHD: [B, H, D] query of the new token, after RoPE.
    k_slot_BKPCD, v_slot_BKPCD: [B, K, P, C, D] device block cache
      (donated; returned updated).
    bias_BKS: [B, K, P * C] fp32 bias of the slots' keys, or None.
    slot_len_BKP: [B, K, P] int32 valid tokens of each slot (as in
      `sparse_decode`); a fetched slot must have slot_len > 0.
    k_host_BKNCD, v_host_BKNCD: [B, K, N, C, D] host store (any memory
      kind), same dtype as the cache.
    fetch_BKP: [B, K, P] int32 block of the store to load into each slot
      before attending, -1 = the slot already holds its block.
    block_sizes, num_warps, num_stages, interpret, debug: as for
      `sparse_decode`.

  Returns:
    (out_BHD, k_slot_BKPCD, v_slot_BKPCD): the attention output, and the
    cache with rows [0, slot_len) of every fetched slot replaced by the
    store's block (rows past slot_len are not copied: in the engine a
    fetched block is a complete one, slot_len = C).
  """
  _validate_fetch(q_BHD, k_slot_BKPCD, v_slot_BKPCD, bias_BKS, slot_len_BKP,
                  k_host_BKNCD, v_host_BKNCD, fetch_BKP)
  b, kv_heads, num_slots, c, d = k_slot_BKPCD.shape
  block_sizes = block_sizes or DecodeBlockSizes()
  n_split, per_split = num_decode_splits(b, kv_heads, num_slots, block_sizes)
  gp, q_BKGD = _pad_queries(q_BHD, kv_heads)
  tiles = lambda x: x.reshape((-1, c, d))
  kernel = functools.partial(
      _sparse_decode_fetch_kernel, sm_scale=1.0 / math.sqrt(d),
      block_size=c, slots_per_split=per_split, num_slots=num_slots,
      num_blocks=k_host_BKNCD.shape[2])
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  slot_in = 3 if bias_BKS is None else 4
  *partials, k_tiles, v_tiles = pl.pallas_call(
      kernel,
      grid=(b, kv_heads, n_split),
      in_specs=[
          _query_spec(gp, d),
          None if bias_BKS is None else _per_bk(num_slots * c),
          _per_bk(num_slots),
          _per_bk(num_slots),
          any_spec, any_spec, any_spec, any_spec,
      ],
      out_specs=_partial_specs(gp, d) + [any_spec, any_spec],
      out_shape=_partial_shapes(b, kv_heads, n_split, gp, d) + [
          jax.ShapeDtypeStruct((b * kv_heads * num_slots, c, d),
                               k_slot_BKPCD.dtype)] * 2,
      # Operand numbers count only non-None inputs (bias may be absent).
      input_output_aliases={slot_in: 3, slot_in + 1: 4},
      compiler_params=plt.CompilerParams(
          num_warps=4 if num_warps is None else num_warps,
          num_stages=2 if num_stages is None else num_stages),
      interpret=interpret,
      debug=debug,
      name="nosa_sparse_decode_fetch",
  )(q_BKGD, bias_BKS, slot_len_BKP, fetch_BKP, tiles(k_slot_BKPCD),
    tiles(v_slot_BKPCD), tiles(k_host_BKNCD), tiles(v_host_BKNCD))
  shape = k_slot_BKPCD.shape
  return (_combine_splits(*partials, q_BHD), k_tiles.reshape(shape),
          v_tiles.reshape(shape))


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


@jax.jit
def sparse_decode_fetch_reference(
    q_BHD: jax.Array,
    k_slot_BKPCD: jax.Array,
    v_slot_BKPCD: jax.Array,
    bias_BKS: jax.Array | None,
    slot_len_BKP: jax.Array,
    k_host_BKNCD: jax.Array,
    v_host_BKNCD: jax.Array,
    fetch_BKP: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Pure-jnp `sparse_decode_fetch`: copy the fetched rows, then attend.

  Same arguments (without the tuning ones) and results; the host arrays
  must be in device memory here (XLA gathers cannot read pinned_host).
  """
  _validate_fetch(q_BHD, k_slot_BKPCD, v_slot_BKPCD, bias_BKS, slot_len_BKP,
                  k_host_BKNCD, v_host_BKNCD, fetch_BKP)
  b, kv, p, c, d = k_slot_BKPCD.shape
  b_ = jnp.arange(b)[:, None, None]
  k_ = jnp.arange(kv)[None, :, None]
  src_BKP = jnp.maximum(fetch_BKP, 0)
  copy_BKPC = ((fetch_BKP[..., None] >= 0)
               & (jnp.arange(c)[None, None, None, :]
                  < slot_len_BKP[..., None]))

  def fill(slot_BKPCD, host_BKNCD):
    return jnp.where(copy_BKPC[..., None], host_BKNCD[b_, k_, src_BKP],
                     slot_BKPCD)

  k_slot_BKPCD = fill(k_slot_BKPCD, k_host_BKNCD)
  v_slot_BKPCD = fill(v_slot_BKPCD, v_host_BKNCD)
  out_BHD = sparse_decode_reference(
      q_BHD, k_slot_BKPCD.reshape(b, kv, p * c, d),
      v_slot_BKPCD.reshape(b, kv, p * c, d), bias_BKS, slot_len_BKP, c)
  return out_BHD, k_slot_BKPCD, v_slot_BKPCD
