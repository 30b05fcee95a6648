r"""Decode throughput of every system in one run (NOSA_SPEC.md §5.1).

  python -m experiments.decode_bench --model=8b --contexts=16384 \
      --batch=16 --out_dir=/tmp/decode_bench
  python -m experiments.decode_bench --runlocal --out_dir=/tmp/db  # CPU smoke

Parts (--parts, all by default):
  ceilings  HBM read and bulk pinned-host -> device bandwidth, measured here:
            every ratio is against these (experiments/bench/ceilings.py)
  gather    the offload fetch alone (bench/ceilings.py)
  decode    decode steps of each --systems at each (context, batch); the
            systems and the protocol: experiments/bench/decode_systems.py
  prefill   prompt prefill of each --prefill_systems (device / host store,
            whole or in --prefill_chunk query chunks) at each context,
            --prefill_batch sequences (not in the default parts)

Outputs in --out_dir (bench/decode_report.py): decode_bench.json ({"meta",
"ceilings", "gather", "records"}), summary.json (one flat row per point:
the schema of experiments/results/offload/), table.md, decode_bench.png and
scaling.png (tokens/s against context and batch). Records are written as
they finish, so a run cut short keeps what it measured. --largest runs each
system at its largest batch too; --emulated_hbm_gib caps the device memory
the largest-batch rules see (an emulated smaller HBM, labelled as such).
"""

from __future__ import annotations

import dataclasses
import os
import time

from absl import flags
import jax

from configs import nosa_1b
from configs import nosa_8b
from configs import tiny
from experiments import cli
from experiments.bench import ceilings
from experiments.bench import decode_report
from experiments.bench import decode_systems
from experiments.bench import harness
from experiments.bench import synthetic
from nosa_jax import config as config_lib
from nosa_jax import cost_model
from nosa_jax.inference import host_memory

_MODEL = flags.DEFINE_enum("model", "8b", ["1b", "8b", "tiny"],
                           "Model shape (configs/nosa_<model>.py).")
_CONTEXTS = flags.DEFINE_list("contexts", ["16384"], "Context lengths L.")
_BATCH = flags.DEFINE_integer("batch", 16, "Batch of the sparse systems.")
_OFFLOAD_BATCHES = flags.DEFINE_list(
    "offload_batches", [], "Extra batches for the offload systems "
    "(e.g. the largest the host holds at long L).")
_SYSTEMS = flags.DEFINE_list("systems", list(decode_systems.SYSTEMS),
                             "Systems to run.")
_GAMMA_NOSA = flags.DEFINE_float("gamma_nosa", 0.944, "Paper's NOSA gamma.")
_GAMMA_INFLLM = flags.DEFINE_float("gamma_infllmv2", 0.889,
                                   "Paper's InfLLMv2 gamma.")
_GAMMA_FROM = flags.DEFINE_string(
    "gamma_nosa_from", None, "A quality study's summary.json / quality.json: "
    "NOSA's gamma is the one measured on its trained nosa model instead of "
    "--gamma_nosa (the benchmark's second locality point).")
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
    "PCIe-bound, where offload's gamma matters.")
_PROFILE = flags.DEFINE_bool(
    "profile", False, "Trace the timed steps of each system with "
    "jax.profiler into out_dir/profile/<system>_L<ctx>_B<batch>.")
_LARGEST = flags.DEFINE_bool(
    "largest", False, "Also run resident sparse systems at their largest "
    "batch (device memory) and offload systems at theirs (pinned host "
    "memory and device slots).")
_EMULATED_HBM = flags.DEFINE_float(
    "emulated_hbm_gib", None, "Largest-batch rules use this much device "
    "memory (weights + K/V) instead of the card's: an emulated smaller HBM "
    "(labelled in every output).")
_HOST_FRACTION = flags.DEFINE_float(
    "host_fraction", 0.6, "Share of the RAM the largest offload batch may "
    "fill.")
_PREFETCH_ACCURACY = flags.DEFINE_float(
    "prefetch_accuracy", 1.0, "Share of right picks in nosa_offload_prefetch"
    "'s synthetic guess (1 = an oracle).")
_PREFILL_SYSTEMS = flags.DEFINE_list(
    "prefill_systems", list(decode_systems.PREFILL_SYSTEMS),
    "Prefill systems of the prefill part.")
_PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk", 8192, "Query tokens per chunk of the chunked prefill.")
_PREFILL_BATCH = flags.DEFINE_integer(
    "prefill_batch", 1, "Sequences of the prefill part.")
_RUNLOCAL = flags.DEFINE_bool("runlocal", False,
                              "Tiny shapes for a CPU smoke run.")
_CONFIGS = {"1b": nosa_1b, "8b": nosa_8b, "tiny": tiny}
_PART_NAMES = ("ceilings", "gather", "decode", "prefill")


def _run_config(name: str, variant: str) -> config_lib.ModelConfig:
  """`_model_config` with the attention a run uses: the Pallas kernels on
  the GPU, XLA elsewhere (starts the backend)."""
  cfg = _model_config(name, variant)
  impl = "pallas" if jax.default_backend() == "gpu" else "xla"
  return dataclasses.replace(cfg, sparse=dataclasses.replace(
      cfg.sparse, implementation=impl))


def _model_config(name: str, variant: str) -> config_lib.ModelConfig:
  """The model config with the flag overrides; starts no JAX backend."""
  cfg = config_lib.ExperimentConfig.from_dict(
      _CONFIGS[name].get_config(f"variant={variant}").to_dict()).model
  if _LAYERS.value:
    cfg = dataclasses.replace(cfg, num_layers=_LAYERS.value)
  if _KV_HEADS.value:
    if _KV_HEADS.value < 1 or cfg.num_heads % _KV_HEADS.value:
      raise ValueError(f"--kv_heads={_KV_HEADS.value} must divide the "
                           f"{cfg.num_heads} query heads")
    cfg = dataclasses.replace(cfg, num_kv_heads=_KV_HEADS.value)
  return cfg


def _nosa_gamma() -> float:
  if _GAMMA_FROM.value is None:
    return _GAMMA_NOSA.value
  return synthetic.measured_gamma(_GAMMA_FROM.value)


def _protocol() -> decode_systems.Protocol:
  return decode_systems.Protocol(
      batch=_BATCH.value,
      offload_batches=tuple(int(b) for b in _OFFLOAD_BATCHES.value),
      gamma=(("nosa", _nosa_gamma()), ("infllmv2", _GAMMA_INFLLM.value)),
      cache_factor=_CACHE_FACTOR.value, steps=_STEPS.value,
      warmup=_WARMUP.value, gpu_fraction=_GPU_FRACTION.value,
      profile_dir=(os.path.join(_OUT.value, "profile") if _PROFILE.value
                   else None), largest=_LARGEST.value,
      emulated_hbm_gib=_EMULATED_HBM.value, host_fraction=_HOST_FRACTION.value,
      prefetch_accuracy=_PREFETCH_ACCURACY.value)


def _check_flags() -> None:
  if _EMULATED_HBM.value is not None and _EMULATED_HBM.value <= 0:
    raise ValueError(f"--emulated_hbm_gib={_EMULATED_HBM.value} must be "
                         "> 0")
  if not 0 < _HOST_FRACTION.value <= 0.9:
    raise ValueError(f"--host_fraction={_HOST_FRACTION.value} must be in "
                         "(0, 0.9]")
  for flag, allowed in ((_PARTS, _PART_NAMES),
                        (_SYSTEMS, decode_systems.SYSTEMS),
                        (_PREFILL_SYSTEMS, decode_systems.PREFILL_SYSTEMS)):
    unknown = [x for x in flag.value if x not in allowed]
    if unknown:
      raise ValueError(f"--{flag.name}: unknown {unknown}; allowed: "
                           f"{', '.join(allowed)}")


def _transfer_ceilings(results: dict, small: bool) -> cost_model.Hardware:
  """The ceilings / gather parts; the cost model's hardware from them."""
  hw = cost_model.H100
  if "ceilings" in _PARTS.value:
    c = results["ceilings"] = ceilings.measure_ceilings(small)
    print(f"HBM {c['hbm_bytes_per_s'] / 1e12:.2f} TB/s, bulk pinned->device "
          f"{c['pcie_bulk_bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
    hw = dataclasses.replace(hw, hbm_bytes_per_s=c["hbm_bytes_per_s"],
                             pcie_bytes_per_s=c["pcie_bulk_bytes_per_s"])
  if "gather" in _PARTS.value:
    results["gather"] = ceilings.measure_gather(small, hw.pcie_bytes_per_s)
    for g in results["gather"]:
      print(f"gather {g['method']} programs={g['programs']} "
            f"warps={g['num_warps']}: {g['bytes_per_s'] / 1e9:.2f} GB/s "
            f"({g['over_bulk']:.2f} of bulk)", flush=True)
    hw = dataclasses.replace(hw, pcie_bytes_per_s=max(
        g["bytes_per_s"] for g in results["gather"]))
    results["meta"]["cost_model_pcie"] = "best measured gather"
  return hw


def _decode(results, name, contexts, proto, hw, write, t_start) -> None:
  """The decode part: each planned run, one variant's weights at a time."""
  cfgs = {v: _run_config(name, v) for v in ("full", "infllmv2", "nosa")}
  runs = decode_systems.plan(_SYSTEMS.value, cfgs["full"], cfgs["nosa"],
                             contexts, proto, small=_RUNLOCAL.value)
  order = ("full", "infllmv2", "nosa")
  params = {}  # one variant's weights at a time (8B: 16 GB each)
  for run in sorted(runs, key=lambda r: order.index(r.variant)):
    if time.perf_counter() - t_start > _TIME_BUDGET.value:
      print(f"time budget: skipped {run.describe()}", flush=True)
      results.setdefault("skipped", []).append(run.describe())
      continue
    if run.variant not in params:
      params.clear()
      params[run.variant] = decode_systems.random_params(cfgs[run.variant])
    try:
      rec = decode_systems.run_decode(run, cfgs[run.variant],
                                      params[run.variant], hw, proto)
    except Exception as e:  # pylint: disable=broad-except
      msg = str(e).splitlines()[0][:300]
      print(f"FAILED {run.system} L={run.context} B={run.batch}: {msg}",
            flush=True)
      results.setdefault("failed", []).append(
          {"system": run.system, "context": run.context, "batch": run.batch,
           "error": msg})
      continue
    rec["model"] = name
    results["records"].append(rec)
    print(f"{rec['system']:>20} L={rec['context']} B={rec['batch']}: "
          f"{rec['tokens_per_s']:.1f} tok/s, {rec['step_ms']:.2f} ms/step"
          + ("" if rec["gamma"] is None else
             f", gamma {rec['gamma']:.3f}, "
             f"{rec['pcie_bytes_per_step'] / 1e6:.1f} MB/step")
          + f" (model serial {rec['model_serial_tokens_per_s']:.0f}, "
          f"overlapped {rec['model_overlapped_tokens_per_s']:.0f})",
          flush=True)
    write()


def _prefill(results, name, contexts, write, small) -> None:
  """The prefill part: each prefill system at each context."""
  cfg = _run_config(name, "nosa")
  params = decode_systems.random_params(cfg)
  chunk = 2 * cfg.sparse.block_size if small else _PREFILL_CHUNK.value
  for ctx in contexts:
    for system in _PREFILL_SYSTEMS.value:
      try:
        rec = decode_systems.run_prefill(system, cfg, params, ctx,
                                         _PREFILL_BATCH.value, chunk)
      except Exception as e:  # pylint: disable=broad-except
        msg = str(e).splitlines()[0][:300]
        print(f"FAILED prefill_{system} L={ctx}: {msg}", flush=True)
        results.setdefault("failed", []).append(
            {"system": f"prefill_{system}", "context": ctx, "error": msg})
        continue
      results.setdefault("prefill", []).append(rec)
      print(f"{rec['system']:>22} L={ctx} B={rec['batch']}: "
            f"{rec['prefill_tokens_per_s']:.0f} tok/s, peak GPU "
            f"{rec['peak_gpu_bytes'] / 2**30:.2f} GiB", flush=True)
      write()


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  _check_flags()
  small = _RUNLOCAL.value
  name = "tiny" if small else _MODEL.value
  contexts = [400] if small else [int(c) for c in _CONTEXTS.value]
  proto = _protocol()
  _model_config(name, "full")  # checks --kv_heads / --num_layers up front
  # Before JAX starts its GPU client: a pinned pool sized to the largest
  # store (a larger cap lets XLA's allocator pin most of the RAM).
  cfg = _model_config(name, "nosa")
  need = [0]
  if "decode" in _PARTS.value:
    need.append(decode_systems.largest_store_bytes(cfg, _SYSTEMS.value,
                                                   contexts, proto))
  if "prefill" in _PARTS.value:  # a chunked host prefill holds two stores
    need.append(2 * max(host_memory.host_store_bytes(
        cfg, _PREFILL_BATCH.value, c + cfg.sparse.block_size)
                        for c in contexts))
  host_memory.allow_pinned_host_memory(max(need))
  t_start = time.perf_counter()
  results = {"meta": harness.stamp(
      "decode_bench", model=name, steps=_STEPS.value, warmup=_WARMUP.value,
      num_layers_override=_LAYERS.value, kv_heads_override=_KV_HEADS.value,
      gamma_nosa=proto.gamma[0][1], gamma_nosa_from=_GAMMA_FROM.value),
             "records": []}

  def write():
    harness.write_results(_OUT.value, "decode_bench", results,
                          decode_report.table(results))
    harness.write_results(_OUT.value, "summary",
                          decode_report.summary(results))

  hw = _transfer_ceilings(results, small)
  write()
  if "decode" in _PARTS.value:
    _decode(results, name, contexts, proto, hw, write, t_start)
  if "prefill" in _PARTS.value:
    _prefill(results, name, contexts, write, small)
  write()
  decode_report.plot(results, os.path.join(_OUT.value, "decode_bench.png"))
  decode_report.plot_scaling(results, os.path.join(_OUT.value,
                                                   "scaling.png"))
  print(decode_report.table(results))


if __name__ == "__main__":
  cli.run(main, "decode_bench")
