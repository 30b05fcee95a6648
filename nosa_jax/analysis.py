"""Reading training logs and benchmark results into numpy, and plotting them.

TensorBoard event files are read with tensorboard's own record loader
(`event_file_loader`), which needs only the `tensorboard` package, not
TensorFlow. Every event is read (no reservoir sampling, unlike
`EventAccumulator`'s defaults). Both summary encodings are understood: the
`simple_value` / `histo` protos `metrics.MetricWriter` writes, and the
tensor-valued scalars / histograms of `tensorboard.summary.Writer` and TF2.

Tags written by `train.train_and_evaluate` (one event file per process run
under `<workdir>/tensorboard`):

  train/{loss,grad_norm,locality_penalty,lr,tokens_per_s[,mfu]}
  eval/loss
  locality/<stat> and locality/<stat>/layer_NN, stat in gamma,
      changed_query_picks, changed_agnostic_picks, locality_pairs
  bias_BTK/layer_NN   histogram of the eviction bias (dma / nosa)

A resumed run re-logs the steps after its last checkpoint; the value
written last wins. A file cut mid-record (a run killed while writing) is
read up to the cut. This is the project's one event-file reader:
`evaluation.read_scalars` and `experiments/scaling.py` call it.

Plotting helpers import matplotlib lazily (a `dev` dependency) and return
the `Figure`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.util import tensor_util

# Keys every record of experiments/results/decode_bench.json must have.
DECODE_BENCH_KEYS = ("system", "model", "context_len", "batch", "gamma",
                     "tokens_per_s", "step_ms", "pcie_bytes_per_step")


class Scalars(NamedTuple):
  """One scalar tag: `steps` (int64) and `values` (float64), by step."""

  steps: np.ndarray
  values: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)  # numpy fields: no __eq__
class Histogram:
  """One histogram summary.

  Attributes:
    step: training step.
    min, max, num, sum, sum_squares: summary statistics of the values.
    bucket_limits: right edge of each bucket, [n].
    counts: values per bucket, [n].
  """

  step: int
  min: float
  max: float
  num: float
  sum: float
  sum_squares: float
  bucket_limits: np.ndarray
  counts: np.ndarray

  @property
  def edges(self) -> np.ndarray:
    """[n + 1] bucket edges: the left edge, then the right limits.

    The left edge is `min`, unless the first limit is below it: numpy puts
    constant values in a bin of [v - 0.5, v + 0.5] split in equal buckets,
    and then the first bucket's width is repeated to the left. TF's open
    last bucket (limit ~DBL_MAX) is closed at `max`.
    """
    right = np.array(self.bucket_limits, np.float64)
    if len(right) > 1 and not abs(right[-1]) < 1e300:
      right[-1] = max(self.max, right[-2])
    if self.min <= right[0]:
      left = self.min
    else:
      left = right[0] - (right[1] - right[0] if len(right) > 1 else 1.0)
    return np.concatenate([[left], right])

  @property
  def mean(self) -> float:
    return self.sum / self.num if self.num else float("nan")

  @property
  def std(self) -> float:
    if not self.num:
      return float("nan")
    return float(np.sqrt(max(self.sum_squares / self.num - self.mean**2, 0)))


# ------------------------------------------------------------------------------
# Finding runs and event files.
# ------------------------------------------------------------------------------


def _is_event_file(name: str) -> bool:
  return "tfevents" in name


def _natural_key(name: str) -> list:
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def event_files(logdir: str) -> list[str]:
  """Event files directly in `logdir`, oldest first.

  A training workdir is accepted too: its `tensorboard/` subdirectory is
  used when `logdir` itself holds no event file.
  """
  if not os.path.isdir(logdir):
    raise FileNotFoundError(f"logdir {logdir!r} is not a directory")
  # Names are events.out.tfevents.<unix time>.<host>.<pid>.<counter>:
  # natural order is creation order for files written by one host.
  names = sorted((n for n in os.listdir(logdir) if _is_event_file(n)
                  and os.path.isfile(os.path.join(logdir, n))),
                 key=_natural_key)
  if not names and os.path.isdir(os.path.join(logdir, "tensorboard")):
    return event_files(os.path.join(logdir, "tensorboard"))
  return [os.path.join(logdir, n) for n in names]


def list_runs(root: str) -> dict[str, str]:
  """Every directory under `root` holding event files, by run name.

  The name is the path relative to `root`, without a trailing `tensorboard`
  component, so `root/nosa_lw0.1/tensorboard` is run `nosa_lw0.1`; event
  files in `root` itself (or `root/tensorboard`) are run `basename(root)`.
  """
  if not os.path.isdir(root):
    raise FileNotFoundError(f"root {root!r} is not a directory")
  runs = {}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    if not any(_is_event_file(n) for n in filenames):
      continue
    rel = os.path.relpath(dirpath, root)
    parts = [p for p in rel.split(os.sep) if p != "."]
    if parts and parts[-1] == "tensorboard":
      parts = parts[:-1]
    name = "/".join(parts) or os.path.basename(os.path.abspath(root))
    runs[name] = dirpath
  return dict(sorted(runs.items()))


# ------------------------------------------------------------------------------
# Reading.
# ------------------------------------------------------------------------------


def _plugin(value) -> str:
  return value.metadata.plugin_data.plugin_name


def _histogram_from_value(step: int, value) -> Histogram | None:
  if value.HasField("histo"):
    h = value.histo
    return Histogram(step=step, min=h.min, max=h.max, num=h.num, sum=h.sum,
                     sum_squares=h.sum_squares,
                     bucket_limits=np.asarray(h.bucket_limit, np.float64),
                     counts=np.asarray(h.bucket, np.float64))
  # Tensor form: [n, 3] rows of (left edge, right edge, count).
  buckets = np.asarray(tensor_util.make_ndarray(value.tensor), np.float64)
  if buckets.ndim != 2 or buckets.shape[1] != 3 or not len(buckets):
    return None
  left, right, counts = buckets.T
  centres = (left + right) / 2
  num = counts.sum()
  return Histogram(step=step, min=float(left[0]), max=float(right[-1]),
                   num=float(num), sum=float((centres * counts).sum()),
                   sum_squares=float((centres**2 * counts).sum()),
                   bucket_limits=right, counts=counts)


def read_events(logdir: str
                ) -> tuple[dict[str, Scalars], dict[str, list[Histogram]]]:
  """Scalars and histograms of one run (see `read_scalars`)."""
  scalars: dict[str, dict[int, float]] = {}
  hists: dict[str, dict[int, Histogram]] = {}
  for path in event_files(logdir):
    for event in event_file_loader.LegacyEventFileLoader(path).Load():
      if not event.HasField("summary"):
        continue
      step = int(event.step)
      for v in event.summary.value:
        kind = v.WhichOneof("value")
        if kind == "simple_value":
          scalars.setdefault(v.tag, {})[step] = float(v.simple_value)
        elif kind == "histo" or (kind == "tensor"
                                 and _plugin(v) == "histograms"):
          h = _histogram_from_value(step, v)
          if h is not None:
            hists.setdefault(v.tag, {})[step] = h
        elif kind == "tensor" and _plugin(v) == "scalars":
          x = tensor_util.make_ndarray(v.tensor)
          scalars.setdefault(v.tag, {})[step] = float(np.asarray(x).item())
  out_s = {}
  for tag, by_step in sorted(scalars.items()):
    steps = np.array(sorted(by_step), np.int64)
    out_s[tag] = Scalars(steps, np.array([by_step[s] for s in steps],
                                         np.float64))
  out_h = {tag: [by_step[s] for s in sorted(by_step)]
           for tag, by_step in sorted(hists.items())}
  return out_s, out_h


def read_scalars(logdir: str) -> dict[str, Scalars]:
  """Every scalar tag of one run: tag -> (steps, values), sorted by step.

  Args:
    logdir: a directory of event files, or a training workdir (its
      `tensorboard/` is used). Several event files (a resumed run) are
      merged; where a step repeats, the value written last wins.

  Returns:
    {tag: Scalars(steps [n] int64, values [n] float64)}.
  """
  return read_events(logdir)[0]


def read_histograms(logdir: str) -> dict[str, list[Histogram]]:
  """Every histogram tag of one run: tag -> [Histogram], sorted by step."""
  return read_events(logdir)[1]


def read_runs(root: str) -> dict[str, dict[str, Scalars]]:
  """`read_scalars` of every run `list_runs(root)` finds."""
  return {name: read_scalars(path) for name, path in list_runs(root).items()}


def per_layer(tags: Mapping[str, Any], prefix: str) -> dict[int, Any]:
  """Entries `{prefix}/layer_NN` of a tag mapping, keyed by layer NN.

  For example `per_layer(scalars, "locality/gamma")` or
  `per_layer(histograms, "bias_BTK")`.
  """
  pattern = re.compile(re.escape(prefix) + r"/layer_(\d+)$")
  out = {}
  for tag, value in tags.items():
    match = pattern.match(tag)
    if match:
      out[int(match.group(1))] = value
  return dict(sorted(out.items()))


def final(scalars: Mapping[str, Scalars], tag: str,
          default: float = float("nan")) -> float:
  """The value of `tag` at its last step, or `default` when absent."""
  if tag not in scalars or not len(scalars[tag].values):
    return default
  return float(scalars[tag].values[-1])


def read_decode_bench(path: str) -> list[dict]:
  """Records of a decode benchmark JSON ({"records": [...], ...}).

  `experiments/decode_bench.py` spells the context length `context`; it is
  copied to `context_len`. `gamma` is null for systems that fetch nothing.

  Raises:
    ValueError: (one line) when the object has no "records" list or a
      record lacks one of `DECODE_BENCH_KEYS`.
  """
  with open(path) as f:
    data = json.load(f)
  records = data.get("records") if isinstance(data, dict) else None
  if not isinstance(records, list):
    raise ValueError(f"{path}: expected a JSON object with a 'records' list")
  out = []
  for i, r in enumerate(records):
    r = dict(r)
    if "context_len" not in r and "context" in r:
      r["context_len"] = r["context"]
    missing = [k for k in DECODE_BENCH_KEYS if k not in r]
    if missing:
      raise ValueError(f"{path}: record {i} lacks {', '.join(missing)}")
    out.append(r)
  return out


# ------------------------------------------------------------------------------
# Plotting (matplotlib is imported only here).
# ------------------------------------------------------------------------------


def _subplots(n: int, ncols: int, width: float = 4.2, height: float = 3.2):
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  ncols = max(1, min(n, ncols))
  nrows = -(-n // ncols)
  fig, axes = plt.subplots(nrows, ncols, squeeze=False,
                           figsize=(width * ncols, height * nrows))
  for ax in axes.flat[n:]:
    ax.set_visible(False)
  return fig, list(axes.flat[:n])


def _finish(fig, title: str | None):
  """Optional suptitle, tight layout; returns the figure."""
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def _one_legend(axes) -> None:
  """A single legend, right of the last panel (runs repeat across panels)."""
  entries = {}
  for ax in axes:
    for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
      entries.setdefault(label, handle)
  if entries:
    axes[-1].legend(list(entries.values()), list(entries), fontsize="small",
                    loc="upper left", bbox_to_anchor=(1.02, 1.0))


def plot_runs(runs: Mapping[str, Mapping[str, Scalars]],
              tags: Sequence[str] = ("train/loss", "eval/loss"), *,
              ncols: int = 3, title: str | None = None):
  """One panel per tag, one line per run (e.g. loss curves).

  Args:
    runs: {run name: read_scalars(...)}.
    tags: scalar tags to draw; a run without a tag is skipped in its panel.
    ncols: panels per row.
    title: figure title.

  Returns:
    The matplotlib Figure.
  """
  if not tags:
    raise ValueError("plot_runs needs at least one tag")
  fig, axes = _subplots(len(tags), ncols)
  for ax, tag in zip(axes, tags, strict=True):
    for name, scalars in runs.items():
      if tag in scalars:
        s = scalars[tag]
        ax.plot(s.steps, s.values, marker="." if len(s.steps) < 30 else None,
                label=name)
    ax.set_title(tag)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  _one_legend(axes)
  return _finish(fig, title)


def plot_layer_scalars(runs: Mapping[str, Mapping[str, Scalars]],
                       stat: str = "gamma", *, ncols: int = 3,
                       title: str | None = None):
  """`locality/<stat>/layer_NN` against step: one panel per run.

  The layer mean (`locality/<stat>`) is drawn dashed in black.
  """
  fig, axes = _subplots(max(len(runs), 1), ncols)  # no run: one empty panel
  for ax, (name, scalars) in zip(axes, runs.items(), strict=False):
    for layer, s in per_layer(scalars, f"locality/{stat}").items():
      ax.plot(s.steps, s.values, marker=".", label=f"layer {layer}")
    if f"locality/{stat}" in scalars:
      s = scalars[f"locality/{stat}"]
      ax.plot(s.steps, s.values, "k--", label="mean")
    ax.set_title(f"{name}: {stat}")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  _one_legend(axes)
  return _finish(fig, title)


def plot_histograms(histograms: Mapping[str, Sequence[Histogram]], *,
                    max_steps: int = 4, ncols: int = 3,
                    title: str | None = None):
  """One panel per tag; up to `max_steps` evenly spaced steps overlaid.

  Counts are normalised to densities so steps with different bucket widths
  compare; later steps are drawn in lighter colours.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  fig, axes = _subplots(max(len(histograms), 1), ncols)  # none: one empty
  for ax, (tag, hists) in zip(axes, histograms.items(), strict=False):
    if not hists:
      continue
    picks = np.unique(np.linspace(0, len(hists) - 1,
                                  min(max_steps, len(hists))).astype(int))
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(picks)))
    lo, hi = np.inf, -np.inf
    for colour, i in zip(colours, picks, strict=True):
      h = hists[i]
      edges = h.edges
      widths = np.maximum(np.diff(edges), 1e-12)
      density = h.counts / max(h.num, 1) / widths
      ax.stairs(density, edges, color=colour, label=f"step {h.step}")
      used = np.flatnonzero(h.counts)
      if used.size:  # zoom on the occupied buckets
        lo, hi = min(lo, edges[used[0]]), max(hi, edges[used[-1] + 1])
    if lo < hi:
      pad = 0.05 * (hi - lo)
      ax.set_xlim(lo - pad, hi + pad)
    ax.set_title(tag)
    ax.set_xlabel("value")
    ax.set_ylabel("density")
    ax.legend(fontsize="small")
  return _finish(fig, title)


def plot_sweeps(records: Sequence[Mapping[str, Any]], *,
                metrics: Sequence[str] = ("loss", "gamma"),
                group_key: str = "sweep", x_key: str = "x",
                label_key: str = "label", title: str | None = None):
  """Ablation results: one column per sweep, one row per metric.

  Args:
    records: dicts with `group_key` (the sweep a point belongs to), `x_key`
      (numeric position), `label_key` (tick label) and each metric.
    metrics: keys plotted, one row each (NaN points are skipped).
    group_key, x_key, label_key: which keys to read.
    title: figure title.

  Returns:
    The matplotlib Figure.
  """
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for r in records:
    groups.setdefault(r[group_key], []).append(r)
  ncols, nrows = max(len(groups), 1), len(metrics)
  fig, axes = plt.subplots(nrows, ncols, squeeze=False,
                           figsize=(4.2 * ncols, 2.8 * nrows))
  for j, (group, rs) in enumerate(groups.items()):
    rs = sorted(rs, key=lambda r: r[x_key])
    xs = [r[x_key] for r in rs]
    for i, metric in enumerate(metrics):
      ax = axes[i][j]
      ax.plot(xs, [r.get(metric, np.nan) for r in rs], "o-")
      ax.set_xticks(xs, [str(r.get(label_key, r[x_key])) for r in rs],
                    fontsize="small")
      ax.set_ylabel(metric)
      ax.grid(alpha=0.3)
      if i == 0:
        ax.set_title(group)
  return _finish(fig, title)


def save_figure(fig, out_dir: str | None, name: str) -> str | None:
  """Writes `fig` to `out_dir/name.png` (creating the directory).

  Returns the path, or None (nothing written) when `out_dir` is empty.
  """
  if not out_dir:
    return None
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{name}.png")
  fig.savefig(path, dpi=100, bbox_inches="tight")
  return path
