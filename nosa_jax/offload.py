"""Offloaded decode engine: K/V in pinned host memory, a device block cache.

The offloaded mode of `decode.py` (NOSA_SPEC.md §4.1-§4.5 with project
decisions 6 and 7), for the block-sparse variants `infllmv2`, `dma` and
`nosa` (`full` has no selection to offload and is refused):

  prefill(params, cfg, tokens_BT, lengths_B, max_len, *, prefill_batch)
                                                      -> (state, logits_BV)
  decode_step(params, cfg, state, tokens_B)           -> (state, logits_BV,
                                                          stats)
  generate(params, cfg, prompts, max_new_tokens, ...) -> token lists

Semantics are decode.py's exactly (same selection rule, same attention,
logits q.k / sqrt(D) + b), so the logits equal `decode.decode_step`'s, and
hence the teacher-forced forward, at every step; only where K/V live
differs.

Memory placement, per layer (`OffloadLayer`):

  k_host, v_host   [B, K, N, C, D] model dtype, `pinned_host` memory
                   (`jax.memory.Space.Host`). Block-major: block n of
                   (b, k) is one contiguous C x D tile (decision 6).
                   N = ceil(max_len / C) is the capacity. Filled at
                   prefill; during decode a completed block is written
                   back by `flush` (below).
  k_slot, v_slot   [B, K, P, C, D] device memory, P = min(cache_blocks or
                   topk_blocks, N) slots: the device block cache.
  slot_map         [B, K, P] int32: the block id held by each slot, -1 =
                   empty. A slot keeps its block until another block is
                   loaded into it (so the map is what the slot holds, not
                   only the current selection).
  key_buf          [B, K, compress_kernel, D] the last compress_kernel keys
                   (NOSI's rolling buffer, §4.1), chronological, to emit the
                   compressed key of the window the current token completes
                   (infllmv2 / nosa).
  bias, kbar, ebar as in `decode.LayerCache`, on the device (§4.1).

The tail (partial) block is an ordinary slot that holds the query's own
block: the current token is written into it directly and it is never
fetched. A block that completes stays in its slot (it is in the window, so
the next step hits it) and a new own block takes a free slot at the next
step: NOSI's tail-full gap (§4.8.2) does not arise.

Prefill (§4.2) runs decode.prefill's layers (`decode.prefill_layer`: the
same computation; on CPU the logits, the store and the selection state
equal decode.prefill's bit for bit, grouped or not) and streams K/V
to the host layer by layer inside the jit: each layer's K/V, at capacity in
the block-major layout, leave with `device_put(..., Host)` (an async
device -> host copy) as soon as the layer is done; an optimization barrier
makes layer i's copy finish before layer i + 2 starts, so the device holds
at most two layers' K/V (overlapping a copy with the next layer), not all
of them. The selection state (bias, kbar, ebar, key_buf) and the slots
(the tail block in slot 0) stay on the device. `prefill_batch` prefills
groups of that many sequences one after another, each written into its
rows of the same store (the store is donated, so in place), so that the
activations, which scale with the group, fit for long prompts.

One decode step, per layer (§4.3, decode.py's order):
  1. q, k, v, b of the token at pos; per-token bias, key buffer, and the
     compressed key / window mean the token completes (device);
  2. selection at one query, `decode.select_decode_blocks` (the same code);
  3. diff (§4.4): selected blocks already in a slot are hits; the missing
     ones, in ascending id order, go into the slots not holding a selected
     block, in ascending slot order; the query's own block, when it is new
     (pos % C == 0), takes a slot but is not fetched;
  4. fetch (OffloadOptions.fetch): "pallas" = one launch of the zero-copy
     kernel `pallas_kernels.gather_blocks`, which reads the missing tiles
     straight from the pinned_host store into their slots (46 GB/s = 0.92
     of bulk H2D on the H100, WORKSPACE.md); "loop" = a `lax.fori_loop`
     over the compacted misses, each a `dynamic_slice` of the store plus
     `device_put` (XLA rejects gathers on a pinned_host operand; 2.5 GB/s,
     and its dynamic trip count syncs the GPU with the host), used on CPU;
     "fused" (the GPU default) = no separate copy: the attention kernel of
     step 6 (`pallas_kernels.sparse_decode_fetch`) reads each missing
     block from the store itself and stores it into its slot;
  5. the token's k, v are written into its own block's slot at pos % C.
     A block that completes stays in its slot (it is in the forced window
     for window_blocks * C steps); `flush`, called every C steps by the
     driver, copies the last completed block of every (b, k) to the host
     (a static loop of B*K tile copies per layer), so the step itself has
     no data-dependent control flow;
  6. `sparse_attention.decode_attention` over the P slots; a slot counts
     only if its block is selected, with slot_len = min(C, len - C*id)
     (partial tail, empty slots and stale slots masked), bias gathered
     from the device per-token bias by the slot map. Slot order does not
     matter.

Stats per step (`stats` dict, int32 [L, B, K]): `selected` (valid selected
blocks) and `fetched` (blocks copied host -> device). Hit rate =
1 - fetched / selected.

Tested on CPU (tests/nosa_jax/offload_test.py: all fetch modes, the
larger cache, grouped and whole prefill) and on the H100 (the same tests
with NOSA_TEST_GPU=1; the streamed prefill on an H200 on 2026-11-23:
its logits within 1.5e-6 of decode.prefill's, device temporaries 2.26
layers' K/V in the 8-layer memory test, the rest of its test not yet run
there);
throughput in experiments/decode_bench.py. Overlap (decision 7, first
half) is partial: the fused fetch overlaps a layer's PCIe reads with its
own attention (HBM reads, math), which hides ~1.1 ms of an 8B step's 2.2
ms of transfers; the projections and the MLP cannot overlap them, as they
depend on the attention output and the misses are known only once the
layer's query is (WORKSPACE.md has what was tried). Not done:
  * prefetch of a predicted next-layer selection beside the GEMMs;
  * query-chunked prefill of one long sequence: a group of one still
    needs its whole prompt's activations of one layer on the device (q,
    k, v, the MLP's hidden states, the selection scores), and each
    layer's K/V at capacity before the copy (not only the prompt's);
  * the device peak of a large streamed prefill (8B, 64k) measured on
    the GPU (only the tiny 8-layer test's temporaries were);
  * groups are padded to the batch's longest prompt (no sorting by
    length), and a grouped prefill first fills the store with zeros (each
    row is then written once more);
  * one device only (no sharding of the store or the slots).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nosa_jax import config as config_lib
from nosa_jax import decode
from nosa_jax import layers
from nosa_jax import selection
from nosa_jax import sparse_attention
import pallas_kernels

_F32 = jnp.float32
_HOST = jax.memory.Space.Host  # pinned_host
_DEVICE = jax.memory.Space.Device
VARIANTS = ("infllmv2", "dma", "nosa")
FETCH_MODES = ("auto", "pallas", "loop", "fused")


@dataclasses.dataclass(frozen=True)
class OffloadOptions:
  """How the engine moves blocks (static: part of the jit cache key).

  Attributes:
    fetch: "pallas" copies blocks with the zero-copy Pallas kernel
      (`pallas_kernels.gather_blocks`, reading the pinned_host store
      directly; interpreted off the GPU, so slow there), "loop" with a
      fori_loop of per-block `device_put`s (XLA copies; 1.4-4 GB/s on the
      H100), "fused" with the decode attention kernel itself
      (`pallas_kernels.sparse_decode_fetch`: each missing block is read
      from the pinned_host store by the program that attends to it, so the
      PCIe reads overlap the attention's HBM reads and math; no separate
      copy launch; interpreted off the GPU; 12.51 vs 13.61 ms per 8B step
      against "pallas", WORKSPACE.md), "auto" = "fused" on GPU, "loop"
      elsewhere.
    gather_programs: persistent grid of the Pallas copy kernel.
    cache_blocks: device slots per (layer, sequence, KV head); None =
      topk_blocks. Above topk_blocks, slots keep blocks that are no longer
      selected; a miss overwrites first an empty slot, then the slot whose
      block has the lowest block eviction score (dma / nosa: the score
      query-agnostic selection ranks by, §2.4) or, for infllmv2, the least
      recently selected one.
    synthetic_gamma: benchmark only (experiments/decode_bench.py): replace
      the model's selection by `synthetic_selection`, whose locality is
      gamma (random weights learn none). The model's selection is still
      computed, so the step costs what a real one does. The logits are then
      not the model's.
  """
  fetch: str = "auto"
  gather_programs: int = 528
  cache_blocks: Optional[int] = None
  synthetic_gamma: Optional[float] = None

  def __post_init__(self):
    if self.fetch not in FETCH_MODES:
      raise ValueError(f"OffloadOptions.fetch must be one of {FETCH_MODES}, "
                       f"got {self.fetch!r}")
    if self.gather_programs < 1:
      raise ValueError("OffloadOptions.gather_programs must be >= 1, got "
                       f"{self.gather_programs}")
    if self.synthetic_gamma is not None and not (
        0.0 <= self.synthetic_gamma < 1.0):
      raise ValueError("OffloadOptions.synthetic_gamma must be None or in "
                       f"[0, 1), got {self.synthetic_gamma}")
    if self.cache_blocks is not None and self.cache_blocks < 1:
      raise ValueError("OffloadOptions.cache_blocks must be None or >= 1, "
                       f"got {self.cache_blocks}")

  def resolved_fetch(self) -> str:
    """The fetch mode used: "auto" = "fused" on GPU, "loop" elsewhere."""
    if self.fetch == "auto":
      return "fused" if jax.default_backend() == "gpu" else "loop"
    return self.fetch


DEFAULT_OPTIONS = OffloadOptions()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OffloadLayer:
  """One layer's offloaded decode state; unused fields are None."""

  k_host: jax.Array      # [B, K, N, C, D] pinned_host
  v_host: jax.Array      # [B, K, N, C, D] pinned_host
  k_slot: jax.Array      # [B, K, P, C, D] device
  v_slot: jax.Array      # [B, K, P, C, D] device
  slot_map: jax.Array    # [B, K, P] int32, -1 = empty
  slot_last: jax.Array   # [B, K, P] int32, last position a slot was selected
  key_buf: Optional[jax.Array]   # [B, K, compress_kernel, D]
  bias_BKS: Optional[jax.Array]  # [B, K, S] fp32 (dma / nosa)
  kbar_BWKD: Optional[jax.Array]
  ebar_BKW: Optional[jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OffloadState:
  layers: tuple[OffloadLayer, ...]
  lengths_B: jax.Array  # int32; also the position of the next token


def num_slots(cfg: config_lib.ModelConfig, max_len: int,
              options: OffloadOptions = DEFAULT_OPTIONS) -> int:
  """P: device slots per (layer, sequence, KV head)."""
  n = decode.capacity(max_len, cfg.sparse.block_size) // cfg.sparse.block_size
  want = options.cache_blocks or cfg.sparse.topk_blocks
  if want < cfg.sparse.topk_blocks:
    raise ValueError(f"OffloadOptions.cache_blocks={want} is below "
                     f"topk_blocks={cfg.sparse.topk_blocks}; the cache must "
                     "hold a whole selection")
  return min(want, n)


def host_store_bytes(cfg: config_lib.ModelConfig, batch: int,
                     max_len: int) -> int:
  """Host KV store size: 2 (K, V) * L * B * K * S * D * itemsize, S = N*C."""
  s = decode.capacity(max_len, cfg.sparse.block_size)
  return (2 * cfg.num_layers * batch * cfg.num_kv_heads * s * cfg.head_dim
          * jnp.dtype(cfg.dtype).itemsize)


# XLA's GPU client caps its pinned host allocator (the `pinned_host` memory
# kind) at this many GB unless the variable says otherwise; an 8B-like store
# of 68.7 GB failed with RESOURCE_EXHAUSTED on the H100 (2026-11-24).
HOST_LIMIT_ENV = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"
_XLA_DEFAULT_HOST_LIMIT_GB = 64


def _physical_host_bytes(kind: str) -> Optional[int]:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf(kind)
  except (ValueError, OSError, AttributeError):
    return None


def allow_pinned_host_memory(need_bytes: Optional[int] = None,
                             fraction: float = 0.75) -> None:
  """Raises XLA's pinned-host cap for a host KV store of `need_bytes`.

  Sets `XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB` unless it is already set, to
  `need_bytes` plus max(8 GB, 10%) of headroom (transfer staging shares the
  pool), and never above `fraction` of the physical memory. Without
  `need_bytes`, to that fraction. The cap matters beyond the store's size:
  XLA's pinned allocator (a BFC allocator with growth) doubles each new
  region, up to the cap, so a 68.7 GB store under a 123 GB cap pinned
  ~123 GB of the H100 machine's 137 GB and the process died without a
  message (2026-11-24). Only takes effect when called before JAX creates
  its GPU client (the first computation or `jax.devices()`), so entry
  points call it first.
  """
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction={fraction!r} must be in (0, 1]")
  if need_bytes is not None and need_bytes < 0:
    raise ValueError(f"need_bytes={need_bytes!r} must be >= 0")
  total = _physical_host_bytes("SC_PHYS_PAGES")
  if total is None or HOST_LIMIT_ENV in os.environ:
    return
  limit = fraction * total
  if need_bytes is not None:
    limit = min(limit, need_bytes + max(8e9, 0.1 * need_bytes))
  # Never below XLA's own default: small stores keep the usual pool.
  limit = max(limit, _XLA_DEFAULT_HOST_LIMIT_GB * 1e9)
  os.environ[HOST_LIMIT_ENV] = str(math.ceil(limit / 1e9))


# Bytes of pinned_host stores this process has held at once. XLA's pinned
# pool keeps a region once allocated (free inside the pool, not in the OS's
# free memory), so a second 68.7 GB store after a first one was refused on
# the H100 (2026-11-24) while the pool had room for it.
_pinned_high_water = [0]


def _live_pinned_bytes() -> int:
  return sum(x.nbytes for x in jax.live_arrays()
             if getattr(x.sharding, "memory_kind", None) == "pinned_host")


def _available_host_bytes() -> Optional[int]:
  """Pinned host bytes a new store can take.

  Off the GPU: the free physical memory. On the GPU: the free room inside
  XLA's pinned pool (estimated as the high-water mark of this process's
  stores minus the live pinned arrays) plus what the pool may still grow
  by, min(free RAM, XLA's cap - the pool).
  """
  free = _physical_host_bytes("SC_AVPHYS_PAGES")
  if jax.default_backend() != "gpu":
    return free
  try:
    cap = int(float(os.environ.get(HOST_LIMIT_ENV,
                                   _XLA_DEFAULT_HOST_LIMIT_GB)) * 1e9)
  except ValueError:
    return free
  live = _live_pinned_bytes()
  pool = max(live, _pinned_high_water[0])
  grow = max(0, cap - pool)
  return (pool - live) + (grow if free is None else min(free, grow))


def check_host_capacity(cfg: config_lib.ModelConfig, batch: int,
                        max_len: int,
                        host_memory_limit: Optional[int] = None) -> int:
  """Raises ValueError if the host store does not fit; returns its bytes.

  host_memory_limit: bytes allowed (default: the free physical memory).
  """
  need = host_store_bytes(cfg, batch, max_len)
  limit = (host_memory_limit if host_memory_limit is not None
           else _available_host_bytes())
  if limit is not None and need > limit:
    s = decode.capacity(max_len, cfg.sparse.block_size)
    raise ValueError(
        f"the host KV store needs {need} bytes ({need / 2**30:.3f} GiB) = "
        f"2 (K,V) x {cfg.num_layers} layers x B={batch} x "
        f"K={cfg.num_kv_heads} x S={s} (max_len={max_len} in blocks of "
        f"{cfg.sparse.block_size}) x D={cfg.head_dim} x "
        f"{jnp.dtype(cfg.dtype).itemsize} B, but only {limit} bytes of "
        "pinned host memory are available (free RAM, and on the GPU "
        f"XLA's cap {HOST_LIMIT_ENV}, default "
        f"{_XLA_DEFAULT_HOST_LIMIT_GB} GB: see allow_pinned_host_memory)")
  if host_memory_limit is None and jax.default_backend() == "gpu":
    _pinned_high_water[0] = max(_pinned_high_water[0],
                                _live_pinned_bytes() + need)
  return need


def _check_variant(cfg: config_lib.ModelConfig):
  if cfg.sparse.window_blocks < 1:
    raise ValueError(
        "offload needs sparse.window_blocks >= 1 (a completed block stays "
        "in the forced window until `flush` writes it to the host), got "
        f"{cfg.sparse.window_blocks}")
  if cfg.sparse.variant not in VARIANTS:
    raise ValueError(
        f"offload supports variants {VARIANTS}, not {cfg.sparse.variant!r}: "
        "full attention has no selection to offload (use the GPU-resident "
        "engine: decode.py, --offload=none)")


# ------------------------------------------------------------------------------
# Prefill (§4.2): the layers of decode.prefill, each layer's K/V streamed to
# the host store as soon as the layer is done.
# ------------------------------------------------------------------------------


def _layer_state(lc: decode.LayerCache, lengths_B, sp: config_lib.SparseConfig,
                 p: int) -> OffloadLayer:
  """A layer's offloaded state from its prefill cache, K/V still on the
  device (k_host, v_host in the block-major layout [B, K, N, C, D])."""
  b, kv, s, d = lc.k_BKSD.shape
  c = sp.block_size
  n = s // c
  # The tail: the partial block of each prompt goes to slot 0 (§4.2).
  tail_B = lengths_B // c
  has_tail_B = lengths_B % c != 0
  b_ = jnp.arange(b)
  map_BKP = jnp.full((b, kv, p), -1, jnp.int32)
  map_BKP = map_BKP.at[:, :, 0].set(
      jnp.where(has_tail_B, tail_B, -1)[:, None])
  k_BKNCD = lc.k_BKSD.reshape(b, kv, n, c, d)
  v_BKNCD = lc.v_BKSD.reshape(b, kv, n, c, d)

  def slots(x_BKNCD):
    x_BKPCD = jnp.zeros((b, kv, p, c, d), x_BKNCD.dtype)
    tail_BKCD = x_BKNCD[b_, :, jnp.minimum(tail_B, n - 1)]
    return x_BKPCD.at[:, :, 0].set(tail_BKCD)  # zeros past the length

  key_buf = None
  if lc.kbar_BWKD is not None:  # keys at lengths - kern .. lengths - 1
    kern = sp.compress_kernel
    padded = jnp.pad(lc.k_BKSD, ((0, 0), (0, 0), (kern, 0), (0, 0)))
    key_buf = jax.vmap(lambda x, i: jax.lax.dynamic_slice_in_dim(
        x, i, kern, axis=1))(padded, lengths_B)
  return OffloadLayer(
      k_host=k_BKNCD, v_host=v_BKNCD, k_slot=slots(k_BKNCD),
      v_slot=slots(v_BKNCD), slot_map=map_BKP,
      slot_last=jnp.where(map_BKP >= 0, lengths_B[:, None, None] - 1,
                          -1).astype(jnp.int32),
      key_buf=key_buf, bias_BKS=lc.bias_BKS, kbar_BWKD=lc.kbar_BWKD,
      ebar_BKW=lc.ebar_BKW)


_HOST_FIELDS = ("k_host", "v_host")


def _place(layer: OffloadLayer, into: Optional[OffloadLayer],
           row0) -> OffloadLayer:
  """Sends k_host / v_host to pinned_host memory (inside the jit: an async
  device -> host copy); with `into`, writes every field into rows
  row0 : row0 + B of `into` instead (donated, so the store is written in
  place)."""
  out = {}
  for f in dataclasses.fields(OffloadLayer):
    x = getattr(layer, f.name)
    if x is not None and f.name in _HOST_FIELDS:
      x = jax.device_put(x, _HOST)
    if x is not None and into is not None:
      x = jax.lax.dynamic_update_slice_in_dim(getattr(into, f.name), x, row0,
                                              axis=0)
    out[f.name] = x
  return OffloadLayer(**out)


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "options"),
                   donate_argnames=("into",))
def _prefill(params, cfg, tokens_BT, lengths_B, max_len,
             options=DEFAULT_OPTIONS, into=None, row0=0):
  """`prefill` of one group of sequences (rows row0: of `into`, if given)."""
  s = decode.prefill_capacity(cfg, tokens_BT.shape[1], max_len)
  p = num_slots(cfg, max_len, options)
  lengths_B = lengths_B.astype(jnp.int32)
  x_BTM = decode.embed(params, cfg, tokens_BT)
  out = []
  for i in range(cfg.num_layers):
    x_BTM, lc = decode.prefill_layer(params["blocks"][i], cfg, x_BTM,
                                     lengths_B, s)
    out.append(_place(_layer_state(lc, lengths_B, cfg.sparse, p),
                      None if into is None else into.layers[i], row0))
    if i:
      # Layer i-1's copy to the host may overlap layer i but must be done
      # before layer i+1 starts: at most two layers' K/V are on the device
      # at once, whatever order XLA's scheduler picks.
      prev = out[i - 1]
      x_BTM, k_host, v_host = jax.lax.optimization_barrier(
          (x_BTM, prev.k_host, prev.v_host))
      out[i - 1] = dataclasses.replace(prev, k_host=k_host, v_host=v_host)
  logits_BV = decode.prefill_logits(params, cfg, x_BTM, lengths_B)
  if into is not None:
    lengths_B = jax.lax.dynamic_update_slice_in_dim(into.lengths_B,
                                                    lengths_B, row0, axis=0)
  return OffloadState(layers=tuple(out), lengths_B=lengths_B), logits_BV


def _empty_state(params, cfg: config_lib.ModelConfig, batch: int, t: int,
                 max_len: int, options: OffloadOptions) -> OffloadState:
  """`_prefill`'s state for `batch` prompts of width `t`, zeros, every slot
  empty; the host store is allocated one layer at a time (the device never
  holds the whole store)."""
  shapes, _ = jax.eval_shape(
      lambda p_, t_, l_: _prefill(p_, cfg, t_, l_, max_len, options), params,
      jax.ShapeDtypeStruct((batch, t), jnp.int32),
      jax.ShapeDtypeStruct((batch,), jnp.int32))
  lay = shapes.layers[0]
  # device_put inside the jit: the result's type carries the host memory
  # space (out_shardings alone give a pinned_host array typed as device
  # memory, which the step then rejects).
  zeros_host = jax.jit(lambda: jax.device_put(
      jnp.zeros(lay.k_host.shape, lay.k_host.dtype), _HOST))

  @jax.jit
  def device_fields():
    out = {}
    for f in dataclasses.fields(OffloadLayer):
      x = getattr(lay, f.name)
      if f.name not in _HOST_FIELDS and x is not None:
        fill = -1 if f.name in ("slot_map", "slot_last") else 0
        out[f.name] = jnp.full(x.shape, fill, x.dtype)
    return out

  # Committed to the device like prefill's output (decode.synthetic_cache).
  # Fields the variant lacks (infllmv2: no bias, no ebar) stay None.
  absent = {f.name: None for f in dataclasses.fields(OffloadLayer)
            if getattr(lay, f.name) is None}
  layers_ = tuple(
      OffloadLayer(k_host=zeros_host(), v_host=zeros_host(), **absent,
                   **jax.device_put(device_fields(), jax.devices()[0]))
      for _ in shapes.layers)
  return OffloadState(layers=layers_, lengths_B=jax.device_put(
      np.zeros((batch,), np.int32), jax.devices()[0]))


def _check_prefill_batch(prefill_batch: Optional[int]):
  if prefill_batch is not None and (not isinstance(prefill_batch, int)
                                    or prefill_batch < 1):
    raise ValueError("prefill_batch must be None or an int >= 1, got "
                     f"{prefill_batch!r}")


def _groups(batch: int, prefill_batch: Optional[int]) -> list[tuple[int, int]]:
  step = min(prefill_batch or batch, batch)
  return [(b0, min(b0 + step, batch)) for b0 in range(0, batch, step)]


def _prefill_runner(params, cfg: config_lib.ModelConfig, tokens_BT,
                    lengths_B, max_len: int, options: OffloadOptions,
                    prefill_batch: Optional[int], *, aot: bool = False):
  """A function of no arguments that runs the prefill, group by group.

  With aot, its executables (one per group size) are compiled here, and
  the store of a grouped prefill is allocated here, so the function's
  run time is the prefill's alone (`generate`'s prefill_s); it can then
  run only once (the store is donated).
  """
  _check_prefill_batch(prefill_batch)
  groups = _groups(tokens_BT.shape[0], prefill_batch)
  if len(groups) == 1:
    if not aot:
      return lambda: _prefill(params, cfg, tokens_BT, lengths_B, max_len,
                              options)
    run = _prefill.lower(params, cfg, tokens_BT, lengths_B, max_len,
                         options).compile()
    return lambda: run(params, tokens_BT, lengths_B)
  state0 = _empty_state(params, cfg, tokens_BT.shape[0], tokens_BT.shape[1],
                        max_len, options) if aot else None
  compiled = {}

  def call(b0, b1, state):
    tok, lens, row0 = tokens_BT[b0:b1], lengths_B[b0:b1], jnp.int32(b0)
    if aot:
      return compiled[b1 - b0](params, tok, lens, into=state, row0=row0)
    return _prefill(params, cfg, tok, lens, max_len, options, into=state,
                    row0=row0)

  if aot:
    for b0, b1 in groups[:1] + groups[-1:]:
      if b1 - b0 not in compiled:
        compiled[b1 - b0] = _prefill.lower(
            params, cfg, tokens_BT[b0:b1], lengths_B[b0:b1], max_len,
            options, into=state0, row0=jnp.int32(b0)).compile()

  def run():
    state = state0 if aot else _empty_state(
        params, cfg, tokens_BT.shape[0], tokens_BT.shape[1], max_len,
        options)
    logits = []
    for b0, b1 in groups:
      state, logits_bV = call(b0, b1, state)
      logits.append(logits_bV)
    return state, jnp.concatenate(logits)

  return run


def prefill(params: Any, cfg: config_lib.ModelConfig, tokens_BT: jax.Array,
            lengths_B: jax.Array, max_len: int, *,
            host_memory_limit: Optional[int] = None,
            options: OffloadOptions = DEFAULT_OPTIONS,
            prefill_batch: Optional[int] = None
            ) -> tuple[OffloadState, jax.Array]:
  """Runs the prompts and builds the offloaded state.

  decode.prefill's layers (`decode.prefill_layer`, so the same numbers),
  in one jit per group of sequences. Each layer's K/V go to the
  pinned_host store as soon as the layer is done (an async copy that may
  overlap the next layer and must finish before the one after), so the
  device holds at most two layers' K/V of a group, plus that group's
  activations and the selection state kept on the device (bias, kbar,
  ebar, key buffer, slots). The partial tail block of each prompt is put in
  slot 0 of every (layer, KV head); the other slots start empty, so the
  first step fetches every selected non-tail block (cold start, §4.2).

  Args as `decode.prefill`, plus:
    host_memory_limit: bytes for the capacity check (default: free
      physical memory).
    options: the engine options (the cache size; pass the same options to
      `decode_step`).
    prefill_batch: sequences per prefill pass (None: all). Groups of this
      many rows are prefilled one after another into rows b0:b1 of one
      host store (a second compile for a smaller last group), so that the
      activations of long prompts fit: they scale with the group, not the
      batch. The result does not depend on it.

  Raises:
    ValueError: `full` variant, a bad prefill_batch, or the host store
      does not fit.
  """
  _check_variant(cfg)
  check_host_capacity(cfg, tokens_BT.shape[0], max_len, host_memory_limit)
  return _prefill_runner(params, cfg, tokens_BT, jnp.asarray(lengths_B),
                         max_len, options, prefill_batch)()


def synthetic_state(params: Any, cfg: config_lib.ModelConfig, batch: int,
                    context_len: int, max_len: int,
                    options: OffloadOptions = DEFAULT_OPTIONS
                    ) -> OffloadState:
  """An offloaded state as if `context_len` tokens of zeros had been
  prefilled, with every slot empty (the first step is a cold start).

  For decode benchmarks (prefill excluded; values do not change the bytes
  moved): the host store is allocated in pinned_host memory directly,
  one layer at a time, without the device ever holding the whole cache.
  """
  _check_variant(cfg)
  check_host_capacity(cfg, batch, max_len)
  if (options.synthetic_gamma is not None
      and context_len < synthetic_min_length(cfg.sparse)):
    raise ValueError(
        f"context_len={context_len} is too short for synthetic_gamma: "
        f"synthetic_selection needs >= {synthetic_min_length(cfg.sparse)} "
        "tokens")
  state = _empty_state(params, cfg, batch, context_len, max_len, options)
  return dataclasses.replace(state, lengths_B=jax.device_put(
      np.full((batch,), context_len, np.int32), jax.devices()[0]))


# ------------------------------------------------------------------------------
# Decode step.
# ------------------------------------------------------------------------------


def _update_selection_state(layer: OffloadLayer, k_BKD, bias_BK, pos_B,
                            sp: config_lib.SparseConfig) -> OffloadLayer:
  """decode._append for the device-resident selection state.

  The window mean reads the last compress_kernel keys from key_buf (in
  chronological order, so the sum is decode.py's bit for bit) instead of
  the K cache, which is on the host.
  """
  b = pos_B.shape[0]
  b_B = jnp.arange(b)
  kern, stride = sp.compress_kernel, sp.compress_stride
  bias = layer.bias_BKS
  if bias is not None:
    bias = bias.at[b_B, :, pos_B].set(bias_BK)
  key_buf = layer.key_buf
  if key_buf is not None:
    key_buf = jnp.concatenate([key_buf[:, :, 1:], k_BKD[:, :, None]], axis=2)
  kbar, ebar = layer.kbar_BWKD, layer.ebar_BKW
  n_win = (kbar.shape[1] if kbar is not None
           else ebar.shape[2] if ebar is not None else 0)
  if n_win:
    first_B = pos_B + 1 - kern
    done_B = (first_B >= 0) & (first_B % stride == 0)
    c_B = jnp.clip(first_B // stride, 0, n_win - 1)
    if kbar is not None:
      win_BTKD = jnp.moveaxis(key_buf, 2, 1)
      new_BKD = selection.compress_keys(win_BTKD, kern, stride)[:, 0]
      new_BKD = jnp.where(done_B[:, None, None], new_BKD, kbar[b_B, c_B])
      kbar = kbar.at[b_B, c_B].set(new_BKD)
    if ebar is not None:
      start_B = jnp.clip(first_B, 0, bias.shape[2] - kern)
      win_BKT = jax.vmap(lambda x, i: jax.lax.dynamic_slice_in_dim(
          x, i, kern, axis=1))(bias, start_B)
      new_BK = selection.window_means(jnp.moveaxis(win_BKT, 2, 1), kern,
                                      stride)[:, 0]
      new_BK = jnp.where(done_B[:, None], new_BK, ebar[b_B, :, c_B])
      ebar = ebar.at[b_B, :, c_B].set(new_BK)
  return dataclasses.replace(layer, key_buf=key_buf, bias_BKS=bias,
                             kbar_BWKD=kbar, ebar_BKW=ebar)


def diff_slots(slot_map_BKP: jax.Array, idx_BKP: jax.Array,
               own_B: jax.Array, keep_BKP: Optional[jax.Array] = None):
  """The block-table diff of §4.4, per (b, k).

  Args:
    slot_map_BKP: block id held by each slot (-1 empty); P slots.
    idx_BKP: the selection [B, K, P_sel], ascending, -1 (invalid) last;
      P_sel <= P.
    own_B: the query's own block (always selected; never fetched: it is
      either resident or new).
    keep_BKP: how much each slot's block is worth keeping (fp32); a miss
      takes the free slot (not holding a selected block) with the lowest
      value, empty slots first. None: free slots in ascending slot order.

  Returns:
    (new_map_BKP, load_BKP, fetch_BKP): the new slot map; the block loaded
    into each slot (-1 = none, includes a new own block); fetch = load from
    the host store (load minus the own block).
  """
  p_sel = idx_BKP.shape[-1]
  valid_BKP = idx_BKP >= 0
  in_sel_BKP = jnp.any((slot_map_BKP[..., :, None] == idx_BKP[..., None, :])
                       & valid_BKP[..., None, :], axis=-1) & (slot_map_BKP
                                                              >= 0)
  hit_BKP = jnp.any(idx_BKP[..., :, None] == slot_map_BKP[..., None, :],
                    axis=-1)
  miss_BKP = valid_BKP & ~hit_BKP
  n_miss_BK = jnp.sum(miss_BKP, axis=-1)
  big = jnp.iinfo(jnp.int32).max
  miss_ids_BKP = jnp.sort(jnp.where(miss_BKP, idx_BKP, big), axis=-1)
  free_BKP = ~in_sel_BKP
  if keep_BKP is None:
    rank_BKP = jnp.cumsum(free_BKP, axis=-1) - 1
  else:  # rank of each free slot by (non-empty, keep value, slot)
    key_BKP = jnp.where(slot_map_BKP < 0, -jnp.inf,
                        keep_BKP.astype(_F32))
    key_BKP = jnp.where(free_BKP, key_BKP, jnp.inf)
    order_BKP = jnp.argsort(key_BKP, axis=-1, stable=True)
    rank_BKP = jnp.argsort(order_BKP, axis=-1)
  assign_BKP = free_BKP & (rank_BKP < n_miss_BK[..., None])
  load_BKP = jnp.where(
      assign_BKP,
      jnp.take_along_axis(miss_ids_BKP, jnp.clip(rank_BKP, 0, p_sel - 1),
                          axis=-1), -1).astype(jnp.int32)
  new_map_BKP = jnp.where(assign_BKP, load_BKP, slot_map_BKP)
  fetch_BKP = assign_BKP & (load_BKP != own_B[:, None, None])
  return new_map_BKP, load_BKP, fetch_BKP


def _compact(todo_F, *rows_F):
  """(count, rows...) with the entries to copy first, in their order."""
  order = jnp.argsort(~todo_F, stable=True)
  return (jnp.sum(todo_F).astype(jnp.int32),
          *(r[order].astype(jnp.int32) for r in rows_F))


def _loop_copy(src, dst, src_row_F, dst_row_F, count, memory_kind):
  """XLA tile copies: tile src_row_F[i] of src -> tile dst_row_F[i] of dst.

  Rows index the flattened (B, K, n) block axes of [B, K, n, C, D] arrays;
  K and V are copied together. Each copy is a dynamic_slice, a device_put to
  `memory_kind` and a dynamic_update_slice on the 5-D arrays (the
  pinned_host store is indexed in place, never reshaped: XLA rejects gathers
  on it). `count`: a Python int gives a static loop; a traced one a loop of
  data-dependent trip count (on the GPU each iteration then syncs the host
  on its predicate: keep those out of the GPU step).
  """
  tile = (1, 1, 1) + src[0].shape[3:]
  zero = jnp.zeros((), jnp.int32)

  def index(x, row):
    k, n = x.shape[1], x.shape[2]
    return (row // (k * n), (row // n) % k, row % n, zero, zero)

  def body(i, carry):
    return tuple(
        jax.lax.dynamic_update_slice(
            d_arr, jax.device_put(jax.lax.dynamic_slice(
                s_arr, index(s_arr, src_row_F[i]), tile), memory_kind),
            index(d_arr, dst_row_F[i]))
        for s_arr, d_arr in zip(src, carry, strict=True))

  return jax.lax.fori_loop(0, count, body, tuple(dst))


def _tiles(x):
  return x.reshape((-1,) + x.shape[3:])


def _pallas_copy(src, dst, count, src_row_F, dst_row_F,
                 options: OffloadOptions):
  """`_loop_copy` (device destination) with the zero-copy Pallas kernel."""
  shape = dst[0].shape
  out = pallas_kernels.gather_blocks(
      tuple(_tiles(x) for x in src), tuple(_tiles(x) for x in dst),
      src_row_F, dst_row_F, count, programs=options.gather_programs,
      interpret=jax.default_backend() != "gpu")
  return tuple(x.reshape(shape) for x in out)


def _fetch(k_host, v_host, k_slot, v_slot, load_BKP, fetch_BKP,
           options: OffloadOptions):
  """Copies the missing blocks host -> device slots, one tile each."""
  b, kv, p, _, _ = k_slot.shape
  n = k_host.shape[2]
  f = jnp.arange(b * kv * p)
  src_row = (f // p) * n + jnp.maximum(load_BKP.reshape(-1), 0)
  count, src_row, dst_row = _compact(fetch_BKP.reshape(-1), src_row, f)
  copy = (functools.partial(_pallas_copy, options=options)
          if options.resolved_fetch() == "pallas" else
          functools.partial(_loop_copy, memory_kind=_DEVICE))
  return copy((k_host, v_host), (k_slot, v_slot), src_row_F=src_row,
              dst_row_F=dst_row, count=count)


def _write_back(layer: OffloadLayer, lengths_B, c: int) -> OffloadLayer:
  """Copies each sequence's last completed block from its slot to the host.

  Block j = lengths // C - 1 of every (b, k) (for a sequence without a
  completed block, its partial own block, which the host never reads
  before it is complete and written again). A static loop of B * K tile
  copies: no data-dependent control flow.
  """
  b, kv, p = layer.slot_map.shape
  n = layer.k_host.shape[2]
  own_B = (lengths_B // c).astype(jnp.int32)
  block_B = jnp.where(own_B > 0, own_B - 1, 0)
  slot_BK = jnp.argmax(layer.slot_map == block_B[:, None, None],
                       axis=-1).astype(jnp.int32)
  bk = jnp.arange(b * kv, dtype=jnp.int32)
  k_host, v_host = _loop_copy(
      (layer.k_slot, layer.v_slot), (layer.k_host, layer.v_host),
      bk * p + slot_BK.reshape(-1), bk * n + jnp.repeat(block_B, kv),
      b * kv, _HOST)
  return dataclasses.replace(layer, k_host=k_host, v_host=v_host)


@functools.partial(jax.jit, static_argnames=("cfg",),
                   donate_argnames=("state",))
def flush(cfg: config_lib.ModelConfig, state: OffloadState) -> OffloadState:
  """Writes the blocks completed during the last C steps to the host store.

  A block completed during decode stays in its slot (it is in the forced
  window for window_blocks * C >= C steps, so it is not evicted and never
  fetched meanwhile); `flush` copies it to the host. Call it at least once
  every C = block_size decode steps, and before reading the host store;
  `generate` does. Each sequence completes exactly one block per C steps,
  so a flush every C steps writes each completed block once. Taking the
  write-back out of the step keeps the step free of data-dependent loops.
  """
  c = cfg.sparse.block_size
  return dataclasses.replace(state, layers=tuple(
      _write_back(layer, state.lengths_B, c) for layer in state.layers))


def synthetic_selection(pos_B: jax.Array, kv: int, n: int,
                        sp: config_lib.SparseConfig, gamma: float,
                        salt: int = 0) -> jax.Array:
  """A selection of topk_blocks blocks whose step-to-step locality is gamma.

  For benchmarks only. The forced blocks (sinks, window, own block) are
  selected as the model does; the other F = topk - sink - window - 1 picks
  are lanes: lane j holds block sink + j + F * ((h_j + e) mod M) in epoch
  e, with M = floor(A / F) and A the blocks before the window, so lanes
  never collide and consecutive epochs differ. Lane j's epoch at position
  t is floor((t + j * period / F) / period) with period = F / m and
  m = (1 - gamma) * topk: on average m lanes change per step, staggered,
  so (1 - gamma) of the selection is new at each step. Deterministic and
  stateless: h_j mixes j, the KV head, the sequence and `salt` (the
  layer). Changes of M (every F blocks of growth) and the window's growth
  add rare extra misses.

  Returns:
    idx_BKP int32 [B, K, topk], ascending; requires A >= 2F for every
    sequence (checked by the caller: `synthetic_min_length`).
  """
  p = sp.topk_blocks
  f = p - sp.sink_blocks - sp.window_blocks - 1
  c = sp.block_size
  own_B = (pos_B // c).astype(jnp.int32)
  avail_B = jnp.clip(own_B - sp.window_blocks - sp.sink_blocks, 0, n)
  m_B = jnp.maximum(avail_B // max(f, 1), 1)
  misses = max((1.0 - gamma) * p, 1e-6)
  period = f / misses
  j_1F = jnp.arange(f)[None, :]
  e_BF = jnp.floor((pos_B[:, None] + j_1F * (period / f)) / period).astype(
      jnp.int32)
  k_1K1 = jnp.arange(kv)[None, :, None]
  b_B11 = jnp.arange(pos_B.shape[0])[:, None, None]
  h_BKF = (j_1F[None] * 40503 + k_1K1 * 2654435 + b_B11 * 97
           + salt * 7919) % 1000003
  lane_BKF = (sp.sink_blocks + j_1F[None] + f * (
      (h_BKF + e_BF[:, None, :]) % m_B[:, None, None]))
  forced_BX = jnp.concatenate([
      jnp.broadcast_to(jnp.arange(sp.sink_blocks)[None, :],
                       (pos_B.shape[0], sp.sink_blocks)),
      own_B[:, None] - jnp.arange(sp.window_blocks, -1, -1)[None, :]], axis=1)
  forced_BKX = jnp.broadcast_to(forced_BX[:, None],
                                (pos_B.shape[0], kv, forced_BX.shape[1]))
  return jnp.sort(jnp.concatenate([forced_BKX, lane_BKF], -1),
                  axis=-1).astype(jnp.int32)


def synthetic_min_length(sp: config_lib.SparseConfig) -> int:
  """Shortest context `synthetic_selection` supports (A >= 2F blocks)."""
  f = sp.topk_blocks - sp.sink_blocks - sp.window_blocks - 1
  return (2 * f + sp.window_blocks + sp.sink_blocks + 1) * sp.block_size


def _keep_values(layer: OffloadLayer, se_BKN: Optional[jax.Array]):
  """[B, K, P] worth of keeping each slot's block (see OffloadOptions).

  se_BKN: the block eviction scores this step's selection ranked by.
  """
  if se_BKN is None:  # infllmv2: least recently selected goes first
    return layer.slot_last.astype(_F32)
  return jnp.take_along_axis(se_BKN, jnp.maximum(layer.slot_map, 0), axis=-1)


def _attend(q_BHD, k_BKD, v_BKD, layer: OffloadLayer, pos_B,
            sp: config_lib.SparseConfig, options: OffloadOptions,
            salt: int = 0):
  """Steps 2-6 of one layer; returns (layer, out_BHD, selected, fetched)."""
  b, kv, p, c, d = layer.k_slot.shape
  n = layer.k_host.shape[2]
  # Selection: decode.py's function; it reads only the K cache's shape.
  shim = decode.LayerCache(
      k_BKSD=jax.ShapeDtypeStruct((b, kv, n * c, d), layer.k_slot.dtype),
      v_BKSD=None, bias_BKS=layer.bias_BKS, kbar_BWKD=layer.kbar_BWKD,
      ebar_BKW=layer.ebar_BKW)
  idx_BKP, se_BKN = decode.select_decode_blocks(
      q_BHD, shim, pos_B, sp, return_eviction_scores=True)
  if idx_BKP.shape[-1] > p:
    raise AssertionError(f"selection width {idx_BKP.shape} > P={p}")
  if options.synthetic_gamma is not None:
    synth_BKP = synthetic_selection(pos_B, kv, n, sp, options.synthetic_gamma,
                                    salt)
    # Keeps the model's selection alive (XLA cannot prove the condition),
    # so the step still pays for scoring.
    idx_BKP = jnp.where(jnp.min(idx_BKP) >= -1, synth_BKP, idx_BKP)
  own_B = (pos_B // c).astype(jnp.int32)
  keep_BKP = (_keep_values(layer, se_BKN)
              if p > idx_BKP.shape[-1] else None)
  new_map, load_BKP, fetch_BKP = diff_slots(layer.slot_map, idx_BKP, own_B,
                                            keep_BKP)
  fused = options.resolved_fetch() == "fused"
  k_slot, v_slot = layer.k_slot, layer.v_slot
  if not fused:
    k_slot, v_slot = _fetch(layer.k_host, layer.v_host, k_slot, v_slot,
                            load_BKP, fetch_BKP, options)
  # The token goes into its own block's slot at row pos % C.
  own_slot_BK = jnp.argmax(new_map == own_B[:, None, None],
                           axis=-1).astype(jnp.int32)
  b_ = jnp.arange(b)[:, None]
  k_ = jnp.arange(kv)[None, :]
  row_B1 = (pos_B % c)[:, None]
  k_slot = k_slot.at[b_, k_, own_slot_BK, row_B1].set(k_BKD)
  v_slot = v_slot.at[b_, k_, own_slot_BK, row_B1].set(v_BKD)
  # Attention over the slots holding a selected block.
  valid_BKP = idx_BKP >= 0
  sel_slot_BKP = jnp.any(
      (new_map[..., :, None] == idx_BKP[..., None, :])
      & valid_BKP[..., None, :], axis=-1) & (new_map >= 0)
  j_BKP = jnp.where(sel_slot_BKP, new_map, 0)
  slot_len_BKP = jnp.where(
      sel_slot_BKP, jnp.clip(pos_B[:, None, None] + 1 - c * j_BKP, 0, c), 0)
  bias = None
  if sp.variant in ("dma", "nosa"):
    bias_BKNC = layer.bias_BKS.reshape(b, kv, n, c)
    bias = bias_BKNC[b_[..., None], k_[..., None], j_BKP].reshape(b, kv,
                                                                  p * c)
  slot_len_BKP = slot_len_BKP.astype(jnp.int32)
  if fused:  # the kernel fetches the missing blocks as it attends
    out_BHD, k_slot, v_slot = pallas_kernels.sparse_decode_fetch(
        q_BHD, k_slot, v_slot, bias, slot_len_BKP, layer.k_host,
        layer.v_host, jnp.where(fetch_BKP, load_BKP, -1).astype(jnp.int32),
        interpret=jax.default_backend() != "gpu")
  else:
    out_BHD = sparse_attention.decode_attention(
        q_BHD, k_slot.reshape(b, kv, p * c, d),
        v_slot.reshape(b, kv, p * c, d), bias, slot_len_BKP, c,
        sp.implementation)
  slot_last = jnp.where(sel_slot_BKP, pos_B[:, None, None], layer.slot_last)
  layer = dataclasses.replace(layer, k_slot=k_slot, v_slot=v_slot,
                              slot_map=new_map,
                              slot_last=slot_last.astype(jnp.int32))
  return (layer, out_BHD, jnp.sum(valid_BKP, -1).astype(jnp.int32),
          jnp.sum(fetch_BKP, -1).astype(jnp.int32))


def _decode_step(params, cfg: config_lib.ModelConfig, state: OffloadState,
                 tokens_B, options: OffloadOptions):
  sp = cfg.sparse
  pos_B = state.lengths_B
  x_B1M = decode.embed(params, cfg, tokens_B[:, None])
  new_layers, selected, fetched = [], [], []
  for i in range(cfg.num_layers):
    p_block = params["blocks"][i]
    h_B1M = layers.rms_norm(x_B1M, p_block["attn_norm"]["scale"][...],
                            cfg.rms_eps)
    q_B1HD, k_B1KD, v_B1KD, bias_B1K = decode.qkv_bias(
        p_block["attn"], cfg, h_B1M, pos_B[:, None])
    layer = _update_selection_state(
        state.layers[i], k_B1KD[:, 0],
        None if bias_B1K is None else bias_B1K[:, 0], pos_B, sp)
    layer, out_BHD, sel_BK, fet_BK = _attend(
        q_B1HD[:, 0], k_B1KD[:, 0], v_B1KD[:, 0], layer, pos_B, sp, options,
        salt=i)
    new_layers.append(layer)
    selected.append(sel_BK)
    fetched.append(fet_BK)
    x_B1M = x_B1M + jnp.einsum("BHD,HDM->BM", out_BHD, decode.cast_weight(
        p_block["attn"]["wo"], x_B1M.dtype))[:, None]
    x_B1M = decode.mlp_residual(p_block, cfg, x_B1M)
  state = OffloadState(layers=tuple(new_layers), lengths_B=pos_B + 1)
  stats = {"selected": jnp.stack(selected), "fetched": jnp.stack(fetched)}
  return state, decode.logits(params, cfg, x_B1M[:, 0]), stats


@functools.partial(jax.jit, static_argnames=("cfg", "options"),
                   donate_argnames=("state",))
def decode_step(params: Any, cfg: config_lib.ModelConfig,
                state: OffloadState, tokens_B: jax.Array,
                options: OffloadOptions = DEFAULT_OPTIONS):
  """Appends one token per sequence and returns the next-token logits.

  Args:
    params: model parameters.
    cfg: the model config (static).
    state: from `prefill` or a previous step (donated, so the host store
      is updated in place: do not reuse it).
    tokens_B: the token at position state.lengths_B of each sequence.
    options: the engine options `prefill` was given.

  Returns:
    (state, logits_BV, stats): logits in fp32; stats["selected"] and
    stats["fetched"] int32 [L, B, K], the selected blocks and the blocks
    copied from the host at this step.
  """
  return _decode_step(params, cfg, state, tokens_B, options)


# ------------------------------------------------------------------------------
# generate: decode.generate with the offloaded state.
# ------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("cfg", "options"),
                   donate_argnames=("state",))
def _generate_step(params, state, gen, temperature, top_p, eos_id, pad_id,
                   *, cfg, options):
  live_B = ~gen["done_B"]
  state, logits_BV, stats = _decode_step(params, cfg, state, gen["tok_B"],
                                         options)
  gen = decode.next_token(gen, logits_BV, temperature, top_p, eos_id,
                           pad_id)
  live = live_B[None, :, None]
  gen["selected_L"] = gen["selected_L"] + jnp.sum(
      jnp.where(live, stats["selected"], 0), axis=(1, 2))
  gen["fetched_L"] = gen["fetched_L"] + jnp.sum(
      jnp.where(live, stats["fetched"], 0), axis=(1, 2))
  return state, gen


def generate(params: Any, cfg: config_lib.ModelConfig,
             prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_p: float = 1.0,
             eos_id: Optional[int] = None, pad_id: Optional[int] = None,
             seed: int = 0, max_len: Optional[int] = None,
             return_stats: bool = False,
             host_memory_limit: Optional[int] = None,
             options: OffloadOptions = DEFAULT_OPTIONS,
             prefill_batch: Optional[int] = None):
  """`decode.generate` with K/V offloaded; same arguments and tokens.

  host_memory_limit, options and prefill_batch are `prefill`'s. With
  return_stats, stats has prefill_s (compilation and, with prefill_batch,
  the allocation of the store excluded), decode_s, decode_steps,
  decode_tokens_per_s, and per layer selected_blocks, fetched_blocks and
  hit_rate = 1 - fetched / selected over all steps (cold start included)
  and unfinished sequences, summed over KV heads.
  """
  _check_variant(cfg)
  params = decode.serving_params(params, cfg)  # cast once, not every step
  tokens, lengths, s, pad_id, eos = decode.prepare_prompts(
      prompts, max_new_tokens, cfg.sparse.block_size, max_len=max_len,
      eos_id=eos_id, pad_id=pad_id)
  check_host_capacity(cfg, len(prompts), s, host_memory_limit)
  temp, top_p = jnp.float32(temperature), jnp.float32(top_p)

  run_prefill = _prefill_runner(params, cfg, tokens, lengths, s, options,
                               prefill_batch, aot=True)
  t0 = time.perf_counter()
  state, logits_BV = jax.block_until_ready(run_prefill())
  prefill_s = time.perf_counter() - t0
  gen = {"key": jax.random.key(seed),
         "done_B": jnp.zeros(len(prompts), bool),
         "selected_L": jnp.zeros(cfg.num_layers, jnp.int32),
         "fetched_L": jnp.zeros(cfg.num_layers, jnp.int32)}
  gen = decode.next_token_jit(gen, logits_BV, temp, top_p, eos, pad_id)
  out = [gen["tok_B"]]
  step = _generate_step.lower(params, state, gen, temp, top_p, eos, pad_id,
                              cfg=cfg, options=options).compile()
  t0 = time.perf_counter()
  steps = 0
  c = cfg.sparse.block_size
  for steps in range(1, max_new_tokens):
    state, gen = step(params, state, gen, temp, top_p, eos, pad_id)
    out.append(gen["tok_B"])
    if steps % c == 0:
      state = flush(cfg, state)
    if steps % 16 == 0 and bool(jnp.all(gen["done_B"])):
      break
  jax.block_until_ready((state, gen))
  decode_s = time.perf_counter() - t0

  results = decode.trim_at_eos(out, eos)
  if not return_stats:
    return results
  sel = np.asarray(gen["selected_L"])
  fet = np.asarray(gen["fetched_L"])
  stats = {
      "prefill_s": prefill_s, "decode_s": decode_s, "decode_steps": steps,
      "decode_tokens_per_s": (len(prompts) * steps / decode_s
                              if steps else 0.0),
      "selected_blocks": sel.tolist(), "fetched_blocks": fet.tolist(),
      "hit_rate": (1.0 - fet / np.maximum(sel, 1)).tolist(),
  }
  return results, stats
