r"""Multi-GPU scaling of a pretraining config (issue #10), measured in one run.

  python -m experiments.scaling --config=configs/nosa_1b.py \
      --meshes="1,1,1;1,2,1" --out_dir=/tmp/scaling \
      --override=train.batch_size=2 --run_seconds=250
  python -m experiments.scaling --runlocal --out_dir=/tmp/sc  # CPU smoke

Runs `experiments.pretrain` once per mesh shape (data, fsdp, tensor), each in
its own process on the first prod(mesh) devices (CUDA_VISIBLE_DEVICES; on CPU
`--xla_force_host_platform_device_count`), with the same config, seed, data
order and *global* batch, so the losses must agree step for step and the
per-GPU throughput compares strong scaling. A run longer than --run_seconds
is stopped and whatever it logged is used. Tokens/s excludes the compiling
first step (the trainer does that).

Per mesh: devices, steps logged, median tokens/s over the logged windows,
tokens/s per device, MFU, scaling efficiency = (tok/s per device) /
(tok/s of the one-device run), and the largest |loss - loss of the first
mesh| over the common logged steps, the last step through which they stay
within 1% of it, and the peak device memory (GPU only). Output:
scaling.json, table.md and scaling.png (loss curves and tok/s per device)
in --out_dir.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

from experiments import cli
from nosa_jax import analysis
from nosa_jax import checkpoint

_CONFIG = flags.DEFINE_string("config", "configs/nosa_1b.py",
                              "Config file (with optional :args).")
_MESHES = flags.DEFINE_string(
    "meshes", "1,1,1;1,2,1",
    "';'-separated (data,fsdp,tensor) shapes; the first is the baseline.")
_OVERRIDES = flags.DEFINE_multi_string(
    "override", [], "Extra config overrides, e.g. train.batch_size=2 "
    "(passed as --config.<override>).")
_STEPS = flags.DEFINE_integer("steps", 200, "train.num_steps of every run.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 5, "train.log_every.")
_RUN_SECONDS = flags.DEFINE_float(
    "run_seconds", 600.0, "Wall-clock limit per run; a run cut by it "
    "contributes the windows it logged.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where results go.")
_RUNLOCAL = flags.DEFINE_bool(
    "runlocal", False, "CPU smoke: configs/tiny.py, 2 virtual devices, "
    "a few steps (figures meaningless).")


def parse_meshes(text: str) -> list[tuple[int, int, int]]:
  """'1,1,1;1,2,1' -> [(1, 1, 1), (1, 2, 1)], with a one-line error."""
  meshes = []
  for part in filter(None, (p.strip() for p in text.split(";"))):
    dims = part.split(",")
    if len(dims) != 3 or not all(d.strip().isdigit() and int(d) > 0
                                 for d in dims):
      raise ValueError(f"--meshes entry {part!r}: expected three positive "
                       "integers data,fsdp,tensor")
    meshes.append(tuple(int(d) for d in dims))
  if not meshes:
    raise ValueError("--meshes: give at least one data,fsdp,tensor shape")
  return meshes


def read_scalars(logdir: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of a run's event files (`analysis.read_scalars`).

  A run killed by --run_seconds may leave no directory ({} then) or a file
  cut mid-record, which is read up to the cut.
  """
  if not os.path.isdir(logdir):
    return {}
  return {tag: dict(zip(s.steps.tolist(), s.values.tolist(), strict=True))
          for tag, s in analysis.read_scalars(logdir).items()}


def summarize(meshes, scalars_per_run, seconds_per_run, cut_per_run):
  """Rows of the table: throughput per device, efficiency, loss agreement."""
  rows = []
  base_loss = scalars_per_run[0].get("train/loss", {})
  base_per_device = None
  for mesh, scalars, seconds, cut in zip(meshes, scalars_per_run,
                                         seconds_per_run, cut_per_run,
                                         strict=True):
    devices = math.prod(mesh)
    tok = scalars.get("train/tokens_per_s", {})
    loss = scalars.get("train/loss", {})
    mfu = scalars.get("train/mfu", {})
    row = {"mesh": list(mesh), "devices": devices,
           "steps_logged": max(loss, default=0), "seconds": round(seconds, 1),
           "cut_by_time_limit": cut,
           "first_step_s": next(iter(scalars.get(
               "train/first_step_seconds", {}).values()), None)}
    if tok:
      tok_s = float(np.median(list(tok.values())))
      row["tokens_per_s"] = tok_s
      row["tokens_per_s_per_device"] = tok_s / devices
      if base_per_device is None and devices == 1:
        base_per_device = row["tokens_per_s_per_device"]
    if mfu:
      row["mfu"] = float(np.median(list(mfu.values())))
    memory = scalars.get("train/peak_memory_gib", {})
    if memory:
      row["peak_memory_gib_per_device"] = max(memory.values())
    common = sorted(set(loss) & set(base_loss))
    if common:
      diffs = [abs(loss[s] - base_loss[s]) for s in common]
      row["loss_steps_compared"] = common
      row["max_abs_loss_diff"] = max(diffs)
      # bf16 runs drift apart chaotically once the order of a reduction
      # differs: report how long they stay within 1% of the baseline.
      agree = [d <= 0.01 * abs(base_loss[s]) for d, s in zip(diffs, common,
                                                            strict=True)]
      row["agree_1pct_through_step"] = (
          common[agree.index(False) - 1] if not all(agree)
          else common[-1]) if agree[0] else 0
      row["loss_first"] = loss[common[0]]
      row["loss_last_common"] = loss[common[-1]]
    row["losses"] = {str(k): v for k, v in sorted(loss.items())}
    rows.append(row)
  for row in rows:
    if base_per_device and "tokens_per_s_per_device" in row:
      row["scaling_efficiency"] = (row["tokens_per_s_per_device"]
                                   / base_per_device)
  return rows


def format_table(rows) -> str:
  lines = ["| mesh (data,fsdp,tensor) | GPUs | steps | first step s | "
           "tok/s | tok/s per GPU | MFU | efficiency | max abs loss diff | "
           "loss within 1% through step | peak GiB per GPU |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
  for r in rows:
    lines.append(
        f"| {tuple(r['mesh'])} | {r['devices']} | {r['steps_logged']}"
        f"{' (cut)' if r['cut_by_time_limit'] else ''} | "
        f"{fmt(r['first_step_s'], '.0f')} | "
        f"{fmt(r.get('tokens_per_s'), ',.0f')} | "
        f"{fmt(r.get('tokens_per_s_per_device'), ',.0f')} | "
        f"{'-' if 'mfu' not in r else format(100 * r['mfu'], '.1f') + '%'} | "
        f"{fmt(r.get('scaling_efficiency'), '.3f')} | "
        f"{fmt(r.get('max_abs_loss_diff'), '.4f')} | "
        f"{r.get('agree_1pct_through_step', '-')} | "
        f"{fmt(r.get('peak_memory_gib_per_device'), '.1f')} |")
  return "\n".join(lines)


def plot(rows, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_loss, ax_tok) = plt.subplots(1, 2, figsize=(11, 4))
  for r in rows:
    steps = [int(s) for s in r["losses"]]
    ax_loss.plot(steps, list(r["losses"].values()), marker=".",
                 label=f"{r['devices']} GPU mesh {tuple(r['mesh'])}")
  ax_loss.set(xlabel="step", ylabel="train loss (window mean)",
              title="Loss: same global batch and data order")
  ax_loss.legend()
  labels = [f"{r['devices']}x {tuple(r['mesh'])}" for r in rows]
  ax_tok.bar(labels, [r.get("tokens_per_s_per_device", 0) for r in rows])
  for i, r in enumerate(rows):
    if "scaling_efficiency" in r:
      ax_tok.annotate(f"eff {r['scaling_efficiency']:.2f}",
                      (i, r.get("tokens_per_s_per_device", 0)),
                      ha="center", va="bottom")
  ax_tok.set(ylabel="tokens/s per GPU", title="Throughput per GPU")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run_one(mesh, workdir: str, config: str, overrides: list[str],
            seconds: float, log_path: str) -> tuple[float, bool]:
  """Runs pretrain on prod(mesh) devices; returns (seconds, cut)."""
  devices = math.prod(mesh)
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(devices))
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform"
                      f"_device_count={devices}").strip()
  cmd = [sys.executable, "-m", "experiments.pretrain", f"--config={config}",
         f"--workdir={workdir}",
         f"--config.train.mesh_shape=({mesh[0]},{mesh[1]},{mesh[2]})"]
  cmd += [f"--config.{o}" for o in overrides]
  t0 = time.time()
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, env=env, stdout=log,
                            stderr=subprocess.STDOUT,
                            cwd=os.path.dirname(os.path.dirname(
                                os.path.abspath(__file__))))
    try:
      rc, cut = proc.wait(timeout=seconds), False
    except subprocess.TimeoutExpired:
      proc.kill()
      rc, cut = proc.wait(), True
  if rc and not cut:
    tail = open(log_path).read()[-2000:]
    raise RuntimeError(f"run on mesh {mesh} failed (exit {rc}):\n{tail}")
  return time.time() - t0, cut


def main(argv):
  del argv
  if not _OUT_DIR.value:
    raise app.UsageError("--out_dir is required")
  try:
    meshes = parse_meshes("1,1,1;1,2,1" if _RUNLOCAL.value else _MESHES.value)
  except ValueError as e:
    sys.exit(str(e))
  config = "configs/tiny.py" if _RUNLOCAL.value else _CONFIG.value
  overrides = [f"train.num_steps={_STEPS.value}",
               f"train.log_every={_LOG_EVERY.value}",
               # The schedule must fit the short run (warmup < num_steps).
               f"train.warmup_steps={max(1, _STEPS.value // 10)}",
               "train.eval_every=0", "train.checkpoint_every=0",
               "train.log_locality=False"]
  if _RUNLOCAL.value:
    overrides += ["train.seq_len=128", "train.batch_size=4",
                  "train.num_steps=6", "train.log_every=2",
                  "train.warmup_steps=2"]
  overrides += _OVERRIDES.value
  checkpoint.writable_dir(_OUT_DIR.value, "--out_dir")
  scalars, seconds, cuts = [], [], []
  for mesh in meshes:
    name = "mesh_" + "x".join(map(str, mesh))
    workdir = os.path.join(_OUT_DIR.value, name)
    print(f"running {name} ({math.prod(mesh)} devices) ...", flush=True)
    s, cut = run_one(mesh, workdir, config, overrides, _RUN_SECONDS.value,
                     os.path.join(_OUT_DIR.value, name + ".log"))
    scalars.append(read_scalars(os.path.join(workdir, "tensorboard")))
    seconds.append(s)
    cuts.append(cut)
  rows = summarize(meshes, scalars, seconds, cuts)
  table = format_table(rows)
  print(table)
  meta = {"config": config, "overrides": overrides,
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
          "host": platform.node(), "command": " ".join(sys.argv)}
  with open(os.path.join(_OUT_DIR.value, "scaling.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  with open(os.path.join(_OUT_DIR.value, "table.md"), "w") as f:
    f.write(table + "\n")
  plot(rows, os.path.join(_OUT_DIR.value, "scaling.png"))


if __name__ == "__main__":
  cli.run(main, "scaling")
