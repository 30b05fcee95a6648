"""NOSA sparse attention with the eviction bias (NOSA_SPEC.md §2.6-§2.9).

Query t attends, through KV head k, the tokens s <= t whose block s // C is
selected for (t, k) (§2.6); all G query heads of a group share the
selection. Logits are q.k / sqrt(D) + b[s, k] with the eviction bias at full
strength (§2.7, project decision 1), softmax in fp32.

  sparse_attention_reference: dense masked attention, obviously correct.
  sparse_attention:           `implementation=` (nosa_jax/implementations.py
                              resolves it); `xla` loops over
                              query chunks under `jax.checkpoint` so forward
                              and backward memory are bounded by one chunk.
  nosa_attention:             selection + attention + locality statistics,
                              what the model calls.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import jax
from jax import ad_checkpoint
import jax.numpy as jnp

from nosa_jax import config as config_lib
from nosa_jax import implementations
from nosa_jax import selection
from nosa_jax import sharding
import pallas_kernels

# Tile-size dataclasses of the kernels, for callers that tune them.
KernelBlockSizes = pallas_kernels.BlockSizes
DecodeBlockSizes = pallas_kernels.DecodeBlockSizes

_F32 = jnp.float32
# Static key-prefix lengths in the `xla` path (see `sparse_attention`).
_KEY_GROUPS = 4


def _token_mask(mask_BKTN: jax.Array, q_pos_T: jax.Array, n_keys: int,
                block_size: int) -> jax.Array:
  """[B, K, T, S] bool: block of s selected and s <= t (§2.6)."""
  n = -(-n_keys // block_size)
  blocks_BKTS = jnp.repeat(mask_BKTN[..., :n], block_size, axis=-1,
                           total_repeat_length=n * block_size)[..., :n_keys]
  causal_TS = jnp.arange(n_keys)[None, :] <= q_pos_T[:, None]
  return blocks_BKTS & causal_TS[None, None]


def _masked_softmax(logits, mask):
  """fp32 softmax over the last axis; a fully masked row gives 0, not NaN."""
  logits = jnp.where(mask, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  e = jnp.where(mask, jnp.exp(logits - m), 0.0)
  z = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(z > 0, z, 1.0)


def _check(q_BTHD, k_BTKD, v_BTKD, bias_BTK, mask_BKTN, block_size,
           positions_T=None):
  b, t, h, d = q_BTHD.shape
  s, k = k_BTKD.shape[1], k_BTKD.shape[2]
  n = -(-s // block_size)
  if positions_T is None and s != t:
    raise ValueError(f"q {q_BTHD.shape} and k {k_BTKD.shape} have different "
                     "lengths: pass positions_T, the queries' positions")
  if positions_T is not None and positions_T.shape != (t,):
    raise ValueError(f"positions_T {positions_T.shape} != ({t},)")
  if k_BTKD.shape != (b, s, k, d) or v_BTKD.shape != (b, s, k, d):
    raise ValueError(f"k {k_BTKD.shape} / v {v_BTKD.shape} do not match "
                     f"q {q_BTHD.shape}")
  if h % k:
    raise ValueError(f"H={h} is not a multiple of K={k}")
  if bias_BTK is not None and bias_BTK.shape != (b, s, k):
    raise ValueError(f"bias {bias_BTK.shape} != {(b, s, k)}")
  if mask_BKTN.shape != (b, k, t, n):
    raise ValueError(f"mask {mask_BKTN.shape} != {(b, k, t, n)} "
                     f"(N = ceil(S / block_size={block_size}))")


def sparse_attention_reference(q_BTHD: jax.Array, k_BTKD: jax.Array,
                               v_BTKD: jax.Array,
                               bias_BTK: Optional[jax.Array],
                               mask_BKTN: jax.Array,
                               block_size: int,
                               positions_T: Optional[jax.Array] = None
                               ) -> jax.Array:
  """Dense masked block-sparse attention with the eviction bias (§2.7).

  out[t, g] = softmax_s(q[t, g].k[s] / sqrt(D) + bias[s, k]) v[s] over
  s <= pos[t] with mask[k, t, s // C], everything in fp32.

  Args:
    q_BTHD: queries; query t sits at position positions_T[t].
    k_BTKD: keys, positions 0..S-1.
    v_BTKD: values.
    bias_BTK: additive per-key logit bias (None means 0).
    mask_BKTN: selected blocks per (KV head, query), N = ceil(S / C).
    block_size: C.
    positions_T: the queries' positions (default 0..T-1, then S = T).

  Returns:
    out_BTHD in q's dtype; a row with no attended key (cannot happen with a
    NOSA selection, which always holds the query's own block) is 0.
  """
  _check(q_BTHD, k_BTKD, v_BTKD, bias_BTK, mask_BKTN, block_size,
         positions_T)
  b, t, h, d = q_BTHD.shape
  s, k = k_BTKD.shape[1], k_BTKD.shape[2]
  q_BTKGD = q_BTHD.astype(_F32).reshape(b, t, k, h // k, d)
  logits_BKGTS = jnp.einsum("BTKGD,BSKD->BKGTS", q_BTKGD,
                            k_BTKD.astype(_F32)) / math.sqrt(d)
  if bias_BTK is not None:
    bias_BKS = jnp.transpose(bias_BTK.astype(_F32), (0, 2, 1))
    logits_BKGTS = logits_BKGTS + bias_BKS[:, :, None, None, :]
  pos_T = jnp.arange(t) if positions_T is None else positions_T
  tok_BKTS = _token_mask(mask_BKTN, pos_T, s, block_size)
  p_BKGTS = _masked_softmax(logits_BKGTS, tok_BKTS[:, :, None])
  out_BTKGD = jnp.einsum("BKGTS,BSKD->BTKGD", p_BKGTS, v_BTKD.astype(_F32))
  return out_BTKGD.reshape(b, t, h, d).astype(q_BTHD.dtype)


def _attend_chunk(q_BTHD, k_BSKD, v_BSKD, bias_BSK, mask_BKTN, pos_T,
                  block_size):
  """Queries at positions pos_T against the key prefix 0..S-1, fp32 softmax.

  q.k takes the input dtype with fp32 accumulation. p.v runs in fp32: with
  bf16 p the backward's dp is rounded to bf16 and the softmax backward
  (dp - sum(p * dp)) cancels badly, which mostly hurts the bias gradient.
  """
  b, tc, h, d = q_BTHD.shape
  s, k = k_BSKD.shape[1], k_BSKD.shape[2]
  q_BTKGD = q_BTHD.reshape(b, tc, k, h // k, d)
  logits_BKGTS = jnp.einsum("BTKGD,BSKD->BKGTS", q_BTKGD, k_BSKD,
                            preferred_element_type=_F32) / math.sqrt(d)
  if bias_BSK is not None:
    bias_BKS = jnp.transpose(bias_BSK.astype(_F32), (0, 2, 1))
    logits_BKGTS = logits_BKGTS + bias_BKS[:, :, None, None, :]
  tok_BKTS = _token_mask(mask_BKTN, pos_T, s, block_size)
  p_BKGTS = _masked_softmax(logits_BKGTS, tok_BKTS[:, :, None])
  out_BTKGD = jnp.einsum("BKGTS,BSKD->BTKGD", p_BKGTS, v_BSKD.astype(_F32))
  return out_BTKGD.reshape(b, tc, h, d).astype(q_BTHD.dtype)


def sparse_attention(q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array,
                     bias_BTK: Optional[jax.Array], mask_BKTN: jax.Array, *,
                     block_size: int, query_chunk: int,
                     implementation: Literal["xla", "pallas",
                                             "mosaic"] = "xla",
                     tuning: Optional[dict] = None,
                     positions_T: Optional[jax.Array] = None) -> jax.Array:
  """Block-sparse causal attention with the eviction bias (§2.6-§2.7).

  Same semantics as `sparse_attention_reference`. The `xla` implementation
  walks the queries in chunks of `query_chunk`; each chunk attends a key
  prefix ending at or after its last query (at most `_KEY_GROUPS` distinct
  prefix lengths) densely under its token mask, inside `jax.checkpoint`, so
  memory is O(B * H * query_chunk * T) forward and backward instead of
  O(B * H * T^2), and FLOPs are about (g+1)/(2g) of dense attention for
  g = min(_KEY_GROUPS, number of chunks) (g=4: 5/8).

  Args:
    q_BTHD: queries; query t sits at position t.
    k_BTKD: keys, positions 0..T-1.
    v_BTKD: values.
    bias_BTK: additive per-key logit bias (None means 0); differentiable.
    mask_BKTN: selected blocks (bool), N = ceil(T / C); not differentiated.
    block_size: C.
    query_chunk: queries per chunk.
    implementation: `xla`, `pallas` (the block-sparse kernels) or
      `mosaic` (the Mosaic GPU kernels; differentiable for D <= 128);
      resolved by `implementations`, interpret mode off the GPU.
    tuning: keyword options of the pallas kernel (`block_sizes` as a
      `KernelBlockSizes`, `num_warps`, `num_stages`); benchmarks sweep them.
    positions_T: the queries' positions when they are not 0..T-1 (a chunk
      of queries against the keys 0..S-1 of its sequence, as
      `selection.select_blocks` takes them); `xla` only. Every chunk then
      attends the whole key range.

  Returns:
    out_BTHD in q's dtype.
  """
  implementation = implementations.resolve("block_sparse_attention",
                                           implementation)
  if positions_T is not None:
    if implementation != "xla":
      raise ValueError(
          f"implementation={implementation!r}: the kernel takes queries at "
          "positions 0..T-1 over the same T keys; positions_T needs 'xla'")
    _check(q_BTHD, k_BTKD, v_BTKD, bias_BTK, mask_BKTN, block_size,
           positions_T)
    attend = jax.checkpoint(_attend_chunk, static_argnums=(6,))
    return _map_chunks(
        lambda q_c, m_c, p_c: attend(q_c, k_BTKD, v_BTKD, bias_BTK, m_c,
                                     p_c, block_size),
        q_BTHD, jax.lax.stop_gradient(mask_BKTN), positions_T, query_chunk)
  if implementation != "xla":
    # Under a mesh the kernel runs per batch (and head) shard: XLA cannot
    # split it.
    kernel = implementations.kernel("block_sparse_attention", implementation,
                                    block_size=block_size, **(tuning or {}))
    return sharding.batch_parallel(kernel, q_BTHD, k_BTKD, v_BTKD, bias_BTK,
                                   mask_BKTN, head_dims=(2, 2, 2, 2, 1),
                                   out_head_dim=2)
  _check(q_BTHD, k_BTKD, v_BTKD, bias_BTK, mask_BKTN, block_size)
  b, t, h, d = q_BTHD.shape
  mask_BKTN = jax.lax.stop_gradient(mask_BKTN)
  tc = min(query_chunk, t)
  n = -(-t // tc)
  pad = n * tc - t
  q_pad = jnp.pad(q_BTHD, ((0, 0), (0, pad), (0, 0), (0, 0)))
  # Padded query rows select nothing and come out 0; they are sliced off.
  mask_pad = jnp.pad(mask_BKTN, ((0, 0), (0, 0), (0, pad), (0, 0)))
  attend = jax.checkpoint(_attend_chunk, static_argnums=(6,))
  outs = []
  # Chunks are grouped into at most _KEY_GROUPS runs of consecutive chunks;
  # a group attends the static key prefix [0, end of its last chunk) and
  # loops over its chunks with lax.map. Few groups keep compile time low
  # (one body per group); several keep the FLOPs near the causal half.
  n_groups = min(n, _KEY_GROUPS)
  bounds = [round(i * n / n_groups) for i in range(n_groups + 1)]
  for c0, c1 in zip(bounds[:-1], bounds[1:], strict=True):
    s_end = min(c1 * tc, t)
    k_g, v_g = k_BTKD[:, :s_end], v_BTKD[:, :s_end]
    bias_g = None if bias_BTK is None else bias_BTK[:, :s_end]
    q_g = q_pad[:, c0 * tc:c1 * tc].reshape(b, c1 - c0, tc, h, d)
    m_g = mask_pad[:, :, c0 * tc:c1 * tc]
    m_g = m_g.reshape(m_g.shape[:2] + (c1 - c0, tc) + m_g.shape[3:])
    pos_g = jnp.arange(c0 * tc, c1 * tc).reshape(c1 - c0, tc)

    def body(args, k_g=k_g, v_g=v_g, bias_g=bias_g):
      q_c, m_c, pos_T = args
      return attend(q_c, k_g, v_g, bias_g, m_c, pos_T, block_size)

    out_g = jax.lax.map(body, (jnp.moveaxis(q_g, 1, 0),
                               jnp.moveaxis(m_g, 2, 0), pos_g))
    outs.append(jnp.moveaxis(out_g, 0, 1).reshape(b, (c1 - c0) * tc, h, d))
  out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
  return out[:, :t]


def _map_chunks(fn, q_BTHD, mask_BKTN, positions_T, chunk):
  """fn(q_chunk, mask_chunk, positions_chunk) over query chunks, along T."""
  b, t, h, d = q_BTHD.shape
  tc = min(chunk, t)
  n = -(-t // tc)
  pad = n * tc - t
  # Padded rows select nothing (zero mask) and are sliced off.
  q_n = jnp.moveaxis(jnp.pad(q_BTHD, ((0, 0), (0, pad), (0, 0), (0, 0))
                             ).reshape(b, n, tc, h, d), 1, 0)
  m_pad = jnp.pad(mask_BKTN, ((0, 0), (0, 0), (0, pad), (0, 0)))
  m_n = jnp.moveaxis(m_pad.reshape(m_pad.shape[:2] + (n, tc)
                                   + m_pad.shape[3:]), 2, 0)
  p_n = jnp.pad(positions_T, (0, pad), mode="edge").reshape(n, tc)
  out = jax.lax.map(lambda a: fn(*a), (q_n, m_n, p_n))
  return jnp.moveaxis(out, 0, 1).reshape(b, n * tc, h, d)[:, :t]


# The `ad_checkpoint.checkpoint_name` of the block mask in
# `nosa_attention`; `model` remat policies save values of this name.
SELECTION_CHECKPOINT_NAME = "nosa_block_mask"


def nosa_attention(q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array,
                   bias_BTK: Optional[jax.Array],
                   cfg: config_lib.SparseConfig,
                   positions_T: Optional[jax.Array] = None,
                   penalty_key: Optional[jax.Array] = None):
  """Selection + sparse attention for one layer (§2.9), what the model calls.

  The block mask comes from `selection.select_block_masks` on
  stop-gradient inputs (§2.8: the selection carries no gradient). The bias
  enters the logits for dma / nosa, so gradient reaches the eviction head
  (A, delta) through the attended tokens; infllmv2 and full ignore it.

  Args:
    q_BTHD: queries (RoPE applied).
    k_BTKD: keys (RoPE applied).
    v_BTKD: values.
    bias_BTK: eviction bias from `selection.eviction_bias`; required for
      dma / nosa, may be None for infllmv2 / full.
    cfg: variant, selection constants, `query_chunk`, `implementation`.
    positions_T: the queries' positions when q is a chunk of the sequence
      whose keys 0..S-1 are k / v / bias (as `selection.select_blocks`);
      needs implementation `xla` and locality_weight 0. Default 0..T-1.
    penalty_key: PRNG key of the locality penalty's draw when
      `cfg.locality_sample_fraction` < 1; None: the exact penalty.

  Returns:
    out_BTHD in q's dtype, and aux, a dict of fp32 scalars:
      locality_penalty: `selection.locality_penalty(q, k, cfg,
        key=penalty_key)`, unweighted and differentiable (the caller adds
        `cfg.locality_weight` times it); 0.0 without computing it when
        locality_weight == 0 or the variant has no query-aware selection
        (dma, full).
      gamma, changed_query_picks, changed_agnostic_picks, locality_pairs:
        `selection.locality_statistics` of the mask (stop-gradient).
  """
  sg = jax.lax.stop_gradient
  use_bias = cfg.has_eviction_head
  if use_bias and bias_BTK is None:
    raise ValueError(f"variant {cfg.variant!r} needs the eviction bias")
  bias = bias_BTK if use_bias else None
  if positions_T is not None and cfg.locality_weight > 0:
    raise ValueError("the locality penalty pairs consecutive queries of a "
                     "whole sequence; positions_T needs locality_weight=0")
  mask_BKTN, pinned_BKTN = selection.select_block_masks(
      sg(q_BTHD), sg(k_BTKD), None if bias is None else sg(bias), cfg,
      positions_T)
  # Named so that the model's remat policies save it: under remat the
  # backward would otherwise recompute the whole selection (scores, two
  # top-k) only to rebuild this mask. It is B*K*T*N bytes per layer.
  mask_BKTN = ad_checkpoint.checkpoint_name(mask_BKTN,
                                            SELECTION_CHECKPOINT_NAME)
  out_BTHD = sparse_attention(
      q_BTHD, k_BTKD, v_BTKD, bias, mask_BKTN, block_size=cfg.block_size,
      query_chunk=cfg.query_chunk, implementation=cfg.implementation,
      positions_T=positions_T)
  aux = dict(selection.locality_statistics(mask_BKTN, pinned_BKTN,
                                           cfg.topk_blocks))
  if cfg.locality_weight > 0 and cfg.query_aware:
    aux["locality_penalty"] = selection.locality_penalty(
        q_BTHD, k_BTKD, cfg, key=penalty_key)
  else:
    aux["locality_penalty"] = jnp.zeros((), _F32)
  return out_BTHD, aux


def decode_attention(q_BHD: jax.Array, k_BKSD: jax.Array, v_BKSD: jax.Array,
                     bias_BKS: Optional[jax.Array], slot_len_BKP: jax.Array,
                     block_size: int,
                     implementation: Literal["xla", "pallas",
                                             "triton"] = "xla",
                     tuning: Optional[dict] = None,
                     block_idx_BKP: Optional[jax.Array] = None) -> jax.Array:
  """One query token per sequence against its cached KV blocks (slots).

  Args:
    q_BHD: the new token's queries (RoPE applied).
    k_BKSD: cached keys, slot-major: slot p holds rows [p*C, (p+1)*C).
    v_BKSD: cached values, same layout.
    bias_BKS: per-key eviction bias (fp32, full strength) or None.
    slot_len_BKP: valid tokens at the start of each slot (0 = empty slot).
    block_size: C.
    implementation: `xla` (dense masked jnp), `pallas` (split-K kernel;
      interpret mode off the GPU) or `triton` (the same kernel through
      jax-triton; GPU only); the stores pass
      `implementations.from_config("decode_attention", sp)`.
    tuning: keyword options of the kernel (`block_sizes` as a
      `DecodeBlockSizes`, `num_warps`, `num_stages`; triton also
      `cache_modifier` / `eviction_policy`).
    block_idx_BKP: optional block table: slot p is block block_idx_BKP[...,
      p] of k/v/bias, which then hold the whole cache [B, K, N * C, ...]
      (read in place by the kernel; the xla path gathers).

  Returns:
    out_BHD in q's dtype; 0 for a row with no valid key.
  """
  implementation = implementations.resolve("decode_attention",
                                           implementation)
  if implementation != "xla":
    kernel = implementations.kernel("decode_attention", implementation,
                                    block_idx_BKP=block_idx_BKP,
                                    **(tuning or {}))
    return kernel(q_BHD, k_BKSD, v_BKSD, bias_BKS, slot_len_BKP, block_size)
  return pallas_kernels.sparse_decode_reference(
      q_BHD, k_BKSD, v_BKSD, bias_BKS, slot_len_BKP, block_size,
      block_idx_BKP=block_idx_BKP)


def decode_bytes_read(q_BHD, k_BKSD, v_BKSD, bias_BKS, slot_len_BKP,
                      block_size: int):
  """Bytes one decode attention call must move (for bandwidth figures)."""
  return pallas_kernels.decode_bytes_read(q_BHD, k_BKSD, v_BKSD, bias_BKS,
                                          slot_len_BKP, block_size)
