"""experiments/scaling.py: a CPU smoke run on 1 and 2 virtual devices."""

import json
import os

from absl.testing import absltest
import pytest

from tests import entry_points


class ScalingTest(absltest.TestCase):

  @pytest.mark.slow  # 39 s, two pretrain runs; meshes: sharding_test
  def test_runlocal(self):
    out = self.create_tempdir().full_path
    run = entry_points.run("scaling", "--runlocal", f"--out_dir={out}")
    self.assertEqual(run.returncode, 0, run.stderr[-3000:])
    rows = json.load(open(os.path.join(out, "scaling.json")))["rows"]
    self.assertEqual([r["devices"] for r in rows], [1, 2])
    for r in rows:
      self.assertEqual(r["steps_logged"], 6)
      self.assertFalse(r["cut_by_time_limit"])
      self.assertGreater(r["tokens_per_s"], 0)
    self.assertEqual(rows[0]["scaling_efficiency"], 1.0)
    # Same seed, data and global batch on a (1, 2, 1) mesh: same losses.
    # Every logged step: the first (step 1) and each log_every.
    self.assertEqual(rows[1]["loss_steps_compared"], [1, 2, 4, 6])
    self.assertLess(rows[1]["max_abs_loss_diff"], 1e-4)
    self.assertEqual(rows[1]["agree_1pct_through_step"], 6)
    self.assertLess(rows[1]["loss_last_common"], rows[1]["loss_first"])
    self.assertTrue(os.path.getsize(os.path.join(out, "scaling.png")))

  def test_bad_mesh_is_one_clear_error(self):
    run = entry_points.run("scaling", "--meshes=1,2",
                           f"--out_dir={self.create_tempdir().full_path}",
                           timeout=120)
    self.assertNotEqual(run.returncode, 0)
    self.assertEqual(run.stderr.strip().splitlines()[-1],
                     "--meshes entry '1,2': expected three positive integers "
                     "data,fsdp,tensor")


if __name__ == "__main__":
  absltest.main()
