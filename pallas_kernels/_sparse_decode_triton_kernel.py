"""The native Triton kernel of `sparse_decode_triton` (imports triton).

Kept apart so that `pallas_kernels` imports without triton installed (the
CPU CI); `sparse_decode_triton` imports this module on first use.
"""

import triton
from triton import language as tl


@triton.jit
def sparse_decode_kernel(
    q_ptr,     # [B, K, GP, D]  queries, G padded to GP rows
    k_ptr,     # [B, K, S, D]   cache keys (slot-major, or the block table's)
    v_ptr,     # [B, K, S, D]
    bias_ptr,  # [B, K, S] fp32 (a dummy when HAS_BIAS is false)
    len_ptr,   # [B, K, P] int32 valid tokens per slot
    idx_ptr,   # [B, K, P] int32 block per slot (a dummy when not HAS_IDX)
    o_ptr,     # [B, K, NSPLIT, GP, D] fp32 unnormalised partial outputs
    m_ptr,     # [B, K, NSPLIT, GP] fp32 running max (-inf: no valid key)
    l_ptr,     # [B, K, NSPLIT, GP] fp32 softmax denominators
    S: tl.constexpr, D: tl.constexpr, GP: tl.constexpr, C: tl.constexpr,
    P: tl.constexpr, NSPLIT: tl.constexpr, PER_SPLIT: tl.constexpr,
    KV: tl.constexpr, SM_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_IDX: tl.constexpr, IEEE: tl.constexpr, CACHE: tl.constexpr,
    EVICT: tl.constexpr,
):
  b = tl.program_id(0)
  kh = tl.program_id(1)
  split = tl.program_id(2)
  bk = (b * KV + kh).to(tl.int64)  # 64-bit offsets: the cache can be large
  rows = tl.arange(0, GP)
  dims = tl.arange(0, D)
  tokens = tl.arange(0, C)
  q = tl.load(q_ptr + (bk * GP + rows)[:, None] * D + dims[None, :])
  acc = tl.zeros([GP, D], dtype=tl.float32)
  m_i = tl.full([GP], float("-inf"), dtype=tl.float32)
  l_i = tl.zeros([GP], dtype=tl.float32)
  first = split * PER_SPLIT
  last = tl.minimum(first + PER_SPLIT, P)
  for slot in range(first, last):
    n_valid = tl.load(len_ptr + bk * P + slot)
    if HAS_IDX:
      blk = tl.load(idx_ptr + bk * P + slot).to(tl.int64)
    else:
      # tl.cast, not slot.to: under TRITON_INTERPRET=1 the loop index is
      # a Python int.
      blk = tl.cast(slot, tl.int64)
    valid = tokens < n_valid
    key_rows = bk * S + blk * C + tokens  # [C]
    # Masked loads: invalid rows cost no traffic and read as 0, so stale or
    # NaN cache contents never reach p @ v. The streamed K/V are read once:
    # CACHE / EVICT let the benchmark try ".cg" (L2 only) and evict_first;
    # they reach the PTX only unpipelined (num_stages=1): the pipeliner's
    # cp.async copies drop them.
    kv_off = key_rows[:, None] * D + dims[None, :]
    k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0,
                cache_modifier=CACHE, eviction_policy=EVICT)
    v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0,
                cache_modifier=CACHE, eviction_policy=EVICT)
    if IEEE:
      s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
      s = tl.dot(q, tl.trans(k))
    s = s * SM_SCALE
    if HAS_BIAS:
      bias = tl.load(bias_ptr + key_rows, mask=valid, other=0.0)
      s = s + bias[None, :]  # full strength (project decision 1)
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # While every key so far is masked, m_new = -inf: shift by 0 instead.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - shift)
    p = tl.exp(s - shift[:, None])
    l_i = alpha * l_i + tl.sum(p, axis=1)
    if IEEE:
      pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
      pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    m_i = m_new
  part = (bk * NSPLIT + split) * GP + rows  # [GP]
  tl.store(o_ptr + part[:, None] * D + dims[None, :], acc)
  tl.store(m_ptr + part, m_i)
  tl.store(l_ptr + part, l_i)
