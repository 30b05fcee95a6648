r"""Decode throughput of every engine in one run (issue #6, NOSA_SPEC.md §5.1).

  python -m experiments.decode_bench --model=8b --contexts=16384 \
      --batch=16 --out_dir=/tmp/decode_bench
  python -m experiments.decode_bench --runlocal --out_dir=/tmp/db  # CPU smoke

Parts (--parts, all by default):
  ceilings  HBM read bandwidth and bulk pinned-host -> device bandwidth,
            measured here: every ratio below is against these.
  gather    the offload fetch alone: the zero-copy Pallas copy kernel
            (pallas_kernels.gather_blocks, sweep of its grid) and the XLA
            per-block copy loop, on scattered K+V tiles of a pinned store;
            GB/s and the ratio to the bulk bandwidth (issue #5 target 0.90).
  decode    decode steps of each system at each (context, batch):
              full_gpu          dense attention, KV cache on the GPU, at
                                --batch and at its largest batch that fits
              <v>_gpu           sparse (infllmv2 / nosa), GPU-resident cache,
                                the model's own selection, at --batch or
                                its largest batch that fits if smaller
              <v>_offload       sparse, KV in pinned host memory, selection
                                replaced by `synthetic.SyntheticSelection` at
                                the paper's gamma (--gamma_*), serial engine
              nosa_offload_cache  the same with --cache_factor x topk slots
              <v>_offload_fused  the same with the fetch fused into the
                                decode attention kernel (HostStore
                                fetch="fused"): the PCIe reads overlap the
                                attention's HBM reads and math, not the
                                projections / MLP (those depend on the
                                attention output). The only overlap that
                                exists (WORKSPACE.md says what was tried).

Protocol: random bf16 weights; caches are zero-filled as if `context` tokens
had been prefilled (prefill excluded, as in the paper; K/V values do not
change the bytes a step moves); --warmup steps (the offload cold start
fetches every selected block) then --steps timed steps, synchronised once at
the end. Per record: tokens/s, step ms, measured gamma (1 - fetched /
selected over the timed steps) and PCIe bytes per step for offload, GPU
memory in use, host store size, and the cost model of PERFORMANCE.md
(`nosa_jax.cost_model`) evaluated with the bandwidths measured here.

Outputs in --out_dir: decode_bench.json ({"meta", "ceilings", "gather",
"records"}), decode_bench.png, table.md (the WORKSPACE.md table). Records are
written as they finish, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from configs import nosa_1b
from configs import nosa_8b
from configs import tiny
from experiments import timing
from experiments.bench import harness
from experiments.bench import synthetic
from nosa_jax import config as config_lib
from nosa_jax import cost_model
from nosa_jax import implementations
from nosa_jax import model
from nosa_jax.inference import engine
from nosa_jax.inference import host_memory
from nosa_jax.inference import stores

_MODEL = flags.DEFINE_enum("model", "8b", ["1b", "8b", "tiny"],
                           "Model shape (configs/nosa_<model>.py).")
_CONTEXTS = flags.DEFINE_list("contexts", ["16384"], "Context lengths L.")
_BATCH = flags.DEFINE_integer("batch", 16, "Batch of the sparse systems.")
_OFFLOAD_BATCHES = flags.DEFINE_list(
    "offload_batches", [], "Extra batches for the offload systems "
    "(e.g. the largest the host holds at long L).")
_SYSTEMS = flags.DEFINE_list(
    "systems", ["full_gpu", "full_gpu_max", "infllmv2_gpu", "nosa_gpu",
                "infllmv2_offload", "nosa_offload", "nosa_offload_cache",
                "infllmv2_offload_fused", "nosa_offload_fused"],
    "Systems to run.")
_GAMMA_NOSA = flags.DEFINE_float("gamma_nosa", 0.944, "Paper's NOSA gamma.")
_GAMMA_INFLLM = flags.DEFINE_float("gamma_infllmv2", 0.889,
                                   "Paper's InfLLMv2 gamma.")
_CACHE_FACTOR = flags.DEFINE_integer("cache_factor", 2,
                                     "nosa_offload_cache slots / topk.")
_STEPS = flags.DEFINE_integer("steps", 32, "Timed decode steps.")
_WARMUP = flags.DEFINE_integer("warmup", 6, "Untimed steps first.")
_PARTS = flags.DEFINE_list("parts", ["ceilings", "gather", "decode"],
                           "Parts to run.")
_GPU_FRACTION = flags.DEFINE_float(
    "gpu_fraction", 0.85, "Share of device memory the largest-batch rule "
    "may fill (weights + caches; the rest is workspace).")
_TIME_BUDGET = flags.DEFINE_float(
    "time_budget_s", 520.0, "Skip the remaining systems past this.")
_OUT = flags.DEFINE_string("out_dir", "/tmp/decode_bench", "Output dir.")
_LAYERS = flags.DEFINE_integer(
    "num_layers", None, "Override the layer count (profiling only: the "
    "records then describe a shallower model; the JSON says so).")
_KV_HEADS = flags.DEFINE_integer(
    "kv_heads", None, "Override the KV head count (e.g. 8 for a Llama-3-8B-"
    "like KV cache, 4x the 8B config's): larger KV per token makes decode "
    "PCIe-bound, where offload's gamma matters (the cost model predicts "
    "NOSA / InfLLMv2 offloaded ~1.5x there vs ~1.25x at 2 KV heads).")
_PROFILE = flags.DEFINE_bool(
    "profile", False, "Trace the timed steps of each system with "
    "jax.profiler into out_dir/profile/<system>_L<ctx>_B<batch>.")
_RUNLOCAL = flags.DEFINE_bool("runlocal", False,
                              "Tiny shapes for a CPU smoke run.")

SYSTEMS = ("full_gpu", "full_gpu_max", "infllmv2_gpu", "nosa_gpu",
           "infllmv2_offload", "nosa_offload", "nosa_offload_cache",
           "infllmv2_offload_fused", "nosa_offload_fused")
_CONFIGS = {"1b": nosa_1b, "8b": nosa_8b, "tiny": tiny}


def _model_config(name: str, variant: str) -> config_lib.ModelConfig:
  impl = "pallas" if jax.default_backend() == "gpu" else "xla"
  cfg = _shape_config(name, variant)
  return dataclasses.replace(cfg, sparse=dataclasses.replace(
      cfg.sparse, implementation=impl))


def _shape_config(name: str, variant: str) -> config_lib.ModelConfig:
  """The model config with the flag overrides; starts no JAX backend."""
  cfg = config_lib.ExperimentConfig.from_dict(
      _CONFIGS[name].get_config(f"variant={variant}").to_dict()).model
  if _LAYERS.value:
    cfg = dataclasses.replace(cfg, num_layers=_LAYERS.value)
  if _KV_HEADS.value:
    if _KV_HEADS.value < 1 or cfg.num_heads % _KV_HEADS.value:
      raise app.UsageError(f"--kv_heads={_KV_HEADS.value} must divide the "
                           f"{cfg.num_heads} query heads")
    cfg = dataclasses.replace(cfg, num_kv_heads=_KV_HEADS.value)
  return cfg


def _largest_store_bytes(name: str, contexts: list[int]) -> int:
  """Host store bytes of the largest offloaded run the flags ask for."""
  systems = [s for s in _SYSTEMS.value if "_offload" in s]
  if not systems or "decode" not in _PARTS.value:
    return 0
  cfg = _shape_config(name, "nosa")  # the store does not depend on variant
  batches = [_BATCH.value] + [int(b) for b in _OFFLOAD_BATCHES.value]
  return max(host_memory.host_store_bytes(
      cfg, b, c + _WARMUP.value + _STEPS.value + 1)
             for b in batches for c in contexts)


def _random_params(cfg: config_lib.ModelConfig, seed: int = 0):
  """Random weights in the compute dtype (what a serving copy holds)."""
  _, abstract = model.abstract_params(cfg)
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  make = jax.jit(lambda k, shape: 0.02 * jax.random.normal(
      k, shape, cfg.dtype), static_argnums=1)
  return jax.tree.unflatten(treedef, [make(k, tuple(x.shape))
                                      for k, x in zip(keys, leaves,
                                                      strict=True)])


def _timeit(fn, *args):
  return timing.timeit(fn, *args, iters=5, reduce=min)


def measure_ceilings(runlocal: bool) -> dict:
  """HBM read and bulk pinned -> device bandwidth, bytes/s."""
  n = (1 << 20) if runlocal else (1 << 30)  # bf16 elements: 2 MiB / 2 GiB
  hbm = timing.hbm_read_bandwidth(n)
  h = jax.device_put(jnp.ones((n // 2,), jnp.bfloat16), jax.memory.Space.Host)
  bulk = n / _timeit(lambda a: jax.device_put(a, jax.memory.Space.Device), h)
  del h
  return {"hbm_bytes_per_s": hbm, "pcie_bulk_bytes_per_s": bulk,
          "pcie_bulk_bytes": n}


def measure_gather(runlocal: bool, bulk: float) -> list[dict]:
  """The fetch alone: scattered K+V tiles of 16 KiB from a pinned store."""
  c, d = (16, 32) if runlocal else (64, 128)
  rows = 512 if runlocal else 65536  # 2 x 1 GiB store at 16 KiB tiles
  f = 64 if runlocal else 4096       # tiles per K and V: 2 x 64 MiB
  rng = np.random.default_rng(0)
  host = tuple(jax.device_put(jnp.zeros((rows, c, d), jnp.bfloat16),
                              jax.memory.Space.Host) for _ in range(2))
  dst = tuple(jnp.zeros((f, c, d), jnp.bfloat16) for _ in range(2))
  src_rows = jnp.asarray(rng.choice(rows, f, replace=False), jnp.int32)
  dst_rows = jnp.arange(f, dtype=jnp.int32)
  nbytes = 2 * f * c * d * 2
  out = []
  sweep = ([(4, 4)] if runlocal else
           [(p, w) for p in (66, 264, 528, 1056) for w in (4, 8)])
  for programs, warps in sweep:
    gather = implementations.kernel("block_fetch", "pallas",
                                    programs=programs, num_warps=warps)
    fn = jax.jit(lambda h, d_, gather=gather: gather(
        h, d_, src_rows, dst_rows, jnp.int32(f)))
    t = _timeit(fn, host, dst)
    out.append({"method": "pallas_gather", "programs": programs,
                "num_warps": warps, "bytes": nbytes, "seconds": t,
                "bytes_per_s": nbytes / t, "over_bulk": nbytes / t / bulk})
  # XLA's copies: the engine's "loop" fetch on a shorter list (it is slow).
  fl = min(f, 512)
  tile = (1, c, d)

  def loop(h, d_):
    def body(i, carry):
      return tuple(jax.lax.dynamic_update_slice(
          dd, jax.device_put(jax.lax.dynamic_slice(
              hh, (src_rows[i], 0, 0), tile), jax.memory.Space.Device),
          (i, 0, 0)) for hh, dd in zip(h, carry, strict=True))
    return jax.lax.fori_loop(0, fl, body, d_)

  t = _timeit(jax.jit(loop), host, dst)
  lb = 2 * fl * c * d * 2
  out.append({"method": "xla_copy_loop", "programs": 0, "num_warps": 0,
              "bytes": lb, "seconds": t, "bytes_per_s": lb / t,
              "over_bulk": lb / t / bulk})
  return out


@dataclasses.dataclass(frozen=True)
class Run:
  system: str
  variant: str
  context: int
  batch: int
  mode: str  # cost-model mode
  store: stores.HostStore | None = None  # None: the device store
  gamma_target: float | None = None


def _plan(cfg_full, cfg_sparse, contexts, runlocal) -> list[Run]:
  gpu_bytes = (jax.devices()[0].memory_stats() or {}).get(
      "bytes_limit", 16 << 30)
  runs = []
  extra = [int(b) for b in _OFFLOAD_BATCHES.value]
  for ctx in contexts:
    max_len = ctx + _WARMUP.value + _STEPS.value + 1
    b = _BATCH.value
    for system in _SYSTEMS.value:
      if system == "full_gpu":
        runs.append(Run(system, "full", ctx, b, "full"))
      elif system == "full_gpu_max":
        bmax = cost_model.max_batch(cfg_full, max_len,
                                    _GPU_FRACTION.value * gpu_bytes, "full")
        if runlocal:
          bmax = 2 * b
        if bmax >= 1:
          runs.append(Run(system, "full", ctx, bmax, "full"))
      elif system.endswith("_gpu"):
        # GPU-resident sparse holds the whole cache on the GPU: --batch, or
        # its largest batch when --batch does not fit (an OOM inside XLA's
        # allocator stalls for minutes instead of failing).
        cfg_v = dataclasses.replace(cfg_sparse, sparse=dataclasses.replace(
            cfg_sparse.sparse, variant=system[:-4]))
        bmax = cost_model.max_batch(cfg_v, max_len,
                                    _GPU_FRACTION.value * gpu_bytes,
                                    "sparse_resident")
        if runlocal:
          bmax = b
        if min(b, bmax) >= 1:
          runs.append(Run(system, system[:-4], ctx, min(b, bmax),
                          "sparse_resident"))
        else:
          logging.warning("%s at L=%d: not even one sequence fits on the "
                          "GPU; skipped", system, ctx)
      else:
        variant = system.split("_")[0]
        gamma = (_GAMMA_NOSA.value if variant == "nosa"
                 else _GAMMA_INFLLM.value)
        cache = (_CACHE_FACTOR.value * cfg_sparse.sparse.topk_blocks
                 if system.endswith("_cache") else None)
        store = stores.HostStore(
            cache_blocks=cache,
            fetch="fused" if system.endswith("_fused") else "auto")
        for bb in [b] + extra:
          runs.append(Run(system, variant, ctx, bb, "offload", store, gamma))
  return runs


def run_decode(run: Run, cfg: config_lib.ModelConfig, params,
               hw: cost_model.Hardware) -> dict:
  max_len = run.context + _WARMUP.value + _STEPS.value + 1
  tok = jnp.zeros((run.batch,), jnp.int32)
  t0 = time.perf_counter()
  fetched = selected = 0
  store = run.store or stores.DeviceStore()
  override = (None if run.gamma_target is None else
              synthetic.SyntheticSelection(cfg.sparse, run.gamma_target))
  state = synthetic.synthetic_state(params, cfg, store, run.batch,
                                    run.context, max_len, run.gamma_target)
  host_bytes = 0
  if store.writes_back:
    host_bytes = host_memory.host_store_bytes(cfg, run.batch, max_len)
    state = engine.write_back(cfg, state)  # compiles it outside the timing
  counter = [0]

  def step(s):
    s, _, info = engine.decode_step(params, cfg, s, tok, override=override)
    counter[0] += 1
    if store.writes_back and counter[0] % cfg.sparse.block_size == 0:
      s = engine.write_back(cfg, s)  # timed, amortised
    return s, info
  jax.block_until_ready(state)
  setup_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(_WARMUP.value):
    state = step(state)[0]
  jax.block_until_ready(state)
  warm_s = time.perf_counter() - t0
  stats_list = []
  trace = contextlib.nullcontext()
  if _PROFILE.value:
    trace = jax.profiler.trace(os.path.join(
        _OUT.value, "profile", f"{run.system}_L{run.context}_B{run.batch}"),
                               create_perfetto_trace=True)
  with trace:
    t0 = time.perf_counter()
    for _ in range(_STEPS.value):
      state, info = step(state)
      if store.writes_back:
        stats_list.append(info)  # summed after the timing
    jax.block_until_ready(state)
    dt = (time.perf_counter() - t0) / _STEPS.value
  mem = (jax.devices()[0].memory_stats() or {}).get("bytes_in_use", 0)
  rec = dataclasses.asdict(run)
  rec.pop("store")
  rec.update(model=_MODEL.value, step_ms=dt * 1e3,
             tokens_per_s=run.batch / dt, setup_s=setup_s,
             compile_and_warmup_s=warm_s, gpu_bytes_in_use=int(mem),
             host_store_bytes=int(host_bytes), implementation=(
                 cfg.sparse.implementation if cfg.sparse.is_sparse
                 else "cudnn/xla"))
  gamma = 1.0
  if store.writes_back:
    fetched = int(sum(np.asarray(st["fetched"]).sum() for st in stats_list))
    selected = int(sum((np.asarray(st["selected"]) >= 0).sum()
                       for st in stats_list))
    gamma = 1.0 - fetched / max(selected, 1)
    tile = cfg.sparse.block_size * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    pcie = 2 * tile * fetched / _STEPS.value
    rec.update(gamma=gamma, fetched_blocks=fetched, selected_blocks=selected,
               pcie_bytes_per_step=pcie,
               cache_blocks=store.cache_blocks or cfg.sparse.topk_blocks)
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


def verdicts(records: list[dict]) -> list[str]:
  """Plain-language comparisons the issue asks for, from measured records.

  For each (context, batch) with both a GPU-resident and an offloaded run of
  a variant: which is faster and by how much; NOSA vs InfLLMv2 offloaded;
  and NOSA offloaded vs FullAttn at its largest batch at the same context.
  """
  by = {(r["system"], r["context"], r["batch"]): r for r in records}
  out = []
  for (system, ctx, b), r in sorted(by.items()):
    if not system.endswith(("_offload", "_offload_fused")):
      continue
    variant, kind = system.split("_", 1)
    resident = by.get((f"{variant}_gpu", ctx, b))
    if resident:
      ratio = resident["tokens_per_s"] / r["tokens_per_s"]
      winner = ("GPU-resident beats offloaded" if ratio > 1
                else "offloaded beats GPU-resident")
      out.append(f"{system}, L={ctx}, B={b}: {winner} "
                 f"({max(ratio, 1 / ratio):.2f}x).")
      # Overlap quality against measured parts: the resident step is the
      # GPU time of the same step without transfers.
      t_max = max(resident["step_ms"], r["model_t_pcie_ms"])
      out.append(f"{system}, L={ctx}, B={b}: step {r['step_ms']:.2f} ms = "
                 f"{r['step_ms'] / t_max:.2f} x max(T_gpu measured "
                 f"resident {resident['step_ms']:.2f}, T_pcie "
                 f"{r['model_t_pcie_ms']:.2f}) ms; cost-model T_gpu "
                 f"{r['model_t_gpu_ms']:.2f} ms gives "
                 f"{r['step_over_max_gpu_pcie']:.2f} x.")
    if variant == "nosa" and (f"infllmv2_{kind}", ctx, b) in by:
      ratio = r["tokens_per_s"] / by[(f"infllmv2_{kind}", ctx, b)][
          "tokens_per_s"]
      out.append(f"NOSA / InfLLMv2, both {kind}, L={ctx}, B={b}: "
                 f"{ratio:.2f}x.")
    if variant == "nosa":
      full = [x for (sy, c, _), x in by.items()
              if sy == "full_gpu_max" and c == ctx]
      if full:
        ratio = r["tokens_per_s"] / full[0]["tokens_per_s"]
        out.append(f"NOSA {kind} (B={b}) / FullAttn at its largest batch "
                   f"(B={full[0]['batch']}), L={ctx}: {ratio:.2f}x.")
  return out


def _table(results: dict) -> str:
  meta, ceil = results["meta"], results.get("ceilings", {})
  lines = [f"`{meta['command']}` on {meta['device']}, {meta['date']}", ""]
  if ceil:
    lines.append(f"HBM read {ceil['hbm_bytes_per_s'] / 1e12:.2f} TB/s, "
                 f"bulk pinned->device "
                 f"{ceil['pcie_bulk_bytes_per_s'] / 1e9:.1f} GB/s.")
  if results.get("gather"):
    best = max((g for g in results["gather"]
                if g["method"] == "pallas_gather"),
               key=lambda g: g["bytes_per_s"])
    loop = [g for g in results["gather"] if g["method"] == "xla_copy_loop"]
    lines.append(
        f"Fetch: Pallas zero-copy gather {best['bytes_per_s'] / 1e9:.1f} GB/s "
        f"= {best['over_bulk']:.2f} of bulk (programs {best['programs']}, "
        f"warps {best['num_warps']})"
        + (f"; XLA copy loop {loop[0]['bytes_per_s'] / 1e9:.2f} GB/s"
           if loop else "") + ".")
  lines += ["", "| system | L | B | tokens/s | step ms | gamma | PCIe MB/step "
            "| model serial tok/s | model overlapped tok/s | step / max(Tgpu,"
            "Tpcie) | GPU GiB |", "|---|---|---|---|---|---|---|---|---|---|"
            "---|"]
  for r in results["records"]:
    g = "-" if r["gamma"] is None else f"{r['gamma']:.3f}"
    lines.append(
        f"| {r['system']} | {r['context']} | {r['batch']} | "
        f"{r['tokens_per_s']:.0f} | {r['step_ms']:.2f} | {g} | "
        f"{r['pcie_bytes_per_step'] / 1e6:.1f} | "
        f"{r['model_serial_tokens_per_s']:.0f} | "
        f"{r['model_overlapped_tokens_per_s']:.0f} | "
        f"{r['step_over_max_gpu_pcie']:.2f} | "
        f"{r['gpu_bytes_in_use'] / 2**30:.1f} |")
  found = verdicts(results["records"])
  if found:
    lines += [""] + [f"- {v}" for v in found]
  return "\n".join(lines) + "\n"


def _plot(results: dict, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  recs = results["records"]
  if not recs:
    return
  labels = [f"{r['system']}\nL={r['context']} B={r['batch']}" for r in recs]
  x = np.arange(len(recs))
  fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(recs)), 4.5))
  ax.bar(x, [r["tokens_per_s"] for r in recs], label="measured")
  ax.scatter(x, [r["model_serial_tokens_per_s"] for r in recs], color="k",
             marker="_", s=400, label="cost model, serial")
  ax.scatter(x, [r["model_overlapped_tokens_per_s"] for r in recs],
             color="r", marker="_", s=400, label="cost model, overlapped")
  ax.set_xticks(x, labels, fontsize=7)
  ax.set_ylabel("decode tokens/s")
  ax.set_yscale("log")
  ax.set_title(f"decode throughput, {results['meta']['model']}-like, "
               f"{results['meta']['device']}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _write(results: dict, out_dir: str) -> None:
  harness.write_results(out_dir, "decode_bench", results, _table(results))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  runlocal = _RUNLOCAL.value
  name = "tiny" if runlocal else _MODEL.value
  contexts = [400] if runlocal else [int(c) for c in _CONTEXTS.value]
  # Before JAX starts its GPU client: a pinned pool sized to the largest
  # store (a larger cap lets XLA's allocator pin most of the RAM).
  host_memory.allow_pinned_host_memory(_largest_store_bytes(name, contexts))
  os.makedirs(_OUT.value, exist_ok=True)
  for part in _PARTS.value:
    if part not in ("ceilings", "gather", "decode"):
      raise app.UsageError(f"--parts: unknown {part!r}; allowed: ceilings, "
                           "gather, decode")
  for system in _SYSTEMS.value:
    if system not in SYSTEMS:
      raise app.UsageError(f"--systems: unknown {system!r}; allowed: "
                           f"{', '.join(SYSTEMS)}")
  _model_config(name, "full")  # checks --kv_heads / --num_layers up front
  results = {"meta": harness.stamp(
      "decode_bench", model=name, steps=_STEPS.value, warmup=_WARMUP.value,
      num_layers_override=_LAYERS.value, kv_heads_override=_KV_HEADS.value),
             "records": []}
  t_start = time.perf_counter()
  hw = cost_model.H100
  if "ceilings" in _PARTS.value:
    results["ceilings"] = measure_ceilings(runlocal)
    c = results["ceilings"]
    print(f"HBM {c['hbm_bytes_per_s'] / 1e12:.2f} TB/s, bulk pinned->device "
          f"{c['pcie_bulk_bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
    hw = dataclasses.replace(hw, hbm_bytes_per_s=c["hbm_bytes_per_s"],
                             pcie_bytes_per_s=c["pcie_bulk_bytes_per_s"])
  if "gather" in _PARTS.value:
    bulk = results.get("ceilings", {}).get("pcie_bulk_bytes_per_s",
                                           hw.pcie_bytes_per_s)
    results["gather"] = measure_gather(runlocal, bulk)
    for g in results["gather"]:
      print(f"gather {g['method']} programs={g['programs']} "
            f"warps={g['num_warps']}: {g['bytes_per_s'] / 1e9:.2f} GB/s "
            f"({g['over_bulk']:.2f} of bulk)", flush=True)
    best = max(g["bytes_per_s"] for g in results["gather"])
    hw = dataclasses.replace(hw, pcie_bytes_per_s=best)
    results["meta"]["cost_model_pcie"] = "best measured gather"
  _write(results, _OUT.value)
  if "decode" in _PARTS.value:
    cfgs = {v: _model_config(name, v) for v in ("full", "infllmv2", "nosa")}
    params = {}  # one variant's weights at a time (8B: 16 GB each)
    plan = _plan(cfgs["full"], cfgs["nosa"], contexts, runlocal)
    order = ("full", "infllmv2", "nosa")
    for run in sorted(plan, key=lambda r: order.index(r.variant)):
      if run.variant not in params:
        params.clear()
        params[run.variant] = _random_params(cfgs[run.variant])
      if time.perf_counter() - t_start > _TIME_BUDGET.value:
        print(f"time budget: skipped {run}", flush=True)
        results.setdefault("skipped", []).append(dataclasses.asdict(
            dataclasses.replace(run, store=None)))
        continue
      try:
        rec = run_decode(run, cfgs[run.variant], params[run.variant], hw)
      except Exception as e:  # pylint: disable=broad-except
        msg = str(e).splitlines()[0][:300]
        print(f"FAILED {run.system} L={run.context} B={run.batch}: {msg}",
              flush=True)
        results.setdefault("failed", []).append(
            {"system": run.system, "context": run.context,
             "batch": run.batch, "error": msg})
        continue
      results["records"].append(rec)
      print(f"{rec['system']:>20} L={rec['context']} B={rec['batch']}: "
            f"{rec['tokens_per_s']:.1f} tok/s, {rec['step_ms']:.2f} ms/step"
            + ("" if rec["gamma"] is None else
               f", gamma {rec['gamma']:.3f}, "
               f"{rec['pcie_bytes_per_step'] / 1e6:.1f} MB/step")
            + f" (model serial {rec['model_serial_tokens_per_s']:.0f}, "
            f"overlapped {rec['model_overlapped_tokens_per_s']:.0f})",
            flush=True)
      _write(results, _OUT.value)
  _write(results, _OUT.value)
  _plot(results, os.path.join(_OUT.value, "decode_bench.png"))
  print(_table(results))


if __name__ == "__main__":
  app.run(main)
