"""Tests for the trace summary of experiments.bench.timing (trace_summary's CLI
defines absl flags, so the test imports the flag-free module)."""

import gzip
import json
import os

from absl.testing import absltest

from experiments.bench import timing


def _events():
  meta = lambda pid, name: {"ph": "M", "name": "process_name", "pid": pid,
                            "args": {"name": name}}
  kern = lambda pid, name, dur: {"ph": "X", "pid": pid, "name": name,
                                 "ts": 0, "dur": dur}
  return [meta(1, "/host:CPU"), meta(7, "/device:GPU:0 NVIDIA H100"),
          kern(7, "gemm", 30.0), kern(7, "sort", 5.0), kern(7, "gemm", 10.0),
          kern(1, "python", 1000.0)]


class TraceSummaryTest(absltest.TestCase):

  def test_summarize_counts_gpu_tracks_only(self):
    out = timing.summarize_trace(_events())
    self.assertEqual(out["tracks"], ["/device:GPU:0 NVIDIA H100"])
    self.assertEqual(out["kernels"],
                     [{"name": "gemm", "count": 2, "total_us": 40.0},
                      {"name": "sort", "count": 1, "total_us": 5.0}])

  def test_find_trace(self):
    root = self.create_tempdir().full_path
    with self.assertRaisesRegex(FileNotFoundError, "perfetto_trace"):
      timing.find_trace(root)
    sub = os.path.join(root, "plugins", "profile", "2026")
    os.makedirs(sub)
    path = os.path.join(sub, "perfetto_trace.json.gz")
    with gzip.open(path, "wt") as f:
      json.dump({"traceEvents": _events()}, f)
    self.assertEqual(timing.find_trace(root), path)


if __name__ == "__main__":
  absltest.main()
