"""The decode systems of `experiments.decode_bench`, planned and timed.

  full_gpu            dense attention, KV cache on the GPU, at the batch
  full_gpu_max        the same at its largest batch that fits
  <v>_gpu             sparse (infllmv2 / nosa), GPU-resident cache, the
                      model's own selection; at the batch or its largest
                      batch that fits if smaller
  <v>_offload         sparse, KV in pinned host memory (HostStore), the
                      selection replaced by `synthetic.SyntheticSelection` at
                      a given gamma; serial: the misses are copied (zero-copy
                      gather kernel on the GPU, XLA's copy loop elsewhere),
                      then the attention runs
  nosa_offload_cache  the same with cache_factor x topk device slots
  nosa_offload_prefetch  the serial engine with cache_factor x topk slots
                      and lookahead prefetch (decode_step prefetch=True):
                      each layer's guessed selection loaded before the
                      previous layer runs; the guess is
                      `synthetic.SyntheticGuess` at prefetch_accuracy (1 =
                      an oracle), so the figure is the engine's cost at
                      that hit rate, not a model's
  nosa_offload_dma    nosa_offload_prefetch with the prefetch's loads on
                      the copy engines (HostStore prefetch_copy="dma",
                      nosa_jax.inference.copy_engine): issued a layer
                      ahead on a stream of their own, so they can overlap
                      the previous layer's compute; misses are still
                      fetched serially (off the GPU: the serial copy)
  <v>_offload_fused   the same with the fetch fused into the decode
                      attention kernel (HostStore fetch="fused"): the PCIe
                      reads overlap the attention's own HBM reads and math,
                      not the projections or the MLP

Prefill (`run_prefill`, decode_bench's prefill part): the prompt of each
sequence through `engine.prefill` (one sequence per pass) or
`engine.prefill_chunked`, into the device or the host store, timed after an
untimed run that compiles; tokens/s and the device's peak memory.

Protocol (`run_decode`): random bf16 weights; caches zero-filled as if
`context` tokens had been prefilled (prefill excluded, as in the paper; K/V
values do not change the bytes a step moves); `warmup` untimed steps (the
offload cold start fetches every selected block), then `steps` timed steps
synchronised once at the end. A record has tokens/s, step ms, the measured
gamma (1 - fetched / selected over the timed steps) and PCIe bytes per step
for offload, GPU memory in use, host store size, and the cost model
(`nosa_jax.cost_model`) evaluated with the given hardware figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import synthetic
from nosa_jax import config as config_lib
from nosa_jax import cost_model
from nosa_jax import implementations
from nosa_jax import model
from nosa_jax.inference import copy_engine
from nosa_jax.inference import engine
from nosa_jax.inference import host_memory
from nosa_jax.inference import stores

SYSTEMS = ("full_gpu", "full_gpu_max", "infllmv2_gpu", "nosa_gpu",
           "infllmv2_offload", "nosa_offload", "nosa_offload_cache",
           "infllmv2_offload_fused", "nosa_offload_fused",
           "nosa_offload_prefetch", "nosa_offload_dma")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """What every run of one benchmark shares.

  Attributes:
    batch: batch of the fixed-batch systems.
    offload_batches: extra batches of the offload systems.
    gamma: variant -> the gamma the synthetic selection of offload runs has.
    cache_factor: device slots / topk of nosa_offload_cache.
    steps, warmup: timed and untimed decode steps per run.
    gpu_fraction: share of device memory the largest-batch rule may fill.
    profile_dir: if set, the timed steps of each run are traced there.
    largest: also run the resident sparse systems at their largest batch
      (device memory) and the offload systems at theirs (pinned host
      memory, `host_fraction` of the RAM, and their device slots).
    emulated_hbm_gib: if set, the largest-batch rules use this much device
      memory instead of the card's (weights + K/V): an emulated smaller HBM,
      to show a server's host:HBM ratio on a machine with little RAM. Every
      record carries it.
    host_fraction: share of the physical RAM the largest offload batch may
      fill.
    prefetch_accuracy: share of the guessed picks that are right in the
      prefetch system's synthetic guess.
  """

  batch: int = 16
  offload_batches: tuple[int, ...] = ()
  gamma: tuple[tuple[str, float], ...] = (("nosa", 0.944),
                                          ("infllmv2", 0.889))
  cache_factor: int = 2
  steps: int = 32
  warmup: int = 6
  gpu_fraction: float = 0.85
  profile_dir: Optional[str] = None
  largest: bool = False
  emulated_hbm_gib: Optional[float] = None
  host_fraction: float = 0.6
  prefetch_accuracy: float = 1.0

  def device_budget(self) -> float:
    """Bytes the largest-batch rules may fill on the device."""
    if self.emulated_hbm_gib is not None:
      return self.emulated_hbm_gib * 2**30
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit",
                                                        16 << 30)
    return self.gpu_fraction * limit

  def host_batch(self, cfg: config_lib.ModelConfig, context: int) -> int:
    """Largest batch whose host store fits host_fraction of the RAM (no
    JAX call: usable before the GPU client starts)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    per_seq = host_memory.host_store_bytes(cfg, 1, self.max_len(context))
    return int(self.host_fraction * ram // per_seq)

  def max_len(self, context: int) -> int:
    """Cache length a run at `context` needs."""
    return context + self.warmup + self.steps + 1


@dataclasses.dataclass(frozen=True)
class Run:
  system: str
  variant: str
  context: int
  batch: int
  mode: str  # cost-model mode
  store: stores.HostStore | None = None  # None: the device store
  gamma_target: float | None = None
  prefetch: bool = False

  def describe(self) -> dict:
    """The run as JSON fields (the store is described by the system)."""
    out = dataclasses.asdict(dataclasses.replace(self, store=None))
    del out["store"]
    return out


def offload_store(system: str, topk: int, cache_factor: int
                  ) -> stores.HostStore:
  """The host store of an offload system (module docstring)."""
  # serial: a copy, then the attention
  fetch = ("fused" if system.endswith("_fused")
           else implementations.serial_fetch())
  spare = system.endswith(("_cache", "_prefetch", "_dma"))
  cache = cache_factor * topk if spare else None
  return stores.HostStore(
      cache_blocks=cache, fetch=fetch,
      prefetch_copy="dma" if system.endswith("_dma") else "fetch")


def largest_store_bytes(cfg: config_lib.ModelConfig, systems, contexts,
                        proto: Protocol) -> int:
  """Host store bytes of the largest offloaded run asked for (0: none)."""
  if not any("_offload" in s for s in systems):
    return 0
  return max(host_memory.host_store_bytes(cfg, b, proto.max_len(c))
             for c in contexts
             for b in (proto.batch, *proto.offload_batches,
                       proto.host_batch(cfg, c) if proto.largest else 1))


def plan(systems, cfg_full, cfg_sparse, contexts, proto: Protocol,
         small: bool = False) -> list[Run]:
  """The runs of `systems` at each context (small: CPU smoke batches)."""
  budget = proto.device_budget()
  runs = []
  b = proto.batch
  for ctx in contexts:
    max_len = proto.max_len(ctx)
    for system in systems:
      if system == "full_gpu":
        runs.append(Run(system, "full", ctx, b, "full"))
      elif system == "full_gpu_max":
        bmax = 2 * b if small else cost_model.max_batch(cfg_full, max_len,
                                                        budget, "full")
        if bmax >= 1:
          runs.append(Run(system, "full", ctx, bmax, "full"))
      elif system.endswith("_gpu"):
        # The whole cache on the GPU: the batch, or the largest that fits
        # (an OOM inside XLA's allocator stalls for minutes, not fails).
        variant = system[:-4]
        cfg_v = dataclasses.replace(cfg_sparse, sparse=dataclasses.replace(
            cfg_sparse.sparse, variant=variant))
        bmax = b if small else cost_model.max_batch(cfg_v, max_len, budget,
                                                    "sparse_resident")
        if min(b, bmax) >= 1:
          runs.append(Run(system, variant, ctx, min(b, bmax),
                          "sparse_resident"))
          if proto.largest and bmax > b:
            runs.append(Run(system, variant, ctx, bmax, "sparse_resident"))
        else:
          logging.warning("%s at L=%d: not even one sequence fits on the "
                          "GPU; skipped", system, ctx)
      else:
        variant = system.split("_")[0]
        store = offload_store(system, cfg_sparse.sparse.topk_blocks,
                              proto.cache_factor)
        batches = [b, *proto.offload_batches]
        if proto.largest and small:
          batches.append(2 * b)
        elif proto.largest:
          cfg_v = dataclasses.replace(cfg_sparse, sparse=dataclasses.replace(
              cfg_sparse.sparse, variant=variant))
          batches.append(min(
              proto.host_batch(cfg_v, ctx),
              cost_model.max_batch(cfg_v, max_len, budget, "offload")))
        for bb in sorted(set(x for x in batches if x >= 1)):
          runs.append(Run(system, variant, ctx, bb, "offload", store,
                          dict(proto.gamma)[variant],
                          prefetch=system.endswith(("_prefetch", "_dma"))))
  return runs


def random_params(cfg: config_lib.ModelConfig, seed: int = 0):
  """Random weights in the compute dtype (what a serving copy holds)."""
  _, abstract = model.abstract_params(cfg)
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  make = jax.jit(lambda k, shape: 0.02 * jax.random.normal(
      k, shape, cfg.dtype), static_argnums=1)
  return jax.tree.unflatten(treedef, [make(k, tuple(x.shape))
                                      for k, x in zip(keys, leaves,
                                                      strict=True)])


def _trace(proto: Protocol, run: Run):
  if not proto.profile_dir:
    return contextlib.nullcontext()
  return jax.profiler.trace(os.path.join(
      proto.profile_dir, f"{run.system}_L{run.context}_B{run.batch}"),
                            create_perfetto_trace=True)


def run_decode(run: Run, cfg: config_lib.ModelConfig, params,
               hw: cost_model.Hardware, proto: Protocol) -> dict:
  """Times one run (module docstring); returns its record."""
  max_len = proto.max_len(run.context)
  tok = jnp.zeros((run.batch,), jnp.int32)
  t0 = time.perf_counter()
  store = run.store or stores.DeviceStore()
  override = (None if run.gamma_target is None else
              synthetic.SyntheticSelection(cfg.sparse, run.gamma_target))
  guess = (synthetic.SyntheticGuess(cfg.sparse, run.gamma_target,
                                    proto.prefetch_accuracy)
           if run.prefetch else None)
  state = synthetic.synthetic_state(params, cfg, store, run.batch,
                                    run.context, max_len, run.gamma_target)
  host_bytes = 0
  if store.writes_back:
    host_bytes = host_memory.host_store_bytes(cfg, run.batch, max_len)
    state = engine.write_back(cfg, state)  # compiles it outside the timing
  counter = [0]

  def step(s):
    s, _, info = engine.decode_step(params, cfg, s, tok, override=override,
                                    prefetch=run.prefetch, guess=guess)
    counter[0] += 1
    if store.writes_back and counter[0] % cfg.sparse.block_size == 0:
      s = engine.write_back(cfg, s)  # timed, amortised
    return s, info
  jax.block_until_ready(state)
  setup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(proto.warmup):
    state = step(state)[0]
  jax.block_until_ready(state)
  warm_s = time.perf_counter() - t0
  dma = copy_engine.current()[0] if getattr(store, "copies_async",
                                            lambda: False)() else None
  if dma is not None:
    dma.counters(reset=True)
  infos = []
  with _trace(proto, run):
    t0 = time.perf_counter()
    for _ in range(proto.steps):
      state, info = step(state)
      if store.writes_back:
        infos.append(info)  # summed after the timing
    jax.block_until_ready(state)
    dt = (time.perf_counter() - t0) / proto.steps
  mem = (jax.devices()[0].memory_stats() or {}).get("bytes_in_use", 0)
  rec = run.describe()
  if dma is not None:  # the copy engine's issues / copies per timed step
    counts = dma.counters(reset=True)
    rec.update(dma_copies_per_step=counts["copies"] / proto.steps,
               dma_waits_per_step=counts["waits"] / proto.steps,
               dma_pending=counts["pending"])
  rec.update(emulated_hbm_gib=proto.emulated_hbm_gib, step_ms=dt * 1e3,
             tokens_per_s=run.batch / dt, setup_s=setup_s,
             compile_and_warmup_s=warm_s, gpu_bytes_in_use=int(mem),
             host_store_bytes=int(host_bytes), implementation=(
                 cfg.sparse.implementation if cfg.sparse.is_sparse
                 else "cudnn/xla"))
  gamma = 1.0
  if store.writes_back:
    fetched = int(sum(np.asarray(i["fetched"]).sum() for i in infos))
    selected = int(sum((np.asarray(i["selected"]) >= 0).sum() for i in infos))
    gamma = 1.0 - fetched / max(selected, 1)
    total = lambda key: int(sum(np.asarray(i[key]).sum() for i in infos))
    loads = fetched  # critical-path fetches, plus prefetch's loads
    if run.prefetch:
      rec.update(prefetch_hits=total("prefetch_hits"),
                 wasted=total("prefetch_wasted"),
                 prefetch_accuracy=proto.prefetch_accuracy)
      loads += total("prefetched")
    tile = cfg.sparse.block_size * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    rec.update(gamma=gamma, fetched_blocks=fetched, selected_blocks=selected,
               misses=fetched,
               pcie_bytes_per_step=2 * tile * loads / proto.steps,
               cache_blocks=store.cache_blocks or cfg.sparse.topk_blocks,
               fetch=store.fetch_and_attention(cfg.sparse)[0])
  else:
    rec.update(gamma=None, pcie_bytes_per_step=0.0)
  cost = cost_model.decode_cost(cfg, run.batch, run.context, gamma, hw,
                                mode=run.mode)
  rec.update(model_t_gpu_ms=cost.t_gpu_s * 1e3,
             model_t_pcie_ms=cost.t_pcie_s * 1e3,
             model_serial_tokens_per_s=cost.serial_tokens_per_s,
             model_overlapped_tokens_per_s=cost.overlapped_tokens_per_s,
             model_pcie_ceiling_tokens_per_s=cost.pcie_ceiling_tokens_per_s,
             step_over_max_gpu_pcie=dt / max(cost.t_gpu_s, cost.t_pcie_s),
             step_over_serial_model=dt / (cost.t_gpu_s + cost.t_pcie_s))
  del state
  return rec


PREFILL_SYSTEMS = ("device", "host", "device_chunked", "host_chunked")


def run_prefill(system: str, cfg: config_lib.ModelConfig, params,
                context: int, batch: int, chunk: int) -> dict:
  """Times one prefill system (module docstring); returns its record."""
  store = (stores.DeviceStore() if system.startswith("device") else
           stores.HostStore(fetch=implementations.serial_fetch()))
  tokens = jax.random.randint(jax.random.key(0), (batch, context), 0,
                              cfg.vocab_size)
  lengths = jnp.full((batch,), context, jnp.int32)
  max_len = context + cfg.sparse.block_size
  if system.endswith("_chunked"):
    run = lambda: engine.prefill_chunked(params, cfg, tokens, lengths,
                                         max_len, chunk=chunk, store=store)
  else:
    run = lambda: engine.prefill(params, cfg, tokens, lengths, max_len,
                                 store=store, prefill_batch=1)
  t0 = time.perf_counter()
  jax.block_until_ready(run())  # compiles
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = jax.block_until_ready(run())
  dt = time.perf_counter() - t0
  del out
  stats = jax.devices()[0].memory_stats() or {}
  return {"system": f"prefill_{system}", "context": context, "batch": batch,
          "chunk": chunk if system.endswith("_chunked") else None,
          "prefill_s": dt, "prefill_tokens_per_s": batch * context / dt,
          "compile_and_first_s": compile_s,
          "peak_gpu_bytes": int(stats.get("peak_bytes_in_use", 0))}
