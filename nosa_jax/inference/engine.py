"""The decode engine: prefill, one-token steps and the generate loop (§4).

One engine over a pluggable KV store (`stores.DeviceStore`, the whole cache
in device memory, or `stores.HostStore`, K/V in pinned host memory with a
device block cache). Layer math is the training model's (`model.block`,
`model.embed`, `model.logits`); only the `attend` given to each block
differs:

  prefill(params, cfg, tokens_BT, lengths_B, max_len, *, store)
      -> (state, logits_BV)
  prefill_chunked(..., chunk=...)   the same over query chunks
  decode_step(params, cfg, state, tokens_B[, prefetch=True])
      -> (state, logits_BV, info)
  generate(params, cfg, prompts, max_new_tokens, *, store, ...)

Semantics (NOSA_SPEC.md "Project decisions" 1, 2, 6). Decode is the
training forward evaluated one query at a time, so decode logits equal
`model.apply` logits at every position, whichever the store (tests check
both):

  * The token at position p = length is appended first; query p then
    selects with the training rule of §2.5 at t = p
    (`selection.select_decode_blocks`): query-aware scores over the
    compressed windows complete at p, eviction scores from the window means
    of the bias, the forced sink / window / own blocks, two-phase top-k. At
    decode every complete window is visible (§4.3's `causal=False` stage
    1); NOSI's one-token lag of the compressed keys (§4.8.5) is not copied.
  * The store attends over the selected blocks with per-slot valid lengths;
    the partial tail block is attended, short contexts leave empty slots
    masked, and logits are q.k / sqrt(D) + b with b at full strength.
  * Sequences of one batch have their own lengths and positions (prompts
    are right-padded; nothing past a sequence's length is ever read).

The selection state stays on the device for both stores (§4.1), per layer
(`SelectionState`; fields a variant does not use are None):

  bias_BKS     fp32 eviction bias per token (dma / nosa).
  kbar_BWKD    fp32 compressed keys (infllmv2 / nosa), W = windows in S.
  ebar_BKW     fp32 window means of the bias (dma / nosa).

kbar and ebar are kept incrementally: a step whose token completes window
c pools that one window (its keys from `store.window_keys`: in place from
the device cache, or from the host store's rolling buffer), instead of
re-pooling the cache; windows not yet complete are zero and never read.

Prefill streams each layer's K/V to the store as soon as the layer is done;
an optimization barrier makes layer i's store finish before layer i + 2
starts, so a host store's device temporaries hold at most two layers' K/V.
`prefill_batch` prefills groups of sequences one after another into rows
of one state (donated: written in place), so that the activations, which
scale with the group, fit for long prompts. `prefill_chunked` bounds them
further, to one query chunk: each chunk attends over the layer's whole
cache at its positions and rebuilds the layer's state, so the last chunk
leaves the whole prefill's state.

Prefetch (`decode_step(prefetch=True)`, host store with spare slots):
before layer i runs, layer i+1's selection is guessed from layer i's input
and the store loads the guessed blocks ahead (`stores.HostStore.prefetch`);
the attend's diff still fetches whatever is missing.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nosa_jax import config as config_lib
from nosa_jax import layers
from nosa_jax import model
from nosa_jax import selection
from nosa_jax import sparse_attention
from nosa_jax.inference import sampling
from nosa_jax.inference import stores

_F32 = jnp.float32
DEVICE = stores.DeviceStore()
Store = Any  # stores.DeviceStore | stores.HostStore
# override(idx_BKP, pos_B, num_blocks, layer) -> idx_BKP: replaces the
# model's selection (benchmarks; must be hashable: it is a jit static).
SelectionOverride = Callable[..., jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SelectionState:
  bias_BKS: Optional[jax.Array]
  kbar_BWKD: Optional[jax.Array]
  ebar_BKW: Optional[jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerState:
  sel: SelectionState
  kv: Any  # the store's per-layer K/V


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["layers", "lengths_B"],
                   meta_fields=["store", "num_blocks"])
@dataclasses.dataclass(frozen=True)
class DecodeState:
  """Per-layer states, the number of cached tokens of each sequence (also
  the position of the next token), and (static) the store and N."""

  layers: tuple[LayerState, ...]
  lengths_B: jax.Array
  store: Store
  num_blocks: int


# ------------------------------------------------------------------------------
# Prefill (§4.2): the training forward over the prompts, filling the state.
# ------------------------------------------------------------------------------


def _prefill_selection(k_BTKD, bias_BTK, lengths_B, s: int,
                       sp: config_lib.SparseConfig) -> SelectionState:
  """The selection state after the prompts (windows complete inside each
  prompt; the rest are zero and filled during decode)."""
  b = k_BTKD.shape[0]
  kern, stride = sp.compress_kernel, sp.compress_stride
  n_win = selection.num_windows(s, kern, stride)
  complete_BW = (stride * jnp.arange(n_win)[None, :] + kern
                 <= lengths_B[:, None])

  def windows(x_BW_, axis):  # keep complete windows, pad W to n_win
    shape = [1] * x_BW_.ndim
    shape[0], shape[axis] = b, x_BW_.shape[axis]
    keep = complete_BW[:, :x_BW_.shape[axis]].reshape(shape)
    pad = [(0, 0)] * x_BW_.ndim
    pad[axis] = (0, n_win - x_BW_.shape[axis])
    return jnp.pad(jnp.where(keep, x_BW_, 0.0), pad)

  kbar = bias = ebar = None
  if sp.query_aware:
    kbar = windows(selection.compress_keys(k_BTKD, kern, stride), axis=1)
  if bias_BTK is not None:
    bias = _to_cache(bias_BTK, lengths_B, s)
    ebar = windows(jnp.moveaxis(
        selection.window_means(bias_BTK, kern, stride), 2, 1), axis=2)
  return SelectionState(bias, kbar, ebar)


def _to_cache(x_BTK_, lengths_B, s: int):
  """[B, T, K, ...] -> [B, K, S, ...], zero past each length."""
  b, t = x_BTK_.shape[:2]
  valid_BT = jnp.arange(t)[None, :] < lengths_B[:, None]
  x_BTK_ = jnp.where(valid_BT.reshape((b, t) + (1,) * (x_BTK_.ndim - 2)),
                     x_BTK_, 0)
  pad = [(0, 0)] * x_BTK_.ndim
  pad[1] = (0, s - t)
  return jnp.moveaxis(jnp.pad(x_BTK_, pad), 2, 1)


def capacity(cfg: config_lib.ModelConfig, t: int, max_len: int) -> int:
  """The cache capacity S; ValueError if T prompt tokens exceed it."""
  s = sampling.capacity(max_len, cfg.sparse.block_size)
  if t > s:
    raise ValueError(f"prompt length T={t} exceeds the cache capacity "
                     f"max_len={max_len} (rounded to {s})")
  return s


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "store"),
                   donate_argnames=("into",))
def _prefill(params, cfg: config_lib.ModelConfig, tokens_BT, lengths_B,
             max_len: int, store: Store = DEVICE, into=None, row0=0):
  """Prefill of one group of sequences (rows row0: of `into`, if given)."""
  sp = cfg.sparse
  b, t = tokens_BT.shape
  s = capacity(cfg, t, max_len)
  lengths_B = lengths_B.astype(jnp.int32)
  # Padding after a prompt sits at the prompt's last position: the RoPE of
  # a row depends on its largest position (LongRoPE's factor set), which
  # must be the prompt's, not the padded width's. Padded tokens are never
  # attended by the prompt's queries, nor cached.
  positions_BT = jnp.minimum(jnp.arange(t)[None, :], lengths_B[:, None] - 1)
  causal = model.training_attention(sp)

  def attend(q_BTHD, k_BTKD, v_BTKD, bias_BTK):
    return causal(q_BTHD, k_BTKD, v_BTKD, bias_BTK)[0], (k_BTKD, v_BTKD,
                                                          bias_BTK)

  x_BTM = model.embed(params, cfg, tokens_BT)
  out = []
  for i in range(cfg.num_layers):
    x_BTM, (k_BTKD, v_BTKD, bias_BTK) = model.block(
        params["blocks"][i], cfg, x_BTM, positions_BT, attend)
    layer = LayerState(
        sel=_prefill_selection(k_BTKD, bias_BTK, lengths_B, s, sp),
        kv=store.prefill(_to_cache(k_BTKD, lengths_B, s),
                         _to_cache(v_BTKD, lengths_B, s), lengths_B, sp))
    if into is not None:  # write into rows row0 : row0 + B of `into`
      layer = jax.tree.map(
          lambda dst, x: jax.lax.dynamic_update_slice_in_dim(dst, x, row0,
                                                             axis=0),
          into.layers[i], layer)
    out.append(layer)
    if i:
      # Layer i-1's store (for the host store, an async device -> host copy)
      # may overlap layer i but must be done before layer i+1 starts: at
      # most two layers' K/V are on the device at once.
      x_BTM, out[i - 1] = jax.lax.optimization_barrier((x_BTM, out[i - 1]))
  logits_BV = model.logits(params, cfg, x_BTM[jnp.arange(b), lengths_B - 1])
  if into is not None:
    lengths_B = jax.lax.dynamic_update_slice_in_dim(into.lengths_B,
                                                    lengths_B, row0, axis=0)
  return DecodeState(tuple(out), lengths_B, store, s // sp.block_size), \
      logits_BV


def _prefill_chunk(params, cfg: config_lib.ModelConfig, state: DecodeState,
                   tokens_BC, lengths_B, p0, max_len: int):
  """One query chunk [p0, p0 + C) of a chunked prefill, every layer.

  Each layer reads its whole cache (`store.read_all`), writes the chunk's
  K / V / bias rows into it, attends the chunk's queries over it at their
  positions, and rebuilds its state with `store.prefill` and
  `_prefill_selection` over the prompt so far, as `_prefill` does over the
  whole prompt: after the last chunk the state is the whole prefill's.
  """
  # Query positions need the xla path; the penalty is a training term.
  sp = dataclasses.replace(cfg.sparse, implementation="xla",
                           locality_weight=0.0)
  store = state.store
  b, c = tokens_BC.shape
  s = state.num_blocks * sp.block_size
  pos_C = p0 + jnp.arange(c)
  # Padding sits at the prompt's last position (as in `_prefill`); rows past
  # a prompt are neither cached nor attended by its queries.
  positions_BC = jnp.minimum(pos_C[None, :], lengths_B[:, None] - 1)
  so_far_B = jnp.minimum(lengths_B, p0 + c)
  valid_BC = pos_C[None, :] < lengths_B[:, None]

  def write(full_BKS_, x_BCK_):  # the chunk's valid rows at p0
    x_BKC_ = jnp.moveaxis(x_BCK_, 2, 1)
    old = jax.lax.dynamic_slice_in_dim(full_BKS_, p0, c, axis=2)
    keep = valid_BC[:, None].reshape((b, 1, c) + (1,) * (x_BKC_.ndim - 3))
    return jax.lax.dynamic_update_slice_in_dim(
        full_BKS_, jnp.where(keep, x_BKC_, old), p0, axis=2)

  x_BCM = model.embed(params, cfg, tokens_BC)
  out = []
  for i, lay in enumerate(state.layers):
    k_BKSD, v_BKSD = store.read_all(lay.kv)
    bias_BKS = lay.sel.bias_BKS

    def attend(q_BCHD, k_BCKD, v_BCKD, bias_BCK, k_BKSD=k_BKSD,
               v_BKSD=v_BKSD, bias_BKS=bias_BKS):
      k_BKSD, v_BKSD = write(k_BKSD, k_BCKD), write(v_BKSD, v_BCKD)
      if bias_BCK is not None:
        bias_BKS = write(bias_BKS, bias_BCK)
      to_bsk = lambda x: None if x is None else jnp.moveaxis(x, 1, 2)
      out_BCHD, _ = sparse_attention.nosa_attention(
          q_BCHD, to_bsk(k_BKSD), to_bsk(v_BKSD), to_bsk(bias_BKS), sp,
          positions_T=pos_C)
      return out_BCHD, (k_BKSD, v_BKSD, bias_BKS)

    x_BCM, (k_BKSD, v_BKSD, bias_BKS) = model.block(
        params["blocks"][i], cfg, x_BCM, positions_BC, attend)
    sel = _prefill_selection(jnp.moveaxis(k_BKSD, 1, 2),
                             None if bias_BKS is None else
                             jnp.moveaxis(bias_BKS, 1, 2), so_far_B, s, sp)
    out.append(LayerState(sel=sel, kv=store.prefill(k_BKSD, v_BKSD,
                                                    so_far_B, sp)))
    if i:  # at most two layers' caches on the device at once
      x_BCM, out[i - 1] = jax.lax.optimization_barrier((x_BCM, out[i - 1]))
  last_B = jnp.clip(lengths_B - 1 - p0, 0, c - 1)
  logits_BV = model.logits(params, cfg, x_BCM[jnp.arange(b), last_B])
  return dataclasses.replace(state, layers=tuple(out),
                             lengths_B=so_far_B), logits_BV


# The device store's chunk updates its cache in place (donated). Donating a
# host store's pinned_host arrays fails in XLA ("memory kind does not
# match"), so that chunk keeps them: the old and the new host store coexist
# during each chunk.
_chunk_in_place = jax.jit(_prefill_chunk, static_argnames=("cfg", "max_len"),
                          donate_argnames=("state",))
_chunk_copy = jax.jit(_prefill_chunk, static_argnames=("cfg", "max_len"))


def prefill_chunked(params: Any, cfg: config_lib.ModelConfig,
                    tokens_BT: jax.Array, lengths_B: jax.Array, max_len: int,
                    *, chunk: int, store: Store = DEVICE,
                    host_memory_limit: Optional[int] = None
                    ) -> tuple[DecodeState, jax.Array]:
  """`prefill` over query chunks of `chunk` tokens (sparse variants).

  Only one chunk's activations and one layer's whole cache are on the
  device at a time, so a prompt whose whole-prompt activations do not fit
  still prefills; with the host store, each chunk's K/V go to the host as
  the chunk finishes. The result equals `prefill`'s (tested); the chunks'
  attention runs the `xla` sparse path (the Pallas kernel takes no query
  positions), and with the host store every chunk copies each layer's
  store to the device and back (PCIe time grows with the number of chunks)
  and holds the old and the new host store at once (XLA refuses to donate
  pinned_host buffers here): twice the store's host memory. Each chunk also
  rebuilds every layer's selection state over the whole cache, though only
  the windows it touches change (work per chunk grows with the context).

  Args:
    params, cfg, tokens_BT, lengths_B, max_len, store, host_memory_limit:
      as for `prefill`.
    chunk: query tokens per chunk, a positive multiple of the block size
      (the last chunk is the rest of the prompt: one more compile).
  """
  sp = cfg.sparse
  if not sp.is_sparse:
    raise ValueError("prefill_chunked needs a sparse variant (its chunks "
                     f"attend through the selection), got {sp.variant!r}")
  if (not isinstance(chunk, int) or chunk < 1
      or chunk % sp.block_size):
    raise ValueError(f"chunk={chunk!r} must be a positive multiple of "
                     f"block_size={sp.block_size}")
  b, t = tokens_BT.shape
  store.check(cfg, b, max_len, host_memory_limit)
  capacity(cfg, t, max_len)
  lengths_B = jnp.asarray(lengths_B, jnp.int32)
  state = empty_state(params, cfg, b, t, max_len, store)
  logits_BV = None
  for p0 in range(0, t, chunk):
    run = _chunk_copy if store.writes_back else _chunk_in_place
    state, chunk_BV = run(params, cfg, state,
                                     tokens_BT[:, p0:p0 + chunk], lengths_B,
                                     jnp.int32(p0), max_len)
    ends_here_B = (lengths_B - 1 >= p0) & (lengths_B - 1 < p0 + chunk)
    logits_BV = chunk_BV if logits_BV is None else jnp.where(
        ends_here_B[:, None], chunk_BV, logits_BV)
  return state, logits_BV


def empty_state(params, cfg: config_lib.ModelConfig, batch: int, t: int,
                max_len: int, store: Store = DEVICE) -> DecodeState:
  """`prefill`'s state for `batch` prompts of width `t`, all zeros, every
  length 0, allocated layer by layer (a host store's arrays directly in
  pinned memory). Grouped prefill writes into it; benchmarks set lengths."""
  shapes, _ = jax.eval_shape(
      lambda p_, t_, l_: _prefill(p_, cfg, t_, l_, max_len, store), params,
      jax.ShapeDtypeStruct((batch, t), jnp.int32),
      jax.ShapeDtypeStruct((batch,), jnp.int32))
  return dataclasses.replace(
      shapes, layers=tuple(
          LayerState(sel=stores.allocate(lay.sel), kv=store.empty(lay.kv))
          for lay in shapes.layers),
      lengths_B=stores.allocate(shapes.lengths_B))


def _prefill_runner(params, cfg: config_lib.ModelConfig, store: Store,
                    tokens_BT, lengths_B, max_len: int,
                    prefill_batch: Optional[int], *, aot: bool = False):
  """A function of no arguments that runs the prefill, group by group.

  With aot, its executables (one per group size) are compiled here, and
  the state of a grouped prefill is allocated here, so the function's run
  time is the prefill's alone; it can then run only once (the state is
  donated).
  """
  if prefill_batch is not None and (not isinstance(prefill_batch, int)
                                    or prefill_batch < 1):
    raise ValueError("prefill_batch must be None or an int >= 1, got "
                     f"{prefill_batch!r}")
  batch = tokens_BT.shape[0]
  step = min(prefill_batch or batch, batch)
  groups = [(b0, min(b0 + step, batch)) for b0 in range(0, batch, step)]
  def run(params, tokens_BT, lengths_B, **rows):
    return _prefill(params, cfg, tokens_BT, lengths_B, max_len, store, **rows)

  if len(groups) == 1:
    if aot:
      run = _prefill.lower(params, cfg, tokens_BT, lengths_B, max_len,
                           store).compile()
    return lambda: run(params, tokens_BT, lengths_B)
  new_state = functools.partial(empty_state, params, cfg, batch,
                                tokens_BT.shape[1], max_len, store)
  state0 = new_state() if aot else None
  compiled = {}
  for b0, b1 in groups[:1] + groups[-1:] if aot else ():
    compiled.setdefault(b1 - b0, _prefill.lower(
        params, cfg, tokens_BT[b0:b1], lengths_B[b0:b1], max_len, store,
        into=state0, row0=jnp.int32(b0)).compile())

  def run_groups():
    state = state0 if aot else new_state()
    logits = []
    for b0, b1 in groups:
      fn = compiled.get(b1 - b0, run)
      state, logits_bV = fn(params, tokens_BT[b0:b1], lengths_B[b0:b1],
                            into=state, row0=jnp.int32(b0))
      logits.append(logits_bV)
    return state, jnp.concatenate(logits)

  return run_groups


def prefill(params: Any, cfg: config_lib.ModelConfig, tokens_BT: jax.Array,
            lengths_B: jax.Array, max_len: int, *, store: Store = DEVICE,
            prefill_batch: Optional[int] = None,
            host_memory_limit: Optional[int] = None
            ) -> tuple[DecodeState, jax.Array]:
  """Runs the prompts and builds the decode state.

  Args:
    params: model parameters (`model.init(...)[1]`).
    cfg: the model config.
    tokens_BT: int prompts, right-padded; row b is valid up to lengths_B[b].
    lengths_B: int prompt lengths, 1 <= length <= T.
    max_len: cache capacity in tokens (rounded up to whole blocks).
      Decoding past it drops tokens silently: `generate` checks it.
    store: where K/V live (`stores.DeviceStore()` or `stores.HostStore()`).
    prefill_batch: sequences per prefill pass (None: all); the result does
      not depend on it.
    host_memory_limit: bytes a host store may take (default: what is
      free).

  Returns:
    (state, logits_BV): fp32 logits at position lengths_B - 1 of each
    prompt, i.e. predicting the token after it.

  Raises:
    ValueError: the store cannot hold the batch, or a bad prefill_batch.
  """
  store.check(cfg, tokens_BT.shape[0], max_len, host_memory_limit)
  return _prefill_runner(params, cfg, store, tokens_BT,
                         jnp.asarray(lengths_B), max_len, prefill_batch)()


# ------------------------------------------------------------------------------
# Decode step (§4.3).
# ------------------------------------------------------------------------------


def _append(sel: SelectionState, keys_BKRD, bias_BK, pos_B,
            sp: config_lib.SparseConfig) -> SelectionState:
  """Appends the token's bias and the window means it completes, if any
  (keys_BKRD: the keys of the window ending at pos_B, query-aware only)."""
  b_B = jnp.arange(pos_B.shape[0])
  kern, stride = sp.compress_kernel, sp.compress_stride
  bias, kbar, ebar = sel.bias_BKS, sel.kbar_BWKD, sel.ebar_BKW
  if bias is not None:
    bias = bias.at[b_B, :, pos_B].set(bias_BK)
  # Window c = [stride*c, stride*c + kern) completes at its last token.
  first_B = pos_B + 1 - kern
  done_B = (first_B >= 0) & (first_B % stride == 0)
  if kbar is not None:
    c_B = jnp.clip(first_B // stride, 0, kbar.shape[1] - 1)
    new_BKD = selection.compress_keys(jnp.moveaxis(keys_BKRD, 2, 1), kern,
                                      stride)[:, 0]
    kbar = kbar.at[b_B, c_B].set(
        jnp.where(done_B[:, None, None], new_BKD, kbar[b_B, c_B]))
  if ebar is not None:
    c_B = jnp.clip(first_B // stride, 0, ebar.shape[2] - 1)
    start_B = jnp.clip(first_B, 0, bias.shape[2] - kern)
    win_BKR = jax.vmap(lambda x, i: jax.lax.dynamic_slice_in_dim(
        x, i, kern, axis=1))(bias, start_B)
    new_BK = selection.window_means(jnp.moveaxis(win_BKR, 2, 1), kern,
                                    stride)[:, 0]
    ebar = ebar.at[b_B, :, c_B].set(
        jnp.where(done_B[:, None], new_BK, ebar[b_B, :, c_B]))
  return SelectionState(bias, kbar, ebar)


def _select(q_BHD, sel: SelectionState, pos_B, sp: config_lib.SparseConfig,
            n: int, kv_heads: int):
  """(idx_BKP, se_BKN): the selection; `full` selects every block so far."""
  if sp.is_sparse:
    return selection.select_decode_blocks(q_BHD, sel.kbar_BWKD, sel.ebar_BKW,
                                          pos_B, sp, n)
  j_N = jnp.arange(n, dtype=jnp.int32)
  idx_BN = jnp.where(j_N[None, :] * sp.block_size <= pos_B[:, None],
                     j_N[None, :], -1)
  return jnp.broadcast_to(idx_BN[:, None], (pos_B.shape[0], kv_heads, n)), \
      None


def _decode_step(params, cfg: config_lib.ModelConfig, state: DecodeState,
                 tokens_B, override: Optional[SelectionOverride] = None,
                 predict: bool = False, prefetch: bool = False,
                 guess: Optional[SelectionOverride] = None):
  sp, store, n = cfg.sparse, state.store, state.num_blocks
  pos_B = state.lengths_B
  x_B1M = model.embed(params, cfg, tokens_B[:, None])
  new_layers, sel_L, fetched_L, pred_L = [], [], [], []
  loaded_L = [None] * len(state.layers)  # blocks prefetched per layer
  kvs = [layer.kv for layer in state.layers]
  x_prev_B1M = None
  for i, layer in enumerate(state.layers):
    p_block = params["blocks"][i]
    if predict:  # layer i's selection guessed from layer i-1's input
      pred_L.append(None if x_prev_B1M is None else _predict(
          p_block, cfg, layer.sel, x_prev_B1M, pos_B, n))
      x_prev_B1M = x_B1M
    if prefetch and i + 1 < len(state.layers):
      # Layer i+1's selection guessed from layer i's input, loaded before
      # layer i runs (its copies can then overlap layer i's compute).
      nxt = state.layers[i + 1]
      guess_BKP = _predict(params["blocks"][i + 1], cfg, nxt.sel, x_B1M,
                           pos_B, n)
      if guess is not None:
        guess_BKP = guess(guess_BKP, pos_B, n, i + 1)
      kvs[i + 1], loaded_L[i + 1], x_B1M = store.prefetch(
          kvs[i + 1], guess_BKP, pos_B, sp, after=x_B1M)
    if loaded_L[i] is not None:  # copies issued a layer ago have landed
      kvs[i], x_B1M = store.settle(kvs[i], before=x_B1M)
    layer = dataclasses.replace(layer, kv=kvs[i])

    def attend(q_B1HD, k_B1KD, v_B1KD, bias_B1K, layer=layer, i=i):
      k_BKD, v_BKD = k_B1KD[:, 0], v_B1KD[:, 0]
      kv = store.append(layer.kv, k_BKD, v_BKD, pos_B)
      keys_BKRD = (store.window_keys(kv, pos_B, sp.compress_kernel)
                   if sp.query_aware else None)
      sel = _append(layer.sel, keys_BKRD,
                    None if bias_B1K is None else bias_B1K[:, 0], pos_B, sp)
      idx_BKP, se_BKN = _select(q_B1HD[:, 0], sel, pos_B, sp, n,
                                cfg.num_kv_heads)
      if override is not None:
        idx_BKP = override(idx_BKP, pos_B, n, i)
      kv, out_BHD, fetched_BK = store.attend(
          kv, q_B1HD[:, 0], k_BKD, v_BKD, sel.bias_BKS, idx_BKP, se_BKN,
          pos_B, sp)
      return out_BHD[:, None], (LayerState(sel, kv), idx_BKP, fetched_BK)

    x_B1M, (layer, idx_BKP, fetched_BK) = model.block(
        p_block, cfg, x_B1M, pos_B[:, None], attend)
    new_layers.append(layer)
    sel_L.append(idx_BKP)
    fetched_L.append(fetched_BK)
  state = dataclasses.replace(state, layers=tuple(new_layers),
                              lengths_B=pos_B + 1)
  info = {"selected": jnp.stack(sel_L), "fetched": jnp.stack(fetched_L)}
  if prefetch:  # per layer: loaded ahead, of those attended, the rest
    zero = jnp.full(kvs[0].slot_map.shape, -1, jnp.int32)
    loaded = jnp.stack([zero if x is None else x for x in loaded_L])
    used = jnp.any(loaded[..., :, None] == info["selected"][..., None, :],
                   axis=-1) & (loaded >= 0)
    info["prefetched"] = jnp.sum(loaded >= 0, -1).astype(jnp.int32)
    info["prefetch_hits"] = jnp.sum(used, -1).astype(jnp.int32)
    info["prefetch_wasted"] = info["prefetched"] - info["prefetch_hits"]
  if predict:  # layer 0 has no earlier input to guess from: -1
    pred_L[0] = jnp.full_like(sel_L[0], -1)
    info["predicted"] = jnp.stack(pred_L)
  return state, model.logits(params, cfg, x_B1M[:, 0]), info


def _predict(p_block, cfg, sel: SelectionState, x_B1M, pos_B, n: int):
  """The selection of a layer from an earlier residual x_B1M, on its state
  before this step's token (whose key is not known yet): what a prefetch
  issued one layer ahead could fetch (InfiniGen-style)."""
  h_B1M = layers.rms_norm(x_B1M, p_block["attn_norm"]["scale"][...],
                          cfg.rms_eps)
  q_B1HD = model.attention_inputs(p_block["attn"], cfg, h_B1M,
                                  pos_B[:, None])[0]
  return selection.select_decode_blocks(q_B1HD[:, 0], sel.kbar_BWKD,
                                        sel.ebar_BKW, pos_B, cfg.sparse, n)[0]


@functools.partial(jax.jit, static_argnames=("cfg", "override", "predict",
                                             "prefetch", "guess"),
                   donate_argnames=("state",))
def decode_step(params: Any, cfg: config_lib.ModelConfig, state: DecodeState,
                tokens_B: jax.Array, *,
                override: Optional[SelectionOverride] = None,
                predict: bool = False, prefetch: bool = False,
                guess: Optional[SelectionOverride] = None):
  """Appends one token per sequence and returns the next-token logits.

  Args:
    params: model parameters.
    cfg: the model config (static).
    state: from `prefill` or a previous step (donated: do not reuse it; a
      host store is updated in place).
    tokens_B: the token at position state.lengths_B of each sequence.
    override: replaces each layer's selection (benchmarks; static).
    predict: also return each layer's selection guessed from the previous
      layer's input (`info["predicted"]`; layer 0's rows are -1). Sparse
      variants only.
    prefetch: before each layer i runs, guess layer i+1's selection from
      layer i's input and load the guessed blocks into spare device slots
      (`stores.HostStore.prefetch`; the host store with cache_blocks >
      topk_blocks). Outputs are those without it; `info` gains per layer
      "prefetched", "prefetch_hits" (of those, attended at this step) and
      "prefetch_wasted" (int32 [L, B, K]; layer 0 is never prefetched).
    guess: replaces the guessed selection (like `override`: tests and
      benchmarks, e.g. an oracle or a deliberately wrong guess; static).

  Returns:
    (state, logits_BV, info): fp32 logits; info["selected"] int32
    [L, B, K, P], per layer the blocks attended, ascending, -1 for unused
    slots (P = min(topk_blocks, N); `full`: every block, P = N);
    info["fetched"] int32 [L, B, K], blocks copied from the host store at
    this step (0 for the device store).
  """
  for name, on in (("predict", predict), ("prefetch", prefetch)):
    if on and not cfg.sparse.is_sparse:
      raise ValueError(f"{name}=True needs a sparse variant, got "
                       f"{cfg.sparse.variant!r}")
  if prefetch and not state.store.writes_back:
    raise ValueError("prefetch=True needs the host store (--offload=host): "
                     "the device store holds every block already")
  return _decode_step(params, cfg, state, tokens_B, override, predict,
                      prefetch, guess)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def write_back(cfg: config_lib.ModelConfig, state: DecodeState
               ) -> DecodeState:
  """The store's write-back of blocks completed during the last C steps.

  Call at least once every C = block_size steps, and before reading a host
  store; `generate` does. A no-op for the device store.
  """
  return dataclasses.replace(state, layers=tuple(
      dataclasses.replace(lay, kv=state.store.write_back(
          lay.kv, state.lengths_B, cfg.sparse)) for lay in state.layers))


# ------------------------------------------------------------------------------
# The generate loop.
# ------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("cfg", "track", "prefetch"),
                   donate_argnames=("state",))
def _generate_step(params, state, gen, temperature, top_p, eos_id, pad_id,
                   *, cfg, track, prefetch=False):
  """decode_step + sampling. Only the state is donated: the caller keeps
  the sampled tokens of every step."""
  live_B = ~gen["done_B"]
  state, logits_BV, info = _decode_step(params, cfg, state, gen["tok_B"],
                                        prefetch=prefetch)
  gen = sampling.next_token(gen, logits_BV, temperature, top_p, eos_id,
                            pad_id)
  if track:  # sums over KV heads and live sequences
    idx_LBKP = info["selected"]
    g_LB = jnp.mean(selection.selection_gamma(gen["idx_LBKP"], idx_LBKP), -1)
    count_B = live_B & gen["have_prev"]  # no previous step at the first
    gen["gamma_sum_L"] += jnp.sum(jnp.where(count_B[None, :], g_LB, 0.0),
                                         axis=-1)
    gen["gamma_n"] += jnp.sum(count_B)
    gen["idx_LBKP"] = idx_LBKP
    gen["have_prev"] = jnp.ones_like(gen["have_prev"])
    live = live_B[None, :, None]
    gen["selected_L"] += jnp.sum(jnp.where(live, jnp.sum(idx_LBKP >= 0, -1),
                                           0), axis=(1, 2))
    gen["fetched_L"] += jnp.sum(jnp.where(live, info["fetched"], 0),
                                axis=(1, 2))
    if prefetch:
      for key in ("prefetched", "prefetch_hits"):
        gen[f"{key}_L"] += jnp.sum(jnp.where(live, info[key], 0),
                                   axis=(1, 2))
  return state, gen


def generate(params: Any, cfg: config_lib.ModelConfig,
             prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             store: Store = DEVICE, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: Optional[int] = None,
             pad_id: Optional[int] = None, seed: int = 0,
             max_len: Optional[int] = None, return_stats: bool = False,
             prefill_batch: Optional[int] = None,
             host_memory_limit: Optional[int] = None,
             prefill_chunk: Optional[int] = None, prefetch: bool = False):
  """Samples continuations of a batch of prompts of any lengths.

  Prefill, then a Python loop over one compiled step (decode + sampling;
  the store's write-back every C steps); compilation is done ahead of the
  loop so the timings exclude it.

  Args:
    params: model parameters.
    cfg: the model config.
    prompts: token lists, each non-empty.
    max_new_tokens: tokens to generate per prompt (>= 1).
    store: where K/V live (see `prefill`); the tokens do not depend on it.
    temperature: 0 for greedy.
    top_p: nucleus mass in (0, 1]; 1 disables it.
    eos_id: a sequence stops after emitting it (None: never).
    pad_id: emitted by finished sequences (default eos_id, else 0).
    seed: PRNG seed of the sampler.
    max_len: cache capacity (default: longest prompt + max_new_tokens).
    return_stats: also return a dict with prefill_s, decode_s,
      decode_steps, decode_tokens_per_s (batch tokens per second of the
      decode steps, prefill excluded), gamma_per_layer (mean
      `selection.selection_gamma` over steps, KV heads and unfinished
      sequences) and per layer selected_blocks, fetched_blocks and
      hit_rate = 1 - fetched / selected (cold start included).
    prefill_batch, host_memory_limit: `prefill`'s.
    prefill_chunk: if set, `prefill_chunked` with this chunk (sparse
      variants; prefill_batch is then ignored and prefill_s includes its
      compilation).
    prefetch: `decode_step`'s lookahead prefetch (the host store with
      cache_blocks > topk_blocks); stats then also have per layer
      prefetched_blocks and prefetch_hits.

  Returns:
    The generated tokens of each prompt, up to and including eos_id, without
    the trailing pad; with return_stats, (tokens, stats).

  Raises:
    ValueError: an empty prompt, a capacity too small, a store that cannot
      hold the batch, or temperature / top_p out of range.
  """
  sampling.check_sampling(temperature, top_p)
  if prefetch and not (cfg.sparse.is_sparse and store.writes_back):
    raise ValueError("prefetch=True needs a sparse variant and the host "
                     "store (offload=host)")
  params = model.serving_params(params, cfg)  # cast once, not every step
  tokens, lengths, s, pad_id, eos = sampling.prepare_prompts(
      prompts, max_new_tokens, cfg.sparse.block_size, max_len=max_len,
      eos_id=eos_id, pad_id=pad_id)
  store.check(cfg, len(prompts), s, host_memory_limit)
  temp, top_p = jnp.float32(temperature), jnp.float32(top_p)
  if prefill_chunk is None:
    run_prefill = _prefill_runner(params, cfg, store, tokens, lengths, s,
                                  prefill_batch, aot=True)
  else:
    run_prefill = functools.partial(
        prefill_chunked, params, cfg, tokens, lengths, s,
        chunk=prefill_chunk, store=store, host_memory_limit=host_memory_limit)
  t0 = time.perf_counter()
  state, logits_BV = jax.block_until_ready(run_prefill())
  prefill_s = time.perf_counter() - t0
  b, n_layers = len(prompts), cfg.num_layers
  gen = {"key": jax.random.key(seed), "done_B": jnp.zeros(b, bool)}
  gen = jax.jit(sampling.next_token)(gen, logits_BV, temp, top_p, eos,
                                     pad_id)
  out = [gen["tok_B"]]
  if return_stats:
    n = state.num_blocks
    p = min(cfg.sparse.topk_blocks, n) if cfg.sparse.is_sparse else n
    gen.update(idx_LBKP=jnp.full((n_layers, b, cfg.num_kv_heads, p), -1,
                                 jnp.int32),
               gamma_sum_L=jnp.zeros(n_layers, _F32),
               gamma_n=jnp.zeros((), jnp.int32),
               have_prev=jnp.zeros((), bool),
               selected_L=jnp.zeros(n_layers, jnp.int32),
               fetched_L=jnp.zeros(n_layers, jnp.int32))
    if prefetch:
      gen.update(prefetched_L=jnp.zeros(n_layers, jnp.int32),
                 prefetch_hits_L=jnp.zeros(n_layers, jnp.int32))
  step = _generate_step.lower(params, state, gen, temp, top_p, eos, pad_id,
                              cfg=cfg, track=return_stats,
                              prefetch=prefetch).compile()
  t0 = time.perf_counter()
  steps = 0
  for steps in range(1, max_new_tokens):
    state, gen = step(params, state, gen, temp, top_p, eos, pad_id)
    out.append(gen["tok_B"])
    if store.writes_back and steps % cfg.sparse.block_size == 0:
      state = write_back(cfg, state)
    if steps % 16 == 0 and bool(jnp.all(gen["done_B"])):
      break
  jax.block_until_ready((state, gen))
  decode_s = time.perf_counter() - t0

  results = sampling.trim_at_eos(out, eos)
  if not return_stats:
    return results
  gamma_n = int(gen["gamma_n"])
  sel, fet = np.asarray(gen["selected_L"]), np.asarray(gen["fetched_L"])
  return results, {
      "prefill_s": prefill_s, "decode_s": decode_s, "decode_steps": steps,
      "decode_tokens_per_s": b * steps / decode_s if steps else 0.0,
      "gamma_per_layer": (np.asarray(gen["gamma_sum_L"]) / gamma_n
                          if gamma_n else np.ones(n_layers)).tolist(),
      "selected_blocks": sel.tolist(), "fetched_blocks": fet.tolist(),
      "hit_rate": (1.0 - fet / np.maximum(sel, 1)).tolist(),
      **({"prefetched_blocks": np.asarray(gen["prefetched_L"]).tolist(),
          "prefetch_hits": np.asarray(gen["prefetch_hits_L"]).tolist()}
         if prefetch else {}),
  }
