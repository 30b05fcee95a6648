"""experiments/overlap_probe.py: a CPU smoke run (figures meaningless there)."""

import json
import os

from absl.testing import absltest

from tests import entry_points


class SmokeTest(absltest.TestCase):

  def test_runlocal(self):
    out = self.create_tempdir().full_path
    run = entry_points.run("overlap_probe", "--runlocal", f"--out_dir={out}")
    self.assertEqual(run.returncode, 0, run.stderr[-3000:])
    res = json.load(open(os.path.join(out, "overlap_probe.json")))
    self.assertEqual([r["arrangement"] for r in res["rows"]],
                     ["both", "stream"])
    both = res["rows"][0]
    self.assertGreater(both["both_ms"], 0)  # the default stream always runs
    for r in res["rows"]:  # a figure or the reason there is none
      self.assertTrue("both_ms" in r or r["error"])
    self.assertEqual(res["meta"]["shapes"]["tiles"], 16)
    self.assertIn("| both | 2 |", open(os.path.join(out, "table.md")).read())


if __name__ == "__main__":
  absltest.main()
