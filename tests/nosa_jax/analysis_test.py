"""Event files written by MetricWriter read back exactly; plots build."""

import json
import os
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")

from absl.testing import absltest
import numpy as np
from matplotlib import figure as mpl_figure
from matplotlib import pyplot as plt
from tensorboard.compat.proto import summary_pb2
import tensorboard.summary as tb_summary
from tensorboard.util import tensor_util

from nosa_jax import analysis
from nosa_jax import metrics

REPO = __file__.rsplit("/tests/", 1)[0]


def _write_run(logdir, loss_offset=0.0, steps=(0, 5, 10)):
  """A small run with the trainer's tag names; returns what it wrote."""
  w = metrics.MetricWriter(logdir)
  rng = np.random.default_rng(0)
  bias = {}
  for step in steps:
    w.scalars(step, {"train/loss": 3.0 - 0.1 * step + loss_offset,
                     "locality/gamma/layer_00": 0.9 + 0.001 * step,
                     "locality/gamma/layer_01": 0.8 + 0.002 * step,
                     "locality/gamma": 0.85 + 0.0015 * step})
    bias[step] = rng.normal(size=(2, 64, 2)) + 0.1 * step
    w.histogram(step, "bias_BTK/layer_00", bias[step])
  w.scalars(steps[-1], {"eval/loss": 2.5 + loss_offset})
  w.close()
  return bias


class ReadTest(absltest.TestCase):

  def test_scalars_round_trip(self):
    logdir = self.create_tempdir().full_path
    _write_run(logdir)
    scalars = analysis.read_scalars(logdir)
    self.assertEqual(sorted(scalars), [
        "eval/loss", "locality/gamma", "locality/gamma/layer_00",
        "locality/gamma/layer_01", "train/loss"])
    steps, values = scalars["train/loss"]
    np.testing.assert_array_equal(steps, [0, 5, 10])
    # simple_value is a float32 field.
    np.testing.assert_array_equal(
        values, np.float32([3.0, 2.5, 2.0]).astype(np.float64))
    np.testing.assert_array_equal(scalars["eval/loss"].steps, [10])
    self.assertEqual(analysis.final(scalars, "eval/loss"), 2.5)
    self.assertTrue(np.isnan(analysis.final(scalars, "missing")))
    gamma = analysis.per_layer(scalars, "locality/gamma")
    self.assertEqual(list(gamma), [0, 1])
    np.testing.assert_allclose(gamma[1].values, [0.8, 0.81, 0.82],
                               rtol=1e-7)

  def test_histograms_round_trip(self):
    logdir = self.create_tempdir().full_path
    bias = _write_run(logdir)
    hists = analysis.read_histograms(logdir)
    self.assertEqual(list(hists), ["bias_BTK/layer_00"])
    self.assertEqual([h.step for h in hists["bias_BTK/layer_00"]], [0, 5, 10])
    for h in hists["bias_BTK/layer_00"]:
      x = bias[h.step].ravel()
      counts, edges = np.histogram(x, bins=64)
      np.testing.assert_array_equal(h.counts, counts)
      np.testing.assert_array_equal(h.edges, edges)
      self.assertEqual((h.min, h.max, h.num), (x.min(), x.max(), x.size))
      self.assertAlmostEqual(h.mean, x.mean())
      self.assertAlmostEqual(h.std, x.std())
    self.assertEqual(list(analysis.per_layer(hists, "bias_BTK")), [0])

  def test_constant_histogram(self):
    # numpy bins constant values in [v - 0.5, v + 0.5] (the eviction bias
    # at init, A = 0, is all zeros).
    logdir = self.create_tempdir().full_path
    w = metrics.MetricWriter(logdir)
    w.histogram(1, "zeros", np.zeros(10))
    w.close()
    (h,) = analysis.read_histograms(logdir)["zeros"]
    counts, edges = np.histogram(np.zeros(10), bins=64)
    np.testing.assert_allclose(h.edges, edges, atol=1e-12)
    np.testing.assert_array_equal(h.counts, counts)
    self.assertEqual((h.mean, h.std), (0.0, 0.0))

  def test_resumed_run_last_write_wins(self):
    logdir = self.create_tempdir().full_path
    _write_run(logdir)
    w = metrics.MetricWriter(logdir)  # a second event file, as on resume
    w.scalars(10, {"train/loss": 7.0})
    w.scalars(15, {"train/loss": 6.0})
    w.close()
    self.assertLen(analysis.event_files(logdir), 2)
    s = analysis.read_scalars(logdir)["train/loss"]
    np.testing.assert_array_equal(s.steps, [0, 5, 10, 15])
    np.testing.assert_array_equal(s.values, [3.0, 2.5, 7.0, 6.0])

  def test_file_cut_mid_record_is_read_up_to_the_cut(self):
    # A run killed while writing (experiments/scaling.py --run_seconds).
    logdir = self.create_tempdir().full_path
    _write_run(logdir)
    (path,) = analysis.event_files(logdir)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) - 5)  # inside the last record
    s = analysis.read_scalars(logdir)
    np.testing.assert_array_equal(s["train/loss"].steps, [0, 5, 10])
    self.assertNotIn("eval/loss", s)  # the last record, cut

  def test_tensor_summaries(self):
    # tensorboard.summary.Writer / TF2 write scalars and histograms as
    # tensors with plugin metadata.
    logdir = self.create_tempdir().full_path
    w = tb_summary.Writer(logdir)
    w.add_scalar("x", 1.5, step=3)
    w.add_scalar("x", 2.5, step=4)
    w.close()
    buckets = np.array([[0.0, 1.0, 2.0], [1.0, 3.0, 6.0]])
    fw = metrics.MetricWriter(logdir)
    fw._add(7, summary_pb2.Summary.Value(  # pylint: disable=protected-access
        tag="h", tensor=tensor_util.make_tensor_proto(buckets),
        metadata=summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(
                plugin_name="histograms"))))
    fw.close()
    scalars, hists = analysis.read_events(logdir)
    np.testing.assert_array_equal(scalars["x"].steps, [3, 4])
    np.testing.assert_array_equal(scalars["x"].values, [1.5, 2.5])
    (h,) = hists["h"]
    self.assertEqual((h.step, h.num, h.min, h.max), (7, 8.0, 0.0, 3.0))
    np.testing.assert_array_equal(h.edges, [0.0, 1.0, 3.0])
    np.testing.assert_array_equal(h.counts, [2.0, 6.0])

  def test_list_runs_and_workdirs(self):
    root = self.create_tempdir().full_path
    _write_run(os.path.join(root, "a", "tensorboard"))
    _write_run(os.path.join(root, "b", "tensorboard"), loss_offset=1.0)
    _write_run(os.path.join(root, "sweep", "c"))
    runs = analysis.list_runs(root)
    self.assertEqual(list(runs), ["a", "b", "sweep/c"])
    # A workdir is read through its tensorboard/ directory.
    workdir = analysis.read_scalars(os.path.join(root, "b"))
    self.assertEqual(analysis.final(workdir, "eval/loss"), 3.5)
    all_runs = analysis.read_runs(root)
    self.assertEqual(analysis.final(all_runs["a"], "eval/loss"), 2.5)
    self.assertEqual(list(analysis.list_runs(os.path.join(root, "a"))),
                     ["a"])
    with self.assertRaisesRegex(FileNotFoundError, "not a directory"):
      analysis.read_scalars(os.path.join(root, "missing"))

  def test_read_decode_bench(self):
    d = self.create_tempdir()
    rec = {k: 1 for k in analysis.DECODE_BENCH_KEYS}
    good = d.create_file("good.json", json.dumps({"records": [rec]}))
    self.assertEqual(analysis.read_decode_bench(good.full_path), [rec])
    # decode_bench.py writes `context`; it is read as context_len too.
    alias = dict(rec, context=4096)
    del alias["context_len"]
    f = d.create_file("alias.json", json.dumps({"records": [alias]}))
    self.assertEqual(analysis.read_decode_bench(f.full_path)[0]["context_len"],
                     4096)
    bad = d.create_file("bad.json", json.dumps(
        {"records": [{"system": "nosa"}]}))
    with self.assertRaisesRegex(ValueError, "record 0 lacks model"):
      analysis.read_decode_bench(bad.full_path)
    with self.assertRaisesRegex(ValueError, "'records' list"):
      analysis.read_decode_bench(d.create_file("x.json", "[]").full_path)


class ImportTest(absltest.TestCase):

  def test_readers_do_not_import_matplotlib(self):
    # matplotlib is a dev dependency; only the plotting helpers need it.
    code = ("import sys, nosa_jax.analysis; "
            "sys.exit('matplotlib' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                          capture_output=True, text=True, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr)


class PlotTest(absltest.TestCase):

  def tearDown(self):
    plt.close("all")
    super().tearDown()

  def test_plots(self):
    root = self.create_tempdir().full_path
    for name, off in (("a", 0.0), ("b", 1.0)):
      _write_run(os.path.join(root, name), loss_offset=off)
    runs = analysis.read_runs(root)
    out = self.create_tempdir().full_path

    fig = analysis.plot_runs(runs, ("train/loss", "eval/loss"))
    self.assertIsInstance(fig, mpl_figure.Figure)
    self.assertLen(fig.axes[0].lines, 2)
    fig = analysis.plot_layer_scalars(runs, "gamma")
    self.assertLen(fig.axes[0].lines, 3)  # two layers + the mean
    hists = analysis.read_histograms(os.path.join(root, "a"))
    fig = analysis.plot_histograms(hists, max_steps=2)
    self.assertLen(fig.axes[0].patches, 2)
    fig = analysis.plot_sweeps(
        [{"sweep": "s", "x": 1, "label": "one", "loss": 2.0, "gamma": 0.9},
         {"sweep": "s", "x": 0, "label": "zero", "loss": 3.0}])
    self.assertLen(fig.axes, 2)
    path = analysis.save_figure(fig, out, "sweeps")
    self.assertTrue(os.path.getsize(path) > 0)
    self.assertIsNone(analysis.save_figure(fig, "", "none"))


if __name__ == "__main__":
  absltest.main()
