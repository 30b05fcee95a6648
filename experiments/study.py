"""The quality studies' pieces (no flags): variants, units, their merge.

Issue 8's `quality_study` trains one model per variant; issue 24's
`recall_study` trains one per (variant, seed), a *unit*, and merges the
units that exist into:

* `summary.json` in the issue's schema, one list entry per seed:
  {"tokens", "context", "device", "commit", "variants": {name: {"seeds",
  "heldout_nll", "recall_beyond_window", "decode_gamma", "train_tok_s"}}};
* `study.json`: the verdict, the claims of issue 24's "Must show" each as
  holding / not holding / inconclusive, recall per distance bucket, gamma
  per layer, passkey accuracy, per variant and seed;
* `summary.md` (the tables), `recall.png` (recall by bucket) and
  `sweep.png` (the locality_weight sweep on nosa: decode gamma against
  held-out NLL and recall, gamma per layer).

How a claim is judged from its spread (`judge`): with fewer than 2 seeds
on either side it is inconclusive; it holds when it holds between the
least favourable seeds (e.g. NOSA's worst NLL against FullAttn's best), it
does not hold when it fails even between the most favourable ones, and
otherwise (the ranges straddle the line) it is inconclusive.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import re
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from nosa_jax import checkpoint
from nosa_jax import config as config_lib
from nosa_jax import data
from nosa_jax import evaluation
from nosa_jax import recall
from nosa_jax import train

_SPEC = re.compile(
    r"(full|infllmv2|dma|nosa)(?:_loc(\d+(?:\.\d*)?(?:e-?\d+)?))?")
CURVES = ("train/loss", "train/tokens_per_s", "train/locality_penalty",
          "eval/loss", "locality/gamma")
# The paper's decode gamma for NOSA and its guaranteed minimum (METHOD.md 5).
PAPER_GAMMA, GUARANTEED_GAMMA = 0.944, 0.75
# The variants the claims compare.
FULL, NOSA, PENALTY, INFLLM, DMA = ("full", "nosa", "nosa_loc0.1",
                                    "infllmv2", "dma")
# `penalty_overhead`'s result, merged from the first directory holding one.
PENALTY_FILE = "penalty_overhead.json"
# The bar: a penalty worth turning on costs at most this share.
PENALTY_BUDGET = 0.10


# ----------------------------------------------------------------------------
# Variants and units.
# ----------------------------------------------------------------------------


def parse_variants(text: str) -> list[tuple[str, str, float]]:
  """'full,nosa_loc0.1' -> [(name, variant, locality_weight), ...]."""
  out = []
  for name in filter(None, (s.strip() for s in text.split(","))):
    m = _SPEC.fullmatch(name)
    if not m or (m.group(1) == "full" and m.group(2)) or name in [
        o[0] for o in out]:
      raise config_lib.ConfigError(
          f"variants={text!r} is invalid: {name!r} must be one of full, "
          "infllmv2, dma, nosa, optionally with _loc<weight> for a sparse "
          "variant (e.g. nosa_loc0.1), each listed once")
    out.append((name, m.group(1), float(m.group(2) or 0.0)))
  return out


def variant_config(base: dict, variant: str, weight: float,
                   num_steps: int | None = None,
                   seed: int | None = None) -> config_lib.ExperimentConfig:
  """`base` (a config dict) with the variant, penalty weight and seed."""
  d = json.loads(json.dumps(base))  # a deep copy of plain data
  d["model"]["sparse"].update(variant=variant, locality_weight=weight)
  if num_steps:
    t = d["train"]
    t["num_steps"] = num_steps
    if t["warmup_steps"] >= num_steps // 2:  # keep most steps past warmup
      t["warmup_steps"] = num_steps // 10
  if seed is not None:  # init and data order: the same for every variant
    d["train"]["seed"] = seed
  return config_lib.ExperimentConfig.from_dict(d)


def eval_config(d: dict) -> evaluation.EvalConfig:
  """The config's `eval` section; errors name the `eval.` field."""
  known = {f.name for f in dataclasses.fields(evaluation.EvalConfig)}
  unknown = sorted(set(d) - known)
  if unknown:
    raise config_lib.ConfigError(
        f"eval.{unknown[0]} is not a known field; known fields: "
        f"{', '.join(sorted(known))}")
  try:
    return evaluation.EvalConfig(**d)
  except config_lib.ConfigError as e:
    raise config_lib.ConfigError(f"eval.{e}") from None


@dataclasses.dataclass(frozen=True)
class Unit:
  """One (variant, seed) of a study: one training run, one result file."""

  name: str  # e.g. nosa_loc0.1
  variant: str
  locality_weight: float
  seed: int

  @property
  def key(self) -> str:
    return f"{self.name}_s{self.seed}"

  @property
  def result_file(self) -> str:
    return f"unit_{self.key}.json"


def plan_units(plan: str) -> list[Unit]:
  """'full:3,nosa:2' -> seed-major units: full@0, nosa@0, full@1, ...

  Seed-major, so a study cut short holds every variant at the first seeds;
  list `full` first, so its first unit (the gate) runs first.
  """
  counts = []
  for item in filter(None, (s.strip() for s in plan.split(","))):
    name, _, n = item.partition(":")
    if not n.isdigit() or int(n) < 1:
      raise config_lib.ConfigError(
          f"study.plan={plan!r} is invalid: {item!r} must be name:seeds "
          "with seeds >= 1")
    counts.append((name, int(n)))
  specs = parse_variants(",".join(n for n, _ in counts))
  most = max((n for _, n in counts), default=0)
  return [Unit(name, variant, weight, seed) for seed in range(most)
          for (name, variant, weight), (_, n) in zip(specs, counts,
                                                     strict=True)
          if seed < n]


def parse_units(text: str) -> list[Unit]:
  """'full@0,nosa_loc0.1@2' -> units (an explicit list instead of a plan)."""
  out = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, _, seed = item.partition("@")
    if not seed.isdigit():
      raise config_lib.ConfigError(
          f"units={text!r} is invalid: {item!r} must be name@seed, e.g. "
          "nosa@1")
    ((name, variant, weight),) = parse_variants(name)
    out.append(Unit(name, variant, weight, int(seed)))
  return out


def run_unit(unit: Unit, cfg: config_lib.ExperimentConfig,
             ecfg: evaluation.EvalConfig, workdir: str, *,
             stamp: dict) -> dict:
  """Trains (or resumes) `unit` in `workdir` and evaluates its last step.

  Returns:
    The unit's JSON-ready result: `evaluation.evaluate`'s dict plus the
    unit, tokens, context, training curves (`CURVES`), train_tok_s (median
    of the logged throughput after the first, compiling, window; a resumed
    unit's curve spans its calls), seconds of this call, and `stamp`
    (device, commit, ...).
  """
  t0 = time.time()
  train.train_and_evaluate(cfg, workdir)
  t1 = time.time()
  _, params, step = evaluation.load_model(workdir=workdir)
  res = evaluation.evaluate(params, cfg, ecfg)
  if unit.variant == "full" and ecfg.recall_trials:
    try:
      res["dense_check"] = dense_check(params, cfg, ecfg)
    except Exception as e:  # pylint: disable=broad-except
      # A diagnostic (e.g. XLA's fp32 attention out of memory) must not
      # cost the unit its result.
      logging.exception("dense_check failed")
      res["dense_check"] = {"error": f"{type(e).__name__}: {e}"[:500]}
  curves = evaluation.read_scalars(os.path.join(workdir, "tensorboard"))
  tps = [v for _, v in curves.get("train/tokens_per_s", [])[1:]]
  res.update(
      unit=dataclasses.asdict(unit), step=step,
      tokens=step * cfg.train.batch_size * cfg.train.seq_len,
      context=cfg.train.seq_len,
      train_tok_s=float(np.median(tps)) if tps else None,
      train_seconds=t1 - t0, eval_seconds=time.time() - t1,
      config=dataclasses.asdict(cfg), stamp=stamp,
      curves={k: v for k, v in curves.items() if k in CURVES})
  return res


def dense_check(params: Any, cfg: config_lib.ExperimentConfig,
                ecfg: evaluation.EvalConfig, trials: int = 8) -> dict:
  """Rules out a defect of the dense path (issue 24): the first `trials`
  recall documents per bucket through the attention training used (cuDNN
  for bf16 on a GPU) and through XLA's in fp32, one document per call.

  Returns:
    {"trials", "beyond_window": {"trained_path", "xla_fp32"},
    "accuracy": {"trained_path", "xla_fp32"}} (per bucket).
  """
  ds = data.load_datasets(cfg.data, cfg.train.seq_len, cfg.train.seed)
  out: dict[str, Any] = {"trials": min(trials, ecfg.recall_trials),
                         "beyond_window": {}, "accuracy": {}}
  for name, mc in (("trained_path", cfg.model),
                   ("xla_fp32", dataclasses.replace(cfg.model,
                                                    dtype="float32"))):
    r = evaluation.recall_by_distance(
        evaluation.greedy_predict_fn(params, mc), ds.tokenizer,
        ds.eval.tokens, context=cfg.train.seq_len, trials=out["trials"],
        distractors=ecfg.recall_distractors, seed=ecfg.recall_seed,
        batch_size=1, sparse=mc.sparse, vocab_size=mc.vocab_size)
    out["beyond_window"][name] = r["beyond_window"]
    out["accuracy"][name] = r["accuracy"]
  return out


def measure_step_seconds(cfg: config_lib.ExperimentConfig,
                         steps: int = 5) -> float:
  """Seconds per train step after compilation, on a real batch."""
  ds = data.load_datasets(cfg.data, cfg.train.seq_len, cfg.train.seed)
  graphdef, state, tx = train.init_state(cfg)
  step = jax.jit(functools.partial(train.train_step, graphdef=graphdef,
                                   cfg=cfg.model, tx=tx), donate_argnums=0)
  batch = jnp.asarray(ds.train.batch_at(0, cfg.train.batch_size))
  state, m = step(state, batch)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  return (time.perf_counter() - t0) / steps


def penalty_overhead(base: dict, weight: float = 0.1,
                     steps: int = 10) -> dict:
  """Step time of nosa without the locality penalty, with the exact one
  and, when `base` samples it (model.sparse.locality_sample_fraction < 1),
  with the sampled one its nosa_loc units train with; one process (issue
  24: a penalty you would turn on costs <= 10% of the step).

  Returns:
    {"step_seconds": {"nosa": s, "nosa_loc<weight>": s (base's fraction),
    "nosa_loc<weight>_exact": s (only when sampled)}, "overhead":
    s_loc / s_nosa - 1 (the penalty of base's units), "overhead_exact":
    the exact penalty's, "sample_fraction", "steps", "weight"}.
  """
  fraction = float(base["model"]["sparse"].get("locality_sample_fraction",
                                               1.0))
  name = f"nosa_loc{weight:g}"
  runs = [("nosa", 0.0, 1.0), (name, weight, fraction)]
  if fraction < 1.0:
    runs.append((f"{name}_exact", weight, 1.0))
  sec = {}
  for key, w, f in runs:
    d = json.loads(json.dumps(base))
    d["model"]["sparse"]["locality_sample_fraction"] = f
    sec[key] = measure_step_seconds(variant_config(d, "nosa", w), steps)
    logging.info("%s (sample fraction %g): %.4f s per step", key, f,
                 sec[key])
  exact = sec.get(f"{name}_exact", sec[name])
  return {"step_seconds": sec, "overhead": sec[name] / sec["nosa"] - 1.0,
          "overhead_exact": exact / sec["nosa"] - 1.0,
          "sample_fraction": fraction, "steps": steps, "weight": weight}


def penalty_line(penalty: dict) -> str:
  """`penalty_overhead`'s result (with its stamp) as summary.md's line."""
  ok = penalty["overhead"] <= PENALTY_BUDGET
  fraction = penalty.get("sample_fraction", 1.0)  # older files: exact
  sampled = f", sampled at fraction {fraction:g}" if fraction < 1 else ""
  exact = (f" (exact penalty: {100 * penalty['overhead_exact']:+.1f}%)"
           if fraction < 1 else "")
  return (f"Locality penalty (weight {penalty['weight']:g}{sampled}): "
          f"{100 * penalty['overhead']:+.1f}% of nosa's step time{exact}, "
          f"one process on {penalty['stamp'].get('device')}: "
          f"{'holding' if ok else 'not holding'} against <= "
          f"{100 * PENALTY_BUDGET:.0f}%.")


def finished(dirs: Sequence[str]) -> dict[str, str]:
  """unit key -> path of its result, over `dirs` (the first one wins)."""
  out: dict[str, str] = {}
  for d in dirs:
    for path in sorted(glob.glob(os.path.join(d, "unit_*.json"))):
      out.setdefault(os.path.basename(path)[5:-5], path)
  return out


def load_units(dirs: Sequence[str]) -> list[dict]:
  """Every finished unit's result in `dirs`, ordered by name and seed."""
  units = []
  for path in finished(dirs).values():
    with open(path) as f:
      units.append(json.load(f))
  return sorted(units, key=lambda u: (u["unit"]["name"], u["unit"]["seed"]))


# ----------------------------------------------------------------------------
# Merge: summary.json, claims, tables, plots.
# ----------------------------------------------------------------------------


def _gamma(u: dict) -> float | None:
  return u["gamma"]["mean"] if u.get("gamma") else None


def _recall(u: dict, key: str = "beyond_window") -> Any:
  return u["recall"][key] if u.get("recall") else None


def summarize(units: Sequence[dict]) -> dict:
  """issue 24's summary.json from unit results (one entry per seed)."""
  variants: dict[str, dict[str, list]] = {}
  for u in units:
    v = variants.setdefault(u["unit"]["name"], {
        "seeds": [], "heldout_nll": [], "recall_beyond_window": [],
        "decode_gamma": [], "train_tok_s": []})
    v["seeds"].append(u["unit"]["seed"])
    v["heldout_nll"].append(u["perplexity"]["nll"])
    v["recall_beyond_window"].append(_recall(u))
    v["decode_gamma"].append(_gamma(u))
    v["train_tok_s"].append(u.get("train_tok_s"))
  def one(values, what):
    values = sorted({str(x) for x in values})
    if len(values) > 1:
      logging.warning("units differ in %s: %s", what, values)
    return ", ".join(values)
  tokens = [u["tokens"] for u in units]
  return {
      "tokens": max(tokens) if tokens else 0,
      "context": max((u["context"] for u in units), default=0),
      "device": one((u["stamp"].get("device") for u in units), "device"),
      "commit": one((u["stamp"].get("commit") for u in units), "commit"),
      "variants": variants}


def _values(summary: dict, name: str, key: str) -> list[float]:
  v = summary["variants"].get(name, {})
  return [x for x in v.get(key, []) if x is not None]


def judge(worst: float, best: float, n: int, line: str) -> dict:
  """A claim `value >= 0` judged at its least / most favourable seeds."""
  if n < 2:
    status = "inconclusive"
    why = "fewer than 2 seeds on a side"
  elif worst >= 0:
    status, why = "holding", "holds between the least favourable seeds"
  elif best < 0:
    status, why = "not holding", "fails even between the most favourable seeds"
  else:
    status, why = "inconclusive", "the seeds' ranges straddle the line"
  return {"status": status, "why": why, "line": line}


def _compare(summary: dict, a: str, b: str, key: str,
             margin: Callable[[float, float], float], line: str) -> dict:
  """Judges margin(x_a, x_b) >= 0 over the seeds' ranges of a and b; margin
  grows with x_a and shrinks with x_b."""
  xa, xb = _values(summary, a, key), _values(summary, b, key)
  if not xa or not xb:
    return {"status": "inconclusive", "why": f"no {a} or no {b} units",
            "line": line}
  out = judge(margin(min(xa), max(xb)), margin(max(xa), min(xb)),
              min(len(xa), len(xb)), line)
  out.update({a: _stats(xa), b: _stats(xb)})
  return out


def _stats(x: Sequence[float]) -> dict:
  return {"mean": float(np.mean(x)), "min": float(np.min(x)),
          "max": float(np.max(x)), "n": len(x)}


def dense_gate(summary: dict, gate: float) -> tuple[bool | None, str]:
  """(passed, verdict): None while no full unit has finished."""
  full = _values(summary, FULL, "recall_beyond_window")
  if not full:
    return None, ("no finished full unit: the dense gate is undecided; "
                  "nothing is compared yet")
  mean = float(np.mean(full))
  if mean < gate:
    return False, (f"the dense baseline does not retrieve ({mean:.3f} < "
                   f"{gate:.2f} held-out recall beyond the window, mean of "
                   f"{len(full)} seed(s)): the comparison stops here")
  return True, (f"the dense baseline retrieves ({mean:.3f} >= {gate:.2f} "
                "held-out recall beyond the window, mean of "
                f"{len(full)} seed(s))")


def claims(summary: dict, gate: float) -> tuple[str, dict[str, dict]]:
  """(verdict, claims): the dense gate, then issue 24's "Must show"."""
  passed, verdict = dense_gate(summary, gate)
  if not passed:
    return verdict, {}
  out = {
      "nosa_nll_within_2pct_of_full": _compare(
          summary, FULL, NOSA, "heldout_nll",
          lambda f, n: 0.02 - (n / f - 1.0),
          "NOSA's held-out NLL within 2% of FullAttn's"),
      "nosa_recall_within_5pts_of_full": _compare(
          summary, NOSA, FULL, "recall_beyond_window",
          lambda n, f: n - (f - 0.05),
          "NOSA recall beyond the window >= FullAttn - 5 points"),
      "nosa_gamma_above_infllmv2": _compare(
          summary, NOSA, INFLLM, "decode_gamma", lambda n, i: n - i - 1e-12,
          "NOSA decode gamma > InfLLMv2's"),
      "dma_retrieves_less_than_nosa": _compare(
          summary, NOSA, DMA, "recall_beyond_window",
          lambda n, d: n - d - 1e-12,
          "DMA recall beyond the window < NOSA's"),
      "penalty_lifts_recall": _compare(
          summary, PENALTY, NOSA, "recall_beyond_window",
          lambda p, n: p - n - 1e-12,
          "nosa_loc0.1 recall beyond the window > nosa's (issue 8's "
          "single-seed passkey jump, on the recall task)"),
  }
  return verdict, out


def _fmt_range(x: Sequence[float], digits: int = 3, scale: float = 1.0
               ) -> str:
  x = [v * scale for v in x if v is not None]
  if not x:
    return "-"
  if len(x) == 1:
    return f"{x[0]:,.{digits}f}"
  return (f"{np.mean(x):,.{digits}f} [{min(x):,.{digits}f}-"
          f"{max(x):,.{digits}f}]")


def tables(summary: dict, units: Sequence[dict], verdict: str,
           found: dict[str, dict]) -> str:
  """summary.md: per-variant figures (mean [min-max] over seeds), recall
  by bucket, the verdict and the claims."""
  names = [n for n, _ in recall.BUCKETS]
  by_name: dict[str, list[dict]] = {}
  for u in units:
    by_name.setdefault(u["unit"]["name"], []).append(u)
  lines = [f"{summary['tokens']:,} tokens per unit, context "
           f"{summary['context']}, {summary['device']}, commit "
           f"{summary['commit']}; mean [min-max] over seeds.", "",
           "| variant | seeds | held-out NLL | recall beyond window | "
           "decode gamma | passkey | train k tok/s |",
           "|---|---|---|---|---|---|---|"]
  for name, v in summary["variants"].items():
    pk = [u["passkey"]["overall"] for u in by_name[name] if u.get("passkey")]
    lines.append(
        f"| {name} | {','.join(map(str, v['seeds']))} | "
        f"{_fmt_range(v['heldout_nll'], 4)} | "
        f"{_fmt_range(v['recall_beyond_window'])} | "
        f"{_fmt_range(v['decode_gamma'])} | {_fmt_range(pk)} | "
        f"{_fmt_range(v['train_tok_s'], 0, 1e-3)} |")
  lines += ["", "Held-out recall by distance (mean [min-max]):", "",
            "| variant | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names)]
  for name, us in by_name.items():
    cells = [_fmt_range([_recall(u, "accuracy")[b] for u in us
                         if u.get("recall")]) for b in names]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  checks = [(u["unit"]["seed"], u["dense_check"]) for u in
            by_name.get(FULL, []) if (u.get("dense_check") or {}).get(
                "beyond_window")]
  if checks:
    lines += ["", "Dense path check (recall beyond the window, the first "
              f"{checks[0][1]['trials']} documents per bucket): " + "; ".join(
                  f"seed {seed}: as trained "
                  f"{c['beyond_window']['trained_path']:.3f}, XLA fp32 "
                  f"{c['beyond_window']['xla_fp32']:.3f}"
                  for seed, c in checks) + "."]
  lines += ["", f"Verdict: {verdict}.", ""]
  for c in found.values():
    lines.append(f"- {c['line']}: **{c['status']}** ({c['why']})")
  return "\n".join(lines) + "\n"


def plot(units: Sequence[dict], out_dir: str) -> list[str]:
  """recall.png and sweep.png; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  paths = [os.path.join(out_dir, f) for f in ("recall.png", "sweep.png")]
  names = [n for n, _ in recall.BUCKETS]
  by_name: dict[str, list[dict]] = {}
  for u in units:
    if u.get("recall"):
      by_name.setdefault(u["unit"]["name"], []).append(u)

  fig, ax = plt.subplots(figsize=(7, 3.6))
  for i, (name, us) in enumerate(by_name.items()):
    acc = np.array([[u["recall"]["accuracy"][b] for b in names] for u in us])
    x = np.arange(len(names)) + 0.8 * (i / max(len(by_name), 1) - 0.4)
    mean = acc.mean(0)
    ax.errorbar(x, mean, yerr=[mean - acc.min(0), acc.max(0) - mean],
                fmt="o", capsize=3, label=f"{name} ({len(us)} seeds)")
  ax.set_xticks(range(len(names)), names)
  ax.set(title="held-out recall by distance (mean, min-max over seeds)",
         ylabel="exact match", ylim=(-0.05, 1.05))
  ax.grid(alpha=0.3)
  if by_name:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(paths[0], dpi=90)
  plt.close(fig)

  sweep = sorted((u for u in units if u["unit"]["variant"] == "nosa"
                  and u.get("gamma")),
                 key=lambda u: u["unit"]["locality_weight"])
  weights = sorted({u["unit"]["locality_weight"] for u in sweep})
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
  for k, w in enumerate(weights):
    us = [u for u in sweep if u["unit"]["locality_weight"] == w]
    g = [_gamma(u) for u in us]
    for ax, ys in ((axes[0], [u["perplexity"]["nll"] for u in us]),
                   (axes[1], [_recall(u) for u in us])):
      pts = [(a, b) for a, b in zip(g, ys, strict=True) if b is not None]
      if pts:
        ax.scatter(*zip(*pts, strict=True), color=f"C{k}",
                   label=f"weight {w:g}")
    per_layer = np.mean([u["gamma"]["per_layer"] for u in us], axis=0)
    axes[2].plot(per_layer, marker="o", color=f"C{k}", label=f"weight {w:g}")
  for ax, ylabel in zip(axes[:2], ("held-out NLL",
                                   "recall beyond the window"), strict=True):
    for x, what in ((PAPER_GAMMA, "paper"), (GUARANTEED_GAMMA, "bound")):
      ax.axvline(x, color="gray", ls=":", lw=1)
      ax.text(x, ax.get_ylim()[1], what, fontsize=7, ha="right", va="top")
    ax.set(xlabel="decode gamma (mean over layers)", ylabel=ylabel)
    ax.grid(alpha=0.3)
  axes[1].set_ylim(-0.05, 1.05)
  axes[2].axhline(GUARANTEED_GAMMA, color="gray", ls=":", lw=1)
  axes[2].set(xlabel="layer", ylabel="decode gamma (mean over seeds)")
  axes[2].xaxis.get_major_locator().set_params(integer=True)
  axes[2].grid(alpha=0.3)
  fig.suptitle("nosa locality_weight sweep: one point per seed")
  if weights:
    axes[2].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(paths[1], dpi=90)
  plt.close(fig)
  return paths


def merge(dirs: Sequence[str], summary_dir: str, gate: float) -> str | None:
  """Rebuilds summary.json, study.json, summary.md and the plots in
  `summary_dir` from the finished units in `dirs`; returns the verdict."""
  units = load_units(dirs)
  if not units:
    logging.warning("no unit_*.json in %s: nothing to merge", dirs)
    return None
  summary = summarize(units)
  verdict, found = claims(summary, gate)
  checkpoint.writable_dir(summary_dir, "--summary_dir")
  checkpoint.write_json_atomic(os.path.join(summary_dir, "summary.json"),
                               summary)
  names = [n for n, _ in recall.BUCKETS]
  detail: dict[str, dict] = {}
  for u in units:
    d = detail.setdefault(u["unit"]["name"], {
        "seeds": [], "recall_by_bucket": {b: [] for b in names},
        "recall_answer_nll_beyond_window": [], "gamma_per_layer": [],
        "passkey": [], "tokens": [], "dense_check": []})
    d["seeds"].append(u["unit"]["seed"])
    for b in names:
      d["recall_by_bucket"][b].append(
          _recall(u, "accuracy")[b] if u.get("recall") else None)
    d["recall_answer_nll_beyond_window"].append(
        _recall(u, "beyond_window_answer_nll"))
    d["gamma_per_layer"].append(u["gamma"]["per_layer"] if u.get("gamma")
                                else None)
    d["passkey"].append(u["passkey"]["overall"] if u.get("passkey")
                        else None)
    d["tokens"].append(u["tokens"])
    d["dense_check"].append(u.get("dense_check"))
  # Within NOSA, so judged whatever the dense gate says: did issue 8's
  # single-seed passkey jump from the penalty survive more seeds?
  found["penalty_lifts_passkey"] = _compare(
      {"variants": detail}, PENALTY, NOSA, "passkey",
      lambda p, n: p - n - 1e-12,
      "nosa_loc0.1 passkey accuracy > nosa's (issue 8's single-seed jump; "
      "judged even when the dense gate fails)")
  penalty = None
  for d in dirs:
    if os.path.exists(os.path.join(d, PENALTY_FILE)):
      with open(os.path.join(d, PENALTY_FILE)) as f:
        penalty = json.load(f)
      break
  checkpoint.write_json_atomic(
      os.path.join(summary_dir, "study.json"),
      {"gate": gate, "verdict": verdict, "claims": found, "variants": detail,
       "penalty_overhead": penalty})
  md = tables(summary, units, verdict, found)
  if penalty:
    md += "\n" + penalty_line(penalty) + "\n"
  with open(os.path.join(summary_dir, "summary.md"), "w") as f:
    f.write(md)
  try:
    plot(units, summary_dir)
  except ImportError:  # e.g. a GPU image without matplotlib
    logging.warning("matplotlib is not installed: no PNGs; merge again "
                    "where it is")
  print(md, end="")
  return verdict
