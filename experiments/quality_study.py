r"""Quality study (issue 8): train each variant on the same tokens, evaluate.

  # on the GPU machine, one variant per call (it keeps nothing in between):
  python -m experiments.quality_study --config=configs/quality.py \
      --variants=nosa --out_dir=$OUT/quality
  # here, with the variant_*.json files of all calls in one DIR: plots only
  python -m experiments.quality_study --config=configs/quality.py \
      --variants= --out_dir=DIR
  # CPU smoke run
  python -m experiments.quality_study --config=configs/quality.py:runlocal \
      --variants=full,nosa --out_dir=/tmp/quality

--variants: full, infllmv2, dma, nosa, each optionally with `_loc<weight>`
(the differentiable locality penalty, e.g. nosa_loc0.1).

Token budget, the same for every variant: `config.train.num_steps` steps of
batch_size x seq_len tokens. With --minutes_per_variant=M instead, the step
time of the first listed variant is measured (one extra compilation plus a
few timed steps; list the slowest variant first) and num_steps = M minutes
of it, used for every variant of this call. The JSON records num_steps, so
later calls can pass it as --config.train.num_steps.

Per variant, OUT_DIR/variant_<name>.json holds the training curves (train
and eval loss, locality) read back from TensorBoard, wall times and
`nosa_jax.evaluation.evaluate` (held-out perplexity, passkey accuracy by
length x depth, decode gamma per layer). After every variant, quality.json
(one row per variant) and loss.png, passkey.png, gamma.png, tradeoff.png
(gamma, NLL, passkey beyond the window and speed side by side) are rebuilt
from all variant files in OUT_DIR, so a call cut short keeps what it
finished.
Without matplotlib (a bare GPU image) only the JSONs are written; the
plotting lives here, not in the library, as matplotlib is a dev dependency.
Checkpoints stay in --work_dir; a variant's old workdir there is removed
first unless --resume.
"""

import dataclasses
import glob
import json
import os
import shutil
import sys
import time

from absl import flags
from absl import logging
import numpy as np
from ml_collections import config_flags

from experiments import cli
from experiments import study
from nosa_jax import checkpoint
from nosa_jax import config as config_lib
from nosa_jax import evaluation
from nosa_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "configs/quality.py[:runlocal]", lock_config=True)
_VARIANTS = flags.DEFINE_string(
    "variants", "full,infllmv2,dma,nosa",
    "Comma-separated variants, e.g. full,nosa,nosa_loc0.1; empty: only "
    "rebuild the summary and plots from OUT_DIR.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Results (JSON + PNG).")
_WORK_DIR = flags.DEFINE_string("work_dir", "/tmp/quality_runs",
                                "Training workdirs (checkpoints).")
_RESUME = flags.DEFINE_bool(
    "resume", False, "Resume a variant's workdir instead of starting it "
    "afresh (the default removes WORK_DIR/<variant> first).")
_MINUTES = flags.DEFINE_float(
    "minutes_per_variant", 0.0, "If > 0, size num_steps from the measured "
    "step time of the first variant; else config.train.num_steps.")
flags.mark_flags_as_required(["config", "out_dir"])


def run_variant(name: str, cfg: config_lib.ExperimentConfig,
                ecfg: evaluation.EvalConfig, workdir: str) -> dict:
  """Trains (or resumes) in workdir, evaluates the final checkpoint."""
  t0 = time.time()
  last = train.train_and_evaluate(cfg, workdir)
  t1 = time.time()
  _, params, step = evaluation.load_model(workdir=workdir)
  res = evaluation.evaluate(params, cfg, ecfg)
  curves = evaluation.read_scalars(os.path.join(workdir, "tensorboard"))
  res.update(
      name=name, step=step,
      tokens=step * cfg.train.batch_size * cfg.train.seq_len,
      train_seconds=t1 - t0, eval_seconds=time.time() - t1,
      final_train=last, config=dataclasses.asdict(cfg),
      curves={k: v for k, v in curves.items() if k in study.CURVES})
  return res


def _outside(pk: dict | None, key: str) -> float | None:
  """Mean `key` over the cells whose needles all lie outside the forced
  sink + window blocks: retrieval that needs the selection to work."""
  if not pk or "outside_forced" not in pk:
    return None
  grid, out = np.array(pk[key]), np.array(pk["outside_forced"])
  return float(grid[out == 1.0].mean()) if np.any(out == 1.0) else None


def summarize(results: list[dict]) -> list[dict]:
  """One row per variant: budget, speed, loss, passkey, gamma."""
  rows = []
  for r in results:
    tps = [v for _, v in r["curves"].get("train/tokens_per_s", [])[1:]]
    rows.append({
        "name": r["name"], "variant": r["model"]["variant"],
        "locality_weight": r["config"]["model"]["sparse"]["locality_weight"],
        "steps": r["step"], "tokens": r["tokens"],
        "params": r["model"]["num_params"],
        "tokens_per_s": float(np.median(tps)) if tps else None,
        "train_seconds": r["train_seconds"],
        "heldout_nll": r["perplexity"]["nll"],
        "heldout_ppl": r["perplexity"]["ppl"],
        "passkey": r["passkey"]["overall"] if r["passkey"] else None,
        "passkey_by_length": (r["passkey"]["accuracy_by_length"]
                              if r["passkey"] else None),
        "passkey_outside_window": _outside(r["passkey"], "accuracy"),
        "passkey_answer_nll": (r["passkey"]["overall_answer_nll"]
                               if r["passkey"] else None),
        "passkey_answer_nll_outside_window": _outside(r["passkey"],
                                                      "answer_nll"),
        "gamma": r["gamma"]["mean"] if r["gamma"] else None,
        # Share of decode misses a one-layer-ahead guess would prefetch
        # (evaluation.next_layer_prediction; absent in older results).
        "next_layer_coverage": ((r["gamma"] or {}).get(
            "next_layer_prediction") or {}).get("coverage")})
  return rows


def plot(results: list[dict], out_dir: str) -> list[str]:
  """loss.png, passkey.png, gamma.png, tradeoff.png; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  paths = [os.path.join(out_dir, f) for f in
           ("loss.png", "passkey.png", "gamma.png", "tradeoff.png")]

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for r in results:
    per_step = r["tokens"] / max(r["step"], 1)
    for ax, tag in zip(axes, ("train/loss", "eval/loss"), strict=True):
      pts = np.array(r["curves"].get(tag, []), float).reshape(-1, 2)
      ax.plot(pts[:, 0] * per_step / 1e6, pts[:, 1], marker=".",
              label=r["name"])
  for ax, title in zip(axes, ("train loss", "held-out loss"), strict=True):
    ax.set(title=title, xlabel="training tokens (M)", ylabel="nats/token")
    ax.grid(alpha=0.3)
  axes[1].legend()
  fig.tight_layout()
  fig.savefig(paths[0], dpi=90)
  plt.close(fig)

  pk = [r for r in results if r["passkey"]]
  n = max(len(pk), 1)
  fig, axes = plt.subplots(3, n, squeeze=False, figsize=(3.2 * n, 9.0))
  # Exact match, fraction of answer tokens right, answer NLL (chance for a
  # digit is ln 10): the last two still rank models that never retrieve.
  rows = (("accuracy", "exact match", 1.0, "viridis"),
          ("token_accuracy", "answer tokens right", 1.0, "viridis"),
          ("answer_nll", "answer NLL (nats)", np.log(10), "viridis_r"))
  for col, r in enumerate(pk):
    p = r["passkey"]
    for row, (key, what, vmax, cmap) in enumerate(rows):
      ax = axes[row, col]
      grid = np.array(p[key]).T  # [depth, length]
      ax.imshow(grid, vmin=0, vmax=vmax, cmap=cmap, origin="lower",
                aspect="auto")
      for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="w" if (v < vmax / 2) == (row < 2) else "k")
      ax.set_xticks(range(len(p["lengths"])), p["lengths"])
      ax.set_yticks(range(len(p["depths"])), p["depths"])
      ax.set(title=f"{r['name']}: {what}" if row == 0 else what,
             xlabel="context (tokens)", ylabel="depth")
  fig.tight_layout()
  fig.savefig(paths[1], dpi=90)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(5, 3.4))
  for r in results:
    if r["gamma"]:
      ax.plot(r["gamma"]["per_layer"], marker="o", label=r["name"])
  ax.set(title="decode locality gamma", xlabel="layer", ylabel="gamma")
  ax.xaxis.get_major_locator().set_params(integer=True)
  ax.grid(alpha=0.3)
  if any(r["gamma"] for r in results):
    ax.legend()
  fig.tight_layout()
  fig.savefig(paths[2], dpi=90)
  plt.close(fig)

  # The trade-off in one picture: what each variant (the locality penalty
  # included) buys in locality and retrieval, and pays in loss and speed.
  rows = summarize(results)
  panels = (("gamma", "decode gamma"), ("heldout_nll", "held-out NLL"),
            ("passkey_outside_window", "passkey beyond sink + window"),
            ("tokens_per_s", "train k tokens/s"))
  fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.2))
  names = [r["name"] for r in rows]
  for ax, (key, title) in zip(axes, panels, strict=True):
    scale = 1e-3 if key == "tokens_per_s" else 1.0
    vals = [np.nan if r[key] is None else r[key] * scale for r in rows]
    ax.bar(range(len(rows)), vals, color=[f"C{i}" for i in range(len(rows))])
    for i, v in enumerate(vals):
      if np.isfinite(v):
        ax.text(i, v, f"{v:.3g}" if v < 100 else f"{v:,.0f}", ha="center",
                va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right",
                  fontsize=8)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(paths[3], dpi=90)
  plt.close(fig)
  return paths


def _fmt(x: float | None, digits: int = 3) -> str:
  return "-" if x is None else f"{x:,.{digits}f}"


def rebuild(out_dir: str) -> None:
  """quality.json and the plots from every variant_*.json in out_dir."""
  results = []
  for path in sorted(glob.glob(os.path.join(out_dir, "variant_*.json"))):
    with open(path) as f:
      results.append(json.load(f))
  if not results:
    logging.warning("no variant_*.json in %s: nothing to summarize", out_dir)
    return
  rows = summarize(results)
  checkpoint.write_json_atomic(os.path.join(out_dir, "quality.json"),
                               {"rows": rows})
  try:
    plot(results, out_dir)
  except ImportError:  # e.g. a GPU image without matplotlib
    logging.warning("matplotlib is not installed: no PNGs; run again with "
                    "--variants= --out_dir=%s where it is", out_dir)
  for r in rows:
    print(f"{r['name']:>14} | {r['steps']} steps, {r['tokens'] / 1e6:.1f}M "
          f"tokens | held-out NLL {r['heldout_nll']:.4f} | passkey "
          f"{_fmt(r['passkey'])} (answer NLL "
          f"{_fmt(r['passkey_answer_nll'])}) | gamma {_fmt(r['gamma'])} "
          f"(next-layer guess covers {_fmt(r['next_layer_coverage'])}) | "
          f"tokens/s {_fmt(r['tokens_per_s'], 0)}")


def main(argv):
  del argv
  train.quiet_library_logs()
  try:
    specs = study.parse_variants(_VARIANTS.value)
    base = _CONFIG.value.to_dict()
    ecfg = study.eval_config(base.pop("eval", {}))
    cfgs = {n: study.variant_config(base, v, w) for n, v, w in specs}
  except config_lib.ConfigError as e:
    sys.exit(f"config error: {e}")
  checkpoint.writable_dir(_OUT_DIR.value, "--out_dir")
  if specs and _MINUTES.value > 0:
    first = next(iter(cfgs.values()))
    sec = study.measure_step_seconds(first)
    steps = max(int(_MINUTES.value * 60 / sec), 2)
    logging.info("%s: %.3f s/step -> num_steps %d for %.1f minutes",
                 specs[0][0], sec, steps, _MINUTES.value)
    cfgs = {n: study.variant_config(base, v, w, steps) for n, v, w in specs}
  for name, cfg in cfgs.items():
    workdir = os.path.join(_WORK_DIR.value, name)
    if not _RESUME.value and os.path.isdir(workdir):
      logging.info("removing the previous run in %s (--resume keeps it)",
                   workdir)
      shutil.rmtree(workdir)
    res = run_variant(name, cfg, ecfg, workdir)
    checkpoint.write_json_atomic(
        os.path.join(_OUT_DIR.value, f"variant_{name}.json"), res)
    rebuild(_OUT_DIR.value)
  if not specs:
    rebuild(_OUT_DIR.value)


if __name__ == "__main__":
  cli.run(main, "quality_study")
