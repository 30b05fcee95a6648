"""GPU-resident decode engine: prefill, one-token steps, sampling (§4.2-§4.3).

A functional engine over raw parameters (the `nnx.State` of `model.init`, or
the same tree as plain dicts) and a frozen `ModelConfig`:

  prefill(params, cfg, tokens_BT, lengths_B, max_len) -> (cache, logits_BV)
  decode_step(params, cfg, cache, tokens_B)           -> (cache, logits_BV)
  generate(params, cfg, prompts, max_new_tokens, ...) -> token lists

Semantics (NOSA_SPEC.md "Project decisions" 1, 2, 6). Decode is the training
forward evaluated one query at a time, so decode logits equal
`model.apply` logits at every position (tests check it):

  * The token at position p = length is written to the cache first; query p
    then selects with the training rule of §2.5 at t = p: query-aware scores
    over the compressed windows complete at p (16c + 31 <= p, the current
    token included), eviction scores from the cached bias of those windows,
    the forced sink / window / own blocks, two-phase top-k. At decode every
    complete window is visible, so this is §4.3's `causal=False` stage 1;
    NOSI's one-token lag of the compressed keys (§4.8.5) is not copied.
  * Attention runs over the selected blocks gathered into P slots with
    per-slot valid lengths (`sparse_attention.decode_attention`); the
    partial tail block is attended, the block count grows with the context
    (the capacity `max_len` is static), short contexts leave empty slots
    masked, and logits are q.k / sqrt(D) + b with b at full strength.
  * Sequences of one batch have their own lengths and positions (prompts are
    right-padded; nothing past a sequence's length is ever read).

Cache layout (`DecodeCache`, a pytree), per layer:

  k_BKSD, v_BKSD   model dtype, S = capacity (a multiple of C). Slot-major:
                   block n of (b, k) is the contiguous rows [nC, nC + C), so
                   this is already the block-major layout of the host store
                   (decision 6); the offload part moves these two arrays to
                   pinned host memory and keeps a GPU block cache instead.
  bias_BKS         fp32 eviction bias per token (dma / nosa).
  kbar_BWKD        fp32 compressed keys (infllmv2 / nosa), W = windows in S.
  ebar_BKW         fp32 window means of the bias (dma / nosa).

The last three stay on the device in the offload design, as in NOSI (§4.1).
kbar and ebar are kept incrementally: a step whose token completes window c
computes that one window mean from the cache (O(kernel) work), instead of
re-pooling the whole cache; windows not yet complete are zero and never
read (the visibility mask hides them). The window mean reads the last
`compress_kernel` keys from the K cache; once K/V live on the host, the
device must keep those keys (NOSI's rolling buffer, §4.1).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nosa_jax import attention
from nosa_jax import config as config_lib
from nosa_jax import layers
from nosa_jax import selection
from nosa_jax import sparse_attention

_F32 = jnp.float32
_INF = float("inf")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
  """One layer's decode state; fields a variant does not use are None."""

  k_BKSD: jax.Array
  v_BKSD: jax.Array
  bias_BKS: Optional[jax.Array]
  kbar_BWKD: Optional[jax.Array]
  ebar_BKW: Optional[jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeCache:
  """Per-layer caches plus the number of cached tokens of each sequence."""

  layers: tuple[LayerCache, ...]
  lengths_B: jax.Array  # int32; also the position of the next token


def capacity(max_len: int, block_size: int) -> int:
  """Cache capacity S: max_len rounded up to whole blocks."""
  return -(-max_len // block_size) * block_size


def synthetic_cache(params: Any, cfg: config_lib.ModelConfig, batch: int,
                    context_len: int, max_len: int) -> DecodeCache:
  """A cache as if `context_len` tokens of zeros had been prefilled.

  For decode benchmarks (experiments/decode_bench.py), where prefill time is
  excluded and the values do not change the bytes a step moves: shapes are
  `prefill`'s (taken with eval_shape, nothing is run), K/V, bias and
  compressed keys are zeros, lengths are context_len.
  """
  shapes = cache_shapes(params, cfg, batch, context_len, max_len)
  # Committed to the device like prefill's output: an uncommitted input
  # would make the first decode_step compile a second time.
  return jax.device_put(jax.jit(lambda: dataclasses.replace(
      jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes),
      lengths_B=jnp.full((batch,), context_len, jnp.int32)))(),
                        jax.devices()[0])


def cache_shapes(params: Any, cfg: config_lib.ModelConfig, batch: int,
                 context_len: int, max_len: int) -> DecodeCache:
  """`prefill`'s cache as ShapeDtypeStructs (eval_shape: nothing runs)."""
  tokens = jax.ShapeDtypeStruct((batch, context_len), jnp.int32)
  lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
  shapes, _ = jax.eval_shape(
      lambda p, t, n: prefill(p, cfg, t, n, max_len), params, tokens, lengths)
  return shapes


# ------------------------------------------------------------------------------
# The layer math of `model.py`, written over raw parameters (public: the
# offloaded engine, offload.py, runs the same layers).
# ------------------------------------------------------------------------------


def cast_weight(p, dtype) -> jax.Array:
  """A parameter (nnx.Param or plain array) in the compute dtype."""
  return jnp.asarray(p[...]).astype(dtype)


def qkv_bias(p_attn, cfg: config_lib.ModelConfig, x_BTM, positions_BT):
  """Projections, RoPE and the eviction bias (model.Attention, §2.1-§2.2)."""
  dt = x_BTM.dtype
  q_BTHD = jnp.einsum("BTM,MHD->BTHD", x_BTM, cast_weight(p_attn["wq"], dt))
  k_BTKD = jnp.einsum("BTM,MKD->BTKD", x_BTM, cast_weight(p_attn["wk"], dt))
  v_BTKD = jnp.einsum("BTM,MKD->BTKD", x_BTM, cast_weight(p_attn["wv"], dt))
  q_BTHD = layers.apply_rope(q_BTHD, positions_BT, cfg.rope_theta)
  k_BTKD = layers.apply_rope(k_BTKD, positions_BT, cfg.rope_theta)
  bias_BTK = None
  if cfg.sparse.has_eviction_head:
    bias_BTK = selection.eviction_bias(v_BTKD, p_attn["evict_a"][...],
                                       p_attn["evict_delta"][...])
  return q_BTHD, k_BTKD, v_BTKD, bias_BTK


def mlp_residual(p_block, cfg: config_lib.ModelConfig, x_BTM):
  """x + SwiGLU(RMSNorm(x)): the second half of a block."""
  dt = x_BTM.dtype
  h_BTM = layers.rms_norm(x_BTM, p_block["mlp_norm"]["scale"][...],
                          cfg.rms_eps)
  m = p_block["mlp"]
  return x_BTM + layers.swiglu(h_BTM, cast_weight(m["w_gate"], dt),
                               cast_weight(m["w_up"], dt),
                               cast_weight(m["w_down"], dt))


# The matrices the layer math casts to the compute dtype at every use.
SERVING_CAST = frozenset({"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down",
                          "embed", "lm_head"})


def serving_params(params: Any, cfg: config_lib.ModelConfig) -> Any:
  """`params` with the SERVING_CAST matrices cast once to cfg.dtype.

  The layer math above casts exactly these to the compute dtype at every
  use (the embedding after the lookup, the LM head to the normed
  activations' dtype, which is cfg.dtype), so the results are bit-identical
  while a decode step reads half the weight bytes of fp32 training
  parameters. Norm scales and the eviction head (used in fp32) are kept.
  """
  dt = jnp.dtype(cfg.dtype)

  def cast(path, x):
    names = {getattr(k, "key", None) for k in path}
    if names & SERVING_CAST and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dt)
    return x

  return jax.tree_util.tree_map_with_path(cast, params)


def embed(params, cfg, tokens):
  """Token embeddings in the compute dtype."""
  return jnp.take(params["embed"][...], tokens, axis=0).astype(cfg.dtype)


def logits(params, cfg: config_lib.ModelConfig, x_BM):
  """Final norm and LM head (tied or not); fp32 logits."""
  x_BM = layers.rms_norm(x_BM, params["final_norm"]["scale"][...],
                         cfg.rms_eps)
  head_MV = (params["embed"][...].T if cfg.tie_embeddings
             else params["lm_head"][...])
  return jnp.einsum("BM,MV->BV", x_BM, head_MV.astype(x_BM.dtype),
                    preferred_element_type=_F32)


# ------------------------------------------------------------------------------
# Prefill (§4.2): the training forward over the prompts, filling the cache.
# ------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("cfg", "max_len"))
def prefill(params: Any, cfg: config_lib.ModelConfig, tokens_BT: jax.Array,
            lengths_B: jax.Array, max_len: int
            ) -> tuple[DecodeCache, jax.Array]:
  """Runs the prompts and builds the decode cache.

  Args:
    params: model parameters (`model.init(...)[1]`).
    cfg: the model config (static).
    tokens_BT: int prompts, right-padded; row b is valid up to lengths_B[b].
    lengths_B: int prompt lengths, 1 <= length <= T.
    max_len: cache capacity in tokens (static; rounded up to whole blocks).
      Decoding past it drops tokens silently: `generate` checks it.

  Returns:
    (cache, logits_BV): logits_BV (fp32) predict the token after each
    prompt, i.e. they are the logits at position lengths_B - 1.
  """
  s = prefill_capacity(cfg, tokens_BT.shape[1], max_len)
  lengths_B = lengths_B.astype(jnp.int32)
  x_BTM = embed(params, cfg, tokens_BT)
  caches = []
  for i in range(cfg.num_layers):
    x_BTM, layer = prefill_layer(params["blocks"][i], cfg, x_BTM, lengths_B,
                                 s)
    caches.append(layer)
  return (DecodeCache(layers=tuple(caches), lengths_B=lengths_B),
          prefill_logits(params, cfg, x_BTM, lengths_B))


def prefill_capacity(cfg: config_lib.ModelConfig, t: int,
                     max_len: int) -> int:
  """`prefill`'s capacity S; ValueError if T prompt tokens exceed it."""
  s = capacity(max_len, cfg.sparse.block_size)
  if t > s:
    raise ValueError(f"prompt length T={t} exceeds the cache capacity "
                     f"max_len={max_len} (rounded to {s})")
  return s


def prefill_logits(params, cfg: config_lib.ModelConfig, x_BTM,
                   lengths_B) -> jax.Array:
  """fp32 logits at position lengths_B - 1 of each prompt."""
  last_BM = x_BTM[jnp.arange(x_BTM.shape[0]), lengths_B - 1]
  return logits(params, cfg, last_BM)


def prefill_layer(p_block, cfg: config_lib.ModelConfig, x_BTM: jax.Array,
                  lengths_B: jax.Array, s: int
                  ) -> tuple[jax.Array, LayerCache]:
  """One layer of `prefill`.

  Public so that offload.py can stream each layer's K/V to the host as
  soon as the layer is done, instead of holding every layer's at once.

  Args:
    p_block: the layer's parameters, params["blocks"][i].
    cfg: the model config.
    x_BTM: the residual stream entering the layer.
    lengths_B: int32 prompt lengths.
    s: cache capacity, from `prefill_capacity`.

  Returns:
    (x_BTM leaving the layer, the layer's cache at capacity S).
  """
  sp = cfg.sparse
  b, t = x_BTM.shape[:2]
  positions_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
  valid_BT = positions_BT < lengths_B[:, None]
  n_win = selection.num_windows(s, sp.compress_kernel, sp.compress_stride)
  # Windows complete inside each prompt; the rest are filled during decode.
  c_W = jnp.arange(n_win)
  complete_BW = (sp.compress_stride * c_W[None, :] + sp.compress_kernel
                 <= lengths_B[:, None])

  def to_cache(x_BTK_, fill=0.0):  # [B, T, K, ...] -> [B, K, S, ...]
    x_BTK_ = jnp.where(valid_BT.reshape((b, t) + (1,) * (x_BTK_.ndim - 2)),
                       x_BTK_, fill)
    x_BKT_ = jnp.moveaxis(x_BTK_, 2, 1)
    pad = [(0, 0)] * x_BKT_.ndim
    pad[2] = (0, s - t)
    return jnp.pad(x_BKT_, pad)

  def windows(x_BW_, axis):  # keep complete windows, pad W to n_win
    shape = [1] * x_BW_.ndim
    shape[0], shape[axis] = b, x_BW_.shape[axis]
    keep = complete_BW[:, :x_BW_.shape[axis]].reshape(shape)
    x_BW_ = jnp.where(keep, x_BW_, 0.0)
    pad = [(0, 0)] * x_BW_.ndim
    pad[axis] = (0, n_win - x_BW_.shape[axis])
    return jnp.pad(x_BW_, pad)

  h_BTM = layers.rms_norm(x_BTM, p_block["attn_norm"]["scale"][...],
                          cfg.rms_eps)
  q_BTHD, k_BTKD, v_BTKD, bias_BTK = qkv_bias(p_block["attn"], cfg, h_BTM,
                                               positions_BT)
  kbar = ebar = None
  if sp.variant == "full":
    out_BTHD = attention.causal_attention(q_BTHD, k_BTKD, v_BTKD)
  else:
    # What sparse_attention.nosa_attention does, without its statistics.
    mask_BKTN, _ = selection.select_block_masks(q_BTHD, k_BTKD, bias_BTK, sp)
    out_BTHD = sparse_attention.sparse_attention(
        q_BTHD, k_BTKD, v_BTKD, bias_BTK, mask_BKTN,
        block_size=sp.block_size, query_chunk=sp.query_chunk,
        implementation=sp.implementation)
    if sp.variant in ("infllmv2", "nosa"):
      kbar = windows(selection.compress_keys(
          k_BTKD, sp.compress_kernel, sp.compress_stride), axis=1)
  if bias_BTK is not None:
    ebar = windows(jnp.moveaxis(selection.window_means(
        bias_BTK, sp.compress_kernel, sp.compress_stride), 2, 1), axis=2)
  layer = LayerCache(
      k_BKSD=to_cache(k_BTKD), v_BKSD=to_cache(v_BTKD),
      bias_BKS=None if bias_BTK is None else to_cache(bias_BTK),
      kbar_BWKD=kbar, ebar_BKW=ebar)
  x_BTM = x_BTM + jnp.einsum("BTHD,HDM->BTM", out_BTHD,
                             cast_weight(p_block["attn"]["wo"], x_BTM.dtype))
  return mlp_residual(p_block, cfg, x_BTM), layer


# ------------------------------------------------------------------------------
# Decode step (§4.3 with project decisions 1, 2, 6).
# ------------------------------------------------------------------------------


def _append(layer: LayerCache, k_BKD, v_BKD, bias_BK, pos_B,
            sp: config_lib.SparseConfig) -> LayerCache:
  """Writes the token at pos_B and the window mean it completes, if any."""
  b = pos_B.shape[0]
  b_B = jnp.arange(b)
  k_cache = layer.k_BKSD.at[b_B, :, pos_B].set(k_BKD)
  v_cache = layer.v_BKSD.at[b_B, :, pos_B].set(v_BKD)
  bias = layer.bias_BKS
  if bias is not None:
    bias = bias.at[b_B, :, pos_B].set(bias_BK)
  kbar, ebar = layer.kbar_BWKD, layer.ebar_BKW
  kern, stride = sp.compress_kernel, sp.compress_stride
  n_win = selection.num_windows(k_cache.shape[2], kern, stride)
  if n_win and (kbar is not None or ebar is not None):
    # Window c = [stride*c, stride*c + kern) completes at its last token.
    first_B = pos_B + 1 - kern
    done_B = (first_B >= 0) & (first_B % stride == 0)
    c_B = jnp.clip(first_B // stride, 0, n_win - 1)
    start_B = jnp.clip(first_B, 0, k_cache.shape[2] - kern)
    window = jax.vmap(
        lambda x, i: jax.lax.dynamic_slice_in_dim(x, i, kern, axis=1))
    if kbar is not None:  # the pooling of compress_keys, on one window
      win_BTKD = jnp.moveaxis(window(k_cache, start_B), 1, 2)
      new_BKD = selection.compress_keys(win_BTKD, kern, stride)[:, 0]
      new_BKD = jnp.where(done_B[:, None, None], new_BKD, kbar[b_B, c_B])
      kbar = kbar.at[b_B, c_B].set(new_BKD)
    if ebar is not None:
      win_BTK = jnp.moveaxis(window(bias, start_B), 1, 2)
      new_BK = selection.window_means(win_BTK, kern, stride)[:, 0]
      new_BK = jnp.where(done_B[:, None], new_BK, ebar[b_B, :, c_B])
      ebar = ebar.at[b_B, :, c_B].set(new_BK)
  return LayerCache(k_BKSD=k_cache, v_BKSD=v_cache, bias_BKS=bias,
                    kbar_BWKD=kbar, ebar_BKW=ebar)


def eviction_block_scores(ebar_KW: jax.Array, pos: jax.Array,
                          sp: config_lib.SparseConfig, n: int) -> jax.Array:
  """Query-agnostic block scores [K, N] of one sequence at position pos.

  Windows not complete at pos hold zeros: they rank as missing (-inf).
  With window_blocks >= 1 (and kernel <= C + stride) they overlap only
  forced blocks, so this is training's ranking. Training reads every window
  of the sequence, so with window_blocks = 0 its eviction score sees
  windows that end after t; decode cannot, and does not.
  """
  c_W = jnp.arange(ebar_KW.shape[-1])
  done_W = sp.compress_stride * c_W + sp.compress_kernel - 1 <= pos
  ebar_KW = jnp.where(done_W[None, :], ebar_KW, -_INF)
  return selection.block_pool(
      ebar_KW, num_blocks=n, block_size=sp.block_size,
      kernel=sp.compress_kernel, stride=sp.compress_stride)


def select_decode_blocks(q_BHD: jax.Array, layer: LayerCache,
                         pos_B: jax.Array, sp: config_lib.SparseConfig, *,
                         return_eviction_scores: bool = False):
  """The training selection (§2.5) of one query per sequence at pos_B.

  The cache must already hold the token at pos_B (its block is the query's
  own block and the windows it completes are visible).

  Returns:
    idx_BKP int32 block indices, ascending, invalid (-1) last, with
    P = min(topk_blocks, N) and N = S / C; exactly
    min(topk_blocks, pos // C + 1) entries are valid. With
    return_eviction_scores, (idx_BKP, se_BKN): also the block eviction
    scores the selection ranked by (`eviction_block_scores`; None without
    an eviction head), for the offload cache's retention.
  """
  n = layer.k_BKSD.shape[2] // sp.block_size
  kbar, ebar = layer.kbar_BWKD, layer.ebar_BKW

  def one(q_HD, kbar_WKD, ebar_KW, pos):
    pos_T = pos[None]
    sq_BKTN = se_BKN = None
    if kbar_WKD is not None:
      sq_BKTN = selection.query_aware_scores(q_HD[None, None], kbar_WKD[None],
                                             pos_T, sp, n)
    if ebar_KW is not None:
      se_BKN = eviction_block_scores(ebar_KW, pos, sp, n)[None]
    idx_BKTP, _, _ = selection.select_from_scores(sq_BKTN, se_BKN, pos_T, sp)
    return idx_BKTP[0, :, 0], None if se_BKN is None else se_BKN[0]

  idx_BKP, se_BKN = jax.vmap(one)(q_BHD, kbar, ebar, pos_B)
  return (idx_BKP, se_BKN) if return_eviction_scores else idx_BKP


def _attend(q_BHD, layer: LayerCache, pos_B, sp: config_lib.SparseConfig):
  """Decode attention of the token at pos_B; returns (out_BHD, idx_BKP)."""
  b, kv, s, d = layer.k_BKSD.shape
  c = sp.block_size
  n = s // c
  len_B = pos_B + 1  # the current token is cached
  if sp.variant == "full":
    # Every block is a slot; slot lengths mask the unfilled capacity.
    j_BKP = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, kv, n))
    slot_len_BKP = jnp.clip(len_B[:, None, None] - c * j_BKP, 0, c)
    out_BHD = sparse_attention.decode_attention(
        q_BHD, layer.k_BKSD, layer.v_BKSD, None,
        slot_len_BKP.astype(jnp.int32), c, sp.implementation)
    return out_BHD, jnp.where(slot_len_BKP > 0, j_BKP, -1)
  idx_BKP = select_decode_blocks(q_BHD, layer, pos_B, sp)
  valid_BKP = idx_BKP >= 0
  j_BKP = jnp.where(valid_BKP, idx_BKP, 0)
  slot_len_BKP = jnp.where(
      valid_BKP, jnp.clip(len_B[:, None, None] - c * j_BKP, 0, c), 0)
  # The kernel reads the selected blocks in place through the block table
  # (no gathered copy of the P blocks).
  bias_BKS = layer.bias_BKS if sp.variant in ("dma", "nosa") else None
  out_BHD = sparse_attention.decode_attention(
      q_BHD, layer.k_BKSD, layer.v_BKSD, bias_BKS,
      slot_len_BKP.astype(jnp.int32), c, sp.implementation,
      block_idx_BKP=j_BKP.astype(jnp.int32))
  return out_BHD, idx_BKP


def _predict_selection(params, cfg: config_lib.ModelConfig,
                       layer: LayerCache, i: int, x_B1M, pos_B):
  """Layer i's selection guessed from an earlier residual x_B1M.

  The query of layer i is computed from x_B1M (the input of layer i - 1)
  instead of its own input, and the selection runs on layer i's cache as
  it was before this step's token (its key is not known yet). What a
  prefetch issued one layer ahead could fetch (InfiniGen-style); decode's
  output never depends on it.
  """
  p_block = params["blocks"][i]
  h_B1M = layers.rms_norm(x_B1M, p_block["attn_norm"]["scale"][...],
                          cfg.rms_eps)
  q_B1HD = qkv_bias(p_block["attn"], cfg, h_B1M, pos_B[:, None])[0]
  return select_decode_blocks(q_B1HD[:, 0], layer, pos_B, cfg.sparse)


def _decode_step(params, cfg: config_lib.ModelConfig, cache: DecodeCache,
                 tokens_B, predict: bool = False):
  """Unjitted decode_step; also returns the selections idx_LBKP (and with
  `predict` the one-layer-ahead guesses pred_LBKP; layer 0's are -1)."""
  sp = cfg.sparse
  pos_B = cache.lengths_B
  x_B1M = embed(params, cfg, tokens_B[:, None])
  new_layers, sel, pred = [], [], []
  x_prev_B1M = None  # the input of the previous layer
  for i in range(cfg.num_layers):
    p_block = params["blocks"][i]
    if predict and x_prev_B1M is not None:
      pred.append(_predict_selection(params, cfg, cache.layers[i], i,
                                     x_prev_B1M, pos_B))
    x_prev_B1M = x_B1M
    h_B1M = layers.rms_norm(x_B1M, p_block["attn_norm"]["scale"][...],
                            cfg.rms_eps)
    q_B1HD, k_B1KD, v_B1KD, bias_B1K = qkv_bias(
        p_block["attn"], cfg, h_B1M, pos_B[:, None])
    layer = _append(cache.layers[i], k_B1KD[:, 0], v_B1KD[:, 0],
                    None if bias_B1K is None else bias_B1K[:, 0], pos_B, sp)
    out_BHD, idx_BKP = _attend(q_B1HD[:, 0], layer, pos_B, sp)
    new_layers.append(layer)
    sel.append(idx_BKP)
    x_B1M = x_B1M + jnp.einsum("BHD,HDM->BM", out_BHD, cast_weight(
        p_block["attn"]["wo"], x_B1M.dtype))[:, None]
    x_B1M = mlp_residual(p_block, cfg, x_B1M)
  new_cache = DecodeCache(layers=tuple(new_layers), lengths_B=pos_B + 1)
  out = (new_cache, logits(params, cfg, x_B1M[:, 0]), jnp.stack(sel))
  if not predict:
    return out
  # Layer 0 has no earlier input to guess from.
  return out + (jnp.stack([jnp.full_like(sel[0], -1)] + pred),)


@functools.partial(jax.jit, static_argnames=("cfg", "return_selection",
                                             "return_prediction"),
                   donate_argnames=("cache",))
def decode_step(params: Any, cfg: config_lib.ModelConfig, cache: DecodeCache,
                tokens_B: jax.Array, *, return_selection: bool = False,
                return_prediction: bool = False):
  """Appends one token per sequence and returns the next-token logits.

  Args:
    params: model parameters.
    cfg: the model config (static).
    cache: from `prefill` or a previous step (donated: do not reuse it).
    tokens_B: the token at position cache.lengths_B of each sequence.
    return_selection: also return the selected blocks (static).
    return_prediction: with return_selection, also return pred_LBKP, each
      layer's selection guessed from the previous layer's input
      (`_predict_selection`; rows of layer 0 are -1). Sparse variants only.

  Returns:
    (cache, logits_BV) with logits in fp32, or with return_selection
    (cache, logits_BV, idx_LBKP): per layer the blocks attended, ascending,
    -1 for unused slots (P = min(topk_blocks, N); for `full` every block,
    P = N). `selection_gamma` turns consecutive ones into hit rates.
  """
  if return_prediction:
    if not return_selection or cfg.sparse.variant == "full":
      raise ValueError("return_prediction needs return_selection=True and a "
                       f"sparse variant, got return_selection="
                       f"{return_selection}, variant={cfg.sparse.variant}")
    return _decode_step(params, cfg, cache, tokens_B, predict=True)
  cache, logits_BV, idx_LBKP = _decode_step(params, cfg, cache, tokens_B)
  if return_selection:
    return cache, logits_BV, idx_LBKP
  return cache, logits_BV


def selection_gamma(prev_idx: jax.Array, cur_idx: jax.Array,
                    new_block_hits: bool = True) -> jax.Array:
  """gamma = |sel(t) & sel(t-1)| / |sel(t)| per (layer, sequence, KV head).

  Args:
    prev_idx: [..., P] selection at t-1 (`decode_step` idx, -1 = unused).
    cur_idx: [..., P] selection at t.
    new_block_hits: count a block that did not exist at t-1 (the tail block
      opened at t) as a hit: it is written on the device, never fetched
      (§4.3 step 8a). Then gamma is the fraction of sel(t) that needs no
      transfer, the gamma of the PERFORMANCE.md cost model, and it is 1.0
      whenever the whole context fits the budget.

  Returns:
    [...] fp32 in [0, 1].
  """
  prev_ok = prev_idx >= 0
  cur_ok = cur_idx >= 0
  same = ((cur_idx[..., :, None] == prev_idx[..., None, :])
          & prev_ok[..., None, :])
  hit = jnp.any(same, axis=-1) & cur_ok
  if new_block_hits:
    # The own block is always selected, so max(sel(t-1)) = j_{t-1}.
    newest = jnp.max(jnp.where(prev_ok, prev_idx, -1), axis=-1)
    hit = hit | (cur_ok & (cur_idx > newest[..., None]))
  n = jnp.sum(cur_ok, axis=-1)
  return (jnp.sum(hit, axis=-1) / jnp.maximum(n, 1)).astype(_F32)


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
  def member(a, b):  # a's entries that b holds
    return jnp.any((a[..., :, None] == b[..., None, :])
                   & (b >= 0)[..., None, :], axis=-1) & (a >= 0)
  newest = jnp.max(jnp.where(prev_idx >= 0, prev_idx, -1), axis=-1)
  miss = ((cur_idx >= 0) & ~member(cur_idx, prev_idx)
          & (cur_idx <= newest[..., None]))
  covered = miss & member(cur_idx, pred_idx)
  extra = ((pred_idx >= 0) & ~member(pred_idx, prev_idx)
           & ~member(pred_idx, cur_idx))
  count = lambda x: jnp.sum(x, axis=-1).astype(jnp.int32)
  return count(miss), count(covered), count(extra)


# ------------------------------------------------------------------------------
# Sampling and the generate loop.
# ------------------------------------------------------------------------------


def sample_tokens(logits_BV: jax.Array, key: jax.Array,
                  temperature: jax.Array, top_p: jax.Array) -> jax.Array:
  """Greedy (temperature <= 0) or temperature + nucleus (top-p) sampling.

  Top-p keeps the most likely tokens whose cumulative probability before
  them is < top_p (at least one). temperature and top_p are traced, so
  changing them does not recompile.

  Returns:
    tokens_B int32.
  """
  logits_BV = logits_BV.astype(_F32)
  greedy_B = jnp.argmax(logits_BV, axis=-1)
  scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
  sorted_BV = -jnp.sort(-scaled_BV, axis=-1)
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p) | (top_p >= 1)
  thresh_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, _INF), axis=-1,
                      keepdims=True)
  masked_BV = jnp.where(scaled_BV >= thresh_B1, scaled_BV, -_INF)
  sampled_B = jax.random.categorical(key, masked_BV, axis=-1)
  return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


def next_token(state, logits_BV, temperature, top_p, eos_id, pad_id):
  """One sampling step of `generate`'s loop state (shared with offload)."""
  key, sub = jax.random.split(state["key"])
  tok_B = sample_tokens(logits_BV, sub, temperature, top_p)
  tok_B = jnp.where(state["done_B"], pad_id, tok_B)  # finished: emit pad
  return dict(state, key=key, tok_B=tok_B,
              done_B=state["done_B"] | (tok_B == eos_id))


@functools.partial(jax.jit, static_argnames=("cfg", "track_gamma"),
                   donate_argnames=("cache",))
def _generate_step(params, cache, state, temperature, top_p, eos_id, pad_id,
                   *, cfg, track_gamma):
  """decode_step + sampling. Only the cache is donated: the caller keeps
  the sampled tokens of every step."""
  live_B = ~state["done_B"]
  cache, logits_BV, idx_LBKP = _decode_step(params, cfg, cache,
                                            state["tok_B"])
  state = next_token(state, logits_BV, temperature, top_p, eos_id, pad_id)
  if track_gamma:  # mean over KV heads, summed over live sequences
    g_LB = jnp.mean(selection_gamma(state["idx_LBKP"], idx_LBKP), axis=-1)
    count_B = live_B & state["have_prev"]  # no previous step at the first
    state["gamma_sum_L"] = state["gamma_sum_L"] + jnp.sum(
        jnp.where(count_B[None, :], g_LB, 0.0), axis=-1)
    state["gamma_n"] = state["gamma_n"] + jnp.sum(count_B)
    state["idx_LBKP"] = idx_LBKP
    state["have_prev"] = jnp.ones_like(state["have_prev"])
  return cache, state


next_token_jit = jax.jit(next_token)


def prepare_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    block_size: int, *, max_len: Optional[int] = None,
                    eos_id: Optional[int] = None,
                    pad_id: Optional[int] = None):
  """Validates a batch of prompts and right-pads it to whole blocks.

  Returns:
    (tokens_BT, lengths_B, capacity S, pad_id, eos) where eos is -1 for
    "never"; tokens and lengths are device arrays.
  """
  if not prompts or min(len(p) for p in prompts) == 0:
    raise ValueError("generate needs at least one prompt, none empty")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  lengths = np.array([len(p) for p in prompts], np.int32)
  # The last sampled token is never fed back, hence the -1.
  need = int(lengths.max()) + max_new_tokens - 1
  if max_len is not None and need > max_len:
    raise ValueError(f"max_len={max_len} is too small: the longest prompt "
                     f"({lengths.max()}) + max_new_tokens - 1 = {need}")
  s = capacity(max_len or need, block_size)
  pad_id = pad_id if pad_id is not None else (eos_id or 0)
  eos = -1 if eos_id is None else eos_id
  # Prompts are padded to whole blocks so that few prompt shapes compile.
  tokens = np.full((len(prompts), capacity(int(lengths.max()), block_size)),
                   pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  return jnp.asarray(tokens), jnp.asarray(lengths), s, pad_id, eos


def trim_at_eos(step_tokens: Sequence[jax.Array], eos: int) -> list:
  """Per-sequence token lists from per-step [B] arrays, cut after EOS."""
  toks = np.asarray(jnp.stack(step_tokens, axis=1))
  results = []
  for row in toks.tolist():
    if eos in row:
      row = row[:row.index(eos) + 1]
    results.append(row)
  return results


def generate(params: Any, cfg: config_lib.ModelConfig,
             prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0,
             eos_id: Optional[int] = None, pad_id: Optional[int] = None,
             seed: int = 0, max_len: Optional[int] = None,
             return_stats: bool = False):
  """Samples continuations of a batch of prompts of any lengths.

  Prefill, then a Python loop over one compiled step (decode + sampling);
  compilation is done ahead of the loop so the decode time excludes it.

  Args:
    params: model parameters.
    cfg: the model config.
    prompts: token lists, each non-empty.
    max_new_tokens: tokens to generate per prompt (>= 1).
    temperature: 0 for greedy.
    top_p: nucleus mass in (0, 1]; 1 disables it.
    eos_id: a sequence stops after emitting it (None: never).
    pad_id: emitted by finished sequences (default eos_id, else 0).
    seed: PRNG seed of the sampler.
    max_len: cache capacity (default: longest prompt + max_new_tokens).
    return_stats: also return a dict with prefill_s, decode_s,
      decode_steps, decode_tokens_per_s (batch tokens per second of the
      decode steps, prefill excluded) and gamma_per_layer (mean
      `selection_gamma` over steps, KV heads and unfinished sequences).

  Returns:
    The generated tokens of each prompt, up to and including eos_id, without
    the trailing pad; with return_stats, (tokens, stats).

  Raises:
    ValueError: an empty prompt or a capacity too small.
  """
  params = serving_params(params, cfg)  # cast once, not every step
  tokens, lengths, s, pad_id, eos = prepare_prompts(
      prompts, max_new_tokens, cfg.sparse.block_size, max_len=max_len,
      eos_id=eos_id, pad_id=pad_id)
  c = cfg.sparse.block_size
  temp, top_p = jnp.float32(temperature), jnp.float32(top_p)
  run_prefill = prefill.lower(params, cfg, tokens, lengths, s).compile()
  t0 = time.perf_counter()
  cache, logits_BV = jax.block_until_ready(
      run_prefill(params, tokens, lengths))
  prefill_s = time.perf_counter() - t0
  state = {"key": jax.random.key(seed),
           "done_B": jnp.zeros(len(prompts), bool)}
  state = next_token_jit(state, logits_BV, temp, top_p, eos, pad_id)
  out = [state["tok_B"]]
  if return_stats:
    n_sel = (s // c if cfg.sparse.variant == "full"
             else min(cfg.sparse.topk_blocks, s // c))
    state.update(
        idx_LBKP=jnp.full((cfg.num_layers, len(prompts),
                           cfg.num_kv_heads, n_sel), -1, jnp.int32),
        gamma_sum_L=jnp.zeros(cfg.num_layers, _F32),
        gamma_n=jnp.zeros((), jnp.int32), have_prev=jnp.zeros((), bool))
  step = _generate_step.lower(params, cache, state, temp, top_p, eos,
                              pad_id, cfg=cfg,
                              track_gamma=return_stats).compile()

  t0 = time.perf_counter()
  steps = 0
  for steps in range(1, max_new_tokens):
    cache, state = step(params, cache, state, temp, top_p, eos, pad_id)
    out.append(state["tok_B"])
    if steps % 16 == 0 and bool(jnp.all(state["done_B"])):
      break
  jax.block_until_ready((cache, state))
  decode_s = time.perf_counter() - t0

  results = trim_at_eos(out, eos)
  if not return_stats:
    return results
  gamma_n = int(state["gamma_n"])
  stats = {
      "prefill_s": prefill_s, "decode_s": decode_s, "decode_steps": steps,
      "decode_tokens_per_s": (len(prompts) * steps / decode_s
                              if steps else 0.0),
      "gamma_per_layer": (np.asarray(state["gamma_sum_L"]) / gamma_n
                          if gamma_n else np.ones(cfg.num_layers)).tolist(),
  }
  return results, stats
