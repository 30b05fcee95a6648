"""checkpoint: damaged steps are set aside, outputs are checked up front."""

import os

from absl.testing import absltest
import numpy as np

from nosa_jax import checkpoint
from nosa_jax import testing


class CheckpointerTest(absltest.TestCase):

  def test_restore_intact_sets_damaged_steps_aside(self):
    root = self.create_tempdir().full_path
    ckpt = checkpoint.Checkpointer(os.path.join(root, "checkpoints"), keep=5)
    like = {"x": np.zeros(4, np.float32)}
    for step in (1, 2, 3):
      ckpt.save(step, {"x": np.full(4, step, np.float32)}, {"step": step})
    ckpt.wait()
    # Step 3's metadata deleted, step 2's array bytes cut short.
    os.remove(os.path.join(ckpt.directory, "3", "state", "_METADATA"))
    testing.damage_checkpoint(os.path.join(ckpt.directory, "2"))
    with self.assertLogs(level="WARNING") as logs:
      state, meta = ckpt.restore_intact(like)
    self.assertEqual((meta["step"], float(state["x"][0])), (1, 1.0))
    self.assertRegex(logs.output[0], r"checkpoint step 3 does not restore "
                     r"\(state/_METADATA missing\); set aside as "
                     rf"{root}/set_aside/3.corrupt, falling back")
    self.assertRegex(logs.output[1], r"checkpoint step 2 does not restore "
                     r"\(ValueError: .*\); set aside as .*/2.corrupt")
    self.assertEqual(ckpt.all_steps(), [1])
    self.assertEqual(sorted(os.listdir(os.path.join(root, "set_aside"))),
                     ["2.corrupt", "3.corrupt"])

    os.remove(os.path.join(ckpt.directory, "1", "state", "_METADATA"))
    with self.assertLogs(level="WARNING"), self.assertRaisesRegex(
        checkpoint.CheckpointError, r"^no checkpoint in .* restores"):
      ckpt.restore_intact(like)

  def test_writable_dir(self):
    root = self.create_tempdir().full_path
    self.assertEqual(checkpoint.writable_dir(f"{root}/a/b", "--out"),
                     f"{root}/a/b")
    with open(f"{root}/f", "w") as f:
      f.write("x")
    with self.assertRaisesRegex(OSError, rf"^--out: {root}/f is a file, not "
                                "a directory$"):
      checkpoint.writable_dir(f"{root}/f", "--out")
    with self.assertRaisesRegex(OSError, rf"^--out: {root}/f/g is not a "
                                "writable directory: Not a directory$"):
      checkpoint.writable_dir(f"{root}/f/g", "--out")


if __name__ == "__main__":
  absltest.main()
