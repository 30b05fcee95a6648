"""KV stores: where decode keeps K/V (NOSA_SPEC.md §4.1-§4.5, decisions 6-7).

The engine (`engine.py`) owns the selection state and the layer math; a
store owns only K/V. It is a frozen (hashable) dataclass, carried as static
metadata of `engine.DecodeState`, so the jitted step is compiled per store.
The engine calls it; it never calls back into the engine:

  check(cfg, batch, max_len, host_memory_limit)   can it hold the batch?
  prefill(k_BKSD, v_BKSD, lengths_B, sp) -> kv     one layer after the prompt
                                                   (K/V at capacity S, padded
                                                   rows zero; inside the jit)
  empty(kv_shapes) -> kv                           zeros of prefill's type
  append(kv, k_BKD, v_BKD, pos_B) -> kv            takes the token at pos_B
  window_keys(kv, pos_B, r) -> keys_BKRD           the keys at pos_B - r + 1
                                                   .. pos_B (the compressed
                                                   window the token closes)
  attend(kv, q_BHD, k_BKD, v_BKD, bias_BKS, idx_BKP, se_BKN, pos_B, sp)
      -> (kv, out_BHD, fetched_BK)                 attends over the selected
                                                   blocks, says what moved
  write_back(kv, lengths_B, sp) -> kv              (when `writes_back`)
  read_all(kv) -> (k_BKSD, v_BKSD)                 every cached K/V row on the
                                                   device (chunked prefill)
  prefetch(kv, guess_BKQ, pos_B, sp) -> (kv, loaded_BKP)
                                                   loads guessed blocks ahead
                                                   of the attend that needs
                                                   them (host store only)

`DeviceStore`: the whole cache in device memory, slot-major [B, K, S, D]
(block n of (b, k) is rows [nC, nC + C): already block-major). The decode
kernel reads the selected blocks in place through a block table.

`HostStore`: K/V in `pinned_host` memory, block-major [B, K, N, C, D], and a
device block cache of P slots per (layer, sequence, KV head):

  slot_map   [B, K, P] block held by each slot (-1 empty); a slot keeps its
             block until another is loaded into it.
  slot_last  [B, K, P] last position the slot was selected (LRU retention).
  keys_BKRD  the last R = compress_kernel keys, chronological (NOSI's
             rolling buffer, query-aware variants): the device pools a
             completed window from it, never reading the host store back.

A step diffs the selection against the slot map (§4.4: `diff_slots`),
fetches the misses (serial copy before the attention, or fused into the
decode kernel), writes the token into its own block's slot, and attends
over the slots. The tail (partial) block is an ordinary slot: the token is
written into it and it is never fetched; a completed block stays in its
slot (it is in the forced window for window_blocks * C steps) until
`write_back`, called every C steps by the loop, copies it to the host.
With more slots than the selection (`cache_blocks`), the attention reads
only the slots that hold selected blocks, through a block table of the
selection's width, so spare slots cost no attention time (the fused fetch,
which visits every slot to fill its misses, still reads them all).
Fetch modes (`HostStore.fetch`, resolved by `nosa_jax.implementations` with
the decode attention; "auto" by default):

  "loop"    a fori_loop of per-block dynamic_slice + device_put (XLA
            rejects gathers on a pinned_host operand; its dynamic trip count
            syncs the GPU with the host). The default off the GPU.
  "pallas"  one launch of the zero-copy copy kernel
            `pallas_kernels.gather_blocks` (reads the pinned store
            directly), then the decode attention `sp` chooses. The GPU
            default when that is not the Pallas kernel (xla, triton).
  "fused"   no separate copy: `pallas_kernels.sparse_decode_fetch` reads
            each missing block from the store while attending and stores it
            into its slot; it is the attention (the Pallas decode kernel),
            whatever `sp.decode_implementation` says, so "triton" is refused
            with it. The GPU default when decode attention is "pallas".

Prefetch (`HostStore.prefetch`, the engine's `prefetch=True`): before a
layer attends, the engine guesses its selection (one layer ahead, from the
previous layer's input) and the store loads the guessed blocks that are not
resident into slots nobody needs: not selected at the previous step (their
slot_last is older), not guessed; empty slots first, then the least
recently selected. Only blocks before the forced window are loaded (those
are complete and written back; the window and the tail are resident
anyway). A wrong guess costs a wasted load, never a wrong answer: the
attend's diff fetches whatever is still missing. It needs slots beyond the
budget (`cache_blocks` > topk_blocks); with exactly topk every slot was
selected at the previous step and nothing is loaded. Whether the loads
overlap compute depends on the copy path: inside one jit XLA serialises the
gather kernel with the GEMMs (experiments/results/decode/NOTES.md).

Measured fetch and step times: experiments/results/ (decode notes).
Not done: copies off the SMs (the overlap issue's DMA path), sharding the
store over devices.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from nosa_jax import config as config_lib
from nosa_jax import implementations
from nosa_jax import sparse_attention
from nosa_jax.inference import copy_engine
from nosa_jax.inference import host_memory

_F32 = jnp.float32
_HOST = jax.memory.Space.Host  # pinned_host
_DEVICE = jax.memory.Space.Device


def _slot_lengths(idx_BKP: jax.Array, pos_B: jax.Array, c: int):
  """(block table j_BKP, valid tokens per slot): min(C, pos + 1 - C*j)."""
  valid_BKP = idx_BKP >= 0
  j_BKP = jnp.where(valid_BKP, idx_BKP, 0).astype(jnp.int32)
  len_BKP = jnp.clip(pos_B[:, None, None] + 1 - c * j_BKP, 0, c)
  return j_BKP, jnp.where(valid_BKP, len_BKP, 0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _filled(shape, dtype, fill, host: bool):
  x = jnp.full(shape, fill, dtype)
  # device_put inside the jit: the result's type then carries the memory
  # space (out_shardings alone give a pinned_host array typed as device
  # memory, which the step rejects).
  return jax.device_put(x, _HOST) if host else x


def allocate(shapes: Any, fill: int = 0, host: bool = False) -> Any:
  """Arrays of `shapes` (a tree of ShapeDtypeStructs) filled with `fill`,
  one compiled program per distinct shape, committed to the first device
  (like prefill's output: an uncommitted input would make the first step
  compile a second time) or allocated in pinned host memory."""
  out = jax.tree.map(lambda x: _filled(tuple(x.shape), jnp.dtype(x.dtype),
                                       fill, host), shapes)
  return out if host else jax.device_put(out, jax.devices()[0])


# ------------------------------------------------------------------------------
# The device-resident store.
# ------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceKV:
  k_BKSD: jax.Array
  v_BKSD: jax.Array


@dataclasses.dataclass(frozen=True)
class DeviceStore:
  """The whole K/V cache in device memory (`--offload=none`)."""

  writes_back = False

  def check(self, cfg: config_lib.ModelConfig, batch: int, max_len: int,
            host_memory_limit: Optional[int] = None) -> None:
    del cfg, batch, max_len, host_memory_limit  # device OOM is XLA's to say

  def prefill(self, k_BKSD, v_BKSD, lengths_B, sp) -> DeviceKV:
    del lengths_B, sp
    return DeviceKV(k_BKSD, v_BKSD)

  def empty(self, shapes: DeviceKV) -> DeviceKV:
    return allocate(shapes)

  def append(self, kv: DeviceKV, k_BKD, v_BKD, pos_B) -> DeviceKV:
    b_B = jnp.arange(pos_B.shape[0])
    return DeviceKV(kv.k_BKSD.at[b_B, :, pos_B].set(k_BKD),
                    kv.v_BKSD.at[b_B, :, pos_B].set(v_BKD))

  def window_keys(self, kv: DeviceKV, pos_B, r: int) -> jax.Array:
    # Read in place from the cache (before the token completes a window
    # the start is clipped; the engine then discards the result).
    start_B = jnp.clip(pos_B + 1 - r, 0, kv.k_BKSD.shape[2] - r)
    return jax.vmap(lambda x, i: jax.lax.dynamic_slice_in_dim(
        x, i, r, axis=1))(kv.k_BKSD, start_B)

  def attend(self, kv: DeviceKV, q_BHD, k_BKD, v_BKD, bias_BKS, idx_BKP,
             se_BKN, pos_B, sp: config_lib.SparseConfig):
    del k_BKD, v_BKD, se_BKN  # the token is in the cache (append)
    j_BKP, len_BKP = _slot_lengths(idx_BKP, pos_B, sp.block_size)
    # Sparse: the kernel reads the selected blocks in place through the
    # block table. Full: every block in order, no table needed.
    out_BHD = sparse_attention.decode_attention(
        q_BHD, kv.k_BKSD, kv.v_BKSD, bias_BKS, len_BKP, sp.block_size,
        implementations.from_config("decode_attention", sp),
        block_idx_BKP=j_BKP if sp.is_sparse else None)
    return kv, out_BHD, jnp.zeros(idx_BKP.shape[:2], jnp.int32)

  def write_back(self, kv, lengths_B, sp):
    del lengths_B, sp
    return kv

  def read_all(self, kv: DeviceKV):
    return kv.k_BKSD, kv.v_BKSD

  def prefetch(self, kv, guess_BKQ, pos_B, sp, after=None):
    raise ValueError("prefetch needs the host store: the device store holds "
                     "every block already")


# ------------------------------------------------------------------------------
# The pinned-host store with a device block cache.
# ------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HostKV:
  k_host: jax.Array      # [B, K, N, C, D] pinned_host
  v_host: jax.Array      # [B, K, N, C, D] pinned_host
  k_slot: jax.Array      # [B, K, P, C, D] device
  v_slot: jax.Array      # [B, K, P, C, D] device
  slot_map: jax.Array    # [B, K, P] int32, -1 = empty
  slot_last: jax.Array   # [B, K, P] int32, last position selected
  keys_BKRD: Optional[jax.Array]  # [B, K, compress_kernel, D] device


@dataclasses.dataclass(frozen=True)
class HostStore:
  """K/V in pinned host memory, selected blocks cached on the device.

  Attributes:
    fetch: "auto", "loop", "pallas" or "fused" (the module docstring;
      `implementations` resolves "auto").
    cache_blocks: device slots per (layer, sequence, KV head); None =
      topk_blocks. Above topk_blocks, slots keep blocks that are no longer
      selected; a miss overwrites first an empty slot, then the slot whose
      block has the lowest block eviction score (dma / nosa: the score
      query-agnostic selection ranks by, §2.4) or, for infllmv2, the least
      recently selected one.
    gather_programs: persistent grid of the Pallas copy kernel.
    prefetch_copy: how `prefetch` copies: "fetch" (the serial fetch's copy,
      in line) or "dma" (copy-engine copies on their own stream through
      `copy_engine`, completed by `settle`; off the GPU the serial fetch).
  """

  fetch: str = "auto"
  cache_blocks: Optional[int] = None
  gather_programs: int = 528
  prefetch_copy: str = "fetch"
  writes_back = True

  def __post_init__(self):
    implementations.check("block_fetch", self.fetch)
    implementations.check("block_prefetch", self.prefetch_copy)
    if self.gather_programs < 1:
      raise ValueError("HostStore.gather_programs must be >= 1, got "
                       f"{self.gather_programs}")
    if self.cache_blocks is not None and self.cache_blocks < 1:
      raise ValueError("HostStore.cache_blocks must be None or >= 1, got "
                       f"{self.cache_blocks}")

  def fetch_and_attention(self, sp: config_lib.SparseConfig):
    """(fetch mode, decode attention) this store runs under `sp`."""
    attention = implementations.from_config("decode_attention", sp)
    fetch = implementations.resolve("block_fetch", self.fetch,
                                    decode_attention=attention)
    if fetch == "fused" and attention == "triton":
      raise ValueError(
          "HostStore.fetch='fused' is the Pallas decode kernel with the "
          "fetch inside; SparseConfig.decode_implementation='triton' cannot "
          "be fused (use fetch='pallas' or 'loop')")
    return fetch, attention

  def num_slots(self, sp: config_lib.SparseConfig, n: int) -> int:
    """P: device slots per (layer, sequence, KV head) for N blocks."""
    want = self.cache_blocks or sp.topk_blocks
    if want < sp.topk_blocks:
      raise ValueError(f"HostStore.cache_blocks={want} is below "
                       f"topk_blocks={sp.topk_blocks}; the cache must hold "
                       "a whole selection")
    return min(want, n)

  def check(self, cfg: config_lib.ModelConfig, batch: int, max_len: int,
            host_memory_limit: Optional[int] = None) -> None:
    sp = cfg.sparse
    if not sp.is_sparse:
      raise ValueError(
          "the host store needs a sparse variant (infllmv2, dma, nosa), not "
          "'full': full attention has no selection to offload (use "
          "--offload=none)")
    if sp.window_blocks < 1:
      raise ValueError(
          "the host store needs sparse.window_blocks >= 1 (a completed "
          "block stays in the forced window until write_back copies it to "
          f"the host), got {sp.window_blocks}")
    self.num_slots(sp, -(-max_len // sp.block_size))
    host_memory.check_host_capacity(cfg, batch, max_len, host_memory_limit)

  def prefill(self, k_BKSD, v_BKSD, lengths_B,
              sp: config_lib.SparseConfig) -> HostKV:
    """Block-major K/V sent to the host (an async copy inside the jit); the
    partial tail block of each prompt in slot 0, the other slots empty, so
    the first step fetches every selected block (cold start, §4.2)."""
    b, kv, s, d = k_BKSD.shape
    c = sp.block_size
    n = s // c
    p = self.num_slots(sp, n)
    tail_B = lengths_B // c
    map_BKP = jnp.full((b, kv, p), -1, jnp.int32).at[:, :, 0].set(
        jnp.where(lengths_B % c != 0, tail_B, -1)[:, None])

    def slots(x_BKNCD):
      tail_BKCD = x_BKNCD[jnp.arange(b), :, jnp.minimum(tail_B, n - 1)]
      return jnp.zeros((b, kv, p, c, d), x_BKNCD.dtype).at[:, :, 0].set(
          tail_BKCD)  # zeros past the length

    keys = None
    if sp.query_aware:  # keys at lengths - R .. lengths - 1
      r = sp.compress_kernel
      padded = jnp.pad(k_BKSD, ((0, 0), (0, 0), (r, 0), (0, 0)))
      keys = jax.vmap(lambda x, i: jax.lax.dynamic_slice_in_dim(
          x, i, r, axis=1))(padded, lengths_B)
    k_BKNCD = k_BKSD.reshape(b, kv, n, c, d)
    v_BKNCD = v_BKSD.reshape(b, kv, n, c, d)
    return HostKV(
        k_host=jax.device_put(k_BKNCD, _HOST),
        v_host=jax.device_put(v_BKNCD, _HOST),
        k_slot=slots(k_BKNCD), v_slot=slots(v_BKNCD), slot_map=map_BKP,
        slot_last=jnp.where(map_BKP >= 0, lengths_B[:, None, None] - 1,
                            -1).astype(jnp.int32), keys_BKRD=keys)

  def empty(self, shapes: HostKV) -> HostKV:
    """Zeros, every slot empty, the host arrays in pinned memory."""
    return HostKV(
        k_host=allocate(shapes.k_host, host=True),
        v_host=allocate(shapes.v_host, host=True),
        k_slot=allocate(shapes.k_slot), v_slot=allocate(shapes.v_slot),
        slot_map=allocate(shapes.slot_map, -1),
        slot_last=allocate(shapes.slot_last, -1),
        keys_BKRD=allocate(shapes.keys_BKRD))

  def append(self, kv: HostKV, k_BKD, v_BKD, pos_B) -> HostKV:
    # The token enters its slot in `attend`, once the diff has given its
    # block one; here only the rolling key buffer moves.
    del v_BKD, pos_B
    if kv.keys_BKRD is None:
      return kv
    return dataclasses.replace(kv, keys_BKRD=jnp.concatenate(
        [kv.keys_BKRD[:, :, 1:], k_BKD[:, :, None]], axis=2))

  def window_keys(self, kv: HostKV, pos_B, r: int) -> jax.Array:
    del pos_B, r
    return kv.keys_BKRD

  def attend(self, kv: HostKV, q_BHD, k_BKD, v_BKD, bias_BKS, idx_BKP,
             se_BKN, pos_B, sp: config_lib.SparseConfig):
    b, nkv, p, c, d = kv.k_slot.shape
    n = kv.k_host.shape[2]
    if idx_BKP.shape[-1] > p:
      raise AssertionError(f"selection width {idx_BKP.shape} > P={p}")
    own_B = (pos_B // c).astype(jnp.int32)
    keep_BKP = None
    if p > idx_BKP.shape[-1]:  # room beyond the selection: retention order
      keep_BKP = (kv.slot_last.astype(_F32) if se_BKN is None else
                  jnp.take_along_axis(se_BKN, jnp.maximum(kv.slot_map, 0),
                                      axis=-1))
    new_map, load_BKP, fetch_BKP = diff_slots(kv.slot_map, idx_BKP, own_B,
                                              keep_BKP)
    fetch, attention = self.fetch_and_attention(sp)
    k_slot, v_slot = kv.k_slot, kv.v_slot
    if fetch != "fused":
      k_slot, v_slot = self._copy_misses(kv, load_BKP, fetch_BKP, fetch)
    # The token goes into its own block's slot at row pos % C.
    own_slot_BK = jnp.argmax(new_map == own_B[:, None, None], axis=-1)
    b_ = jnp.arange(b)[:, None]
    k_ = jnp.arange(nkv)[None, :]
    row_B1 = (pos_B % c)[:, None]
    k_slot = k_slot.at[b_, k_, own_slot_BK, row_B1].set(k_BKD)
    v_slot = v_slot.at[b_, k_, own_slot_BK, row_B1].set(v_BKD)
    # Attention over the slots holding a selected block (slot order does
    # not matter); stale and empty slots get length 0.
    sel_slot_BKP = _member(new_map, idx_BKP)
    j_BKP, len_BKP = _slot_lengths(jnp.where(sel_slot_BKP, new_map, -1),
                                   pos_B, c)
    bias = None
    if bias_BKS is not None:  # gathered from the device bias by slot
      bias = bias_BKS.reshape(b, nkv, n, c)[
          b_[..., None], k_[..., None], j_BKP].reshape(b, nkv, p * c)
    if fetch == "fused":  # the kernel fetches the misses as it attends
      out_BHD, k_slot, v_slot = implementations.kernel("block_fetch", fetch)(
          q_BHD, k_slot, v_slot, bias, len_BKP, kv.k_host, kv.v_host,
          jnp.where(fetch_BKP, load_BKP, -1).astype(jnp.int32))
    else:
      table = None
      p_sel = idx_BKP.shape[-1]
      if p > p_sel:  # read only the slots holding selected blocks
        table = jnp.argsort(~sel_slot_BKP, axis=-1,
                            stable=True)[..., :p_sel].astype(jnp.int32)
        len_BKP = jnp.take_along_axis(len_BKP, table, axis=-1)
      out_BHD = sparse_attention.decode_attention(
          q_BHD, k_slot.reshape(b, nkv, p * c, d),
          v_slot.reshape(b, nkv, p * c, d), bias, len_BKP, c, attention,
          block_idx_BKP=table)
    slot_last = jnp.where(sel_slot_BKP, pos_B[:, None, None], kv.slot_last)
    kv = dataclasses.replace(kv, k_slot=k_slot, v_slot=v_slot,
                             slot_map=new_map,
                             slot_last=slot_last.astype(jnp.int32))
    return kv, out_BHD, jnp.sum(fetch_BKP, -1).astype(jnp.int32)

  def read_all(self, kv: HostKV):
    """The whole store copied to the device (one layer: what a chunk of a
    query-chunked prefill attends to; written blocks only, see write_back)."""
    b, nkv, n, c, d = kv.k_host.shape
    return tuple(jax.device_put(x, _DEVICE).reshape(b, nkv, n * c, d)
                 for x in (kv.k_host, kv.v_host))

  def copies_async(self) -> bool:
    """Whether `prefetch` leaves copies in flight that `settle` completes:
    prefetch_copy "dma" on the GPU (or on the CPU over a stand-in runtime a
    test loaded, `copy_engine.load(platform="cpu")`)."""
    return (implementations.resolve("block_prefetch", self.prefetch_copy)
            == "dma" and (jax.default_backend() == "gpu"
                          or copy_engine.current()[0] is not None))

  def prefetch(self, kv: HostKV, guess_BKQ, pos_B,
               sp: config_lib.SparseConfig, after=None):
    """Loads the guessed blocks that are not resident (module docstring).

    Args:
      kv: this layer's store, before this step's attend.
      guess_BKQ: int32 guessed block ids (-1 = none), any width Q.
      pos_B: the positions this step attends at.
      sp: the selection constants.
      after: arrays computed only once the copies are issued (the next
        layer's input), so that their work can overlap the copies.

    Returns:
      (kv, loaded_BKP, after): the store with the blocks in their slots (in
      flight until `settle` when `copies_async`), the block loaded into
      each slot (-1 = none), and `after`.
    """
    c = sp.block_size
    fetch, _ = self.fetch_and_attention(sp)
    if fetch == "fused":  # the fused kernel copies only as it attends
      fetch = implementations.serial_fetch()
    new_map, load_BKP = prefetch_slots(
        kv.slot_map, kv.slot_last, guess_BKQ, pos_B,
        (pos_B // c).astype(jnp.int32) - sp.window_blocks)
    if self.copies_async():
      k_slot, v_slot = self._issue_copies(kv, load_BKP)
      k_slot, v_slot, after = jax.lax.optimization_barrier(
          (k_slot, v_slot, after))
    else:
      k_slot, v_slot = self._copy_misses(kv, load_BKP, load_BKP >= 0, fetch)
    # Loaded slots count as selected at the previous step, so that the
    # attend's retention keeps them like the blocks used then.
    slot_last = jnp.where(load_BKP >= 0, pos_B[:, None, None] - 1,
                          kv.slot_last).astype(jnp.int32)
    return dataclasses.replace(kv, k_slot=k_slot, v_slot=v_slot,
                               slot_map=new_map, slot_last=slot_last), \
        load_BKP, after

  def settle(self, kv: HostKV, before=None):
    """(kv, before): kv once `prefetch`'s copies have landed, ordered after
    `before` is computed (this layer's input), so that the wait does not
    move ahead of the work it overlaps. Identity unless `copies_async`."""
    if not self.copies_async():
      return kv, before
    k_slot, v_slot, before = jax.lax.optimization_barrier(
        (kv.k_slot, kv.v_slot, before))
    k_slot, v_slot = _dma_engine().wait(k_slot, v_slot)
    return dataclasses.replace(kv, k_slot=k_slot, v_slot=v_slot), before

  def _issue_copies(self, kv: HostKV, load_BKP):
    """Enqueues the loads on the copy engines (copy_engine.issue_from)."""
    b, nkv, p = kv.slot_map.shape
    n, c, d = kv.k_host.shape[2:]
    f_F = jnp.arange(b * nkv * p, dtype=jnp.int32)
    load_F = load_BKP.reshape(-1)
    src_F = jnp.where(load_F >= 0, (f_F // p) * n + load_F, -1)
    plan_F2 = jnp.stack([src_F, f_F], axis=1).astype(jnp.int32)
    return _dma_engine().issue_from(
        [(kv.k_slot, kv.k_host), (kv.v_slot, kv.v_host)], plan_F2,
        row_bytes=c * d * kv.k_slot.dtype.itemsize)

  def _copy_misses(self, kv: HostKV, load_BKP, fetch_BKP, fetch: str):
    """Copies the missing blocks host -> device slots, one tile each."""
    b, nkv, p = kv.slot_map.shape
    n = kv.k_host.shape[2]
    f_F = jnp.arange(b * nkv * p)
    src_F = (f_F // p) * n + jnp.maximum(load_BKP.reshape(-1), 0)
    order_F = jnp.argsort(~fetch_BKP.reshape(-1), stable=True)  # misses 1st
    count = jnp.sum(fetch_BKP).astype(jnp.int32)
    src_F, dst_F = src_F[order_F], f_F[order_F].astype(jnp.int32)
    srcs, dsts = (kv.k_host, kv.v_host), (kv.k_slot, kv.v_slot)
    if fetch == "loop":
      return _loop_copy(srcs, dsts, src_F, dst_F, count, _DEVICE)
    tiles = lambda x: x.reshape((-1,) + x.shape[3:])
    gather = implementations.kernel("block_fetch", fetch,
                                    programs=self.gather_programs)
    out = gather(tuple(map(tiles, srcs)), tuple(map(tiles, dsts)), src_F,
                 dst_F, count)
    return tuple(x.reshape(kv.k_slot.shape) for x in out)

  def write_back(self, kv: HostKV, lengths_B,
                 sp: config_lib.SparseConfig) -> HostKV:
    """Copies each sequence's last completed block from its slot to the host.

    Block j = lengths // C - 1 of every (b, k) (for a sequence without a
    completed block, its partial own block, which the host never reads
    before it is complete and written again). Each sequence completes one
    block per C steps, so a call every C steps writes each block once. A
    static loop of B * K tile copies: no data-dependent control flow.
    """
    b, nkv, p = kv.slot_map.shape
    n = kv.k_host.shape[2]
    own_B = (lengths_B // sp.block_size).astype(jnp.int32)
    block_B = jnp.where(own_B > 0, own_B - 1, 0)
    slot_BK = jnp.argmax(kv.slot_map == block_B[:, None, None], axis=-1)
    bk = jnp.arange(b * nkv, dtype=jnp.int32)
    k_host, v_host = _loop_copy(
        (kv.k_slot, kv.v_slot), (kv.k_host, kv.v_host),
        bk * p + slot_BK.reshape(-1).astype(jnp.int32),
        bk * n + jnp.repeat(block_B, nkv), b * nkv, _HOST)
    return dataclasses.replace(kv, k_host=k_host, v_host=v_host)


def _member(a_BKP, b_BKQ):
  """a's valid entries (>= 0) that b's valid entries hold."""
  return jnp.any((a_BKP[..., :, None] == b_BKQ[..., None, :])
                 & (b_BKQ >= 0)[..., None, :], axis=-1) & (a_BKP >= 0)


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
  miss_BKP = (idx_BKP >= 0) & ~jnp.any(
      idx_BKP[..., :, None] == slot_map_BKP[..., None, :], axis=-1)
  n_miss_BK = jnp.sum(miss_BKP, axis=-1)
  big = jnp.iinfo(jnp.int32).max
  miss_ids_BKP = jnp.sort(jnp.where(miss_BKP, idx_BKP, big), axis=-1)
  free_BKP = ~_member(slot_map_BKP, idx_BKP)
  new_map_BKP, load_BKP = _fill_free_slots(slot_map_BKP, free_BKP, keep_BKP,
                                           miss_ids_BKP, n_miss_BK)
  fetch_BKP = (load_BKP >= 0) & (load_BKP != own_B[:, None, None])
  return new_map_BKP, load_BKP, fetch_BKP


def _fill_free_slots(slot_map_BKP, free_BKP, keep_BKP, ids_BKQ, n_BK):
  """Blocks ids_BKQ[..., :n] (ascending, padding after) into free slots.

  Free slots are taken by rank: with keep_BKP, empty ones first, then the
  lowest keep value (ties by slot); without, in slot order. Ids beyond the
  free slots are dropped. Returns (new_map_BKP, load_BKP: the block loaded
  into each slot, -1 = none).
  """
  if keep_BKP is None:
    rank_BKP = jnp.cumsum(free_BKP, axis=-1) - 1
  else:
    key_BKP = jnp.where(slot_map_BKP < 0, -jnp.inf, keep_BKP.astype(_F32))
    key_BKP = jnp.where(free_BKP, key_BKP, jnp.inf)
    rank_BKP = jnp.argsort(jnp.argsort(key_BKP, axis=-1, stable=True),
                           axis=-1)
  assign_BKP = free_BKP & (rank_BKP < n_BK[..., None])
  load_BKP = jnp.where(assign_BKP, jnp.take_along_axis(
      ids_BKQ, jnp.clip(rank_BKP, 0, ids_BKQ.shape[-1] - 1), axis=-1),
                       -1).astype(jnp.int32)
  return jnp.where(assign_BKP, load_BKP, slot_map_BKP), load_BKP


def _dma_engine():
  engine, why = copy_engine.current()
  if engine is None:
    raise ValueError(f"HostStore.prefetch_copy='dma' cannot run: {why}")
  return engine


def prefetch_slots(slot_map_BKP: jax.Array, slot_last_BKP: jax.Array,
                   guess_BKQ: jax.Array, pos_B: jax.Array,
                   below_B: jax.Array):
  """Where a prefetch puts the guessed blocks, per (b, k).

  Args:
    slot_map_BKP: block held by each slot (-1 empty).
    slot_last_BKP: last position each slot's block was selected.
    guess_BKQ: guessed block ids (-1 = none; duplicates allowed).
    pos_B: this step's positions: a slot selected at the previous step
      (slot_last >= pos - 1) is kept.
    below_B: only guessed blocks < below_B are loaded (complete, written
      back, not in the forced window).

  Returns:
    (new_map_BKP, load_BKP): the new slot map and the block loaded into
    each slot (-1 = none). Guessed blocks beyond the free slots are
    dropped (lowest block ids are loaded first).
  """
  want_BKQ = ((guess_BKQ >= 0) & (guess_BKQ < below_B[:, None, None])
              & ~jnp.any(guess_BKQ[..., :, None] == slot_map_BKP[..., None, :],
                         axis=-1))
  big = jnp.iinfo(jnp.int32).max
  ids_BKQ = jnp.sort(jnp.where(want_BKQ, guess_BKQ, big), axis=-1)
  # Duplicates: keep the first of each run.
  dup_BKQ = jnp.concatenate([jnp.zeros_like(ids_BKQ[..., :1], bool),
                             ids_BKQ[..., 1:] == ids_BKQ[..., :-1]], axis=-1)
  ids_BKQ = jnp.sort(jnp.where(dup_BKQ, big, ids_BKQ), axis=-1)
  n_BK = jnp.sum(ids_BKQ < big, axis=-1)
  free_BKP = ((slot_last_BKP < pos_B[:, None, None] - 1)
              & ~_member(slot_map_BKP, guess_BKQ))
  free_BKP |= slot_map_BKP < 0
  # Empty slots first, then the least recently selected.
  return _fill_free_slots(slot_map_BKP, free_BKP, slot_last_BKP, ids_BKQ,
                          n_BK)


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

