"""What a decode benchmark concludes: verdict lines, the table, the plot.

  verdicts(records)     plain-language comparisons from measured records
  table(results)        the markdown table (ceilings, fetch, records,
                        verdicts) that WORKSPACE.md quotes
  plot(results, path)   tokens/s per record against the cost model
  summary(results)      the flat rows of experiments/results/offload/
                        summary.json (one per measured point)
  plot_scaling(results, path)  tokens/s against context (each system at its
                        largest measured batch) and against batch
"""

from __future__ import annotations

import numpy as np


def verdicts(records: list[dict]) -> list[str]:
  """Plain-language comparisons the issue asks for, from measured records.

  For each (context, batch) with both a GPU-resident and an offloaded run of
  a variant: which is faster and by how much; NOSA vs InfLLMv2 offloaded;
  and NOSA offloaded vs FullAttn at its largest batch at the same context.
  """
  by = {(r["system"], r["context"], r["batch"]): r for r in records}
  out = []
  for (system, ctx, b), r in sorted(by.items()):
    if not system.endswith(("_offload", "_offload_fused",
                            "_offload_prefetch", "_offload_dma")):
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


def table(results: dict) -> str:
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
  if results.get("prefill"):
    lines += ["", "| prefill system | L | B | chunk | tokens/s | s "
              "| peak GPU GiB |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['system']} | {r['context']} | {r['batch']} | "
              f"{r['chunk'] or '-'} | {r['prefill_tokens_per_s']:.0f} | "
              f"{r['prefill_s']:.2f} | {r['peak_gpu_bytes'] / 2**30:.1f} |"
              for r in results["prefill"]]
  found = verdicts(results["records"])
  if found:
    lines += [""] + [f"- {v}" for v in found]
  return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
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


def _resident_step_ms(records: list[dict]) -> dict:
  """(variant, context, batch) -> step ms of the GPU-resident run."""
  return {(r["variant"], r["context"], r["batch"]): r["step_ms"]
          for r in records if r["system"].endswith("_gpu")}


def summary(results: dict) -> dict:
  """One row per measured point (the offload issue's summary.json).

  t_gpu_ms: the GPU-resident step of the same variant, context and batch
  measured in this run (the step without transfers), else null. t_pcie_ms:
  the step's host -> device bytes over the bulk pinned -> device bandwidth
  measured in this run, else null. prefetch_hits / misses / wasted: the
  engine's prefetch counters where a record has them, else null.
  """
  meta, recs = results["meta"], results["records"]
  resident = _resident_step_ms(recs)
  bulk = results.get("ceilings", {}).get("pcie_bulk_bytes_per_s")
  rows = []
  for r in recs:
    offload = "_offload" in r["system"]
    rows.append({
        "system": r["system"], "context": r["context"], "batch": r["batch"],
        "emulated_hbm_gib": r.get("emulated_hbm_gib"),
        "gamma": r["gamma"] if r["gamma"] is not None else 1.0,
        "step_ms": r["step_ms"], "tokens_per_s": r["tokens_per_s"],
        "t_gpu_ms": resident.get((r["variant"], r["context"], r["batch"])),
        "t_pcie_ms": (1e3 * r["pcie_bytes_per_step"] / bulk
                      if offload and bulk else None),
        "prefetch_hits": r.get("prefetch_hits"),
        "misses": r.get("misses"), "wasted": r.get("wasted")})
  return {"device": meta["device"], "date": meta["date"],
          "commit": meta["commit"], "rows": rows}


def plot_scaling(results: dict, path: str) -> None:
  """Two panels: tokens/s against context (each system at the largest batch
  it ran), and against batch (one line per system and context)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  recs = results["records"]
  if not recs:
    return
  fig, (ax_l, ax_b) = plt.subplots(1, 2, figsize=(12, 4.5))
  for system in sorted({r["system"] for r in recs}):
    mine = [r for r in recs if r["system"] == system]
    by_ctx = {}
    for r in mine:
      if r["batch"] >= by_ctx.get(r["context"], {"batch": -1})["batch"]:
        by_ctx[r["context"]] = r
    ctxs = sorted(by_ctx)
    ax_l.plot(ctxs, [by_ctx[c]["tokens_per_s"] for c in ctxs], "o-",
              label=system)
    for ctx in ctxs:
      pts = sorted((r["batch"], r["tokens_per_s"]) for r in mine
                   if r["context"] == ctx)
      ax_b.plot([x for x, _ in pts], [y for _, y in pts], "o-",
                label=f"{system} L={ctx}")
  emulated = {r.get("emulated_hbm_gib") for r in recs} - {None}
  note = (f", EMULATED HBM {sorted(emulated)} GiB" if emulated else "")
  ax_l.set(xscale="log", yscale="log", xlabel="context (tokens)",
           ylabel="decode tokens/s",
           title=f"at each system's largest batch{note}")
  ax_b.set(xscale="log", yscale="log", xlabel="batch",
           ylabel="decode tokens/s", title=results["meta"]["device"])
  ax_l.legend(fontsize=7)
  ax_b.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
