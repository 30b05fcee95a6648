"""The benchmark stamp and results writer."""

import json
import os
import re
from unittest import mock

from absl.testing import absltest

from experiments.bench import harness


class HarnessTest(absltest.TestCase):

  def test_stamp_names_command_device_and_commit(self):
    with mock.patch("sys.argv", ["decode_bench.py", "--steps=3"]):
      meta = harness.stamp("decode_bench", model="tiny")
    self.assertEqual(meta["command"],
                     "python -m experiments.decode_bench --steps=3")
    self.assertEqual(meta["model"], "tiny")
    self.assertRegex(meta["commit"], r"^([0-9a-f]{7,}(-dirty)?|n/a)$")
    self.assertTrue(meta["device"])
    self.assertRegex(meta["date"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d")

  def test_commit_from_the_environment(self):
    # A tree copied without git (the device machine) names its commit.
    with mock.patch.dict(os.environ, {harness.COMMIT_ENV: "abc1234"}):
      self.assertEqual(harness.stamp("x")["commit"], "abc1234")

  def test_write_results_is_atomic_and_writes_the_table(self):
    out = self.create_tempdir().full_path
    path = harness.write_results(out, "bench", {"a": 1.5}, table="| a |\n")
    self.assertEqual(json.load(open(path)), {"a": 1.5})
    self.assertEqual(open(os.path.join(out, "table.md")).read(), "| a |\n")
    # A second write replaces the first whole; no temporary is left.
    harness.write_results(out, "bench", {"a": 2})
    self.assertEqual(json.load(open(path)), {"a": 2})
    self.assertEqual(sorted(os.listdir(out)), ["bench.json", "table.md"])
    self.assertFalse(any(re.search(r"\.tmp$", f) for f in os.listdir(out)))


if __name__ == "__main__":
  absltest.main()
