"""experiments/scaling.py: a CPU smoke run on 1 and 2 virtual devices."""

import json
import os
import subprocess
import sys

from absl.testing import absltest

from experiments import scaling

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


class ScalingTest(absltest.TestCase):

  def test_runlocal(self):
    out = self.create_tempdir().full_path
    run = subprocess.run(
        [sys.executable, "-m", "experiments.scaling", "--runlocal",
         f"--out_dir={out}"], cwd=REPO,
        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
        text=True, timeout=300)
    self.assertEqual(run.returncode, 0, run.stderr[-3000:])
    rows = json.load(open(os.path.join(out, "scaling.json")))["rows"]
    self.assertEqual([r["devices"] for r in rows], [1, 2])
    for r in rows:
      self.assertEqual(r["steps_logged"], 6)
      self.assertFalse(r["cut_by_time_limit"])
      self.assertGreater(r["tokens_per_s"], 0)
    self.assertEqual(rows[0]["scaling_efficiency"], 1.0)
    # Same seed, data and global batch on a (1, 2, 1) mesh: same losses.
    self.assertEqual(rows[1]["loss_steps_compared"], [2, 4, 6])
    self.assertLess(rows[1]["max_abs_loss_diff"], 1e-4)
    self.assertEqual(rows[1]["agree_1pct_through_step"], 6)
    self.assertLess(rows[1]["loss_last_common"], rows[1]["loss_first"])
    self.assertTrue(os.path.getsize(os.path.join(out, "scaling.png")))

  def test_bad_mesh_is_one_clear_error(self):
    with self.assertRaisesRegex(ValueError, "three positive integers"):
      scaling.parse_meshes("1,2")
    with self.assertRaisesRegex(ValueError, "at least one"):
      scaling.parse_meshes(" ; ")
    self.assertEqual(scaling.parse_meshes("1,1,1; 2,1,1"),
                     [(1, 1, 1), (2, 1, 1)])


if __name__ == "__main__":
  absltest.main()
