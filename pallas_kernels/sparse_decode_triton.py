"""`sparse_decode` as a native Triton kernel through jax-triton (GPU only).

The same computation, arguments and result as `pallas_kernels.sparse_decode`
(split-K over the slots, fp32 online softmax, per-key bias, invalid slots
and positions masked, optional block table), written in Triton directly for
what Pallas does not expose: explicit 64-bit pointer arithmetic into the
cache and the cache modifier / eviction policy of the streamed K/V loads
(`cache_modifier=".cg"` keeps them out of L1, `eviction_policy=
"evict_first"` out of L2's way). `experiments/kernel_bench.py --parts=decode`
times both kernels in one run; the faster becomes the GPU default.

Load options and pipelining: with num_stages >= 2 Triton's software
pipeliner turns the K/V loads into `cp.async` copies and drops any cache
modifier or eviction policy (the PTX is byte-identical for every option,
checked with triton 3.6.0 for sm_90). A load option therefore runs the slot
loop unpipelined (num_stages=1), where the PTX does carry `ld.global.cg`,
`ld.global.ca` or an `L1::evict_*.L2::cache_hint` load, and asking for both
is an error rather than a silent no-op.

Status: its compiled `gpu`-marked tests (tests/pallas_kernels/
sparse_decode_triton_test.py) passed on an H100 (session 5) and an H200
(session 8); the timings against the Pallas kernel are in
experiments/results/kernels/NOTES.md. On a CPU machine with triton 3.6.0
it compiles ahead of time for sm_90 (each dtype, bias, block table and load
option; also through jax-triton 0.3.1's own lowering), and the same tests
pass with the kernel run by Triton's interpreter (TRITON_INTERPRET=1, which
the kernel supports). jax-triton and triton are imported on first use, so
`pallas_kernels` imports without them; the reference is
`sparse_decode_reference` (same signature).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# Shared with the Pallas kernel (by name: the package's `sparse_decode` is
# the function, which shadows the module).
from pallas_kernels.sparse_decode import _combine_splits
from pallas_kernels.sparse_decode import _pad_queries
from pallas_kernels.sparse_decode import _partial_shapes
from pallas_kernels.sparse_decode import _validate
from pallas_kernels.sparse_decode import DecodeBlockSizes
from pallas_kernels.sparse_decode import num_decode_splits

_CACHE_MODIFIERS = ("", ".ca", ".cg")
_EVICTION_POLICIES = ("", "evict_first", "evict_last")


@functools.partial(
    jax.jit,
    static_argnames=["block_size", "block_sizes", "num_warps", "num_stages",
                     "cache_modifier", "eviction_policy"])
def sparse_decode_triton(
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
    cache_modifier: str = "",
    eviction_policy: str = "",
) -> jax.Array:
  """Decode attention of one query token over the cached slots (Triton).

  Args:
    q_BHD, k_BKSD, v_BKSD, bias_BKS, slot_len_BKP, block_size,
    block_idx_BKP, block_sizes, num_warps: as
      `pallas_kernels.sparse_decode`.
    num_stages: Triton software-pipelining stages of the slot loop;
      None = 2, or 1 with a load option (which pipelining would drop).
    cache_modifier: of the K/V loads: "" (default), ".ca" or ".cg".
    eviction_policy: of the K/V loads: "", "evict_first" or "evict_last";
      not together with a cache modifier (ptxas rejects the pair).

  Returns:
    [B, H, D] in q's dtype, as `sparse_decode`.
  """
  _validate(q_BHD, k_BKSD, v_BKSD, bias_BKS, slot_len_BKP, block_size,
            block_idx_BKP)
  if cache_modifier not in _CACHE_MODIFIERS:
    raise ValueError(f"cache_modifier={cache_modifier!r}: use one of "
                     f"{_CACHE_MODIFIERS}")
  if eviction_policy not in _EVICTION_POLICIES:
    raise ValueError(f"eviction_policy={eviction_policy!r}: use one of "
                     f"{_EVICTION_POLICIES}")
  if cache_modifier and eviction_policy:
    # ptxas rejects the two together (seen compiling for sm_90).
    raise ValueError("cache_modifier and eviction_policy: set at most one")
  load_option = bool(cache_modifier or eviction_policy)
  if num_stages is None:
    num_stages = 1 if load_option else 2
  elif load_option and num_stages > 1:
    # The pipeliner's cp.async copies would drop the option silently.
    raise ValueError(f"num_stages={num_stages} with a cache_modifier or "
                     "eviction_policy: Triton's pipelining drops it; use "
                     "num_stages=1 (the default then)")
  jt, kernel = _load_triton()
  b, h, d = q_BHD.shape
  kv_heads, s = k_BKSD.shape[1:3]
  num_slots = slot_len_BKP.shape[2]
  n_split, per_split = num_decode_splits(
      b, kv_heads, num_slots, block_sizes or DecodeBlockSizes())
  gp, q_BKGD = _pad_queries(q_BHD, kv_heads)
  dummy = jnp.zeros((1,), jnp.int32)
  partials = jt.triton_call(
      q_BKGD, k_BKSD, v_BKSD,
      dummy.astype(jnp.float32) if bias_BKS is None else bias_BKS,
      slot_len_BKP, dummy if block_idx_BKP is None else block_idx_BKP,
      kernel=kernel,
      out_shape=_partial_shapes(b, kv_heads, n_split, gp, d),
      grid=(b, kv_heads, n_split),
      num_warps=4 if num_warps is None else num_warps,
      num_stages=num_stages,
      S=s, D=d, GP=gp, C=block_size, P=num_slots, NSPLIT=n_split,
      PER_SPLIT=per_split, KV=kv_heads, SM_SCALE=1.0 / math.sqrt(d),
      HAS_BIAS=bias_BKS is not None, HAS_IDX=block_idx_BKP is not None,
      IEEE=bool(q_BHD.dtype == jnp.float32), CACHE=cache_modifier,
      EVICT=eviction_policy)
  return _combine_splits(*partials, q_BHD)


def _load_triton():
  """(jax_triton, the kernel), with a one-line error where they are missing."""
  try:
    import jax_triton  # pylint: disable=g-import-not-at-top
    from pallas_kernels import _sparse_decode_triton_kernel as k  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "sparse_decode_triton needs jax-triton and triton (GPU machine: "
        f"pip install jax-triton==0.3.1); import failed: {e}") from e
  return jax_triton, k.sparse_decode_kernel
